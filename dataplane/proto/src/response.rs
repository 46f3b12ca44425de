//! Building STUN responses the way uturn answers every request: SOFTWARE, then the method's
//! attributes, then MESSAGE-INTEGRITY when a key is known, then FINGERPRINT (RFC 8489 §6.3, §14).

use crate::wire::{attr, Class, IntegrityKey, MessageWriter, Method, TransactionId, WriteError};

/// The SOFTWARE attribute value uturn sends: `uturn/<version>`.
pub const SOFTWARE: &str = concat!("uturn/", env!("CARGO_PKG_VERSION"));

/// The error codes uturn answers with (RFC 8489 §14.8, RFC 8656 §19).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 300: use the server in ALTERNATE-SERVER (RFC 8489 §10; a draining relay).
    TryAlternate,
    /// 400: malformed or missing attributes.
    BadRequest,
    /// 401: missing or wrong credentials.
    Unauthenticated,
    /// 403: the peer address is not allowed.
    Forbidden,
    /// 420: unknown comprehension-required attribute.
    UnknownAttribute,
    /// 437: the 5-tuple has (Allocate) or lacks (other requests) an allocation.
    AllocationMismatch,
    /// 438: the nonce has expired.
    StaleNonce,
    /// 440: the requested address family is not served.
    AddressFamilyNotSupported,
    /// 441: credentials differ from those of the allocation.
    WrongCredentials,
    /// 442: REQUESTED-TRANSPORT other than UDP and TCP.
    UnsupportedTransportProtocol,
    /// 443: the peer address family differs from the relayed address's.
    PeerAddressFamilyMismatch,
    /// 446: a Connect to a peer that already has a connection on this TCP allocation
    /// (RFC 6062 §5.2).
    ConnectionAlreadyExists,
    /// 447: the TCP connection to the peer failed or timed out (RFC 6062 §5.2).
    ConnectionTimeoutOrFailure,
    /// 486: a per-user or total allocation quota is reached.
    AllocationQuotaReached,
    /// 500: the server could not complete the request.
    ServerError,
    /// 508: no relay port or table capacity left, or an unknown reservation token.
    InsufficientCapacity,
}

impl ErrorCode {
    /// Numeric code, 300-699.
    pub const fn code(self) -> u16 {
        match self {
            ErrorCode::TryAlternate => 300,
            ErrorCode::BadRequest => 400,
            ErrorCode::Unauthenticated => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::UnknownAttribute => 420,
            ErrorCode::AllocationMismatch => 437,
            ErrorCode::StaleNonce => 438,
            ErrorCode::AddressFamilyNotSupported => 440,
            ErrorCode::WrongCredentials => 441,
            ErrorCode::UnsupportedTransportProtocol => 442,
            ErrorCode::PeerAddressFamilyMismatch => 443,
            ErrorCode::ConnectionAlreadyExists => 446,
            ErrorCode::ConnectionTimeoutOrFailure => 447,
            ErrorCode::AllocationQuotaReached => 486,
            ErrorCode::ServerError => 500,
            ErrorCode::InsufficientCapacity => 508,
        }
    }

    /// The reason phrase the RFCs suggest.
    pub const fn reason(self) -> &'static str {
        match self {
            ErrorCode::TryAlternate => "Try Alternate",
            ErrorCode::BadRequest => "Bad Request",
            ErrorCode::Unauthenticated => "Unauthenticated",
            ErrorCode::Forbidden => "Forbidden",
            ErrorCode::UnknownAttribute => "Unknown Attribute",
            ErrorCode::AllocationMismatch => "Allocation Mismatch",
            ErrorCode::StaleNonce => "Stale Nonce",
            ErrorCode::AddressFamilyNotSupported => "Address Family not Supported",
            ErrorCode::WrongCredentials => "Wrong Credentials",
            ErrorCode::UnsupportedTransportProtocol => "Unsupported Transport Protocol",
            ErrorCode::PeerAddressFamilyMismatch => "Peer Address Family Mismatch",
            ErrorCode::ConnectionAlreadyExists => "Connection Already Exists",
            ErrorCode::ConnectionTimeoutOrFailure => "Connection Timeout or Failure",
            ErrorCode::AllocationQuotaReached => "Allocation Quota Reached",
            ErrorCode::ServerError => "Server Error",
            ErrorCode::InsufficientCapacity => "Insufficient Capacity",
        }
    }
}

/// Starts a response of class `class` to a `method` request, with SOFTWARE already written.
pub fn start(
    out: &mut [u8],
    method: Method,
    class: Class,
    tid: TransactionId,
) -> Result<MessageWriter<'_>, WriteError> {
    let mut w = MessageWriter::new(out, method, class, tid)?;
    w.bytes(attr::SOFTWARE, SOFTWARE.as_bytes())?;
    Ok(w)
}

/// Starts a response without SOFTWARE: for answers to unauthenticated requests (Binding, 401,
/// 438, unsigned errors), which stay as small as possible so the relay is no amplifier.
pub fn start_unauthenticated(
    out: &mut [u8],
    method: Method,
    class: Class,
    tid: TransactionId,
) -> Result<MessageWriter<'_>, WriteError> {
    MessageWriter::new(out, method, class, tid)
}

/// Adds the integrity attribute `key` signs with (MESSAGE-INTEGRITY or
/// MESSAGE-INTEGRITY-SHA256, when a key is given) and FINGERPRINT, returning the length in bytes.
pub fn seal(mut w: MessageWriter<'_>, key: Option<&IntegrityKey>) -> Result<usize, WriteError> {
    if let Some(k) = key {
        w.sign(k)?;
    }
    w.fingerprint()?;
    Ok(w.finish())
}

/// Writes a complete error response (ERROR-CODE, plus UNKNOWN-ATTRIBUTES for 420). With `key`
/// it is signed and carries SOFTWARE; without, it is an unauthenticated answer and omits
/// SOFTWARE. Returns its length in bytes.
pub fn error(
    out: &mut [u8],
    method: Method,
    tid: TransactionId,
    code: ErrorCode,
    unknown: &[u16],
    key: Option<&IntegrityKey>,
) -> Result<usize, WriteError> {
    let mut w = if key.is_some() {
        start(out, method, Class::Error, tid)?
    } else {
        start_unauthenticated(out, method, Class::Error, tid)?
    };
    w.error_code(code.code(), code.reason())?;
    if code == ErrorCode::UnknownAttribute {
        w.unknown_attributes(unknown)?;
    }
    seal(w, key)
}

/// A signed 300 Try Alternate with ALTERNATE-SERVER `alternate` (RFC 8489 §10, §14.15): how a
/// draining relay turns new Allocates away. Returns its length in bytes.
pub fn try_alternate(
    out: &mut [u8],
    method: Method,
    tid: TransactionId,
    alternate: &std::net::SocketAddr,
    key: Option<&IntegrityKey>,
) -> Result<usize, WriteError> {
    let mut w = start(out, method, Class::Error, tid)?;
    w.error_code(ErrorCode::TryAlternate.code(), ErrorCode::TryAlternate.reason())?;
    w.address(attr::ALTERNATE_SERVER, alternate)?;
    seal(w, key)
}
