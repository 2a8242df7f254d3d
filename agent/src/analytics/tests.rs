//! The analytics worker on real stores: records in, intervals and events stored,
//! state across a reopen, and the queries over what it stored.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;

use super::*;
use crate::derive::{energy_between_samples, ForecastParams};
use crate::ingest::{self, Point, Series};
use crate::model::{Kind, Value};
use crate::query::{self, Window};
use crate::store::testing::{config, open};
use crate::store::{start_writer, Store};

/// 2018-08-24T00:00:00Z.
const T0: i64 = 1_535_068_800_000;
const MIN: i64 = 60_000;

struct Rig {
    store: Arc<Store>,
    writer: StoreWriter,
    writer_task: tokio::task::JoinHandle<()>,
    analytics: Analytics,
}

fn settings() -> AnalyticsSettings {
    AnalyticsSettings {
        gateway: "gw".into(),
        tracker: TrackerParams::default(),
        spacing_ms: HashMap::new(),
        energy_quantity: HashMap::new(),
        rules: Vec::new(),
        cluster_every: 1_000_000,
        clusters: ClusterCount::Fixed(3),
        persist_every: Duration::from_secs(60),
        max_recompute_ms: 24 * 3_600_000,
    }
}

fn start(dir: &tempfile::TempDir, settings: AnalyticsSettings) -> Rig {
    let store = Arc::new(open(&config(dir)));
    let (tx, _) = broadcast::channel(256);
    let rx = tx.subscribe();
    let (writer, writer_task) = start_writer(store.clone(), Duration::from_millis(2), 1000, tx);
    let analytics = Analytics::start(store.clone(), writer.clone(), rx, None, None, settings);
    Rig {
        store,
        writer,
        writer_task,
        analytics,
    }
}

impl Rig {
    async fn put(&self, readings: Vec<Reading>) {
        self.writer
            .submit_batch(readings.into_iter().map(Payload::Reading).collect())
            .await
            .unwrap();
    }

    /// Stops like the agent does: analytics catches up and saves, then the writer ends.
    async fn stop(self) -> Arc<Store> {
        self.analytics.stop().await;
        drop(self.writer);
        self.writer_task.await.unwrap();
        self.store
    }
}

fn value(q: &str, unit: &str, kind: Kind, v: f64) -> Value {
    Value {
        quantity: q.into(),
        unit: unit.into(),
        kind,
        value: Some(v),
        invalid: None,
        source: Default::default(),
    }
}

fn power(meter: &str, ts_ms: i64, w: f64) -> Reading {
    Reading {
        meter: meter.into(),
        ts_ms,
        values: vec![value("power", "W", Kind::Power, w)],
    }
}

fn counter(meter: &str, ts_ms: i64, kwh: f64) -> Reading {
    Reading {
        meter: meter.into(),
        ts_ms,
        values: vec![
            value("power", "W", Kind::Power, 1.0),
            value("energy_total", "kWh", Kind::EnergyTotal, kwh),
        ],
    }
}

fn events(store: &Store) -> Vec<AlarmEvent> {
    store
        .read_range(1, store.last_seq())
        .unwrap()
        .into_iter()
        .filter_map(|r| match r.payload {
            Payload::Event(e) => Some(e),
            _ => None,
        })
        .collect()
}

fn interval_records(store: &Store, meter: &str) -> Vec<IntervalRecord> {
    store
        .read_range(1, store.last_seq())
        .unwrap()
        .into_iter()
        .filter_map(|r| match r.payload {
            Payload::Interval(iv) if iv.meter == meter => Some(iv),
            _ => None,
        })
        .collect()
}

fn hot_rule(count: u32) -> Rule {
    Rule {
        id: "hot".into(),
        meter: "*".into(),
        quantity: "power".into(),
        threshold: 5000.0,
        above: true,
        count,
    }
}

#[tokio::test]
async fn alarm_count_survives_a_restart_and_raises_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let with_rule = || AnalyticsSettings {
        rules: vec![hot_rule(3)],
        ..settings()
    };
    let rig = start(&dir, with_rule());
    // N-1 warnings, then a normal reading: nothing.
    rig.put(vec![power("m", T0, 6000.0), power("m", T0 + MIN, 6000.0)])
        .await;
    rig.put(vec![power("m", T0 + 2 * MIN, 100.0)]).await;
    // Two warnings, then a restart.
    rig.put(vec![power("m", T0 + 3 * MIN, 6000.0)]).await;
    rig.put(vec![power("m", T0 + 4 * MIN, 6000.0)]).await;
    let store = rig.stop().await;
    assert!(events(&store).is_empty());
    assert_eq!(
        store
            .get_state::<Cursor>(KEY_CURSOR)
            .unwrap()
            .unwrap()
            .alarms
            .counter("hot", "m")
            .warnings,
        2
    );
    drop(store);

    let rig = start(&dir, with_rule());
    rig.put(vec![power("m", T0 + 5 * MIN, 6000.0)]).await;
    rig.put(vec![power("m", T0 + 6 * MIN, 6000.0)]).await;
    let store = rig.stop().await;
    let got = events(&store);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].state, AlarmState::Raised);
    assert_eq!((got[0].ts_ms, got[0].count), (T0 + 5 * MIN, 3));
    drop(store);

    // A third start replays nothing twice; a normal reading clears.
    let rig = start(&dir, with_rule());
    rig.put(vec![power("m", T0 + 7 * MIN, 10.0)]).await;
    let store = rig.stop().await;
    let got = events(&store);
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[1].state, AlarmState::Cleared);
}

