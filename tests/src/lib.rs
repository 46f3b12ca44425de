//! Helpers for the end-to-end tests: start the real `uturn` binary on free loopback ports,
//! start echo peers, and a small raw TURN client built on `uturn-proto`'s wire code.
//!
//! Every process a test starts is ended by PID when its guard drops; every wait is bounded.

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use uturn_proto::wire::{Class, Message, Method, TransactionId};

pub use uturn_bench::client::{build, error_code, Client, Response};

pub use uturn_proto;

/// The I/O backends every end-to-end test runs against.
pub const BACKENDS: [&str; 2] = ["uring", "epoll"];

/// Path of the `uturn` binary: `$UTURN_BIN`, else `target/{debug,release}/uturn` of this workspace.
pub fn uturn_bin() -> PathBuf {
    if let Ok(p) = std::env::var("UTURN_BIN") {
        return p.into();
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| root.join("target"));
    for profile in ["debug", "release"] {
        let p = target.join(profile).join("uturn");
        if p.exists() {
            return p;
        }
    }
    panic!(
        "uturn binary not found under {}: run `cargo build --bin uturn` first (scripts/test.sh does)",
        target.display()
    );
}

/// A free UDP port on 127.0.0.1 (bound then released; uturn binds it again right away).
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A running `uturn`; killed (by PID) and reaped on drop.
pub struct Relay {
    child: Child,
    /// The UDP listen address.
    pub addr: SocketAddr,
    /// The TCP listen address (same port as UDP), when started with [`Relay::start_streams`].
    pub tcp: Option<SocketAddr>,
    /// The TLS listen address, when started with [`Relay::start_streams`].
    pub tls: Option<SocketAddr>,
    _config: Option<tempfile_lite::TempFile>,
    stderr_log: PathBuf,
}

pub mod netns;

/// A tiny temp-file guard (removes the file on drop).
pub mod tempfile_lite {
    use std::path::PathBuf;

    /// A file removed on drop.
    pub struct TempFile(pub PathBuf);

    impl TempFile {
        /// Writes `contents` to a fresh file under the system temp dir.
        pub fn new(name: &str, contents: &str) -> Self {
            let p = std::env::temp_dir().join(format!(
                "uturn-test-{}-{}-{name}",
                std::process::id(),
                rand::random::<u32>()
            ));
            std::fs::write(&p, contents).unwrap();
            TempFile(p)
        }
    }
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

impl Relay {
    /// Starts uturn on a free port with `backend`, two workers, a random 400-port relay range,
    /// the TOML `config` (may be empty) and extra `args`; waits until it answers a Binding
    /// request (at most 10 s).
    pub fn start(backend: &str, config: &str, args: &[&str]) -> Relay {
        Self::start_with_env(backend, config, args, &[])
    }

    /// [`start`](Self::start) with extra environment variables.
    pub fn start_with_env(backend: &str, config: &str, args: &[&str], env: &[(&str, &str)]) -> Relay {
        Self::start_bin(&uturn_bin(), backend, config, args, env, None)
    }

    /// [`start`](Self::start) running the binary at `bin` (a copy a test may replace).
    pub fn start_from(bin: &std::path::Path, backend: &str, config: &str, args: &[&str]) -> Relay {
        Self::start_bin(bin, backend, config, args, &[], None)
    }

    /// [`start`](Self::start), also listening on `tcp://` at the UDP port and on `tls://` at
    /// another port with `tls`'s certificate (TURN over TCP and TLS).
    pub fn start_streams(backend: &str, config: &str, args: &[&str], tls: &TlsFiles) -> Relay {
        Self::start_bin(&uturn_bin(), backend, config, args, &[], Some(tls))
    }

    /// [`start_streams`](Self::start_streams) running the program at `bin` (e.g. a wrapper
    /// that sets a resource limit, then execs [`uturn_bin`]).
    pub fn start_streams_from(
        bin: &std::path::Path,
        backend: &str,
        config: &str,
        args: &[&str],
        tls: &TlsFiles,
    ) -> Relay {
        Self::start_bin(bin, backend, config, args, &[], Some(tls))
    }

