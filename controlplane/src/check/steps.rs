//! The steps `uturn check` runs against one server, in order, each with a verdict, its timing
//! and the decoded values: resolve, connect (TCP/TLS), reach (Binding), challenge (the 401),
//! authenticate and Allocate, CreatePermission, the Send-indication round trip, ChannelBind,
//! the ChannelData round trip, Refresh 0. The first failure stops the server's steps with a
//! [`Diagnosis`]; an ALTERNATE-SERVER is followed once.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};
use uturn_proto::wire::{attr, Class as MsgClass, Message, MessageWriter, Method, TransactionId};

use super::conn::{Conn, ConnectError};
use super::data::{self, Mode, Peer};
use super::diagnosis::{meaning, Class, Diagnosis};
use super::session::{Reply, Session, TxError};
use super::uri::{ServerUri, Transport};
use super::Options;

/// One step's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// Its name: resolve, connect, reach, challenge, authenticate, allocate, (alternate,)
    /// permission, send-roundtrip, channel-bind, channel-roundtrip, refresh.
    pub step: &'static str,
    /// Passed.
    pub ok: bool,
    /// Time it took, milliseconds.
    pub ms: f64,
    /// The verdict's reason, or what was decoded, in words.
    pub detail: String,
    /// Decoded values (addresses, lifetime, counts) for `--json`.
    #[serde(skip_serializing_if = "Value::is_null")]
    pub data: Value,
}

/// Credentials for one server.
#[derive(Debug, Clone, Default)]
pub struct Creds {
    /// USERNAME.
    pub username: String,
    /// The password.
    pub password: String,
}

/// What the steps stopped on.
enum Stop {
    Fail(Diagnosis),
    Redirect(SocketAddr),
}

impl From<Diagnosis> for Stop {
    fn from(d: Diagnosis) -> Self {
        Stop::Fail(d)
    }
}

/// Runs the steps, reporting each one to `sink` as it completes.
pub(super) struct Runner<'a> {
    pub(super) steps: Vec<Step>,
    sink: &'a mut dyn FnMut(&Step),
    opts: &'a Options,
    /// The alternate server followed, if any.
    pub(super) redirected_to: Option<SocketAddr>,
}

type Result<T> = std::result::Result<T, Stop>;

fn ms(t0: Instant) -> f64 {
    (t0.elapsed().as_secs_f64() * 1000.0 * 100.0).round() / 100.0
}

impl<'a> Runner<'a> {
    pub(super) fn new(opts: &'a Options, sink: &'a mut dyn FnMut(&Step)) -> Self {
        Runner { steps: Vec::new(), sink, opts, redirected_to: None }
    }

    fn record(&mut self, step: &'static str, ok: bool, t0: Instant, detail: String, data: Value) {
        let s = Step { step, ok, ms: ms(t0), detail, data };
        (self.sink)(&s);
        self.steps.push(s);
    }

    fn pass(&mut self, step: &'static str, t0: Instant, detail: String, data: Value) {
        self.record(step, true, t0, detail, data);
    }

    fn fail(&mut self, step: &'static str, t0: Instant, d: Diagnosis) -> Stop {
        self.record(step, false, t0, d.message.clone(), json!({ "class": d.class }));
        Stop::Fail(d)
    }

