//! Configuration: an embedded default, an optional TOML file (`--config`), then command-line
//! flags, each overriding the one before. `docs/uturn.example.toml` documents every key.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use ipnet::IpNet;
use serde::Deserialize;
use uturn_dataplane::{ProxyProtocol, StreamLimits, XdpMode};
use uturn_proto::wire::integrity::PasswordAlgorithm;
use uturn_proto::{ListenAddr, Transport};

use crate::credentials::CredentialConfig;
use crate::store::StoreUrl;

/// Command-line flags; every one overrides the matching config-file key.
#[derive(Debug, Parser, Default)]
#[command(name = "uturn", version, about = "uturn: a TURN relay (RFC 8656) on a thread-per-core io_uring data plane")]
pub struct Cli {
    /// A subcommand; without one, uturn runs the relay.
    #[command(subcommand)]
    pub command: Option<crate::admin::Command>,
    /// TOML configuration file (see docs/uturn.example.toml).
    #[arg(long, env = "UTURN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Listen address: udp://IP:PORT, tcp://IP:PORT, tls://IP:PORT or a bare IP:PORT (UDP);
    /// repeatable (UTURN_LISTEN: comma-separated).
    #[arg(long, env = "UTURN_LISTEN", value_delimiter = ',')]
    pub listen: Vec<ListenAddr>,
    /// PEM certificate chain for tls:// listen addresses (re-read on SIGHUP).
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for tls:// listen addresses (re-read on SIGHUP).
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// IP address relayed transport addresses are bound to (repeatable: one or more per family;
    /// allocations spread over those of their family; UTURN_RELAY_IP: comma-separated).
    #[arg(long, env = "UTURN_RELAY_IP", value_delimiter = ',')]
    pub relay_ip: Vec<IpAddr>,
    /// PUBLIC/PRIVATE (or PUBLIC alone, for the only relay address of its family): advertise
    /// PUBLIC in XOR-RELAYED-ADDRESS for relay sockets bound to PRIVATE, behind a 1:1 NAT
    /// (repeatable; UTURN_EXTERNAL_IP: comma-separated). `auto`: ask --external-ip-stun.
    #[arg(long, env = "UTURN_EXTERNAL_IP", value_delimiter = ',')]
    pub external_ip: Vec<String>,
    /// Realm for long-term credentials.
    #[arg(long, env = "UTURN_REALM")]
    pub realm: Option<String>,
    /// A user as NAME:PASSWORD (repeatable; replaces the file's users). Prefer --users-file or
    /// UTURN_USER: a flag shows in /proc/PID/cmdline.
    #[arg(long, env = crate::secrets::ENV_USER, hide_env_values = true)]
    pub user: Vec<String>,
    /// A file of NAME:PASSWORD lines (`#` comments); replaces the file's users, with --user.
    #[arg(long)]
    pub users_file: Option<PathBuf>,
    /// Worker threads (0: one per online core).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Relay port range LO-HI.
    #[arg(long, env = "UTURN_PORT_RANGE")]
    pub port_range: Option<String>,
    /// I/O backend: auto, uring or epoll.
    #[arg(long)]
    pub io_backend: Option<String>,
    /// Allow peers in this CIDR, overriding the default denials (repeatable).
    #[arg(long)]
    pub allow_peer: Vec<IpNet>,
    /// Deny peers in this CIDR (repeatable).
    #[arg(long)]
    pub deny_peer: Vec<IpNet>,
    /// Log level or tracing filter (error, warn, info, debug, trace).
    #[arg(long)]
    pub log_level: Option<String>,
    /// Accept channel numbers 0x5000-0x7FFF (RFC 5766 clients such as turnutils_uclient).
    #[arg(long)]
    pub rfc5766_channels: bool,
    /// TURN REST API shared secret (repeatable: any verifies, the first mints). Prefer
    /// --static-auth-secret-file or UTURN_STATIC_AUTH_SECRET: a flag shows in /proc/PID/cmdline.
    #[arg(long, env = crate::secrets::ENV_STATIC_AUTH_SECRET, hide_env_values = true)]
    pub static_auth_secret: Vec<String>,
    /// A file of REST secrets, one a line, the first mints (re-read on SIGHUP).
    #[arg(long)]
    pub static_auth_secret_file: Option<PathBuf>,
    /// Separator between expiry and user id in REST usernames (default ':').
    #[arg(long)]
    pub rest_separator: Option<char>,
    /// End an allocation made with a REST credential when the credential expires.
    #[arg(long)]
    pub strict_expiry: bool,
    /// User store: sqlite:///path/users.db or redis://host:port/db.
    #[arg(long)]
    pub user_store: Option<String>,
    /// Admin endpoint IP:PORT (HTTP; loopback only unless --admin-token is set).
    #[arg(long, env = "UTURN_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Bearer token the admin endpoint requires. Prefer --admin-token-file or
    /// UTURN_ADMIN_TOKEN: a flag shows in /proc/PID/cmdline.
    #[arg(long, env = crate::secrets::ENV_ADMIN_TOKEN, hide_env_values = true)]
    pub admin_token: Option<String>,
    /// A file holding the admin bearer token.
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
    /// Prometheus endpoint IP:PORT (`GET /metrics`; off by default; loopback only unless
    /// --metrics-allow-remote).
    #[arg(long, env = "UTURN_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Let `metrics-listen` be off loopback (the endpoint has no authentication).
    #[arg(long)]
    pub metrics_allow_remote: bool,
    /// Log format: text or json (one JSON object per line).
    #[arg(long)]
    pub log_format: Option<String>,
    /// ALTERNATE-SERVER IP:PORT offered with 300 Try Alternate while draining or over budget
    /// (repeatable: used in turn; a fleet's registry comes first, docs/operations.md).
    #[arg(long)]
    pub alternate_server: Vec<SocketAddr>,
    /// Seconds a drain waits for allocations to end before the process exits.
    #[arg(long)]
    pub drain_timeout: Option<u64>,
    /// Steer each datagram to the worker on the CPU that received it (SO_ATTACH_REUSEPORT_CBPF).
    #[arg(long)]
    pub reuseport_cpu: bool,
    /// XDP fast path for ChannelData: off, native or generic (needs root).
    #[arg(long)]
    pub xdp: Option<String>,
    /// Interface for the XDP program (repeatable; default: those holding the listen and relay
    /// addresses).
    #[arg(long = "xdp-interface")]
    pub xdp_interfaces: Vec<String>,
    /// Shared fleet state in Redis: redis://host:port/db or rediss://… (nonce secret, per-user
    /// quotas, node registry, revoke, usage records). Unset: this node alone.
    #[arg(long)]
    pub fleet_redis: Option<String>,
    /// This node's name in the fleet (default: the host name).
    #[arg(long)]
    pub node_id: Option<String>,
    /// Every TCP/TLS connection starts with a PROXY protocol v1 or v2 header from a balancer in
    /// --proxy-trusted (docs/operations.md).
    #[arg(long)]
    pub proxy_protocol: bool,
    /// Every UDP datagram starts with a PROXY protocol v2 header from a balancer in
    /// --proxy-trusted.
    #[arg(long)]
    pub proxy_protocol_udp: bool,
    /// A load balancer network (CIDR) trusted to send PROXY headers (repeatable).
    #[arg(long)]
    pub proxy_trusted: Vec<IpNet>,
    /// Usage records: a JSON-lines file each record is appended to (besides the Redis stream
    /// when `fleet-redis` is set).
    #[arg(long)]
    pub usage_file: Option<PathBuf>,
    /// Usage records: seconds between interim records of a live allocation (0: final only).
    #[arg(long)]
    pub usage_interval: Option<u64>,
    /// This node's region, published in the fleet registry (`POST /ice-servers` may ask for one).
    #[arg(long)]
    pub region: Option<String>,
    /// A file holding the nonce secret (64 hex digits) shared by the fleet.
    #[arg(long)]
    pub nonce_secret_file: Option<PathBuf>,
    /// STUN server (HOST:PORT) that `--external-ip auto` asks for the relay addresses' public
    /// address, at start and on SIGHUP.
    #[arg(long, env = "UTURN_EXTERNAL_IP_STUN")]
    pub external_ip_stun: Option<String>,
}