    fn start_bin(
        bin: &std::path::Path,
        backend: &str,
        config: &str,
        args: &[&str],
        env: &[(&str, &str)],
        tls: Option<&TlsFiles>,
    ) -> Relay {
        for _attempt in 0..5 {
            let port = free_udp_port();
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let (tcp, tls_addr) = match tls {
                Some(_) => {
                    let t = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
                    (Some(SocketAddr::from(([127, 0, 0, 1], port))), Some(t))
                }
                None => (None, None),
            };
            let mut stream_args: Vec<String> = Vec::new();
            if let (Some(tcp), Some(t), Some(files)) = (tcp, tls_addr, tls) {
                stream_args.extend([
                    "--listen".into(),
                    format!("tcp://{tcp}"),
                    "--listen".into(),
                    format!("tls://{t}"),
                ]);
                stream_args.extend(["--tls-cert".into(), files.cert.display().to_string()]);
                stream_args.extend(["--tls-key".into(), files.key.display().to_string()]);
            }
            // A relay port range clear of the listen ports (uturn refuses a TCP listener inside it).
            let mut taken: Vec<u16> =
                args.iter().filter_map(|a| a.parse::<SocketAddr>().ok()).map(|a| a.port()).collect();
            taken.extend([Some(port), tls_addr.map(|t| t.port())].into_iter().flatten());
            let lo = loop {
                let lo = 49152 + (rand::random::<u16>() % 15000);
                if !taken.iter().any(|p| (lo..=lo + 399).contains(p)) {
                    break lo;
                }
            };
            let range = format!("{lo}-{}", lo + 399);
            // A config file that sets the port range keeps it (flags would override it).
            let range_args: Vec<&str> =
                if config.contains("port-range") { vec![] } else { vec!["--port-range", &range] };
            let cfg = tempfile_lite::TempFile::new("config.toml", config);
            let stderr_log = std::env::temp_dir().join(format!("uturn-test-{}-{port}.log", std::process::id()));
            let log = std::fs::File::create(&stderr_log).unwrap();
            let child = Command::new(bin)
                .args(["--listen", &addr.to_string(), "--workers", "2", "--io-backend", backend])
                .args(&stream_args)
                .args(range_args)
                .args(["--log-level", "debug"])
                .arg("--config")
                .arg(&cfg.0)
                .args(args)
                .envs(env.iter().copied())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn uturn");
            let mut relay = Relay { child, addr, tcp, tls: tls_addr, _config: Some(cfg), stderr_log };
            if relay.wait_ready(Duration::from_secs(10)) {
                return relay;
            }
            eprintln!("uturn did not come up on {addr}; log:\n{}", relay.log());
        }
        panic!("could not start uturn");
    }

    fn wait_ready(&mut self, limit: Duration) -> bool {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            let req = build(Method::BINDING, Class::Request, TransactionId(rand::random()), None, |_| Ok(()));
            let _ = sock.send_to(&req, self.addr);
            let mut buf = [0u8; 1500];
            if let Ok((n, _)) = sock.recv_from(&mut buf) {
                if Message::parse(&buf[..n]).is_ok() {
                    return true;
                }
            }
        }
        false
    }

    /// The relay's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The config file the relay was started with (rewrite it, then [`signal`](Self::signal)
    /// `HUP`).
    pub fn config_path(&self) -> &std::path::Path {
        &self._config.as_ref().expect("started with a config file").0
    }

    /// Sends signal `name` (e.g. `HUP`) to the relay, by PID.
    pub fn signal(&self, name: &str) {
        let st = Command::new("kill").arg(format!("-{name}")).arg(self.pid().to_string()).status().expect("kill");
        assert!(st.success(), "kill -{name} {}", self.pid());
    }

    /// Waits (at most `limit`) until the log contains `needle`.
    pub fn wait_log(&self, needle: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// The relay's log so far (stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// Waits (at most `limit`) for the process to exit on its own; returns the exit status.
    pub fn terminate_after(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Sends SIGTERM and waits (at most `limit`) for a clean exit; returns the exit status.
    pub fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        self.terminate_after(limit)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- uturn log ---\n{}", self.log());
        }
        let _ = std::fs::remove_file(&self.stderr_log);
    }
}

/// A self-signed certificate for `localhost` and 127.0.0.1 (ECDSA P-256) and its key, made with
/// `openssl` at test time in a fresh temp directory, removed on drop.
pub struct TlsFiles {
    dir: PathBuf,
    /// The PEM certificate.
    pub cert: PathBuf,
    /// The PEM private key.
    pub key: PathBuf,
}

