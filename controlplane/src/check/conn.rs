//! The client's connection to the server under check: a UDP socket, a TCP stream or TLS over
//! TCP (rustls), carrying STUN messages and ChannelData. On a stream each message is framed by
//! its own length (RFC 8656 §12.5, `uturn_proto::wire::stream`).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme, StreamOwned};
use uturn_proto::wire::stream::{next_frame, Frame, MAX_FRAME};

/// Why a TLS connection could not be made.
#[derive(Debug)]
pub enum ConnectError {
    /// TCP connect failed (refused, timed out, unreachable).
    Tcp(io::Error),
    /// The TLS handshake failed; `name_mismatch` when the certificate is valid but not for the
    /// name (or IP address) connected to.
    Tls {
        /// The certificate does not cover the server name.
        name_mismatch: bool,
        /// rustls' reason.
        reason: String,
    },
}

/// A stream transport: TCP or TLS over TCP.
enum Stream {
    Tcp(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Tcp(s) => s,
            Stream::Tls(s) => &s.sock,
        }
    }
}

/// A connection to the server.
pub struct Conn {
    inner: Inner,
    /// The server's transport address.
    pub server: SocketAddr,
}

enum Inner {
    Udp(UdpSocket),
    Stream { stream: Stream, buf: Vec<u8> },
}

/// The TLS client configuration: the system's roots, plus the PEM certificates of `ca` (a
/// private CA, or a relay's self-signed certificate, which is then trusted as itself: webpki
/// refuses a CA certificate used as an end entity, and `openssl req -x509` makes such ones).
/// The server's name is checked in every case. Errors: `ca` unreadable or holding no
/// certificate.
pub fn tls_config(ca: Option<&Path>) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    // A system without a root store still checks against --ca.
    for c in rustls_native_certs::load_native_certs().unwrap_or_default() {
        let _ = roots.add(c);
    }
    let mut pinned = Vec::new();
    if let Some(path) = ca {
        let pem = std::fs::read(path).map_err(|e| format!("--ca {}: {e}", path.display()))?;
        for c in rustls_pemfile::certs(&mut &pem[..]) {
            let c = c.map_err(|e| format!("--ca {}: {e}", path.display()))?;
            let _ = roots.add(c.clone());
            pinned.push(c);
        }
        if pinned.is_empty() {
            return Err(format!("--ca {}: no PEM certificate in it", path.display()));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let webpki = match roots.is_empty() {
        true => None,
        false => Some(
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| format!("TLS roots: {e}"))?,
        ),
    };
    let verifier = Arc::new(Verifier { webpki, pinned, provider: provider.clone() });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    // RFC 7443: TURN over TLS names itself with ALPN "stun.turn".
    config.alpn_protocols = vec![b"stun.turn".to_vec()];
    Ok(Arc::new(config))
}