/// The configuration file, every key optional (kebab-case keys).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct FileConfig {
    listen: Option<Vec<ListenAddr>>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    external_ip: Option<OneOrMany>,
    max_connections: Option<usize>,
    max_connections_per_ip: Option<usize>,
    connections_per_second_per_ip: Option<u32>,
    tls_handshake_timeout: Option<u64>,
    stream_frame_timeout: Option<u64>,
    stream_idle_timeout: Option<u64>,
    stream_write_queue: Option<usize>,
    stream_stall_timeout: Option<u64>,
    relay_ip: Option<OneOrMany>,
    realm: Option<String>,
    users: Option<BTreeMap<String, String>>,
    users_file: Option<PathBuf>,
    workers: Option<usize>,
    port_range: Option<String>,
    io_backend: Option<String>,
    allow_peer: Option<Vec<IpNet>>,
    deny_peer: Option<Vec<IpNet>>,
    log_level: Option<String>,
    default_lifetime: Option<u64>,
    max_lifetime: Option<u64>,
    permission_lifetime: Option<u64>,
    channel_lifetime: Option<u64>,
    nonce_lifetime: Option<u64>,
    user_quota: Option<u32>,
    total_quota: Option<u32>,
    rfc5766_channels: Option<bool>,
    max_permissions: Option<usize>,
    max_channels: Option<usize>,
    max_bandwidth: Option<u64>,
    unauth_rate: Option<u32>,
    realms: Option<Vec<String>>,
    static_auth_secret: Option<OneOrMany>,
    static_auth_secret_file: Option<PathBuf>,
    rest_separator: Option<char>,
    strict_expiry: Option<bool>,
    user_store: Option<String>,
    user_cache_ttl: Option<u64>,
    user_cache_negative_ttl: Option<u64>,
    user_cache_size: Option<usize>,
    user_cache_bytes: Option<usize>,
    user_cache_negative_size: Option<usize>,
    user_cache_stale_ttl: Option<u64>,
    store_threads: Option<usize>,
    password_algorithms: Option<Vec<String>>,
    admin_listen: Option<SocketAddr>,
    admin_token: Option<String>,
    admin_token_file: Option<PathBuf>,
    metrics_listen: Option<SocketAddr>,
    metrics_allow_remote: Option<bool>,
    log_format: Option<String>,
    alternate_server: Option<OneOrMany>,
    drain_timeout: Option<u64>,
    reuseport_cpu: Option<bool>,
    xdp: Option<String>,
    xdp_interfaces: Option<Vec<String>>,
    xdp_routes: Option<u32>,
    max_peer_connections_per_user: Option<usize>,
    fleet_redis: Option<String>,
    node_id: Option<String>,
    proxy_protocol: Option<bool>,
    proxy_protocol_udp: Option<bool>,
    proxy_trusted: Option<Vec<IpNet>>,
    usage_file: Option<PathBuf>,
    usage_interval: Option<u64>,
    usage_stream: Option<String>,
    usage_stream_maxlen: Option<u64>,
    region: Option<String>,
    node_max_bandwidth: Option<u64>,
    ice_servers_max_ttl: Option<u64>,
    nonce_secret_file: Option<PathBuf>,
    quota_lease: Option<u64>,
    external_ip_stun: Option<String>,
}

/// A key that takes one string or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// Which I/O backend to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    /// io_uring when the kernel allows it, else epoll.
    Auto,
    /// io_uring, or fail to start.
    Uring,
    /// epoll.
    Epoll,
}

