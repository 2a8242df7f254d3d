use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;

use super::bench::sample_payload;
use super::writer::RETRY_EVERY;
use super::*;
use crate::config::units::ByteSize;
use crate::model::{Invalid, Kind, Reading, Value};
use crate::testkit::wait_until;

fn cfg(dir: &tempfile::TempDir) -> StoreConfig {
    StoreConfig {
        path: dir.path().join("store"),
        cache_capacity: ByteSize(4 << 20),
        ..StoreConfig::default()
    }
}

/// A store that stores blocks as they are: exactly [`BLOCK_RECORDS`] small readings
/// each (a packing store grows blocks that pack small, see
/// `a_packing_store_grows_its_blocks_while_they_pack_small`).
fn cfg_unpacked(dir: &tempfile::TempDir) -> StoreConfig {
    StoreConfig {
        compress: false,
        ..cfg(dir)
    }
}

fn payloads(from: u64, n: u64) -> Vec<Payload> {
    (from..from + n).map(|i| sample_payload("m1", i)).collect()
}

/// Readings of three values: 32 of them fit in a block (SDM630 readings of 14
/// values fill [`BLOCK_BYTES`] after about a dozen).
fn small_payload(meter: &str, i: u64) -> Payload {
    let mut p = sample_payload(meter, i);
    if let Payload::Reading(r) = &mut p {
        r.values.truncate(3);
    }
    p
}

fn small_payloads(from: u64, n: u64) -> Vec<Payload> {
    (from..from + n).map(|i| small_payload("m1", i)).collect()
}

fn seqs(records: &[Record]) -> Vec<u64> {
    records.iter().map(|r| r.seq).collect()
}

/// Block keys in order, read straight from sled.
fn block_keys(store: &Store) -> Vec<u64> {
    store
        .records
        .iter()
        .keys()
        .map(|k| key_seq(&k.unwrap()).unwrap())
        .collect()
}

#[test]
fn seqs_continue_across_reopen_without_reuse() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&cfg(&dir)).unwrap();
    assert_eq!(store.last_seq(), 0);
    assert_eq!(store.stats().records, 0);
    let a = store.append(payloads(0, 5)).unwrap();
    assert_eq!(seqs(&a), vec![1, 2, 3, 4, 5]);
    let b = store.append(payloads(5, 70)).unwrap();
    assert_eq!(seqs(&b), (6..=75).collect::<Vec<_>>());
    drop(store);

    let store = Store::open(&cfg(&dir)).unwrap();
    assert_eq!(store.last_seq(), 75);
    let c = store.append(payloads(75, 3)).unwrap();
    assert_eq!(seqs(&c), vec![76, 77, 78]);
    drop(store);

    let store = Store::open(&cfg(&dir)).unwrap();
    let all = store.read_range(0, u64::MAX).unwrap();
    assert_eq!(seqs(&all), (1..=78).collect::<Vec<_>>());
    for (rec, i) in all.iter().zip(0..) {
        assert_eq!(rec.payload, sample_payload("m1", i));
    }
    let stats = store.stats();
    assert_eq!(
        (stats.first_seq, stats.last_seq, stats.records),
        (1, 78, 78)
    );
    assert!(stats.disk_bytes > 0);
    assert!(verify(&store).unwrap().is_clean());
}

#[test]
fn commit_writes_few_large_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&cfg_unpacked(&dir)).unwrap();
    store.append(small_payloads(0, 100)).unwrap();
    store.append(small_payloads(100, 1)).unwrap();
    // 101 records: full blocks of BLOCK_RECORDS go to sled; the rest stays in the
    // open block (in the journal), readable, until it is full.
    assert_eq!(block_keys(&store), vec![1, 33, 65]);
    assert_eq!(store.read_range(1, 101).unwrap().len(), 101);
    for i in 101..128 {
        store.append(small_payloads(i, 1)).unwrap();
    }
    assert_eq!(block_keys(&store), vec![1, 33, 65, 97]);

    // Larger readings: blocks close once they reach BLOCK_BYTES, so a sled leaf page
    // of 17 blocks stays under sled's blob threshold (128 KiB).
    // (Compact SDM630 readings, about 80 bytes, fill a block by count first.)
    store.append(payloads(0, 100)).unwrap();
    let keys = block_keys(&store);
    assert!(keys.len() >= 4 + 100 / BLOCK_RECORDS, "{keys:?}");
    for k in &keys[4..] {
        let len = store.records.get(seq_key(*k)).unwrap().unwrap().len();
        assert!(len < BLOCK_BYTES + 1024, "block {k}: {len} bytes");
        assert!(17 * len < 120 * 1024, "block {k}: {len} bytes");
    }
}

#[test]
fn next_seq_survives_an_unreadable_last_block() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&cfg(&dir)).unwrap();
    store.append(payloads(0, 10)).unwrap();
    // The whole last block is garbage: the high-water mark still says 10.
    store.records.insert(seq_key(1), &[0xff, 0xff][..]).unwrap();
    store.flush().unwrap();
    drop(store);
    let store = Store::open(&cfg(&dir)).unwrap();
    assert_eq!(store.last_seq(), 10);
    assert_eq!(seqs(&store.append(payloads(10, 1)).unwrap()), vec![11]);
}

