//! A fleet of relays sharing state in Redis (`fleet-redis`; docs/operations.md, "Run a fleet").
//!
//! Nothing here runs on the packet path or waits on Redis in the control loop: Redis is talked
//! to by this module's own threads ([`registry`]'s heartbeat, [`broadcast`]'s subscriber) and by
//! the admin endpoint's HTTP thread for the rare fleet-wide admin requests. The control loop
//! only reads [`FleetShared`]'s registry view (a mutex held for a copy) when an Allocate is
//! redirected, and writes this node's load into it once a second.
//!
//! Also here: the fleet's nonce secret ([`nonce_secret`]: `nonce-secret-file`, or shared through
//! Redis) and per-user quotas across nodes ([`quota`]: its own thread, one Lua check per Allocate).
//!
//! Without `fleet-redis`, no thread starts and no connection is made: `GET /fleet` lists this
//! node alone, `POST /ice-servers` names this node's URLs, redirects use the static
//! `alternate-server` list, and revoke reaches this node only, exactly as a single node.
//!
//! # Redis layout (all values text)
//!
//! | key                          | type   | what                                                 |
//! |------------------------------|--------|------------------------------------------------------|
//! | `uturn:fleet:node:<node-id>` | string | [`NodeInfo`] as JSON, `PX` [`NODE_TTL`]              |
//! | `uturn:fleet:nodes`          | zset   | node-id scored by its entry's expiry (Unix ms): index |
//! | `uturn:fleet:control`        | pubsub | fleet-wide admin requests ([`broadcast::Request`])    |
//! | `uturn:fleet:reply:<random>` | list   | each node's answer to one request, `EXPIRE` 10 s      |

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use uturn_proto::Transport;

pub mod admin;
pub mod broadcast;
pub mod ice;
pub mod nonce_secret;
pub mod outage;
pub mod quota;
pub mod redirect;
pub mod registry;

/// How long a node's registry entry lives without a refresh: a killed node drops out of
/// `/fleet`, `/ice-servers` and redirects at most this long after its last heartbeat.
pub const NODE_TTL: Duration = Duration::from_secs(3);
/// How often a node refreshes its registry entry and reads the others'.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// How long a fleet-wide admin request waits for the nodes' answers.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// Connect, read and write timeout of every fleet connection to Redis.
pub const REDIS_TIMEOUT: Duration = Duration::from_secs(1);
/// Key of a node's registry entry: this prefix, then its node-id.
pub const NODE_PREFIX: &str = "uturn:fleet:node:";
/// The sorted set indexing the registry entries.
pub const NODES: &str = "uturn:fleet:nodes";
/// The pub/sub channel of fleet-wide admin requests.
pub const CONTROL_CHANNEL: &str = "uturn:fleet:control";
/// Prefix of the lists the nodes answer a fleet-wide request on.
pub const REPLY_PREFIX: &str = "uturn:fleet:reply:";

/// One public address of a node: how clients reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddress {
    /// `udp`, `tcp` or `tls`.
    pub transport: String,
    /// The public transport address (an `external-ip` mapping applied).
    pub addr: SocketAddr,
    /// Its RFC 7065 URL: `turn:HOST:PORT?transport=udp|tcp`, `turns:HOST:PORT?transport=tcp`.
    pub url: String,
}

/// What a node publishes in the registry (and `GET /fleet` lists).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The node's `node-id`.
    pub node: String,
    /// Its `region`, if set.
    #[serde(default)]
    pub region: Option<String>,
    /// Its public addresses.
    pub addresses: Vec<NodeAddress>,
    /// `ready` or `draining`.
    pub health: String,
    /// True when it is over its own budget (`total-quota` or `node-max-bandwidth` reached, or
    /// draining): it redirects new Allocates and is never redirected to.
    pub over_budget: bool,
    /// Allocations it holds.
    pub allocations: u64,
    /// Relayed application data, bits/s, both directions (the last second).
    pub relayed_bps: u64,
    /// CPU the process used, percent of one core (the last second).
    pub cpu_percent: f64,
    /// Its load as a fraction of its budget: the largest of allocations / `total-quota` and
    /// relayed bytes/s / `node-max-bandwidth` (0 for a budget not set). Redirects go to the
    /// live node with the least.
    pub load: f64,
    /// When the entry was written, Unix milliseconds (the writer's clock).
    pub updated_ms: u64,
}

impl NodeInfo {
    /// True when it takes new allocations: ready and within its budget.
    pub fn accepting(&self) -> bool {
        self.health == "ready" && !self.over_budget
    }

    /// Its address of `transport` and the family of `v6`, if it has one.
    pub fn address(&self, transport: Transport, v6: bool) -> Option<SocketAddr> {
        let name = transport_name(transport);
        self.addresses.iter().find(|a| a.transport == name && a.addr.is_ipv6() == v6).map(|a| a.addr)
    }
}