#[tokio::test]
async fn state_lost_after_records_were_stored_does_not_store_them_twice() {
    let dir = tempfile::tempdir().unwrap();
    let with_rule = || AnalyticsSettings {
        rules: vec![hot_rule(1)],
        ..settings()
    };
    let rig = start(&dir, with_rule());
    rig.put(vec![power("m", T0, 6000.0)]).await;
    let store = rig.stop().await;
    assert_eq!(events(&store).len(), 1);
    // As if the process died after the event was durable but before the state was
    // saved: the cursor of an earlier moment.
    store.put_state(KEY_CURSOR, &Cursor::default()).unwrap();
    drop(store);
    let rig = start(&dir, with_rule());
    let store = rig.stop().await;
    assert_eq!(events(&store).len(), 1, "{:?}", events(&store));
}

#[tokio::test]
async fn counter_reset_is_flagged_and_never_negative() {
    let dir = tempfile::tempdir().unwrap();
    let rig = start(&dir, settings());
    // 1 kWh per 15 minutes; a swap to a meter at 3 kWh at 00:40; then 1 kWh per 15 min.
    let mut readings = Vec::new();
    for m in 0..=40 {
        readings.push(counter("c", T0 + m * MIN, 100.0 + m as f64 / 15.0));
    }
    for m in 41..=120 {
        readings.push(counter("c", T0 + m * MIN, 3.0 + (m - 41) as f64 / 15.0));
    }
    rig.put(readings).await;
    let store = rig.stop().await;
    let ivs = interval_records(&store, "c");
    assert!(ivs.len() >= 7, "{ivs:?}");
    assert!(ivs.iter().all(|iv| iv.interval.energy_kwh >= 0.0));
    assert_eq!(ivs[0].quantity, "energy_total");
    let at = |k: i64| {
        ivs.iter()
            .find(|iv| iv.interval.start_ms == T0 + k * 15 * MIN)
            .unwrap()
    };
    assert!((at(0).interval.energy_kwh - 1.0).abs() < 1e-9);
    assert!(at(2).interval.flags.reset);
    assert!(!at(1).interval.flags.reset && !at(3).interval.flags.reset);
    assert!((at(4).interval.energy_kwh - 1.0).abs() < 1e-9);
}

#[tokio::test]
async fn late_data_is_stored_again_with_a_higher_revision() {
    let dir = tempfile::tempdir().unwrap();
    let rig = start(&dir, settings());
    // Power every minute, one missing at 00:07.
    let readings: Vec<Reading> = (0..40)
        .filter(|m| *m != 7)
        .map(|m| power("p", T0 + m * MIN, 1000.0))
        .collect();
    rig.put(readings).await;
    // The late reading, with another value.
    rig.put(vec![power("p", T0 + 7 * MIN, 3000.0)]).await;
    let store = rig.stop().await;
    let all = interval_records(&store, "p");
    let first: Vec<&IntervalRecord> = all.iter().filter(|iv| iv.interval.start_ms == T0).collect();
    assert_eq!(first.len(), 2, "{first:?}");
    assert_eq!(first[0].interval.revision, 0);
    assert!((first[0].interval.energy_kwh - 0.25).abs() < 1e-9);
    assert_eq!(first[1].interval.revision, 1);
    // One minute at 3 kW instead of 1 kW: +2 kW × 1/60 h.
    assert!((first[1].interval.energy_kwh - (0.25 + 2.0 / 60.0)).abs() < 1e-9);
    let series = query::series_15m(&store, "p", Window::new(T0, T0 + 15 * MIN)).unwrap();
    assert_eq!(series.len(), 1);
    assert_eq!(series[0].interval.revision, 1);
}

