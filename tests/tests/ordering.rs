//! A client's own order is kept (docs/architecture.md, "Order within a 5-tuple"): a browser sends
//! its first ICE check right behind CreatePermission (as a Send indication) or behind ChannelBind
//! (as ChannelData) without waiting for the answer. While the request is at the control plane the
//! worker holds that 5-tuple's later datagrams and handles them once the answer is applied, so
//! the check is relayed, over UDP, TCP and TLS, on both back ends.

use std::net::SocketAddr;
use std::time::Duration;

use uturn_bench::client::stream::StreamClient;
use uturn_bench::pipeline::{channel_bind, create_permission, peer_on, received};
use uturn_tests::uturn_proto::wire::{attr, Class, Method, TransactionId};
use uturn_tests::{Client, Relay, TlsFiles, BACKENDS};

/// Pairs sent back to back per kind (CreatePermission + Send, ChannelBind + ChannelData).
const PAIRS: u8 = 20;

fn send_indication(peer: SocketAddr, payload: &[u8]) -> Vec<u8> {
    uturn_bench::client::build(Method::SEND, Class::Indication, TransactionId(rand::random()), None, |w| {
        w.xor_address(attr::XOR_PEER_ADDRESS, &peer)?;
        w.bytes(attr::DATA, payload).map(drop)
    })
}

fn channel_data(channel: u16, payload: &[u8], pad: bool) -> Vec<u8> {
    let mut d = Vec::with_capacity(8 + payload.len());
    d.extend_from_slice(&channel.to_be_bytes());
    d.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    d.extend_from_slice(payload);
    if pad {
        d.resize((d.len() + 3) & !3, 0);
    }
    d
}

/// How the pipelined pair travels: one datagram each (UDP), or both in one write (TCP, TLS).
enum Wire {
    Udp(Client),
    Stream(Box<StreamClient>),
}

impl Wire {
    fn creds(&self) -> &Client {
        match self {
            Wire::Udp(c) => c,
            Wire::Stream(s) => &s.creds,
        }
    }

    /// Sends `request` and `then` back to back; drains the answer so the stream stays readable.
    fn pipeline(&mut self, request: &[u8], then: &[u8]) {
        match self {
            Wire::Udp(c) => {
                c.send_raw(request);
                c.send_raw(then);
                let _ = c.recv();
            }
            Wire::Stream(s) => {
                let mut both = request.to_vec();
                both.extend_from_slice(then);
                s.send_raw(&both).unwrap();
                let _ = s.recv(Duration::from_millis(500));
            }
        }
    }
}

/// Runs both pipelined pairs [`PAIRS`] times; returns how many of each were relayed.
fn pipelined_pairs(w: &mut Wire) -> (u8, u8) {
    let (mut sends, mut channels) = (0, 0);
    let stream = matches!(w, Wire::Stream(_));
    for i in 0..PAIRS {
        let p = peer_on(10, i).unwrap();
        let pa = p.local_addr().unwrap();
        let tag = format!("send check {i}");
        w.pipeline(&create_permission(w.creds(), pa), &send_indication(pa, tag.as_bytes()));
        sends += received(&p, tag.as_bytes()) as u8;

        let q = peer_on(11, i).unwrap();
        let qa = q.local_addr().unwrap();
        let channel = 0x4000 + i as u16;
        let tag = format!("channel check {i}");
        w.pipeline(&channel_bind(w.creds(), channel, qa), &channel_data(channel, tag.as_bytes(), stream));
        channels += received(&q, tag.as_bytes()) as u8;
    }
    (sends, channels)
}

#[test]
fn a_check_sent_right_behind_its_permission_or_channel_bind_is_relayed() {
    let tls = TlsFiles::generate();
    for backend in BACKENDS {
        let relay = Relay::start_streams(backend, "", &[], &tls);
        let mut udp = Client::new(relay.addr, "demo", "demo", "uturn.local");
        udp.allocate();
        let mut tcp = StreamClient::connect(relay.tcp.unwrap(), false, "demo", "demo", "uturn.local").unwrap();
        tcp.allocate().unwrap();
        let mut tls_client = StreamClient::connect(relay.tls.unwrap(), true, "demo", "demo", "uturn.local").unwrap();
        tls_client.allocate().unwrap();
        for (name, mut w) in
            [("udp", Wire::Udp(udp)), ("tcp", Wire::Stream(Box::new(tcp))), ("tls", Wire::Stream(Box::new(tls_client)))]
        {
            let (sends, channels) = pipelined_pairs(&mut w);
            eprintln!(
                "{backend}/{name}: CreatePermission+Send {sends}/{PAIRS}, ChannelBind+ChannelData {channels}/{PAIRS}"
            );
            assert_eq!(sends, PAIRS, "{backend}/{name}: Send indications right behind CreatePermission");
            assert_eq!(channels, PAIRS, "{backend}/{name}: ChannelData right behind ChannelBind");
        }
    }
}
