//! The JSON API over real HTTP on loopback, against a real store whose intervals,
//! events and clusters the analytics stage derived from known readings: the figures
//! of DESIGN §5, the error answers, and the OpenAPI document held to the router.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value as Json_;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::{api_routes, openapi};
use crate::analytics::alarms::Rule;
use crate::analytics::{AnalyticsSettings, ClusterSummary};
use crate::broker::rfc3339_ms;
use crate::config::{Config, HttpConfig};
use crate::derive::{cluster_intervals, ClusterCount, TrackerParams};
use crate::ingest::{self, Point, Series};
use crate::model::{now_ms, Kind, Payload, Reading, Value};
use crate::pipeline::{Pipeline, Running};
use crate::store::testing::{config as store_config, open};

/// 2018-08-24T00:00:00Z, the day of DESIGN §5's examples.
const T0: i64 = 1_535_068_800_000;
const MIN: i64 = 60_000;
const TIME_LIMIT: Duration = Duration::from_secs(10);

fn t(minutes: i64) -> String {
    rfc3339_ms(T0 + minutes * MIN)
}

struct Api {
    addr: SocketAddr,
    running: Running,
    _dir: tempfile::TempDir,
}

impl Api {
    async fn stop(self) {
        tokio::time::timeout(TIME_LIMIT, self.running.stop())
            .await
            .expect("pipeline stops")
            .expect("pipeline stops cleanly");
    }
}

fn power(meter: &str, minute: i64, w: f64) -> Reading {
    Reading {
        meter: meter.into(),
        ts_ms: T0 + minute * MIN,
        values: vec![Value {
            quantity: "power".into(),
            unit: "W".into(),
            kind: Kind::Power,
            value: Some(w),
            invalid: None,
            source: Default::default(),
        }],
    }
}

fn deltas(meter: &str, points: &[(i64, f64)]) -> Series {
    Series {
        meter: meter.into(),
        unit: "kWh".into(),
        kind: Kind::EnergyDelta,
        points: points
            .iter()
            .map(|(minute, kwh)| Point::new(T0 + minute * MIN, *kwh))
            .collect(),
    }
}

/// A store with:
/// - `quarters`: kWh deltas 2, 5, 2, 6 every 15 min from 00:00 (then two more so the
///   four close): intervals of exactly 2, 5, 2, 6 kWh;
/// - `hourly`: kWh deltas 12 @00:00, 26 @01:00, 18 @02:00 (then zeros): 3 kWh per
///   quarter in the first hour, 6.5 in the second, 4.5 in the third;
/// - `hot`: power readings raising, clearing and raising again an alarm (rule `hot`:
///   above 5000 W, once);
/// - `volts`: a meter with no energy quantity;
/// - a stored cluster summary for `hourly` that no data produced (the endpoint must
///   answer it as stored).
async fn start_api() -> Api {
    start_api_with(HttpConfig::default()).await
}