/// Two days of a daily pattern for two meters, through the worker, then the queries.
#[tokio::test]
async fn queries_over_stored_intervals() {
    let dir = tempfile::tempdir().unwrap();
    let rig = start(
        &dir,
        AnalyticsSettings {
            cluster_every: 1000,
            ..settings()
        },
    );
    let level = |m: i64| match (m / 60) % 24 {
        0..=5 => 200.0,
        17..=20 => 4000.0,
        _ => 1500.0,
    };
    let mut big = Vec::new();
    let mut small = Vec::new();
    for m in 0..(3 * 24 * 60) {
        big.push(power("big", T0 + m * MIN, level(m)));
        small.push(power("small", T0 + m * MIN, level(m) / 10.0));
    }
    for chunk in big.chunks(1500) {
        rig.put(chunk.to_vec()).await;
    }
    rig.put(small).await;
    let store = rig.stop().await;

    // Series: every quarter of the first day, in order.
    let day = Window::new(T0, T0 + 86_400_000);
    let series = query::series_15m(&store, "big", day).unwrap();
    assert_eq!(series.len(), 96);
    assert!(series
        .windows(2)
        .all(|w| w[1].interval.start_ms - w[0].interval.start_ms == 15 * MIN));
    assert!((series[0].interval.energy_kwh - 0.05).abs() < 1e-9);

    // Energy at boundaries that are not quarters equals the raw-sample figure.
    let samples: Vec<(i64, f64)> = (0..(3 * 24 * 60))
        .map(|m| (T0 + m * MIN, level(m)))
        .collect();
    let (a, b) = (T0 + 7 * MIN + 30_000, T0 + 30 * 60 * MIN + 11 * MIN);
    let got = query::energy(&store, "big", Window::new(a, b)).unwrap();
    let want = energy_between_samples(
        Kind::Power,
        Unit::W,
        &samples,
        &IntervalParams::default(),
        a,
        b,
    )
    .unwrap();
    assert!(
        (got.energy_kwh - want.energy_kwh).abs() < 1e-9,
        "{got:?} vs {want:?}"
    );
    assert!((got.coverage - 1.0).abs() < 1e-12);

    // Top meters by intervals.
    let top = query::top_meters(&store, Window::new(T0, T0 + 86_400_000), 3).unwrap();
    assert_eq!(
        top.iter().map(|m| m.meter.as_str()).collect::<Vec<_>>(),
        ["big", "small"]
    );
    let day_kwh = (6.0 * 200.0 + 4.0 * 4000.0 + 14.0 * 1500.0) / 1000.0;
    assert!((top[0].energy_kwh - day_kwh).abs() < 1e-9, "{top:?}");

    // Forecast of the next day from the history, with its backtest.
    let next = Window::new(T0 + 3 * 86_400_000, T0 + 4 * 86_400_000);
    let f = query::forecast(&store, "big", next, &ForecastParams::default()).unwrap();
    assert_eq!(f.intervals.len(), 96);
    assert!(
        (f.total_kwh - day_kwh).abs() < 0.05 * day_kwh,
        "{}",
        f.total_kwh
    );
    let backtest = f.backtest.expect("a backtest on two complete days");
    assert!(backtest.mape_pct < 1.0, "{backtest:?}");

    // Clusters were computed on the blocking pool and stored; reading never recomputes.
    let clusters = query::clusters(&store).unwrap();
    let big_c = clusters.iter().find(|c| c.meter == "big").expect("big");
    assert_eq!(big_c.stats.k, 3);
    let centres: Vec<f64> = big_c.stats.clusters.iter().map(|c| c.centre_w).collect();
    for (c, want) in centres.iter().zip([200.0, 1500.0, 4000.0]) {
        assert!((c - want).abs() < 0.02 * want, "{centres:?}");
    }
    // A cluster run reads the series a few days at a time: the same points, in the
    // same order, as reading it whole, and the same clusters.
    let whole = query::series_15m(&store, "big", Window::all()).unwrap();
    assert!(whole.len() > 2 * 96, "{}", whole.len());
    let mut stepped = Vec::new();
    query::visit_series_15m(&store, "big", Window::all(), 1, &mut |p| stepped.push(p)).unwrap();
    assert_eq!(stepped, whole);
    let recomputed =
        super::compute_clusters(&store, "big", &big_c.quantity, ClusterCount::Fixed(3))
            .unwrap()
            .expect("clusters");
    assert_eq!(recomputed.stats, big_c.stats);
    assert!(matches!(
        query::energy(&store, "nobody", day),
        Err(query::QueryError::NoEnergy(_))
    ));
}

