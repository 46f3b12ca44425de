//! The client side of STUN/TURN transactions for `uturn check`, built on `uturn_proto`'s wire
//! code: requests (retransmitted on UDP, RFC 8489 §6.2.1), the long-term credential dance
//! (401 → REALM and NONCE → signed request; 438 → the fresh nonce, RFC 8489 §9.2), and the
//! indications and ChannelData that arrive meanwhile, kept for the data round trip.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use uturn_proto::wire::{attr, Class, IntegrityKey, Message, MessageWriter, Method, TransactionId, WriteError};

use super::conn::Conn;

/// A response, as owned bytes (only ones that parsed as STUN).
pub struct Reply(Vec<u8>);

impl Reply {
    /// The parsed message (the bytes were parsed once before a `Reply` was made).
    pub fn msg(&self) -> Message<'_> {
        // Only bytes that parsed become a Reply, so this cannot fail; an empty header is the
        // harmless fallback.
        Message::parse(&self.0).unwrap_or_else(|_| unreachable!("a Reply holds a parsed message"))
    }

    /// ERROR-CODE's number (RFC 8489 §14.8), None for a success response.
    pub fn code(&self) -> Option<u16> {
        let m = self.msg();
        if m.class() != Class::Error {
            return None;
        }
        Some(m.get(attr::ERROR_CODE).filter(|v| v.len() >= 4).map_or(0, |v| (v[2] & 7) as u16 * 100 + v[3] as u16))
    }

    /// ERROR-CODE's reason phrase, empty when none.
    pub fn reason(&self) -> String {
        self.msg()
            .get(attr::ERROR_CODE)
            .filter(|v| v.len() > 4)
            .map_or_else(String::new, |v| String::from_utf8_lossy(&v[4..]).trim_end_matches('\0').to_owned())
    }

    /// ALTERNATE-SERVER (RFC 8489 §14.15: MAPPED-ADDRESS form, not XOR'd), when present and
    /// well formed.
    pub fn alternate_server(&self) -> Option<SocketAddr> {
        let v = self.msg().get(attr::ALTERNATE_SERVER)?;
        let port = u16::from_be_bytes([*v.get(2)?, *v.get(3)?]);
        match (v.get(1)?, v.len()) {
            (1, 8) => Some(SocketAddr::from(([v[4], v[5], v[6], v[7]], port))),
            (2, 20) => {
                let mut ip = [0u8; 16];
                ip.copy_from_slice(&v[4..20]);
                Some(SocketAddr::from((ip, port)))
            }
            _ => None,
        }
    }
}

/// Why a transaction failed.
#[derive(Debug)]
pub enum TxError {
    /// No response before the timeout.
    Timeout,
    /// The connection failed (a stream closed, a socket error).
    Io(std::io::Error),
    /// 438 answered to `n` signed requests in a row, each time with a fresh nonce.
    StaleNonceLoop(u32),
    /// A request could not be built (a value too long).
    Build,
}

impl std::fmt::Display for TxError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TxError::Timeout => f.write_str("no response"),
            TxError::Io(e) => write!(f, "{e}"),
            TxError::StaleNonceLoop(n) => write!(f, "438 Stale Nonce {n} times in a row"),
            TxError::Build => f.write_str("request too long"),
        }
    }
}

/// What arrived that was not a response: a Data indication (RFC 8656 §11.4) or ChannelData
/// (§12.4), as (peer or channel, payload).
#[derive(Debug, Clone)]
pub enum Incoming {
    /// A Data indication from XOR-PEER-ADDRESS.
    Data(SocketAddr, Vec<u8>),
    /// ChannelData on a channel number.
    Channel(u16, Vec<u8>),
}

/// A session with one server.
pub struct Session {
    /// The connection.
    pub conn: Conn,
    /// How long a transaction waits for its response.
    pub timeout: Duration,
    username: String,
    password: String,
    /// REALM from the last 401/438.
    pub realm: String,
    /// NONCE from the last 401/438.
    pub nonce: Vec<u8>,
    key: Option<IntegrityKey>,
    /// The REALM signed requests carry (the server's, or the one the credentials are for).
    sign_realm: String,
    /// Indications and ChannelData received while waiting for responses.
    pub incoming: VecDeque<Incoming>,
}

/// Signed requests answered 438 in a row before the check calls it a loop.
pub const STALE_NONCE_LIMIT: u32 = 3;

impl Session {
    /// A session over `conn` with credentials (empty when none were given).
    pub fn new(conn: Conn, timeout: Duration, username: &str, password: &str) -> Session {
        Session {
            conn,
            timeout,
            username: username.into(),
            password: password.into(),
            realm: String::new(),
            nonce: Vec::new(),
            key: None,
            sign_realm: String::new(),
            incoming: VecDeque::new(),
        }
    }

    /// The long-term key of the credentials under the learned realm (RFC 8489 §9.2.2, MD5).
    pub fn key(&self) -> Option<&IntegrityKey> {
        self.key.as_ref()
    }

