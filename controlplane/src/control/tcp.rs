//! TCP allocations in the control plane (RFC 6062): Allocate with REQUESTED-TRANSPORT TCP,
//! Connect and ConnectionBind after authentication, and what the TCP relay must hear of
//! permissions and ends. The relay ([`crate::tcp_relay`]) does the connection work and answers
//! Connect and ConnectionBind itself.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::info;
use uturn_dataplane::ToWorker;
use uturn_proto::relay::Install;
use uturn_proto::response::ErrorCode;
use uturn_proto::wire::{attr, IntegrityKey, Message};
use uturn_proto::{FiveTuple, Transport};

use super::{ControlPlane, Granted, Owner};
use crate::tcp_relay::{self, TcpCommand, TcpRelay};

/// The TCP relay and the relayed transport addresses its listeners hold (never bound twice:
/// the listeners share their address with outgoing connections through SO_REUSEPORT, so the
/// kernel would not refuse a second one).
pub(super) struct TcpAllocations {
    relay: TcpRelay,
    ports: HashSet<SocketAddr>,
    /// Ports of the `tcp://` and `tls://` listen addresses: never a relayed transport address,
    /// whose SO_REUSEPORT would join the client listeners' group and take their connections
    /// (the configuration refuses such a port range; this holds whatever the range).
    listen_ports: HashSet<u16>,
}

/// True when DONT-FRAGMENT is the only unknown comprehension-required attribute of a TCP
/// Allocate: RFC 6062 §5.1 answers it with 400 (in `check_allocate`), not 420.
pub(super) fn dont_fragment_only(msg: &Message<'_>) -> bool {
    let tcp = msg.get(attr::REQUESTED_TRANSPORT).is_some_and(|t| t.first() == Some(&attr::TRANSPORT_TCP));
    tcp && msg.unknown_required().iter().all(|&t| t == attr::DONT_FRAGMENT)
}

impl ControlPlane {
    /// Serves TCP allocations through `relay` (without it, REQUESTED-TRANSPORT TCP earns 442);
    /// `listen_ports` are the ports of the client-facing TCP and TLS listeners, which a relayed
    /// transport address never takes.
    pub fn set_tcp_relay(&mut self, relay: TcpRelay, listen_ports: HashSet<u16>) {
        self.tcp = Some(TcpAllocations { relay, ports: HashSet::new(), listen_ports });
    }

    /// A worker reported that data connection pair `connection_id` closed.
    pub fn tcp_data_closed(&self, connection_id: u32) {
        if let Some(t) = &self.tcp {
            t.relay.send(TcpCommand::DataClosed { connection_id });
        }
    }