#[test]
fn payloads_round_trip_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&cfg(&dir)).unwrap();
    let served: [f32; 8] = [
        230.1,
        -0.000_123_4,
        f32::MIN_POSITIVE,
        1.0e-40, // subnormal
        f32::MAX,
        -f32::MAX,
        0.1,
        -0.0,
    ];
    let mut values: Vec<Value> = served
        .iter()
        .enumerate()
        .map(|(i, v)| Value {
            quantity: format!("q{i}"),
            unit: "W".into(),
            kind: Kind::Power,
            value: Some(*v as f64),
            invalid: None,
            source: Default::default(),
        })
        .collect();
    values.push(Value {
        quantity: "bad".into(),
        unit: "V".into(),
        kind: Kind::Voltage,
        value: None,
        invalid: Some(Invalid::Nan),
        source: Default::default(),
    });
    // A value that is not an f32 must survive as f64 too.
    values.push(Value {
        quantity: "f64".into(),
        unit: "kWh".into(),
        kind: Kind::EnergyDelta,
        value: Some(0.1f64),
        invalid: None,
        source: Default::default(),
    });
    let payload = Payload::Reading(Reading {
        meter: "méter ü".into(),
        ts_ms: -1,
        values,
    });
    store.append(vec![payload.clone()]).unwrap();
    drop(store);

    let store = Store::open(&cfg(&dir)).unwrap();
    let back = store.read_range(1, 1).unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].payload, payload);
    let r = back[0].payload.as_reading().unwrap();
    for (v, s) in r.values.iter().zip(served) {
        let got = v.value.unwrap();
        assert_eq!((got as f32).to_bits(), s.to_bits(), "{}", v.quantity);
        assert_eq!(got.to_bits(), (s as f64).to_bits(), "{}", v.quantity);
    }
    assert_eq!(r.values[9].value.unwrap().to_bits(), 0.1f64.to_bits());
}

#[test]
fn read_range_is_inclusive_and_crosses_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&cfg(&dir)).unwrap();
    store.append(payloads(0, 50)).unwrap();
    store.append(payloads(50, 50)).unwrap();
    assert_eq!(
        seqs(&store.read_range(30, 70).unwrap()),
        (30..=70).collect::<Vec<_>>()
    );
    assert_eq!(seqs(&store.read_range(33, 33).unwrap()), vec![33]);
    assert_eq!(seqs(&store.read_range(99, 500).unwrap()), vec![99, 100]);
    assert!(store.read_range(101, 200).unwrap().is_empty());
    assert!(store.read_range(5, 4).unwrap().is_empty());
    assert_eq!(seqs(&store.read_range(0, 2).unwrap()), vec![1, 2]);
}

/// Offset of frame `index` (0-based) inside a block value.
fn frame_offset(value: &[u8], index: usize) -> usize {
    let mut pos = 1;
    for _ in 0..index {
        pos += read_u32(value, pos).unwrap() as usize + FRAME_OVERHEAD;
    }
    pos
}

#[test]
fn a_packing_store_grows_its_blocks_while_they_pack_small() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&cfg(&dir)).unwrap();
    // Small readings pack far below the target: blocks of PACKED_BLOCK_RECORDS.
    store.append(small_payloads(0, 300)).unwrap();
    assert_eq!(block_keys(&store), vec![1, 129]);
    // SDM630 readings, then readings of random values (which pack poorly).
    store.append(payloads(0, 1000)).unwrap();
    let noisy: Vec<Payload> = (0..1000)
        .map(|i| {
            let mut p = sample_payload("m2", i);
            if let Payload::Reading(r) = &mut p {
                for v in &mut r.values {
                    v.value = Some(rand::random::<f64>() * 1e6);
                }
            }
            p
        })
        .collect();
    store.append(noisy.clone()).unwrap();
    let keys = block_keys(&store);
    let mut sizes = Vec::new();
    for w in keys.windows(2) {
        let len = store.records.get(seq_key(w[0])).unwrap().unwrap().len();
        sizes.push((w[0], w[1] - w[0], len));
        // A sled leaf of 17 blocks stays under sled's blob threshold (128 KiB).
        assert!(len < PACKED_BLOCK_MAX, "block {}: {len} bytes", w[0]);
    }
    println!("blocks (first seq, records, stored bytes): {sizes:?}");
    let sdm630 = sizes.iter().filter(|(k, _, _)| (300..1200).contains(k));
    assert!(
        sdm630.clone().all(|(_, n, _)| *n > BLOCK_RECORDS as u64),
        "SDM630 blocks grew past {BLOCK_RECORDS} records: {sizes:?}"
    );
    let per_reading = sdm630.clone().map(|(_, _, len)| len).sum::<usize>() as f64
        / sdm630.map(|(_, n, _)| *n).sum::<u64>() as f64;
    assert!(
        per_reading < 52.0,
        "{per_reading:.1} bytes a SDM630 reading"
    );
    // Every reading reads back as it was stored.
    let back = store.read_range(1301, 2300).unwrap();
    let payloads: Vec<Payload> = back.into_iter().map(|r| r.payload).collect();
    assert_eq!(payloads, noisy);
    assert!(verify(&store).unwrap().is_clean());
}

