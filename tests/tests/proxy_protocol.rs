//! The PROXY protocol from load balancers (docs/operations.md, "Behind a load balancer"):
//! HAProxy (Debian's, TCP mode, `send-proxy` and `send-proxy-v2`) in front of uturn's TCP and
//! TLS listeners, a balancer written here that puts a PROXY v2 header on every UDP datagram, and
//! headers written by hand for the partial, LOCAL, untrusted, missing, malformed and late cases.
//!
//! On loopback the real client, the balancer's front, the balancer's source and an untrusted
//! host are told apart by their 127.x addresses: clients bind 127.0.0.2, the balancer listens
//! on 127.0.0.3 and connects from 127.0.0.4 (the only `proxy-trusted` network), and 127.0.0.5
//! stands for a host that is not a balancer.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use uturn_bench::client::stream::{tcp_from, StreamClient};
use uturn_tests::uturn_proto::wire::{attr, Class, Message, Method, TransactionId};
use uturn_tests::{
    build, peer_socket, tempfile_lite::TempFile, uturn_bin, uturn_cli, Client, Guard, TlsFiles, BACKENDS,
};

const CLIENT: &str = "127.0.0.2";
const FRONT: &str = "127.0.0.3";
const BALANCER: &str = "127.0.0.4";
const STRANGER: &str = "127.0.0.5";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A uturn started here (not through `Relay`, whose readiness probe is a plain UDP Binding that
/// a `proxy-protocol-udp` listener drops): UDP and TCP on one port, TLS on another, metrics.
struct Uturn {
    _child: Guard,
    udp: SocketAddr,
    tcp: SocketAddr,
    tls: SocketAddr,
    metrics: SocketAddr,
    log: PathBuf,
    _config: TempFile,
}

impl Uturn {
    fn start(backend: &str, config: &str, files: &TlsFiles) -> Uturn {
        for _ in 0..5 {
            let port = uturn_tests::free_udp_port();
            let (tls_port, m_port) = (free_tcp_port(), free_tcp_port());
            let lo = loop {
                let lo = 49152 + (rand::random::<u16>() % 15000);
                if ![port, tls_port, m_port].iter().any(|p| (lo..=lo + 399).contains(p)) {
                    break lo;
                }
            };
            let udp: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let tcp = udp;
            let tls: SocketAddr = format!("127.0.0.1:{tls_port}").parse().unwrap();
            let metrics: SocketAddr = format!("127.0.0.1:{m_port}").parse().unwrap();
            let cfg = TempFile::new("proxy.toml", config);
            let log = std::env::temp_dir().join(format!("uturn-proxy-{}-{port}.log", std::process::id()));
            let child = Command::new(uturn_bin())
                .args(["--listen", &udp.to_string(), "--listen", &format!("tcp://{tcp}")])
                .args(["--listen", &format!("tls://{tls}"), "--workers", "2", "--io-backend", backend])
                .args(["--tls-cert", &files.cert.display().to_string(), "--tls-key", &files.key.display().to_string()])
                .args(["--port-range", &format!("{lo}-{}", lo + 399), "--metrics-listen", &metrics.to_string()])
                .args(["--log-level", "debug", "--config"])
                .arg(&cfg.0)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect("spawn uturn");
            let u = Uturn { _child: Guard(child), udp, tcp, tls, metrics, log, _config: cfg };
            if u.ready(Duration::from_secs(10)) {
                return u;
            }
            eprintln!("uturn did not come up; log:\n{}", std::fs::read_to_string(&u.log).unwrap_or_default());
        }
        panic!("could not start uturn");
    }

    /// Ready once its metrics endpoint answers and its TCP listener accepts (a connection from
    /// the balancer's address that closes without a header: no refusal is counted).
    fn ready(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if TcpStream::connect_timeout(&self.metrics, Duration::from_millis(100)).is_ok()
                && tcp_from(SocketAddr::new(ip(BALANCER), 0), self.tcp).is_ok()
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    fn scrape(&self) -> String {
        let mut s = TcpStream::connect_timeout(&self.metrics, Duration::from_secs(2)).expect("metrics endpoint");
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        write!(s, "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", self.metrics).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    /// The value of one series (`name{labels}`), 0 when absent.
    fn metric(&self, series: &str) -> f64 {
        let text = self.scrape();
        text.lines()
            .find(|l| l.starts_with(series) && l.as_bytes().get(series.len()) == Some(&b' '))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    }

    /// Waits (at most 3 s: workers publish every 250 ms) for `series` to reach `at_least`.
    fn wait_metric(&self, series: &str, at_least: f64) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let v = self.metric(series);
            if v >= at_least || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A PROXY v1 header for a TCP connection from `src` to `dst`.
fn v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let fam = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    format!("PROXY {fam} {} {} {} {}\r\n", src.ip(), dst.ip(), src.port(), dst.port()).into_bytes()
}

/// A PROXY v2 header (`command` 1: PROXY, 0: LOCAL) for `src` to `dst` over `dgram` (UDP) or
/// TCP, with a TLV of `tlv` bytes (type 0xE0, custom) when `tlv > 0`.
fn v2(command: u8, src: SocketAddr, dst: SocketAddr, dgram: bool, tlv: usize) -> Vec<u8> {
    let mut b = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    b.push(0x20 | command);
    let mut body = Vec::new();
    let family = match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            body.extend_from_slice(&s.ip().octets());
            body.extend_from_slice(&d.ip().octets());
            0x10
        }
        (SocketAddr::V6(s), SocketAddr::V6(d)) => {
            body.extend_from_slice(&s.ip().octets());
            body.extend_from_slice(&d.ip().octets());
            0x20
        }
        _ => panic!("one family"),
    };
    body.extend_from_slice(&src.port().to_be_bytes());
    body.extend_from_slice(&dst.port().to_be_bytes());
    if tlv > 0 {
        body.push(0xE0);
        body.extend_from_slice(&(tlv as u16).to_be_bytes());
        body.extend(std::iter::repeat_n(0x5A, tlv));
    }
    b.push(if command == 0 { 0 } else { family | if dgram { 2 } else { 1 } });
    if command == 0 {
        body.clear();
    }
    b.extend_from_slice(&(body.len() as u16).to_be_bytes());
    b.extend_from_slice(&body);
    b
}

fn binding_request() -> Vec<u8> {
    build(Method::BINDING, Class::Request, TransactionId(rand::random()), None, |_| Ok(()))
}

fn xor_mapped(response: &[u8]) -> SocketAddr {
    let m = Message::parse(response).expect("a STUN response");
    m.xor_address(attr::XOR_MAPPED_ADDRESS).expect("XOR-MAPPED-ADDRESS").expect("valid")
}

/// XOR-MAPPED-ADDRESS of a Binding over `c`.
fn mapped_over(c: &mut StreamClient) -> SocketAddr {
    let r = c.transact(&binding_request()).expect("Binding answered");
    xor_mapped(&r.0)
}

/// An echo peer on 127.0.0.1 for `how_long`.
fn echo_peer(how_long: Duration) -> SocketAddr {
    let s = peer_socket();
    let addr = s.local_addr().unwrap();
    std::thread::spawn(move || {
        let deadline = Instant::now() + how_long;
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            if let Ok((n, from)) = s.recv_from(&mut buf) {
                let _ = s.send_to(&buf[..n], from);
            }
        }
    });
    addr
}

