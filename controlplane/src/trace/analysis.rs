//! What one trace makes of its events: the JSON line of each message, the traffic each way per
//! permission/channel (reported once a second), and the flags operators hunt for:
//!
//! - `one-way-media`: relayed data flows one way only for [`ONE_WAY_AFTER`] or more (a firewall
//!   or NAT on the silent side);
//! - `dropped-no-permission`, `dropped-unbound-channel`, `peer-dropped-no-permission`: Send
//!   indications, ChannelData or a peer's datagrams dropped for lack of a permission or channel
//!   binding (RFC 8656 §9, §12), from the worker's own drop counters;
//! - `refreshes-stopped`: an allocation close to its end with no Refresh (a client gone);
//! - `nat-rebinding`: a request of a traced user or client from a 5-tuple with no allocation
//!   while an allocation of theirs lives on another one (the client's mapping changed);
//! - `retransmission`: a request whose transaction ID was seen before (a lost or late answer).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Map, Value};
use uturn_dataplane::trace::{Direction, DropReason, Origin, TapEvent};
use uturn_proto::FiveTuple;

use super::decode::{self, Decoded};

/// Data one way only for this long raises `one-way-media`.
pub const ONE_WAY_AFTER: Duration = Duration::from_secs(3);
/// The same drop flag for a session is raised at most once per this period.
const DROP_FLAG_EVERY: Duration = Duration::from_secs(5);
/// Transaction IDs remembered for retransmissions, and for how long.
const TIDS: usize = 4096;
const TID_FOR: Duration = Duration::from_secs(40);
/// Flows (session, peer) followed at most.
const MAX_FLOWS: usize = 256;

/// Packets and bytes (of payload).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Count {
    packets: u64,
    bytes: u64,
}

impl Count {
    fn add(&mut self, bytes: usize) {
        self.packets += 1;
        self.bytes += bytes as u64;
    }

    fn json(&self) -> Value {
        json!({"packets": self.packets, "bytes": self.bytes})
    }
}

/// Relayed data between a session and one peer.
#[derive(Debug, Default)]
struct Flow {
    channel: Option<u16>,
    to_peer: Count,
    to_client: Count,
    reported: (Count, Count),
    last_to_peer: Option<Instant>,
    last_to_client: Option<Instant>,
    /// Since when data has gone one way with nothing the other way.
    out_only_since: Option<Instant>,
    in_only_since: Option<Instant>,
    flagged: bool,
}

/// An allocation's refresh state.
#[derive(Debug)]
struct Alloc {
    client: FiveTuple,
    lifetime: u32,
    refreshed: Instant,
    warned: bool,
}

