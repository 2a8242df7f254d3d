//! The journal in the store: replay on open (torn tail, damage, empty segments) and
//! a power cut modelled at the disk: only what a sync or a sled flush made durable
//! is kept, with any of the pages written since.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::broadcast;

use super::bench::sample_payload;
use super::testing::{self, DiskEvent};
use super::*;
use crate::config::units::{ByteSize, HumanDuration};

fn cfg(dir: &Path) -> StoreConfig {
    StoreConfig {
        path: dir.join("store"),
        cache_capacity: ByteSize(4 << 20),
        journal_segment_size: ByteSize(64 << 10),
        journal_segments: 4,
        // The journal on disk alone (`buffered`); `runtime_cfg` adds a runtime journal.
        runtime_dir: PathBuf::new(),
        ..StoreConfig::default()
    }
}

fn payloads(meter: &str, from: u64, n: u64) -> Vec<Payload> {
    (from..from + n).map(|i| sample_payload(meter, i)).collect()
}

/// Readings of three values: 32 of them fill a block, so up to 31 stay in the
/// journal and the open block.
fn small(from: u64, n: u64) -> Vec<Payload> {
    (from..from + n)
        .map(|i| {
            let mut p = sample_payload("m", i);
            if let Payload::Reading(r) = &mut p {
                r.values.truncate(3);
            }
            p
        })
        .collect()
}

/// (offset, length) of every frame in a journal segment file, in file order.
fn frames(segment: &Path) -> Vec<(usize, usize)> {
    let data = std::fs::read(segment).expect("read segment");
    let mut out = Vec::new();
    let mut at = journal::HEADER_BYTES as usize;
    while at + journal::FRAME_OVERHEAD <= data.len() {
        let len = u32::from_le_bytes(data[at..at + 4].try_into().expect("4 bytes")) as usize;
        if len == 0 {
            break;
        }
        let frame = (journal::FRAME_OVERHEAD + len).div_ceil(8) * 8;
        out.push((at, frame));
        at += frame;
    }
    out
}

fn segment(cfg: &StoreConfig) -> PathBuf {
    cfg.journal_path().join("000.seg")
}

fn patch(path: &Path, at: usize, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open segment");
    file.write_all_at(bytes, at as u64).expect("patch");
}

#[test]
fn records_past_sleds_last_block_come_back_from_the_journal_after_a_kill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = cfg(dir.path());
    let store = testing::open(&cfg);
    // 40 records: one block in sled, 8 in the open block; nothing synced or flushed
    // (a kill keeps the page cache).
    store.append(small(0, 40)).expect("append");
    drop(store);
    let store = testing::open(&cfg);
    assert_eq!(store.last_seq(), 40);
    let all = store.read_range(1, 100).expect("read");
    assert_eq!(all.len(), 40);
    for (rec, i) in all.iter().zip(0..) {
        assert_eq!(rec.payload, small(i, 1)[0]);
    }
    assert!(verify(&store).expect("verify").is_clean());
    assert_eq!(store.append(small(40, 1)).expect("append")[0].seq, 41);
}

#[test]
fn a_torn_last_frame_is_cut_not_quarantined() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = cfg(dir.path());
    let store = testing::open(&cfg);
    store.append(small(0, 10)).expect("append");
    store.sync().expect("sync");
    store.append(small(10, 1)).expect("append");
    drop(store);
    // The last frame only half written when the power went.
    let (at, len) = *frames(&segment(&cfg)).last().expect("frames");
    patch(&segment(&cfg), at + len / 2, &vec![0u8; len - len / 2]);

    let store = testing::open(&cfg);
    assert_eq!(store.last_seq(), 10);
    assert_eq!(store.read_range(1, 100).expect("read").len(), 10);
    assert_eq!(store.stats().quarantined, 0);
    assert!(verify(&store).expect("verify").is_clean());
    // It was never synced nor handed on: its seq is taken by the next record.
    assert_eq!(store.append(small(11, 1)).expect("append")[0].seq, 11);
    drop(store);
    let store = testing::open(&cfg);
    assert_eq!(store.last_seq(), 11);
    assert!(verify(&store).expect("verify").is_clean());
}

