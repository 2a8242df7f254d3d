//! Group commit: one task collects submissions and appends them to the journal
//! together, one `Store::append` per batch, and syncs the journal.
//!
//! A single submission ([`StoreWriter::submit`], the polled readings) is answered
//! once its record is in the journal: visible and safe from a kill of the process.
//! A batch ([`StoreWriter::submit_batch`], pushes) is answered only after the
//! journal sync that covers it: safe from a power cut. The task syncs at once when
//! a batch waits (batches that come in during a sync wait for the next one,
//! together), and otherwise every `store.sync_interval` while records wait for a
//! sync.
//!
//! After each commit the task runs the store's quota pass when the live bytes are
//! over the budget, and appends the drop event it calls for (`quota.rs`).
//!
//! When the store refuses a commit (disk full, a failed write: `health.rs`), the
//! submissions are not answered with an error: they are *held* in memory, in order,
//! with everything submitted after them, and the commit is tried again every
//! [`RETRY_EVERY`]. Polling goes on meanwhile (the queue keeps moving into the held
//! list). Beyond `store.hold_readings` held payloads, the oldest held submissions
//! are dropped, answered with the error and counted; when writing resumes, a
//! `disk_full` drop event records how many. One log line per change of state, never
//! one per reading.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;

use std::collections::VecDeque;

use super::{Deleted, Store, StoreError};
use crate::model::{now_ms, DropEvent, DropReason, Payload, Record};

/// How often a refused commit is tried again.
pub const RETRY_EVERY: Duration = Duration::from_millis(500);

enum Submission {
    One(Payload, oneshot::Sender<Result<Record, StoreError>>),
    Batch(
        Vec<Payload>,
        oneshot::Sender<Result<Vec<Record>, StoreError>>,
    ),
}

impl Submission {
    fn len(&self) -> usize {
        match self {
            Submission::One(..) => 1,
            Submission::Batch(p, _) => p.len(),
        }
    }
}

struct Pending {
    submission: Submission,
    since: Instant,
}

/// Handle for submitting payloads to the group-commit task. Cheap to clone; the
/// task commits what is pending and ends once every clone is dropped.
#[derive(Clone)]
pub struct StoreWriter {
    tx: mpsc::Sender<Pending>,
}

impl std::fmt::Debug for StoreWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreWriter").finish_non_exhaustive()
    }
}

impl StoreWriter {
    /// Enqueue one payload; the returned receiver resolves once it is in the journal
    /// (safe from a kill of the process; a power cut can still take it before the
    /// next sync).
    ///
    /// Waits when the queue is full (backpressure). Fails only when the writer
    /// task has ended.
    pub async fn submit(
        &self,
        payload: Payload,
    ) -> Result<oneshot::Receiver<Result<Record, StoreError>>, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(Submission::One(payload, tx)).await?;
        Ok(rx)
    }

    /// All-or-nothing batch: the payloads are stored together (consecutive seqs) or
    /// not at all; answered after the journal sync that covers them.
    pub async fn submit_batch(&self, payloads: Vec<Payload>) -> Result<Vec<Record>, StoreError> {
        if payloads.is_empty() {
            return Ok(Vec::new());
        }
        let (tx, rx) = oneshot::channel();
        self.send(Submission::Batch(payloads, tx)).await?;
        rx.await.map_err(|_| StoreError::WriterClosed)?
    }

    async fn send(&self, submission: Submission) -> Result<(), StoreError> {
        let pending = Pending {
            submission,
            since: Instant::now(),
        };
        self.tx
            .send(pending)
            .await
            .map_err(|_| StoreError::WriterClosed)
    }
}

