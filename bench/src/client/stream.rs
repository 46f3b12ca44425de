//! A raw TURN client over TCP or TLS (RFC 8656 §3.1): messages framed on the stream, ChannelData
//! padded to 4 bytes (§12.5). It signs requests with a [`Client`]'s credentials and sends them on
//! its own connection; the TLS side (rustls, ALPN `stun.turn`) accepts any server certificate
//! and records it, since tests and benchmarks use self-signed ones.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme, StreamOwned};
use uturn_proto::wire::stream::{next_frame, Frame};
use uturn_proto::wire::{attr, Class, Message, Method, TransactionId};

use super::{build, error_code, Client, Response};

/// The connection: plain TCP or TLS over it.
enum Conn {
    Tcp(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Conn {
    fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Tcp(s) => s,
            Conn::Tls(s) => s.get_ref(),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(b),
            Conn::Tls(s) => s.read(b),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(b),
            Conn::Tls(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

/// Accepts any certificate and keeps the last one seen.
#[derive(Debug, Default)]
struct AcceptAny(Mutex<Option<Vec<u8>>>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.0.lock().unwrap() = Some(end_entity.to_vec());
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider().signature_verification_algorithms.supported_schemes()
    }
}

/// A TCP connection to `server` from local address `from` (bound before it connects), within 5 s.
pub fn tcp_from(from: SocketAddr, server: SocketAddr) -> io::Result<TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::for_address(server), socket2::Type::STREAM, None)?;
    s.bind(&from.into())?;
    s.connect_timeout(&server.into(), Duration::from_secs(5))?;
    Ok(s.into())
}

/// A TURN client on one TCP or TLS connection.
pub struct StreamClient {
    conn: Conn,
    /// Credentials and request signing (its UDP socket is not used).
    pub creds: Client,
    inbuf: Vec<u8>,
    /// The DER certificate the TLS server presented (`None` over TCP).
    pub server_cert: Option<Vec<u8>>,
}

impl StreamClient {
    /// Connects to `server` over TCP, or over TLS with ALPN `stun.turn` when `tls`, within 5 s.
    pub fn connect(server: SocketAddr, tls: bool, user: &str, password: &str, realm: &str) -> io::Result<Self> {
        let tcp = TcpStream::connect_timeout(&server, Duration::from_secs(5))?;
        Self::over(tcp, server, tls, user, password, realm)
    }

    /// [`connect`](Self::connect) from local address `from` (port 0: any), e.g. another
    /// 127.0.0.0/8 address to stand for another host.
    pub fn connect_from(
        from: SocketAddr,
        server: SocketAddr,
        tls: bool,
        user: &str,
        password: &str,
        realm: &str,
    ) -> io::Result<Self> {
        let tcp = tcp_from(from, server)?;
        Self::over(tcp, server, tls, user, password, realm)
    }

