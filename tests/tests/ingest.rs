//! Push ingest end to end: real HTTP on loopback, the real embedded broker and real
//! MQTT clients, the real sled store. A good batch is queryable right after its 2xx;
//! a bad one (HTTP or MQTT) stores nothing, is named point by point and counted.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use std::sync::Arc;

use edge_agent::acquire::profile;
use edge_agent::broker::rfc3339_ms;
use edge_agent::config::StoreConfig;
use edge_agent::model::{now_ms, Record};
use edge_agent::sim::{self, SimBus, SimMeter};
use edge_agent::store::Store;
use edge_agent_tests::{
    block_until, free_port, http_get, http_request, lan_meters_toml_with, mqtt_publisher,
    poll_until, push_agent_toml, HttpResponse, InProcessAgent, Subscriber,
};
use rumqttc::{AsyncClient, QoS};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "ingest-token-0123456789";
const GW: &str = "ingest-gw";

/// An agent without meters (everything arrives by push) on `store`.
async fn start_agent(store: &Path, token: Option<&str>) -> InProcessAgent {
    start_agent_with(store, token, "").await
}

/// [`start_agent`] with `extra` config tables (buses, meters) at the end.
async fn start_agent_with(store: &Path, token: Option<&str>, extra: &str) -> InProcessAgent {
    // HTTP on port 0: the agent serves the listener InProcessAgent binds.
    let (http, mqtt) = (0, free_port());
    let token = token.map_or(String::new(), |t| format!("token = \"{t}\""));
    let mut text = push_agent_toml(
        GW,
        store,
        mqtt,
        http,
        "homeassistant_discovery = false",
        &token,
    );
    text.push_str(extra);
    InProcessAgent::start(&text).await
}

async fn post(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    ctype: &str,
    body: &str,
) -> HttpResponse {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("Content-Type", ctype)];
    if let Some(auth) = &auth {
        headers.push(("Authorization", auth.as_str()));
    }
    http_request(addr, "POST", path, &headers, body.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("POST {path}: {e}"))
}

