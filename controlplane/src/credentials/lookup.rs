//! The store threads: a small pool that runs user-store lookups off the control loop. The
//! control loop hands a [`LookupKey`] over a bounded queue and goes on; a thread asks the
//! store, sends the answer back and unparks the control thread, which then handles the
//! requests that waited for it.

use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use tracing::debug;

use super::cache::{LookupKey, StoredUser, Who};
use crate::store::{self, StoreError, StoreUrl, UserStore};

/// How long a thread whose store failed answers "unavailable" without trying again, so a dead
/// Redis costs one connect timeout per second per thread, not one per request.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The store's answer to one lookup.
#[derive(Debug)]
pub struct Answer {
    /// What was looked up.
    pub key: LookupKey,
    /// The user, `None` when the store has no such user, or why the store could not answer.
    pub result: Result<Option<StoredUser>, StoreError>,
}

/// A pool of store threads, each with its own connection to the store.
pub struct LookupPool {
    jobs: Option<Sender<LookupKey>>,
    answers: Receiver<Answer>,
    threads: Vec<JoinHandle<()>>,
}

impl LookupPool {
    /// Starts `threads` store threads (at least 1) on `url`; each answer unparks `control`.
    /// At most `queue` lookups wait for a thread.
    pub fn start(url: &StoreUrl, threads: usize, queue: usize, control: Thread) -> std::io::Result<Self> {
        let (jobs_tx, jobs_rx) = crossbeam_channel::bounded::<LookupKey>(queue.max(1));
        let (answers_tx, answers) = crossbeam_channel::unbounded();
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let (rx, tx, url, control) = (jobs_rx.clone(), answers_tx.clone(), url.clone(), control.clone());
            let h = std::thread::Builder::new()
                .name(format!("uturn-store-{i}"))
                .spawn(move || store_thread(&url, &rx, &tx, &control))?;
            handles.push(h);
        }
        Ok(LookupPool { jobs: Some(jobs_tx), answers, threads: handles })
    }

    /// Queues a lookup; false when the queue is full (the request is dropped and its client
    /// retransmits).
    pub fn submit(&self, key: LookupKey) -> bool {
        match self.jobs.as_ref().map(|j| j.try_send(key)) {
            Some(Ok(())) => true,
            Some(Err(TrySendError::Full(_) | TrySendError::Disconnected(_))) | None => false,
        }
    }

    /// The next answer that arrived, if any.
    pub fn try_answer(&self) -> Option<Answer> {
        self.answers.try_recv().ok()
    }
}

impl Drop for LookupPool {
    fn drop(&mut self) {
        // Closing the job queue ends every thread after its current lookup (store timeouts
        // bound that to about a second).
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn store_thread(url: &StoreUrl, jobs: &Receiver<LookupKey>, answers: &Sender<Answer>, control: &Thread) {
    let mut store: Option<Box<dyn UserStore>> = None;
    let mut failed_at: Option<Instant> = None;
    while let Ok(key) = jobs.recv() {
        let result = if failed_at.is_some_and(|t| t.elapsed() < RETRY_AFTER) {
            Err(StoreError::Unavailable("store failed less than a second ago".into()))
        } else {
            lookup(url, &mut store, &key)
        };
        match &result {
            Err(e) => {
                debug!("user store lookup failed: {e}");
                store = None;
                failed_at = Some(Instant::now());
            }
            Ok(_) => failed_at = None,
        }
        if answers.send(Answer { key, result }).is_err() {
            return;
        }
        control.unpark();
    }
}

fn lookup(
    url: &StoreUrl,
    store: &mut Option<Box<dyn UserStore>>,
    key: &LookupKey,
) -> Result<Option<StoredUser>, StoreError> {
    if store.is_none() {
        *store = Some(store::open(url, false)?);
    }
    let Some(s) = store.as_mut() else { return Err(StoreError::Unavailable("no store".into())) };
    match &key.who {
        Who::Name(name) => Ok(s.lookup(&key.realm, name)?.map(|keys| StoredUser { name: name.clone(), keys })),
        Who::Hash(h) => {
            Ok(s.lookup_userhash(&key.realm, h)?.map(|(name, keys)| StoredUser { name: name.into(), keys }))
        }
    }
}