/// Blocks arrive in key order, so every one lands in sled's rightmost leaf. sled
/// writes a block as its page fragment and, when that leaf splits, only the few
/// entries carried into the new right leaf again: the left half of the split is a
/// small link, not the half rewritten whole (`vendor/sled/PATCHES.md`, patch 5).
#[test]
fn sled_writes_a_block_about_once() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = cfg(&dir);
    let store = Store::open(&cfg).unwrap();
    let n = 200 * PACKED_BLOCK_RECORDS as u64;
    for chunk in (0..n).step_by(1000) {
        store.append(payloads(chunk, 1000.min(n - chunk))).unwrap();
    }
    store.flush().unwrap();
    let stored: usize = store
        .records
        .iter()
        .values()
        .map(|v| v.unwrap().len())
        .sum();
    let log = std::fs::metadata(cfg.path.join("db")).unwrap().len();
    let ratio = log as f64 / stored as f64;
    println!(
        "{} blocks, {stored} bytes stored, sled's log {log} bytes: {ratio:.2}",
        store.records.len()
    );
    assert!(ratio < 1.6, "sled wrote {ratio:.2} bytes per byte of block");
    // Deleting the older half (retention, the quota) writes small links too.
    store.set_sync_mark(CURSOR_MARK, n).unwrap();
    let deleted = store.compact(n / 2, i64::MAX, 1000).unwrap();
    store.flush().unwrap();
    let more = std::fs::metadata(cfg.path.join("db")).unwrap().len() - log;
    println!("{deleted} records deleted: sled's log grew {more} bytes");
    // A left half holds its entries as fragments and a link: 13 deletions more
    // stay below sled's consolidation threshold (32), so the leaf is not rewritten.
    assert!(
        (more as usize) < stored / 5,
        "deleting {deleted} records wrote {more} bytes"
    );
    drop(store);
    // The split links are read back on open.
    let store = Store::open(&cfg).unwrap();
    assert_eq!(store.read_range(1, n).unwrap().len() as u64, n - deleted);
    assert!(verify(&store).unwrap().is_clean());
}

#[test]
fn corrupt_record_is_quarantined_and_counted_neighbours_survive() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&cfg_unpacked(&dir)).unwrap();
    store.append(small_payloads(0, 100)).unwrap();

    // Flip one byte inside the CBOR of seq 40 (block 33, frame 7).
    let value = block::unpack(store.records.get(seq_key(33)).unwrap().unwrap());
    let mut bad = value.to_vec();
    let at = frame_offset(&bad, 7) + 4 + 20;
    bad[at] ^= 0x5a;
    store.records.insert(seq_key(33), bad).unwrap();

    let all = store.read_range(1, 100).unwrap();
    let expected: Vec<u64> = (1..=100).filter(|&s| s != 40).collect();
    assert_eq!(seqs(&all), expected);
    assert_eq!(store.stats().quarantined, 1);
    assert!(store.quarantine.contains_key(seq_key(40)).unwrap());

    // Neighbours in the same block are still data, bit for bit.
    let around = store.read_range(39, 41).unwrap();
    assert_eq!(seqs(&around), vec![39, 41]);
    assert_eq!(around[0].payload, small_payload("m1", 38));
    assert_eq!(around[1].payload, small_payload("m1", 40));
    // Reading it again does not count it twice.
    assert_eq!(store.stats().quarantined, 1);

    let report = verify(&store).unwrap();
    assert_eq!(report.ok, 99);
    assert_eq!(report.quarantined, 1);
    assert!(report.gaps.is_empty());
    assert_eq!(report.duplicates, 0);
    assert!(!report.is_clean());
    store.flush().unwrap();
    drop(store);

    // The count is persistent.
    let store = Store::open(&cfg_unpacked(&dir)).unwrap();
    assert_eq!(store.stats().quarantined, 1);
    assert_eq!(store.read_range(1, 100).unwrap().len(), 99);
}

#[test]
fn broken_framing_quarantines_the_rest_of_its_block_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&cfg_unpacked(&dir)).unwrap();
    store.append(small_payloads(0, 96)).unwrap(); // blocks 1, 33, 65

    // Seq 50's length field points past the end of the block.
    let mut bad = block::unpack(store.records.get(seq_key(33)).unwrap().unwrap()).to_vec();
    let at = frame_offset(&bad, 17);
    bad[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    store.records.insert(seq_key(33), bad).unwrap();

    let all = store.read_range(1, 96).unwrap();
    let expected: Vec<u64> = (1..=49).chain(65..=96).collect();
    assert_eq!(seqs(&all), expected);
    assert_eq!(store.stats().quarantined, 15); // 50..=64
    let report = verify(&store).unwrap();
    assert_eq!((report.ok, report.quarantined), (81, 15));
    assert!(report.gaps.is_empty());
}

#[test]
fn verify_reports_gaps_and_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&cfg_unpacked(&dir)).unwrap();
    store.append(small_payloads(0, 96)).unwrap();
    assert!(verify(&store).unwrap().is_clean());

    // A lost block is a gap.
    store.records.remove(seq_key(33)).unwrap();
    let report = verify(&store).unwrap();
    assert_eq!(report.gaps, vec![33..=64]);
    assert_eq!(report.ok, 64);
    assert_eq!(report.quarantined, 0);
    assert_eq!(
        seqs(&store.read_range(30, 66).unwrap()),
        vec![30, 31, 32, 65, 66]
    );

    // A block holding seqs that the next block also starts with: duplicates.
    store.records.insert(seq_key(20), Vec::new()).unwrap();
    let report = verify(&store).unwrap();
    assert_eq!(report.duplicates, 13); // seqs 20..=32 of block 1
    assert_eq!(report.ok, 19 + 32);
    // The empty block at 20 claims 20..=64 and holds nothing that reads.
    assert_eq!(report.quarantined, 45);
}

