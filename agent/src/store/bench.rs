//! Store benchmark: durable throughput, CPU, peak RSS and bytes written per record,
//! for the block layout against a bare one-key-per-record sled loop.
//!
//! Figures, not assertions: `cargo bench -p edge-agent --bench store`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::Store;
use crate::config::units::ByteSize;
use crate::model::{Kind, Payload, Reading, Record, Value};
use crate::store::config::StoreConfig;

/// The 14 quantities of an Eastron SDM630 poll: name, unit, kind, typical value.
const SDM630: [(&str, &str, Kind, f32); 14] = [
    ("voltage_l1", "V", Kind::Voltage, 230.1),
    ("voltage_l2", "V", Kind::Voltage, 229.8),
    ("voltage_l3", "V", Kind::Voltage, 231.2),
    ("current_l1", "A", Kind::Current, 4.12),
    ("current_l2", "A", Kind::Current, 3.87),
    ("current_l3", "A", Kind::Current, 5.03),
    ("power_l1", "W", Kind::Power, 912.4),
    ("power_l2", "W", Kind::Power, 850.7),
    ("power_l3", "W", Kind::Power, 1120.9),
    ("power", "W", Kind::Power, 2884.0),
    ("frequency", "Hz", Kind::Frequency, 49.98),
    ("energy_import", "kWh", Kind::EnergyTotal, 12345.6),
    ("energy_export", "kWh", Kind::EnergyTotal, 321.5),
    ("energy_total", "kWh", Kind::EnergyTotal, 12667.1),
];

/// A synthetic SDM630 reading: 14 f32 values that vary with `i`.
pub fn sample_payload(meter: &str, i: u64) -> Payload {
    let wobble = ((i.wrapping_mul(2_654_435_761) >> 7) % 1000) as f32 / 1000.0 - 0.5;
    let values = SDM630
        .iter()
        .map(|&(q, u, kind, base)| {
            let v: f32 = match kind {
                Kind::EnergyTotal => base + i as f32 * 0.001,
                _ => base * (1.0 + wobble * 0.02),
            };
            Value {
                quantity: q.to_string(),
                unit: u.to_string(),
                kind,
                value: Some(v as f64),
                invalid: None,
                source: Default::default(),
            }
        })
        .collect();
    Payload::Reading(Reading {
        meter: meter.to_string(),
        ts_ms: 1_700_000_000_000 + i as i64 * 1000,
        values,
    })
}

/// Durable readings a second the store should take in large batches (issue 14).
const GOAL_PER_SEC: u64 = 500_000;
/// Most bytes written per byte of compact record.
const GOAL_AMPLIFICATION: u64 = 3;

#[derive(Debug, Default, Clone, Copy)]
struct Phase {
    records: u64,
    wall: Duration,
    cpu: Duration,
    peak_rss_kib: u64,
    write_bytes: u64,
    disk_bytes: u64,
}