impl TlsFiles {
    /// Generates them (panics when `openssl` is missing: scripts/test.sh installs it).
    pub fn generate() -> TlsFiles {
        let dir = std::env::temp_dir().join(format!("uturn-test-tls-{}-{}", std::process::id(), rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = TlsFiles { cert: dir.join("cert.pem"), key: dir.join("key.pem"), dir };
        files.regenerate();
        files
    }

    /// Replaces the certificate and key with fresh ones (same paths).
    pub fn regenerate(&self) {
        let st = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
            .args(["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
            .arg("-keyout")
            .arg(&self.key)
            .arg("-out")
            .arg(&self.cert)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl (Debian package openssl) must be installed");
        assert!(st.success(), "openssl req failed");
    }

    /// The certificate's SHA-256 fingerprint as `openssl x509 -fingerprint` prints it.
    pub fn fingerprint(&self) -> String {
        let out = Command::new("openssl")
            .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
            .arg(&self.cert)
            .output()
            .expect("openssl");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for TlsFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A child process killed (by PID) and reaped on drop.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts coturn's `turnutils_peer` (a UDP echo peer) on 127.0.0.1 and a free port; returns its
/// guard and the port.
pub fn start_turnutils_peer() -> (Guard, u16) {
    let port = free_udp_port();
    let child = Command::new("turnutils_peer")
        .args(["-L", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("turnutils_peer (Debian package coturn) must be installed: scripts/test.sh installs it");
    std::thread::sleep(Duration::from_millis(300));
    (Guard(child), port)
}

/// Runs `uturn ARGS` (a subcommand such as `credential` or `admin`) with a 20 s limit;
/// returns (exit code, stdout, stderr).
pub fn uturn_cli(args: &[&str]) -> (i32, String, String) {
    let mut child = Command::new(uturn_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn uturn");
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let out = child.wait_with_output().expect("uturn output");
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    (out.status.code().unwrap_or(-1), text(out.stdout), text(out.stderr))
}

/// A `redis-server` the test starts on a free loopback port with persistence off; killed by
/// PID on drop.
pub struct RedisServer {
    child: Option<Child>,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl RedisServer {
    /// Starts one and waits (at most 5 s) until it answers PING. Panics when `redis-server`
    /// is missing (scripts/test.sh installs it).
    pub fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        Self::spawn(port, &[])
    }

    /// Starts one that also serves TLS (`tls-port`, with `tls`'s certificate for `localhost`,
    /// no client certificates) and waits until it answers PING on its plain port. Returns it
    /// and the TLS port.
    pub fn start_tls(tls: &TlsFiles) -> (RedisServer, u16) {
        let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let (port, tls_port) = (free(), free());
        let (cert, key) = (tls.cert.display().to_string(), tls.key.display().to_string());
        let tls_args = [
            "--tls-port",
            &tls_port.to_string(),
            "--tls-auth-clients",
            "no",
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &cert,
        ]
        .map(str::to_owned);
        (Self::spawn(port, &tls_args), tls_port)
    }

    /// Starts one on `port` (e.g. the port of one killed before: a Redis that comes back).
    pub fn start_on(port: u16) -> RedisServer {
        Self::spawn(port, &[])
    }

    /// `redis-server` on `port` with `extra` arguments, once it answers PING (at most 5 s).
    fn spawn(port: u16, extra: &[String]) -> RedisServer {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (Debian package redis-server) must be installed: scripts/test.sh installs it");
        let r = RedisServer { child: Some(child), port };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if r.ping() {
                return r;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server on port {port} did not answer PING");
    }

    /// The store URL of database 0.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn ping(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    /// Kills the server now (an outage), by PID.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A UDP peer on loopback.
pub fn peer_socket() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    s
}

/// Runs `cmd` with a wall-clock limit, returning (success, combined output).
pub fn run_with_timeout(cmd: &mut Command, limit: Duration) -> (bool, String) {
    let out_path =
        std::env::temp_dir().join(format!("uturn-test-out-{}-{}", std::process::id(), rand::random::<u32>()));
    let file = std::fs::File::create(&out_path).unwrap();
    let mut child =
        Guard(cmd.stdout(file.try_clone().unwrap()).stderr(file).stdin(Stdio::null()).spawn().expect("spawn"));
    let deadline = Instant::now() + limit;
    let ok = loop {
        if let Ok(Some(st)) = child.0.try_wait() {
            break st.success();
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(child);
    let out = std::fs::read_to_string(&out_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    (ok, out)
}