fn writer_store(dir: &tempfile::TempDir) -> Arc<Store> {
    Arc::new(Store::open(&cfg(dir)).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_submits_get_contiguous_seqs_in_few_commits() {
    let dir = tempfile::tempdir().unwrap();
    let store = writer_store(&dir);
    let (committed, mut commits) = broadcast::channel(1024);
    // A flush interval far longer than the submissions take: commits are cut by
    // `max_batch`, not by timing, so the count does not depend on machine speed
    // (the tests also run under qemu emulation).
    let (writer, task) = start_writer(Arc::clone(&store), Duration::from_secs(2), 64, committed);

    let mut handles = Vec::new();
    for t in 0..8u64 {
        let writer = writer.clone();
        handles.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for i in 0..50u64 {
                let rx = writer
                    .submit(sample_payload("m", t * 1000 + i))
                    .await
                    .unwrap();
                got.push(rx);
            }
            let mut seqs = Vec::new();
            for rx in got {
                seqs.push(rx.await.unwrap().unwrap().seq);
            }
            seqs
        }));
    }
    let mut all = BTreeSet::new();
    for h in handles {
        let seqs = h.await.unwrap();
        // One submitter's readings keep their order.
        assert!(seqs.windows(2).all(|w| w[0] < w[1]));
        all.extend(seqs);
    }
    assert_eq!(all, (1..=400).collect::<BTreeSet<u64>>());
    assert_eq!(store.last_seq(), 400);

    drop(writer);
    task.await.unwrap();
    let mut n_commits = 0;
    let mut broadcast_seqs = Vec::new();
    while let Ok(records) = commits.try_recv() {
        n_commits += 1;
        broadcast_seqs.extend(seqs(&records));
    }
    assert_eq!(broadcast_seqs, (1..=400).collect::<Vec<_>>());
    assert!(
        n_commits < 400 / 8,
        "{n_commits} commits for 400 submissions"
    );
    assert!(n_commits >= 400 / 64, "max_batch bounds a commit");
}

#[tokio::test]
async fn dropping_the_writer_commits_what_is_pending() {
    let dir = tempfile::tempdir().unwrap();
    let store = writer_store(&dir);
    let (committed, mut commits) = broadcast::channel(16);
    let (writer, task) = start_writer(
        Arc::clone(&store),
        Duration::from_secs(3600),
        1000,
        committed,
    );
    let mut rxs = Vec::new();
    for i in 0..3 {
        rxs.push(writer.submit(sample_payload("m", i)).await.unwrap());
    }
    drop(writer);
    task.await.unwrap();
    for (rx, seq) in rxs.into_iter().zip(1..) {
        assert_eq!(rx.await.unwrap().unwrap().seq, seq);
    }
    assert_eq!(seqs(&commits.try_recv().unwrap()), vec![1, 2, 3]);
    assert!(commits.try_recv().is_err(), "one commit");
    drop(store);
    let store = Store::open(&cfg(&dir)).unwrap();
    assert_eq!(store.read_range(1, 3).unwrap().len(), 3);
}

