//! A small blocking TURN client (RFC 8656 over UDP) on one socket: long-term credentials,
//! Allocate, CreatePermission, ChannelBind, Refresh, ChannelData and Send indications. Used by
//! `uturn-load` for session setup and by the end-to-end tests.
//!
//! The long-term key is derived from the REALM the server names in its 401 (RFC 8489 §9.2.3),
//! never from a locally configured realm; a 438 Stale Nonce teaches a fresh nonce and the
//! request is retried once ([`Client::transact_authenticated`]). [`refresh`] keeps
//! allocations, permissions and channel bindings alive without blocking a traffic loop.

pub mod refresh;
pub mod stream;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use uturn_proto::wire::{attr, Class, IntegrityKey, Message, MessageWriter, Method, TransactionId};

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
    /// Long-term key, MD5(username:realm:password), re-derived whenever a 401 or 438 names a
    /// realm.
    pub key: IntegrityKey,
    /// Realm learned from the server's 401 (before that, the one given to [`Client::new`]).
    pub realm: String,
    /// Nonce learned from the server's 401/438.
    pub nonce: Vec<u8>,
    /// The LIFETIME (seconds) the server granted in the last Allocate or Refresh success
    /// answered to [`try_allocate`](Self::try_allocate) or [`try_refresh`](Self::try_refresh).
    pub lifetime: Option<u32>,
    password: String,
    expected_realm: Option<String>,
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
    /// A client of `server` with credentials `user`/`password`. `realm` is only the initial
    /// guess (used for requests signed before any 401): the first 401 or 438 replaces it with
    /// the server's realm and re-derives the key. Binds 127.0.0.1:0 for a loopback server, the
    /// wildcard address otherwise (panics if it cannot).
    pub fn new(server: SocketAddr, user: &str, password: &str, realm: &str) -> Client {
        let local = match (server.is_ipv6(), server.ip().is_loopback()) {
            (false, true) => "127.0.0.1:0",
            (false, false) => "0.0.0.0:0",
            (true, true) => "[::1]:0",
            (true, false) => "[::]:0",
        };
        let sock = UdpSocket::bind(local).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        Client {
            sock,
            server,
            user: user.into(),
            key: IntegrityKey::long_term(user, realm, password),
            realm: realm.into(),
            nonce: Vec::new(),
            lifetime: None,
            password: password.into(),
            expected_realm: None,
        }
    }

    /// With `Some(realm)`, a 401 or 438 naming another realm is an error (see
    /// [`learn_challenge`](Self::learn_challenge)) instead of being adopted.
    pub fn with_expected_realm(mut self, realm: Option<&str>) -> Client {
        self.expected_realm = realm.map(str::to_owned);
        self
    }

    /// The relay this client talks to.
    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// Learns REALM and NONCE from a 401 or 438 challenge and re-derives the long-term key
    /// from the server's realm. Errors: the challenge lacks REALM or NONCE, or names a realm
    /// other than the one set with [`with_expected_realm`](Self::with_expected_realm) (the
    /// message names both).
    pub fn learn_challenge(&mut self, m: &Message<'_>) -> Result<(), String> {
        let realm = m.realm().ok_or("challenge without REALM")?;
        let nonce = m.nonce().ok_or("challenge without NONCE")?;
        let realm = String::from_utf8_lossy(realm).into_owned();
        if let Some(want) = &self.expected_realm {
            if *want != realm {
                return Err(format!("realm mismatch: the server's realm is {realm:?}, but {want:?} was expected"));
            }
        }
        if realm != self.realm {
            self.key = IntegrityKey::long_term(&self.user, &realm, &self.password);
            self.realm = realm;
        }
        self.nonce = nonce.to_vec();
        Ok(())
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
        build(method, Class::Request, tid, Some(key.as_bytes()), |w| {
            f(w)?;
            w.bytes(attr::USERNAME, user.as_bytes())?;
            w.bytes(attr::REALM, realm.as_bytes())?;
            w.bytes(attr::NONCE, &nonce)?;
            Ok(())
        })
    }

    /// Learns REALM and NONCE from a 401 to an unauthenticated Allocate.
    pub fn try_learn_nonce(&mut self) -> Result<(), String> {
        let req = build(Method::ALLOCATE, Class::Request, TransactionId(rand::random()), None, |w| {
            w.u32(attr::REQUESTED_TRANSPORT, 17 << 24).map(drop)
        });
        let r = self.transact(&req).ok_or("no answer to Allocate")?;
        if r.code() == Some(437) {
            return Err("437: this 5-tuple already has an allocation".into());
        }
        if r.code() != Some(401) {
            return Err(format!("expected 401, got {:?}", r.code()));
        }
        let m = Message::parse(&r.0).map_err(|e| format!("unparseable 401: {e:?}"))?;
        self.learn_challenge(&m)
    }

    /// Sends a signed request (attributes added by `f`, then USERNAME, REALM, NONCE,
    /// MESSAGE-INTEGRITY) and waits for its response; on 438 Stale Nonce learns the fresh
    /// nonce and retries once with a new transaction. Returns the last response, which may be
    /// an error response. Errors: no answer (after retransmissions), or a 438 that cannot be
    /// learned from.
    pub fn transact_authenticated(
        &mut self,
        method: Method,
        f: impl Fn(&mut MessageWriter<'_>) -> Result<(), uturn_proto::wire::WriteError>,
    ) -> Result<Response, String> {
        let req = self.signed_request(method, TransactionId(rand::random()), &f);
        let r = self.transact(&req).ok_or_else(|| format!("no answer to {}", method.name()))?;
        if r.code() != Some(438) {
            return Ok(r);
        }
        let m = Message::parse(&r.0).map_err(|e| format!("unparseable 438: {e:?}"))?;
        self.learn_challenge(&m)?;
        let req = self.signed_request(method, TransactionId(rand::random()), &f);
        self.transact(&req).ok_or_else(|| format!("no answer to {} after 438", method.name()))
    }

    /// Refresh asking for `lifetime` seconds (0 deletes the allocation), retrying once on 438.
    /// Returns the LIFETIME granted (also kept in [`lifetime`](Self::lifetime)). Errors: no
    /// answer, or an error response (its code in the message).
    pub fn try_refresh(&mut self, lifetime: u32) -> Result<u32, String> {
        let r = self.transact_authenticated(Method::REFRESH, |w| w.u32(attr::LIFETIME, lifetime).map(drop))?;
        if let Some(code) = r.code() {
            return Err(format!("Refresh failed with {code}"));
        }
        let granted = r.msg().u32_attr(attr::LIFETIME).and_then(Result::ok).unwrap_or(lifetime);
        self.lifetime = Some(granted);
        Ok(granted)
    }

    /// CreatePermission for `peers`, retrying once on 438. Errors: no answer or an error
    /// response.
    pub fn try_create_permission(&mut self, peers: &[SocketAddr]) -> Result<(), String> {
        let r = self.transact_authenticated(Method::CREATE_PERMISSION, |w| {
            for p in peers {
                w.xor_address(attr::XOR_PEER_ADDRESS, p)?;
            }
            Ok(())
        })?;
        match r.code() {
            None => Ok(()),
            Some(code) => Err(format!("CreatePermission failed with {code}")),
        }
    }

    /// ChannelBind `channel` to `peer`, retrying once on 438. Errors: no answer or an error
    /// response.
    pub fn try_channel_bind(&mut self, channel: u16, peer: SocketAddr) -> Result<(), String> {
        let r = self.transact_authenticated(Method::CHANNEL_BIND, |w| {
            w.u32(attr::CHANNEL_NUMBER, (channel as u32) << 16)?;
            w.xor_address(attr::XOR_PEER_ADDRESS, &peer).map(drop)
        })?;
        match r.code() {
            None => Ok(()),
            Some(code) => Err(format!("ChannelBind failed with {code}")),
        }
    }

    /// [`try_learn_nonce`](Self::try_learn_nonce), panicking on failure (tests).
    pub fn learn_nonce(&mut self) {
        self.try_learn_nonce().unwrap();
    }

    /// Full Allocate (401 round, then authenticated, retried once on 438); returns the relayed
    /// transport address and keeps the granted LIFETIME in [`lifetime`](Self::lifetime).
    /// Errors: no answer, an error response, a response whose MESSAGE-INTEGRITY does not
    /// verify, or a realm mismatch (see [`learn_challenge`](Self::learn_challenge)).
    pub fn try_allocate(&mut self) -> Result<SocketAddr, String> {
        self.try_learn_nonce()?;
        let r = self
            .transact_authenticated(Method::ALLOCATE, |w| w.u32(attr::REQUESTED_TRANSPORT, 17 << 24).map(drop))
            .map_err(|e| format!("authenticated Allocate: {e}"))?;
        if let Some(code) = r.code() {
            return Err(format!("Allocate failed with {code}"));
        }
        let m = r.msg();
        if !m.integrity_parts().is_some_and(|p| uturn_proto::wire::integrity::verify(self.key.as_bytes(), &p)) {
            return Err("Allocate response MESSAGE-INTEGRITY does not verify".into());
        }
        self.lifetime = m.u32_attr(attr::LIFETIME).and_then(Result::ok);
        match m.xor_address(attr::XOR_RELAYED_ADDRESS) {
            Some(Ok(a)) => Ok(a),
            _ => Err("no XOR-RELAYED-ADDRESS".into()),
        }
    }

    /// [`try_allocate`](Self::try_allocate), panicking on failure (tests).
    pub fn allocate(&mut self) -> SocketAddr {
        self.try_allocate().unwrap()
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