#[test]
fn a_corrupt_middle_frame_is_quarantined_and_counted_and_the_rest_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = cfg(dir.path());
    let store = testing::open(&cfg);
    store.append(small(0, 10)).expect("append");
    store.sync().expect("sync");
    store.append(small(10, 10)).expect("append");
    store.sync().expect("sync");
    drop(store);
    // Seq 5 had been synced (the later frames say so): its bytes went bad on disk.
    let (at, _) = frames(&segment(&cfg))[4];
    patch(&segment(&cfg), at + journal::FRAME_OVERHEAD, b"XX");

    let store = testing::open(&cfg);
    assert_eq!(store.last_seq(), 20);
    let seqs: Vec<u64> = store
        .read_range(1, 100)
        .expect("read")
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(seqs, (1..=20).filter(|&s| s != 5).collect::<Vec<_>>());
    assert_eq!(store.stats().quarantined, 1);
    let report = verify(&store).expect("verify");
    assert_eq!((report.quarantined, report.ok), (1, 19), "{report:?}");
    assert!(
        report.gaps.is_empty() && report.duplicates == 0,
        "{report:?}"
    );
    // Counted once, however often it is read.
    assert_eq!(store.stats().quarantined, 1);
}

#[test]
fn an_empty_or_preallocated_journal_replays_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = cfg(dir.path());
    drop(testing::open(&cfg));
    let sizes = |cfg: &StoreConfig| -> Vec<u64> {
        (0..4)
            .map(|i| {
                std::fs::metadata(cfg.journal_path().join(format!("{i:03}.seg")))
                    .expect("segment")
                    .len()
            })
            .collect()
    };
    assert_eq!(sizes(&cfg), vec![64 << 10; 4]);
    let store = testing::open(&cfg);
    assert_eq!((store.last_seq(), store.synced_seq()), (0, 0));
    assert!(store.read_range(1, 10).expect("read").is_empty());
    store.append(small(0, 5)).expect("append");
    store.sync().expect("sync");
    drop(store);
    // Zeros after the last frame: the preallocated rest of the segment.
    let store = testing::open(&cfg);
    assert_eq!(store.last_seq(), 5);
    assert_eq!(store.stats().quarantined, 0);
    assert!(verify(&store).expect("verify").is_clean());
    assert_eq!(sizes(&cfg), vec![64 << 10; 4]);
}

/// The disk as a power cut leaves it: sled as of its last flush, the journal as of
/// its last sync, each copied when the store says it reached the disk.
struct Disk {
    live: PathBuf,
    sled: PathBuf,
    journal: PathBuf,
    /// The journal's files as they were in the page cache at the cut.
    at_cut: PathBuf,
    frozen: AtomicBool,
    copying: Mutex<()>,
}

fn copy_dir(from: &Path, to: &Path, skip: Option<&str>) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir").flatten() {
        let name = entry.file_name();
        if skip.is_some_and(|s| name == s) {
            continue;
        }
        let target = to.join(&name);
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target, None);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

impl Disk {
    fn new(live: &Path, root: &Path) -> Arc<Disk> {
        let disk = Arc::new(Disk {
            live: live.to_path_buf(),
            sled: root.join("sled"),
            journal: root.join("journal"),
            at_cut: root.join("at-cut"),
            frozen: AtomicBool::new(false),
            copying: Mutex::new(()),
        });
        disk.event(DiskEvent::SledFlushed);
        disk.event(DiskEvent::JournalSynced);
        disk
    }

    fn event(&self, event: DiskEvent) {
        let _one = self.copying.lock().expect("lock");
        if self.frozen.load(Ordering::SeqCst) {
            return;
        }
        match event {
            DiskEvent::SledFlushed => copy_dir(&self.live, &self.sled, Some("journal")),
            DiskEvent::JournalSynced => copy_dir(&self.live.join("journal"), &self.journal, None),
        }
    }