/// The effective configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listen addresses with their transports (UDP, TCP, TLS).
    pub listen: Vec<ListenAddr>,
    /// PEM certificate chain and private key for `tls://` listen addresses.
    pub tls_cert: Option<PathBuf>,
    /// See `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Caps and deadlines of TCP and TLS client connections (docs/security.md).
    pub stream_limits: StreamLimits,
    /// Relayed transport addresses' IPs: one or more per family served.
    pub relay_ips: Vec<IpAddr>,
    /// (private, public) pairs: relay sockets bound to the private IP are advertised with the
    /// public one (`external-ip`, a relay behind a 1:1 NAT).
    pub external_ips: Vec<(IpAddr, IpAddr)>,
    /// Realm, static users, REST secrets, user store and key cache (docs/credentials.md):
    /// what SIGHUP reloads, as the control plane takes it.
    pub credentials: CredentialConfig,
    /// Password algorithms offered in 401s, in order of preference (RFC 8489 §9.2.4):
    /// default SHA-256 then MD5; MD5 alone gives an RFC 5389 challenge.
    pub password_algorithms: Vec<PasswordAlgorithm>,
    /// Admin endpoint address (off by default).
    pub admin_listen: Option<SocketAddr>,
    /// Bearer token the admin endpoint requires.
    pub admin_token: Option<String>,
    /// Prometheus endpoint address (off by default).
    pub metrics_listen: Option<SocketAddr>,
    /// True when `metrics-listen` may be off loopback (an explicit opt-in: no authentication).
    pub metrics_allow_remote: bool,
    /// Logs as JSON objects, one per line (`log-format = "json"`), instead of text.
    pub log_json: bool,
    /// ALTERNATE-SERVERs offered in turn with 300 while draining or over budget (after the
    /// fleet registry's, when there is one); without any, a draining relay answers new
    /// Allocates with 508 and one over `total-quota` with 486.
    pub alternate_server: Vec<SocketAddr>,
    /// How long a drain waits for the allocations to end before the process exits, default
    /// 3600 s.
    pub drain_timeout: Duration,
    /// Steer each datagram to the worker pinned to the CPU that received it (a classic BPF
    /// program on the SO_REUSEPORT group) instead of the kernel's 5-tuple hash; for hosts whose
    /// NIC queues are pinned one per core (scripts/tune-host.sh). Off by default.
    pub reuseport_cpu: bool,
    /// The XDP fast path for ChannelData (docs/xdp.md): off (default), native or generic.
    pub xdp: XdpMode,
    /// Interfaces the XDP program attaches to; empty: those holding a listen or relay address.
    pub xdp_interfaces: Vec<String>,
    /// Channel bindings the XDP maps hold, all workers together (default 65536); bindings
    /// beyond it stay on the socket path.
    pub xdp_routes: u32,
    /// Worker threads (resolved: at least 1).
    pub workers: usize,
    /// Relay port range, inclusive.
    pub port_range: (u16, u16),
    /// I/O backend choice.
    pub io_backend: BackendChoice,
    /// CIDRs allowed despite the default denials.
    pub allow_peer: Vec<IpNet>,
    /// CIDRs denied in addition to the defaults.
    pub deny_peer: Vec<IpNet>,
    /// Tracing filter.
    pub log_level: String,
    /// Allocation lifetime when the client asks for less or nothing (RFC 8656 §7.2), default 600 s.
    pub default_lifetime: Duration,
    /// Longest allocation lifetime granted, default 3600 s.
    pub max_lifetime: Duration,
    /// Permission lifetime (RFC 8656 §9: 300 s).
    pub permission_lifetime: Duration,
    /// Channel binding lifetime (RFC 8656 §12: 600 s).
    pub channel_lifetime: Duration,
    /// Nonce lifetime, default 600 s; older nonces get 438 Stale Nonce.
    pub nonce_lifetime: Duration,
    /// Allocations one user may hold at once (0: unlimited); more earn 486.
    pub user_quota: u32,
    /// Allocations the server holds at once (0: unlimited); more earn 486.
    pub total_quota: u32,
    /// Accept ChannelBind numbers 0x5000-0x7FFF as RFC 5766 did (coturn's turnutils_uclient
    /// picks them); off by default, following RFC 8656 §12.
    pub rfc5766_channels: bool,
    /// Permissions one allocation may hold (default 128); more earn 508.
    pub max_permissions: usize,
    /// Channel bindings one allocation may hold (default 128); more earn 508.
    pub max_channels: usize,
    /// Relayed payload bytes/s per allocation, both directions (0: unlimited, the default).
    pub max_bandwidth: u64,
    /// Requests per second the relay answers or forwards for one source (IPv4 address or IPv6
    /// /64) without having verified their MESSAGE-INTEGRITY: Binding, the 401 round, a first
    /// Allocate, anything with a forged key. Each worker enforces its share
    /// (`unauth_rate / workers`, rounded up) with a burst of the same size; more are dropped
    /// silently. 0: unlimited. Default [`DEFAULT_UNAUTH_RATE`].
    pub unauth_rate: u32,
    /// RFC 6062 peer connections (connecting, pending and bound) all the TCP allocations of
    /// one user may hold at once (default 1,024); more earn 508 (Connect) or are closed at
    /// accept. They count in `max-connections` too.
    pub max_peer_connections_per_user: usize,
    /// Shared fleet state in Redis (`fleet-redis`, redis:// or rediss://); `None`: this node
    /// alone, exactly as without a fleet.
    pub fleet_redis: Option<String>,
    /// This node's name in the fleet registry, usage records and logs (`node-id`; default: the
    /// host name, or `uturn` when it has none).
    pub node_id: String,
    /// PROXY protocol from trusted load balancers (`proxy-protocol`, `proxy-protocol-udp`,
    /// `proxy-trusted`; docs/operations.md, docs/security.md).
    pub proxy: ProxyProtocol,
    /// Usage records (`usage-file`, `usage-interval`, `usage-stream`, `usage-stream-maxlen`;
    /// the stream is written when `fleet-redis` is set). See [`crate::usage`].
    pub usage: UsageSettings,
    /// This node's region in the fleet registry (`region`), matched by `POST /ice-servers`.
    pub region: Option<String>,
    /// Relayed bytes/s (both directions, all allocations) past which this node counts as over
    /// budget and redirects new Allocates (`node-max-bandwidth`; 0, the default: no such budget).
    pub node_max_bandwidth: u64,
    /// Longest credential lifetime `POST /ice-servers` mints (`ice-servers-max-ttl`, default
    /// 86,400 s).
    pub ice_servers_max_ttl: Duration,
    /// The nonce secret shared by the fleet: a file of 64 hex digits (`nonce-secret-file`);
    /// without it, taken from `fleet-redis`, or this node's own (docs/credentials.md).
    pub nonce_secret_file: Option<PathBuf>,
    /// How long a node's share of the fleet's user quotas outlives its last lease refresh
    /// (`quota-lease`, seconds, default 10, at least 1): a crashed node's allocations stop
    /// counting after it.
    pub quota_lease: Duration,
    /// `external-ip = "auto"`: `external_ips` comes from asking `external_ip_stun` for each
    /// relay IP (crate::discovery), at start and on SIGHUP.
    pub external_ip_auto: bool,
    /// The STUN server (`host:port`) of `external-ip = "auto"`.
    pub external_ip_stun: Option<String>,
}

/// Where usage records go (docs/operations.md, "Usage records").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageSettings {
    /// JSON-lines file records are appended to (`usage-file`; `None`: no file).
    pub file: Option<PathBuf>,
    /// Seconds between interim records of a live allocation (`usage-interval`; 0: final only).
    pub interval_s: u64,
    /// Stream key in `fleet-redis` (`usage-stream`, default `uturn:usage`; empty: no stream).
    pub stream: String,
    /// Entries the stream keeps, approximately (`usage-stream-maxlen`, `XADD … MAXLEN ~`;
    /// default 1,000,000).
    pub stream_maxlen: u64,
}

