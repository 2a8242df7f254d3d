//! Group commit: one task collects submissions and makes them durable together,
//! one `Store::append` (one fsync) per batch.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;

use super::{Store, StoreError};
use crate::model::{Payload, Record};

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
    /// Enqueue one payload; the returned receiver resolves once it is durable.
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

    /// All-or-nothing batch: the payloads become durable together (one atomic
    /// write, consecutive seqs) or not at all.
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
    let task = tokio::spawn(run(store, flush_interval, max_batch, committed, rx));
    (StoreWriter { tx }, task)
}

async fn run(
    store: Arc<Store>,
    flush_interval: Duration,
    max_batch: usize,
    committed: broadcast::Sender<Arc<Vec<Record>>>,
    mut rx: mpsc::Receiver<Pending>,
) {
    let mut closed = false;
    while !closed {
        let Some(first) = rx.recv().await else { break };
        let deadline = first.since + flush_interval;
        let mut count = first.submission.len();
        let mut batch = vec![first.submission];
        while count < max_batch {
            tokio::select! {
                // Submissions already queued go first: when a commit took longer than
                // `flush_interval` (a slow SD card), the next batch's deadline has
                // passed at once, and an unbiased select would end it after an item or
                // two, turning group commit into one fsync per reading.
                biased;
                next = rx.recv() => match next {
                    Some(p) => {
                        count += p.submission.len();
                        batch.push(p.submission);
                    }
                    None => {
                        closed = true;
                        break;
                    }
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        commit(&store, batch, count, &committed).await;
    }
    tracing::debug!(target: "edge_agent::store", "store writer stopped");
}

enum Reply {
    One(oneshot::Sender<Result<Record, StoreError>>),
    Batch(usize, oneshot::Sender<Result<Vec<Record>, StoreError>>),
}

async fn commit(
    store: &Arc<Store>,
    batch: Vec<Submission>,
    count: usize,
    committed: &broadcast::Sender<Arc<Vec<Record>>>,
) {
    let mut payloads = Vec::with_capacity(count);
    let mut replies = Vec::with_capacity(batch.len());
    for submission in batch {
        match submission {
            Submission::One(p, tx) => {
                payloads.push(p);
                replies.push(Reply::One(tx));
            }
            Submission::Batch(ps, tx) => {
                replies.push(Reply::Batch(ps.len(), tx));
                payloads.extend(ps);
            }
        }
    }
    let task_store = Arc::clone(store);
    let result = match tokio::task::spawn_blocking(move || task_store.append(payloads)).await {
        Ok(result) => result,
        Err(e) => Err(StoreError::Task(e.to_string())),
    };
    let records = match result {
        Ok(records) => records,
        Err(e) => {
            tracing::warn!(target: "edge_agent::store", error = %e, records = count, "commit failed");
            for reply in replies {
                match reply {
                    Reply::One(tx) => {
                        let _ = tx.send(Err(e.clone()));
                    }
                    Reply::Batch(_, tx) => {
                        let _ = tx.send(Err(e.clone()));
                    }
                }
            }
            return;
        }
    };
    if let (Some(first), Some(last)) = (records.first(), records.last()) {
        // The crash test parses this exact line.
        tracing::debug!(target: "edge_agent::store", "committed seq {}..={}", first.seq, last.seq);
    }
    if committed.receiver_count() > 0 {
        // Nobody listening is fine: the records are durable either way.
        let _ = committed.send(Arc::new(records.clone()));
    }
    let mut records = records.into_iter();
    for reply in replies {
        match reply {
            Reply::One(tx) => {
                if let Some(rec) = records.next() {
                    let _ = tx.send(Ok(rec));
                }
            }
            Reply::Batch(n, tx) => {
                let _ = tx.send(Ok(records.by_ref().take(n).collect()));
            }
        }
    }
}