#[tokio::test]
async fn submit_batch_is_one_contiguous_commit() {
    let dir = tempfile::tempdir().unwrap();
    let store = writer_store(&dir);
    let (committed, _) = broadcast::channel(16);
    let (writer, task) = start_writer(Arc::clone(&store), Duration::from_millis(5), 10, committed);
    let first = writer.submit(sample_payload("m", 0)).await.unwrap();
    // Bigger than max_batch: still committed whole.
    let batch = writer.submit_batch(payloads(1, 25)).await.unwrap();
    assert_eq!(first.await.unwrap().unwrap().seq, 1);
    assert_eq!(seqs(&batch), (2..=26).collect::<Vec<_>>());
    assert_eq!(batch[0].payload, sample_payload("m1", 1));
    assert!(writer.submit_batch(Vec::new()).await.unwrap().is_empty());
    drop(writer);
    task.await.unwrap();
    assert!(verify(&store).unwrap().is_clean());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_holds_records_in_memory_and_writes_them_in_order_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let store = writer_store(&dir);
    store.append(payloads(0, 5)).unwrap();
    let (committed, mut commits) = broadcast::channel(1024);
    let (writer, task) = start_writer(Arc::clone(&store), Duration::from_millis(5), 20, committed);

    store.inject_disk_full(true);
    let mut pending = Vec::new();
    for i in 5..105 {
        pending.push(writer.submit(sample_payload("m1", i)).await.unwrap());
    }
    let batch = {
        let writer = writer.clone();
        tokio::spawn(async move { writer.submit_batch(payloads(105, 7)).await })
    };
    // Refused, held, retried: nothing durable, no seq consumed, the state visible.
    crate::testkit::poll_until(Duration::from_secs(10), || async {
        ((), store.stats().held >= 107)
    })
    .await;
    tokio::time::sleep(RETRY_EVERY * 2).await;
    let stats = store.stats();
    println!(
        "disk full: held {} records, last_seq {}, blocked {}, error {:?}",
        stats.held,
        stats.last_seq,
        stats.write_blocked,
        store.last_write_error()
    );
    assert_eq!((stats.held, stats.last_seq), (107, 5));
    assert!(stats.write_blocked && !stats.write_failed);
    assert!(store
        .last_write_error()
        .is_some_and(|e| e.contains("disk full")));
    assert!(commits.try_recv().is_err());

    // Space returns: everything is written by itself, in submission order, gap-free.
    store.inject_disk_full(false);
    let mut got = Vec::new();
    for rx in pending {
        let rec = tokio::time::timeout(Duration::from_secs(10), rx)
            .await
            .expect("written once space returned")
            .unwrap()
            .unwrap();
        got.push(rec);
    }
    let batch = batch.await.unwrap().unwrap();
    assert_eq!(seqs(&got), (6..=105).collect::<Vec<_>>());
    assert_eq!(seqs(&batch), (106..=112).collect::<Vec<_>>());
    let stats = store.stats();
    assert_eq!((stats.held, stats.held_dropped), (0, 0));
    assert!(!stats.write_blocked);
    assert_eq!(store.last_write_error(), None);
    drop(writer);
    task.await.unwrap();
    let report = verify(&store).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!((report.ok, report.last_seq), (112, 112));
    let all = store.read_range(1, 112).unwrap();
    for (rec, i) in all.iter().zip(0..) {
        let expected = if i < 105 {
            sample_payload("m1", i)
        } else {
            payloads(105, 7).remove(i as usize - 105)
        };
        assert_eq!(rec.payload, expected, "seq {}", rec.seq);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_hold_bound_the_oldest_held_records_are_dropped_counted_and_announced() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        Store::open(&StoreConfig {
            hold_readings: 50,
            ..cfg(&dir)
        })
        .unwrap(),
    );
    let (committed, mut commits) = broadcast::channel(1024);
    let (writer, task) = start_writer(Arc::clone(&store), Duration::from_millis(5), 20, committed);
    store.inject_disk_full(true);
    let mut pending = Vec::new();
    for i in 0..80 {
        pending.push(writer.submit(sample_payload("m1", i)).await.unwrap());
    }
    crate::testkit::poll_until(Duration::from_secs(10), || async {
        ((), store.stats().held_dropped >= 30)
    })
    .await;
    let stats = store.stats();
    println!(
        "hold bound 50, 80 submitted: held {}, dropped {}",
        stats.held, stats.held_dropped
    );
    assert_eq!((stats.held, stats.held_dropped), (50, 30));
    store.inject_disk_full(false);
    let mut written = Vec::new();
    for (i, rx) in pending.into_iter().enumerate() {
        let reply = tokio::time::timeout(Duration::from_secs(10), rx)
            .await
            .expect("answered")
            .unwrap();
        if i < 30 {
            let err = reply.expect_err("the oldest were dropped");
            assert!(err.is_no_space(), "{err}");
        } else {
            written.push(reply.unwrap());
        }
    }
    assert_eq!(seqs(&written), (1..=50).collect::<Vec<_>>());
    // The drop is announced by a record right after the held ones.
    crate::testkit::poll_until(Duration::from_secs(10), || async {
        ((), store.last_seq() >= 51)
    })
    .await;
    let event = store.read_range(51, 51).unwrap();
    match &event[0].payload {
        Payload::Dropped(ev) => {
            assert_eq!(ev.reason, crate::model::DropReason::DiskFull);
            assert_eq!((ev.count, ev.total), (30, 30));
            assert!(ev.ranges.is_empty(), "held records never had a seq");
        }
        other => panic!("not a drop event: {other:?}"),
    }
    // The writer broadcasts a commit just after making it durable: wait for the last.
    let mut broadcast = Vec::new();
    while broadcast.last() < Some(&51) {
        match tokio::time::timeout(Duration::from_secs(10), commits.recv()).await {
            Ok(Ok(records)) => broadcast.extend(seqs(&records)),
            _ => break,
        }
    }
    assert_eq!(broadcast, (1..=51).collect::<Vec<_>>());
    drop(writer);
    task.await.unwrap();
    assert!(verify(&store).unwrap().is_clean());
}

#[test]
fn open_error_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let cfg = StoreConfig {
        path: file.join("store"),
        ..StoreConfig::default()
    };
    let err = Store::open(&cfg).unwrap_err();
    assert!(matches!(err, StoreError::Open { .. }));
    assert!(err.to_string().contains("not-a-dir"), "{err}");
}

#[derive(Clone, Default)]
struct LogBuf(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The crash test parses this line from the agent's stderr.
#[test]
fn each_commit_logs_its_seq_range() {
    let logs = LogBuf::default();
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .finish();
    // tracing caches each callsite's interest globally, computed from the calling
    // thread's subscriber while only one dispatcher exists; other tests hitting the
    // same callsites from threads without one would cache "never". A second live
    // dispatcher makes tracing combine all of them instead.
    let _other = tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default());
    let _guard = tracing::subscriber::set_default(subscriber);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let store = writer_store(&dir);
        let (committed, _) = broadcast::channel(16);
        let (writer, task) = start_writer(store, Duration::from_millis(5), 100, committed);
        writer.submit_batch(payloads(0, 3)).await.unwrap();
        writer.submit_batch(payloads(3, 2)).await.unwrap();
        drop(writer);
        task.await.unwrap();
    });
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains("edge_agent::store: committed seq 1..=3\n"),
        "{text}"
    );
    assert!(
        text.contains("edge_agent::store: committed seq 4..=5\n"),
        "{text}"
    );
}

/// Submits readings `from..from + n` one by one and returns their reply receivers.
async fn submit_each(
    writer: &StoreWriter,
    from: u64,
    n: u64,
) -> Vec<tokio::sync::oneshot::Receiver<Result<Record, StoreError>>> {
    let mut rxs = Vec::new();
    for i in from..from + n {
        rxs.push(writer.submit(sample_payload("m1", i)).await.unwrap());
    }
    rxs
}

