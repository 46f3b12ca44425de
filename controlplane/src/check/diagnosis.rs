//! The failure classes `uturn check` tells apart, each with its exit code, a stable name for
//! `--json` and the sentence it prints. The exit codes are documented in `uturn check --help`
//! ([`EXIT_CODES`]) and in docs/operations.md ("Troubleshooting").

use serde::Serialize;

/// Why a server failed its check. The exit code of the process is that of the first server
/// that failed (0 when none did).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Class {
    /// Bad arguments, URI or iceServers JSON, or no credentials for a `turn:` URI (exit 2).
    Usage,
    /// The host name did not resolve (exit 10).
    Resolve,
    /// No answer at all, or the connection was refused (exit 11).
    Unreachable,
    /// No answer over UDP, but the same host and port answer over TCP: a firewall drops UDP (exit 12).
    UdpBlocked,
    /// The TLS handshake failed: a certificate that does not match the name, or that is not
    /// trusted (exit 13).
    Tls,
    /// A signed request was refused with 401: wrong password (or, without `--store`, an unknown
    /// user: relays answer both alike, RFC 8489 §9.2.4) (exit 20).
    WrongPassword,
    /// 401, and the relay's user store (`--store`) has no such user in the realm (exit 21).
    UnknownUser,
    /// The server's REALM is not the one the credentials are for (`--realm`) (exit 22).
    RealmMismatch,
    /// 401 for a TURN REST username whose expiry has passed (exit 23).
    RestExpired,
    /// 438 Stale Nonce answered again and again to the nonce just handed out (exit 24).
    StaleNonceLoop,
    /// 508 Insufficient Capacity to Allocate: no relay port free, or a quota (exit 30).
    Capacity,
    /// 300 Try Alternate with ALTERNATE-SERVER: the server redirects (it drains); the check
    /// followed it once (exit 31 even when the alternate passes).
    Redirected,
    /// 403 Forbidden to CreatePermission or ChannelBind: the peer's address is denied by the
    /// relay's policy (exit 32).
    PeerDenied,
    /// Another error response (exit 33).
    TurnError,
    /// The relay's datagrams come from another address than the XOR-RELAYED-ADDRESS it
    /// advertises, and what a peer sends to the advertised one never arrives: `external-ip`
    /// does not match (exit 40).
    ExternalIp,
    /// Data reaches the peer through the relay, but nothing the peer sends back to the relayed
    /// address arrives: the relay port range is blocked inbound (exit 41).
    InboundBlocked,
    /// Data lost the other way, both ways, or a loss above `--max-loss` (exit 42).
    DataLoss,
    /// Anything else: an unparseable answer, a local socket error (exit 1).
    Other,
}

impl Class {
    /// The process exit code of this class.
    pub fn exit_code(self) -> u8 {
        match self {
            Class::Other => 1,
            Class::Usage => 2,
            Class::Resolve => 10,
            Class::Unreachable => 11,
            Class::UdpBlocked => 12,
            Class::Tls => 13,
            Class::WrongPassword => 20,
            Class::UnknownUser => 21,
            Class::RealmMismatch => 22,
            Class::RestExpired => 23,
            Class::StaleNonceLoop => 24,
            Class::Capacity => 30,
            Class::Redirected => 31,
            Class::PeerDenied => 32,
            Class::TurnError => 33,
            Class::ExternalIp => 40,
            Class::InboundBlocked => 41,
            Class::DataLoss => 42,
        }
    }
}

/// The exit codes, as `uturn check --help` prints them.
pub const EXIT_CODES: &str = "\
Exit codes (the first failing server's; docs/operations.md, Troubleshooting):
   0  every requested check passed
   1  other error (unparseable answer, local socket error)
   2  usage: bad arguments, URI or iceServers JSON, no credentials for turn:
  10  the host name does not resolve
  11  no answer, or connection refused
  12  no answer over UDP, but TCP on the same port answers (a firewall drops UDP)
  13  TLS handshake failed (certificate does not match the name, or is not trusted)
  20  401 to a signed request: wrong password (or unknown user, without --store)
  21  unknown user (401, and --store has no such user in the realm)
  22  realm mismatch (the server's REALM is not --realm)
  23  expired TURN REST credential
  24  stale-nonce loop (438 again and again)
  30  508 Insufficient Capacity to Allocate (no relay port free, or a quota)
  31  300 Try Alternate: redirected by ALTERNATE-SERVER (followed once)
  32  403 Forbidden: the peer address is denied by the relay's policy
  33  another error response
  40  external-ip mismatch: the advertised relayed address is not where the relay is
  41  data goes out but never comes back (relay port range blocked inbound)
  42  data lost the other way or both ways, or loss above --max-loss";

/// A failure: its class and the plain sentence that explains it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnosis {
    /// The class (`--json`: kebab-case name).
    pub class: Class,
    /// What went wrong and what to look at.
    pub message: String,
}

impl Diagnosis {
    /// A diagnosis of `class`.
    pub fn new(class: Class, message: impl Into<String>) -> Self {
        Diagnosis { class, message: message.into() }
    }
}

/// The meaning of a STUN/TURN error code (RFC 8489 §14.8, RFC 8656 §19), for the reason
/// printed beside it.
pub fn meaning(code: u16) -> &'static str {
    match code {
        300 => "Try Alternate: the server redirects to ALTERNATE-SERVER",
        400 => "Bad Request: the server could not parse or accept the request",
        401 => "Unauthenticated",
        403 => "Forbidden: refused by the server's policy",
        420 => "Unknown Attribute",
        437 => "Allocation Mismatch: this 5-tuple already has an allocation, or has none",
        438 => "Stale Nonce",
        440 => "Address Family not Supported",
        441 => "Wrong Credentials: not the credentials the allocation was made with",
        442 => "Unsupported Transport Protocol",
        443 => "Peer Address Family Mismatch",
        486 => "Allocation Quota Reached: the user has too many allocations",
        500 => "Server Error",
        508 => "Insufficient Capacity",
        _ => "unknown error code",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_distinct_and_listed_in_the_help() {
        let all = [
            Class::Usage,
            Class::Resolve,
            Class::Unreachable,
            Class::UdpBlocked,
            Class::Tls,
            Class::WrongPassword,
            Class::UnknownUser,
            Class::RealmMismatch,
            Class::RestExpired,
            Class::StaleNonceLoop,
            Class::Capacity,
            Class::Redirected,
            Class::PeerDenied,
            Class::TurnError,
            Class::ExternalIp,
            Class::InboundBlocked,
            Class::DataLoss,
            Class::Other,
        ];
        let mut codes: Vec<u8> = all.iter().map(|c| c.exit_code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), all.len());
        for c in codes {
            assert!(EXIT_CODES.contains(&format!("{c:>4}  ")), "{c} not in the help");
        }
    }
}