    /// The power goes: nothing reaches the disk from now on. What the page cache
    /// held then is kept for [`Disk::restore`] (appends held meanwhile).
    fn cut(&self, store: &Store) {
        // The lock order of the store's hook: appends first, then the copying.
        store.with_appends_held(|| {
            let _one = self.copying.lock().expect("lock");
            self.frozen.store(true, Ordering::SeqCst);
            copy_dir(&self.live.join("journal"), &self.at_cut, None);
        });
    }

    /// The store as the disk holds it after the cut, in `to`: the synced journal with
    /// any 4 KiB page written since kept or not (write-back order is arbitrary).
    fn restore(&self, to: &Path, rng: &mut impl Rng) -> usize {
        copy_dir(&self.sled, to, None);
        let journal = to.join("journal");
        copy_dir(&self.journal, &journal, None);
        let mut kept = 0;
        for entry in std::fs::read_dir(&journal).expect("read dir").flatten() {
            let synced = std::fs::read(entry.path()).expect("read");
            let Ok(now) = std::fs::read(self.at_cut.join(entry.file_name())) else {
                continue;
            };
            let mut out = synced.clone();
            for (page, (a, b)) in synced.chunks(4096).zip(now.chunks(4096)).enumerate() {
                if a != b && rng.gen_bool(0.5) {
                    out[page * 4096..page * 4096 + b.len()].copy_from_slice(b);
                    kept += 1;
                }
            }
            std::fs::write(entry.path(), out).expect("write");
        }
        kept
    }
}