    /// Checks `uri` with `creds`; None when every step passed.
    pub(super) fn check(&mut self, uri: &ServerUri, creds: Option<&Creds>) -> Option<Diagnosis> {
        let t0 = Instant::now();
        let resolved = (uri.host.as_str(), uri.port)
            .to_socket_addrs()
            .map_err(|e| e.to_string())
            .and_then(|mut a| a.next().ok_or_else(|| "no address".to_owned()));
        let addr = match resolved {
            Ok(a) => a,
            Err(e) => {
                let d = Diagnosis::new(Class::Resolve, format!("{} does not resolve: {e}", uri.host));
                let stop = self.fail("resolve", t0, d);
                return self.stop(stop);
            }
        };
        self.pass("resolve", t0, format!("{} → {addr}", uri.host), json!({ "address": addr.to_string() }));
        match self.probe(uri, addr, creds) {
            Ok(()) => None,
            Err(Stop::Redirect(alt)) => {
                self.redirected_to = Some(alt);
                match self.probe(uri, alt, creds) {
                    Ok(()) => Some(Diagnosis::new(
                        Class::Redirected,
                        format!(
                            "{addr} redirected to ALTERNATE-SERVER {alt} (300 Try Alternate: it drains or sheds load); \
                             the alternate passed every step"
                        ),
                    )),
                    Err(Stop::Redirect(again)) => Some(Diagnosis::new(
                        Class::Redirected,
                        format!("{alt} redirected again, to {again}: followed once only"),
                    )),
                    Err(Stop::Fail(d)) => Some(d),
                }
            }
            Err(Stop::Fail(d)) => Some(d),
        }
    }

    fn stop(&mut self, s: Stop) -> Option<Diagnosis> {
        match s {
            Stop::Fail(d) => Some(d),
            Stop::Redirect(_) => None,
        }
    }

    /// Every step after resolving, against `addr`.
    fn probe(&mut self, uri: &ServerUri, addr: SocketAddr, creds: Option<&Creds>) -> Result<()> {
        let timeout = self.opts.timeout;
        let conn = self.connect(uri, addr)?;
        let (user, pass) = creds.map_or(("", ""), |c| (c.username.as_str(), c.password.as_str()));
        let mut s = Session::new(conn, timeout, user, pass);

        // reach: a Binding request (RFC 8489 §3), the reflexive address decoded.
        let t0 = Instant::now();
        let spinner = self.spinner(format!("reach: waiting up to {timeout:?} for {addr} to answer a Binding"));
        let binding = s.request(Method::BINDING, false, &|_| Ok(()));
        if let Some(sp) = &spinner {
            sp.set_message(format!("reach: no answer over UDP yet, trying TCP {addr}"));
        }
        let tcp_fallback = matches!(binding, Err(TxError::Timeout)) && uri.transport == Transport::Udp;
        let tcp_ok = tcp_fallback && tcp_answers(addr, timeout);
        if let Some(sp) = spinner {
            sp.finish_and_clear();
        }
        let r = match binding {
            Ok(r) => r,
            Err(TxError::Timeout) if tcp_fallback => {
                let d = match tcp_ok {
                    true => Diagnosis::new(
                        Class::UdpBlocked,
                        format!(
                            "no answer over UDP in {timeout:?}, but TCP {addr} answers a Binding: a firewall drops UDP \
                             to the server (open UDP port {})",
                            addr.port()
                        ),
                    ),
                    false => Diagnosis::new(
                        Class::Unreachable,
                        format!(
                            "no answer from {addr} over UDP in {timeout:?} (nor over TCP): server down or filtered"
                        ),
                    ),
                };
                return Err(self.fail("reach", t0, d));
            }
            Err(e) => return Err(self.fail("reach", t0, tx_diagnosis(&e, addr))),
        };
        let m = r.msg();
        let mapped = match m.xor_address(attr::XOR_MAPPED_ADDRESS) {
            Some(Ok(a)) if r.code().is_none() => a,
            _ => {
                let d = Diagnosis::new(
                    Class::Other,
                    format!("the Binding response has no XOR-MAPPED-ADDRESS ({:?})", r.code()),
                );
                return Err(self.fail("reach", t0, d));
            }
        };
        let software = m.get(attr::SOFTWARE).map(|v| String::from_utf8_lossy(v).into_owned());
        let local = s.conn.local_addr().ok();
        self.pass(
            "reach",
            t0,
            format!(
                "Binding: reflexive address {mapped}{}",
                software.as_ref().map_or(String::new(), |sw| format!(", server {sw:?}"))
            ),
            json!({ "reflexive": mapped.to_string(), "local": local.map(|a| a.to_string()), "software": software }),
        );
        if !uri.scheme.is_turn() {
            return Ok(());
        }

        // challenge: an unsigned Allocate, answered 401 with REALM and NONCE (RFC 8656 §7.2).
        let requested = |w: &mut MessageWriter<'_>| {
            w.u32(attr::REQUESTED_TRANSPORT, u32::from(attr::TRANSPORT_UDP) << 24).map(drop)
        };
        let t0 = Instant::now();
        let r = s
            .request(Method::ALLOCATE, false, &requested)
            .map_err(|e| self.fail("challenge", t0, tx_diagnosis(&e, addr)))?;
        match r.code() {
            Some(401) => {}
            Some(300) => return Err(self.redirect("challenge", t0, &r)),
            Some(c) => {
                let d = Diagnosis::new(
                    Class::TurnError,
                    format!("unsigned Allocate answered {c} {} ({})", r.reason(), meaning(c)),
                );
                return Err(self.fail("challenge", t0, d));
            }
            None => {
                let d = Diagnosis::new(Class::TurnError, "the server allocated without authentication (open relay)");
                return Err(self.fail("challenge", t0, d));
            }
        }
        let (realm, nonce) = (r.msg().realm().map(<[u8]>::to_vec), r.msg().nonce().map(<[u8]>::len));
        let (Some(realm), Some(nonce_len)) = (realm, nonce) else {
            return Err(self.fail("challenge", t0, Diagnosis::new(Class::TurnError, "401 without REALM or NONCE")));
        };
        let realm = String::from_utf8_lossy(&realm).into_owned();
        s.learn(&r, self.opts.realm.as_deref());
        if let Some(want) = self.opts.realm.as_deref().filter(|w| *w != realm) {
            let d = Diagnosis::new(
                Class::RealmMismatch,
                format!(
                    "realm mismatch: the server's REALM is {realm:?}, the credentials are for {want:?} \
                     (the key is MD5(user:realm:password), so they cannot verify)"
                ),
            );
            return Err(self.fail("challenge", t0, d));
        }
        self.pass(
            "challenge",
            t0,
            format!("401 with realm {realm:?} and a {nonce_len}-byte nonce"),
            json!({ "realm": realm, "nonce_bytes": nonce_len }),
        );
        let Some(creds) = creds else {
            let d = Diagnosis::new(Class::Usage, "no credentials: give --user and --password, or --secret");
            return Err(self.fail("authenticate", Instant::now(), d));
        };