/// WebPKI verification against the roots, or a `--ca` certificate presented as it is (still
/// checked for the server's name).
#[derive(Debug)]
struct Verifier {
    webpki: Option<Arc<WebPkiServerVerifier>>,
    pinned: Vec<CertificateDer<'static>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verdict = match &self.webpki {
            Some(w) => w.verify_server_cert(end_entity, intermediates, server_name, ocsp, now),
            None => Err(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)),
        };
        match verdict {
            Err(_) if self.pinned.iter().any(|p| p.as_ref() == end_entity.as_ref()) => {
                let parsed = ParsedCertificate::try_from(end_entity)?;
                rustls::client::verify_server_name(&parsed, server_name)?;
                Ok(ServerCertVerified::assertion())
            }
            v => v,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

impl Conn {
    /// A UDP socket on the wildcard address of `server`'s family.
    pub fn udp(server: SocketAddr) -> io::Result<Conn> {
        let sock = UdpSocket::bind(local_wildcard(server))?;
        Ok(Conn { inner: Inner::Udp(sock), server })
    }

    /// A TCP connection (within `timeout`), then, with `tls`, a TLS handshake for `host` (a DNS
    /// name or an IP literal) verified against `tls`'s roots.
    pub fn stream(
        server: SocketAddr,
        timeout: Duration,
        tls: Option<(&Arc<ClientConfig>, &str)>,
    ) -> Result<(Conn, Option<String>), ConnectError> {
        let tcp = TcpStream::connect_timeout(&server, timeout).map_err(ConnectError::Tcp)?;
        let _ = tcp.set_nodelay(true);
        let Some((config, host)) = tls else {
            return Ok((Conn { inner: Inner::Stream { stream: Stream::Tcp(tcp), buf: Vec::new() }, server }, None));
        };
        let name = ServerName::try_from(host.to_owned()).map_err(|e| ConnectError::Tls {
            name_mismatch: false,
            reason: format!("bad server name {host:?}: {e}"),
        })?;
        let conn = ClientConnection::new(config.clone(), name)
            .map_err(|e| ConnectError::Tls { name_mismatch: false, reason: e.to_string() })?;
        let mut s = StreamOwned::new(conn, tcp);
        let _ = s.sock.set_read_timeout(Some(timeout));
        while s.conn.is_handshaking() {
            if let Err(e) = s.conn.complete_io(&mut s.sock) {
                let name_mismatch = matches!(
                    e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()),
                    Some(rustls::Error::InvalidCertificate(
                        rustls::CertificateError::NotValidForName
                            | rustls::CertificateError::NotValidForNameContext { .. }
                    ))
                );
                return Err(ConnectError::Tls { name_mismatch, reason: e.to_string() });
            }
        }
        let info = format!(
            "{:?}, ALPN {}",
            s.conn.protocol_version().map_or_else(|| "TLS".into(), |v| format!("{v:?}")),
            s.conn.alpn_protocol().map_or_else(|| "none".into(), |a| String::from_utf8_lossy(a).into_owned())
        );
        Ok((Conn { inner: Inner::Stream { stream: Stream::Tls(Box::new(s)), buf: Vec::new() }, server }, Some(info)))
    }

    /// True on UDP (requests are retransmitted; RFC 8489 §6.2.1).
    pub fn is_udp(&self) -> bool {
        matches!(self.inner, Inner::Udp(_))
    }

    /// The local address of the connection.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match &self.inner {
            Inner::Udp(s) => s.local_addr(),
            Inner::Stream { stream, .. } => stream.tcp().local_addr(),
        }
    }

    /// Sends one message (STUN or ChannelData; ChannelData is padded to 4 bytes on a stream,
    /// RFC 8656 §12.5).
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        match &mut self.inner {
            Inner::Udp(s) => s.send_to(bytes, self.server).map(drop),
            Inner::Stream { stream, .. } => {
                let pad = (4 - bytes.len() % 4) % 4;
                let mut v = Vec::with_capacity(bytes.len() + pad);
                v.extend_from_slice(bytes);
                v.resize(bytes.len() + pad, 0);
                match stream {
                    Stream::Tcp(s) => s.write_all(&v),
                    Stream::Tls(s) => s.write_all(&v).and_then(|()| s.flush()),
                }
            }
        }
    }

    /// The next message from the server before `deadline`: Ok(None) when none came in time.
    /// On UDP, datagrams from other addresses are ignored. Errors: the stream closed or lost
    /// its framing, or a socket error.
    pub fn recv(&mut self, deadline: Instant) -> io::Result<Option<Vec<u8>>> {
        let server = self.server;
        match &mut self.inner {
            Inner::Udp(s) => {
                let mut buf = vec![0u8; 65_536];
                loop {
                    let Some(left) = remaining(deadline) else { return Ok(None) };
                    s.set_read_timeout(Some(left))?;
                    match s.recv_from(&mut buf) {
                        Ok((n, from)) if from == server => return Ok(Some(buf[..n].to_vec())),
                        Ok(_) => continue,
                        Err(e) if is_timeout(&e) => return Ok(None),
                        // An ICMP port unreachable from an earlier send: keep listening.
                        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                        Err(e) => return Err(e),
                    }
                }
            }
            Inner::Stream { stream, buf } => loop {
                match next_frame(buf) {
                    Frame::Complete { message, consumed } => {
                        let m = buf[..message].to_vec();
                        buf.drain(..consumed);
                        return Ok(Some(m));
                    }
                    Frame::Invalid => {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, "the stream's framing is lost"))
                    }
                    Frame::Incomplete { .. } if buf.len() > MAX_FRAME => {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, "frame too long"))
                    }
                    Frame::Incomplete { .. } => {}
                }
                let Some(left) = remaining(deadline) else { return Ok(None) };
                stream.tcp().set_read_timeout(Some(left))?;
                let mut chunk = [0u8; 16_384];
                let n = match stream {
                    Stream::Tcp(s) => s.read(&mut chunk),
                    Stream::Tls(s) => s.read(&mut chunk),
                };
                match n {
                    Ok(0) => {
                        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the server closed the connection"))
                    }
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(e) if is_timeout(&e) => return Ok(None),
                    Err(e) => return Err(e),
                }
            },
        }
    }
}

/// The wildcard address of `server`'s family, port 0.
pub fn local_wildcard(server: SocketAddr) -> SocketAddr {
    match server {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

/// Time left until `deadline`, None when it has passed (never a zero timeout, which the
/// socket calls refuse).
pub fn remaining(deadline: Instant) -> Option<Duration> {
    let left = deadline.checked_duration_since(Instant::now())?;
    (left >= Duration::from_millis(1)).then_some(left)
}

/// A read timeout (WouldBlock on Linux, TimedOut elsewhere).
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}
