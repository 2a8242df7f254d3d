//! Sync benchmark: drain a backlog of stored records to a broker on loopback (an
//! in-process rumqttd), against a bare rumqttc QoS 1 publish loop of the same
//! batches with no store. Figures, not assertions: `edge-agent bench sync`.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::wire;
use super::UpstreamConfig;
use crate::broker::config::MqttConfig;
use crate::broker::LocalBroker;
use crate::config::units::ByteSize;
use crate::store::bench::{peak_rss_kib, reset_peak_rss, sample_payload};
use crate::store::config::StoreConfig;
use crate::store::Store;

/// What to run.
#[derive(Debug, Clone)]
pub struct Params {
    /// Records in the backlog.
    pub records: u64,
    /// Largest batch, in records (batches are also bounded to 128 KiB).
    pub batch_records: usize,
    /// Batches in flight.
    pub inflight: usize,
    /// An external broker; `None` starts a rumqttd in this process.
    pub broker: Option<SocketAddr>,
    /// `store.cache_capacity` of the drain; `None`: the default.
    pub cache_capacity: Option<u64>,
    /// Set in the child process that drains a filled store (see [`bench`]).
    pub drain_store: Option<std::path::PathBuf>,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            records: 1_000_000,
            batch_records: 500,
            inflight: 8,
            broker: None,
            cache_capacity: None,
            drain_store: None,
        }
    }
}

/// Runs the benchmark and prints its figures to `out`.
///
/// The drain runs in a child process (this program, `bench sync --drain-store`),
/// which opens the filled store as the agent would after a restart: its peak RSS is
/// the drain's alone, neither the fill's leftovers nor the in-process broker's.
pub fn bench(out: &mut dyn Write, params: Params) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match params.drain_store.clone() {
        Some(path) => runtime.block_on(drain(out, &path, &params)),
        None => runtime.block_on(run(out, params)),
    }
}

/// The upstream config of the drain.
fn upstream(params: &Params, broker: SocketAddr) -> UpstreamConfig {
    UpstreamConfig {
        host: broker.ip().to_string(),
        port: broker.port(),
        batch_records: params.batch_records,
        batch_bytes: ByteSize(128 << 10),
        inflight_batches: params.inflight,
        ..UpstreamConfig::default()
    }
}

/// The child's part: drains the store at `path` to `--broker` with the store's
/// default config (or `--cache-capacity`) and prints `drain <seconds> <peak RSS KiB> <RSS KiB at start>`.
async fn drain(out: &mut dyn Write, path: &std::path::Path, params: &Params) -> anyhow::Result<()> {
    let broker = params.broker.context("--drain-store needs --broker")?;
    let start_rss = rss_kib();
    reset_peak_rss();
    let defaults = StoreConfig::default();
    let store = Arc::new(Store::open(&StoreConfig {
        path: path.to_path_buf(),
        cache_capacity: params
            .cache_capacity
            .map_or(defaults.cache_capacity, ByteSize),
        ..defaults
    })?);
    let started = Instant::now();
    let (_tx, rx) = broadcast::channel(4);
    let stop = CancellationToken::new();
    let cfg = upstream(params, broker);
    let mut sync = super::start(store.clone(), &cfg, "bench-gw", "bench", rx, stop.clone())?;
    let last = store.last_seq();
    sync.status
        .wait_for(|s| s.cursor >= last)
        .await
        .context("sync task stopped")?;
    let secs = started.elapsed().as_secs_f64();
    let peak = peak_rss_kib();
    stop.cancel();
    let _ = sync.task.await;
    writeln!(out, "drain {secs} {peak} {start_rss}")?;
    Ok(())
}

/// Runs the drain of the store at `path` in a child process; returns its seconds,
/// peak RSS and RSS at start (KiB).
fn drain_in_child(
    path: &std::path::Path,
    params: &Params,
    broker: SocketAddr,
) -> anyhow::Result<(f64, u64, u64)> {
    let exe = std::env::current_exe().context("this program's path")?;
    let output = std::process::Command::new(exe)
        .args(["bench", "sync", "--records"])
        .arg(params.records.to_string())
        .arg("--batch")
        .arg(params.batch_records.to_string())
        .arg("--inflight")
        .arg(params.inflight.to_string())
        .arg("--broker")
        .arg(broker.to_string())
        .args(
            params
                .cache_capacity
                .map(|c| format!("--cache-capacity={c}")),
        )
        .arg("--drain-store")
        .arg(path)
        .output()
        .context("running the drain")?;
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("drain "))
        .with_context(|| {
            format!(
                "the drain printed no figures: {text} {}",
                String::from_utf8_lossy(&output.stderr)
            )
        })?;
    let mut fields = line.split_whitespace();
    let mut next = || fields.next().context("a short drain line");
    Ok((next()?.parse()?, next()?.parse()?, next()?.parse()?))
}