#[tokio::test]
async fn pushed_series_produce_intervals() {
    let dir = tempfile::tempdir().unwrap();
    let rig = start(&dir, settings());
    // DESIGN §5's third example: kWh deltas 2, 5, 2, 6 every 15 min, then two more
    // (an energy interval closes once a later point is past the grace).
    let points: Vec<Point> = [2.0, 5.0, 2.0, 6.0, 1.0, 1.0]
        .iter()
        .enumerate()
        .map(|(i, v)| Point::new(T0 + i as i64 * 15 * MIN, *v))
        .collect();
    let series = Series {
        meter: "pushed".into(),
        unit: "kWh".into(),
        kind: Kind::EnergyDelta,
        points,
    };
    ingest::ingest(&rig.writer, &rig.store, series, T0 + 80 * MIN)
        .await
        .unwrap();
    let store = rig.stop().await;
    let got: Vec<f64> = query::series_15m(&store, "pushed", Window::all())
        .unwrap()
        .iter()
        .map(|p| p.interval.energy_kwh)
        .collect();
    // The watermark closes the first four; history this old is a silent meter, so
    // a tick may close the rest by the wall clock (1, then 1 over one spacing).
    assert_eq!(got[..4], [2.0, 5.0, 2.0, 6.0]);
    assert!(got[4..].iter().take(2).all(|e| *e == 1.0), "{got:?}");
}

#[test]
fn energy_quantity_prefers_import_then_totals_then_deltas_then_power() {
    let r = |values: Vec<Value>| Reading {
        meter: "m".into(),
        ts_ms: 0,
        values,
    };
    let pick = |values: Vec<Value>, conf: Option<&str>| {
        energy_quantity(&r(values), conf).map(|i| i.quantity)
    };
    let full = vec![
        value("power_l1", "W", Kind::Power, 1.0),
        value("power", "W", Kind::Power, 1.0),
        value("energy_total", "kWh", Kind::EnergyTotal, 1.0),
        value("energy_import", "kWh", Kind::EnergyTotal, 1.0),
        value("delta", "Wh", Kind::EnergyDelta, 1.0),
    ];
    assert_eq!(pick(full.clone(), None).as_deref(), Some("energy_import"));
    assert_eq!(
        pick(full.clone(), Some("energy_total")).as_deref(),
        Some("energy_total")
    );
    assert_eq!(
        pick(full[..3].to_vec(), None).as_deref(),
        Some("energy_total")
    );
    assert_eq!(
        pick(
            vec![full[0].clone(), full[1].clone(), full[4].clone()],
            None
        )
        .as_deref(),
        Some("delta")
    );
    assert_eq!(pick(full[..2].to_vec(), None).as_deref(), Some("power"));
    // A unit that does not fit the kind is not usable.
    assert_eq!(
        pick(
            vec![value("energy_total", "W", Kind::EnergyTotal, 1.0)],
            None
        ),
        None
    );
}

#[tokio::test]
async fn a_power_meter_gone_silent_gets_its_intervals_closed_as_gaps() {
    let dir = tempfile::tempdir().unwrap();
    let rig = start(
        &dir,
        AnalyticsSettings {
            persist_every: Duration::from_millis(100),
            ..settings()
        },
    );
    let grace = TrackerParams::default().grace_ms;
    let max_gap = TrackerParams::default().interval.max_gap_ms;
    // A live meter: 1 kW every minute for 15 minutes, then silence. The times sit on
    // the 15-minute grid so that, whatever the wall clock's phase, the interval
    // starting `max_gap` after the last reading has ended at least `grace` ago.
    let now = now_ms();
    let grid = 15 * MIN;
    let closable = (now - grace - grid).div_euclid(grid) * grid;
    let last = closable - max_gap;
    let first = last - 15 * MIN;
    let readings: Vec<Reading> = (0..=15)
        .map(|i| power("m", first + i * MIN, 1000.0))
        .collect();
    rig.put(readings).await;
    // Wait (bounded) for the tick to close the intervals over the silence.
    let silent = crate::testkit::poll_until(Duration::from_secs(10), || async {
        let silent: Vec<IntervalRecord> = interval_records(&rig.store, "m")
            .into_iter()
            .filter(|iv| iv.interval.start_ms >= last + max_gap)
            .collect();
        let done = !silent.is_empty();
        (silent, done)
    })
    .await;
    assert!(
        !silent.is_empty(),
        "no interval after the silence began was closed"
    );
    for iv in &silent {
        assert!(iv.interval.end_ms() <= now_ms() - grace + 1000, "{iv:?}");
        assert_eq!(iv.interval.energy_kwh, 0.0, "{iv:?}");
        assert_eq!(iv.interval.coverage, 0.0, "{iv:?}");
        assert!(iv.interval.flags.gap, "{iv:?}");
    }
    // The intervals with data before the silence hold 1 kW worth of energy.
    let all = interval_records(&rig.store, "m");
    let with_data: f64 = all
        .iter()
        .filter(|iv| iv.interval.start_ms < last + max_gap)
        .map(|iv| iv.interval.energy_kwh)
        .sum();
    // 15 minutes between the samples, and the last one holds for the typical
    // spacing (1 minute): 16 minutes at 1 kW.
    assert!(
        (with_data - 16.0 / 60.0).abs() < 1e-9,
        "energy {with_data} kWh"
    );
    rig.stop().await;
}