        // authenticate + allocate: the signed Allocate.
        let t0 = Instant::now();
        let r = match s.signed(Method::ALLOCATE, &requested) {
            Ok(r) => r,
            Err(TxError::StaleNonceLoop(n)) => {
                let d = Diagnosis::new(
                    Class::StaleNonceLoop,
                    format!(
                        "stale-nonce loop: {n} signed Allocates in a row answered 438 Stale Nonce, each carrying the \
                         nonce just handed out; nodes behind one address that do not share the nonce secret \
                         (uturn: fleet-redis), or a clock that jumps"
                    ),
                );
                return Err(self.fail("authenticate", t0, d));
            }
            Err(e) => return Err(self.fail("authenticate", t0, tx_diagnosis(&e, addr))),
        };
        match r.code() {
            Some(401) => return Err(self.fail("authenticate", t0, self.rejected(creds, &realm))),
            Some(300) => {
                self.pass("authenticate", t0, "signed Allocate accepted".into(), Value::Null);
                return Err(self.redirect("allocate", t0, &r));
            }
            _ => self.pass(
                "authenticate",
                t0,
                format!("user {:?} in realm {realm:?} accepted", creds.username),
                Value::Null,
            ),
        }
        if let Some(c) = r.code() {
            let d = match c {
                508 => Diagnosis::new(
                    Class::Capacity,
                    format!(
                        "508 {} to Allocate: the relay is out of capacity (no relay port free in its range, or a \
                         total quota); widen port-range or add relays",
                        r.reason()
                    ),
                ),
                c => Diagnosis::new(Class::TurnError, format!("Allocate answered {c} {} ({})", r.reason(), meaning(c))),
            };
            return Err(self.fail("allocate", t0, d));
        }
        let m = r.msg();
        let relayed = match m.xor_address(attr::XOR_RELAYED_ADDRESS) {
            Some(Ok(a)) => a,
            _ => return Err(self.fail("allocate", t0, Diagnosis::new(Class::TurnError, "no XOR-RELAYED-ADDRESS"))),
        };
        let mapped = m.xor_address(attr::XOR_MAPPED_ADDRESS).and_then(|a| a.ok());
        let lifetime = m.u32_attr(attr::LIFETIME).and_then(|l| l.ok());
        let verified = match (m.integrity_parts(), s.key()) {
            (Some(p), Some(k)) => Some(k.verify(&p)),
            _ => None,
        };
        self.pass(
            "allocate",
            t0,
            format!(
                "relayed {relayed}, mapped {}, lifetime {}{}",
                mapped.map_or("-".into(), |a| a.to_string()),
                lifetime.map_or("-".into(), |l| format!("{l} s")),
                match verified {
                    Some(false) => ", response MESSAGE-INTEGRITY does NOT verify",
                    _ => "",
                }
            ),
            json!({
                "relayed": relayed.to_string(),
                "mapped": mapped.map(|a| a.to_string()),
                "lifetime_s": lifetime,
                "integrity_verified": verified,
            }),
        );
        let result = self.relay_steps(&mut s, addr, relayed);
        // Refresh 0 (RFC 8656 §7.5: deletes the allocation), also after a failure.
        let t0 = Instant::now();
        let refreshed = s.signed(Method::REFRESH, &|w| w.u32(attr::LIFETIME, 0).map(drop));
        result?;
        match refreshed {
            Ok(r) if r.code().is_none() => {
                self.pass("refresh", t0, "Refresh 0: allocation deleted".into(), Value::Null);
                Ok(())
            }
            Ok(r) => {
                let c = r.code().unwrap_or(0);
                let d =
                    Diagnosis::new(Class::TurnError, format!("Refresh 0 answered {c} {} ({})", r.reason(), meaning(c)));
                Err(self.fail("refresh", t0, d))
            }
            Err(e) => Err(self.fail("refresh", t0, tx_diagnosis(&e, addr))),
        }
    }

    /// CreatePermission, the Send round trip, ChannelBind, the ChannelData round trip.
    fn relay_steps(&mut self, s: &mut Session, server: SocketAddr, relayed: SocketAddr) -> Result<()> {
        let t0 = Instant::now();
        let peer = Peer::new(server, self.opts.timeout)
            .map_err(|e| self.fail("permission", t0, Diagnosis::new(Class::Other, format!("peer socket: {e}"))))?;
        let pa = peer.addr;
        let r = s
            .signed(Method::CREATE_PERMISSION, &|w| w.xor_address(attr::XOR_PEER_ADDRESS, &pa).map(drop))
            .map_err(|e| self.fail("permission", t0, tx_diagnosis(&e, server)))?;
        if let Some(c) = r.code() {
            return Err(self.fail("permission", t0, peer_refusal("CreatePermission", c, &r, pa)));
        }
        self.pass(
            "permission",
            t0,
            format!("CreatePermission for the check's peer {pa} ({} address)", peer.how),
            json!({ "peer": pa.to_string() }),
        );
        self.round_trip(s, &peer, relayed, Mode::Send)?;
        let t0 = Instant::now();
        let channel = 0x4000u16;
        let r = s
            .signed(Method::CHANNEL_BIND, &|w| {
                w.u32(attr::CHANNEL_NUMBER, u32::from(channel) << 16)?
                    .xor_address(attr::XOR_PEER_ADDRESS, &pa)
                    .map(drop)
            })
            .map_err(|e| self.fail("channel-bind", t0, tx_diagnosis(&e, server)))?;
        if let Some(c) = r.code() {
            return Err(self.fail("channel-bind", t0, peer_refusal("ChannelBind", c, &r, pa)));
        }
        self.pass("channel-bind", t0, format!("channel 0x{channel:04X} bound to {pa}"), json!({ "channel": channel }));
        self.round_trip(s, &peer, relayed, Mode::Channel(channel))
    }

    fn round_trip(&mut self, s: &mut Session, peer: &Peer, relayed: SocketAddr, mode: Mode) -> Result<()> {
        let (name, how) = match mode {
            Mode::Send => ("send-roundtrip", "Send/Data indications"),
            Mode::Channel(_) => ("channel-roundtrip", "ChannelData"),
        };
        let t0 = Instant::now();
        let count = self.opts.count;
        let bar = self.opts.progress.then(|| {
            let b = indicatif::ProgressBar::new(u64::from(count));
            if let Ok(style) = indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} datagrams") {
                b.set_style(style.progress_chars("=> "));
            }
            b.set_message(name);
            b
        });
        let wait = self.opts.timeout.min(Duration::from_millis(1000)) / 2;
        let rt = data::round_trip(s, peer, relayed, mode, count, wait, bar.as_ref());
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        let rt = rt.map_err(|e| self.fail(name, t0, Diagnosis::new(Class::Other, format!("{how}: {e}"))))?;
        let seen = rt.seen_from.map(|a| a.to_string());
        let data = json!({
            "sent": rt.sent, "reached_peer": rt.out_ok, "peer_sent": rt.peer_sent, "came_back": rt.in_ok,
            "loss_percent": rt.loss_percent(), "rtt_median_ms": rt.median_ms().map(|m| (m * 1000.0).round() / 1000.0),
            "relayed": relayed.to_string(), "peer_saw_relay_at": seen,
        });
        let elsewhere = rt.seen_from.filter(|a| *a != relayed);
        let fail = if rt.out_ok > 0 && rt.in_ok == 0 {
            Some(match elsewhere {
                Some(src) => Diagnosis::new(
                    Class::ExternalIp,
                    format!(
                        "external-ip mismatch: the relay advertises XOR-RELAYED-ADDRESS {relayed}, but its datagrams \
                         come from {src}, and nothing the peer sends to {relayed} comes back ({} of {} out, 0 back); \
                         set external-ip to the address peers reach the relay at",
                        rt.out_ok, rt.sent
                    ),
                ),
                None => Diagnosis::new(
                    Class::InboundBlocked,
                    format!(
                        "data goes out but never comes back: {} of {} reached the peer from {relayed}, 0 of {} the peer \
                         sent to {relayed} came back; the relay port range is blocked inbound (firewall, security group)",
                        rt.out_ok, rt.sent, rt.peer_sent
                    ),
                ),
            })
        } else if rt.out_ok == 0 {
            Some(Diagnosis::new(
                Class::DataLoss,
                format!(
                    "nothing the client sent by {how} reached the peer (0 of {}), {} of {} came back the other way: \
                     the relay does not forward to peers, or its outbound traffic is blocked",
                    rt.sent, rt.in_ok, rt.peer_sent
                ),
            ))
        } else if rt.loss_percent() > f64::from(self.opts.max_loss) {
            Some(Diagnosis::new(
                Class::DataLoss,
                format!(
                    "{:.0}% lost ({} of {} out, {} of {} back), above --max-loss {}%",
                    rt.loss_percent(),
                    rt.out_ok,
                    rt.sent,
                    rt.in_ok,
                    rt.peer_sent,
                    self.opts.max_loss
                ),
            ))
        } else {
            None
        };
        if let Some(d) = fail {
            self.record(name, false, t0, d.message.clone(), data);
            return Err(Stop::Fail(d));
        }
        self.pass(
            name,
            t0,
            format!(
                "{how}: {}/{} out, {}/{} back, loss {:.0}%, RTT median {:.2} ms{}",
                rt.out_ok,
                rt.sent,
                rt.in_ok,
                rt.peer_sent,
                rt.loss_percent(),
                rt.median_ms().unwrap_or(0.0),
                elsewhere.map_or(String::new(), |a| format!(" (relay's datagrams come from {a})"))
            ),
            data,
        );
        Ok(())
    }

    /// A spinner on stderr with `message`, when progress is shown (a terminal, not --json).
    fn spinner(&self, message: String) -> Option<indicatif::ProgressBar> {
        self.opts.progress.then(|| {
            let sp = indicatif::ProgressBar::new_spinner();
            sp.set_message(message);
            sp.enable_steady_tick(Duration::from_millis(120));
            sp
        })
    }

    fn connect(&mut self, uri: &ServerUri, addr: SocketAddr) -> Result<Conn> {
        let t0 = Instant::now();
        if uri.transport == Transport::Udp {
            return Conn::udp(addr)
                .map_err(|e| self.fail("connect", t0, Diagnosis::new(Class::Other, format!("UDP socket: {e}"))));
        }
        let tls = match uri.transport {
            Transport::Tls => match self.opts.tls_config() {
                Ok(c) => Some(c),
                Err(e) => return Err(self.fail("connect", t0, Diagnosis::new(Class::Usage, e))),
            },
            _ => None,
        };
        let tls_pair: Option<(&Arc<rustls::ClientConfig>, &str)> = tls.as_ref().map(|c| (c, uri.host.as_str()));
        match Conn::stream(addr, self.opts.timeout, tls_pair) {
            Ok((c, info)) => {
                let detail = match &info {
                    Some(i) => format!("TCP connected, TLS handshake ({i}), certificate valid for {:?}", uri.host),
                    None => "TCP connected".into(),
                };
                self.pass("connect", t0, detail, json!({ "tls": info }));
                Ok(c)
            }
            Err(ConnectError::Tcp(e)) => {
                let d = Diagnosis::new(Class::Unreachable, format!("TCP connect to {addr}: {e}"));
                Err(self.fail("connect", t0, d))
            }
            Err(ConnectError::Tls { name_mismatch, reason }) => {
                let msg = if name_mismatch {
                    format!(
                        "TLS: the server's certificate does not match the name {:?} ({reason}); the URI must name a \
                         host the certificate covers",
                        uri.host
                    )
                } else {
                    format!("TLS handshake with {addr} failed: {reason}")
                };
                Err(self.fail("connect", t0, Diagnosis::new(Class::Tls, msg)))
            }
        }
    }

    fn redirect(&mut self, step: &'static str, t0: Instant, r: &Reply) -> Stop {
        if self.redirected_to.is_some() {
            let d = Diagnosis::new(Class::Redirected, "300 Try Alternate again from the alternate: followed once only");
            return self.fail(step, t0, d);
        }
        match r.alternate_server() {
            Some(alt) => {
                self.record(
                    step,
                    false,
                    t0,
                    format!("300 Try Alternate {}: ALTERNATE-SERVER {alt}", r.reason()),
                    json!({ "class": Class::Redirected, "alternate_server": alt.to_string() }),
                );
                self.pass(
                    "alternate",
                    Instant::now(),
                    format!("following ALTERNATE-SERVER {alt} once: the steps below run against it"),
                    json!({ "alternate_server": alt.to_string() }),
                );
                Stop::Redirect(alt)
            }
            None => self.fail(step, t0, Diagnosis::new(Class::TurnError, "300 Try Alternate without ALTERNATE-SERVER")),
        }
    }

    /// Why a signed request was refused with 401.
    fn rejected(&self, creds: &Creds, realm: &str) -> Diagnosis {
        let now = crate::credentials::unix_now();
        if let Some(exp) = crate::credentials::rest::expiry(&creds.username, self.opts.separator) {
            // Only a plausible Unix time (after 2001) is taken for a REST username.
            if exp > 1_000_000_000 && exp <= now {
                return Diagnosis::new(
                    Class::RestExpired,
                    format!(
                        "401: the TURN REST credential {:?} expired {} s ago (at {exp}, Unix time); mint a fresh one \
                         (or check the clocks of the web service and the relay)",
                        creds.username,
                        now - exp
                    ),
                );
            }
        }
        if let Some(url) = &self.opts.store {
            let found = crate::store::open(url, false).and_then(|mut st| st.lookup(realm, &creds.username));
            match found {
                Ok(None) => {
                    return Diagnosis::new(
                        Class::UnknownUser,
                        format!("401: unknown user: the store {url} has no user {:?} in realm {realm:?}", creds.username),
                    )
                }
                Ok(Some(_)) => {
                    return Diagnosis::new(
                        Class::WrongPassword,
                        format!(
                            "401: wrong password: user {:?} exists in realm {realm:?} of {url}, but the key does not verify",
                            creds.username
                        ),
                    )
                }
                Err(e) => {
                    return Diagnosis::new(
                        Class::WrongPassword,
                        format!("401: wrong password or unknown user ({url} could not be read: {e})"),
                    )
                }
            }
        }
        Diagnosis::new(
            Class::WrongPassword,
            format!(
                "401 to the signed Allocate: wrong password, or unknown user {:?} in realm {realm:?} (a relay answers \
                 both alike, RFC 8489 §9.2.4; --store tells them apart); a REST credential minted with another secret \
                 looks the same",
                creds.username
            ),
        )
    }
}