    /// Adopts REALM and NONCE of a 401 or 438 and derives the key for that realm (`realm`
    /// overrides the server's, to sign for the realm the credentials were made for).
    pub fn learn(&mut self, reply: &Reply, realm: Option<&str>) {
        let m = reply.msg();
        if let Some(r) = m.realm() {
            self.realm = String::from_utf8_lossy(r).into_owned();
        }
        if let Some(n) = m.nonce() {
            self.nonce = n.to_vec();
        }
        let realm = realm.unwrap_or(&self.realm);
        self.key = Some(IntegrityKey::long_term(&self.username, realm, &self.password));
        self.sign_realm = realm.to_owned();
    }

    /// One request and its response; `attrs` writes the attributes; with `signed`, USERNAME,
    /// REALM, NONCE and MESSAGE-INTEGRITY are added; FINGERPRINT always. On UDP the request is
    /// retransmitted after 250 ms, then 500 ms, doubling, until the timeout.
    pub fn request(
        &mut self,
        method: Method,
        signed: bool,
        attrs: &dyn Fn(&mut MessageWriter<'_>) -> Result<(), WriteError>,
    ) -> Result<Reply, TxError> {
        let tid = TransactionId(rand::random());
        let mut buf = vec![0u8; 2048];
        let len = {
            let mut w = MessageWriter::new(&mut buf, method, Class::Request, tid).map_err(|_| TxError::Build)?;
            attrs(&mut w).map_err(|_| TxError::Build)?;
            if let (true, Some(key)) = (signed, &self.key) {
                w.bytes(attr::USERNAME, self.username.as_bytes()).map_err(|_| TxError::Build)?;
                w.bytes(attr::REALM, self.sign_realm.as_bytes()).map_err(|_| TxError::Build)?;
                w.bytes(attr::NONCE, &self.nonce).map_err(|_| TxError::Build)?;
                w.sign(key).map_err(|_| TxError::Build)?;
            }
            w.fingerprint().map_err(|_| TxError::Build)?;
            w.finish()
        };
        let req = &buf[..len];
        let start = Instant::now();
        let end = start + self.timeout;
        let mut rto = Duration::from_millis(250);
        let mut next_send = start;
        loop {
            let now = Instant::now();
            if now >= end {
                return Err(TxError::Timeout);
            }
            if now >= next_send {
                self.conn.send(req).map_err(TxError::Io)?;
                next_send = if self.conn.is_udp() { now + rto } else { end };
                rto *= 2;
            }
            let Some(bytes) = self.conn.recv(next_send.min(end)).map_err(TxError::Io)? else { continue };
            match Message::parse(&bytes) {
                Ok(m) if m.transaction_id() == tid && m.method() == method => {
                    if matches!(m.class(), Class::Success | Class::Error) {
                        return Ok(Reply(bytes));
                    }
                }
                Ok(m) => self.keep(&m),
                Err(_) => self.keep_channel_data(&bytes),
            }
        }
    }

    /// A signed request: 438 makes it adopt the fresh nonce and send again, up to
    /// [`STALE_NONCE_LIMIT`] times in a row (then [`TxError::StaleNonceLoop`]).
    pub fn signed(
        &mut self,
        method: Method,
        attrs: &dyn Fn(&mut MessageWriter<'_>) -> Result<(), WriteError>,
    ) -> Result<Reply, TxError> {
        let mut stale = 0;
        loop {
            let r = self.request(method, true, attrs)?;
            if r.code() != Some(438) {
                return Ok(r);
            }
            stale += 1;
            if stale >= STALE_NONCE_LIMIT {
                return Err(TxError::StaleNonceLoop(stale));
            }
            let realm = self.sign_realm.clone();
            self.learn(&r, Some(&realm));
        }
    }

    /// Waits (until `deadline`) for data from the relay: a Data indication or ChannelData
    /// (kept ones first).
    pub fn next_data(&mut self, deadline: Instant) -> std::io::Result<Option<Incoming>> {
        if let Some(i) = self.incoming.pop_front() {
            return Ok(Some(i));
        }
        while let Some(bytes) = self.conn.recv(deadline)? {
            match Message::parse(&bytes) {
                Ok(m) => self.keep(&m),
                Err(_) => self.keep_channel_data(&bytes),
            }
            if let Some(i) = self.incoming.pop_front() {
                return Ok(Some(i));
            }
        }
        Ok(None)
    }

    fn keep(&mut self, m: &Message<'_>) {
        if m.method() == Method::DATA && m.class() == Class::Indication {
            if let (Some(Ok(peer)), Some(data)) = (m.xor_address(attr::XOR_PEER_ADDRESS), m.get(attr::DATA)) {
                self.incoming.push_back(Incoming::Data(peer, data.to_vec()));
            }
        }
    }

    fn keep_channel_data(&mut self, bytes: &[u8]) {
        if let Ok(cd) = uturn_proto::wire::ChannelData::parse(bytes) {
            self.incoming.push_back(Incoming::Channel(cd.channel().get(), cd.payload().to_vec()));
        }
    }
}