    /// A client on `tcp`, a connection to `server` already open (on which the caller may have
    /// written bytes of its own first, e.g. a PROXY protocol header), over TLS when `tls`.
    pub fn over(
        tcp: TcpStream,
        server: SocketAddr,
        tls: bool,
        user: &str,
        password: &str,
        realm: &str,
    ) -> io::Result<Self> {
        tcp.set_nodelay(true)?;
        tcp.set_read_timeout(Some(Duration::from_millis(500)))?;
        let creds = Client::new(server, user, password, realm);
        let (conn, server_cert) = if tls {
            let verifier = Arc::new(AcceptAny::default());
            let mut cfg = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(io::Error::other)?
                .dangerous()
                .with_custom_certificate_verifier(verifier.clone())
                .with_no_client_auth();
            cfg.alpn_protocols = vec![b"stun.turn".to_vec()];
            let name = ServerName::try_from("localhost").expect("a valid name");
            let c = ClientConnection::new(Arc::new(cfg), name).map_err(io::Error::other)?;
            let mut s = StreamOwned::new(c, tcp);
            let deadline = Instant::now() + Duration::from_secs(5);
            while s.conn.is_handshaking() {
                if Instant::now() > deadline {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "TLS handshake"));
                }
                s.conn.complete_io(&mut s.sock)?;
            }
            let cert = verifier.0.lock().unwrap().clone();
            (Conn::Tls(Box::new(s)), cert)
        } else {
            (Conn::Tcp(tcp), None)
        };
        Ok(StreamClient { conn, creds, inbuf: Vec::new(), server_cert })
    }

    /// The local address of the connection (the client half of the 5-tuple).
    pub fn local_addr(&self) -> SocketAddr {
        self.conn.tcp().local_addr().expect("connected")
    }

    /// Sets the socket's receive buffer (bytes), to make a slow reader.
    pub fn set_recv_buffer(&self, bytes: usize) {
        let s = socket2::SockRef::from(self.conn.tcp());
        let _ = s.set_recv_buffer_size(bytes);
    }

    /// Writes `bytes` as they are.
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.conn.write_all(bytes)?;
        self.conn.flush()
    }

    /// The next message from the server (padding dropped), waiting at most `limit`. `Ok(None)`
    /// on timeout; an error once the server has closed the connection.
    pub fn recv(&mut self, limit: Duration) -> io::Result<Option<Vec<u8>>> {
        let deadline = Instant::now() + limit;
        loop {
            match next_frame(&self.inbuf) {
                Frame::Complete { message, consumed } => {
                    let m = self.inbuf[..message].to_vec();
                    self.inbuf.drain(..consumed);
                    return Ok(Some(m));
                }
                Frame::Invalid => return Err(io::Error::new(io::ErrorKind::InvalidData, "bad framing from server")),
                Frame::Incomplete { .. } => {}
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            let mut buf = [0u8; 16384];
            match self.conn.read(&mut buf) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed by the server")),
                Ok(n) => self.inbuf.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends `req` and waits (at most 3 s) for the response with its transaction ID, skipping
    /// other messages (no retransmission: the stream is reliable).
    pub fn transact(&mut self, req: &[u8]) -> Result<Response, String> {
        let tid = Message::parse(req).map_err(|e| format!("{e:?}"))?.transaction_id();
        self.send_raw(req).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            let Some(m) = self.recv(Duration::from_millis(200)).map_err(|e| e.to_string())? else { continue };
            if Message::parse(&m).is_ok_and(|p| p.transaction_id() == tid && p.class() != Class::Indication) {
                return Ok(Response(m));
            }
        }
        Err("no response".into())
    }

    /// A signed request built from `f`, retried once after a 438.
    pub fn transact_authenticated(
        &mut self,
        method: Method,
        f: impl Fn(&mut uturn_proto::wire::MessageWriter<'_>) -> Result<(), uturn_proto::wire::WriteError>,
    ) -> Result<Response, String> {
        let req = self.creds.signed_request(method, TransactionId(rand::random()), &f);
        let r = self.transact(&req)?;
        if r.code() != Some(438) {
            return Ok(r);
        }
        self.creds.learn_challenge(&r.msg())?;
        let req = self.creds.signed_request(method, TransactionId(rand::random()), &f);
        self.transact(&req)
    }

    /// Allocate (401 round, then authenticated) with REQUESTED-TRANSPORT UDP and the extra
    /// attributes `f` adds; returns the whole success response.
    pub fn allocate_with(
        &mut self,
        f: impl Fn(&mut uturn_proto::wire::MessageWriter<'_>) -> Result<(), uturn_proto::wire::WriteError>,
    ) -> Result<Response, String> {
        self.allocate_transport(17, f)
    }

    /// [`allocate_with`](Self::allocate_with) with REQUESTED-TRANSPORT `protocol` (17 UDP, 6
    /// TCP: an RFC 6062 TCP allocation).
    pub fn allocate_transport(
        &mut self,
        protocol: u8,
        f: impl Fn(&mut uturn_proto::wire::MessageWriter<'_>) -> Result<(), uturn_proto::wire::WriteError>,
    ) -> Result<Response, String> {
        let transport = (protocol as u32) << 24;
        let req = build(Method::ALLOCATE, Class::Request, TransactionId(rand::random()), None, |w| {
            w.u32(attr::REQUESTED_TRANSPORT, transport).map(drop)
        });
        let r = self.transact(&req)?;
        if r.code() != Some(401) {
            return Err(format!("expected 401, got {:?}", r.code()));
        }
        self.creds.learn_challenge(&r.msg())?;
        let r = self.transact_authenticated(Method::ALLOCATE, |w| {
            w.u32(attr::REQUESTED_TRANSPORT, transport)?;
            f(w)
        })?;
        match error_code(&r.msg()) {
            None => Ok(r),
            Some(c) => Err(format!("Allocate failed with {c}")),
        }
    }

    /// Allocate; returns the relayed transport address.
    pub fn allocate(&mut self) -> Result<SocketAddr, String> {
        let r = self.allocate_with(|_| Ok(()))?;
        match r.msg().xor_address(attr::XOR_RELAYED_ADDRESS) {
            Some(Ok(a)) => Ok(a),
            _ => Err("no XOR-RELAYED-ADDRESS".into()),
        }
    }

    /// CreatePermission for `peer` and ChannelBind `channel` to it.
    pub fn bind_channel(&mut self, channel: u16, peer: SocketAddr) -> Result<(), String> {
        let r = self.transact_authenticated(Method::CHANNEL_BIND, |w| {
            w.u32(attr::CHANNEL_NUMBER, (channel as u32) << 16)?;
            w.xor_address(attr::XOR_PEER_ADDRESS, &peer).map(drop)
        })?;
        match r.code() {
            None => Ok(()),
            Some(c) => Err(format!("ChannelBind failed with {c}")),
        }
    }

    /// Sends ChannelData on `channel`, padded to 4 bytes (RFC 8656 §12.5).
    pub fn send_channel_data(&mut self, channel: u16, payload: &[u8]) -> io::Result<()> {
        let mut d = Vec::with_capacity(8 + payload.len());
        d.extend_from_slice(&channel.to_be_bytes());
        d.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        d.extend_from_slice(payload);
        d.resize((d.len() + 3) & !3, 0);
        self.send_raw(&d)
    }

    /// Takes the realm, key and nonce `other` learned (an RFC 6062 data connection signs its
    /// ConnectionBind with the control connection's credentials).
    pub fn adopt_credentials(&mut self, other: &StreamClient) {
        self.creds.realm = other.creds.realm.clone();
        self.creds.key = other.creds.key;
        self.creds.nonce = other.creds.nonce.clone();
    }

    /// Bytes as they arrive, unframed (an RFC 6062 data connection): what is buffered, else
    /// what arrives within `limit` (empty on timeout). An error once the server has closed.
    pub fn recv_raw(&mut self, limit: Duration) -> io::Result<Vec<u8>> {
        if !self.inbuf.is_empty() {
            return Ok(std::mem::take(&mut self.inbuf));
        }
        let deadline = Instant::now() + limit;
        let mut buf = [0u8; 16384];
        while Instant::now() < deadline {
            match self.conn.read(&mut buf) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed by the server")),
                Ok(n) => return Ok(buf[..n].to_vec()),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Vec::new())
    }

    /// True once the server has closed the connection (waits at most `limit`, discarding what
    /// arrives).
    pub fn closed_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.recv(Duration::from_millis(100)).is_err() {
                return true;
            }
        }
        false
    }
}
