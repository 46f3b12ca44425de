//! The fleet registry: each node's entry in Redis, refreshed every [`HEARTBEAT`] with a
//! [`NODE_TTL`] expiry, and this node's view of the others.
//!
//! One heartbeat is two round trips on the heartbeat thread's own connection: a pipeline of
//! `SET uturn:fleet:node:<id> <json> PX 3000`, `ZADD uturn:fleet:nodes <expiry_ms> <id>`,
//! `ZREMRANGEBYSCORE uturn:fleet:nodes -inf <now_ms>` and `ZRANGE uturn:fleet:nodes 0 -1`,
//! then `MGET` of the listed entries (an entry whose key expired reads nil: that node is gone,
//! whatever the index says). When Redis fails, one WARN is logged, the view lapses after
//! [`NODE_TTL`] (so nothing is redirected to nodes this one cannot see), and one INFO is logged
//! when it answers again.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::info;
use uturn_proto::Transport;

use super::{connect, shown, unix_ms, FleetShared, NodeAddress, NodeInfo, HEARTBEAT, NODES, NODE_PREFIX, NODE_TTL};
use crate::config::Config;

/// Starts the heartbeat thread for `url`.
pub fn spawn_heartbeat(shared: Arc<FleetShared>, url: String) -> std::io::Result<()> {
    std::thread::Builder::new().name("uturn-fleet-heartbeat".into()).spawn(move || heartbeat(&shared, &url))?;
    Ok(())
}

fn heartbeat(shared: &FleetShared, url: &str) {
    let mut conn: Option<redis::Connection> = None;
    let mut outage_since: Option<Instant> = None;
    while !shared.stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let result = match conn.as_mut() {
            Some(c) => beat(shared, c),
            None => connect(url).and_then(|mut c| {
                let r = beat(shared, &mut c);
                conn = Some(c);
                r
            }),
        };
        match result {
            Ok(peers) => {
                *shared.peers.lock().unwrap_or_else(|e| e.into_inner()) = (peers, Some(Instant::now()));
                shared.connected.store(true, Ordering::Relaxed);
                if let Some(since) = outage_since.take() {
                    info!(redis = %shown(url), after_s = since.elapsed().as_secs(), "fleet: Redis answers again; registry, revoke and redirects are fleet-wide again");
                }
                super::outage::answered("fleet registry");
            }
            Err(e) => {
                conn = None;
                shared.connected.store(false, Ordering::Relaxed);
                if outage_since.is_none() {
                    outage_since = Some(Instant::now());
                    super::outage::failed("fleet registry", &e, "no registry, fleet revoke or fleet redirects");
                }
            }
        }
        let rest = HEARTBEAT.saturating_sub(started.elapsed());
        std::thread::sleep(rest.max(Duration::from_millis(50)));
    }
}

/// Publishes this node's entry and reads every live entry.
fn beat(shared: &FleetShared, conn: &mut redis::Connection) -> redis::RedisResult<Vec<NodeInfo>> {
    let mut me = shared.local();
    let now = unix_ms();
    me.updated_ms = now;
    let json = serde_json::to_string(&me).unwrap_or_default();
    let ttl_ms = NODE_TTL.as_millis() as u64;
    let (ids,): (Vec<String>,) = redis::pipe()
        .cmd("SET")
        .arg(format!("{NODE_PREFIX}{}", me.node))
        .arg(json)
        .arg("PX")
        .arg(ttl_ms)
        .ignore()
        .cmd("ZADD")
        .arg(NODES)
        .arg(now + ttl_ms)
        .arg(&me.node)
        .ignore()
        .cmd("ZREMRANGEBYSCORE")
        .arg(NODES)
        .arg("-inf")
        .arg(format!("({now}"))
        .ignore()
        .cmd("ZRANGE")
        .arg(NODES)
        .arg(0)
        .arg(-1)
        .query(conn)?;
    let others: Vec<String> = ids.into_iter().filter(|id| *id != me.node).collect();
    if others.is_empty() {
        return Ok(Vec::new());
    }
    let keys: Vec<String> = others.iter().map(|id| format!("{NODE_PREFIX}{id}")).collect();
    let values: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query(conn)?;
    Ok(values.into_iter().flatten().filter_map(|v| serde_json::from_str::<NodeInfo>(&v).ok()).collect())
}