/// Allocates over `c`, binds channel 0x4000 to `peer` and checks one ChannelData round trip.
fn relays_over_stream(c: &mut StreamClient, peer: SocketAddr) -> bool {
    c.allocate().expect("allocate");
    c.bind_channel(0x4000, peer).expect("channel bind");
    let tag = rand::random::<[u8; 12]>();
    c.send_channel_data(0x4000, &tag).unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if let Ok(Some(m)) = c.recv(Duration::from_millis(200)) {
            if m.len() >= 16 && m[4..16] == tag {
                return true;
            }
        }
    }
    false
}

/// True once the server has closed `s` (EOF or reset) within `wait`.
fn closed_within(s: &TcpStream, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match (&*s).read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return true,
        }
    }
    false
}

fn haproxy_bin() -> Option<PathBuf> {
    ["/usr/sbin/haproxy", "/usr/bin/haproxy", "/usr/local/sbin/haproxy"].iter().map(PathBuf::from).find(|p| p.exists())
}

#[test]
fn haproxy_send_proxy_v1_and_v2_carry_the_real_client_over_tcp_and_tls() {
    let haproxy = haproxy_bin().expect("haproxy (Debian package `haproxy`; scripts/test.sh installs it)");
    let files = TlsFiles::generate();
    for backend in BACKENDS {
        let config = format!("proxy-protocol = true\nproxy-trusted = [\"{BALANCER}/32\"]\n");
        let u = Uturn::start(backend, &config, &files);
        let fronts: Vec<(u16, SocketAddr, &str, bool)> = vec![
            (free_tcp_port(), u.tcp, "send-proxy", false),
            (free_tcp_port(), u.tcp, "send-proxy-v2", false),
            (free_tcp_port(), u.tls, "send-proxy", true),
            (free_tcp_port(), u.tls, "send-proxy-v2", true),
        ];
        let mut cfg = String::from(
            "global\n    maxconn 100\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n",
        );
        for (i, (port, to, send, _)) in fronts.iter().enumerate() {
            cfg += &format!("listen f{i}\n    bind {FRONT}:{port}\n    server s{i} {to} {send} source {BALANCER}\n");
        }
        let cfg_file = TempFile::new("haproxy.cfg", &cfg);
        let _hap = Guard(
            Command::new(&haproxy)
                .args(["-db", "-f"])
                .arg(&cfg_file.0)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn haproxy"),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        for (port, ..) in &fronts {
            let front = SocketAddr::new(ip(FRONT), *port);
            while TcpStream::connect_timeout(&front, Duration::from_millis(100)).is_err() {
                assert!(Instant::now() < deadline, "haproxy did not listen on {front}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let peer = echo_peer(Duration::from_secs(30));
        for (port, _, send, tls) in &fronts {
            let front = SocketAddr::new(ip(FRONT), *port);
            let mut c =
                StreamClient::connect_from(SocketAddr::new(ip(CLIENT), 0), front, *tls, "demo", "demo", "uturn.local")
                    .unwrap_or_else(|e| panic!("{backend} {send} tls={tls}: {e}"));
            let me = c.local_addr();
            assert_eq!(mapped_over(&mut c), me, "{backend} {send} tls={tls}: XOR-MAPPED-ADDRESS is the real client");
            assert!(relays_over_stream(&mut c, peer), "{backend} {send} tls={tls}: the allocation relays");
            assert!(u.log().contains(&format!("client={me}")), "{backend}: the logs name the real client");
        }
        assert!(u.wait_metric("uturn_proxy_headers_total{transport=\"tcp\"}", 4.0) >= 4.0, "{backend}");
    }
}

#[test]
fn hand_written_v1_and_v2_headers_whole_split_or_local_name_the_client() {
    let files = TlsFiles::generate();
    for backend in BACKENDS {
        let config = format!("proxy-protocol = true\nproxy-trusted = [\"{BALANCER}/32\"]\n");
        let u = Uturn::start(backend, &config, &files);
        let peer = echo_peer(Duration::from_secs(30));
        for tls in [false, true] {
            let server = if tls { u.tls } else { u.tcp };
            let claimed: SocketAddr = "198.51.100.7:4242".parse().unwrap();
            // v1, the header and the first message in one write (plain TCP), or before the
            // TLS handshake.
            let tcp = tcp_from(SocketAddr::new(ip(BALANCER), 0), server).unwrap();
            (&tcp).write_all(&v1(claimed, server)).unwrap();
            let mut c = StreamClient::over(tcp, server, tls, "demo", "demo", "uturn.local").expect("connect");
            assert_eq!(mapped_over(&mut c), claimed, "{backend} tls={tls}: v1");
            assert!(relays_over_stream(&mut c, peer), "{backend} tls={tls}: v1 relays");
            // v2 with a TLV, split in two writes 200 ms apart.
            let claimed6: SocketAddr = "[2001:db8::7]:5353".parse().unwrap();
            let tcp = tcp_from(SocketAddr::new(ip(BALANCER), 0), server).unwrap();
            tcp.set_nodelay(true).unwrap();
            let h = v2(1, claimed6, "[2001:db8::1]:3478".parse().unwrap(), false, 40);
            (&tcp).write_all(&h[..9]).unwrap();
            std::thread::sleep(Duration::from_millis(200));
            (&tcp).write_all(&h[9..]).unwrap();
            let mut c = StreamClient::over(tcp, server, tls, "demo", "demo", "uturn.local").expect("connect");
            assert_eq!(mapped_over(&mut c), claimed6, "{backend} tls={tls}: v2, split");
            // LOCAL (a balancer's health check): the connection's own source.
            let tcp = tcp_from(SocketAddr::new(ip(BALANCER), 0), server).unwrap();
            let own = tcp.local_addr().unwrap();
            (&tcp).write_all(&v2(0, own, server, false, 0)).unwrap();
            let mut c = StreamClient::over(tcp, server, tls, "demo", "demo", "uturn.local").expect("connect");
            assert_eq!(mapped_over(&mut c), own, "{backend} tls={tls}: v2 LOCAL");
        }
        assert!(u.wait_metric("uturn_proxy_headers_total{transport=\"tcp\"}", 6.0) >= 6.0, "{backend}");
    }
}

#[test]
fn untrusted_missing_malformed_and_late_headers_close_the_connection() {
    let files = TlsFiles::generate();
    for backend in BACKENDS {
        let config = format!("proxy-protocol = true\nproxy-trusted = [\"{BALANCER}/32\"]\ntls-handshake-timeout = 2\n");
        let u = Uturn::start(backend, &config, &files);
        for tls in [false, true] {
            let server = if tls { u.tls } else { u.tcp };
            let claimed: SocketAddr = "198.51.100.7:4242".parse().unwrap();
            // A valid header from a host outside proxy-trusted.
            let s = tcp_from(SocketAddr::new(ip(STRANGER), 0), server).unwrap();
            let _ = (&s).write_all(&v1(claimed, server));
            assert!(closed_within(&s, Duration::from_secs(2)), "{backend} tls={tls}: untrusted");
            // A client talking straight to the relay: no header.
            let s = tcp_from(SocketAddr::new(ip(BALANCER), 0), server).unwrap();
            let first = if tls { vec![0x16, 0x03, 0x01, 0x00, 0x05] } else { binding_request() };
            (&s).write_all(&first).unwrap();
            assert!(closed_within(&s, Duration::from_secs(2)), "{backend} tls={tls}: missing");
            // Malformed: a v1 header with a bad address, a v2 header with a bad command.
            let s = tcp_from(SocketAddr::new(ip(BALANCER), 0), server).unwrap();
            (&s).write_all(b"PROXY TCP4 300.1.2.3 127.0.0.1 1 2\r\n").unwrap();
            assert!(closed_within(&s, Duration::from_secs(2)), "{backend} tls={tls}: malformed v1");
            let mut h = v2(1, claimed, server, false, 0);
            h[12] = 0x2F;
            let s = tcp_from(SocketAddr::new(ip(BALANCER), 0), server).unwrap();
            (&s).write_all(&h).unwrap();
            assert!(closed_within(&s, Duration::from_secs(2)), "{backend} tls={tls}: malformed v2");
            // Late: half a header, then nothing (closed at the handshake deadline).
            let s = tcp_from(SocketAddr::new(ip(BALANCER), 0), server).unwrap();
            (&s).write_all(b"PROXY TCP4 198.51.").unwrap();
            assert!(!closed_within(&s, Duration::from_millis(500)), "{backend} tls={tls}: waits for the rest");
            assert!(closed_within(&s, Duration::from_secs(4)), "{backend} tls={tls}: late");
        }
        // A good connection still works next to them.
        let tcp = tcp_from(SocketAddr::new(ip(BALANCER), 0), u.tcp).unwrap();
        (&tcp).write_all(&v1("198.51.100.9:9".parse().unwrap(), u.tcp)).unwrap();
        let mut c = StreamClient::over(tcp, u.tcp, false, "demo", "demo", "uturn.local").unwrap();
        assert_eq!(mapped_over(&mut c), "198.51.100.9:9".parse().unwrap());
        for (reason, n) in [("untrusted", 2.0), ("missing", 2.0), ("malformed", 4.0), ("timeout", 2.0)] {
            let series = format!("uturn_proxy_refused_total{{transport=\"tcp\",reason=\"{reason}\"}}");
            assert_eq!(u.wait_metric(&series, n), n, "{backend}: {series}");
        }
        assert!(u.wait_metric("uturn_connections_closed_total{reason=\"proxy\"}", 8.0) >= 8.0, "{backend}");
    }
}

/// A UDP balancer that puts a PROXY v2 header (the client's address) on every datagram: it
/// listens on 127.0.0.3, keeps one socket on 127.0.0.4 per client flow (as UDP balancers do)
/// and hands what comes back on it, as it is, to that client.
struct UdpBalancer {
    front: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl UdpBalancer {
    fn start(relay: SocketAddr) -> UdpBalancer {
        let front_sock = UdpSocket::bind(SocketAddr::new(ip(FRONT), 0)).unwrap();
        front_sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let front = front_sock.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let halt = stop.clone();
        std::thread::spawn(move || {
            let mut flows: Vec<(SocketAddr, UdpSocket)> = Vec::new();
            let mut buf = [0u8; 2048];
            let deadline = Instant::now() + Duration::from_secs(60);
            while !halt.load(Ordering::Relaxed) && Instant::now() < deadline {
                if let Ok((n, client)) = front_sock.recv_from(&mut buf) {
                    if !flows.iter().any(|(c, _)| *c == client) {
                        let up = UdpSocket::bind(SocketAddr::new(ip(BALANCER), 0)).unwrap();
                        up.set_nonblocking(true).unwrap();
                        flows.push((client, up));
                    }
                    let up = &flows.iter().find(|(c, _)| *c == client).unwrap().1;
                    let mut d = v2(1, client, relay, true, 0);
                    d.extend_from_slice(&buf[..n]);
                    let _ = up.send_to(&d, relay);
                }
                for (client, up) in &flows {
                    while let Ok((n, _)) = up.recv_from(&mut buf) {
                        let _ = front_sock.send_to(&buf[..n], client);
                    }
                }
            }
        });
        UdpBalancer { front, stop }
    }
}

impl Drop for UdpBalancer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A Binding's answer to `sock` from `server` within `wait`.
fn binding_answer(sock: &UdpSocket, server: SocketAddr, datagram: &[u8], wait: Duration) -> Option<Vec<u8>> {
    sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 1500];
    sock.send_to(datagram, server).unwrap();
    while Instant::now() < deadline {
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            return Some(buf[..n].to_vec());
        }
    }
    None
}

#[test]
fn udp_datagrams_with_a_v2_header_belong_to_the_real_client() {
    let files = TlsFiles::generate();
    for backend in BACKENDS {
        let config = format!("proxy-protocol-udp = true\nproxy-trusted = [\"{BALANCER}/32\"]\n");
        let u = Uturn::start(backend, &config, &files);
        let balancer = UdpBalancer::start(u.udp);
        // Through the balancer: the real client's address, and an allocation that relays both
        // ways (ChannelData and Send/Data indications), answers going back through the balancer.
        let mut c = Client::new(balancer.front, "demo", "demo", "uturn.local");
        c.sock = UdpSocket::bind(SocketAddr::new(ip(CLIENT), 0)).unwrap();
        c.sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        let me = c.sock.local_addr().unwrap();
        let r = binding_answer(&c.sock, balancer.front, &binding_request(), Duration::from_secs(3))
            .unwrap_or_else(|| panic!("{backend}: no Binding answer through the balancer"));
        assert_eq!(xor_mapped(&r), me, "{backend}: XOR-MAPPED-ADDRESS is the real client");
        c.allocate();
        let peer = peer_socket();
        let peer_addr = peer.local_addr().unwrap();
        assert_eq!(c.channel_bind(0x4000, peer_addr).code(), None, "{backend}");
        c.send_channel_data(0x4000, b"to the peer");
        let mut buf = [0u8; 2048];
        let (n, relayed) = peer.recv_from(&mut buf).expect("the peer hears the client");
        assert_eq!(&buf[..n], b"to the peer", "{backend}");
        peer.send_to(b"to the client", relayed).unwrap();
        let back = c.recv().expect("ChannelData back through the balancer");
        assert_eq!(&back[4..4 + 13], b"to the client", "{backend}");
        assert!(u.log().contains(&format!("client={me}")), "{backend}: the logs name the real client");
        // Straight to the relay: untrusted (with a header), missing and malformed headers.
        let stranger = UdpSocket::bind(SocketAddr::new(ip(STRANGER), 0)).unwrap();
        let mut d = v2(1, me, u.udp, true, 0);
        d.extend_from_slice(&binding_request());
        assert!(binding_answer(&stranger, u.udp, &d, Duration::from_millis(500)).is_none(), "{backend}: untrusted");
        let b = UdpSocket::bind(SocketAddr::new(ip(BALANCER), 0)).unwrap();
        assert!(binding_answer(&b, u.udp, &binding_request(), Duration::from_millis(500)).is_none(), "{backend}");
        let mut bad = d.clone();
        bad[15] = 200; // an address length past the datagram
        assert!(binding_answer(&b, u.udp, &bad, Duration::from_millis(500)).is_none(), "{backend}: malformed");
        // The same header from the balancer's address is answered (to the balancer).
        let r = binding_answer(&b, u.udp, &d, Duration::from_secs(2)).expect("answered");
        assert_eq!(xor_mapped(&r), me, "{backend}");
        for (reason, n) in [("untrusted", 1.0), ("missing", 1.0), ("malformed", 1.0)] {
            let series = format!("uturn_proxy_refused_total{{transport=\"udp\",reason=\"{reason}\"}}");
            assert_eq!(u.wait_metric(&series, n), n, "{backend}: {series}");
        }
        assert!(u.wait_metric("uturn_proxy_headers_total{transport=\"udp\"}", 6.0) >= 6.0, "{backend}");
    }
}

#[test]
fn configurations_the_proxy_protocol_cannot_honour_are_refused() {
    let (code, _, err) = uturn_cli(&["--listen", "tcp://127.0.0.1:0", "--proxy-protocol"]);
    assert_ne!(code, 0);
    assert!(err.contains("proxy-trusted"), "{err}");
    let (code, _, err) = uturn_cli(&[
        "--listen",
        "127.0.0.1:0",
        "--proxy-protocol-udp",
        "--proxy-trusted",
        "127.0.0.4/32",
        "--xdp",
        "generic",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("proxy-protocol-udp cannot run with xdp"), "{err}");
}

/// Answers `sock` receives within `wait`.
fn answers_within(sock: &UdpSocket, wait: Duration) -> usize {
    sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 1500];
    let mut n = 0;
    while Instant::now() < deadline {
        if sock.recv_from(&mut buf).is_ok() {
            n += 1;
        }
    }
    n
}

#[test]
fn budgets_and_caps_count_the_real_client_not_the_balancer() {
    let files = TlsFiles::generate();
    for backend in BACKENDS {
        // Each of the two workers: 10 unverified requests a second per source, burst 10; two
        // connections per source.
        let config = format!(
            "proxy-protocol = true\nproxy-protocol-udp = true\nproxy-trusted = [\"{BALANCER}/32\"]\n\
             unauth-rate = 20\nmax-connections-per-ip = 2\n"
        );
        let u = Uturn::start(backend, &config, &files);
        // One balancer socket (one worker) carries two real clients: A spends its budget, B
        // still has its own.
        let b = UdpSocket::bind(SocketAddr::new(ip(BALANCER), 0)).unwrap();
        let (a_addr, b_addr): (SocketAddr, SocketAddr) =
            ("198.51.100.1:1000".parse().unwrap(), "198.51.100.2:1000".parse().unwrap());
        let with = |client: SocketAddr| {
            let mut d = v2(1, client, u.udp, true, 0);
            d.extend_from_slice(&binding_request());
            d
        };
        for _ in 0..40 {
            b.send_to(&with(a_addr), u.udp).unwrap();
        }
        let a_answers = answers_within(&b, Duration::from_millis(500));
        assert!((5..=15).contains(&a_answers), "{backend}: {a_answers} of 40 answered for A");
        for _ in 0..5 {
            b.send_to(&with(b_addr), u.udp).unwrap();
        }
        assert_eq!(answers_within(&b, Duration::from_millis(500)), 5, "{backend}: B has its own budget");
        // Connections: two per real client, the third of A closed after its header; B's open.
        let conn = |client: SocketAddr| {
            let s = tcp_from(SocketAddr::new(ip(BALANCER), 0), u.tcp).unwrap();
            (&s).write_all(&v1(client, u.tcp)).unwrap();
            s
        };
        let kept: Vec<TcpStream> = (0..2).map(|i| conn(SocketAddr::new(a_addr.ip(), 2000 + i))).collect();
        std::thread::sleep(Duration::from_millis(200));
        let third = conn(SocketAddr::new(a_addr.ip(), 2002));
        assert!(closed_within(&third, Duration::from_secs(2)), "{backend}: A's third connection");
        let other = conn(b_addr);
        let mut c = StreamClient::over(other, u.tcp, false, "demo", "demo", "uturn.local").unwrap();
        assert_eq!(mapped_over(&mut c), b_addr, "{backend}: B connects");
        for s in &kept {
            assert!(!closed_within(s, Duration::from_millis(100)), "{backend}: A's first two stay open");
        }
        assert!(u.wait_metric("uturn_connections_closed_total{reason=\"refused\"}", 1.0) >= 1.0, "{backend}");
    }
}