/// Default `unauth-rate`, requests/s per source: 500 clients behind one NAT address that each
/// send a Binding, a 401-round Allocate and the signed Allocate within one second (1,500
/// requests) stay inside it with room for uneven spreading over the workers, while a spoofed
/// victim gets at most this many answers a second (docs/security.md).
pub const DEFAULT_UNAUTH_RATE: u32 = 2000;

/// The host name from `/proc/sys/kernel/hostname`, or `uturn` when it cannot be read: the
/// default `node-id`.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "uturn".to_owned())
}

/// The embedded default's demo credential.
pub const DEMO_USER: (&str, &str) = ("demo", "demo");

impl Config {
    /// The embedded default, merged with the file named by `--config` and with the flags.
    pub fn load(cli: &Cli) -> Result<Config> {
        let file = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                toml::from_str::<FileConfig>(&text).with_context(|| format!("parsing {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        Self::merge(file, cli)
    }

    fn merge(f: FileConfig, cli: &Cli) -> Result<Config> {
        let listen = if !cli.listen.is_empty() {
            cli.listen.clone()
        } else {
            f.listen.unwrap_or_else(|| vec!["127.0.0.1:3478".parse().unwrap()])
        };
        let relay_ips: Vec<IpAddr> = if !cli.relay_ip.is_empty() {
            cli.relay_ip.clone()
        } else if let Some(v) = f.relay_ip {
            v.into_vec()
                .iter()
                .map(|s| s.parse().with_context(|| format!("relay-ip {s:?}: not an IP address")))
                .collect::<Result<_>>()?
        } else {
            vec![listen.first().map_or(IpAddr::from([127, 0, 0, 1]), |l| l.addr.ip())]
        };
        let d = StreamLimits::default();
        let stream_limits = StreamLimits {
            max_connections: f.max_connections.unwrap_or(d.max_connections),
            max_per_source: f.max_connections_per_ip.unwrap_or(d.max_per_source),
            connection_rate: f.connections_per_second_per_ip.unwrap_or(d.connection_rate),
            handshake_timeout: f.tls_handshake_timeout.map_or(d.handshake_timeout, Duration::from_secs),
            frame_timeout: f.stream_frame_timeout.map_or(d.frame_timeout, Duration::from_secs),
            idle_timeout: f.stream_idle_timeout.map_or(d.idle_timeout, Duration::from_secs),
            write_queue: f.stream_write_queue.unwrap_or(d.write_queue),
            stall_timeout: f.stream_stall_timeout.map_or(d.stall_timeout, Duration::from_secs),
        };
        // A flag (or its environment variable) or its -file replaces the config file's key and
        // its -file; one of each pair at most (crate::secrets).
        let secrets_of = |what: &str, v: Vec<String>, file: Option<&std::path::Path>| -> Result<Vec<String>> {
            match (v.is_empty(), file) {
                (false, Some(_)) => bail!("give {what} or {what}-file, not both"),
                (true, Some(p)) => crate::secrets::read_lines(p).with_context(|| format!("{what}-file")),
                (_, None) => Ok(v),
            }
        };
        let mut secrets =
            secrets_of("--static-auth-secret", cli.static_auth_secret.clone(), cli.static_auth_secret_file.as_deref())?;
        if secrets.is_empty() {
            let keyed = f.static_auth_secret.map(OneOrMany::into_vec).unwrap_or_default();
            secrets = secrets_of("static-auth-secret", keyed, f.static_auth_secret_file.as_deref())?;
        }
        let user_store = match cli.user_store.clone().or(f.user_store) {
            Some(u) => Some(u.parse::<StoreUrl>().map_err(|e| anyhow::anyhow!("user-store: {e}"))?),
            None => None,
        };
        // The demo credential only when nothing else authenticates anyone.
        let demo = secrets.is_empty() && user_store.is_none();
        let mut file_users = f.users;
        if let Some(p) = &f.users_file {
            let listed = crate::secrets::read_users(p).context("users-file")?;
            let table = file_users.get_or_insert_with(BTreeMap::new);
            for (name, pass) in listed {
                if table.insert(name.clone(), pass).is_some() {
                    bail!("user {name:?} is in both [users] and users-file");
                }
            }
        }
        let mut users = file_users.unwrap_or_else(|| {
            if demo {
                BTreeMap::from([(DEMO_USER.0.into(), DEMO_USER.1.into())])
            } else {
                BTreeMap::new()
            }
        });
        if !cli.user.is_empty() || cli.users_file.is_some() {
            users.clear();
            for u in &cli.user {
                // The text after ':' is a password: never in a message.
                let name = u.split_once(':').map(|(n, _)| n);
                let (name, pass) = u
                    .split_once(':')
                    .with_context(|| format!("--user {:?}: expected NAME:PASSWORD", name.unwrap_or("<no ':'>")))?;
                users.insert(name.into(), pass.into());
            }
            if let Some(p) = &cli.users_file {
                for (name, pass) in crate::secrets::read_users(p).context("--users-file")? {
                    if users.insert(name.clone(), pass).is_some() {
                        bail!("user {name:?} is in both --user and --users-file");
                    }
                }
            }
        }
        let workers = match cli.workers.or(f.workers).unwrap_or(0) {
            0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            n => n,
        };
        let range = cli.port_range.clone().or(f.port_range).unwrap_or_else(|| "49152-65535".into());
        let port_range = parse_range(&range)?;
        let io_backend = match cli.io_backend.clone().or(f.io_backend).as_deref().unwrap_or("auto") {
            "auto" => BackendChoice::Auto,
            "uring" | "io_uring" | "io-uring" => BackendChoice::Uring,
            "epoll" => BackendChoice::Epoll,
            other => bail!("io-backend {other:?}: expected auto, uring or epoll"),
        };
        let secs = |v: Option<u64>, d: u64| Duration::from_secs(v.unwrap_or(d));
        let mut allow_peer = f.allow_peer.unwrap_or_default();
        allow_peer.extend(cli.allow_peer.iter().copied());
        let mut deny_peer = f.deny_peer.unwrap_or_default();
        deny_peer.extend(cli.deny_peer.iter().copied());
        let external = if cli.external_ip.is_empty() {
            f.external_ip.map(OneOrMany::into_vec).unwrap_or_default()
        } else {
            cli.external_ip.clone()
        };
        // `auto` stands alone: the discovered addresses replace every entry (crate::discovery).
        let external_ip_auto = external.iter().any(|e| e == "auto");
        if external_ip_auto && external.len() > 1 {
            bail!("external-ip = \"auto\" must be the only external-ip entry");
        }
        let c = Config {
            relay_ips: relay_ips.clone(),
            external_ips: if external_ip_auto { Vec::new() } else { parse_external(&external, &relay_ips)? },
            listen,
            tls_cert: cli.tls_cert.clone().or(f.tls_cert),
            tls_key: cli.tls_key.clone().or(f.tls_key),
            stream_limits,
            credentials: CredentialConfig {
                realm: cli.realm.clone().or(f.realm).unwrap_or_else(|| "uturn.local".into()),
                realms: f.realms.unwrap_or_default(),
                users,
                secrets,
                separator: cli.rest_separator.or(f.rest_separator).unwrap_or(':'),
                strict_expiry: cli.strict_expiry || f.strict_expiry.unwrap_or(false),
                store: user_store,
                cache_ttl: secs(f.user_cache_ttl, 60),
                negative_ttl: secs(f.user_cache_negative_ttl, 5),
                cache_size: f.user_cache_size.unwrap_or(100_000),
                cache_bytes: f.user_cache_bytes.unwrap_or(64 << 20),
                negative_cache_size: f.user_cache_negative_size.unwrap_or(10_000),
                stale_ttl: secs(f.user_cache_stale_ttl, 86_400),
                store_threads: f.store_threads.unwrap_or(2).max(1),
            },
            password_algorithms: parse_algorithms(f.password_algorithms.as_deref())?,
            admin_listen: cli.admin_listen.or(f.admin_listen),
            admin_token: match crate::secrets::one_of(
                "--admin-token",
                cli.admin_token.clone(),
                cli.admin_token_file.as_deref(),
            )? {
                Some(t) => Some(t),
                None => crate::secrets::one_of("admin-token", f.admin_token, f.admin_token_file.as_deref())?,
            },
            metrics_listen: cli.metrics_listen.or(f.metrics_listen),
            metrics_allow_remote: cli.metrics_allow_remote || f.metrics_allow_remote.unwrap_or(false),
            log_json: match cli.log_format.clone().or(f.log_format).as_deref().unwrap_or("text") {
                "text" => false,
                "json" => true,
                other => bail!("log-format {other:?}: expected text or json"),
            },
            alternate_server: if cli.alternate_server.is_empty() {
                let listed = f.alternate_server.map(OneOrMany::into_vec).unwrap_or_default();
                listed
                    .iter()
                    .map(|a| a.parse().with_context(|| format!("alternate-server {a:?}: expected IP:PORT")))
                    .collect::<Result<_>>()?
            } else {
                cli.alternate_server.clone()
            },
            drain_timeout: secs(cli.drain_timeout.or(f.drain_timeout), 3600),
            reuseport_cpu: cli.reuseport_cpu || f.reuseport_cpu.unwrap_or(false),
            xdp: cli.xdp.clone().or(f.xdp).as_deref().unwrap_or("off").parse().map_err(anyhow::Error::msg)?,
            xdp_interfaces: if cli.xdp_interfaces.is_empty() {
                f.xdp_interfaces.unwrap_or_default()
            } else {
                cli.xdp_interfaces.clone()
            },
            xdp_routes: f.xdp_routes.unwrap_or(65_536),
            workers,
            port_range,
            io_backend,
            allow_peer,
            deny_peer,
            log_level: cli.log_level.clone().or(f.log_level).unwrap_or_else(|| "info".into()),
            default_lifetime: secs(f.default_lifetime, 600),
            max_lifetime: secs(f.max_lifetime, 3600),
            permission_lifetime: secs(f.permission_lifetime, 300),
            channel_lifetime: secs(f.channel_lifetime, 600),
            nonce_lifetime: secs(f.nonce_lifetime, 600),
            user_quota: f.user_quota.unwrap_or(0),
            total_quota: f.total_quota.unwrap_or(0),
            rfc5766_channels: cli.rfc5766_channels || f.rfc5766_channels.unwrap_or(false),
            max_permissions: f.max_permissions.unwrap_or(128),
            max_channels: f.max_channels.unwrap_or(128),
            max_bandwidth: f.max_bandwidth.unwrap_or(0),
            unauth_rate: f.unauth_rate.unwrap_or(DEFAULT_UNAUTH_RATE),
            max_peer_connections_per_user: f.max_peer_connections_per_user.unwrap_or(1024),
            fleet_redis: cli.fleet_redis.clone().or(f.fleet_redis),
            node_id: cli.node_id.clone().or(f.node_id).unwrap_or_else(host_name),
            proxy: ProxyProtocol {
                streams: cli.proxy_protocol || f.proxy_protocol.unwrap_or(false),
                datagrams: cli.proxy_protocol_udp || f.proxy_protocol_udp.unwrap_or(false),
                trusted: if cli.proxy_trusted.is_empty() {
                    f.proxy_trusted.unwrap_or_default()
                } else {
                    cli.proxy_trusted.clone()
                },
            },
            usage: UsageSettings {
                file: cli.usage_file.clone().or(f.usage_file),
                interval_s: cli.usage_interval.or(f.usage_interval).unwrap_or(0),
                stream: f.usage_stream.unwrap_or_else(|| crate::usage::DEFAULT_STREAM.into()),
                stream_maxlen: f.usage_stream_maxlen.unwrap_or(crate::usage::DEFAULT_MAXLEN).max(1),
            },
            region: cli.region.clone().or(f.region),
            node_max_bandwidth: f.node_max_bandwidth.unwrap_or(0),
            ice_servers_max_ttl: secs(f.ice_servers_max_ttl, 86_400),
            nonce_secret_file: cli.nonce_secret_file.clone().or(f.nonce_secret_file),
            quota_lease: Duration::from_secs(f.quota_lease.unwrap_or(crate::fleet::quota::DEFAULT_LEASE_SECS).max(1)),
            external_ip_auto,
            external_ip_stun: cli.external_ip_stun.clone().or(f.external_ip_stun),
        };
        c.validate()?;
        Ok(c)
    }

    /// True when the only user is the publicly known demo credential and everything listens on
    /// loopback: the one case where printing a password reveals nothing.
    pub fn is_loopback_demo(&self) -> bool {
        self.credentials.users.len() == 1 && self.has_demo_user() && !self.serves_beyond_loopback()
    }

    fn has_demo_user(&self) -> bool {
        self.credentials.users.get(DEMO_USER.0).is_some_and(|p| p == DEMO_USER.1)
    }

    /// True when a listen address or the relay address is not loopback.
    fn serves_beyond_loopback(&self) -> bool {
        self.listen.iter().map(|a| a.addr.ip()).chain(self.relay_ips.iter().copied()).any(|ip| !ip.is_loopback())
    }

    /// The UDP listen addresses.
    pub fn udp_listen(&self) -> Vec<SocketAddr> {
        self.listen.iter().filter(|l| l.transport == Transport::Udp).map(|l| l.addr).collect()
    }

    /// The TCP and TLS listen addresses.
    pub fn stream_listen(&self) -> Vec<ListenAddr> {
        self.listen.iter().filter(|l| l.transport != Transport::Udp).copied().collect()
    }

    fn validate(&self) -> Result<()> {
        if self.listen.is_empty() {
            bail!("no listen address");
        }
        for (i, l) in self.listen.iter().enumerate() {
            if self.listen[..i].iter().any(|o| o.addr == l.addr && o.transport.is_stream() == l.transport.is_stream()) {
                bail!("listen address {l} given twice");
            }
        }
        let tls = self.listen.iter().any(|l| l.transport == Transport::Tls);
        if tls && (self.tls_cert.is_none() || self.tls_key.is_none()) {
            bail!("tls:// listen addresses need tls-cert and tls-key (PEM files)");
        }
        let l = &self.stream_limits;
        if l.max_connections == 0 || l.max_per_source == 0 || l.write_queue < 4096 {
            bail!("max-connections and max-connections-per-ip must be positive, stream-write-queue at least 4096");
        }
        if self.credentials.users.is_empty() && self.credentials.secrets.is_empty() && self.credentials.store.is_none()
        {
            bail!("no credentials: add --user NAME:PASSWORD, a [users] table, --static-auth-secret or --user-store");
        }
        if self.credentials.secrets.iter().any(String::is_empty) {
            bail!("static-auth-secret must not be empty");
        }
        if self.admin_listen.is_some_and(|a| !a.ip().is_loopback()) && self.admin_token.is_none() {
            bail!("admin-listen off loopback needs admin-token");
        }
        if self.metrics_listen.is_some_and(|a| !a.ip().is_loopback()) && !self.metrics_allow_remote {
            bail!("metrics-listen off loopback needs metrics-allow-remote (the endpoint has no authentication)");
        }
        if self.credentials.separator.is_ascii_digit() {
            bail!("rest-separator must not be a digit");
        }
        if let Some(ip) = self.relay_ips.iter().find(|ip| ip.is_unspecified()) {
            bail!("relay-ip must be a concrete address clients can reach, not {ip}");
        }
        if self.relay_ips.is_empty() {
            bail!("no relay-ip");
        }
        if self.xdp != XdpMode::Off {
            // The program rewrites datagrams to come from the address the client sent to.
            if let Some(a) = self.listen.iter().find(|a| a.addr.ip().is_unspecified()) {
                bail!("xdp needs concrete listen addresses, not {a}");
            }
            if self.xdp_routes == 0 {
                bail!("xdp-routes must be positive");
            }
        }
        if self.default_lifetime.is_zero() || self.max_lifetime < self.default_lifetime {
            bail!("need 0 < default-lifetime <= max-lifetime");
        }
        if self.permission_lifetime.is_zero() || self.channel_lifetime.is_zero() || self.nonce_lifetime.is_zero() {
            bail!("permission-lifetime, channel-lifetime and nonce-lifetime must be positive");
        }
        if self.max_peer_connections_per_user == 0 {
            bail!("max-peer-connections-per-user must be positive");
        }
        if self.external_ip_auto && self.external_ip_stun.is_none() {
            bail!("external-ip = \"auto\" needs external-ip-stun = \"HOST:PORT\", the STUN server to ask");
        }
        self.check_ports_outside_relay_range()?;
        if (self.proxy.streams || self.proxy.datagrams) && self.proxy.trusted.is_empty() {
            bail!("proxy-protocol and proxy-protocol-udp need proxy-trusted: the load balancers' networks");
        }
        if self.proxy.datagrams && self.xdp != XdpMode::Off {
            bail!("proxy-protocol-udp cannot run with xdp: the XDP fast path sends ChannelData to the client's own address, not through its balancer");
        }
        // Refuse the publicly known demo credential anywhere but loopback.
        if self.has_demo_user() && self.serves_beyond_loopback() {
            bail!("refusing to serve the demo credential (demo:demo) on a non-loopback address: set users with --user or [users]");
        }
        Ok(())
    }
}

impl Config {
    /// Refuses a TCP listener of the relay's own on a port of `port-range` at an IP that a relay
    /// address shares: a `tcp://` or `tls://` listen address, `admin-listen` or
    /// `metrics-listen`. A TCP allocation's relayed transport address is bound with
    /// SO_REUSEPORT (its Connects leave from it), so on such a port it would join the client
    /// listeners' group and take other clients' connections (docs/security.md). Checked at
    /// start and on SIGHUP (a refused file keeps the running configuration).
    fn check_ports_outside_relay_range(&self) -> Result<()> {
        let (lo, hi) = self.port_range;
        let stream = self.stream_listen().into_iter().map(|l| (l.to_string(), l.addr));
        let admin = self.admin_listen.map(|a| ("admin-listen".to_string(), a));
        let metrics = self.metrics_listen.map(|a| ("metrics-listen".to_string(), a));
        for (what, addr) in stream.chain(admin).chain(metrics) {
            let shared = addr.ip().is_unspecified()
                || self.relay_ips.iter().any(|ip| crate::policy::normalize(*ip) == crate::policy::normalize(addr.ip()));
            if shared && (lo..=hi).contains(&addr.port()) {
                bail!(
                    "{what}: port {} is inside port-range {lo}-{hi}, where TCP allocations bind their relayed \
                     addresses; move the listener or the range",
                    addr.port()
                );
            }
        }
        Ok(())
    }

    /// Keys SIGHUP does not reload, each with whether `new` differs from `self` in it.
    pub fn restart_only_changes(&self, new: &Config) -> Vec<(&'static str, bool)> {
        vec![
            ("listen", self.listen != new.listen),
            ("relay-ip", self.relay_ips != new.relay_ips),
            // With `external-ip = "auto"` SIGHUP applies the newly discovered addresses.
            ("external-ip", self.external_ip_auto != new.external_ip_auto || (!new.external_ip_auto && self.external_ips != new.external_ips)),
            // The certificate files at these paths are re-read on SIGHUP; the paths are not.
            ("tls-cert / tls-key paths", self.tls_cert != new.tls_cert || self.tls_key != new.tls_key),
            (
                "max-connections, max-connections-per-ip, connections-per-second-per-ip, tls-handshake-timeout, stream-*",
                format!("{:?}", self.stream_limits) != format!("{:?}", new.stream_limits),
            ),
            ("realm", self.credentials.realm != new.credentials.realm),
            ("workers", self.workers != new.workers),
            ("port-range", self.port_range != new.port_range),
            ("user-store", self.credentials.store != new.credentials.store),
            ("password-algorithms", self.password_algorithms != new.password_algorithms),
            ("nonce-lifetime", self.nonce_lifetime != new.nonce_lifetime),
            (
                "fleet-redis, node-id, nonce-secret-file, quota-lease",
                self.fleet_redis != new.fleet_redis
                    || self.node_id != new.node_id
                    || self.nonce_secret_file != new.nonce_secret_file
                    || self.quota_lease != new.quota_lease,
            ),
            ("unauth-rate", self.unauth_rate != new.unauth_rate),
            ("max-peer-connections-per-user", self.max_peer_connections_per_user != new.max_peer_connections_per_user),
            (
                "xdp",
                self.xdp != new.xdp || self.xdp_interfaces != new.xdp_interfaces || self.xdp_routes != new.xdp_routes,
            ),            (
                "fleet-redis, node-id, region, node-max-bandwidth, alternate-server, ice-servers-max-ttl",
                self.fleet_redis != new.fleet_redis
                    || self.node_id != new.node_id
                    || self.region != new.region
                    || self.node_max_bandwidth != new.node_max_bandwidth
                    || self.alternate_server != new.alternate_server
                    || self.ice_servers_max_ttl != new.ice_servers_max_ttl,
            ),
            ("proxy-protocol, proxy-protocol-udp, proxy-trusted", self.proxy != new.proxy),
            ("usage-*", self.usage != new.usage),
        ]
    }
}

/// `external-ip` entries: `PUBLIC/PRIVATE`, or `PUBLIC` alone for the only relay address of
/// its family. The private address must be a relay address.
fn parse_external(entries: &[String], relay_ips: &[IpAddr]) -> Result<Vec<(IpAddr, IpAddr)>> {
    let mut out = Vec::new();
    for e in entries {
        let (public, private) = match e.split_once('/') {
            Some((p, q)) => (p, Some(q)),
            None => (e.as_str(), None),
        };
        let public: IpAddr = public.parse().with_context(|| format!("external-ip {e:?}: bad public address"))?;
        let private: IpAddr = match private {
            Some(q) => q.parse().with_context(|| format!("external-ip {e:?}: bad private address"))?,
            None => {
                let same: Vec<&IpAddr> = relay_ips.iter().filter(|ip| ip.is_ipv4() == public.is_ipv4()).collect();
                match same.as_slice() {
                    [only] => **only,
                    _ => bail!("external-ip {e:?}: name the private relay address (PUBLIC/PRIVATE)"),
                }
            }
        };
        if !relay_ips.contains(&private) {
            bail!("external-ip {e:?}: {private} is not a relay-ip");
        }
        out.push((private, public));
    }
    Ok(out)
}

fn parse_algorithms(names: Option<&[String]>) -> Result<Vec<PasswordAlgorithm>> {
    let Some(names) = names else { return Ok(vec![PasswordAlgorithm::Sha256, PasswordAlgorithm::Md5]) };
    let mut out = Vec::new();
    for n in names {
        let a = match n.to_ascii_lowercase().as_str() {
            "md5" => PasswordAlgorithm::Md5,
            "sha256" | "sha-256" => PasswordAlgorithm::Sha256,
            other => bail!("password-algorithms: {other:?} is not md5 or sha256"),
        };
        if !out.contains(&a) {
            out.push(a);
        }
    }
    if out.is_empty() {
        bail!("password-algorithms must name at least one algorithm");
    }
    Ok(out)
}

fn parse_range(s: &str) -> Result<(u16, u16)> {
    let (lo, hi) = s.split_once('-').with_context(|| format!("port range {s:?}: expected LO-HI"))?;
    let (lo, hi): (u16, u16) = (lo.trim().parse()?, hi.trim().parse()?);
    if lo == 0 || lo > hi {
        bail!("port range {s:?}: need 0 < LO <= HI");
    }
    Ok((lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_serves_loopback() {
        let c = Config::load(&Cli::default()).unwrap();
        assert_eq!(c.udp_listen(), vec!["127.0.0.1:3478".parse::<SocketAddr>().unwrap()]);
        assert!(c.stream_listen().is_empty());
        assert_eq!(c.relay_ips, vec!["127.0.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(c.credentials.realm, "uturn.local");
        assert_eq!(c.credentials.users.get("demo").map(String::as_str), Some("demo"));
        assert_eq!(c.port_range, (49152, 65535));
        assert!(c.workers >= 1);
        assert!(c.is_loopback_demo());
        assert_eq!(c.unauth_rate, DEFAULT_UNAUTH_RATE);
    }

    #[test]
    fn listen_urls_and_tls_files() {
        let f: FileConfig =
            toml::from_str("listen = [\"127.0.0.1:3478\", \"tcp://127.0.0.1:3478\", \"tls://127.0.0.1:5349\"]\n")
                .unwrap();
        let err = Config::merge(f, &Cli::default()).unwrap_err().to_string();
        assert!(err.contains("tls-cert"), "{err}");
        let f: FileConfig = toml::from_str(
            "listen = [\"127.0.0.1:3478\", \"tcp://127.0.0.1:3478\", \"tls://127.0.0.1:5349\"]\n\
             tls-cert = \"/c.pem\"\ntls-key = \"/k.pem\"\nmax-connections-per-ip = 4\n",
        )
        .unwrap();
        let c = Config::merge(f, &Cli::default()).unwrap();
        assert_eq!(c.udp_listen().len(), 1);
        assert_eq!(c.stream_listen().len(), 2);
        assert_eq!(c.stream_limits.max_per_source, 4);
        let f: FileConfig = toml::from_str("listen = [\"tcp://127.0.0.1:1\", \"tcp://127.0.0.1:1\"]\n").unwrap();
        assert!(Config::merge(f, &Cli::default()).is_err());
        assert!(toml::from_str::<FileConfig>("listen = [\"sctp://127.0.0.1:1\"]\n").is_err());
    }

    #[test]
    fn demo_credential_refused_off_loopback() {
        let cli = Cli {
            listen: vec!["0.0.0.0:3478".parse().unwrap()],
            relay_ip: vec!["192.0.2.1".parse().unwrap()],
            ..Cli::default()
        };
        assert!(Config::load(&cli).unwrap_err().to_string().contains("demo"));
        let cli = Cli { user: vec!["alice:secret".into()], ..cli };
        assert!(!Config::load(&cli).unwrap().is_loopback_demo());
    }

    #[test]
    fn metrics_off_loopback_needs_the_opt_in() {
        let cli = Cli { metrics_listen: Some("0.0.0.0:9478".parse().unwrap()), ..Cli::default() };
        assert!(Config::load(&cli).unwrap_err().to_string().contains("metrics-allow-remote"));
        assert!(Config::load(&Cli { metrics_allow_remote: true, ..cli }).is_ok());
        let f: FileConfig = toml::from_str("metrics-listen = \"0.0.0.0:9478\"\nmetrics-allow-remote = true\n").unwrap();
        assert!(Config::merge(f, &Cli::default()).is_ok());
        let on_loopback = Cli { metrics_listen: Some("127.0.0.1:9478".parse().unwrap()), ..Cli::default() };
        assert!(Config::load(&on_loopback).is_ok());
    }

    #[test]
    fn file_then_flags() {
        let f: FileConfig = toml::from_str(
            "realm = \"example.org\"\nworkers = 3\nport-range = \"50000-50100\"\nmax-lifetime = 60\ndefault-lifetime = 30\n[users]\nbob = \"pw\"\n",
        )
        .unwrap();
        let cli = Cli { workers: Some(2), ..Cli::default() };
        let c = Config::merge(f, &cli).unwrap();
        assert_eq!((c.credentials.realm.as_str(), c.workers, c.port_range), ("example.org", 2, (50000, 50100)));
        assert_eq!(c.max_lifetime, Duration::from_secs(60));
        assert!(c.credentials.users.contains_key("bob") && !c.credentials.users.contains_key("demo"));
        assert!(toml::from_str::<FileConfig>("bogus = 1").is_err());
        assert!(parse_range("5-1").is_err());
    }

    #[test]
    fn listeners_inside_the_relay_port_range_are_refused() {
        let load = |toml_text: &str| {
            let f: FileConfig = toml::from_str(toml_text).unwrap();
            Config::merge(f, &Cli::default())
        };
        let base = "port-range = \"50000-50100\"\nrelay-ip = \"127.0.0.1\"\n";
        for (listen, what) in [
            ("listen = [\"127.0.0.1:3478\", \"tcp://127.0.0.1:50050\"]\n", "tcp://127.0.0.1:50050"),
            ("listen = [\"127.0.0.1:3478\", \"tcp://0.0.0.0:50000\"]\n", "tcp://0.0.0.0:50000"),
            ("listen = [\"127.0.0.1:3478\"]\nadmin-listen = \"127.0.0.1:50100\"\n", "admin-listen"),
            ("listen = [\"127.0.0.1:3478\"]\nmetrics-listen = \"127.0.0.1:50001\"\n", "metrics-listen"),
        ] {
            let err = load(&format!("{base}{listen}")).err().unwrap_or_else(|| panic!("{listen} accepted"));
            let msg = format!("{err:#}");
            assert!(msg.contains(what) && msg.contains("port-range 50000-50100"), "{msg}");
        }
        // Outside the range, or on an IP no relay address shares: fine.
        load(&format!("{base}listen = [\"127.0.0.1:3478\", \"tcp://127.0.0.1:50101\"]\n")).unwrap();
        load(&format!("{base}listen = [\"127.0.0.1:3478\", \"tcp://127.0.0.2:50050\"]\n")).unwrap();
        // UDP listen ports in the range do not share a group with TCP relayed addresses.
        load(&format!("{base}listen = [\"127.0.0.1:50050\"]\n")).unwrap();
    }

    #[test]
    fn example_config_parses_with_every_commented_key_enabled() {
        let text = include_str!("../../docs/uturn.example.toml");
        toml::from_str::<FileConfig>(text).unwrap();
        // Uncomment `# key = value` lines: every documented key must exist and its example parse.
        let enabled: String = text
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest)
                    if rest
                        .split_once(" = ")
                        .is_some_and(|(k, _)| k.chars().all(|c| c.is_ascii_lowercase() || c == '-')) =>
                {
                    rest
                }
                _ => l,
            })
            .map(|l| format!("{l}\n"))
            .collect();
        toml::from_str::<FileConfig>(&enabled).unwrap_or_else(|e| panic!("{e}\n{enabled}"));
        // The `*-file` keys name files that do not exist here, and each is the alternative of
        // a key given too: parsed above, left out of the merge.
        let no_files: String = enabled.lines().filter(|l| !l.contains("-file = ")).map(|l| format!("{l}\n")).collect();
        let f: FileConfig = toml::from_str(&no_files).unwrap_or_else(|e| panic!("{e}\n{no_files}"));
        let c = Config::merge(f, &Cli::default()).unwrap();
        assert_eq!(c.credentials.secrets, ["new-secret", "old-secret"]);
        assert!(c.credentials.store.is_some() && c.admin_listen.is_some());
        assert_eq!(c.password_algorithms, [PasswordAlgorithm::Sha256, PasswordAlgorithm::Md5]);
    }

    #[test]
    fn credential_keys_and_the_demo_default() {
        // A secret alone: no demo user.
        let f: FileConfig = toml::from_str("static-auth-secret = \"s\"\n").unwrap();
        let c = Config::merge(f, &Cli::default()).unwrap();
        assert!(c.credentials.users.is_empty() && c.credentials.secrets == ["s"]);
        let f: FileConfig = toml::from_str("password-algorithms = [\"sha1\"]\n").unwrap();
        assert!(Config::merge(f, &Cli::default()).is_err());
        let f: FileConfig = toml::from_str("admin-listen = \"0.0.0.0:3480\"\n").unwrap();
        assert!(Config::merge(f, &Cli::default()).unwrap_err().to_string().contains("admin-token"));
        let cli = Cli { user_store: Some("mysql://x".into()), ..Cli::default() };
        assert!(Config::load(&cli).is_err());
    }
}