/// Power cuts at random points while readings are polled, pushes answered and
/// records sent upstream: the store opens clean (a torn tail cut), no acknowledged
/// push is lost, polled readings are lost only from the last `sync_interval`, and
/// every seq sent upstream still holds the record that was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_loses_no_acknowledged_push_and_at_most_a_sync_interval_of_polls() {
    const CUTS: usize = 6;
    let sync_interval = Duration::from_millis(200);
    let mut rng = rand::thread_rng();
    let mut lost_total = 0;
    for round in 0..CUTS {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = StoreConfig {
            sync_interval: HumanDuration(sync_interval),
            ..cfg(dir.path())
        };
        let store = Arc::new(testing::open(&cfg));
        let disk = Disk::new(&cfg.path, &dir.path().join("disk"));
        let hook_disk = disk.clone();
        store.on_disk_event(Arc::new(move |e| hook_disk.event(e)));
        let (committed, _) = broadcast::channel(1024);
        let (writer, task) = start_writer(
            Arc::clone(&store),
            Duration::from_millis(2),
            1000,
            committed,
        );
        let stop = Arc::new(AtomicBool::new(false));

        // Polling: one reading every 2 ms, not waiting for a sync.
        let polled: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
        let poller = {
            let (writer, stop, polled) = (writer.clone(), stop.clone(), polled.clone());
            tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    let rx = writer
                        .submit(sample_payload("poll", i))
                        .await
                        .expect("submit");
                    i += 1;
                    let polled = polled.clone();
                    tokio::spawn(async move {
                        if let Ok(Ok(rec)) = rx.await {
                            polled.lock().expect("lock").push((rec.seq, Instant::now()));
                        }
                    });
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        };
        // Pushes: batches of 3, acknowledged after their sync.
        let pushed: Arc<Mutex<Vec<Record>>> = Arc::default();
        let frozen = Arc::new(AtomicBool::new(false));
        let pusher = {
            let (writer, stop, pushed, frozen) =
                (writer.clone(), stop.clone(), pushed.clone(), frozen.clone());
            tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    let batch = writer.submit_batch(payloads("push", i, 3)).await;
                    i += 3;
                    // An answer after the cut would never have reached the client.
                    if let (Ok(records), false) = (batch, frozen.load(Ordering::SeqCst)) {
                        pushed.lock().expect("lock").extend(records);
                    }
                    tokio::time::sleep(Duration::from_millis(15)).await;
                }
            })
        };
        // Upstream: sends synced records only, asking for a sync when it waits, and
        // writes its cursor now and then.
        let sent: Arc<Mutex<HashMap<u64, Vec<u8>>>> = Arc::default();
        let upstream = {
            let (store, stop, sent, frozen) =
                (store.clone(), stop.clone(), sent.clone(), frozen.clone());
            tokio::task::spawn_blocking(move || {
                let mut next = 1;
                let mut batches = 0;
                while !stop.load(Ordering::SeqCst) {
                    let synced = store.synced_seq();
                    if next > synced {
                        if next <= store.last_seq() {
                            store.sync().expect("sync");
                        } else {
                            std::thread::sleep(Duration::from_millis(3));
                        }
                        continue;
                    }
                    // As the sync task reads: up to the synced seq.
                    let raw = store.read_raw(next, synced, 50, 1 << 20).expect("read");
                    if frozen.load(Ordering::SeqCst) {
                        break;
                    }
                    let mut sent = sent.lock().expect("lock");
                    for r in raw.records {
                        sent.insert(r.seq, r.bytes);
                    }
                    next = raw.covered_to + 1;
                    batches += 1;
                    if batches % 10 == 0 {
                        store
                            .set_sync_mark(CURSOR_MARK, raw.covered_to)
                            .expect("cursor");
                    }
                }
            })
        };

        tokio::time::sleep(Duration::from_millis(rng.gen_range(300..900))).await;
        // Every seq synced so far reached the disk before it was published.
        let synced_at_cut = store.synced_seq();
        // Sent upstream or answered from here on: never seen (checked after the read
        // or the answer, so anything counted reached the disk before the cut).
        frozen.store(true, Ordering::SeqCst);
        disk.cut(&store);
        let cut_at = Instant::now();
        stop.store(true, Ordering::SeqCst);
        poller.await.expect("poller");
        pusher.await.expect("pusher");
        upstream.await.expect("upstream");
        drop(writer);
        task.await.expect("writer");

        let restored = dir.path().join("restored");
        let kept_pages = disk.restore(&restored, &mut rng);
        let store = testing::open(&StoreConfig {
            path: restored.clone(),
            journal_dir: PathBuf::new(),
            ..cfg.clone()
        });
        let report = verify(&store).expect("verify");
        assert!(report.is_clean(), "round {round}: {report:?}");
        let last = store.last_seq();
        let held: HashMap<u64, Record> = store
            .read_range(1, last)
            .expect("read")
            .into_iter()
            .map(|r| (r.seq, r))
            .collect();
        assert_eq!(held.len() as u64, last, "round {round}");

        let pushed = pushed.lock().expect("lock").clone();
        for rec in &pushed {
            assert_eq!(
                held.get(&rec.seq),
                Some(rec),
                "round {round}: acknowledged push seq {} lost",
                rec.seq
            );
        }
        let polled = polled.lock().expect("lock").clone();
        let lost: Vec<&(u64, Instant)> = polled
            .iter()
            .filter(|(seq, _)| {
                held.get(seq)
                    .and_then(|r| r.payload.as_reading())
                    .is_none_or(|r| r.meter != "poll")
            })
            .collect();
        for (seq, at) in &lost {
            assert!(*seq > synced_at_cut, "round {round}: synced seq {seq} lost");
            let age = cut_at.saturating_duration_since(*at);
            assert!(
                age <= sync_interval + Duration::from_millis(300),
                "round {round}: seq {seq} accepted {age:?} before the cut was lost"
            );
        }
        // No seq sent upstream is ever used for another record.
        let raw = store
            .read_raw(1, last, usize::MAX, usize::MAX)
            .expect("raw");
        let now: HashMap<u64, Vec<u8>> =
            raw.records.into_iter().map(|r| (r.seq, r.bytes)).collect();
        let sent = sent.lock().expect("lock").clone();
        for (seq, bytes) in &sent {
            assert!(
                now.get(seq) == Some(bytes),
                "round {round}: seq {seq} sent upstream is {}; last {last}, synced at the cut {synced_at_cut}, {} sent, {} pages kept",
                if now.contains_key(seq) { "another record" } else { "missing" },
                sent.len(),
                kept_pages,
            );
        }
        // New records continue after what the disk kept.
        let next = store.append(payloads("poll", 0, 1)).expect("append")[0].seq;
        assert_eq!(next, last + 1);
        assert!(
            sent.keys().all(|s| *s <= last),
            "round {round}: a seq sent upstream is past the store's end"
        );
        println!(
            "round {round}: {} polled ({} lost), {} pushed, {} sent upstream, last seq {last}, {kept_pages} unsynced pages kept",
            polled.len(),
            lost.len(),
            pushed.len(),
            sent.len()
        );
        lost_total += lost.len();
        assert!(
            !pushed.is_empty() && !sent.is_empty(),
            "round {round}: too little traffic"
        );
    }
    println!("{lost_total} polled readings lost in {CUTS} cuts");
}

