//! One client connection (TURN over TCP or TLS): its socket, its TLS state, the bytes received
//! and not yet framed, and the bytes waiting to be written (bounded).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Instant;

use uturn_proto::wire::stream::{self, Frame};
use uturn_proto::FiveTuple;

use super::ConnId;

/// The capacity, bytes, that a connection's receive and send buffers keep between messages
/// (see [`Connection::shrink_buffers`]); enough for every STUN message of a call.
pub(crate) const KEEP_BUFFER: usize = 4096;
/// Capacity past which a connection's buffer is given back after a large message, bytes: twice
/// a video burst of 8 × 1,200-byte datagrams with room to spare, half a 64 KiB frame.
const SHRINK_ABOVE: usize = 32 * 1024;

/// Why a connection was closed (counted per reason, named in logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseReason {
    /// The client closed it (EOF) or the socket failed.
    Peer,
    /// Bytes that are neither STUN nor ChannelData (the framing is lost, RFC 8656 §12.5).
    BadFraming,
    /// The TLS layer failed (bad record, handshake failure, ALPN mismatch).
    Tls,
    /// The TLS handshake did not finish in time.
    HandshakeTimeout,
    /// A message began and did not complete in time (slowloris).
    FrameTimeout,
    /// No allocation and nothing received for the idle timeout.
    Idle,
    /// Bytes waited to be written and none were for the stall timeout (a stalled reader).
    Stalled,
    /// The relay is stopping.
    Shutdown,
    /// The other connection of its RFC 6062 data connection pair closed, or their TCP
    /// allocation ended.
    DataClosed,
    /// The other connection of its data connection pair could not take its bytes (its write
    /// queue was full: the reader there is slower than this sender).
    Overrun,
    /// `proxy-protocol`: its PROXY header was missing, malformed or late (the reason is
    /// counted apart, [`crate::proxy::PROXY_REFUSALS`]).
    Proxy,
    /// A per-source cap refused the real client a PROXY header named.
    Refused,
}

/// What a connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// STUN messages and ChannelData, framed (a control connection, RFC 8656 §3.1).
    Framed,
    /// A ConnectionBind went to the control plane (RFC 6062 §5.4): the bytes after it wait,
    /// unframed, in `inbuf` until the answer.
    Binding,
    /// A client data connection (RFC 6062 §5.4): its bytes go as they are to `partner`.
    ClientData {
        /// The peer data connection.
        partner: ConnId,
        /// The pair's CONNECTION-ID.
        connection_id: u32,
    },
    /// A peer data connection: its bytes go as they are to `partner`.
    PeerData {
        /// The client data connection.
        partner: ConnId,
    },
}

impl CloseReason {
    /// True for the limits that end an abuser's connection with a reset (SO_LINGER 0), which
    /// frees what waits in the kernel's send buffer at once instead of draining it first.
    pub(crate) fn is_abortive(self) -> bool {
        matches!(
            self,
            CloseReason::Stalled
                | CloseReason::BadFraming
                | CloseReason::FrameTimeout
                | CloseReason::HandshakeTimeout
                | CloseReason::Overrun
                | CloseReason::Proxy
        )
    }

    /// Lower-case name, as logs and metrics spell it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            CloseReason::Peer => "peer",
            CloseReason::BadFraming => "bad_framing",
            CloseReason::Tls => "tls",
            CloseReason::HandshakeTimeout => "handshake_timeout",
            CloseReason::FrameTimeout => "frame_timeout",
            CloseReason::Idle => "idle",
            CloseReason::Stalled => "stalled",
            CloseReason::Shutdown => "shutdown",
            CloseReason::DataClosed => "data_closed",
            CloseReason::Overrun => "overrun",
            CloseReason::Proxy => "proxy",
            CloseReason::Refused => "refused",
        }
    }
}