/// The diagnosis of a refused CreatePermission or ChannelBind.
fn peer_refusal(what: &str, code: u16, r: &Reply, peer: SocketAddr) -> Diagnosis {
    if code == 403 {
        return Diagnosis::new(
            Class::PeerDenied,
            format!(
                "403 {} to {what} for {peer}: the peer address is denied by the relay's policy (uturn: deny-peer / \
                 allow-peer; coturn: denied-peer-ip, no-loopback-peers)",
                r.reason()
            ),
        );
    }
    Diagnosis::new(Class::TurnError, format!("{what} answered {code} {} ({})", r.reason(), meaning(code)))
}

/// The diagnosis of a transaction that got no usable answer.
fn tx_diagnosis(e: &TxError, addr: SocketAddr) -> Diagnosis {
    match e {
        TxError::Timeout => Diagnosis::new(Class::Unreachable, format!("no response from {addr}")),
        TxError::Io(e) => Diagnosis::new(Class::Unreachable, format!("{addr}: {e}")),
        TxError::StaleNonceLoop(n) => {
            Diagnosis::new(Class::StaleNonceLoop, format!("438 Stale Nonce {n} times in a row"))
        }
        TxError::Build => Diagnosis::new(Class::Usage, "a request could not be built (username or realm too long)"),
    }
}

/// True when `addr` answers a STUN Binding over TCP within `timeout`.
fn tcp_answers(addr: SocketAddr, timeout: Duration) -> bool {
    let Ok((mut c, _)) = Conn::stream(addr, timeout, None) else { return false };
    let tid = TransactionId(rand::random());
    let mut buf = [0u8; 64];
    let Ok(w) = MessageWriter::new(&mut buf, Method::BINDING, MsgClass::Request, tid) else { return false };
    let n = w.finish();
    if c.send(&buf[..n]).is_err() {
        return false;
    }
    matches!(c.recv(Instant::now() + timeout), Ok(Some(b)) if Message::parse(&b).is_ok_and(|m| m.transaction_id() == tid))
}