/// The upstream cursor of a live trickle goes with the next journal sync: no sync
/// (no fsync) of its own, and durable once that sync returns.
#[tokio::test]
async fn a_cursor_write_rides_on_the_next_journal_sync() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = StoreConfig {
        // Far longer than the test: a sync of the cursor's own would be a timeout.
        sync_interval: HumanDuration(Duration::from_secs(30)),
        ..cfg(dir.path())
    };
    let store = Arc::new(testing::open(&cfg));
    store.append(small(0, 5)).expect("append");
    let started = store.syncs_started();
    let writer = {
        let store = store.clone();
        std::thread::spawn(move || store.set_sync_mark_with_next_sync(CURSOR_MARK, 5))
    };
    // The cursor is written but waits: nothing synced it yet.
    crate::testkit::wait_until("the mark is written", Duration::from_secs(10), || {
        store.sync_mark(CURSOR_MARK).expect("mark") == 5
    })
    .await;
    // Room for a writer that does not wait to finish (the negative check below).
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !writer.is_finished(),
        "the cursor write waits for a journal sync"
    );
    // The journal's sync (the writer's, every sync_interval) makes both durable.
    assert_eq!(store.sync().expect("sync"), 5);
    writer.join().expect("thread").expect("cursor");
    assert_eq!(store.syncs_started(), started + 1, "one sync for both");
    drop(store);
    let store = testing::open(&cfg);
    assert_eq!(store.sync_mark(CURSOR_MARK).expect("mark"), 5);
}

/// The upstream cursor is made durable by the journal's sync alone: no sled flush
/// while it advances, and it survives a power cut (sled as of its last flush, the
/// journal as of its last sync).
#[test]
fn the_cursor_survives_a_power_cut_without_a_sled_flush() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = cfg(dir.path());
    let store = testing::open(&cfg);
    let disk = Disk::new(&cfg.path, &dir.path().join("disk"));
    let flushes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (hook_disk, hook_flushes) = (disk.clone(), flushes.clone());
    store.on_disk_event(Arc::new(move |e| {
        if e == DiskEvent::SledFlushed {
            hook_flushes.fetch_add(1, Ordering::SeqCst);
        }
        hook_disk.event(e)
    }));
    // The first reading's schema is flushed into sled when it first appears.
    store.append(small(0, 5)).expect("append");
    flushes.store(0, Ordering::SeqCst);
    for i in 0..10 {
        if i > 0 {
            store.append(small(i * 5, 5)).expect("append");
        }
        store
            .set_sync_mark(CURSOR_MARK, (i + 1) * 5)
            .expect("cursor");
    }
    assert_eq!(flushes.load(Ordering::SeqCst), 0, "no sled flush");
    disk.cut(&store);
    drop(store);
    let after = dir.path().join("after");
    disk.restore(&after, &mut rand::thread_rng());
    let store = testing::open(&StoreConfig {
        path: after,
        ..cfg.clone()
    });
    assert_eq!(store.sync_mark(CURSOR_MARK).expect("cursor"), 50);
    assert_eq!(store.last_seq(), 50);
    assert!(verify(&store).expect("verify").is_clean());
}

