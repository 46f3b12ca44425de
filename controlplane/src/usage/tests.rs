use std::time::{Duration, Instant};

use uturn_proto::relay::{AllocationId, EndReason, Ended, FiveTuple, Traffic};
use uturn_proto::wire::TransactionId;

use super::*;

fn ended(session: u64) -> Ended {
    Ended {
        id: AllocationId { index: 0, generation: 0 },
        five_tuple: FiveTuple::udp("127.0.0.1:5000".parse().unwrap(), "127.0.0.1:3478".parse().unwrap()),
        relayed: "10.0.0.1:50000".parse().unwrap(),
        additional: None,
        tid: TransactionId([1; 12]),
        session,
        created: Instant::now() - Duration::from_secs(3),
        to_peer: Traffic { packets: 7, bytes: 700 },
        to_client: Traffic { packets: 5, bytes: 321 },
        reason: EndReason::Deleted,
    }
}

fn config(file: Option<PathBuf>) -> UsageConfig {
    UsageConfig {
        node: "n1".into(),
        redis: None,
        stream: DEFAULT_STREAM.into(),
        maxlen: 10,
        file,
        interval: None,
        external_ips: vec![("10.0.0.1".parse().unwrap(), "203.0.113.9".parse().unwrap())],
    }
}

#[test]
fn nothing_configured_starts_nothing() {
    assert!(Usage::start(config(None), Arc::default(), vec![]).is_none());
}

#[test]
fn final_records_go_to_the_file_with_their_totals_and_the_advertised_address() {
    let path = std::env::temp_dir().join(format!("uturn-usage-unit-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let counters: Arc<UsageCounters> = Arc::default();
    let u = Usage::start(config(Some(path.clone())), counters.clone(), vec![]).expect("a file is configured");
    let start = now_ms() - 3000;
    u.ended(&ended(41), Some(("alice".into(), start)));
    u.ended(&ended(42), None);
    u.finish(Duration::from_secs(2));
    let text = std::fs::read_to_string(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    let records: Vec<UsageRecord> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.len(), 2, "{text}");
    let r = &records[0];
    assert_eq!((r.kind, r.node.as_str(), r.session, r.user.as_str()), (Kind::Final, "n1", 41, "alice"));
    assert_eq!((r.transport.as_str(), r.relayed), ("udp", "203.0.113.9:50000".parse().unwrap()));
    assert_eq!((r.start_ms, r.reason.as_deref()), (start, Some("deleted")));
    assert!(r.end_ms >= start + 3000);
    assert_eq!((r.packets_to_peer, r.bytes_to_peer, r.packets_to_client, r.bytes_to_client), (7, 700, 5, 321));
    // Without an owner record the start comes from the worker's clock, the user is unknown.
    assert_eq!(records[1].user, "");
    assert!(records[1].start_ms.abs_diff(start) < 1000, "{:?}", records[1]);
    assert_eq!(counters.written_file.load(Ordering::Relaxed), 2);
    assert_eq!(counters.pending.load(Ordering::Relaxed), 0);
    assert_eq!(counters.dropped.load(Ordering::Relaxed), 0);
}

#[test]
fn stream_fields_name_every_value() {
    let mut r = UsageRecord {
        kind: Kind::Interim,
        node: "n".into(),
        session: 9,
        user: "u".into(),
        transport: "tcp".into(),
        client: "127.0.0.1:1".parse().unwrap(),
        server: "127.0.0.1:2".parse().unwrap(),
        relayed: "127.0.0.1:3".parse().unwrap(),
        additional: None,
        start_ms: 1,
        end_ms: 2,
        reason: None,
        packets_to_peer: 3,
        bytes_to_peer: 4,
        packets_to_client: 5,
        bytes_to_client: 6,
    };
    let names: Vec<&str> = r.fields().iter().map(|(k, _)| *k).collect();
    assert!(!names.contains(&"reason") && !names.contains(&"additional"));
    r.reason = Some("expired".into());
    r.additional = Some("[::1]:4".parse().unwrap());
    let f = r.fields();
    assert_eq!(f.len(), 16);
    assert!(f.contains(&("additional", "[::1]:4".into())) && f.contains(&("reason", "expired".into())));
    assert!(f.contains(&("kind", "interim".into())) && f.contains(&("bytes_to_client", "6".into())));
}

#[test]
fn a_redis_that_does_not_answer_keeps_records_pending_then_drops_them_at_exit() {
    // A port nobody listens on (bound, then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut c = config(None);
    c.redis = Some(format!("redis://127.0.0.1:{port}/0"));
    let counters: Arc<UsageCounters> = Arc::default();
    let u = Usage::start(c, counters.clone(), vec![]).expect("a stream is configured");
    u.ended(&ended(1), None);
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut taken = Vec::new();
    while taken.is_empty() && Instant::now() < deadline {
        taken = u.take_pending(Duration::from_millis(500));
    }
    assert_eq!(taken.len(), 1, "the unwritten record is handed over");
    assert_eq!(counters.pending.load(Ordering::Relaxed), 0);
    u.restore(taken);
    u.finish(Duration::from_millis(300));
    assert_eq!(counters.dropped.load(Ordering::Relaxed), 1);
    assert_eq!(counters.written_redis.load(Ordering::Relaxed), 0);
}