/// How long the full-disk tests wait for the writer to hold or resume.
const FULL_DISK_WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_real_full_filesystem_commits_wait_in_memory_and_resume_when_space_returns() {
    let fs = testing::SmallFs::mount("16m");
    let store = Arc::new(
        Store::open(&StoreConfig {
            path: fs.dir.path().join("store"),
            cache_capacity: ByteSize(4 << 20),
            min_free_space: ByteSize(4 << 20),
            ..StoreConfig::default()
        })
        .unwrap(),
    );
    let (committed, _) = broadcast::channel(16);
    let (writer, task) = start_writer(Arc::clone(&store), Duration::from_millis(5), 50, committed);
    for rx in submit_each(&writer, 0, 200).await {
        rx.await.unwrap().unwrap();
    }
    // Another program fills the disk to 3 MiB free, below the 4 MiB reserve.
    let filler = fs.fill_until(3 << 20);
    let rxs = submit_each(&writer, 200, 300).await;
    wait_until("300 readings held", FULL_DISK_WAIT, || {
        store.stats().held == 300
    })
    .await;
    let stats = store.stats();
    println!(
        "full tmpfs: {} bytes free, held {}, last_seq {}, error {:?}",
        stats.free_bytes,
        stats.held,
        stats.last_seq,
        store.last_write_error()
    );
    assert!(stats.write_blocked && !stats.write_failed);
    assert_eq!(stats.last_seq, 200);
    assert!(store
        .last_write_error()
        .is_some_and(|e| e.contains("disk full")));

    std::fs::remove_file(filler).unwrap();
    let mut got = Vec::new();
    for rx in rxs {
        got.push(
            tokio::time::timeout(Duration::from_secs(20), rx)
                .await
                .expect("written once space returned")
                .unwrap()
                .unwrap(),
        );
    }
    assert_eq!(seqs(&got), (201..=500).collect::<Vec<_>>());
    drop(writer);
    task.await.unwrap();
    let report = verify(&store).unwrap();
    assert!(report.is_clean(), "{report:?}");
    let all = store.read_range(1, 500).unwrap();
    assert_eq!(all.len(), 500);
    for (rec, i) in all.iter().zip(0..) {
        assert_eq!(rec.payload, sample_payload("m1", i));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_sled_itself_hits_enospc_the_store_fails_cleanly_and_keeps_what_it_acknowledged() {
    let fs = testing::SmallFs::mount("16m");
    let path = fs.dir.path().join("store");
    // No reserve: sled's own writes run into the full disk.
    let store = Arc::new(
        Store::open(&StoreConfig {
            path: path.clone(),
            cache_capacity: ByteSize(4 << 20),
            min_free_space: ByteSize(0),
            ..StoreConfig::default()
        })
        .unwrap(),
    );
    let (committed, _) = broadcast::channel(16);
    let (writer, task) = start_writer(Arc::clone(&store), Duration::from_millis(5), 100, committed);
    let filler = fs.fill_until(1 << 20);
    let mut acknowledged = Vec::new();
    let mut next = 0;
    while !store.has_failed() {
        assert!(next < 100_000, "sled never ran out of space");
        let rxs = submit_each(&writer, next, 100).await;
        next += 100;
        for rx in rxs {
            // Held, not answered, once the store failed.
            match tokio::time::timeout(Duration::from_secs(2), rx).await {
                Ok(Ok(Ok(rec))) => acknowledged.push(rec),
                _ => break,
            }
        }
    }
    wait_until("the writer holds the rest", FULL_DISK_WAIT, || {
        store.stats().write_blocked
    })
    .await;
    let stats = store.stats();
    println!(
        "sled ENOSPC after {} acknowledged readings: failed {}, held {}, error {:?}",
        acknowledged.len(),
        stats.write_failed,
        stats.held,
        store.last_write_error()
    );
    assert!(stats.write_failed && !acknowledged.is_empty());
    // Writes are refused at once, without touching sled; the space coming back is
    // seen (the agent then restarts to reopen the store).
    assert!(matches!(
        store.append(vec![sample_payload("m1", 0)]),
        Err(StoreError::Failed(_))
    ));
    std::fs::remove_file(filler).unwrap();
    assert!(store.has_room());

    // Stopping does not hang on sled's broken instance.
    drop(writer);
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the writer stops")
        .unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio::task::spawn_blocking(move || drop(store)),
    )
    .await
    .expect("dropping a failed store returns")
    .unwrap();

    // What is on disk is what a restart opens: a copy of it (the broken instance
    // still holds the original's lock) is clean and holds every acknowledged reading.
    let copy = tempfile::tempdir().unwrap();
    copy_dir(&path, &copy.path().join("store"));
    let reopened = Store::open(&StoreConfig {
        path: copy.path().join("store"),
        ..cfg(&copy)
    })
    .unwrap();
    let report = verify(&reopened).unwrap();
    println!("reopened after the failure: {report:?}");
    assert!(report.is_clean(), "{report:?}");
    let last_ack = acknowledged.last().map_or(0, |r| r.seq);
    assert!(report.last_seq >= last_ack);
    let stored = reopened.read_range(1, last_ack).unwrap();
    assert_eq!(
        stored, acknowledged,
        "every acknowledged reading, once, in order"
    );
    // And it writes on.
    let more = reopened.append(payloads(0, 3)).unwrap();
    assert_eq!(more[0].seq, report.last_seq + 1);
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn a_new_store_is_compressed_and_an_existing_one_keeps_its_setting() {
    let dir = tempfile::tempdir().unwrap();
    let compressed = cfg(&dir);
    assert!(compressed.compress, "compression is the default");
    let plain = StoreConfig {
        path: dir.path().join("plain"),
        compress: false,
        ..cfg(&dir)
    };
    // Enough records that sled's files outgrow their first 512 KiB segment.
    let (a, b) = (
        Store::open(&compressed).unwrap(),
        Store::open(&plain).unwrap(),
    );
    for i in 0..40 {
        a.append(payloads(i * 500, 500)).unwrap();
        b.append(payloads(i * 500, 500)).unwrap();
    }
    let (small, large) = (a.stats().disk_bytes, b.stats().disk_bytes);
    // Compact records (and compact index entries) leave less to compress than CBOR
    // did (a third then): about a fifth less on disk.
    assert!(
        small * 10 < large * 9,
        "compressed {small} bytes on disk, uncompressed {large}"
    );
    drop((a, b));
    assert_eq!(created_compressed(&compressed.path), Some(true));
    assert_eq!(created_compressed(&plain.path), Some(false));
    assert_eq!(created_compressed(&dir.path().join("none")), None);

    // Each reopens with the other setting asked for: it keeps its own, and its
    // records read back whole.
    for (cfg, was) in [(&compressed, true), (&plain, false)] {
        let store = testing::open(&StoreConfig {
            compress: !was,
            ..cfg.clone()
        });
        let all = store.read_range(1, 5000).unwrap();
        assert_eq!(all.len(), 5000);
        assert_eq!(all[4999].payload, sample_payload("m1", 4999));
        drop(store);
        assert_eq!(created_compressed(&cfg.path), Some(was));
    }
}

#[test]
fn the_cache_given_to_sled_allows_for_compressed_page_sizes() {
    assert_eq!(sled_cache_capacity(32 << 20, false), 32 << 20);
    assert_eq!(sled_cache_capacity(32 << 20, true), 4 << 20);
    // Never below 1 MiB, the smallest cache the config accepts.
    assert_eq!(sled_cache_capacity(2 << 20, true), 1 << 20);
}

/// A block of the first format (version 1), as the store wrote it before the
/// compact records: `[1] { [u32 len][CBOR of model::Record][u32 CRC-32C] }*`.
fn v1_block(records: &[Record]) -> Vec<u8> {
    let mut out = vec![BLOCK_V1];
    for rec in records {
        let mut body = Vec::new();
        ciborium::into_writer(rec, &mut body).unwrap();
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32c(&body).to_le_bytes());
    }
    out
}

/// Payloads of every kind, with float32, integer and float64 values and invalid
/// markers.
fn mixed_payloads(from: u64, n: u64) -> Vec<Payload> {
    (from..from + n)
        .map(|i| match i % 5 {
            0 => Payload::Dropped(crate::model::DropEvent {
                reason: crate::model::DropReason::Quota,
                ranges: vec![(i, i)],
                count: 1,
                total: i,
                ts_ms: i as i64,
            }),
            1 => {
                let mut p = sample_payload("m1", i);
                if let Payload::Reading(r) = &mut p {
                    r.values[0].value = None;
                    r.values[0].invalid = Some(Invalid::OutOfRange);
                    r.values[1].source = crate::model::Source::Int;
                    r.values[1].value = Some(4_294_967_040.0 + i as f64);
                    r.values[2].source = crate::model::Source::F64;
                    r.values[2].value = Some(0.1 + i as f64);
                }
                p
            }
            _ => sample_payload(if i % 2 == 0 { "m1" } else { "m2" }, i),
        })
        .collect()
}

#[test]
fn a_store_of_the_first_format_opens_reads_back_every_record_and_takes_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    let old: Vec<Record> = mixed_payloads(0, 100)
        .into_iter()
        .zip(1..)
        .map(|(payload, seq)| Record { seq, payload })
        .collect();
    {
        // Written as the first format's code path did: blocks of version 1 and the
        // high-water mark, no index (it is built on open) and no schemas.
        let db = sled::Config::new().path(cfg(&dir).path).open().unwrap();
        let records = db.open_tree(TREE_RECORDS).unwrap();
        for chunk in old.chunks(BLOCK_RECORDS) {
            records
                .insert(seq_key(chunk[0].seq), v1_block(chunk))
                .unwrap();
        }
        let meta = db.open_tree(TREE_META).unwrap();
        meta.insert(META_LAST_SEQ, &seq_key(100)).unwrap();
        db.flush().unwrap();
    }
    let store = testing::open(&cfg(&dir));
    assert_eq!(store.last_seq(), 100);
    assert_eq!(store.read_range(1, 100).unwrap(), old);
    // The index was built from the old records.
    assert_eq!(
        store.readings("m2", i64::MIN, i64::MAX).unwrap().len(),
        old.iter()
            .filter(|r| r.payload.as_reading().is_some_and(|x| x.meter == "m2"))
            .count()
    );
    // New records go in compact blocks after them.
    let new = store.append(mixed_payloads(100, 60)).unwrap();
    assert_eq!(seqs(&new), (101..=160).collect::<Vec<_>>());
    let versions: BTreeSet<u8> = store
        .records
        .iter()
        .values()
        .map(|v| v.unwrap()[0])
        .collect();
    assert_eq!(versions, BTreeSet::from([BLOCK_V1, BLOCK_V2]));
    drop(store);

    let store = testing::open(&cfg(&dir));
    let all = store.read_range(1, 160).unwrap();
    assert_eq!(all[..100], old[..]);
    assert_eq!(all[100..], new[..]);
    // verify-store checks both formats.
    let report = verify(&store).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!((report.ok, report.first_format), (160, 100));
    // The stored bytes of both decode, as upstream carries them.
    let raw = store.read_raw(1, 160, 1000, usize::MAX).unwrap();
    assert_eq!(raw.records.len(), 160);
    for (r, want) in raw.records.iter().zip(&all) {
        assert_eq!(&store.decode_stored(&r.bytes).unwrap(), want);
    }
    // A broken old frame is still quarantined, not returned.
    let key = seq_key(33);
    let mut bad = store.records.get(key).unwrap().unwrap().to_vec();
    let at = frame_offset(&bad, 1) + 6;
    bad[at] ^= 0xff;
    store.records.insert(key, bad).unwrap();
    assert_eq!(store.read_range(33, 35).unwrap().len(), 2);
    let report = verify(&store).unwrap();
    assert_eq!((report.ok, report.quarantined), (159, 1));
}