fn runtime_cfg(dir: &Path) -> StoreConfig {
    StoreConfig {
        runtime_dir: dir.join("run"),
        ..cfg(dir)
    }
}

fn assert_direct(store: &Store) {
    assert_eq!(
        store.stats().journal,
        "runtime+direct",
        "O_DIRECT is refused on the temp dir's filesystem; run the tests from a directory \
         on ext4 or xfs (TMPDIR)"
    );
}

/// A kill with a runtime journal: the journal on disk holds only what its last sync
/// wrote (direct mode writes at syncs), the runtime journal every record. Nothing
/// is lost, the seqs continue right after the last record (no lease skip), and
/// what came back from the runtime journal is on the disk from then on.
#[test]
fn a_kill_loses_nothing_with_the_runtime_journal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = runtime_cfg(dir.path());
    let store = testing::open(&cfg);
    assert_direct(&store);
    store.append(small(0, 10)).expect("append");
    store.sync().expect("sync");
    store.append(small(10, 30)).expect("append");
    assert_eq!(store.synced_seq(), 10);
    assert_eq!(
        store.sendable_seq(),
        40,
        "the lease covers them before their sync"
    );
    // A kill: the process's memory (the direct journal's unsynced frames) is gone.
    drop(store);
    let store = testing::open(&cfg);
    assert_eq!(store.last_seq(), 40);
    let all = store.read_range(1, u64::MAX).expect("read");
    assert_eq!(all.len(), 40);
    for (rec, i) in all.iter().zip(0..) {
        assert_eq!(rec.payload, small(i, 1)[0]);
    }
    assert!(verify(&store).expect("verify").is_clean());
    drop(store);
    // The records replayed from the runtime journal were synced to the disk at open:
    // they survive the runtime journal too (a reboot), only later seqs are skipped.
    std::fs::remove_dir_all(&cfg.runtime_dir).expect("reboot");
    let store = testing::open(&cfg);
    assert_eq!(store.read_range(1, 40).expect("read").len(), 40);
    let next = store.append(small(40, 1)).expect("append")[0].seq;
    assert!(next > 40 + LEASE_SEQS / 2, "seq {next} is past the lease");
}

/// A power cut takes the runtime journal and the records not yet synced, some of
/// which may have gone upstream under the lease: the store continues past the
/// lease, never reusing those seqs, and a drop event declares them.
#[test]
fn a_power_cut_skips_past_the_lease_and_never_reuses_a_seq() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = runtime_cfg(dir.path());
    let store = testing::open(&cfg);
    assert_direct(&store);
    let disk = Disk::new(&cfg.path, &dir.path().join("disk"));
    let hook_disk = disk.clone();
    store.on_disk_event(Arc::new(move |e| hook_disk.event(e)));
    store.append(small(0, 10)).expect("append");
    store.sync().expect("sync");
    let lease = 10 + LEASE_SEQS;
    store.append(small(10, 5)).expect("append");
    assert_eq!(store.sendable_seq(), 15, "sent before their sync");
    disk.cut(&store);
    drop(store);
    let after = dir.path().join("after");
    disk.restore(&after, &mut rand::thread_rng());
    let store = testing::open(&StoreConfig {
        path: after,
        runtime_dir: dir.path().join("run-after-reboot"),
        ..cfg.clone()
    });
    let all = store.read_range(1, u64::MAX).expect("read");
    let seqs: Vec<u64> = all.iter().map(|r| r.seq).collect();
    let mut expected: Vec<u64> = (1..=10).collect();
    expected.push(lease + 1);
    assert_eq!(seqs, expected);
    match &all[10].payload {
        Payload::Dropped(ev) => {
            assert_eq!(ev.reason, crate::model::DropReason::PowerCut);
            assert_eq!(ev.ranges, vec![(11, lease)]);
            assert_eq!(ev.count, lease - 10);
        }
        other => panic!("a drop event, not {other:?}"),
    }
    assert!(
        verify(&store).expect("verify").is_clean(),
        "the skipped seqs are declared"
    );
    assert_eq!(
        store.append(small(15, 1)).expect("append")[0].seq,
        lease + 2
    );
    drop(store);
    // Reopened after a kill this time: nothing more is skipped.
    let store = testing::open(&StoreConfig {
        path: dir.path().join("after"),
        runtime_dir: dir.path().join("run-after-reboot"),
        ..cfg.clone()
    });
    assert_eq!(store.last_seq(), lease + 2);
    assert!(verify(&store).expect("verify").is_clean());
}