/// A connection's state apart from its I/O.
pub(crate) struct Connection {
    pub(crate) socket: TcpStream,
    pub(crate) five_tuple: FiveTuple,
    pub(crate) generation: u32,
    /// What it carries (framed messages, or RFC 6062 data).
    pub(crate) role: Role,
    /// Not read for now: the other connection of its data pair has too much queued
    /// (backpressure: the kernel's receive window then holds the sender back).
    pub(crate) paused: bool,
    /// The other connection of its data pair closed (EOF): this one closes once what waits
    /// for it is written, so a peer's last bytes before its close still arrive.
    pub(crate) close_when_flushed: bool,
    tls: Option<Box<rustls::ServerConnection>>,
    /// Received plaintext not yet taken as whole messages.
    pub(crate) inbuf: Vec<u8>,
    /// Bytes (TLS records over TLS) waiting to be handed to the kernel.
    pub(crate) out: Vec<u8>,
    /// Bytes the backend handed to the kernel and has not seen written yet.
    pub(crate) in_flight: usize,
    /// Queued for a flush by the backend.
    pub(crate) dirty: bool,
    pub(crate) opened: Instant,
    /// When the connection last proved itself in use (a request whose MESSAGE-INTEGRITY
    /// verified, a success answer from the control plane, relayed data), or opened. A message
    /// that proves nothing (a Binding indication, an unauthenticated request) does not count,
    /// so it cannot hold a connection open past the idle timeout.
    pub(crate) last_used: Instant,
    /// When the first byte of the incomplete message in `inbuf` arrived.
    pub(crate) partial_since: Option<Instant>,
    /// When bytes were last written, or the queue was last empty.
    pub(crate) last_progress: Instant,
    /// `proxy-protocol`: the PROXY header has not come yet (`inbuf` holds its first bytes).
    pub(crate) awaiting_proxy: bool,
    /// Counted in its source's connection count (not a peer data connection, nor one whose
    /// PROXY header has not named its source yet).
    pub(crate) counted_source: bool,
}

impl Connection {
    pub(crate) fn new(
        socket: TcpStream,
        five_tuple: FiveTuple,
        generation: u32,
        tls: Option<rustls::ServerConnection>,
        now: Instant,
    ) -> Self {
        Connection {
            socket,
            five_tuple,
            generation,
            role: Role::Framed,
            paused: false,
            close_when_flushed: false,
            tls: tls.map(Box::new),
            inbuf: Vec::new(),
            out: Vec::new(),
            in_flight: 0,
            dirty: false,
            opened: now,
            last_used: now,
            partial_since: None,
            last_progress: now,
            awaiting_proxy: false,
            counted_source: true,
        }
    }

    /// Gives back what a large message made `inbuf` and `out` grow to, once they hold no more
    /// than [`KEEP_BUFFER`] bytes: a connection keeps at most that much capacity between
    /// messages (a 64 KiB frame would otherwise pin ~100 KiB per connection for its life).
    /// Only a buffer past [`SHRINK_ABOVE`] is shrunk, so a media connection whose bursts grow
    /// its buffers to a few KiB keeps them and does not reallocate on every read.
    pub(crate) fn shrink_buffers(&mut self) {
        for b in [&mut self.inbuf, &mut self.out] {
            if b.capacity() > SHRINK_ABOVE && b.is_empty() {
                *b = Vec::new();
            } else if b.capacity() > SHRINK_ABOVE && b.len() <= KEEP_BUFFER {
                b.shrink_to(KEEP_BUFFER);
            }
        }
    }