/// Starts the group-commit task (call from within a tokio runtime).
///
/// A batch is committed once `flush_interval` has passed since its first
/// submission or `max_batch` payloads are pending, whichever comes first. Each
/// commit's records are sent on `committed`.
pub fn start_writer(
    store: Arc<Store>,
    flush_interval: Duration,
    max_batch: usize,
    committed: broadcast::Sender<Arc<Vec<Record>>>,
) -> (StoreWriter, tokio::task::JoinHandle<()>) {
    let max_batch = max_batch.max(1);
    // Room for a full batch to queue up while the previous one is being flushed.
    let (tx, rx) = mpsc::channel(max_batch.clamp(64, 65_536) * 2);
    let hold_max = store.hold_max;
    let task = Writer {
        store,
        flush_interval,
        max_batch,
        hold_max,
        committed,
        held: VecDeque::new(),
        held_count: 0,
        in_retry: 0,
        held_dropped: 0,
        unreported: 0,
        blocked: None,
        retry_at: Instant::now(),
        awaiting: VecDeque::new(),
        syncing: None,
        sync_again: false,
    };
    (StoreWriter { tx }, tokio::spawn(task.run(rx)))
}

/// Who waits for a commit.
enum Reply {
    One(oneshot::Sender<Result<Record, StoreError>>),
    Batch(oneshot::Sender<Result<Vec<Record>, StoreError>>),
    /// The writer's own record (a drop event): nobody waits.
    Internal,
}

/// Submitted payloads and their reply, while they wait for a commit.
struct Entry {
    payloads: Vec<Payload>,
    reply: Reply,
}

impl Entry {
    fn from_submission(submission: Submission) -> Entry {
        match submission {
            Submission::One(p, tx) => Entry {
                payloads: vec![p],
                reply: Reply::One(tx),
            },
            Submission::Batch(ps, tx) => Entry {
                payloads: ps,
                reply: Reply::Batch(tx),
            },
        }
    }

    fn fail(self, e: &StoreError) {
        match self.reply {
            Reply::One(tx) => {
                let _ = tx.send(Err(e.clone()));
            }
            Reply::Batch(tx) => {
                let _ = tx.send(Err(e.clone()));
            }
            Reply::Internal => {}
        }
    }
}

struct Writer {
    store: Arc<Store>,
    flush_interval: Duration,
    max_batch: usize,
    hold_max: usize,
    committed: broadcast::Sender<Arc<Vec<Record>>>,
    /// Entries the store refused, oldest first, with everything submitted since.
    held: VecDeque<Entry>,
    /// Payloads in `held`.
    held_count: usize,
    /// Payloads taken out of `held` for a retry that is under way.
    in_retry: usize,
    /// Payloads dropped beyond `hold_max` since start.
    held_dropped: u64,
    /// Of those, not yet announced by a drop event.
    unreported: u64,
    /// Why commits are refused; `None` while they go through.
    blocked: Option<StoreError>,
    /// When the next retry is due while blocked.
    retry_at: Instant,
    /// Batches stored but not answered yet: (last seq, reply, records), waiting for
    /// the sync that covers them.
    awaiting: VecDeque<Awaiting>,
    /// The journal sync under way.
    syncing: Option<tokio::task::JoinHandle<Result<u64, StoreError>>>,
    /// Another sync is wanted once this one ends.
    sync_again: bool,
}

/// A stored batch waiting for its sync: (last seq, reply, records).
type Awaiting = (
    u64,
    oneshot::Sender<Result<Vec<Record>, StoreError>>,
    Vec<Record>,
);