#[tokio::test]
async fn readings_since_the_last_cluster_run_are_counted_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let every = AnalyticsSettings {
        cluster_every: 10,
        ..settings()
    };
    let rig = start(&dir, every.clone());
    let level = |i: i64| [100.0, 1000.0, 3000.0][(i % 3) as usize];
    let at = |i: i64| power("m", T0 + i * 15 * MIN, level(i));
    rig.put((0..6).map(at).collect()).await;
    let store = rig.stop().await;
    assert!(store
        .get_state::<ClusterSummary>(&format!("{CLUSTERS_PREFIX}m"))
        .unwrap()
        .is_none());
    drop(store);
    // Four more after a restart make ten: the run happens although neither run of
    // the agent saw ten on its own.
    let rig = start(&dir, every);
    rig.put((6..10).map(at).collect()).await;
    let store = rig.stop().await;
    assert!(
        store
            .get_state::<ClusterSummary>(&format!("{CLUSTERS_PREFIX}m"))
            .unwrap()
            .is_some(),
        "no cluster run after ten readings over two runs"
    );
}

#[tokio::test]
async fn batches_missed_by_a_lagging_broadcast_are_read_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(&config(&dir)));
    // The writer gets a channel of its own; the worker listens on one that holds a
    // single batch, fed by hand below.
    let (writer_tx, _) = broadcast::channel(16);
    let (writer, writer_task) =
        start_writer(store.clone(), Duration::from_millis(2), 1000, writer_tx);
    let (tx, rx) = broadcast::channel(1);
    let analytics = Analytics::start(
        store.clone(),
        writer.clone(),
        rx,
        None,
        None,
        AnalyticsSettings {
            rules: vec![hot_rule(9)],
            ..settings()
        },
    );
    // Let the worker load and take its first tick (which also reads the store).
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Three stored batches of three warnings each: the alarm raises only if the
    // worker sees all nine.
    let mut batches = Vec::new();
    for b in 0..3i64 {
        let payloads = (0..3i64)
            .map(|i| Payload::Reading(power("m", T0 + (b * 3 + i) * MIN, 6000.0)))
            .collect();
        batches.push(Arc::new(store.append(payloads).unwrap()));
    }
    // Sent without yielding (single-threaded test runtime): the worker finds two
    // batches lost to the lag and the third starting past what it has seen.
    for batch in &batches {
        tx.send(batch.clone()).unwrap();
    }
    assert!(tx.len() <= 1, "the channel holds at most one batch");
    crate::testkit::poll_until(Duration::from_secs(10), || async {
        ((), !events(&store).is_empty())
    })
    .await;
    let got = events(&store);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!((got[0].ts_ms, got[0].count), (T0 + 8 * MIN, 9));
    analytics.stop().await;
    drop(writer);
    writer_task.await.unwrap();
}

/// Forwards TCP connections from a free loopback port to `to`, keeping every byte
/// the clients sent, so a test can read the MQTT packets as they left the client.
async fn recording_proxy(
    to: std::net::SocketAddr,
) -> (std::net::SocketAddr, Arc<std::sync::Mutex<Vec<u8>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = sent.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let keep = keep.clone();
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let Ok(server) = tokio::net::TcpStream::connect(to).await else {
                    return;
                };
                let (mut from_server, mut to_server) = server.into_split();
                let (mut from_client, mut to_client) = client.split();
                let upstream = async {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = from_client.read(&mut buf).await {
                        if n == 0 || to_server.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        keep.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                };
                let downstream = tokio::io::copy(&mut from_server, &mut to_client);
                tokio::select! {
                    _ = upstream => {}
                    _ = downstream => {}
                }
            });
        }
    });
    (addr, sent)
}

