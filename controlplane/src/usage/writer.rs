//! The usage writer thread: appends records to the JSON-lines file at once, and writes them to
//! the Redis stream in pipelined batches of `XADD key MAXLEN ~ N * field value …`, keeping them
//! in a bounded buffer while Redis does not answer (retried every [`RETRY`]).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use redis::{Client, Connection};
use tracing::{info, warn};

use super::{interim_records, now_ms, Msg, UsageConfig, UsageCounters, UsageRecord, PENDING_MAX};

/// Connect, read and write timeout of the Redis connection.
const TIMEOUT: Duration = Duration::from_secs(1);
/// How long the writer waits before it tries an unreachable Redis again.
const RETRY: Duration = Duration::from_secs(1);
/// Records per pipelined round trip.
const BATCH: usize = 256;
/// How long a round of interim records waits for the workers' answers.
const INTERIM_WAIT: Duration = Duration::from_secs(2);

pub(super) struct Writer {
    config: UsageConfig,
    counters: Arc<UsageCounters>,
    /// Records not yet in the stream (oldest first).
    pending: VecDeque<UsageRecord>,
    file: Option<BufWriter<File>>,
    /// The file could not be opened or written (logged once until it works again).
    file_failing: bool,
    client: Option<Client>,
    conn: Option<Connection>,
    /// When an unreachable Redis is tried again.
    retry_at: Instant,
    /// Redis did not answer (logged once until it answers again).
    redis_down: bool,
}

impl Writer {
    pub(super) fn new(config: UsageConfig, counters: Arc<UsageCounters>, inherited: Vec<UsageRecord>) -> Writer {
        let client = config.redis.as_deref().and_then(|url| match Client::open(url) {
            Ok(c) => Some(c),
            Err(e) => {
                warn!("usage records: fleet-redis {}: {e}; no stream", crate::store::mask_redis(url));
                None
            }
        });
        let mut w = Writer {
            config,
            counters,
            pending: VecDeque::new(),
            file: None,
            file_failing: false,
            client,
            conn: None,
            retry_at: Instant::now(),
            redis_down: false,
        };
        w.open_file();
        w.requeue(inherited);
        w
    }

    /// Queues records taken from the stream queue back for the stream (they are in the file
    /// already): those of a previous process, or of a hot upgrade that failed.
    fn requeue(&mut self, records: Vec<UsageRecord>) {
        if records.is_empty() {
            return;
        }
        if self.client.is_none() {
            warn!(records = records.len(), "usage records for a Redis stream, but this process has none; dropped");
            self.counters.dropped.fetch_add(records.len() as u64, Ordering::Relaxed);
            return;
        }
        for r in records {
            self.counters.pending.fetch_add(1, Ordering::Relaxed);
            if self.pending.len() >= PENDING_MAX {
                self.pending.pop_front();
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                self.counters.pending.fetch_sub(1, Ordering::Relaxed);
            }
            self.pending.push_back(r);
        }
    }

    fn open_file(&mut self) {
        let Some(path) = &self.config.file else { return };
        match OpenOptions::new().create(true).append(true).open(path) {
            Ok(f) => {
                self.file = Some(BufWriter::new(f));
                if self.file_failing {
                    info!(file = %path.display(), "usage records: the file is writable again");
                }
                self.file_failing = false;
            }
            Err(e) => {
                if !self.file_failing {
                    warn!(file = %path.display(), "usage records: cannot open the file: {e}");
                }
                self.file_failing = true;
            }
        }
    }