#[test]
fn readings_refer_to_one_schema_per_field_list_kept_across_reopen_and_deletion() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&cfg(&dir)).unwrap();
    // m1 alternates between two field lists; m2 has a third.
    let mut batch = Vec::new();
    for i in 0..40 {
        let mut p = sample_payload(if i % 10 == 9 { "m2" } else { "m1" }, i);
        if i % 2 == 0 {
            if let Payload::Reading(r) = &mut p {
                r.values.truncate(5);
            }
        }
        batch.push(p);
    }
    let written = store.append(batch.clone()).unwrap();
    assert_eq!(store.schemas.len(), 3);
    store.append(batch[..4].to_vec()).unwrap();
    assert_eq!(
        store.schemas.len(),
        3,
        "known field lists are not stored again"
    );
    // A stored SDM630 reading: at most 100 bytes, framing included.
    let raw = store.read_raw(2, 2, 1, usize::MAX).unwrap();
    assert!(raw.records[0].bytes.len() + FRAME_OVERHEAD <= 100);
    drop(store);
    let store = Store::open(&cfg(&dir)).unwrap();
    assert_eq!(store.schemas.len(), 3);
    assert_eq!(store.read_range(1, 40).unwrap(), written);
    // The schemas outlive every record that refers to them: deleting the first
    // blocks (as the quota and retention do) leaves the rest decodable.
    let first: Vec<_> = store.records.iter().keys().take(2).collect();
    for k in first {
        store.records.remove(k.unwrap()).unwrap();
    }
    let left = store.read_range(1, 44).unwrap();
    assert!(!left.is_empty());
    for r in left.iter().filter(|r| r.seq <= 40) {
        assert_eq!(r, &written[r.seq as usize - 1]);
    }
    assert_eq!(verify(&store).unwrap().quarantined, 0);
}

