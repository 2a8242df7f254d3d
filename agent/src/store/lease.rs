//! The seq lease: with a runtime journal (`store.runtime_dir`), records go upstream
//! before their journal sync, and still no seq is ever used for two records.
//!
//! A record sent upstream before its sync can be taken by a power cut; were its seq
//! given to the next record after the restart, upstream would hold two records under
//! one seq. So every sync that finds the lease running short writes a *lease* mark
//! into the journal (`journal.rs` mark frames, durable with that sync): "seqs up to
//! L may be in use", L = the last seq appended + [`LEASE_SEQS`]. The upstream sends
//! records up to the smaller of the last seq appended and the lease made durable
//! ([`Store::sendable_seq`]), so a record outside the durable lease waits for the
//! next sync (which grants a new one). A clean stop writes a *closed* mark equal to
//! the lease ([`Store::close_lease`]).
//!
//! On open the store knows which case it is in:
//! - the runtime journal (a tmpfs: it survives a kill, not a power cut or a reboot)
//!   continues the journal on disk: the agent was killed, every record appended is
//!   back, and the seqs continue after the last one;
//! - it is missing (a power cut, a reboot) and the lease is larger than the closed
//!   mark and than the last seq the disk holds: some seqs up to the lease may have
//!   gone upstream and are lost here. The store continues after the lease and
//!   appends a drop event (reason `power_cut`) naming the seqs it skipped, so that
//!   the upstream side stops waiting for them;
//! - otherwise (a clean stop, then a reboot) nothing is skipped.

use std::sync::atomic::Ordering;

use super::{seq_key, Store, StoreError, Tail, WriteState, META_LAST_SEQ};
use crate::model::{now_ms, DropEvent, DropReason, Payload};

/// How far past the last seq appended a lease reaches. A new lease is written once
/// fewer than half of it are left, so at most a mark every 512 records (one frame of
/// about 50 bytes); more than that between two syncs (a large push, which syncs at
/// once anyway) waits for the next. A power cut skips at most this many seqs past
/// the last one the disk holds.
pub const LEASE_SEQS: u64 = 1024;
/// Sync marks of the lease (`outbox` tree and journal marks).
pub(super) const MARK_LEASE: &str = "lease";
pub(super) const MARK_CLOSED: &str = "closed";

/// The lease under the write lock.
#[derive(Debug, Default)]
pub(super) struct LeaseState {
    /// The largest lease or closed mark written: a new lease reaches past it.
    pub granted: u64,
    /// A lease granted in this run and not closed.
    pub live: bool,
    /// Last seq appended when the lease was closed; a new lease only for later ones.
    pub closed_at: Option<u64>,
}

impl Store {
    /// Called by a sync before the journal is written: writes a new lease mark when
    /// the one in force runs short. Returns it, to be put in force once synced.
    pub(super) fn grant_lease(&self, state: &mut WriteState) -> Result<Option<u64>, StoreError> {
        if !self.lease_mode {
            return Ok(None);
        }
        let appended = state.next_seq - 1;
        if state.lease.closed_at.is_some_and(|at| appended <= at) {
            return Ok(None);
        }
        if state.lease.live && appended + LEASE_SEQS / 2 <= state.lease.granted {
            return Ok(None);
        }
        let lease = (appended + LEASE_SEQS).max(state.lease.granted + 1);
        self.note_write(self.outbox.insert(MARK_LEASE, &seq_key(lease)))?;
        self.journal_mark_locked(state, MARK_LEASE, lease)?;
        state.lease = LeaseState {
            granted: lease,
            live: true,
            closed_at: None,
        };
        Ok(Some(lease))
    }

    /// A lease's mark is synced: the upstream may send records up to it.
    pub(super) fn lease_in_force(&self, lease: u64) {
        self.leased.fetch_max(lease, Ordering::AcqRel);
        self.synced_tx.send_replace(self.synced_seq());
    }

    /// The last seq the upstream may send: every synced record and, under a seq
    /// lease, every record appended up to the lease.
    pub fn sendable_seq(&self) -> u64 {
        let synced = self.synced_seq();
        if !self.lease_mode {
            return synced;
        }
        synced.max(self.last_seq().min(self.leased.load(Ordering::Acquire)))
    }

    /// A clean stop: the lease is closed (a restart after a reboot skips nothing)
    /// and everything appended is synced. Records appended later are sent after
    /// their sync until a new lease is granted.
    pub fn close_lease(&self) -> Result<(), StoreError> {
        if !self.lease_mode || self.has_failed() {
            return Ok(());
        }
        {
            let mut state = self.write.lock().unwrap_or_else(|e| e.into_inner());
            let closed = state.lease.granted;
            self.note_write(self.outbox.insert(MARK_CLOSED, &seq_key(closed)))?;
            self.journal_mark_locked(&mut state, MARK_CLOSED, closed)?;
            state.lease.live = false;
            state.lease.closed_at = Some(state.next_seq - 1);
            self.leased.store(0, Ordering::Release);
        }
        self.sync().map(drop)
    }

    /// After a power cut that took the runtime journal: continues after the lease,
    /// with a drop event naming the seqs `from..=to` skipped.
    pub(super) fn skip_past_lease(&self, from: u64, to: u64) -> Result<(), StoreError> {
        {
            let mut state = self.write.lock().unwrap_or_else(|e| e.into_inner());
            let state = &mut *state;
            let mut tail = self.tail.write().unwrap_or_else(|e| e.into_inner());
            // The open block goes into sled as it is: the next one starts past the
            // lease.
            if tail.count() > 0 {
                self.seal(state, &mut tail);
                if tail.count() > 0 {
                    return Err(StoreError::Journal(
                        "cannot move the open block into sled".into(),
                    ));
                }
            }
            self.note_write(self.meta.insert(META_LAST_SEQ, &seq_key(to)))?;
            self.note_write(self.db.flush())?;
            let kept = from - 1;
            // sled holds those records and the marks (`outbox::restore_marks`) now.
            let marks = state.journal.marks_written();
            for j in std::iter::once(&mut state.journal).chain(state.runtime.as_mut()) {
                j.release_through(kept);
                j.release_marks(marks);
            }
            *tail = Tail::new(to + 1);
            state.next_seq = to + 1;
            state.lease.granted = state.lease.granted.max(to);
            self.sled_last.store(to, Ordering::Release);
            self.durable_last.store(to, Ordering::Release);
            self.synced_last.store(to, Ordering::Release);
            self.synced_tx.send_replace(to);
        }
        tracing::warn!(
            target: "edge_agent::store",
            from, to,
            "the runtime journal is gone (power cut or reboot) and seqs up to the lease may \
             have gone upstream: continuing after the lease, the skipped seqs declared dropped"
        );
        self.append(vec![Payload::Dropped(DropEvent {
            reason: DropReason::PowerCut,
            ranges: vec![(from, to)],
            count: to - from + 1,
            total: self.dropped_total(),
            ts_ms: now_ms(),
        })])
        .map(drop)
    }
}