/// Waits for the sync under way, if any (pending forever otherwise).
async fn join_sync(
    task: &mut Option<tokio::task::JoinHandle<Result<u64, StoreError>>>,
) -> Result<u64, StoreError> {
    match task {
        Some(t) => match t.await {
            Ok(r) => r,
            Err(e) => Err(StoreError::Task(e.to_string())),
        },
        None => std::future::pending().await,
    }
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Pending>) {
        let mut closed = false;
        // A record waits at most `sync_every` for its sync: the clock looks ten
        // times per interval and syncs once the oldest unsynced record has waited
        // nine tenths of it.
        let sync_every = self.store.sync_interval();
        let step = (sync_every / 10).max(Duration::from_millis(1));
        let mut tick = tokio::time::interval(step);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !closed {
            let mut syncing = self.syncing.take();
            let mut first = None;
            tokio::select! {
                biased;
                done = join_sync(&mut syncing) => {
                    syncing = None;
                    self.synced(done);
                }
                _ = tick.tick() => {
                    self.syncing = syncing.take();
                    // A sync the upstream or a cursor write asked for resets the age.
                    if self
                        .store
                        .unsynced_age()
                        .is_some_and(|age| age + step >= sync_every)
                    {
                        self.start_sync();
                    }
                }
                next = rx.recv() => match next {
                    Some(p) if self.blocked.is_some() => self.hold(Entry::from_submission(p.submission)),
                    Some(p) => first = Some(p),
                    None => closed = true,
                },
                // A fixed deadline: a steady stream of submissions must not keep
                // pushing the retry back.
                _ = tokio::time::sleep_until(self.retry_at), if self.blocked.is_some() => {
                    self.syncing = syncing.take();
                    self.retry().await;
                    self.retry_at = Instant::now() + RETRY_EVERY;
                }
            }
            if syncing.is_some() {
                self.syncing = syncing;
            }
            let Some(first) = first else { continue };
            let deadline = first.since + self.flush_interval;
            let mut count = first.submission.len();
            let mut batch = vec![Entry::from_submission(first.submission)];
            loop {
                // Take what is already queued first: after a slow append the deadline
                // of the queued submissions has passed, and they still belong together.
                while count < self.max_batch {
                    match rx.try_recv() {
                        Ok(p) => {
                            count += p.submission.len();
                            batch.push(Entry::from_submission(p.submission));
                        }
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => {
                            closed = true;
                            break;
                        }
                    }
                }
                if closed || count >= self.max_batch || Instant::now() >= deadline {
                    break;
                }
                tokio::select! {
                    // Take what is already queued before looking at the clock: an
                    // unbiased select would cut the next batch short at random.
                    biased;
                    next = rx.recv() => match next {
                        Some(p) => {
                            count += p.submission.len();
                            batch.push(Entry::from_submission(p.submission));
                        }
                        None => closed = true,
                    },
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
            if let Err(unwritten) = self.commit(batch).await {
                for entry in unwritten {
                    self.hold(entry);
                }
            }
        }
        if self.blocked.is_some() {
            // Every submitter is gone: one last try, then what is still held is lost.
            self.retry().await;
            if let Some(e) = self.blocked.take() {
                let lost = self.held_count;
                for entry in self.held.drain(..) {
                    entry.fail(&e);
                }
                tracing::error!(
                    target: "edge_agent::store",
                    records = lost, error = %e,
                    "store writer stopping with records it could not write; they are lost"
                );
            }
        }
        // The last sync: everything appended is made durable and every batch answered.
        while self.syncing.is_some() || !self.awaiting.is_empty() || self.store.sync_due() {
            if self.syncing.is_none() {
                self.start_sync();
            }
            let done = join_sync(&mut self.syncing).await;
            self.syncing = None;
            let failed = done.is_err();
            self.synced(done);
            if failed {
                break;
            }
        }
        // A clean stop: a restart after a reboot need not skip the leased seqs.
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || store.close_lease()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(target: "edge_agent::store", error = %e, "cannot close the seq lease")
            }
            Err(e) => {
                tracing::warn!(target: "edge_agent::store", error = %e, "cannot close the seq lease")
            }
        }
        tracing::debug!(target: "edge_agent::store", "store writer stopped");
    }

    /// Starts a journal sync on the blocking pool, or asks for another one after the
    /// sync under way (records appended during a sync are not covered by it).
    fn start_sync(&mut self) {
        if self.syncing.is_some() {
            self.sync_again = true;
            return;
        }
        self.sync_again = false;
        let store = Arc::clone(&self.store);
        self.syncing = Some(tokio::task::spawn_blocking(move || store.sync()));
    }

    /// A sync ended: the batches it covers are answered.
    fn synced(&mut self, done: Result<u64, StoreError>) {
        match done {
            Ok(through) => {
                while self
                    .awaiting
                    .front()
                    .is_some_and(|(last, _, _)| *last <= through)
                {
                    if let Some((_, tx, records)) = self.awaiting.pop_front() {
                        let _ = tx.send(Ok(records));
                    }
                }
                if self.sync_again || !self.awaiting.is_empty() {
                    self.start_sync();
                }
            }
            Err(e) => {
                tracing::warn!(target: "edge_agent::store", error = %e, "journal sync failed");
                for (_, tx, _) in self.awaiting.drain(..) {
                    let _ = tx.send(Err(e.clone()));
                }
                self.sync_again = false;
                if e.is_write_failure() && self.store.has_failed() {
                    // The store takes no more writes: new submissions are held.
                    self.block(e);
                }
            }
        }
    }

    /// Commits `batch` in one append. Answers the submitters, publishes the records
    /// and runs the quota pass. When the store refuses the write, the entries come
    /// back (and the writer is blocked); a payload's own fault is answered.
    async fn commit(&mut self, batch: Vec<Entry>) -> Result<(), Vec<Entry>> {
        let mut payloads = Vec::with_capacity(batch.iter().map(|e| e.payloads.len()).sum());
        let mut replies = Vec::with_capacity(batch.len());
        for entry in batch {
            replies.push((entry.payloads.len(), entry.reply));
            payloads.extend(entry.payloads);
        }
        let count = payloads.len();
        let store = Arc::clone(&self.store);
        let result = match tokio::task::spawn_blocking(move || store.try_append(payloads)).await {
            Ok(result) => result,
            // The payloads went with the panicked task: answer with the error.
            Err(e) => Err((StoreError::Task(e.to_string()), Vec::new())),
        };
        let records = match result {
            Ok(records) => records,
            Err((e, payloads)) if e.is_write_failure() && payloads.len() == count => {
                self.block(e);
                // Rebuild the entries, in order, for the retry.
                let mut payloads = payloads.into_iter();
                return Err(replies
                    .into_iter()
                    .map(|(n, reply)| Entry {
                        payloads: payloads.by_ref().take(n).collect(),
                        reply,
                    })
                    .collect());
            }
            Err((e, _)) => {
                tracing::warn!(target: "edge_agent::store", error = %e, records = count, "commit failed");
                for (_, reply) in replies {
                    Entry {
                        payloads: Vec::new(),
                        reply,
                    }
                    .fail(&e);
                }
                return Ok(());
            }
        };
        self.unblock();
        if let (Some(first), Some(last)) = (records.first(), records.last()) {
            // The crash test parses this exact line.
            tracing::debug!(target: "edge_agent::store", "committed seq {}..={}", first.seq, last.seq);
        }
        if self.committed.receiver_count() > 0 {
            // Nobody listening is fine: the records are durable either way.
            let _ = self.committed.send(Arc::new(records.clone()));
        }
        let mut records = records.into_iter();
        for (n, reply) in replies {
            match reply {
                Reply::One(tx) => {
                    if let Some(rec) = records.next() {
                        let _ = tx.send(Ok(rec));
                    }
                }
                Reply::Batch(tx) => {
                    let batch: Vec<Record> = records.by_ref().take(n).collect();
                    match batch.last().map(|r| r.seq) {
                        Some(last) if last > self.store.synced_seq() => {
                            self.awaiting.push_back((last, tx, batch));
                        }
                        _ => {
                            let _ = tx.send(Ok(batch));
                        }
                    }
                }
                Reply::Internal => {
                    records.by_ref().take(n).for_each(drop);
                }
            }
        }
        if !self.awaiting.is_empty() {
            self.start_sync();
        }
        self.enforce_quota().await;
        Ok(())
    }

    /// Runs a quota pass when the live bytes are over the budget (two atomic loads
    /// otherwise) and commits the drop event it calls for.
    async fn enforce_quota(&mut self) {
        if !self.store.over_quota() {
            return;
        }
        let store = Arc::clone(&self.store);
        let deleted = match tokio::task::spawn_blocking(move || store.enforce_quota()).await {
            Ok(Ok(deleted)) => deleted,
            Ok(Err(e)) => {
                tracing::warn!(target: "edge_agent::store", error = %e, "quota pass failed");
                return;
            }
            Err(e) => {
                tracing::warn!(target: "edge_agent::store", error = %e, "quota pass failed");
                return;
            }
        };
        if deleted.dropped > 0 {
            let event = drop_event(&deleted, self.store.dropped_total());
            self.commit_internal(event).await;
        }
    }

    /// Commits one of the writer's own records; if the store refuses it, it is held
    /// like any submission.
    async fn commit_internal(&mut self, payload: Payload) {
        let entry = Entry {
            payloads: vec![payload],
            reply: Reply::Internal,
        };
        // Boxed: `commit` calls back into here through the quota pass.
        let commit = Box::pin(self.commit(vec![entry]));
        if let Err(unwritten) = commit.await {
            for entry in unwritten {
                self.hold(entry);
            }
        }
    }

    fn block(&mut self, e: StoreError) {
        if self.blocked.is_none() {
            tracing::warn!(
                target: "edge_agent::store",
                error = %e,
                hold_max = self.hold_max,
                "store cannot write; holding new records in memory and retrying"
            );
            self.retry_at = Instant::now() + RETRY_EVERY;
        }
        self.store.set_write_error(Some(e.to_string()));
        self.blocked = Some(e);
        self.publish_hold();
    }

    fn unblock(&mut self) {
        if self.blocked.take().is_some() {
            self.store.set_write_error(None);
            tracing::info!(
                target: "edge_agent::store",
                dropped = self.unreported,
                "store writes again"
            );
            self.publish_hold();
        }
    }

    fn publish_hold(&self) {
        self.store.set_hold(
            self.blocked.is_some(),
            (self.held_count + self.in_retry) as u64,
            self.held_dropped,
        );
    }

    /// Queues `entry` behind the held ones; beyond the bound the oldest go.
    fn hold(&mut self, entry: Entry) {
        self.held_count += entry.payloads.len();
        self.held.push_back(entry);
        let mut dropped = 0;
        while self.held_count > self.hold_max {
            let Some(oldest) = self.held.pop_front() else {
                break;
            };
            self.held_count -= oldest.payloads.len();
            dropped += oldest.payloads.len() as u64;
            let e = self.blocked.clone().unwrap_or(StoreError::NoSpace {
                free: 0,
                reserve: 0,
            });
            oldest.fail(&e);
        }
        if dropped > 0 {
            if self.unreported == 0 {
                tracing::warn!(
                    target: "edge_agent::store",
                    hold_max = self.hold_max,
                    "store still cannot write and the memory bound is reached: dropping the oldest held records"
                );
            }
            self.held_dropped += dropped;
            self.unreported += dropped;
        }
        self.publish_hold();
    }

    /// Tries to commit the held entries, oldest first, a batch at a time.
    async fn retry(&mut self) {
        if self.held.is_empty() {
            // Blocked by an internal record that was dropped meanwhile: try a write.
            if !self.store.has_room() || self.store.has_failed() {
                return;
            }
        }
        while !self.held.is_empty() {
            let mut batch = Vec::new();
            let mut n = 0;
            while let Some(entry) = self.held.front() {
                if n > 0 && n + entry.payloads.len() > self.max_batch {
                    break;
                }
                n += entry.payloads.len();
                if let Some(entry) = self.held.pop_front() {
                    batch.push(entry);
                }
            }
            self.held_count -= n;
            // Still counted as held while it is tried: a refused retry must never show
            // fewer held records than there are.
            self.in_retry = n;
            let result = self.commit(batch).await;
            self.in_retry = 0;
            match result {
                Ok(()) => self.publish_hold(),
                Err(unwritten) => {
                    // Back to the front, in order.
                    for entry in unwritten.into_iter().rev() {
                        self.held_count += entry.payloads.len();
                        self.held.push_front(entry);
                    }
                    self.publish_hold();
                    return;
                }
            }
        }
        self.unblock();
        if self.unreported > 0 {
            let event = Payload::Dropped(DropEvent {
                reason: DropReason::DiskFull,
                ranges: Vec::new(),
                count: self.unreported,
                total: self.held_dropped,
                ts_ms: now_ms(),
            });
            self.unreported = 0;
            self.commit_internal(event).await;
        }
    }
}

/// The record announcing a quota pass's drops.
fn drop_event(deleted: &Deleted, total: u64) -> Payload {
    Payload::Dropped(DropEvent {
        reason: DropReason::Quota,
        ranges: deleted
            .dropped_ranges
            .iter()
            .map(|r| (*r.start(), *r.end()))
            .collect(),
        count: deleted.dropped,
        total,
        ts_ms: now_ms(),
    })
}