/// `udp`, `tcp` or `tls`.
pub fn transport_name(t: Transport) -> &'static str {
    match t {
        Transport::Udp => "udp",
        Transport::Tcp => "tcp",
        Transport::Tls => "tls",
    }
}

/// What `POST /ice-servers` mints with: the first REST secret and the separator (replaced on
/// SIGHUP), and the longest TTL.
#[derive(Debug, Clone, Default)]
pub struct Minting {
    /// The first `static-auth-secret`; `None` when there is none (the route answers 409).
    pub secret: Option<String>,
    /// The REST username separator.
    pub separator: char,
    /// Longest credential lifetime.
    pub max_ttl: Duration,
}

/// What the fleet threads, the control loop and the admin endpoint share.
#[derive(Debug)]
pub struct FleetShared {
    /// This node's id.
    pub node_id: String,
    /// `fleet-redis`, when set.
    pub redis_url: Option<String>,
    /// This node's entry as the control loop last wrote it (once a second).
    pub local: Mutex<NodeInfo>,
    /// The other live nodes' entries as the heartbeat last read them, with when (empty without
    /// Redis; entries older than [`NODE_TTL`] are ignored).
    pub peers: Mutex<(Vec<NodeInfo>, Option<Instant>)>,
    /// True while Redis answers the heartbeat.
    pub connected: AtomicBool,
    /// What `/ice-servers` mints with.
    pub minting: Mutex<Minting>,
    /// Set to stop the fleet threads.
    pub stop: AtomicBool,
}

impl FleetShared {
    /// Shared state for node `node_id` publishing `local`.
    pub fn new(node_id: String, redis_url: Option<String>, local: NodeInfo, minting: Minting) -> Arc<Self> {
        Arc::new(FleetShared {
            node_id,
            redis_url,
            local: Mutex::new(local),
            peers: Mutex::new((Vec::new(), None)),
            connected: AtomicBool::new(false),
            minting: Mutex::new(minting),
            stop: AtomicBool::new(false),
        })
    }

    /// This node's entry.
    pub fn local(&self) -> NodeInfo {
        self.local.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The live nodes: this one (as it is now) and, with Redis, every other whose entry was
    /// read less than [`NODE_TTL`] ago, sorted by node id.
    pub fn live_nodes(&self) -> Vec<NodeInfo> {
        let mut all = vec![self.local()];
        {
            let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
            if peers.1.is_some_and(|at| at.elapsed() < NODE_TTL) {
                all.extend(peers.0.iter().filter(|n| n.node != self.node_id).cloned());
            }
        }
        all.sort_by(|a, b| a.node.cmp(&b.node));
        all
    }

    /// Replaces what `/ice-servers` mints with: `secret` (the first REST secret), the REST
    /// `separator`, and the longest TTL.
    pub fn set_minting(&self, secret: Option<String>, separator: char, max_ttl: Duration) {
        *self.minting.lock().unwrap_or_else(|e| e.into_inner()) = Minting { secret, separator, max_ttl };
    }

    /// True when this node is part of a fleet (`fleet-redis` set).
    pub fn in_fleet(&self) -> bool {
        self.redis_url.is_some()
    }
}

/// The running fleet threads (none without `fleet-redis`); they stop when this drops.
pub struct Fleet {
    /// The shared state.
    pub shared: Arc<FleetShared>,
    /// Fleet-wide admin requests the subscriber hands to the control loop (answered like the
    /// admin endpoint's).
    pub requests: crossbeam_channel::Receiver<crate::admin_api::AdminRequest>,
}

impl Fleet {
    /// Starts the heartbeat and subscriber threads when `shared.redis_url` is set; they unpark
    /// `control` when they queue a request for it.
    pub fn start(shared: Arc<FleetShared>, control: std::thread::Thread) -> std::io::Result<Fleet> {
        let (tx, requests) = crossbeam_channel::bounded(64);
        if let Some(url) = shared.redis_url.clone() {
            registry::spawn_heartbeat(shared.clone(), url.clone())?;
            broadcast::spawn_subscriber(shared.clone(), url, tx, control)?;
        }
        Ok(Fleet { shared, requests })
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

/// Unix time in milliseconds.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A connection to `url` with [`REDIS_TIMEOUT`] on connect, reads and writes.
pub fn connect(url: &str) -> redis::RedisResult<redis::Connection> {
    let client = redis::Client::open(url)?;
    let conn = client.get_connection_with_timeout(REDIS_TIMEOUT)?;
    conn.set_read_timeout(Some(REDIS_TIMEOUT))?;
    conn.set_write_timeout(Some(REDIS_TIMEOUT))?;
    Ok(conn)
}

/// `url` with any password masked, for logs.
pub fn shown(url: &str) -> String {
    crate::store::mask_redis(url)
}