/// A clean stop closes the lease: a reboot after it skips nothing.
#[test]
fn a_clean_stop_then_a_reboot_skips_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = runtime_cfg(dir.path());
    let store = testing::open(&cfg);
    store.append(small(0, 10)).expect("append");
    store.sync().expect("sync");
    store.append(small(10, 5)).expect("append");
    store.close_lease().expect("close");
    assert_eq!(store.sendable_seq(), 15);
    drop(store);
    std::fs::remove_dir_all(&cfg.runtime_dir).expect("reboot");
    let store = testing::open(&cfg);
    assert_eq!(store.last_seq(), 15);
    assert_eq!(store.append(small(15, 1)).expect("append")[0].seq, 16);
    assert!(verify(&store).expect("verify").is_clean());
}

/// The runtime journal belongs to its store: a store created anew in the same place
/// (the old one removed) does not take in the old one's records.
#[test]
fn a_new_store_never_replays_another_stores_runtime_journal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = runtime_cfg(dir.path());
    let store = testing::open(&cfg);
    store.append(small(0, 10)).expect("append");
    drop(store);
    std::fs::remove_dir_all(&cfg.path).expect("remove the store");
    let store = testing::open(&cfg);
    assert_eq!(store.last_seq(), 0);
    assert!(store.read_range(1, u64::MAX).expect("read").is_empty());
    let dirs = std::fs::read_dir(&cfg.runtime_dir)
        .expect("runtime dir")
        .count();
    assert_eq!(dirs, 1, "the old store's runtime journal is removed");
}

/// The default `store.runtime_dir = "auto"` puts the runtime journal on a tmpfs: it
/// survives a kill (nothing lost), and a clean stop removes it (a tmpfs is memory)
/// without making the next start skip seqs.
#[test]
fn the_default_runtime_journal_survives_a_kill_and_is_removed_by_a_clean_stop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = StoreConfig {
        runtime_dir: PathBuf::from(runtime_dir::AUTO),
        ..cfg(dir.path())
    };
    let store = testing::open(&cfg);
    assert_eq!(
        store.stats().journal,
        "runtime+direct",
        "needs /dev/shm on a tmpfs (or $RUNTIME_DIRECTORY) and the temp dir on ext4 or xfs"
    );
    let runtime = store
        .runtime_journal_dir
        .clone()
        .expect("a runtime journal");
    store.append(small(0, 10)).expect("append");
    assert_eq!(store.synced_seq(), 0);
    // A kill: the direct journal's unsynced frames are gone with the process.
    drop(store);
    assert!(runtime.exists(), "kept after a kill");
    let store = testing::open(&cfg);
    assert_eq!(store.read_range(1, u64::MAX).expect("read").len(), 10);
    store.close_lease().expect("a clean stop");
    drop(store);
    assert!(!runtime.exists(), "removed after a clean stop");
    let store = testing::open(&cfg);
    assert_eq!(store.last_seq(), 10);
    assert_eq!(store.append(small(10, 1)).expect("append")[0].seq, 11);
    assert!(verify(&store).expect("verify").is_clean());
}