    /// True while a TLS handshake is in progress.
    pub(crate) fn handshaking(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.is_handshaking())
    }

    /// True over TLS.
    pub(crate) fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Bytes queued or in flight, bytes.
    pub(crate) fn queued(&self) -> usize {
        self.out.len() + self.in_flight
    }

    /// Feeds received TLS records; the plaintext goes to `inbuf` (at most `max_inbuf` bytes in
    /// all, or the framing is taken as lost). Whatever the TLS layer must answer (handshake,
    /// alerts) goes to `out`.
    pub(crate) fn receive_tls(&mut self, mut records: &[u8], max_inbuf: usize) -> Result<(), CloseReason> {
        let Some(tls) = self.tls.as_mut() else { return Ok(()) };
        while !records.is_empty() {
            match tls.read_tls(&mut records) {
                Ok(0) => break,
                Ok(_) => {}
                Err(_) => return Err(CloseReason::Tls),
            }
            let state = match tls.process_new_packets() {
                Ok(s) => s,
                Err(_) => {
                    // Send the alert rustls prepared, then close.
                    let _ = tls.write_tls(&mut self.out);
                    return Err(CloseReason::Tls);
                }
            };
            let mut want = state.plaintext_bytes_to_read();
            while want > 0 {
                if self.inbuf.len() + want > max_inbuf {
                    return Err(CloseReason::BadFraming);
                }
                let start = self.inbuf.len();
                self.inbuf.resize(start + want, 0);
                match tls.reader().read(&mut self.inbuf[start..]) {
                    Ok(n) => {
                        self.inbuf.truncate(start + n);
                        want -= n.min(want);
                        if n == 0 {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.inbuf.truncate(start);
                        break;
                    }
                    Err(_) => {
                        self.inbuf.truncate(start);
                        return Err(CloseReason::Peer);
                    }
                }
            }
            if state.peer_has_closed() {
                return Err(CloseReason::Peer);
            }
        }
        self.pull_tls_output();
        Ok(())
    }

    /// Moves what the TLS layer wants to send into `out`.
    fn pull_tls_output(&mut self) {
        if let Some(tls) = self.tls.as_mut() {
            while tls.wants_write() {
                if tls.write_tls(&mut self.out).is_err() {
                    break;
                }
            }
        }
    }

    /// Queues one message (already padded as the stream needs) for the client, encrypting it
    /// over TLS. False (nothing queued) when it would take the queue past `limit` bytes, or
    /// while the TLS handshake is not done.
    pub(crate) fn queue(&mut self, message: &[u8], limit: usize) -> bool {
        if self.queued() + message.len() > limit {
            return false;
        }
        if self.queued() == 0 {
            // The stall clock starts when bytes begin to wait.
            self.last_progress = Instant::now();
        }
        match self.tls.as_mut() {
            None => self.out.extend_from_slice(message),
            Some(tls) => {
                if tls.is_handshaking() {
                    return false;
                }
                // In records' worth at a time: rustls buffers at most 64 KiB of plaintext, and
                // relayed data (RFC 6062) may come in larger pieces.
                for piece in message.chunks(16 * 1024) {
                    let Some(tls) = self.tls.as_mut() else { return false };
                    if tls.writer().write_all(piece).is_err() {
                        return false;
                    }
                    self.pull_tls_output();
                }
            }
        }
        true
    }

    /// Asks TLS for a close_notify (sent with the next flush).
    pub(crate) fn send_close_notify(&mut self) {
        if let Some(tls) = self.tls.as_mut() {
            tls.send_close_notify();
        }
        self.pull_tls_output();
    }

    /// The backend wrote `n` bytes that were in flight.
    pub(crate) fn written(&mut self, n: usize, now: Instant) {
        self.in_flight = self.in_flight.saturating_sub(n);
        self.last_progress = now;
    }

    /// Takes the next whole message off `buf[*at..]`: its range, advancing `at` past its
    /// padding. `Ok(None)` when the rest is incomplete.
    pub(crate) fn next_message(buf: &[u8], at: &mut usize) -> Result<Option<std::ops::Range<usize>>, CloseReason> {
        match stream::next_frame(&buf[*at..]) {
            Frame::Complete { message, consumed } => {
                let r = *at..*at + message;
                *at += consumed;
                Ok(Some(r))
            }
            Frame::Incomplete { .. } => Ok(None),
            Frame::Invalid => Err(CloseReason::BadFraming),
        }
    }

    /// Writes `out` to the socket until it would block (the epoll backend): Ok(true) when
    /// everything was written.
    pub(crate) fn write_out(&mut self, now: Instant) -> io::Result<bool> {
        let mut done = 0;
        let result = loop {
            if done == self.out.len() {
                break Ok(true);
            }
            match self.socket.write(&self.out[done..]) {
                Ok(0) => break Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => {
                    done += n;
                    self.last_progress = now;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(e),
            }
        };
        self.out.drain(..done);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_shrink_back_after_a_large_frame() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let ft = FiveTuple {
            client: s.local_addr().unwrap(),
            server: l.local_addr().unwrap(),
            transport: uturn_proto::Transport::Tcp,
        };
        let mut c = Connection::new(s, ft, 0, None, Instant::now());
        c.inbuf.extend_from_slice(&[0u8; 65_540]);
        c.inbuf.drain(..65_000);
        c.shrink_buffers();
        assert!(c.inbuf.capacity() <= KEEP_BUFFER && c.inbuf.len() == 540, "{}", c.inbuf.capacity());
        c.inbuf.clear();
        c.inbuf.reserve(100_000);
        c.shrink_buffers();
        assert_eq!(c.inbuf.capacity(), 0, "an empty large buffer is given back whole");
        c.out.extend_from_slice(&[1u8; 70_000]);
        c.shrink_buffers();
        assert_eq!(c.out.len(), 70_000, "bytes still waiting are kept");
        c.out.clear();
        c.shrink_buffers();
        assert_eq!(c.out.capacity(), 0);
        // A media burst's few KiB stay: no reallocation on every read.
        c.out.reserve(10_000);
        c.out.extend_from_slice(&[2u8; 100]);
        c.shrink_buffers();
        assert!(c.out.capacity() >= 10_000, "{}", c.out.capacity());
    }
}