impl Phase {
    fn per_sec(&self) -> f64 {
        self.records as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    fn print(&self, out: &mut impl Write, name: &str) -> std::io::Result<()> {
        let n = self.records.max(1) as f64;
        writeln!(
            out,
            "{name:<8} {:>10.0} durable readings/s  {:>6.2} µs CPU/reading  peak RSS {:>6.1} MiB  \
             {:>7.1} bytes written/record  {:>7.1} MiB on disk  ({} records in {:.2} s)",
            self.per_sec(),
            self.cpu.as_secs_f64() * 1e6 / n,
            self.peak_rss_kib as f64 / 1024.0,
            self.write_bytes as f64 / n,
            self.disk_bytes as f64 / (1024.0 * 1024.0),
            self.records,
            self.wall.as_secs_f64(),
        )
    }
}

/// Appends `records` synthetic 14-value readings in batches of `batch`, (a) through
/// [`Store::append`], compressed as by default and uncompressed, and (b) as a bare
/// sled loop (one key per record, plain CBOR, one flush per batch), and prints the
/// figures of each and the ratios.
///
/// Works in `$EDGE_BENCH_DIR` (default: the system temp dir), which should be on a
/// real disk: on tmpfs, fsync is free and nothing counts as written.
pub fn bench(out: &mut impl Write, records: u64, batch: usize) -> std::io::Result<()> {
    let batch = batch.max(1);
    let base = std::env::var_os("EDGE_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("edge-store-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    writeln!(
        out,
        "store bench: {records} SDM630 readings (14 values), {batch} per flush, in {}",
        dir.display()
    )?;

    let mut one = Vec::new();
    let sample = Record {
        seq: 1_000_000,
        payload: sample_payload("sdm630-1", 0),
    };
    ciborium::into_writer(&sample, &mut one).map_err(std::io::Error::other)?;
    let mut compact = Vec::new();
    super::codec::encode_record(&mut compact, &sample, Some(1)).map_err(std::io::Error::other)?;
    let full: Vec<Record> = (0..super::PACKED_BLOCK_RECORDS as u64)
        .map(|i| Record {
            seq: i + 1,
            payload: sample_payload("sdm630-1", i),
        })
        .collect();
    let per_block = super::records_per_block(&full, false);
    let per_packed = super::records_per_block(&full, true);
    writeln!(
        out,
        "one record: {} bytes by schema (the first format's CBOR: {}) + {} of framing; {per_block} records per block (at most {} records or about {} bytes), {per_packed} per packed block (at most {}, packed to about {} bytes)",
        compact.len(),
        one.len(),
        super::FRAME_OVERHEAD,
        super::BLOCK_RECORDS,
        super::BLOCK_BYTES,
        super::PACKED_BLOCK_RECORDS,
        super::PACKED_BLOCK_TARGET
    )?;

    let framed = run_framed(&dir.join("framed"), None, records, batch, true)?;
    framed.print(out, "framed")?;
    // The compact record as a block holds it: what the store has to keep.
    let record_bytes = (compact.len() + super::FRAME_OVERHEAD) as f64;
    let amplification = |phase: &Phase| phase.write_bytes as f64 / phase.records.max(1) as f64;
    writeln!(
        out,
        "framed: {:.0} durable readings/s (goal {GOAL_PER_SEC}); write amplification {:.2} \
         (bytes written per byte of compact record in its block frame, {record_bytes} bytes; \
         goal at most {GOAL_AMPLIFICATION})",
        framed.per_sec(),
        amplification(&framed) / record_bytes,
    )?;
    if let Some(runtime) = std::env::var_os("EDGE_BENCH_RUNTIME_DIR") {
        let runtime =
            PathBuf::from(runtime).join(format!("edge-store-bench-{}", std::process::id()));
        let phase = run_framed(&dir.join("runtime"), Some(&runtime), records, batch, true);
        let _ = std::fs::remove_dir_all(&runtime);
        let phase = phase?;
        phase.print(out, "runtime")?;
        writeln!(
            out,
            "runtime: as framed, with the kill-safe runtime journal in {} (store.runtime_dir) \
             and the journal on disk written at syncs; write amplification {:.2}",
            runtime.display(),
            amplification(&phase) / record_bytes,
        )?;
    }
    if std::env::var_os("EDGE_BENCH_FRAMED_ONLY").is_some() {
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(());
    }
    let plain = run_framed(&dir.join("plain"), None, records, batch, false)?;
    plain.print(out, "plain")?;
    let bare = run_bare(&dir.join("bare"), records, batch)?;
    bare.print(out, "bare")?;
    writeln!(
        out,
        "framed: the store's blocks (packed) and sled's zstd page compression, without a \
         runtime journal (store.runtime_dir = \"\": the journal on disk written through \
         the page cache, durable meaning safe from a kill, never synced here); runtime \
         (EDGE_BENCH_RUNTIME_DIR): as by default, with the runtime journal on a tmpfs; \
         plain: the same without compression (store.compress = false); \
         bare: one sled key per record, uncompressed"
    )?;
    writeln!(
        out,
        "compression: {:.1}x fewer bytes written, {:.1}x less on disk",
        plain.write_bytes as f64 / framed.write_bytes.max(1) as f64,
        plain.disk_bytes as f64 / framed.disk_bytes.max(1) as f64,
    )?;
    let _ = std::fs::remove_dir_all(&dir);
    for size in [512, 64 << 10] {
        let rate = super::checksum::raw_throughput(size);
        writeln!(
            out,
            "CRC-32C alone over {size}-byte buffers: {rate:.0} MB/s"
        )?;
    }

    let ratio = framed.per_sec() / bare.per_sec().max(1e-9);
    writeln!(
        out,
        "ratio framed/bare throughput {:.2}; framing cost {:+.1}% time per record vs bare \
         (negative: the block layout is faster than one key per record)",
        ratio,
        (1.0 / ratio.max(1e-9) - 1.0) * 100.0
    )?;
    Ok(())
}

fn config(path: &Path, runtime_dir: Option<&Path>, compress: bool) -> StoreConfig {
    StoreConfig {
        path: path.to_path_buf(),
        cache_capacity: ByteSize(32 << 20),
        compress,
        runtime_dir: runtime_dir.map(Path::to_path_buf).unwrap_or_default(),
        ..StoreConfig::default()
    }
}

fn run_framed(
    path: &Path,
    runtime_dir: Option<&Path>,
    records: u64,
    batch: usize,
    compress: bool,
) -> std::io::Result<Phase> {
    reset_peak_rss();
    let io0 = write_bytes();
    let cfg = config(path, runtime_dir, compress);
    let store = Store::open(&cfg).map_err(std::io::Error::other)?;
    let mut phase = Phase::default();
    let mut i = 0;
    while i < records {
        let n = (records - i).min(batch as u64);
        let payloads: Vec<Payload> = (i..i + n).map(|j| sample_payload("sdm630-1", j)).collect();
        let (t0, c0) = (Instant::now(), cpu_time());
        let stored = store.append(payloads).map_err(std::io::Error::other)?;
        phase.wall += t0.elapsed();
        phase.cpu += cpu_time().saturating_sub(c0);
        drop(stored);
        i += n;
    }
    phase.records = records;
    phase.disk_bytes = store.stats().disk_bytes;
    drop(store);
    phase.write_bytes = write_bytes().saturating_sub(io0);
    phase.peak_rss_kib = peak_rss_kib();
    Ok(phase)
}

fn run_bare(path: &Path, records: u64, batch: usize) -> std::io::Result<Phase> {
    reset_peak_rss();
    let io0 = write_bytes();
    let db = sled::Config::new()
        .path(path)
        .cache_capacity(32 << 20)
        .flush_every_ms(Some(1000))
        .open()
        .map_err(std::io::Error::other)?;
    let mut phase = Phase::default();
    let mut buf = Vec::new();
    let mut i = 0;
    while i < records {
        let n = (records - i).min(batch as u64);
        let recs: Vec<Record> = (i..i + n)
            .map(|j| Record {
                seq: j + 1,
                payload: sample_payload("sdm630-1", j),
            })
            .collect();
        let (t0, c0) = (Instant::now(), cpu_time());
        for rec in &recs {
            buf.clear();
            ciborium::into_writer(rec, &mut buf).map_err(std::io::Error::other)?;
            db.insert(rec.seq.to_be_bytes(), buf.as_slice())
                .map_err(std::io::Error::other)?;
        }
        db.flush().map_err(std::io::Error::other)?;
        phase.wall += t0.elapsed();
        phase.cpu += cpu_time().saturating_sub(c0);
        i += n;
    }
    phase.records = records;
    phase.disk_bytes = super::dir_size(path);
    drop(db);
    phase.write_bytes = write_bytes().saturating_sub(io0);
    phase.peak_rss_kib = peak_rss_kib();
    Ok(phase)
}

/// User + system CPU time of this process.
fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes into the struct we pass; zeroed is a valid rusage.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a live rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Peak resident set (VmHWM) in KiB; 0 where /proc is missing.
pub(crate) fn peak_rss_kib() -> u64 {
    proc_field("/proc/self/status", "VmHWM:")
}

/// Bytes this process caused to be written to storage; 0 where /proc is missing.
fn write_bytes() -> u64 {
    proc_field("/proc/self/io", "write_bytes:")
}

/// Resets VmHWM so each phase reports its own peak (Linux >= 4.0).
pub(crate) fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn proc_field(file: &str, name: &str) -> u64 {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}