    pub(super) fn run(mut self, rx: Receiver<Msg>) {
        loop {
            let wait = if self.pending.is_empty() {
                Duration::from_secs(1)
            } else {
                self.retry_at.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))
            };
            match rx.recv_timeout(wait) {
                Ok(Msg::Record(r)) => {
                    self.push(*r);
                    // Whatever else is queued, before one flush and one round trip.
                    for _ in 0..BATCH {
                        match rx.try_recv() {
                            Ok(Msg::Record(r)) => self.push(*r),
                            Ok(other) => {
                                if !self.handle(other, &rx) {
                                    return;
                                }
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                }
                Ok(other) => {
                    if !self.handle(other, &rx) {
                        return;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.stop(Instant::now() + Duration::from_secs(2), &rx);
                    return;
                }
            }
            self.flush_file();
            self.write_redis();
        }
    }

    /// Handles a message other than a record; false once stopped.
    fn handle(&mut self, msg: Msg, rx: &Receiver<Msg>) -> bool {
        match msg {
            Msg::Record(r) => self.push(*r),
            Msg::Interim { starts, replies, workers } => {
                let deadline = Instant::now() + INTERIM_WAIT;
                let at = now_ms();
                for _ in 0..workers {
                    let Ok((_, sessions)) = replies.recv_deadline(deadline) else { break };
                    let records = interim_records(&self.config, &starts, sessions, at);
                    self.counters.pending.fetch_add(records.len() as u64, Ordering::Relaxed);
                    for r in records {
                        self.push(r);
                    }
                }
            }
            Msg::Requeue(records) => self.requeue(records),
            Msg::Take(reply) => {
                let all: Vec<UsageRecord> = self.pending.drain(..).collect();
                let n = all.len() as u64;
                match reply.try_send(all) {
                    Ok(()) => {
                        self.counters.pending.fetch_sub(n, Ordering::Relaxed);
                    }
                    // The asker gave up: keep them.
                    Err(e) => self.pending.extend(e.into_inner()),
                }
            }
            Msg::Stop(deadline) => {
                self.stop(deadline, rx);
                return false;
            }
        }
        true
    }

    /// Takes what is queued, writes it until `deadline`, and counts what is left as dropped.
    fn stop(&mut self, deadline: Instant, rx: &Receiver<Msg>) {
        while let Ok(msg) = rx.try_recv() {
            if let Msg::Record(r) = msg {
                self.push(*r);
            }
        }
        self.flush_file();
        while !self.pending.is_empty() && Instant::now() < deadline {
            self.write_redis();
            if !self.pending.is_empty() {
                std::thread::sleep(Duration::from_millis(50).min(deadline.saturating_duration_since(Instant::now())));
            }
        }
        let left = self.pending.len() as u64;
        if left > 0 {
            warn!(records = left, "usage records: Redis did not take them before exit; they are lost");
            self.counters.dropped.fetch_add(left, Ordering::Relaxed);
            self.counters.pending.fetch_sub(left, Ordering::Relaxed);
            self.pending.clear();
        }
    }

    /// Writes `r` to the file, and queues it for the stream (counted in `pending` by whoever
    /// made it; this settles that count once every destination has it).
    fn push(&mut self, r: UsageRecord) {
        if self.config.file.is_some() {
            if self.file.is_none() {
                self.open_file();
            }
            let ok = match &mut self.file {
                Some(f) => serde_json::to_writer(&mut *f, &r).is_ok() && f.write_all(b"\n").is_ok(),
                None => false,
            };
            if ok {
                self.counters.written_file.fetch_add(1, Ordering::Relaxed);
            } else {
                if !self.file_failing {
                    warn!("usage records: writing the file failed; reopening it for the next record");
                }
                self.file_failing = true;
                self.file = None;
                if self.client.is_none() {
                    self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if self.client.is_none() {
            self.counters.pending.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        if self.pending.len() >= PENDING_MAX {
            self.pending.pop_front();
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            self.counters.pending.fetch_sub(1, Ordering::Relaxed);
        }
        self.pending.push_back(r);
    }

    fn flush_file(&mut self) {
        if let Some(f) = &mut self.file {
            if let Err(e) = f.flush() {
                if !self.file_failing {
                    warn!("usage records: flushing the file failed: {e}");
                }
                self.file_failing = true;
                self.file = None;
            }
        }
    }

    /// Writes pending records to the stream in batches until none is left or Redis fails.
    fn write_redis(&mut self) {
        while !self.pending.is_empty() && Instant::now() >= self.retry_at {
            let n = self.pending.len().min(BATCH);
            match self.xadd(n) {
                Ok(()) => {
                    self.pending.drain(..n);
                    self.counters.written_redis.fetch_add(n as u64, Ordering::Relaxed);
                    self.counters.pending.fetch_sub(n as u64, Ordering::Relaxed);
                    if self.redis_down {
                        info!(pending = self.pending.len(), "usage records: Redis answers again");
                        self.redis_down = false;
                        crate::fleet::outage::answered("usage records");
                    }
                }
                Err(e) => {
                    self.conn = None;
                    self.retry_at = Instant::now() + RETRY;
                    if !self.redis_down {
                        let waiting = format!("{} records wait (at most {PENDING_MAX})", self.pending.len());
                        crate::fleet::outage::failed("usage records", &e, &waiting);
                        self.redis_down = true;
                    }
                }
            }
        }
    }

    /// One pipelined round trip: XADD of the first `n` pending records.
    fn xadd(&mut self, n: usize) -> redis::RedisResult<()> {
        let mut conn = match self.conn.take() {
            Some(c) => c,
            None => {
                let client = self.client.as_ref().expect("only called with a client");
                let c = client.get_connection_with_timeout(TIMEOUT)?;
                c.set_read_timeout(Some(TIMEOUT))?;
                c.set_write_timeout(Some(TIMEOUT))?;
                c
            }
        };
        let mut pipe = redis::pipe();
        for r in self.pending.iter().take(n) {
            let cmd = pipe.cmd("XADD").arg(&self.config.stream).arg("MAXLEN").arg("~").arg(self.config.maxlen).arg("*");
            for (k, v) in r.fields() {
                cmd.arg(k).arg(v);
            }
        }
        pipe.query::<Vec<redis::Value>>(&mut conn)?;
        self.conn = Some(conn);
        Ok(())
    }
}