/// One trace's analysis state.
#[derive(Debug, Default)]
pub struct Analysis {
    flows: HashMap<(u64, SocketAddr), Flow>,
    allocs: HashMap<u64, Alloc>,
    /// Requests seen: transaction ID -> (when, method, peers, times seen, signed).
    requests: HashMap<String, (Instant, &'static str, Vec<SocketAddr>, u32, bool)>,
    drop_flags: HashMap<(u64, &'static str), (Instant, u64)>,
    rebound: Vec<FiveTuple>,
}

impl Analysis {
    /// The line of `ev` and the flags it raises now.
    pub fn event(&mut self, ev: &TapEvent, now: Instant) -> (Value, Vec<Value>) {
        let stun = decode::stun(&ev.bytes);
        // A Send indication the worker dropped names its peer only in XOR-PEER-ADDRESS.
        let with_peer;
        let ev = match stun.as_ref().and_then(|d| d.peers.first()) {
            Some(p) if ev.peer.is_none() && stun.as_ref().is_some_and(|d| d.method_code == 0x006) => {
                with_peer = TapEvent { peer: Some(*p), ..ev.clone() };
                &with_peer
            }
            _ => ev,
        };
        let mut flags = Vec::new();
        let mut line = Map::new();
        line.insert("type".into(), json!("message"));
        line.insert("ts".into(), json!(super::unix(ev.at)));
        line.insert("session".into(), json!(ev.session));
        if let Some(u) = &ev.user {
            line.insert("user".into(), json!(u.as_ref()));
        }
        line.insert("transport".into(), json!(ev.five_tuple.transport.to_string()));
        line.insert("client".into(), json!(ev.five_tuple.client.to_string()));
        line.insert("server".into(), json!(ev.five_tuple.server.to_string()));
        if let Some(r) = ev.relayed {
            line.insert("relayed".into(), json!(r.to_string()));
        }
        line.insert(
            "dir".into(),
            json!(match ev.direction {
                Direction::FromClient => "from-client",
                Direction::ToClient => "to-client",
                Direction::FromPeer => "from-peer",
            }),
        );
        line.insert(
            "origin".into(),
            json!(match ev.origin {
                Origin::Worker => "worker",
                Origin::ControlPlane => "control",
            }),
        );
        if let Some(p) = ev.peer {
            line.insert("peer".into(), json!(p.to_string()));
        }
        line.insert("len".into(), json!(ev.len));
        if let Some(d) = ev.dropped {
            line.insert("dropped".into(), json!(drop_name(d)));
        }
        let mut payload = None;
        match &stun {
            Some(d) => {
                line.insert("kind".into(), json!("stun"));
                line.insert("method".into(), json!(d.method));
                line.insert("class".into(), json!(d.class));
                line.insert("tid".into(), json!(d.tid));
                line.insert("attributes".into(), Value::Array(d.attributes.clone()));
                if let Some(code) = d.error {
                    let request = self.requests.get(&d.tid);
                    let peers = request.map(|r| r.2.clone()).unwrap_or_default();
                    let signed = request.map(|r| r.4);
                    let reason = d
                        .attributes
                        .iter()
                        .find(|a| a["name"] == "ERROR-CODE")
                        .and_then(|a| a["reason"].as_str())
                        .unwrap_or("")
                        .to_string();
                    line.insert(
                        "error".into(),
                        json!({"code": code, "reason": reason, "meaning": decode::error_meaning(code, &peers, signed)}),
                    );
                }
                if d.method_code == 0x006 || d.method_code == 0x007 {
                    payload = d.data_len;
                }
                self.stun(ev, d, now, &mut flags);
            }
            None if ev.bytes.len() >= 4 && ev.bytes[0] & 0xC0 == 0x40 => {
                let channel = u16::from_be_bytes([ev.bytes[0], ev.bytes[1]]);
                line.insert("kind".into(), json!("channel-data"));
                line.insert("channel".into(), json!(format!("0x{channel:04X}")));
                payload = Some(u16::from_be_bytes([ev.bytes[2], ev.bytes[3]]) as usize);
                if let Some(p) = ev.peer {
                    if let Some(f) = self.flow(ev.session, p) {
                        f.channel = Some(channel);
                    }
                }
            }
            None if ev.direction == Direction::FromPeer => {
                line.insert("kind".into(), json!("peer-data"));
                payload = Some(ev.len);
            }
            None => {
                line.insert("kind".into(), json!("other"));
            }
        }
        if let (Some(n), Some(peer)) = (payload, ev.peer) {
            line.insert("payload".into(), json!(n));
            if ev.dropped.is_none() && ev.direction != Direction::FromPeer {
                self.relayed(ev.session, peer, ev.direction, n, now);
            }
        }
        if let Some(d) = ev.dropped {
            self.dropped(ev, d, now, &mut flags);
        }
        line.insert("raw".into(), json!(base64::engine::general_purpose::STANDARD.encode(&ev.bytes)));
        (Value::Object(line), flags)
    }

    fn flow(&mut self, session: u64, peer: SocketAddr) -> Option<&mut Flow> {
        if !self.flows.contains_key(&(session, peer)) && self.flows.len() >= MAX_FLOWS {
            return None;
        }
        Some(self.flows.entry((session, peer)).or_default())
    }

    /// Relayed data of `session` with `peer`.
    fn relayed(&mut self, session: u64, peer: SocketAddr, dir: Direction, bytes: usize, now: Instant) {
        let Some(f) = self.flow(session, peer) else { return };
        if dir == Direction::FromClient {
            f.to_peer.add(bytes);
            f.last_to_peer = Some(now);
            f.in_only_since = None;
            f.out_only_since.get_or_insert(now);
        } else {
            f.to_client.add(bytes);
            f.last_to_client = Some(now);
            f.out_only_since = None;
            f.in_only_since.get_or_insert(now);
        }
        if f.out_only_since.is_none() || f.in_only_since.is_none() {
            // Data came the other way: a later one-way period is a new finding.
            if f.last_to_peer.is_some() && f.last_to_client.is_some() {
                f.flagged = false;
            }
        }
    }

    /// Requests and responses: retransmissions, lifetimes, rebinding.
    fn stun(&mut self, ev: &TapEvent, d: &Decoded, now: Instant, flags: &mut Vec<Value>) {
        if ev.direction == Direction::FromClient && d.class == "request" {
            if self.requests.len() >= TIDS {
                self.requests.retain(|_, r| now.duration_since(r.0) < TID_FOR);
            }
            let signed = d.username.is_some();
            let entry = self.requests.entry(d.tid.clone()).or_insert((now, d.method, d.peers.clone(), 0, signed));
            entry.3 += 1;
            if entry.3 > 1 {
                flags.push(flag(
                    "retransmission",
                    ev,
                    format!(
                        "{} request {} seen {} times: the client did not get (or not in time) the answer",
                        d.method, d.tid, entry.3
                    ),
                ));
            }
            if ev.session == 0 && d.method_code != 0x003 && d.method_code != 0x001 {
                let other = self.allocs.iter().find(|(_, a)| a.client != ev.five_tuple).map(|(s, a)| (*s, a.client));
                if let Some((s, client)) = other {
                    if !self.rebound.contains(&ev.five_tuple) {
                        self.rebound.push(ev.five_tuple);
                        flags.push(flag(
                            "nat-rebinding",
                            ev,
                            format!(
                                "{} from {} which has no allocation, while session {s} lives on {}: the \
                                 client's NAT mapping changed (TURN has no mobility: the client must allocate \
                                 again)",
                                d.method, ev.five_tuple.client, client.client
                            ),
                        ));
                    }
                }
            }
        }
        if ev.direction == Direction::ToClient && d.class == "success" {
            match (d.method_code, d.lifetime) {
                (0x003 | 0x004, Some(0)) => {
                    // Deleted: the answer may come after the allocation is gone (session 0).
                    self.allocs.retain(|s, a| *s != ev.session && a.client != ev.five_tuple);
                }
                _ if ev.session == 0 => {}
                (0x003 | 0x004, Some(l)) => {
                    self.allocs.insert(
                        ev.session,
                        Alloc { client: ev.five_tuple, lifetime: l, refreshed: now, warned: false },
                    );
                }
                _ => {}
            }
        }
    }

    fn dropped(&mut self, ev: &TapEvent, d: DropReason, now: Instant, flags: &mut Vec<Value>) {
        let (name, why) = match (ev.direction, d) {
            (Direction::FromPeer, DropReason::NoPermission) => (
                "peer-dropped-no-permission",
                "datagrams from a peer with no permission are dropped (RFC 8656 §9): the client has not \
                 installed a permission (CreatePermission) for this peer's IP",
            ),
            (Direction::FromClient, DropReason::NoPermission) => (
                "dropped-no-permission",
                "Send/ChannelData to a peer with no permission is dropped (RFC 8656 §9): the client must \
                 CreatePermission (or ChannelBind) first, and refresh it within 300 s",
            ),
            (Direction::FromClient, DropReason::UnboundChannel) => (
                "dropped-unbound-channel",
                "ChannelData on a channel with no live binding is dropped (RFC 8656 §12): ChannelBind \
                 missing or expired",
            ),
            _ => return,
        };
        let e = self.drop_flags.entry((ev.session, name)).or_insert((now - DROP_FLAG_EVERY * 2, 0));
        e.1 += 1;
        if now.duration_since(e.0) >= DROP_FLAG_EVERY {
            let n = std::mem::take(&mut e.1);
            e.0 = now;
            let peer = ev.peer.map_or(String::new(), |p| format!(" (peer {p})"));
            flags.push(flag(name, ev, format!("{n} dropped{peer}: {why}")));
        }
    }

    /// Once a second: the traffic lines of flows that moved, and the flags now due.
    pub fn tick(&mut self, now: Instant) -> Vec<Value> {
        let mut out = Vec::new();
        for ((session, peer), f) in &mut self.flows {
            if (f.to_peer, f.to_client) != f.reported {
                let d_peer = Count {
                    packets: f.to_peer.packets - f.reported.0.packets,
                    bytes: f.to_peer.bytes - f.reported.0.bytes,
                };
                let d_client = Count {
                    packets: f.to_client.packets - f.reported.1.packets,
                    bytes: f.to_client.bytes - f.reported.1.bytes,
                };
                f.reported = (f.to_peer, f.to_client);
                out.push(json!({
                    "type": "traffic",
                    "ts": super::unix_now(),
                    "session": session,
                    "peer": peer.to_string(),
                    "channel": f.channel.map(|c| format!("0x{c:04X}")),
                    "to_peer": d_peer.json(),
                    "to_client": d_client.json(),
                    "total_to_peer": f.to_peer.json(),
                    "total_to_client": f.to_client.json(),
                }));
            }
            let recent = |t: Option<Instant>| t.is_some_and(|t| now.duration_since(t) < Duration::from_secs(2));
            let one_way = match (f.out_only_since, f.in_only_since) {
                (Some(t), None) if recent(f.last_to_peer) && now.duration_since(t) >= ONE_WAY_AFTER => Some((
                    t,
                    "client → peer only",
                    "nothing came back from the peer: a firewall or NAT on the peer's side, the peer not \
                     sending, or the relay port range blocked inbound",
                )),
                (None, Some(t)) if recent(f.last_to_client) && now.duration_since(t) >= ONE_WAY_AFTER => Some((
                    t,
                    "peer → client only",
                    "the client sends nothing to this peer: its outbound media is blocked or it has no \
                     channel/permission it uses",
                )),
                _ => None,
            };
            if let Some((since, way, why)) = one_way {
                if !f.flagged {
                    f.flagged = true;
                    out.push(json!({
                        "type": "flag",
                        "flag": "one-way-media",
                        "ts": super::unix_now(),
                        "session": session,
                        "peer": peer.to_string(),
                        "detail": format!("{way} for {} s: {why}", now.duration_since(since).as_secs()),
                    }));
                }
            }
        }
        for (session, a) in &mut self.allocs {
            let idle = now.duration_since(a.refreshed).as_secs();
            let lifetime = a.lifetime as u64;
            let margin = (lifetime / 10).clamp(1, 30);
            if !a.warned && idle + margin >= lifetime {
                a.warned = true;
                out.push(json!({
                    "type": "flag",
                    "flag": "refreshes-stopped",
                    "ts": super::unix_now(),
                    "session": session,
                    "client": a.client.client.to_string(),
                    "detail": format!(
                        "no Refresh for {idle} s of a {lifetime} s lifetime: the allocation ends in {} s \
                         unless the client refreshes (the client is gone, or its Refreshes do not reach the relay)",
                        lifetime.saturating_sub(idle)
                    ),
                }));
            }
        }
        self.allocs.retain(|_, a| now.duration_since(a.refreshed).as_secs() < a.lifetime as u64 + 5);
        out
    }
}

fn drop_name(d: DropReason) -> &'static str {
    match d {
        DropReason::NoPermission => "no permission",
        DropReason::UnboundChannel => "no channel binding",
        DropReason::NoAllocation => "no allocation",
        DropReason::Bandwidth => "over max-bandwidth",
        DropReason::Other => "malformed or incomplete",
    }
}

fn flag(name: &str, ev: &TapEvent, detail: String) -> Value {
    json!({
        "type": "flag",
        "flag": name,
        "ts": super::unix(ev.at),
        "session": ev.session,
        "client": ev.five_tuple.client.to_string(),
        "detail": detail,
    })
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use uturn_proto::wire::{attr, Class, MessageWriter, Method, TransactionId};

    use super::*;

    fn ft(port: u16) -> FiveTuple {
        FiveTuple::udp(SocketAddr::from(([127, 0, 0, 1], port)), SocketAddr::from(([127, 0, 0, 1], 3478)))
    }

    fn ev(five_tuple: FiveTuple, session: u64, direction: Direction, bytes: Vec<u8>) -> TapEvent {
        TapEvent {
            at: SystemTime::now(),
            worker: 0,
            five_tuple,
            session,
            user: None,
            relayed: None,
            direction,
            origin: Origin::Worker,
            peer: None,
            dropped: None,
            pending: false,
            len: bytes.len(),
            bytes,
        }
    }

    fn message(method: Method, class: Class, tid: [u8; 12], lifetime: Option<u32>) -> Vec<u8> {
        let mut buf = [0u8; 256];
        let mut w = MessageWriter::new(&mut buf, method, class, TransactionId(tid)).unwrap();
        if let Some(l) = lifetime {
            w.u32(attr::LIFETIME, l).unwrap();
        }
        let n = w.finish();
        buf[..n].to_vec()
    }

    #[test]
    fn a_request_seen_twice_is_a_retransmission() {
        let mut a = Analysis::default();
        let now = Instant::now();
        let req = message(Method::REFRESH, Class::Request, [1; 12], Some(600));
        assert!(a.event(&ev(ft(1), 7, Direction::FromClient, req.clone()), now).1.is_empty());
        let (_, flags) = a.event(&ev(ft(1), 7, Direction::FromClient, req), now);
        assert_eq!(flags.len(), 1);
        assert_eq!(flags[0]["flag"], "retransmission");
    }

    #[test]
    fn refreshes_stop_and_a_deletion_is_not_flagged() {
        let mut a = Analysis::default();
        let t0 = Instant::now();
        let ok = message(Method::ALLOCATE, Class::Success, [2; 12], Some(10));
        a.event(&ev(ft(2), 8, Direction::ToClient, ok.clone()), t0);
        a.event(&ev(ft(3), 9, Direction::ToClient, ok), t0);
        // Session 9 deletes its allocation; the answer comes after it is gone (session 0).
        let gone = message(Method::REFRESH, Class::Success, [3; 12], Some(0));
        a.event(&ev(ft(3), 0, Direction::ToClient, gone), t0);
        assert!(a.tick(t0 + Duration::from_secs(5)).iter().all(|v| v["type"] != "flag"));
        let flags: Vec<_> = a.tick(t0 + Duration::from_secs(9)).into_iter().filter(|v| v["type"] == "flag").collect();
        assert_eq!(flags.len(), 1, "{flags:?}");
        assert_eq!((flags[0]["flag"].as_str(), flags[0]["session"].as_u64()), (Some("refreshes-stopped"), Some(8)));
    }

    #[test]
    fn one_way_media_is_flagged_once_and_two_way_is_not() {
        let mut a = Analysis::default();
        let t0 = Instant::now();
        let peer: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        let cd = vec![0x40, 0x00, 0x00, 0x64];
        for i in 0..40 {
            let mut e = ev(ft(4), 10, Direction::FromClient, cd.clone());
            e.peer = Some(peer);
            a.event(&e, t0 + Duration::from_millis(100 * i));
        }
        let at = t0 + Duration::from_millis(3900);
        let flags: Vec<_> = a.tick(at).into_iter().filter(|v| v["type"] == "flag").collect();
        assert_eq!(flags.len(), 1);
        assert_eq!(flags[0]["flag"], "one-way-media");
        assert!(a.tick(at).iter().all(|v| v["type"] != "flag"), "raised once");
        let mut back = ev(ft(4), 10, Direction::ToClient, cd);
        back.peer = Some(peer);
        a.event(&back, at);
        assert!(a.tick(at + Duration::from_millis(100)).iter().all(|v| v["type"] != "flag"));
    }
}