/// (topic, QoS) of every PUBLISH in a client's MQTT 3.1.1 byte stream.
fn publishes(stream: &[u8]) -> Vec<(String, u8)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < stream.len() {
        let header = stream[at];
        let (mut len, mut shift, mut i) = (0usize, 0, at + 1);
        loop {
            let Some(&b) = stream.get(i) else { return out };
            len |= usize::from(b & 0x7f) << shift;
            shift += 7;
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
        }
        let Some(body) = stream.get(i..i + len) else {
            return out;
        };
        if header >> 4 == 3 && body.len() >= 2 {
            let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
            let topic = String::from_utf8_lossy(&body[2..2 + topic_len.min(body.len() - 2)]);
            out.push((topic.into_owned(), (header >> 1) & 3));
        }
        at = i + len;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_leave_the_publisher_with_qos_1() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(&config(&dir)));
    let broker_addr: std::net::SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap();
    let broker = crate::broker::LocalBroker::start(
        &MqttConfig {
            listen: broker_addr,
            ..MqttConfig::default()
        },
        "gw",
    )
    .unwrap();
    // The event client connects through the proxy; the broker itself listens behind.
    let (proxy_addr, sent) = recording_proxy(broker_addr).await;
    let (tx, _) = broadcast::channel(64);
    let rx = tx.subscribe();
    let (writer, writer_task) = start_writer(store.clone(), Duration::from_millis(2), 1000, tx);
    let analytics = Analytics::start(
        store.clone(),
        writer.clone(),
        rx,
        Some(broker.clone()),
        Some(&MqttConfig {
            listen: proxy_addr,
            ..MqttConfig::default()
        }),
        AnalyticsSettings {
            rules: vec![hot_rule(2)],
            ..settings()
        },
    );
    writer
        .submit_batch(vec![
            Payload::Reading(power("m", T0, 6000.0)),
            Payload::Reading(power("m", T0 + MIN, 6000.0)),
            Payload::Reading(power("m", T0 + 2 * MIN, 100.0)),
        ])
        .await
        .unwrap();
    let events = crate::testkit::poll_until(Duration::from_secs(10), || async {
        let events: Vec<(String, u8)> = publishes(&sent.lock().unwrap())
            .into_iter()
            .filter(|(t, _)| t.ends_with("/m/events"))
            .collect();
        let done = events.len() >= 2;
        (events, done)
    })
    .await;
    assert_eq!(events.len(), 2, "raised and cleared: {events:?}");
    for (topic, qos) in &events {
        assert_eq!(*qos, 1, "{topic} left the publisher with QoS {qos}");
    }
    analytics.stop().await;
    drop(writer);
    writer_task.await.unwrap();
}

#[tokio::test]
async fn recent_events_and_raised_alarms_are_kept_for_readers_across_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let with_rule = || AnalyticsSettings {
        rules: vec![hot_rule(1)],
        ..settings()
    };
    let rig = start(&dir, with_rule());
    // a: raised at 1, cleared at 2, raised at 3; b: raised at 4.
    rig.put(vec![power("a", T0 + MIN, 6000.0)]).await;
    rig.put(vec![power("a", T0 + 2 * MIN, 10.0)]).await;
    rig.put(vec![
        power("a", T0 + 3 * MIN, 7000.0),
        power("b", T0 + 4 * MIN, 8000.0),
    ])
    .await;
    let store = rig.stop().await;
    let log = events::event_log(&store).unwrap();
    let newest = log.newest(10);
    let summary: Vec<(&str, AlarmState, i64)> = newest
        .iter()
        .map(|e| (e.event.meter.as_str(), e.event.state, e.event.ts_ms))
        .collect();
    assert_eq!(
        summary,
        [
            ("b", AlarmState::Raised, T0 + 4 * MIN),
            ("a", AlarmState::Raised, T0 + 3 * MIN),
            ("a", AlarmState::Cleared, T0 + 2 * MIN),
            ("a", AlarmState::Raised, T0 + MIN),
        ]
    );
    // The seqs are those of the event records in the log.
    let in_log: Vec<u64> = store
        .read_range(1, store.last_seq())
        .unwrap()
        .into_iter()
        .filter(|r| matches!(r.payload, Payload::Event(_)))
        .map(|r| r.seq)
        .rev()
        .collect();
    assert_eq!(newest.iter().map(|e| e.seq).collect::<Vec<_>>(), in_log);
    let active = events::active_alarms(&store, &log).unwrap();
    assert_eq!(
        active
            .iter()
            .map(|a| (
                a.meter.as_str(),
                a.rule.as_str(),
                a.warnings,
                a.raised.as_ref().map(|e| e.seq)
            ))
            .collect::<Vec<_>>(),
        [
            ("a", "hot", 1, Some(in_log[1])),
            ("b", "hot", 1, Some(in_log[0]))
        ]
    );

    // A crash after the events were stored, before the state was saved: the list
    // is rebuilt from the replay, each event once.
    store.put_state(KEY_CURSOR, &Cursor::default()).unwrap();
    store.delete_state(events::KEY_EVENTS).unwrap();
    drop(store);
    let rig = start(&dir, with_rule());
    rig.put(vec![power("b", T0 + 5 * MIN, 1.0)]).await;
    let store = rig.stop().await;
    let log = events::event_log(&store).unwrap();
    let newest = log.newest(10);
    let states: Vec<(&str, AlarmState)> = newest
        .iter()
        .map(|e| (e.event.meter.as_str(), e.event.state))
        .collect();
    assert_eq!(
        states,
        [
            ("b", AlarmState::Cleared),
            ("b", AlarmState::Raised),
            ("a", AlarmState::Raised),
            ("a", AlarmState::Cleared),
            ("a", AlarmState::Raised),
        ]
    );
    assert_eq!(events(&store).len(), 5, "no event stored twice");
    let active = events::active_alarms(&store, &log).unwrap();
    assert_eq!(active.len(), 1);
    assert_eq!((active[0].meter.as_str(), active[0].warnings), ("a", 1));
}