/// This node's public addresses from its listen addresses: an unspecified listen IP is
/// replaced by the public `external-ip` of its family, else by the first relay IP of its family
/// (skipped when there is neither); a listen IP that is an `external-ip`'s private side is
/// replaced by the public one.
pub fn addresses(config: &Config) -> Vec<NodeAddress> {
    let public = |ip: IpAddr| -> Option<IpAddr> {
        if let Some((_, p)) = config.external_ips.iter().find(|(private, _)| *private == ip) {
            return Some(*p);
        }
        if !ip.is_unspecified() {
            return Some(ip);
        }
        config
            .external_ips
            .iter()
            .map(|(_, p)| *p)
            .chain(config.relay_ips.iter().copied().filter(|r| !r.is_unspecified()))
            .find(|p| p.is_ipv6() == ip.is_ipv6())
    };
    config
        .listen
        .iter()
        .filter_map(|l| {
            let ip = public(l.addr.ip())?;
            let addr = SocketAddr::new(ip, l.addr.port());
            Some(NodeAddress {
                transport: super::transport_name(l.transport).into(),
                addr,
                url: url(l.transport, addr),
            })
        })
        .collect()
}

/// The RFC 7065 URL of `addr` over `transport`.
pub fn url(transport: Transport, addr: SocketAddr) -> String {
    let host = match addr.ip() {
        IpAddr::V6(v6) => format!("[{v6}]"),
        IpAddr::V4(v4) => v4.to_string(),
    };
    match transport {
        Transport::Udp => format!("turn:{host}:{}?transport=udp", addr.port()),
        Transport::Tcp => format!("turn:{host}:{}?transport=tcp", addr.port()),
        Transport::Tls => format!("turns:{host}:{}?transport=tcp", addr.port()),
    }
}

/// This node's load, measured by the control loop once a second from the workers' published
/// counters and the process's CPU time (`/proc/self/stat`); no work on the packet path.
#[derive(Debug, Default)]
pub struct LoadMeter {
    last: Option<(Instant, u64, u64)>,
    /// Relayed application-data bytes/s, both directions, over the last interval.
    pub bytes_per_s: u64,
    /// CPU, percent of one core, over the last interval.
    pub cpu_percent: f64,
}

impl LoadMeter {
    /// Takes a new sample: `relayed_bytes` is the workers' total so far.
    pub fn sample(&mut self, now: Instant, relayed_bytes: u64) {
        let cpu = cpu_ticks().unwrap_or(0);
        if let Some((at, bytes, ticks)) = self.last {
            let dt = now.saturating_duration_since(at).as_secs_f64();
            if dt > 0.0 {
                self.bytes_per_s = (relayed_bytes.saturating_sub(bytes) as f64 / dt) as u64;
                let hz = clock_ticks_per_s();
                self.cpu_percent = (cpu.saturating_sub(ticks) as f64 / hz / dt * 100.0 * 10.0).round() / 10.0;
            }
        }
        self.last = Some((now, relayed_bytes, cpu));
    }
}

/// utime + stime of this process, clock ticks.
fn cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces: fields count from after its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// USER_HZ, the unit of `/proc/PID/stat`'s times: 100 on every Linux architecture uturn runs
/// on (the kernel's exported constant, independent of its internal HZ).
fn clock_ticks_per_s() -> f64 {
    100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_follow_rfc_7065() {
        let a: SocketAddr = "192.0.2.1:3478".parse().unwrap();
        let b: SocketAddr = "[2001:db8::1]:5349".parse().unwrap();
        assert_eq!(url(Transport::Udp, a), "turn:192.0.2.1:3478?transport=udp");
        assert_eq!(url(Transport::Tcp, a), "turn:192.0.2.1:3478?transport=tcp");
        assert_eq!(url(Transport::Tls, b), "turns:[2001:db8::1]:5349?transport=tcp");
    }

    #[test]
    fn cpu_ticks_are_read() {
        assert!(cpu_ticks().is_some());
    }
}