#[test]
fn field_lists_beyond_the_schema_bound_are_stored_self_described() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&cfg(&dir)).unwrap();
    let n = codec::MAX_SCHEMAS as u64 + 4;
    // A client pushing ever new field lists: one schema each, up to the bound.
    let pushed: Vec<Payload> = (0..n)
        .map(|i| {
            Payload::Reading(Reading {
                meter: "pushy".into(),
                ts_ms: i as i64,
                values: vec![Value {
                    quantity: format!("q{i}"),
                    unit: "W".into(),
                    kind: Kind::Power,
                    value: Some(i as f64),
                    invalid: None,
                    source: crate::model::Source::F64,
                }],
            })
        })
        .collect();
    let written = store.append(pushed).unwrap();
    assert_eq!(store.schemas.len(), codec::MAX_SCHEMAS);
    // Seqs n-3..=n: the four readings past the bound.
    let raw = store.read_raw(n - 3, n, 10, usize::MAX).unwrap();
    assert_eq!(raw.records.len(), 4);
    assert!(
        store.read_raw(n - 4, n - 4, 1, usize::MAX).unwrap().records[0].bytes[0]
            == codec::TAG_READING
    );
    assert!(raw
        .records
        .iter()
        .all(|r| r.bytes[0] == codec::TAG_CBOR && codec::peek_kind(&r.bytes) == Some("reading")));
    drop(store);
    let store = Store::open(&cfg(&dir)).unwrap();
    assert_eq!(store.read_range(1, n).unwrap(), written);
}

/// A compressing store keeps full blocks packed (`block.rs`, version 3): smaller in
/// sled, and read back record for record, across a reopen; one that does not
/// compress keeps version 2.
#[test]
fn full_blocks_are_stored_packed_and_read_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    for compress in [true, false] {
        let cfg = StoreConfig {
            path: dir.path().join(format!("store-{compress}")),
            compress,
            ..cfg(&dir)
        };
        let store = testing::open(&cfg);
        let meters: Vec<Payload> = (0..200)
            .map(|i| sample_payload(&format!("m{}", i % 10), i))
            .collect();
        store.append(meters.clone()).unwrap();
        store.seal_open_block();
        let (mut stored, mut unpacked) = (0, 0);
        let mut versions = BTreeSet::new();
        for entry in store.records.iter() {
            let (_, value) = entry.unwrap();
            versions.insert(value[0]);
            stored += value.len();
            unpacked += block::unpack(value).len();
        }
        println!("compress {compress}: {stored} bytes stored, {unpacked} unpacked");
        if compress {
            assert_eq!(versions, BTreeSet::from([block::BLOCK_V3]));
            assert!(
                stored * 10 < unpacked * 8,
                "{stored} bytes packed, {unpacked} unpacked"
            );
        } else {
            assert_eq!(versions, BTreeSet::from([BLOCK_V2]));
        }
        drop(store);
        let store = testing::open(&cfg);
        assert_eq!(store.last_seq(), 200);
        let back: Vec<Payload> = store
            .read_range(1, 200)
            .unwrap()
            .into_iter()
            .map(|r| r.payload)
            .collect();
        assert_eq!(back, meters);
        let report = verify(&store).unwrap();
        assert!(report.is_clean() && report.ok == 200, "{report:?}");
    }
}
