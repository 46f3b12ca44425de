//! The 5-tuple (RFC 8656 §2): client address, server address and the transport between them.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

/// The transport a client reaches the relay over (RFC 8656 §3.1): the protocol of its 5-tuple.
/// The relayed side is UDP whatever this is.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub enum Transport {
    /// UDP: one STUN message or ChannelData per datagram.
    #[default]
    Udp,
    /// TCP: messages framed on the stream (RFC 8656 §12.5).
    Tcp,
    /// TLS over TCP (RFC 8656 §3.1, ALPN `stun.turn` per RFC 7443).
    Tls,
}

impl Transport {
    /// Lower-case name, as `listen` URLs and logs spell it.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        }
    }

    /// True for TCP and TLS, whose messages are framed on a byte stream.
    pub fn is_stream(self) -> bool {
        !matches!(self, Transport::Udp)
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A client's 5-tuple (RFC 8656 §2): its address, the server address it reached, and the
/// transport. Over TCP and TLS it names one connection (the kernel allows one connection per
/// address pair).
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FiveTuple {
    /// The client's transport address (as the server sees it, after any NAT).
    pub client: SocketAddr,
    /// The server transport address the client sends to.
    pub server: SocketAddr,
    /// The transport between them.
    #[cfg_attr(feature = "serde", serde(default))]
    pub transport: Transport,
}

impl FiveTuple {
    /// A UDP 5-tuple.
    pub fn udp(client: SocketAddr, server: SocketAddr) -> Self {
        FiveTuple { client, server, transport: Transport::Udp }
    }

    /// The client address a NONCE is bound to (RFC 8489 §9.2): the whole transport address
    /// over UDP; over TCP and TLS the IP with port 0, because one client opens several
    /// connections with the same credentials and nonce (RFC 6062 data connections: a
    /// ConnectionBind carries the nonce of the control connection).
    pub fn nonce_address(&self) -> SocketAddr {
        match self.transport {
            Transport::Udp => self.client,
            _ => SocketAddr::new(self.client.ip(), 0),
        }
    }
}

/// A listen address with its transport: `udp://IP:PORT`, `tcp://IP:PORT`, `tls://IP:PORT`, or a
/// bare `IP:PORT` (UDP). IPv6 addresses are bracketed: `tls://[::]:443`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ListenAddr {
    /// The transport served there.
    pub transport: Transport,
    /// The address bound.
    pub addr: SocketAddr,
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (transport, rest) = match s.split_once("://") {
            None => (Transport::Udp, s),
            Some(("udp", r)) => (Transport::Udp, r),
            Some(("tcp", r)) => (Transport::Tcp, r),
            Some(("tls", r)) => (Transport::Tls, r),
            Some((t, _)) => return Err(format!("unknown transport {t:?} in {s:?} (udp, tcp or tls)")),
        };
        let addr = rest.parse().map_err(|e| format!("{s:?}: {e} (expected IP:PORT)"))?;
        Ok(ListenAddr { transport, addr })
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.transport, self.addr)
    }
}

#[cfg(feature = "serde")]
impl serde::Serialize for ListenAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for ListenAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_urls_name_their_transport() {
        let a: ListenAddr = "tls://[::1]:443".parse().unwrap();
        assert_eq!((a.transport, a.addr), (Transport::Tls, "[::1]:443".parse().unwrap()));
        let b: ListenAddr = "0.0.0.0:3478".parse().unwrap();
        assert_eq!(b.transport, Transport::Udp);
        assert_eq!("tcp://127.0.0.1:3478".parse::<ListenAddr>().unwrap().to_string(), "tcp://127.0.0.1:3478");
        assert!("dtls://127.0.0.1:1".parse::<ListenAddr>().is_err());
        assert!("tcp://nowhere".parse::<ListenAddr>().is_err());
    }
}