    /// Allocate with REQUESTED-TRANSPORT TCP, checked (RFC 6062 §5.1): a listener on a relay
    /// port for the relay, the allocation for the worker.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn allocate_tcp(
        &mut self,
        now: Instant,
        worker: usize,
        ft: FiveTuple,
        msg: &Message<'_>,
        granted: Granted,
        lifetime: Duration,
        v6: bool,
    ) -> Option<ToWorker> {
        let Granted { user, key, .. } = granted;
        let listener = match self.tcp_listener(worker, v6) {
            Ok(Some(l)) => l,
            Ok(None) => return Some(self.not_bound(worker, ft, msg, &key, None)),
            Err(e) => return Some(self.not_bound(worker, ft, msg, &key, Some(e))),
        };
        let relayed = listener.local_addr().ok()?;
        let advertised = self.advertised(relayed);
        let bytes = self.allocate_success(msg, &ft, &advertised, None, None, lifetime, None, &key);
        let session = self.next_session;
        self.next_session += 1;
        let tid = msg.transaction_id();
        let owner = Owner {
            user: user.clone(),
            tid,
            expires: now + lifetime,
            worker,
            session,
            v6: relayed.is_ipv6(),
            dual: false,
            tcp: Some(Box::new(relayed)),
            started_ms: crate::usage::now_ms(),
        };
        self.record_grant(ft, owner);
        let tcp = self.tcp.as_mut()?;
        tcp.ports.insert(relayed);
        let listen = TcpCommand::Listen { five_tuple: ft, worker, session, user: user.clone(), listener };
        tcp.relay.send(listen);
        info!(
            session,
            worker,
            client = %ft.client,
            server = %ft.server,
            %user,
            transport = %ft.transport,
            relayed = %advertised,
            relayed_transport = "tcp",
            lifetime_s = lifetime.as_secs(),
            "allocation granted"
        );
        Some(ToWorker::InstallTcp(Install {
            five_tuple: ft,
            tid,
            relayed,
            additional: None,
            lifetime,
            response: bytes.into(),
            key,
            session,
            user,
        }))
    }

    /// A listener on a free relay port of a relay address of the family: the addresses in
    /// turn, the worker's port slice first (as for UDP relay sockets).
    fn tcp_listener(&mut self, worker: usize, v6: bool) -> std::io::Result<Option<TcpListener>> {
        let Some(tcp) = self.tcp.as_ref() else { return Ok(None) };
        let (held, listen_ports) = (&tcp.ports, &tcp.listen_ports);
        let ips: Vec<IpAddr> = self.policy.relay_ips.iter().copied().filter(|ip| ip.is_ipv6() == v6).collect();
        let first = self.next_relay_ip;
        self.next_relay_ip = self.next_relay_ip.wrapping_add(1);
        let n = self.ports.len();
        for j in 0..ips.len() {
            let ip = ips[(first + j) % ips.len()];
            for k in 0..n {
                let slice = &mut self.ports[(worker + k) % n];
                let bound = slice.bind_with(ip, false, |addr| {
                    if held.contains(&addr) || listen_ports.contains(&addr.port()) {
                        return Err(std::io::ErrorKind::AddrInUse.into());
                    }
                    tcp_relay::bind_listener(addr)
                })?;
                if bound.is_some() {
                    return Ok(bound);
                }
            }
        }
        Ok(None)
    }

    /// Connect on allocation `ft`, authenticated (RFC 6062 §5.2): a TCP allocation and an
    /// allowed XOR-PEER-ADDRESS (400, 443, 403), then the relay connects and answers.
    pub(super) fn connect(&self, ft: FiveTuple, msg: &Message<'_>, key: IntegrityKey) -> Result<(), ErrorCode> {
        let tcp = self.tcp.as_ref().ok_or(ErrorCode::BadRequest)?;
        if self.owners.get(&ft).is_none_or(|o| o.tcp.is_none()) {
            return Err(ErrorCode::BadRequest);
        }
        let peer = self.check_peer(&ft, msg.xor_address(attr::XOR_PEER_ADDRESS).ok_or(ErrorCode::BadRequest)?)?;
        tcp.relay.send(TcpCommand::Connect { five_tuple: ft, peer, tid: msg.transaction_id(), key });
        Ok(())
    }

    /// ConnectionBind on client connection `ft`, authenticated (RFC 6062 §5.4): over TCP or
    /// TLS, on a connection without an allocation, with a CONNECTION-ID (400 otherwise); the
    /// relay finds the pending connection and answers.
    pub(super) fn connection_bind(
        &mut self,
        worker: usize,
        ft: FiveTuple,
        msg: &Message<'_>,
        user: Arc<str>,
        key: IntegrityKey,
    ) -> Option<ToWorker> {
        let id = msg.get(attr::CONNECTION_ID).and_then(|v| <[u8; 4]>::try_from(v).ok()).map(u32::from_be_bytes);
        let checked = match (&self.tcp, id) {
            _ if !msg.unknown_required().is_empty() => Err(ErrorCode::UnknownAttribute),
            (Some(_), Some(id)) if ft.transport != Transport::Udp && !self.owners.contains_key(&ft) => Ok(id),
            _ => Err(ErrorCode::BadRequest),
        };
        match checked {
            Ok(connection_id) => {
                let tid = msg.transaction_id();
                let bind = TcpCommand::Bind { connection_id, user, five_tuple: ft, worker, tid, key };
                self.tcp.as_ref()?.relay.send(bind);
                None
            }
            Err(code) => {
                // The worker holds the connection in its binding state until it hears back.
                let response = self.error(msg, code, Some(&key));
                Some(ToWorker::BindFailed { five_tuple: ft, response })
            }
        }
    }

    /// CreatePermission on `ft`, checked: a TCP allocation's peers from `peers` may connect.
    pub(super) fn tcp_permit(&self, ft: &FiveTuple, peers: &[IpAddr]) {
        let (Some(tcp), Some(_)) = (&self.tcp, self.owners.get(ft).and_then(|o| o.tcp.as_deref())) else { return };
        tcp.relay.send(TcpCommand::Permit { five_tuple: *ft, peers: peers.to_vec() });
    }

    /// TCP allocation `ft` on `relayed` ended: the relay closes what it held.
    pub(super) fn tcp_released(&mut self, ft: FiveTuple, relayed: SocketAddr) {
        if let Some(tcp) = self.tcp.as_mut() {
            tcp.ports.remove(&relayed);
            tcp.relay.send(TcpCommand::Close { five_tuple: ft });
        }
    }
}