/// [`start_api`] with these HTTP settings (the listen address is always port 0).
/// The pipeline runs twice on the store, without the embedded broker: once without
/// HTTP to store the readings and derive from them (its stop saves what analytics
/// derived, as on a shutdown), then with HTTP for the tests.
async fn start_api_with(http: HttpConfig) -> Api {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(open(&store_config(&dir)));
    let mut config = Config::from_toml("gateway_id = \"api-gw\"").expect("config parses");
    config.store = store_config(&dir);
    config.http = HttpConfig {
        listen: "127.0.0.1:0".parse().expect("address"),
        ..http
    };
    let settings = AnalyticsSettings {
        gateway: "api-gw".into(),
        tracker: TrackerParams::default(),
        spacing_ms: HashMap::new(),
        energy_quantity: HashMap::new(),
        rules: vec![Rule {
            id: "hot".into(),
            meter: "*".into(),
            quantity: "power".into(),
            threshold: 5000.0,
            above: true,
            count: 1,
        }],
        cluster_every: 1_000_000,
        clusters: ClusterCount::Fixed(2),
        persist_every: Duration::from_secs(60),
        max_recompute_ms: 24 * 3_600_000,
    };
    let pipeline = || {
        Pipeline::new(config.clone())
            .store(store.clone())
            .analytics(settings.clone())
            .without_broker()
    };
    let filling = pipeline()
        .without_http()
        .start(CancellationToken::new())
        .await
        .expect("pipeline starts")
        .expect("store open");
    let writer = filling.writer().expect("the store writer");
    let now = now_ms();
    let quarters = deltas(
        "quarters",
        &[
            (0, 2.0),
            (15, 5.0),
            (30, 2.0),
            (45, 6.0),
            (60, 1.0),
            (75, 1.0),
        ],
    );
    let hourly = deltas(
        "hourly",
        &[(0, 12.0), (60, 26.0), (120, 18.0), (180, 0.0), (240, 0.0)],
    );
    for series in [quarters, hourly] {
        ingest::ingest(&writer, &store, series, now)
            .await
            .expect("ingest");
    }
    let mut readings = vec![
        power("hot", 1, 6000.0),
        power("hot", 2, 100.0),
        power("hot", 3, 7000.0),
    ];
    readings.push(Reading {
        meter: "volts".into(),
        ts_ms: T0,
        values: vec![Value {
            quantity: "voltage".into(),
            unit: "V".into(),
            kind: Kind::Voltage,
            value: Some(230.0),
            invalid: None,
            source: Default::default(),
        }],
    });
    writer
        .submit_batch(readings.into_iter().map(Payload::Reading).collect())
        .await
        .expect("readings stored");
    drop(writer);
    // Everything derived and saved, as on a shutdown.
    tokio::time::timeout(TIME_LIMIT, filling.stop())
        .await
        .expect("the first run stops")
        .expect("the first run stops cleanly");
    let summary = ClusterSummary {
        meter: "hourly".into(),
        quantity: "energy_delta".into(),
        computed_ms: T0 + 300 * MIN,
        stats: cluster_intervals(
            &[(T0, 1234.5, 0.5), (T0 + 15 * MIN, 1234.5, 0.5)],
            ClusterCount::Fixed(1),
        ),
    };
    store
        .put_state("clusters/hourly", &summary)
        .expect("clusters stored");

    let running = pipeline()
        .start(CancellationToken::new())
        .await
        .expect("pipeline starts")
        .expect("store open");
    Api {
        addr: running.http_addr().expect("the HTTP interface listens"),
        running,
        _dir: dir,
    }
}

/// Sends one request with hyper's client and returns the status, the lower-cased
/// headers and the body. Only the head is read for `text/event-stream` answers.
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
) -> (u16, HashMap<String, String>, Vec<u8>) {
    use http_body_util::{BodyExt, Empty};
    tokio::time::timeout(TIME_LIMIT, async {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .expect("handshake");
        let driver = tokio::spawn(connection);
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", addr.to_string())
            .body(Empty::<hyper::body::Bytes>::new())
            .expect("a valid request");
        let response = sender.send_request(request).await.expect("an answer");
        let status = response.status().as_u16();
        let headers: HashMap<String, String> = response
            .headers()
            .iter()
            .map(|(n, v)| {
                let value = String::from_utf8_lossy(v.as_bytes()).into_owned();
                (n.as_str().to_string(), value)
            })
            .collect();
        let streaming = headers
            .get("content-type")
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let body = if streaming {
            Vec::new()
        } else {
            let body = response.into_body().collect().await.expect("the body");
            body.to_bytes().to_vec()
        };
        driver.abort();
        (status, headers, body)
    })
    .await
    .expect("answer in time")
}

/// Sends `raw` as it is and reads the answer until the server closes.
/// Raw, not hyper's client: the bytes are the test (odd methods, unread or bad bodies).
async fn exchange(addr: SocketAddr, raw: &[u8]) -> (u16, HashMap<String, String>, Vec<u8>) {
    tokio::time::timeout(TIME_LIMIT, async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream.write_all(raw).await.expect("send");
        let mut raw = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let end = loop {
            let n = stream.read(&mut buf).await.expect("read");
            raw.extend_from_slice(&buf[..n]);
            if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            assert!(n > 0, "connection closed before the head: {raw:?}");
        };
        let head = String::from_utf8(raw[..end].to_vec()).expect("UTF-8 head");
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .expect("status line");
        let headers: HashMap<String, String> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        if headers
            .get("content-type")
            .is_some_and(|v| v.starts_with("text/event-stream"))
        {
            return (status, headers, Vec::new());
        }
        let mut body = raw[end + 4..].to_vec();
        loop {
            let n = stream.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            body.extend_from_slice(&buf[..n]);
        }
        if headers
            .get("transfer-encoding")
            .is_some_and(|v| v.contains("chunked"))
        {
            body = dechunk(&body);
        }
        (status, headers, body)
    })
    .await
    .expect("answer in time")
}

fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size line");
        let size = usize::from_str_radix(std::str::from_utf8(&rest[..line]).expect("hex"), 16)
            .expect("chunk size");
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&rest[line + 2..line + 2 + size]);
        rest = &rest[line + 4 + size..];
    }
}

async fn get_json(addr: SocketAddr, path: &str) -> (u16, Json_) {
    let (status, headers, body) = request(addr, "GET", path).await;
    assert!(
        headers
            .get("content-type")
            .is_some_and(|v| v.starts_with("application/json")),
        "{path}: {headers:?}"
    );
    let json = serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body:?}"));
    (status, json)
}

async fn ok(addr: SocketAddr, path: &str) -> Json_ {
    let (status, json) = get_json(addr, path).await;
    assert_eq!(status, 200, "{path}: {json}");
    json
}

async fn assert_error(addr: SocketAddr, path: &str, status: u16, field: &str) {
    let (got, json) = get_json(addr, path).await;
    assert_eq!(got, status, "{path}: {json}");
    assert_eq!(json["field"], field, "{path}: {json}");
    assert!(
        json["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{path}: {json}"
    );
}

fn f(v: &Json_) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn series_energy_and_top_answer_the_design_figures() {
    let api = start_api().await;
    let addr = api.addr;

    // DESIGN §5: deltas 2, 5, 2, 6 every 15 min are exactly 2, 5, 2, 6.
    let series = ok(
        addr,
        &format!(
            "/api/v1/meters/quarters/series?start={}&end={}",
            t(0),
            t(24 * 60)
        ),
    )
    .await;
    println!("quarters series: {series}");
    assert_eq!(series["meter"], "quarters");
    assert_eq!(series["quantity"], "energy_delta");
    assert_eq!(series["start"], "2018-08-24T00:00:00.000Z");
    assert_eq!(series["end"], "2018-08-25T00:00:00.000Z");
    let intervals = series["intervals"].as_array().expect("intervals");
    assert_eq!(series["count"], intervals.len());
    let energies: Vec<f64> = intervals.iter().map(|i| f(&i["energy_kwh"])).collect();
    assert_eq!(energies, [2.0, 5.0, 2.0, 6.0]);
    for (k, iv) in intervals.iter().enumerate() {
        assert_eq!(iv["start"], t(15 * k as i64));
        assert_eq!(iv["end"], t(15 * (k as i64 + 1)));
        assert_eq!(iv["coverage"], 1.0);
        assert_eq!(iv["samples"], 1);
        assert_eq!(iv["revision"], 0);
        assert_eq!(
            iv["flags"],
            serde_json::json!({"gap": false, "reset": false, "estimated": false})
        );
        // Energy over a quarter hour as mean power: 2 kWh in 15 min is 8 kW.
        assert_eq!(f(&iv["mean_w"]), energies[k] * 4000.0);
        assert!(iv["seq"].as_u64().is_some_and(|s| s > 0));
    }
    // start inclusive, end exclusive.
    let part = ok(
        addr,
        &format!(
            "/api/v1/meters/quarters/series?start={}&end={}",
            t(15),
            t(45)
        ),
    )
    .await;
    let starts: Vec<&str> = part["intervals"]
        .as_array()
        .expect("intervals")
        .iter()
        .map(|i| i["start"].as_str().expect("start"))
        .collect();
    assert_eq!(starts, [t(15), t(30)]);

    // Deltas 12 @00:00, 26 @01:00, 18 @02:00: 3, 6.5 and 4.5 per quarter.
    let hourly = ok(
        addr,
        &format!("/api/v1/meters/hourly/series?start={}&end={}", t(0), t(180)),
    )
    .await;
    let energies: Vec<f64> = hourly["intervals"]
        .as_array()
        .expect("intervals")
        .iter()
        .map(|i| f(&i["energy_kwh"]))
        .collect();
    assert_eq!(
        energies,
        [3.0, 3.0, 3.0, 3.0, 6.5, 6.5, 6.5, 6.5, 4.5, 4.5, 4.5, 4.5]
    );

    // Energy at quarter boundaries is the sum of the intervals...
    let e = ok(
        addr,
        &format!(
            "/api/v1/meters/quarters/energy?start={}&end={}",
            t(0),
            t(60)
        ),
    )
    .await;
    println!("quarters energy [00:00, 01:00): {e}");
    assert_eq!(f(&e["energy_kwh"]), 15.0);
    assert_eq!(e["coverage"], 1.0);
    assert_eq!(e["quantity"], "energy_delta");
    assert_eq!(e["start"], t(0));
    // ...and at any other boundary the edges come from the raw points:
    // 10/15 of 2, then 5 + 2, then 5/15 of 6.
    let e = ok(
        addr,
        &format!(
            "/api/v1/meters/quarters/energy?start={}&end={}",
            t(5),
            t(50)
        ),
    )
    .await;
    println!("quarters energy [00:05, 00:50): {e}");
    assert!(
        (f(&e["energy_kwh"]) - (2.0 * 10.0 / 15.0 + 7.0 + 2.0)).abs() < 1e-9,
        "{e}"
    );
    assert!((f(&e["coverage"]) - 1.0).abs() < 1e-12, "{e}");
    let e = ok(
        addr,
        &format!(
            "/api/v1/meters/hourly/energy?start={}&end={}",
            t(30),
            t(150)
        ),
    )
    .await;
    assert!(
        (f(&e["energy_kwh"]) - (6.0 + 26.0 + 9.0)).abs() < 1e-9,
        "{e}"
    );
    // 12 kWh spread over an hour, longer than max_gap: estimated.
    assert_eq!(e["flags"]["estimated"], true);

    // Top meters: everything stored by default, three at most.
    let top = ok(addr, "/api/v1/top").await;
    println!("top: {top}");
    assert_eq!(top["n"], 3);
    assert_eq!(top["start"], "1970-01-01T00:00:00.000Z");
    let meters: Vec<(String, f64)> = top["meters"]
        .as_array()
        .expect("meters")
        .iter()
        .map(|m| {
            (
                m["meter"].as_str().expect("meter").to_string(),
                f(&m["energy_kwh"]),
            )
        })
        .collect();
    assert_eq!(
        meters,
        [("hourly".to_string(), 56.0), ("quarters".to_string(), 15.0)]
    );
    let top = ok(
        addr,
        &format!("/api/v1/top?n=1&start={}&end={}", t(60), t(120)),
    )
    .await;
    let meters = top["meters"].as_array().expect("meters");
    assert_eq!(meters.len(), 1);
    assert_eq!(
        (meters[0]["meter"].as_str(), f(&meters[0]["energy_kwh"])),
        (Some("hourly"), 26.0)
    );
    let top = ok(addr, &format!("/api/v1/top?start={}&end={}", t(5), t(15))).await;
    assert_eq!(top["meters"].as_array().map(Vec::len), Some(2), "{top}");

    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forecast_clusters_and_events_answer_what_is_stored() {
    let api = start_api().await;
    let addr = api.addr;

    // A day ahead: 96 whole intervals whose energies add up to the total.
    let day = ok(
        addr,
        &format!(
            "/api/v1/meters/hourly/forecast?start={}&end={}",
            t(24 * 60),
            t(48 * 60)
        ),
    )
    .await;
    let intervals = day["intervals"].as_array().expect("intervals");
    assert_eq!(intervals.len(), 96);
    assert!(intervals.iter().all(|i| i["fraction"] == 1.0));
    assert_eq!(intervals[0]["start"], t(24 * 60));
    let sum: f64 = intervals.iter().map(|i| f(&i["energy_kwh"])).sum();
    assert!(
        (sum - f(&day["total_kwh"])).abs() < 1e-9,
        "{sum} vs {}",
        day["total_kwh"]
    );
    // A window with partial quarters: 10 of the first quarter's 15 minutes, 5 of the next.
    let part = ok(
        addr,
        &format!(
            "/api/v1/meters/hourly/forecast?start={}&end={}",
            t(24 * 60 + 5),
            t(24 * 60 + 20)
        ),
    )
    .await;
    let fractions: Vec<f64> = part["intervals"]
        .as_array()
        .expect("intervals")
        .iter()
        .map(|i| f(&i["fraction"]))
        .collect();
    assert_eq!(fractions.len(), 2);
    assert!(
        (fractions[0] - 2.0 / 3.0).abs() < 1e-12 && (fractions[1] - 1.0 / 3.0).abs() < 1e-12,
        "{fractions:?}"
    );
    // Without a window: the 24 hours from the current quarter.
    let ahead = ok(addr, "/api/v1/meters/hourly/forecast").await;
    assert_eq!(ahead["intervals"].as_array().map(Vec::len), Some(96));

    // Clusters: the stored summary as it is, with RFC 3339 times.
    let clusters = ok(addr, "/api/v1/clusters").await;
    println!("clusters: {clusters}");
    let list = clusters["clusters"].as_array().expect("clusters");
    assert_eq!(list.len(), 1, "{clusters}");
    assert_eq!(list[0]["meter"], "hourly");
    assert_eq!(list[0]["computed"], t(300));
    assert_eq!(list[0]["first"], t(0));
    assert_eq!(list[0]["last"], t(15));
    assert_eq!(list[0]["k"], 1);
    assert_eq!(list[0]["clusters"][0]["centre_w"], 1234.5);

    // Events: newest first, and the alarm raised now.
    let events = ok(addr, "/api/v1/events").await;
    println!("events: {events}");
    let list = events["events"].as_array().expect("events");
    let seen: Vec<(&str, &str)> = list
        .iter()
        .map(|e| {
            (
                e["state"].as_str().expect("state"),
                e["ts"].as_str().expect("ts"),
            )
        })
        .collect();
    let (m1, m2, m3) = (t(1), t(2), t(3));
    assert_eq!(
        seen,
        [
            ("raised", m3.as_str()),
            ("cleared", m2.as_str()),
            ("raised", m1.as_str())
        ]
    );
    assert!(list
        .iter()
        .all(|e| e["meter"] == "hot" && e["rule"] == "hot" && e["gateway"] == "api-gw"));
    assert_eq!(f(&list[0]["value"]), 7000.0);
    assert_eq!(events["count"], 3);
    let active = events["active"].as_array().expect("active");
    assert_eq!(active.len(), 1);
    assert_eq!(
        (active[0]["meter"].as_str(), active[0]["rule"].as_str()),
        (Some("hot"), Some("hot"))
    );
    assert_eq!(active[0]["since"], t(3));
    assert_eq!(active[0]["event"]["seq"], list[0]["seq"]);
    let one = ok(addr, "/api/v1/events?limit=1").await;
    assert_eq!(one["events"].as_array().map(Vec::len), Some(1));
    assert_eq!(one["events"][0]["seq"], list[0]["seq"]);

    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_parameters_and_unknown_meters_are_named() {
    let api = start_api().await;
    let addr = api.addr;
    for endpoint in ["series", "energy", "forecast", "readings"] {
        let path = |q: &str| format!("/api/v1/meters/hourly/{endpoint}?{q}");
        assert_error(
            addr,
            &format!("/api/v1/meters/nobody/{endpoint}"),
            404,
            "id",
        )
        .await;
        assert_error(addr, &path("start=yesterday"), 400, "start").await;
        assert_error(addr, &path("end=2018-02-30T00:00:00Z"), 400, "end").await;
        assert_error(
            addr,
            &path(&format!("start={}&end={}", t(60), t(0))),
            400,
            "start",
        )
        .await;
        assert_error(
            addr,
            &path(&format!("start={}&end={}", t(0), t(0))),
            400,
            "start",
        )
        .await;
        assert_error(
            addr,
            &path(&format!("start={}&start={}", t(0), t(1))),
            400,
            "start",
        )
        .await;
        assert_error(addr, &path("colour=red"), 400, "colour").await;
        assert_error(addr, &path("=red"), 400, "query").await;
        // Past the last instant RFC 3339 can write, and before the epoch.
        assert_error(addr, &path("end=9999-12-31T23:59:59-01:00"), 400, "end").await;
        assert_error(addr, &path("start=1969-12-31T23:59:59Z"), 400, "start").await;
        // A bad path segment (not UTF-8) is named too.
        assert_error(
            addr,
            &format!("/api/v1/meters/%FF%FE/{endpoint}"),
            400,
            "id",
        )
        .await;
    }
    // Longest windows.
    assert_error(
        addr,
        &format!(
            "/api/v1/meters/hourly/series?start={}&end={}",
            t(0),
            t(93 * 1440)
        ),
        400,
        "end",
    )
    .await;
    ok(
        addr,
        &format!(
            "/api/v1/meters/hourly/series?start={}&end={}",
            t(0),
            t(92 * 1440)
        ),
    )
    .await;
    assert_error(
        addr,
        &format!(
            "/api/v1/meters/hourly/forecast?start={}&end={}",
            t(0),
            t(367 * 1440)
        ),
        400,
        "end",
    )
    .await;
    ok(
        addr,
        "/api/v1/meters/hourly/energy?start=1970-01-01T00:00:00Z&end=9999-12-31T23:59:59.999Z",
    )
    .await;
    // Meters without energy data.
    assert_error(addr, "/api/v1/meters/volts/energy", 404, "id").await;
    assert_error(addr, "/api/v1/meters/volts/forecast", 404, "id").await;
    let empty = ok(addr, "/api/v1/meters/volts/series").await;
    assert_eq!(empty["count"], 0);
    assert_eq!(empty["quantity"], Json_::Null);
    for (q, field) in [
        ("n=abc", "n"),
        ("n=0", "n"),
        ("n=1001", "n"),
        ("n=-1", "n"),
        ("n=3&n=4", "n"),
        ("start=x", "start"),
        ("limit=3", "limit"),
    ] {
        assert_error(addr, &format!("/api/v1/top?{q}"), 400, field).await;
    }
    assert_eq!(ok(addr, "/api/v1/top?n=1000").await["n"], 1000);
    for (q, field) in [
        ("limit=0", "limit"),
        ("limit=201", "limit"),
        ("limit=ten", "limit"),
        ("n=1", "n"),
    ] {
        assert_error(addr, &format!("/api/v1/events?{q}"), 400, field).await;
    }
    assert_error(addr, "/api/v1/clusters?meter=hourly", 400, "meter").await;
    assert_error(addr, "/api/v1/nothing", 404, "path").await;
    api.stop().await;
}

/// Every `$ref` in `node` (recursively).
fn refs<'a>(node: &'a Json_, out: &mut Vec<&'a str>) {
    match node {
        Json_::Object(map) => {
            for (k, v) in map {
                if k == "$ref" {
                    out.push(v.as_str().expect("$ref is a string"));
                } else {
                    refs(v, out);
                }
            }
        }
        Json_::Array(items) => items.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

fn resolve<'a>(doc: &'a Json_, node: &'a Json_) -> &'a Json_ {
    match node.get("$ref").and_then(Json_::as_str) {
        Some(r) => doc
            .pointer(r.trim_start_matches('#'))
            .unwrap_or_else(|| panic!("{r} does not resolve")),
        None => node,
    }
}

#[test]
fn openapi_document_is_consistent() {
    let doc = openapi::document();
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
    let mut all = Vec::new();
    refs(doc, &mut all);
    assert!(all.len() > 30);
    for r in all {
        assert!(
            doc.pointer(r.trim_start_matches('#')).is_some(),
            "{r} does not resolve"
        );
    }
    let paths = doc["paths"].as_object().expect("paths");
    for (path, item) in paths {
        let templated: BTreeSet<&str> = path
            .split('/')
            .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
            .collect();
        for (method, op) in item.as_object().expect("path item") {
            assert!(
                ["get", "post", "put", "delete", "patch"].contains(&method.as_str()),
                "{path} {method}"
            );
            let params: Vec<&Json_> = op["parameters"]
                .as_array()
                .map(|p| p.iter().map(|p| resolve(doc, p)).collect())
                .unwrap_or_default();
            let in_path: BTreeSet<&str> = params
                .iter()
                .filter(|p| p["in"] == "path")
                .map(|p| p["name"].as_str().expect("name"))
                .collect();
            assert_eq!(in_path, templated, "{path} {method}: path parameters");
            assert!(
                params
                    .iter()
                    .all(|p| p["schema"].is_object() && p["name"].is_string()),
                "{path}"
            );
            let responses = op["responses"].as_object().expect("responses");
            assert!(
                responses.keys().any(|c| c.starts_with('2')),
                "{path} {method}"
            );
            for (code, response) in responses {
                let response = resolve(doc, response);
                assert!(response["description"].is_string(), "{path} {code}");
                if code.starts_with('4') || code.starts_with('5') {
                    let schema = resolve(doc, &response["content"]["application/json"]["schema"]);
                    assert!(
                        schema["required"]
                            .as_array()
                            .is_some_and(|r| r.contains(&Json_::from("error"))),
                        "{path} {code}: errors carry `error`"
                    );
                }
            }
        }
    }
}

/// What a request to `path` with `method` reached: a handler, the method fallback
/// (405) or the path fallback (404 naming `path`).
async fn reached(addr: SocketAddr, method: &str, path: &str) -> &'static str {
    let (status, headers, body) = request(addr, method, path).await;
    let json: Json_ = if headers
        .get("content-type")
        .is_some_and(|v| v.starts_with("application/json"))
    {
        serde_json::from_slice(&body).unwrap_or_default()
    } else {
        Json_::Null
    };
    match (status, json["field"].as_str()) {
        (405, Some("method")) => "no method",
        (404, Some("path")) => "no path",
        _ => "handler",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_describes_exactly_the_routes_served() {
    let api = start_api().await;
    let addr = api.addr;
    let served = ok(addr, "/api/v1/openapi.json").await;
    assert_eq!(&served, openapi::document());
    let paths = served["paths"].as_object().expect("paths");
    let concrete = |p: &str| p.replace("{id}", "hourly");
    let methods = ["get", "post", "put", "delete", "patch"];
    let routes: BTreeSet<&str> = api_routes(None).iter().map(|(p, _)| *p).collect();
    let mut report: BTreeMap<String, Vec<String>> = BTreeMap::new();

    // Router to document: every route is described, with exactly the methods it answers.
    for route in &routes {
        let item = paths
            .get(*route)
            .unwrap_or_else(|| panic!("{route} is served but not in the OpenAPI document"));
        for method in methods {
            let described = item.get(method).is_some();
            let got = reached(addr, &method.to_uppercase(), &concrete(route)).await;
            if described {
                assert_eq!(
                    got, "handler",
                    "{method} {route} is described but not served"
                );
            } else {
                assert_eq!(
                    got, "no method",
                    "{method} {route} is served but not described"
                );
            }
            report
                .entry(route.to_string())
                .or_default()
                .push(format!("{method}:{got}"));
        }
    }
    // Document to router: every described path is served.
    for (path, item) in paths {
        assert!(path.starts_with("/api/v1/"), "{path}");
        for method in item.as_object().expect("item").keys() {
            let got = reached(addr, &method.to_uppercase(), &concrete(path)).await;
            assert_eq!(
                got, "handler",
                "{method} {path} is described but not served"
            );
            assert!(
                routes.contains(path.as_str()),
                "{path} is served outside api_routes()"
            );
        }
    }
    for (path, checks) in &report {
        println!("{path}: {}", checks.join(" "));
    }

    // Every status an operation answers is listed for it: probes for each answer the
    // server, the guard and the parameter check give any request, and the ingest's own.
    let long = "a".repeat(9 * 1024);
    let many: String = (0..150).map(|i| format!("X-H{i}: {i}\r\n")).collect();
    let good_series = r#"{"meter":"m1","unit":"W","kind":"power","points":[{"ts":"2024-01-01T00:00:00Z","value":1}]}"#;
    let bad_series = r#"{"meter":"m1","unit":"furlongs","kind":"power","points":[{"ts":"2024-01-01T00:00:00Z","value":1}]}"#;
    for (path, item) in paths {
        let target = concrete(path);
        for (method, op) in item.as_object().expect("item") {
            let m = method.to_uppercase();
            let documented: BTreeSet<u16> = op["responses"]
                .as_object()
                .expect("responses")
                .keys()
                .map(|c| c.parse().expect("numeric status"))
                .collect();
            let head = |target: &str, headers: &str, body: &str| {
                format!(
                    "{m} {target} HTTP/1.1\r\nConnection: close\r\n{headers}Content-Length: {}\r\n\r\n{body}",
                    body.len()
                )
            };
            let host = format!("Host: {addr}\r\n");
            let mut probes = vec![
                head(&target, &host, ""),
                head(&format!("{target}?bogus=1"), &host, ""),
                head(&format!("{target}?{long}=1"), &host, ""),
                head(&target, "Host: evil.example\r\n", ""),
                head(&target, &format!("{host}Host: evil.example\r\n"), ""),
                format!("{m} {target} HTTP/1.1\r\n{host}Content-Length: 99999999\r\n\r\n"),
                format!("{m} {target} HTTP/1.1\r\n{host}Content-Length: 1x\r\n\r\n"),
                head(&target, &format!("{host}{many}"), ""),
            ];
            if path.contains("{id}") {
                probes.push(head(&path.replace("{id}", "nobody"), &host, ""));
            }
            if m == "POST" {
                let dry = format!("{target}?dry_run=true");
                let json = format!("{host}Content-Type: application/json\r\n");
                probes.extend([
                    head(&dry, &format!("{host}Content-Type: text/plain\r\n"), "x"),
                    head(&dry, &json, "{"),
                    head(&dry, &json, bad_series),
                    head(&dry, &json, good_series),
                    head(&format!("{dry}&dry_run=true"), &json, good_series),
                ]);
            }
            let mut seen = BTreeSet::new();
            for probe in &probes {
                let (status, _, body) = exchange(addr, probe.as_bytes()).await;
                assert!(
                    documented.contains(&status),
                    "{method} {path} answered {status}, which its OpenAPI responses ({documented:?}) do not list: {}",
                    String::from_utf8_lossy(&body)
                );
                seen.insert(status);
            }
            println!("{method} {path}: answered {seen:?}, documented {documented:?}");
        }
    }
    api.stop().await;
}

#[tokio::test]
async fn ingest_bodies_are_read_only_with_a_turn() {
    let api = start_api_with(HttpConfig {
        max_ingest_requests: 1,
        heavy_query_wait: crate::config::units::HumanDuration(Duration::from_millis(200)),
        ..HttpConfig::default()
    })
    .await;
    let addr = api.addr;
    let body = r#"{"meter":"pushed","unit":"W","kind":"power","points":[{"ts":"2024-01-01T00:00:00Z","value":1}]}"#;
    let post = format!(
        "POST /api/v1/ingest?dry_run=true HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    // A request that sends its head and only part of its body holds the one turn
    // while it waits for the rest.
    let mut slow = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let half = &post.as_bytes()[..post.len() - 20];
    slow.write_all(half).await.expect("send");
    // Meanwhile a whole request waits its 200 ms and is told to retry, its body unread.
    let refused = tokio::time::timeout(TIME_LIMIT, async {
        loop {
            let (status, headers, body) = exchange(addr, post.as_bytes()).await;
            if status == 503 {
                return (headers, body);
            }
        }
    })
    .await
    .expect("a second ingest request is refused while the first holds the turn");
    assert_eq!(refused.0.get("retry-after").map(String::as_str), Some("1"));
    let doc: Json_ = serde_json::from_slice(&refused.1).expect("JSON error");
    assert_eq!(doc["field"], "body", "{doc}");
    // The slow request finishes and is answered; then the turn is free again.
    slow.write_all(&post.as_bytes()[post.len() - 20..])
        .await
        .expect("send the rest");
    let mut answer = Vec::new();
    tokio::time::timeout(TIME_LIMIT, slow.read_to_end(&mut answer))
        .await
        .expect("answered")
        .expect("read");
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let (status, _, body) = exchange(addr, post.as_bytes()).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    api.stop().await;
}

/// `GET /api/v1` is the API's front door: it names the OpenAPI document and lists
/// every endpoint that document describes; an unknown path points there too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_root_lists_the_endpoints_and_links_the_openapi_document() {
    let api = start_api().await;
    let addr = api.addr;
    for root in ["/api/v1", "/api/v1/"] {
        let index = ok(addr, root).await;
        assert_eq!(index["openapi"], "/api/v1/openapi.json", "{index}");
        let listed: BTreeSet<&str> = index["endpoints"]
            .as_array()
            .expect("endpoints")
            .iter()
            .map(|e| e["path"].as_str().expect("path"))
            .collect();
        let described: BTreeSet<&str> = openapi::document()["paths"]
            .as_object()
            .expect("paths")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(listed, described, "{index}");
        let status = index["endpoints"]
            .as_array()
            .and_then(|e| e.iter().find(|e| e["path"] == "/api/v1/status"))
            .expect("status listed");
        assert_eq!(status["methods"], serde_json::json!(["GET"]), "{status}");
    }
    // The link it gives works.
    ok(addr, "/api/v1/openapi.json").await;
    let (status, json) = get_json(addr, "/api/v1/no-such-thing").await;
    assert_eq!(status, 404, "{json}");
    assert!(
        json["error"]
            .as_str()
            .is_some_and(|e| e.contains("/api/v1/openapi.json")),
        "{json}"
    );
    api.stop().await;
}
