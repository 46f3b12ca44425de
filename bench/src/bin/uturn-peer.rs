//! `uturn-peer`: a UDP echo peer (like coturn's `turnutils_peer`): every datagram goes back to
//! where it came from, in batches (recvmmsg/sendmmsg).

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

use clap::Parser;
use uturn_bench::mmsg::{RecvBatch, SendBatch};

/// UDP echo peer.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:3480")]
    listen: SocketAddr,
    /// Stop after this many seconds (0: run until killed).
    #[arg(long, default_value_t = 0)]
    duration: u64,
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let sock = UdpSocket::bind(args.listen)?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    eprintln!("uturn-peer echoing on {}", sock.local_addr()?);
    let deadline = (args.duration > 0).then(|| std::time::Instant::now() + Duration::from_secs(args.duration));
    let (mut rx, mut tx) = (RecvBatch::new(), SendBatch::new());
    let mut wait = [0u8; 1];
    loop {
        if deadline.is_some_and(|d| std::time::Instant::now() > d) {
            return Ok(());
        }
        // Block (up to 100 ms) until something is readable, then drain in batches.
        let _ = sock.peek_from(&mut wait);
        while rx.recv(sock.as_raw_fd())? > 0 {
            for i in 0..rx.count() {
                let (data, from) = rx.get(i);
                if let Some(from) = from {
                    tx.push(&from, |b| {
                        b[..data.len()].copy_from_slice(data);
                        data.len()
                    });
                }
            }
            tx.flush(sock.as_raw_fd())?;
        }
    }
}