/// Waits (bounded) until the worker has seen `meter` up to `ts`.
async fn until_seen(shared: &AnalyticsShared, meter: &str, ts: i64) {
    tokio::time::timeout(
        Duration::from_secs(20),
        shared.wait_until(|s| s.watermark(meter) >= Some(ts)),
    )
    .await
    .unwrap_or_else(|_| panic!("the worker did not see {meter} up to {ts}"));
}

/// The stored `power` samples of `meter` in W.
fn stored_power(store: &Store, meter: &str) -> Vec<(i64, f64)> {
    store
        .readings(meter, i64::MIN, i64::MAX)
        .unwrap()
        .iter()
        .filter_map(|r| {
            let r = r.payload.as_reading()?;
            Some((
                r.ts_ms,
                r.values.iter().find(|v| v.quantity == "power")?.value?,
            ))
        })
        .collect()
}

/// The interval at `start` computed afresh over everything stored.
fn fresh(store: &Store, meter: &str, start: i64) -> Interval {
    let all = crate::derive::compute_intervals(
        Kind::Power,
        Unit::W,
        &stored_power(store, meter),
        &IntervalParams::default(),
    )
    .unwrap();
    all.into_iter().find(|i| i.start_ms == start).unwrap()
}

#[tokio::test]
async fn too_late_points_are_stored_counted_and_recomputed_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let rig = start(&dir, settings());
    let ingestor =
        crate::ingest::Ingestor::new(rig.store.clone(), rig.writer.clone(), Default::default());
    ingestor.set_intervals(rig.analytics.shared.clone());
    let shared = rig.analytics.shared.clone();
    // Eight hours of 1 kW every minute: the watermark ends at 07:59.
    let first: Vec<Reading> = (0..8 * 60)
        .map(|m| power("m", T0 + m * MIN, 1000.0))
        .collect();
    let (out, _) = ingestor
        .store(crate::ingest::Transport::Http, first)
        .await
        .unwrap();
    assert_eq!(out.too_late_for_intervals, 0);
    until_seen(&shared, "m", T0 + 479 * MIN).await;
    // 100 kW at 00:00:30: more than the 6 h retention behind the watermark.
    let late = vec![power("m", T0 + 30_000, 100_000.0)];
    let (out, _) = ingestor
        .store(crate::ingest::Transport::Http, late)
        .await
        .unwrap();
    assert_eq!((out.stored, out.too_late_for_intervals), (1, 1));
    let counts = ingestor.counters.snapshot(crate::ingest::Transport::Http);
    assert_eq!(counts.too_late_for_intervals, 1);
    let text =
        crate::status::metrics_text(rig.store.clone(), ingestor.counters.clone(), shared.clone());
    assert!(
        text.contains("edge_ingest_too_late_for_intervals_points_total{transport=\"http\"} 1"),
        "{text}"
    );
    // Stored and in /readings, but no interval changed.
    until_seen(&shared, "m", T0 + 479 * MIN).await;
    tokio::time::timeout(
        Duration::from_secs(20),
        shared.wait_until(|s| s.too_late.load(Ordering::Relaxed) > 0),
    )
    .await
    .expect("worker did not count it");
    assert!(text.contains("edge_analytics_held_samples"), "{text}");
    assert_eq!(stored_power(&rig.store, "m")[1], (T0 + 30_000, 100_000.0));
    let at_t0 = |store: &Store| -> Vec<IntervalRecord> {
        interval_records(store, "m")
            .into_iter()
            .filter(|iv| iv.interval.start_ms == T0)
            .collect()
    };
    assert_eq!(at_t0(&rig.store).len(), 1);
    assert!((at_t0(&rig.store)[0].interval.energy_kwh - 0.25).abs() < 1e-9);
    // The operator recomputes 00:00-01:00: one new revision, equal to a fresh
    // computation over the stored readings.
    let done = shared.recompute("m", T0, T0 + 60 * MIN).await.unwrap();
    assert_eq!((done.intervals, done.revised), (4, 1));
    let revised = at_t0(&rig.store);
    assert_eq!(revised.len(), 2);
    assert_eq!(revised[1].interval.revision, 1);
    let expected = fresh(&rig.store, "m", T0);
    assert!(
        revised[1].interval.same_content(&expected),
        "{revised:?} {expected:?}"
    );
    assert!((expected.energy_kwh - (0.25 + 99.0 * 0.5 / 60.0)).abs() < 1e-9);
    // Again: nothing changed, nothing stored.
    let again = shared.recompute("m", T0, T0 + 60 * MIN).await.unwrap();
    assert_eq!(again.revised, 0);
    assert_eq!(
        shared.recompute("nobody", T0, T0 + MIN).await,
        Err(RecomputeError::UnknownMeter("nobody".into()))
    );
    // The ingest service lets go of the writer, so the rig can stop.
    ingestor.close();
    rig.stop().await;
}