/// `(ts, value)` of every stored value of `quantity`, from the readings API.
async fn readings(addr: SocketAddr, meter: &str, quantity: &str, from: i64) -> Vec<(String, f64)> {
    let path = format!(
        "/api/v1/meters/{meter}/readings?start={}&end={}",
        rfc3339_ms(from),
        rfc3339_ms(now_ms() + 60_000)
    );
    let r = http_get(addr, &path).await;
    if r.status == 404 {
        return Vec::new();
    }
    assert_eq!(r.status, 200, "{path}: {}", r.text());
    let body = r.json();
    body["readings"]
        .as_array()
        .expect("readings")
        .iter()
        .flat_map(|reading| {
            reading["values"]
                .as_array()
                .expect("values")
                .iter()
                .filter(|v| v["quantity"] == quantity)
                .map(|v| {
                    (
                        reading["ts"].as_str().unwrap_or_default().to_string(),
                        v["value"].as_f64().unwrap_or(f64::NAN),
                    )
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Every record of a stopped agent's store, and its last seq.
fn snapshot(path: &Path) -> (u64, Vec<Record>) {
    let config = StoreConfig {
        path: path.to_path_buf(),
        ..StoreConfig::default()
    };
    // sled's threads of the stopped agent release the file lock shortly after.
    let mut opened = None;
    block_until(
        "the stopped agent's store lock released",
        Duration::from_secs(10),
        || match Store::open(&config) {
            Ok(store) => {
                opened = Some(store);
                true
            }
            Err(e) if e.to_string().contains("could not acquire lock") => false,
            Err(e) => panic!("open the store: {e}"),
        },
    );
    // `block_until` returns only once the closure opened the store.
    let store = opened.expect("opened");
    let records = store.read_range(0, u64::MAX).expect("read the store");
    (store.last_seq(), records)
}

/// A metric's value from Prometheus text (`name{labels} value`).
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

fn problem_fields(r: &HttpResponse) -> Vec<String> {
    r.json()["problems"]
        .as_array()
        .unwrap_or_else(|| panic!("problems in {}", r.text()))
        .iter()
        .map(|p| p["field"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_push_is_queryable_after_the_answer_and_a_bad_batch_stores_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = dir.path().join("store");
    let t0 = now_ms() - 50_000;
    let ts = |i: i64| rfc3339_ms(t0 + i * 10_000);

    // Phase 1: good pushes, each queryable right after its 200.
    let agent = start_agent(&store, Some(TOKEN)).await;
    let addr = agent.http;
    let json_body = format!(
        r#"[{{"meter":"pv","unit":"W","kind":"power","points":[{{"ts":"{}","value":1500}},{{"ts":"{}","value":1480.5}},{{"ts":{},"value":-20}}]}},
            {{"meter":"pv","unit":"kWh","kind":"energy_total","points":[{{"ts":"{}","value":1234.5}}]}}]"#,
        ts(0),
        ts(1),
        t0 + 20_000,
        ts(0)
    );
    let unauthorized = post(addr, "/api/v1/ingest", None, "application/json", &json_body).await;
    assert_eq!(unauthorized.status, 401, "{}", unauthorized.text());
    assert_eq!(unauthorized.json()["field"], "Authorization");
    let wrong = post(
        addr,
        "/api/v1/ingest",
        Some("not-the-token-at-all"),
        "application/json",
        &json_body,
    )
    .await;
    assert_eq!(wrong.status, 401);
    assert!(
        readings(addr, "pv", "power", t0).await.is_empty(),
        "nothing stored without the token"
    );

    let r = post(
        addr,
        "/api/v1/ingest",
        Some(TOKEN),
        "application/json",
        &json_body,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let answer = r.json();
    assert_eq!(
        (answer["stored"].as_u64(), answer["skipped"].as_u64()),
        (Some(4), Some(0)),
        "{answer}"
    );
    assert_eq!(answer["points"], 4);
    assert_eq!(answer["readings"], 3);
    // Queried at once, no waiting.
    let power = readings(addr, "pv", "power", t0).await;
    assert_eq!(
        power,
        vec![(ts(0), 1500.0), (ts(1), 1480.5), (ts(2), -20.0)],
        "JSON push right after its answer"
    );
    assert_eq!(
        readings(addr, "pv", "energy_total", t0).await,
        vec![(ts(0), 1234.5)]
    );
    println!("JSON push: {answer}");

    let csv_body = format!(
        "meter,timestamp,quantity,value,unit\nheat,{},power,2.5,kW\nheat,{},power,2.25,kW\nheat,{},energy_delta,40,Wh\n",
        ts(0),
        ts(1),
        ts(0)
    );
    let r = post(addr, "/api/v1/ingest", Some(TOKEN), "text/csv", &csv_body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["stored"], 3, "{}", r.text());
    assert_eq!(
        readings(addr, "heat", "power", t0).await,
        vec![(ts(0), 2.5), (ts(1), 2.25)]
    );
    assert_eq!(
        readings(addr, "heat", "energy_delta", t0).await,
        vec![(ts(0), 40.0)]
    );
    println!("CSV push: {}", r.text());

    // The same batch again stores nothing twice.
    let again = post(addr, "/api/v1/ingest", Some(TOKEN), "text/csv", &csv_body).await;
    assert_eq!(
        (
            again.json()["stored"].as_u64(),
            again.json()["skipped"].as_u64()
        ),
        (Some(0), Some(3))
    );
    agent.stop().await;
    let before = snapshot(&store);
    assert_eq!(before.1.len(), 5, "three readings from JSON, two from CSV");

    // Phase 2: bad batches and a dry run against the same store.
    let agent = start_agent(&store, Some(TOKEN)).await;
    let addr = agent.http;
    let future = rfc3339_ms(now_ms() + 3_600_000);
    let bad_json = format!(
        r#"[{{"meter":"pv","unit":"W","kind":"power","points":[{{"ts":"{}","value":1}},{{"ts":"{}","value":"NaN"}},{{"ts":"yesterday","value":3}},{{"ts":"{}","value":4}}]}},
            {{"meter":"pv","unit":"V","kind":"power","points":[{{"ts":"{}","value":5}}]}},
            {{"meter":"pv","unit":"kWh","kind":"energy_total","points":[{{"ts":"{}","value":-1}},{{"ts":{},"value":2}}]}}]"#,
        ts(3),
        ts(4),
        future,
        ts(3),
        ts(3),
        now_ms() + 3_600_000
    );
    let r = post(
        addr,
        "/api/v1/ingest",
        Some(TOKEN),
        "application/json",
        &bad_json,
    )
    .await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(
        problem_fields(&r),
        vec![
            "series[0].points[1].value",
            "series[0].points[2].ts",
            "series[0].points[3].ts",
            "series[1].unit",
            // Same meter, kind and time as series[0].points[0].
            "series[1].points[0].ts",
            "series[2].points[0].value",
            "series[2].points[1].ts",
        ],
        "{}",
        r.text()
    );
    let body = r.json();
    assert_eq!(body["reason"], "invalid");
    assert_eq!(body["field"], "series[0].points[1].value");
    assert!(
        body["problems"][1]["reason"]
            .as_str()
            .is_some_and(|s| s.contains("RFC 3339")),
        "{body}"
    );
    assert_eq!(
        body["problems"][2]["ts"],
        future.as_str(),
        "the point's ts as sent"
    );
    println!(
        "bad JSON batch: {} problems named",
        body["problems"].as_array().map_or(0, Vec::len)
    );

    let bad_csv = format!(
        "heat,{},power,1\nheat,{},power\nheat,{},voltage,230\nheat,{},power,abc\nheat,{},power,2\n",
        ts(3),
        ts(3),
        ts(3),
        ts(4),
        ts(3)
    );
    let r = post(addr, "/api/v1/ingest", Some(TOKEN), "text/csv", &bad_csv).await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(
        problem_fields(&r),
        vec![
            "line[2]",
            "line[3].quantity",
            "line[4].value",
            "line[5].timestamp"
        ],
        "{}",
        r.text()
    );
    let lines: Vec<u64> = r.json()["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .filter_map(|p| p["line"].as_u64())
        .collect();
    assert_eq!(lines, vec![2, 3, 4, 5]);

    let r = post(
        addr,
        "/api/v1/ingest",
        Some(TOKEN),
        "application/json",
        "{\"meter\": ",
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["reason"], "syntax");
    let r = post(addr, "/api/v1/ingest", Some(TOKEN), "text/plain", &csv_body).await;
    assert_eq!(r.status, 415, "{}", r.text());
    assert_eq!(r.json()["field"], "Content-Type");
    let r = post(
        addr,
        "/api/v1/ingest?dry_run=maybe",
        Some(TOKEN),
        "text/csv",
        &csv_body,
    )
    .await;
    assert_eq!(
        (r.status, r.json()["field"].as_str()),
        (400, Some("dry_run"))
    );

    // A dry run parses and answers the series, storing nothing.
    let dry_body = format!(
        "boiler,{},power,900\nboiler,{},power,950.5\nboiler,{},energy_total,77\n",
        t0,
        ts(1),
        ts(0)
    );
    let r = post(
        addr,
        "/api/v1/ingest?dry_run=true",
        Some(TOKEN),
        "text/csv",
        &dry_body,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let dry = r.json();
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["stored"], 0);
    assert_eq!(dry["points"], 3);
    assert_eq!(
        dry["series"],
        serde_json::json!([
            {"meter": "boiler", "quantity": "power", "unit": "W", "kind": "power",
             "points": [{"ts": ts(0), "value": 900}, {"ts": ts(1), "value": 950.5}]},
            {"meter": "boiler", "quantity": "energy_total", "unit": "kWh", "kind": "energy_total",
             "points": [{"ts": ts(0), "value": 77}]},
        ]),
    );
    assert!(readings(addr, "boiler", "power", t0).await.is_empty());

    // Counted by reason; dry runs count nothing.
    let metrics = http_get(addr, "/metrics").await.text();
    for (series, want) in [
        (
            "edge_ingest_rejected_batches_total{transport=\"http\",reason=\"invalid\"}",
            2.0,
        ),
        (
            "edge_ingest_rejected_batches_total{transport=\"http\",reason=\"syntax\"}",
            1.0,
        ),
        (
            "edge_ingest_rejected_batches_total{transport=\"http\",reason=\"content_type\"}",
            1.0,
        ),
        ("edge_ingest_batches_total{transport=\"http\"}", 0.0),
        ("edge_ingest_points_total{transport=\"http\"}", 0.0),
    ] {
        assert_eq!(
            metric(&metrics, series),
            Some(want),
            "{series} in\n{metrics}"
        );
    }
    agent.stop().await;
    let after = snapshot(&store);
    assert_eq!(after.0, before.0, "last seq unchanged");
    assert_eq!(after.1, before.1, "the same records, value for value");
    println!(
        "store before and after the bad batches: last_seq {} -> {}, {} records equal",
        before.0,
        after.0,
        after.1.len()
    );
}

/// Polls `readings` until `want` values are there (bounded).
async fn wait_readings(
    addr: SocketAddr,
    meter: &str,
    quantity: &str,
    from: i64,
    want: usize,
) -> Vec<(String, f64)> {
    poll_until(Duration::from_secs(10), || async {
        let got = readings(addr, meter, quantity, from).await;
        let done = got.len() >= want;
        (got, done)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_push_is_stored_and_a_bad_message_is_answered_on_the_error_topic() {
    let dir = tempfile::tempdir().expect("temp dir");
    let agent = start_agent(&dir.path().join("store"), None).await;
    let topic = |meter: &str| format!("edge/{GW}/ingest/{meter}");
    let mut errors = Subscriber::connect(
        agent.mqtt,
        &format!("edge/{GW}/ingest/+/error"),
        Duration::from_secs(5),
    )
    .await;
    let (client, pump) = mqtt_publisher(agent.mqtt, "pusher");
    // The subscriptions are in place once a probe's error comes back.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        client
            .publish(topic("probe"), QoS::AtLeastOnce, false, "probe")
            .await
            .expect("publish");
        if errors.next(Duration::from_millis(300)).await.is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "no error reply to the probe");
    }
    while errors.next(Duration::from_millis(300)).await.is_some() {}

    let t0 = now_ms() - 30_000;
    let ts = |i: i64| rfc3339_ms(t0 + i * 10_000);
    // The meter comes from the topic.
    let good = format!(
        r#"{{"unit":"W","kind":"power","points":[{{"ts":"{}","value":800}},{{"ts":"{}","value":810.25}}]}}"#,
        ts(0),
        ts(1)
    );
    client
        .publish(topic("boiler"), QoS::AtLeastOnce, false, good)
        .await
        .expect("publish");
    assert_eq!(
        wait_readings(agent.http, "boiler", "power", t0, 2).await,
        vec![(ts(0), 800.0), (ts(1), 810.25)]
    );

    // Bad messages: each answered on its error topic, nothing stored.
    let bad_points = format!(
        r#"[{{"unit":"W","kind":"power","points":[{{"ts":"{}","value":"NaN"}},{{"ts":"soon","value":1}}]}}]"#,
        ts(2)
    );
    client
        .publish(topic("boiler"), QoS::AtLeastOnce, false, bad_points)
        .await
        .expect("publish");
    let reply = errors
        .next(Duration::from_secs(5))
        .await
        .expect("error reply");
    assert_eq!(reply.topic, format!("edge/{GW}/ingest/boiler/error"));
    let doc = reply.json();
    assert_eq!(doc["reason"], "invalid", "{doc}");
    assert_eq!(doc["meter"], "boiler");
    let fields: Vec<&str> = doc["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .filter_map(|p| p["field"].as_str())
        .collect();
    assert_eq!(
        fields,
        vec!["series[0].points[0].value", "series[0].points[1].ts"],
        "{doc}"
    );
    assert_eq!(doc["problems_total"], 2);
    println!("MQTT error reply: {doc}");

    client
        .publish(topic("pv"), QoS::AtLeastOnce, false, "not json")
        .await
        .expect("publish");
    let reply = errors
        .next(Duration::from_secs(5))
        .await
        .expect("error reply");
    assert_eq!(reply.topic, format!("edge/{GW}/ingest/pv/error"));
    assert_eq!(reply.json()["reason"], "syntax");
    assert_eq!(reply.json()["problems"][0]["field"], "body");

    let mismatch = format!(
        r#"{{"meter":"main","unit":"W","kind":"power","points":[{{"ts":"{}","value":1}}]}}"#,
        ts(2)
    );
    client
        .publish(topic("pv"), QoS::AtLeastOnce, false, mismatch)
        .await
        .expect("publish");
    let reply = errors
        .next(Duration::from_secs(5))
        .await
        .expect("error reply");
    assert_eq!(reply.json()["problems"][0]["field"], "series[0].meter");
    assert!(readings(agent.http, "main", "power", t0).await.is_empty());
    assert!(readings(agent.http, "pv", "power", t0).await.is_empty());

    // The agent keeps going: the next good message is stored.
    let good = format!(
        r#"{{"meter":"boiler","unit":"W","kind":"power","points":[{{"ts":"{}","value":820}}]}}"#,
        ts(2)
    );
    client
        .publish(topic("boiler"), QoS::AtLeastOnce, false, good)
        .await
        .expect("publish");
    assert_eq!(
        wait_readings(agent.http, "boiler", "power", t0, 3)
            .await
            .len(),
        3
    );
    assert!(
        errors.next(Duration::from_millis(300)).await.is_none(),
        "a good message is not answered"
    );

    let metrics = http_get(agent.http, "/metrics").await.text();
    for (series, want) in [
        ("edge_ingest_batches_total{transport=\"mqtt\"}", 2.0),
        ("edge_ingest_points_total{transport=\"mqtt\"}", 3.0),
        // The probes and the two bad messages above.
        (
            "edge_ingest_rejected_batches_total{transport=\"mqtt\",reason=\"invalid\"}",
            2.0,
        ),
        ("edge_ingest_batches_total{transport=\"http\"}", 0.0),
    ] {
        assert_eq!(
            metric(&metrics, series),
            Some(want),
            "{series} in\n{metrics}"
        );
    }
    let syntax = metric(
        &metrics,
        "edge_ingest_rejected_batches_total{transport=\"mqtt\",reason=\"syntax\"}",
    )
    .unwrap_or(0.0);
    assert!(syntax >= 2.0, "the probes and `not json`: {syntax}");
    println!("MQTT counters: batches 2, points 3, invalid 2, syntax {syntax}");
    pump.abort();
    agent.stop().await;
}

/// Subscribes to the ingest error topics and waits until the ingest subscriber
/// answers a probe (its subscription is in place).
async fn error_listener(agent: &InProcessAgent, client: &AsyncClient) -> Subscriber {
    let mut errors = Subscriber::connect(
        agent.mqtt,
        &format!("edge/{GW}/ingest/+/error"),
        Duration::from_secs(5),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        client
            .publish(
                format!("edge/{GW}/ingest/probe"),
                QoS::AtLeastOnce,
                false,
                "probe",
            )
            .await
            .expect("publish");
        if errors.next(Duration::from_millis(500)).await.is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "no error reply to the probe");
    }
    while errors.next(Duration::from_millis(300)).await.is_some() {}
    errors
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_points_is_answered_with_the_first_problems_and_their_count() {
    let dir = tempfile::tempdir().expect("temp dir");
    let agent = start_agent(&dir.path().join("store"), Some(TOKEN)).await;
    // 256 KiB of bad CSV lines: 131072 problems. Before, each was listed (an 18 MB
    // answer, and many times that in memory while it was built).
    let lines = 128 << 10;
    let body = "x\n".repeat(lines);
    let r = post(
        agent.http,
        "/api/v1/ingest?dry_run=true",
        Some(TOKEN),
        "text/csv",
        &body,
    )
    .await;
    assert_eq!(r.status, 422, "{}", &r.text()[..200.min(r.text().len())]);
    assert!(r.body.len() < 64 << 10, "answer of {} bytes", r.body.len());
    let doc = r.json();
    assert_eq!(doc["problems"].as_array().map(Vec::len), Some(100));
    assert_eq!(doc["problems_total"], lines);
    assert_eq!(doc["truncated"], true);
    assert_eq!(doc["problems"][0]["field"], "line[1]");
    assert_eq!(doc["field"], "line[1]");

    // A dry run of many good points echoes the first 1000 and counts them all.
    let t0 = now_ms() - 3_000_000;
    let body: String = (0..3000)
        .map(|i| format!("pv,{},power,{i}\n", t0 + i * 1000))
        .collect();
    let r = post(
        agent.http,
        "/api/v1/ingest?dry_run=true",
        Some(TOKEN),
        "text/csv",
        &body,
    )
    .await;
    assert_eq!(r.status, 200, "{}", &r.text()[..200.min(r.text().len())]);
    let doc = r.json();
    assert_eq!(doc["points"], 3000);
    assert_eq!(doc["series_truncated"], true);
    assert_eq!(
        doc["series"][0]["points"].as_array().map(Vec::len),
        Some(1000)
    );

    // JSON: every point bad, with a long text quoted in each problem.
    let long = "y".repeat(1000);
    let points: Vec<String> = (0..400)
        .map(|_| format!(r#"{{"ts":"{long}","value":"{long}"}}"#))
        .collect();
    let body = format!(
        r#"{{"meter":"pv","unit":"W","kind":"power","points":[{}]}}"#,
        points.join(",")
    );
    let r = post(
        agent.http,
        "/api/v1/ingest",
        Some(TOKEN),
        "application/json",
        &body,
    )
    .await;
    assert_eq!(r.status, 422);
    assert!(r.body.len() < 64 << 10, "answer of {} bytes", r.body.len());
    let doc = r.json();
    assert_eq!(doc["problems"].as_array().map(Vec::len), Some(100));
    assert_eq!(doc["problems_total"], 800);
    let first = doc["problems"][0]["reason"].as_str().unwrap_or_default();
    assert!(first.len() < 200, "quoted input is cut: {first}");
    assert_eq!(doc["truncated"], true);

    // MQTT: the same cap in the error reply.
    let (client, pump) = mqtt_publisher(agent.mqtt, "pusher");
    let mut errors = error_listener(&agent, &client).await;
    // Under the publisher's 10 KiB packet limit.
    let points: Vec<String> = (0..300)
        .map(|i| format!(r#"{{"ts":"bad-{i}","value":1}}"#))
        .collect();
    let body = format!(
        r#"{{"unit":"W","kind":"power","points":[{}]}}"#,
        points.join(",")
    );
    client
        .publish(
            format!("edge/{GW}/ingest/pv"),
            QoS::AtLeastOnce,
            false,
            body,
        )
        .await
        .expect("publish");
    let reply = errors
        .next(Duration::from_secs(10))
        .await
        .expect("error reply");
    let doc = reply.json();
    assert_eq!(doc["problems"].as_array().map(Vec::len), Some(100), "{doc}");
    assert_eq!(doc["problems_total"], 300);
    assert_eq!(doc["truncated"], true);
    assert_eq!(doc["problems"][0]["field"], "series[0].points[0].ts");
    pump.abort();
    agent.stop().await;
}

/// A Modbus TCP simulator with `main` (SDM630, unit 1) and `sub` (SDM120, unit 2).
async fn start_sims(stop: &CancellationToken) -> String {
    let p = |name: &str| Arc::new(profile::builtin(name).expect("built-in profile"));
    let bus = SimBus::new()
        .with_meter(1, SimMeter::new(p("sdm630"), 1))
        .with_meter(2, SimMeter::new(p("sdm120"), 2));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind sim");
    let addr = listener.local_addr().expect("addr").to_string();
    tokio::spawn(sim::serve_tcp(listener, Arc::new(bus), stop.clone()));
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_for_a_polled_meter_are_refused_unless_it_accepts_them() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sims = CancellationToken::new();
    let tcp = start_sims(&sims).await;
    // `main` is polled only; `sub` is polled and also accepts pushes.
    let meters = lan_meters_toml_with(&tcp, "sub", "200ms")
        .replace("id = \"sub\"\n", "id = \"sub\"\naccept_push = true\n");
    let agent = start_agent_with(&dir.path().join("store"), Some(TOKEN), &meters).await;
    let t0 = now_ms() - 10_000;
    let forged = |meter: &str| {
        format!(
            r#"[{{"meter":"boiler","unit":"W","kind":"power","points":[{{"ts":{t0},"value":1}}]}},
                {{"meter":"{meter}","unit":"W","kind":"power","points":[{{"ts":{t0},"value":123456789}}]}}]"#
        )
    };
    let r = post(
        agent.http,
        "/api/v1/ingest",
        Some(TOKEN),
        "application/json",
        &forged("main"),
    )
    .await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(problem_fields(&r), vec!["series[1].meter"]);
    let reason = r.json()["problems"][0]["reason"].to_string();
    assert!(reason.contains("`main` is a polled meter"), "{reason}");
    assert!(reason.contains("accept_push"), "{reason}");
    let r = post(
        agent.http,
        "/api/v1/ingest?dry_run=true",
        Some(TOKEN),
        "text/csv",
        &format!("boiler,{t0},power,1\nmain,{t0},power,123456789\n"),
    )
    .await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(problem_fields(&r), vec!["line[2].meter"]);
    // A meter that accepts pushes takes them.
    let r = post(
        agent.http,
        "/api/v1/ingest",
        Some(TOKEN),
        "application/json",
        &forged("sub").replace("123456789", "42"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());

    // MQTT: refused too, named on the error topic.
    let (client, pump) = mqtt_publisher(agent.mqtt, "pusher");
    let mut errors = error_listener(&agent, &client).await;
    client
        .publish(
            format!("edge/{GW}/ingest/main"),
            QoS::AtLeastOnce,
            false,
            format!(r#"{{"unit":"W","kind":"power","points":[{{"ts":{t0},"value":123456789}}]}}"#),
        )
        .await
        .expect("publish");
    let reply = errors
        .next(Duration::from_secs(10))
        .await
        .expect("error reply");
    assert_eq!(reply.topic, format!("edge/{GW}/ingest/main/error"));
    let doc = reply.json();
    assert_eq!(doc["problems"][0]["field"], "series[0].meter", "{doc}");
    assert!(
        doc["problems"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("polled meter")),
        "{doc}"
    );
    pump.abort();
    // Nothing forged was stored for `main`: no value of 123456789 W.
    let stored = readings(agent.http, "main", "power", t0 - 1000).await;
    assert!(
        stored.iter().all(|(_, v)| *v != 123_456_789.0),
        "{stored:?}"
    );
    assert!(readings(agent.http, "boiler", "power", t0).await.len() == 1);
    agent.stop().await;
    sims.cancel();
}

/// Points too late for the 15-minute intervals are stored, counted in the HTTP
/// answer, in an MQTT notice and in `/metrics`; the operator's recompute then makes
/// a new revision from the stored readings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_late_points_are_answered_counted_and_recomputed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let agent = start_agent(&dir.path().join("store"), Some(TOKEN)).await;
    // Eight hours of 1 kW a minute up to a quarter an hour ago.
    let quarter = 15 * 60_000;
    let end = (now_ms() / quarter) * quarter - quarter;
    let start = end - 8 * 3_600_000;
    let points: Vec<String> = (0..8 * 60)
        .map(|m| format!(r#"{{"ts":{},"value":1000}}"#, start + m * 60_000))
        .collect();
    let body = format!(
        r#"{{"meter":"late","unit":"W","kind":"power","points":[{}]}}"#,
        points.join(",")
    );
    let r = post(
        agent.http,
        "/api/v1/ingest",
        Some(TOKEN),
        "application/json",
        &body,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["too_late_for_intervals"], 0);
    // Wait (bounded) until the analytics stage has closed intervals up to the end.
    let series = format!(
        "/api/v1/meters/late/series?start={}&end={}",
        rfc3339_ms(end - 3_600_000),
        rfc3339_ms(end)
    );
    let r = poll_until(Duration::from_secs(20), || async {
        let r = http_get(agent.http, &series).await;
        let done = r.status == 200 && r.json()["count"].as_u64() >= Some(3);
        (r, done)
    })
    .await;
    assert!(
        r.status == 200 && r.json()["count"].as_u64() >= Some(3),
        "no intervals: {}",
        r.text()
    );
    // 100 kW at the first minute plus 30 s: more than 6 h behind the newest sample.
    let late = format!(
        r#"{{"meter":"late","unit":"W","kind":"power","points":[{{"ts":{},"value":100000}}]}}"#,
        start + 30_000
    );
    let r = post(
        agent.http,
        "/api/v1/ingest",
        Some(TOKEN),
        "application/json",
        &late,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["stored"], 1);
    assert_eq!(r.json()["too_late_for_intervals"], 1, "{}", r.text());
    // Over MQTT: stored, and a notice says it was too late.
    let mut notices = Subscriber::connect(
        agent.mqtt,
        &format!("edge/{GW}/ingest/+/notice"),
        Duration::from_secs(5),
    )
    .await;
    let (client, pump) = mqtt_publisher(agent.mqtt, "pusher");
    let late_mqtt = format!(
        r#"{{"unit":"W","kind":"power","points":[{{"ts":{},"value":50000}}]}}"#,
        start + 90_000
    );
    client
        .publish(
            format!("edge/{GW}/ingest/late"),
            QoS::AtLeastOnce,
            false,
            late_mqtt,
        )
        .await
        .expect("publish");
    let notice = notices.next(Duration::from_secs(10)).await.expect("notice");
    assert_eq!(notice.topic, format!("edge/{GW}/ingest/late/notice"));
    let doc = notice.json();
    assert_eq!(doc["too_late_for_intervals"], 1, "{doc}");
    assert_eq!(doc["stored"], 1, "{doc}");
    let metrics = http_get(agent.http, "/metrics").await.text();
    for transport in ["http", "mqtt"] {
        let line = format!(
            "edge_ingest_too_late_for_intervals_points_total{{transport=\"{transport}\"}} 1"
        );
        assert!(metrics.contains(&line), "{line} missing");
    }
    assert!(metrics.contains("edge_analytics_held_samples"));
    let status = http_get(agent.http, "/api/v1/status").await.json();
    assert!(
        status["analytics"]["held_samples"].as_u64().is_some(),
        "{status}"
    );
    // The operator recomputes the first hour: one interval changes.
    let recompute = |a: i64, b: i64| {
        format!(
            "/api/v1/meters/late/intervals/recompute?start={}&end={}",
            rfc3339_ms(a),
            rfc3339_ms(b)
        )
    };
    let r = post(
        agent.http,
        &recompute(start, start + 3_600_000),
        Some(TOKEN),
        "application/json",
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["intervals"], 4, "{}", r.text());
    assert_eq!(r.json()["revised"], 1, "{}", r.text());
    // Too long a window, and no token.
    let r = post(
        agent.http,
        &recompute(start, start + 2 * 86_400_000),
        Some(TOKEN),
        "application/json",
        "",
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["field"], "end");
    let r = post(
        agent.http,
        &recompute(start, start + 3_600_000),
        None,
        "application/json",
        "",
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.text());
    let first = http_get(
        agent.http,
        &format!(
            "/api/v1/meters/late/series?start={}&end={}",
            rfc3339_ms(start),
            rfc3339_ms(start + quarter)
        ),
    )
    .await
    .json();
    let iv = &first["intervals"][0];
    assert_eq!(iv["revision"], 1, "{first}");
    // 1 kW for 15 min, plus 99 kW for 30 s and 49 kW for 30 s... the 00:01:30 point
    // holds until 00:02.
    let want = 0.25 + 99.0 * 0.5 / 60.0 + 49.0 * 0.5 / 60.0;
    assert!(
        (iv["energy_kwh"].as_f64().unwrap_or(0.0) - want).abs() < 1e-9,
        "{iv}"
    );
    pump.abort();
    agent.stop().await;
}
