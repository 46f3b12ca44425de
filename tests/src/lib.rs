//! Helpers for the end-to-end tests: start the real `uturn` binary on free loopback ports,
//! start echo peers, and a small raw TURN client built on `uturn-proto`'s wire code.
//!
//! Every process a test starts is ended by PID when its guard drops; every wait is bounded.

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use uturn_proto::wire::{attr, Class, IntegrityKey, Message, MessageWriter, Method, TransactionId};

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
    _config: Option<tempfile_lite::TempFile>,
    stderr_log: PathBuf,
}

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
        for _attempt in 0..5 {
            let port = free_udp_port();
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let lo = 49152 + (rand::random::<u16>() % 15000);
            let range = format!("{lo}-{}", lo + 399);
            // A config file that sets the port range keeps it (flags would override it).
            let range_args: Vec<&str> =
                if config.contains("port-range") { vec![] } else { vec!["--port-range", &range] };
            let cfg = tempfile_lite::TempFile::new("config.toml", config);
            let stderr_log = std::env::temp_dir().join(format!("uturn-test-{}-{port}.log", std::process::id()));
            let log = std::fs::File::create(&stderr_log).unwrap();
            let child = Command::new(uturn_bin())
                .args(["--listen", &addr.to_string(), "--workers", "2", "--io-backend", backend])
                .args(range_args)
                .args(["--log-level", "debug"])
                .arg("--config")
                .arg(&cfg.0)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn uturn");
            let mut relay = Relay { child, addr, _config: Some(cfg), stderr_log };
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

    /// The relay's log so far (stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits (at most `limit`) for a clean exit; returns the exit status.
    pub fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
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

/// A child process killed (by PID) and reaped on drop.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Builds a STUN message; `f` adds attributes; with `key`, MESSAGE-INTEGRITY and FINGERPRINT
/// are appended.
pub fn build(
    method: Method,
    class: Class,
    tid: TransactionId,
    key: Option<&[u8]>,
    f: impl FnOnce(&mut MessageWriter<'_>) -> Result<(), uturn_proto::wire::WriteError>,
) -> Vec<u8> {
    let mut buf = vec![0u8; 1500];
    let mut w = MessageWriter::new(&mut buf, method, class, tid).unwrap();
    f(&mut w).unwrap();
    if let Some(k) = key {
        w.integrity(k).unwrap();
        w.fingerprint().unwrap();
    }
    let n = w.finish();
    buf.truncate(n);
    buf
}

/// The ERROR-CODE number of a response, if any.
pub fn error_code(msg: &Message<'_>) -> Option<u16> {
    msg.get(attr::ERROR_CODE).map(|v| v[2] as u16 * 100 + v[3] as u16)
}

/// A raw TURN client on its own UDP socket, speaking to one relay.
pub struct Client {
    /// The client's socket.
    pub sock: UdpSocket,
    server: SocketAddr,
    /// Username used for requests.
    pub user: String,
    /// Long-term key.
    pub key: IntegrityKey,
    /// Realm learned from the server's 401.
    pub realm: String,
    /// Nonce learned from the server's 401/438.
    pub nonce: Vec<u8>,
}

/// A response as owned bytes with convenience accessors.
pub struct Response(pub Vec<u8>);

impl Response {
    /// The parsed message (panics if the server sent something unparseable).
    pub fn msg(&self) -> Message<'_> {
        Message::parse(&self.0).expect("server sent a valid STUN message")
    }
    /// ERROR-CODE number, or None for success.
    pub fn code(&self) -> Option<u16> {
        error_code(&self.msg())
    }
}

impl Client {
    /// A client of `server` with credentials `user`/`password` in realm `realm`.
    pub fn new(server: SocketAddr, user: &str, password: &str, realm: &str) -> Client {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        Client {
            sock,
            server,
            user: user.into(),
            key: IntegrityKey::long_term(user, realm, password),
            realm: realm.into(),
            nonce: Vec::new(),
        }
    }

    /// Sends raw bytes to the server.
    pub fn send_raw(&self, bytes: &[u8]) {
        self.sock.send_to(bytes, self.server).unwrap();
    }

    /// Waits (at most ~500 ms) for the next datagram from anywhere.
    pub fn recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 65536];
        let (n, _) = self.sock.recv_from(&mut buf).ok()?;
        buf.truncate(n);
        Some(buf)
    }

    /// Sends `req` and waits for the response with its transaction ID, retransmitting up to 4
    /// times (500 ms apart), skipping unrelated datagrams.
    pub fn transact(&self, req: &[u8]) -> Option<Response> {
        let tid = Message::parse(req).unwrap().transaction_id();
        for _ in 0..4 {
            self.send_raw(req);
            let deadline = Instant::now() + Duration::from_millis(500);
            while Instant::now() < deadline {
                let Some(d) = self.recv() else { break };
                if Message::parse(&d).is_ok_and(|m| m.transaction_id() == tid && m.class() != Class::Indication) {
                    return Some(Response(d));
                }
            }
        }
        None
    }

    /// Sends an unauthenticated request built by `f` and returns the response.
    pub fn unauthenticated(
        &self,
        method: Method,
        f: impl FnOnce(&mut MessageWriter<'_>) -> Result<(), uturn_proto::wire::WriteError>,
    ) -> Response {
        let req = build(method, Class::Request, TransactionId(rand::random()), None, f);
        self.transact(&req).expect("response")
    }

    /// Sends a request with USERNAME, REALM, NONCE and MESSAGE-INTEGRITY; `f` adds the method's
    /// attributes first.
    pub fn authenticated(
        &self,
        method: Method,
        f: impl FnOnce(&mut MessageWriter<'_>) -> Result<(), uturn_proto::wire::WriteError>,
    ) -> Response {
        let req = self.signed_request(method, TransactionId(rand::random()), f);
        self.transact(&req).expect("response")
    }

    /// Builds a signed request without sending it.
    pub fn signed_request(
        &self,
        method: Method,
        tid: TransactionId,
        f: impl FnOnce(&mut MessageWriter<'_>) -> Result<(), uturn_proto::wire::WriteError>,
    ) -> Vec<u8> {
        let (user, realm, nonce, key) = (self.user.clone(), self.realm.clone(), self.nonce.clone(), self.key);
        build(method, Class::Request, tid, Some(&key.0), |w| {
            f(w)?;
            w.bytes(attr::USERNAME, user.as_bytes())?;
            w.bytes(attr::REALM, realm.as_bytes())?;
            w.bytes(attr::NONCE, &nonce)?;
            Ok(())
        })
    }

    /// Learns REALM and NONCE from a 401 to an unauthenticated Allocate.
    pub fn learn_nonce(&mut self) {
        let r = self.unauthenticated(Method::ALLOCATE, |w| w.u32(attr::REQUESTED_TRANSPORT, 17 << 24).map(drop));
        assert_eq!(r.code(), Some(401));
        let m = r.msg();
        self.realm = String::from_utf8(m.realm().unwrap().to_vec()).unwrap();
        self.nonce = m.nonce().unwrap().to_vec();
    }

    /// Full Allocate (401 round, then authenticated); returns the relayed transport address.
    pub fn allocate(&mut self) -> SocketAddr {
        self.learn_nonce();
        let r = self.authenticated(Method::ALLOCATE, |w| w.u32(attr::REQUESTED_TRANSPORT, 17 << 24).map(drop));
        assert_eq!(r.code(), None, "allocate failed");
        let m = r.msg();
        assert!(uturn_proto::wire::integrity::verify(&self.key.0, &m.integrity_parts().unwrap()));
        m.xor_address(attr::XOR_RELAYED_ADDRESS).unwrap().unwrap()
    }

    /// CreatePermission for `peers`.
    pub fn create_permission(&self, peers: &[SocketAddr]) -> Response {
        self.authenticated(Method::CREATE_PERMISSION, |w| {
            for p in peers {
                w.xor_address(attr::XOR_PEER_ADDRESS, p)?;
            }
            Ok(())
        })
    }

    /// ChannelBind `channel` to `peer`.
    pub fn channel_bind(&self, channel: u16, peer: SocketAddr) -> Response {
        self.authenticated(Method::CHANNEL_BIND, |w| {
            w.u32(attr::CHANNEL_NUMBER, (channel as u32) << 16)?;
            w.xor_address(attr::XOR_PEER_ADDRESS, &peer)?;
            Ok(())
        })
    }

    /// Refresh with `lifetime` seconds.
    pub fn refresh(&self, lifetime: u32) -> Response {
        self.authenticated(Method::REFRESH, |w| w.u32(attr::LIFETIME, lifetime).map(drop))
    }

    /// Sends ChannelData on `channel`.
    pub fn send_channel_data(&self, channel: u16, payload: &[u8]) {
        let mut d = Vec::with_capacity(4 + payload.len());
        d.extend_from_slice(&channel.to_be_bytes());
        d.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        d.extend_from_slice(payload);
        self.send_raw(&d);
    }

    /// Sends a Send indication to `peer`.
    pub fn send_indication(&self, peer: SocketAddr, payload: &[u8]) {
        let ind = build(Method::SEND, Class::Indication, TransactionId(rand::random()), None, |w| {
            w.xor_address(attr::XOR_PEER_ADDRESS, &peer)?;
            w.bytes(attr::DATA, payload)?;
            Ok(())
        });
        self.send_raw(&ind);
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