async fn run(out: &mut dyn Write, params: Params) -> anyhow::Result<()> {
    let Params {
        records,
        batch_records,
        inflight,
        broker,
        ..
    } = params;
    let dir = tempfile_dir()?;
    let store = Arc::new(Store::open(&StoreConfig {
        path: dir.join("store"),
        cache_capacity: ByteSize(16 << 20),
        ..StoreConfig::default()
    })?);
    writeln!(out, "filling a backlog of {records} SDM630 readings...")?;
    let mut i = 0;
    while i < records {
        let n = (records - i).min(1000);
        store.append((i..i + n).map(|k| sample_payload("main", k)).collect())?;
        i += n;
    }
    let (listen, local_broker, broker_name) = match broker {
        Some(addr) => (addr, None, format!("the broker at {addr}")),
        None => {
            let listen = SocketAddr::from(([127, 0, 0, 1], crate::testkit::free_port()));
            let local = LocalBroker::start(
                &crate::broker::upstream_logs(MqttConfig {
                    listen,
                    ..MqttConfig::default()
                }),
                "bench-broker",
            )?;
            (
                listen,
                Some(local),
                "rumqttd in this process, on loopback".to_string(),
            )
        }
    };
    let cfg = upstream(&params, listen);

    // The sync task draining the backlog, in a child process that opens the store
    // as the agent does on start.
    drop(store);
    let (sync_secs, sync_rss, sync_base) = drain_in_child(&dir.join("store"), &params, listen)?;
    let store = Store::open(&StoreConfig {
        path: dir.join("store"),
        cache_capacity: ByteSize(16 << 20),
        ..StoreConfig::default()
    })?;
    let last = store.last_seq();

    // The store's share of the sync's work: the same batches read and framed as the
    // sync does, into one reused buffer, nothing published.
    let frame_all = |keep: &mut dyn FnMut(&[u8])| -> anyhow::Result<()> {
        let mut buf = Vec::with_capacity(cfg.batch_bytes.0 as usize * 2);
        let mut next = 1;
        while next <= last {
            let mut batch = wire::BatchEncoder::new("bench-gw", &mut buf);
            let walk = store.visit_raw(
                next,
                last,
                batch_records,
                cfg.batch_bytes.0 as usize,
                &mut |seq, bytes| batch.push(seq, bytes),
            )?;
            let ids = batch.finish();
            let schemas: Vec<Vec<u8>> = ids
                .into_iter()
                .filter_map(|id| store.schema_bytes(id))
                .collect();
            wire::append_schemas(&mut buf, &schemas);
            keep(&buf);
            next = walk.covered_to + 1;
        }
        Ok(())
    };
    let mut stored_bytes = 0;
    let started = Instant::now();
    frame_all(&mut |b| stored_bytes += b.len())?;
    let read_secs = started.elapsed().as_secs_f64();
    // Then the same batches, kept in memory, through a bare rumqttc loop.
    let mut batches = Vec::new();
    frame_all(&mut |b| batches.push(b.to_vec()))?;
    reset_peak_rss();
    let bare_base = rss_kib();
    let started = Instant::now();
    bare_loop(listen, batches, inflight).await?;
    let bare_secs = started.elapsed().as_secs_f64();
    let bare_rss = peak_rss_kib();
    drop(local_broker);

    let sync_rate = records as f64 / sync_secs;
    let bare_rate = records as f64 / bare_secs;
    writeln!(
        out,
        "batches of up to {batch_records} records / 128 KiB, {inflight} in flight, QoS 1, {broker_name}"
    )?;
    writeln!(
        out,
        "sync (store -> upstream, cursor fsynced; a process of its own, store cache {}): {records} records in {sync_secs:.2} s = {sync_rate:.0} records/s, {:.1} MB/s of compact records as framed upstream, peak RSS {:.1} MiB (at start {:.1} MiB)",
        params.cache_capacity.map_or_else(
            || format!(
                "{} MiB (default)",
                StoreConfig::default().cache_capacity.0 >> 20
            ),
            |c| format!("{:.1} MiB", c as f64 / (1 << 20) as f64)
        ),
        stored_bytes as f64 / 1e6 / sync_secs.max(1e-9),
        sync_rss as f64 / 1024.0,
        sync_base as f64 / 1024.0
    )?;
    writeln!(
        out,
        "reading and framing the batches alone, nothing published: {records} records ({:.0} MB framed) in {read_secs:.2} s = {:.0} records/s",
        stored_bytes as f64 / 1e6,
        records as f64 / read_secs
    )?;
    writeln!(
        out,
        "bare rumqttc QoS 1 loop (same batches, no store):  {records} records in {bare_secs:.2} s = {bare_rate:.0} records/s, peak RSS {:.1} MiB (at start {:.1} MiB, batches pre-encoded in memory)",
        bare_rss as f64 / 1024.0,
        bare_base as f64 / 1024.0
    )?;
    writeln!(
        out,
        "goal: the sync at >= 300000 records/s on the development machine; ratio sync / bare loop {:.2}, for reference",
        sync_rate / bare_rate
    )?;
    let (before, after) = upstream_bytes_per_reading(batch_records, last, true);
    let (trickle_before, trickle_after) = upstream_bytes_per_reading(1, last, false);
    writeln!(
        out,
        "upstream bytes per reading: {:.1} on the wire in this drain; batches of {batch_records} with their schema: {after:.1} (version 1 batches: {before:.1}, ratio {:.3}); a live batch of one reading: {trickle_after:.1} (version 1: {trickle_before:.1})",
        stored_bytes as f64 / records.max(1) as f64,
        after / before
    )?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Upstream bytes per SDM630 reading in a batch of `n` readings from seq `first`:
/// (in a batch of the first format, where each element was a map
/// `{gw, seq, kind, data}` and `data` the CBOR of the whole record; in today's
/// batch, with the reading's schema when `with_schema`).
pub fn upstream_bytes_per_reading(n: usize, first: u64, with_schema: bool) -> (f64, f64) {
    use crate::model::Record;
    use crate::store::codec;
    let n = n.max(1);
    let records: Vec<Record> = (0..n as u64)
        .map(|i| Record {
            seq: first + i,
            payload: sample_payload("sdm630-1", i),
        })
        .collect();
    // The first format, element by element.
    let legacy: Vec<ciborium::Value> = records
        .iter()
        .map(|rec| {
            let mut data = Vec::new();
            // Plain data into a Vec: cannot fail.
            let _ = ciborium::into_writer(rec, &mut data);
            ciborium::Value::Map(vec![
                ("gw".into(), "gw-01".into()),
                ("seq".into(), rec.seq.into()),
                ("kind".into(), "reading".into()),
                ("data".into(), ciborium::Value::Bytes(data)),
            ])
        })
        .collect();
    let mut before = Vec::new();
    let _ = ciborium::into_writer(&ciborium::Value::Array(legacy), &mut before);
    // Today's: compact records by schema 1.
    let schema = match &records[0].payload {
        crate::model::Payload::Reading(r) => codec::Schema {
            id: 1,
            meter: r.meter.clone(),
            fields: r
                .values
                .iter()
                .map(|v| codec::Field {
                    quantity: v.quantity.clone(),
                    unit: v.unit.clone(),
                    kind: v.kind,
                    source: v.source,
                })
                .collect(),
        },
        _ => return (0.0, 0.0),
    };
    let raw: Vec<crate::store::RawRecord> = records
        .iter()
        .map(|rec| {
            let mut bytes = Vec::new();
            let _ = codec::encode_record(&mut bytes, rec, Some(1));
            crate::store::RawRecord {
                seq: rec.seq,
                bytes,
            }
        })
        .collect();
    let mut after = Vec::new();
    let schema_bytes = |id: u32| {
        let mut out = Vec::new();
        codec::encode_schema(&schema, &mut out);
        (with_schema && id == 1).then_some(out)
    };
    wire::encode_batch("gw-01", &raw, &schema_bytes, &mut after);
    (
        before.len() as f64 / n as f64,
        after.len() as f64 / n as f64,
    )
}

/// Current resident set in KiB; 0 where /proc is missing.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("edge-agent-bench-sync-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Publishes every batch at QoS 1 with at most `inflight` unacknowledged.
async fn bare_loop(
    broker: SocketAddr,
    batches: Vec<Vec<u8>>,
    inflight: usize,
) -> anyhow::Result<()> {
    let mut options = MqttOptions::new("bench-bare", broker.ip().to_string(), broker.port());
    options.set_keep_alive(Duration::from_secs(15));
    options.set_max_packet_size(64 << 10, 1 << 20);
    options.set_inflight((inflight + 16) as u16);
    let (client, mut events) = AsyncClient::new(options, inflight + 16);
    let total = batches.len();
    let mut queue = batches.into_iter();
    let (mut outstanding, mut acked) = (0usize, 0usize);
    let mut connected = false;
    while acked < total {
        while connected && outstanding < inflight {
            let Some(b) = queue.next() else { break };
            client.try_publish("bench/bare/records", QoS::AtLeastOnce, false, b)?;
            outstanding += 1;
        }
        match events.poll().await? {
            Event::Incoming(Packet::ConnAck(_)) => connected = true,
            Event::Incoming(Packet::PubAck(_)) => {
                outstanding -= 1;
                acked += 1;
            }
            _ => {}
        }
    }
    Ok(())
}