#[tokio::test]
async fn a_late_point_after_a_restart_revises_its_interval_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let rig = start(&dir, settings());
    // Two hours of 1 kW every minute, one missing at 00:07.
    let readings: Vec<Reading> = (0..120)
        .filter(|m| *m != 7)
        .map(|m| power("p", T0 + m * MIN, 1000.0))
        .collect();
    rig.put(readings).await;
    rig.stop().await;
    // A new process: the saved state holds no samples; the late point's interval
    // is recomputed from the stored readings.
    let saved: (EnergyInfo, IntervalTracker) = open(&config(&dir))
        .get_state(&tracker_key("p"))
        .unwrap()
        .unwrap();
    assert!(
        saved.1.retained_samples() <= 1,
        "{}",
        saved.1.retained_samples()
    );
    let rig = start(&dir, settings());
    rig.put(vec![power("p", T0 + 7 * MIN, 3000.0)]).await;
    until_seen(&rig.analytics.shared, "p", T0 + 119 * MIN).await;
    let shared = rig.analytics.shared.clone();
    let store = rig.stop().await;
    // Only the open intervals' samples were held: 01:45 to 01:59 and the one before.
    assert!(shared.held_samples.load(Ordering::Relaxed) <= 16);
    assert!(shared.state_bytes.load(Ordering::Relaxed) > 0);
    let first: Vec<IntervalRecord> = interval_records(&store, "p")
        .into_iter()
        .filter(|iv| iv.interval.start_ms == T0)
        .collect();
    assert_eq!(first.len(), 2, "{first:?}");
    assert_eq!(first[1].interval.revision, 1);
    assert!((first[1].interval.energy_kwh - (0.25 + 2.0 / 60.0)).abs() < 1e-9);
    assert!(first[1].interval.same_content(&fresh(&store, "p", T0)));
}

#[tokio::test(start_paused = true)]
async fn a_silent_meter_closes_by_the_wall_clock_for_every_kind() {
    let dir = tempfile::tempdir().unwrap();
    let rig = start(
        &dir,
        AnalyticsSettings {
            persist_every: Duration::from_millis(100),
            ..settings()
        },
    );
    // The DESIGN §5 hourly deltas pushed alone, and the same times for a counter and
    // a power meter: the watermark closes up to 01:30, the clock the rest.
    let delta = |ts: i64, v: f64| Reading {
        meter: "d".into(),
        ts_ms: ts,
        values: vec![value("energy_delta", "kWh", Kind::EnergyDelta, v)],
    };
    rig.put(vec![
        delta(T0, 12.0),
        delta(T0 + 60 * MIN, 26.0),
        delta(T0 + 120 * MIN, 18.0),
        counter("c", T0, 100.0),
        counter("c", T0 + 60 * MIN, 104.0),
        counter("c", T0 + 120 * MIN, 110.0),
        power("p", T0, 1000.0),
        power("p", T0 + 60 * MIN, 2000.0),
        power("p", T0 + 120 * MIN, 4000.0),
    ])
    .await;
    // Paused time: the ticks run as the clock advances, no real waiting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let store = rig.stop().await;
    let energy = |meter: &str, minute: i64| {
        interval_records(&store, meter)
            .iter()
            .filter(|iv| iv.interval.start_ms == T0 + minute * MIN)
            .max_by_key(|iv| iv.interval.revision)
            .map(|iv| iv.interval.clone())
            .unwrap_or_else(|| panic!("{meter} {minute} not closed"))
    };
    for (q, e) in [3.0, 3.0, 3.0, 3.0, 6.5, 6.5, 6.5, 6.5, 4.5, 4.5, 4.5, 4.5]
        .iter()
        .enumerate()
    {
        assert!((energy("d", q as i64 * 15).energy_kwh - e).abs() < 1e-9);
    }
    assert!(energy("d", 165).flags.estimated);
    // The counter: nothing known after its last reading.
    assert!((energy("c", 105).energy_kwh - 1.5).abs() < 1e-9);
    assert_eq!(energy("c", 120).coverage, 0.0);
    // Power: the last sample holds one spacing capped at max_gap (15 min).
    assert!((energy("p", 120).energy_kwh - 1.0).abs() < 1e-9);
    assert!(energy("p", 120).flags.estimated);
    assert_eq!(energy("p", 135).coverage, 0.0);
}
