//! Pushed values end to end: a repeat is skipped, a different value at a stored point
//! is refused (HTTP 409, MQTT error topic) unless the push says `"correct": true`,
//! and a correction is what reads, the state topic and the intervals then show.
//! Pushed float64s read back bit for bit from the API, the state topic and the
//! upstream record.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use edge_agent::broker::rfc3339_ms;
use edge_agent::model::now_ms;
use edge_agent_tests::{
    free_port, http_get, http_request, mqtt_publisher, poll_until, push_agent_toml, BrokerProcess,
    HttpResponse, InProcessAgent, Message, Subscriber,
};
use rumqttc::QoS;

const GW: &str = "fix-gw";
const MIN: i64 = 60_000;
const QUARTER: i64 = 15 * MIN;

async fn start_agent(store: &std::path::Path, extra: &str) -> InProcessAgent {
    // HTTP on port 0: the agent serves the listener InProcessAgent binds.
    let (http, mqtt) = (0, free_port());
    let mut text = push_agent_toml(GW, store, mqtt, http, "homeassistant_discovery = false", "");
    text.push_str(extra);
    InProcessAgent::start(&text).await
}

async fn post(addr: SocketAddr, path: &str, ctype: &str, body: &str) -> HttpResponse {
    http_request(
        addr,
        "POST",
        path,
        &[("Content-Type", ctype)],
        body.as_bytes(),
    )
    .await
    .unwrap_or_else(|e| panic!("POST {path}: {e}"))
}

/// A JSON push of `(ts, value)` power points in W for `meter`.
fn power(meter: &str, correct: bool, points: &[(i64, f64)]) -> String {
    let points: Vec<String> = points
        .iter()
        .map(|(ts, v)| format!(r#"{{"ts":{ts},"value":{v:?}}}"#))
        .collect();
    let correct = if correct { r#""correct":true,"# } else { "" };
    format!(
        r#"{{"meter":"{meter}","unit":"W","kind":"power",{correct}"points":[{}]}}"#,
        points.join(",")
    )
}

/// `(ts_ms, value)` of every `power` value of `meter` from the readings API.
async fn readings(addr: SocketAddr, meter: &str, from: i64) -> Vec<(i64, f64)> {
    let path = format!(
        "/api/v1/meters/{meter}/readings?start={}&end={}",
        rfc3339_ms(from),
        rfc3339_ms(now_ms() + 60_000)
    );
    let r = http_get(addr, &path).await;
    if r.status == 404 {
        // No reading of the meter yet.
        return Vec::new();
    }
    assert_eq!(r.status, 200, "{path}: {}", r.text());
    let doc = r.json();
    let mut out = Vec::new();
    for reading in doc["readings"].as_array().expect("readings") {
        let ts = edge_agent::ingest::parse_rfc3339_ms(reading["ts"].as_str().unwrap_or(""))
            .expect("an RFC 3339 ts");
        for v in reading["values"].as_array().expect("values") {
            if v["quantity"] == "power" {
                out.push((ts, v["value"].as_f64().unwrap_or(f64::NAN)));
            }
        }
    }
    out
}

fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The interval messages of `meter` starting at `start`, in arrival order.
fn intervals_at(seen: &[Message], meter: &str, start: i64) -> Vec<serde_json::Value> {
    let topic = format!("edge/{GW}/{meter}/energy/15m");
    seen.iter()
        .filter(|m| m.topic == topic)
        .map(Message::json)
        .filter(|doc| doc["s"].as_i64() == Some(start))
        .collect()
}

async fn online(sub: &mut Subscriber) {
    let seen = sub
        .collect_until(Duration::from_secs(10), |seen| {
            seen.iter().any(|m| m.topic == format!("edge/{GW}/status"))
        })
        .await;
    assert!(seen.iter().any(|m| m.payload == b"online"), "agent online");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http_a_different_value_is_refused_unless_corrected_and_a_correction_revises_its_interval(
) {
    let dir = tempfile::tempdir().expect("temp dir");
    let agent = start_agent(&dir.path().join("store"), "").await;
    let mut sub =
        Subscriber::connect(agent.mqtt, &format!("edge/{GW}/#"), Duration::from_secs(10)).await;
    online(&mut sub).await;

    // 1 kW every minute for 20 minutes, from a quarter 45 minutes back: the first
    // quarter closes (0.25 kWh).
    let t = (now_ms() / QUARTER) * QUARTER - 3 * QUARTER;
    let points: Vec<(i64, f64)> = (0..20).map(|i| (t + i * MIN, 1000.0)).collect();
    let last = t + 19 * MIN;
    // The newest reading also has an energy counter.
    let body = format!(
        r#"[{},{{"meter":"house","unit":"kWh","kind":"energy_total","points":[{{"ts":{last},"value":42}}]}}]"#,
        power("house", false, &points)
    );
    let r = post(agent.http, "/api/v1/ingest", "application/json", &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = sub
        .collect_until(Duration::from_secs(20), |seen| {
            !intervals_at(seen, "house", t).is_empty()
        })
        .await;
    let first = intervals_at(&seen, "house", t);
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0]["rev"].as_u64(), Some(0));
    assert!(
        (first[0]["kwh"].as_f64().unwrap_or(-1.0) - 0.25).abs() < 1e-9,
        "{}",
        first[0]
    );

    // The same value again: a repeat, skipped.
    let at = t + 3 * MIN;
    let r = post(
        agent.http,
        "/api/v1/ingest",
        "application/json",
        &power("house", false, &[(at, 1000.0)]),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        (r.json()["stored"].as_u64(), r.json()["skipped"].as_u64()),
        (Some(0), Some(1))
    );

    // A different value: refused with 409, the point named with both values, nothing
    // of the batch stored (not even its new point).
    let batch = power("house", false, &[(t + 30 * MIN, 5.0), (at, 61_000.0)]);
    let r = post(agent.http, "/api/v1/ingest", "application/json", &batch).await;
    assert_eq!(r.status, 409, "{}", r.text());
    let doc = r.json();
    println!("409 answer: {doc}");
    assert_eq!(doc["reason"], "conflict");
    assert_eq!(doc["field"], "series[0].points[1].value");
    assert_eq!(doc["problems_total"].as_u64(), Some(1));
    let problem = &doc["problems"][0];
    assert_eq!(problem["ts"].as_str(), Some(at.to_string().as_str()));
    let reason = problem["reason"].as_str().unwrap_or_default();
    for part in [
        "meter `house` power".to_string(),
        rfc3339_ms(at),
        "stored as 1000 W".to_string(),
        "offers 61000 W".to_string(),
        "\"correct\": true".to_string(),
    ] {
        assert!(reason.contains(&part), "`{part}` in {reason}");
    }
    let stored = readings(agent.http, "house", t).await;
    assert_eq!(stored.len(), 20, "nothing of the refused batch: {stored:?}");
    assert!(stored.contains(&(at, 1000.0)));

    // With "correct": true it is stored as a correction: reads show it, once.
    let r = post(
        agent.http,
        "/api/v1/ingest",
        "application/json",
        &power("house", true, &[(at, 61_000.0)]),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let answer = r.json();
    assert_eq!(
        (
            answer["stored"].as_u64(),
            answer["corrected"].as_u64(),
            answer["skipped"].as_u64()
        ),
        (Some(1), Some(1), Some(0)),
        "{answer}"
    );
    let stored = readings(agent.http, "house", t).await;
    let at_ts: Vec<f64> = stored
        .iter()
        .filter(|(ts, _)| *ts == at)
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(at_ts, vec![61_000.0], "{stored:?}");
    assert_eq!(stored.len(), 20);

    // The quarter comes again as revision 1 with the corrected energy: the point
    // holds 61 kW for its minute instead of 1 kW.
    let later = sub
        .collect_until(Duration::from_secs(20), |seen| {
            !intervals_at(seen, "house", t).is_empty()
        })
        .await;
    let revised = intervals_at(&later, "house", t);
    assert_eq!(revised[0]["rev"].as_u64(), Some(1), "{revised:?}");
    let kwh = revised[0]["kwh"].as_f64().unwrap_or(-1.0);
    assert!((kwh - 1.25).abs() < 1e-9, "{kwh}");

    // A correction of the newest point: the state topic and the meters view show it,
    // with the value it does not replace; the correction of an earlier point above
    // left the state alone.
    let r = post(
        agent.http,
        "/api/v1/ingest",
        "application/json",
        &power("house", true, &[(last, 2500.0)]),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seq = r.json()["last_seq"]
        .as_u64()
        .expect("seq of the correction");
    let states = sub
        .collect_until(Duration::from_secs(10), |seen| {
            seen.iter()
                .any(|m| m.topic.ends_with("/house/state") && m.json()["seq"].as_u64() == Some(seq))
        })
        .await;
    let state = states
        .iter()
        .find(|m| m.topic.ends_with("/house/state") && m.json()["seq"].as_u64() == Some(seq))
        .expect("state of the correction")
        .json();
    assert_eq!(state["ts_ms"].as_i64(), Some(last));
    assert_eq!(
        state["values"]["power"]["value"].as_f64(),
        Some(2500.0),
        "{state}"
    );
    assert_eq!(
        state["values"]["energy_total"]["value"].as_f64(),
        Some(42.0),
        "{state}"
    );
    let every_state = later
        .iter()
        .chain(&states)
        .filter(|m| m.topic.ends_with("/house/state"));
    for m in every_state {
        assert_eq!(
            m.json()["ts_ms"].as_i64(),
            Some(last),
            "state of an earlier point: {}",
            m.json()
        );
    }
    let meters = http_get(agent.http, "/api/v1/meters").await.json();
    let house = meters["meters"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["id"] == "house"))
        .expect("house in the meters view")
        .clone();
    let latest: Vec<(String, f64)> = house["latest"]["values"]
        .as_array()
        .expect("latest values")
        .iter()
        .map(|v| {
            let q = v["quantity"].as_str().unwrap_or_default().to_string();
            (q, v["value"].as_f64().unwrap_or(f64::NAN))
        })
        .collect();
    assert!(latest.contains(&("power".into(), 2500.0)), "{house}");
    assert!(latest.contains(&("energy_total".into(), 42.0)), "{house}");

    // CSV has no series flag: `?correct=true` covers the batch.
    let csv = format!("house,{last},power,2600,W\n");
    let r = post(agent.http, "/api/v1/ingest", "text/csv", &csv).await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(r.json()["field"], "line[1].value");
    let r = post(agent.http, "/api/v1/ingest?correct=true", "text/csv", &csv).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["corrected"].as_u64(), Some(1));
    assert!(readings(agent.http, "house", t)
        .await
        .contains(&(last, 2600.0)));

    let metrics = http_get(agent.http, "/metrics").await.text();
    for (series, want) in [
        (
            "edge_ingest_corrected_points_total{transport=\"http\"}",
            3.0,
        ),
        ("edge_ingest_skipped_points_total{transport=\"http\"}", 1.0),
        (
            "edge_ingest_rejected_batches_total{transport=\"http\",reason=\"conflict\"}",
            2.0,
        ),
    ] {
        assert_eq!(metric(&metrics, series), Some(want), "{series}");
    }
    agent.stop().await;
}

/// Polls the readings API until `done` holds for them (bounded).
async fn wait_readings(
    addr: SocketAddr,
    meter: &str,
    from: i64,
    done: impl Fn(&[(i64, f64)]) -> bool,
) -> Vec<(i64, f64)> {
    poll_until(Duration::from_secs(10), || async {
        let got = readings(addr, meter, from).await;
        let finished = done(&got);
        (got, finished)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_mqtt_a_different_value_is_answered_on_the_error_topic_unless_corrected() {
    let dir = tempfile::tempdir().expect("temp dir");
    let agent = start_agent(&dir.path().join("store"), "").await;
    let topic = format!("edge/{GW}/ingest/boiler");
    let mut errors = Subscriber::connect(
        agent.mqtt,
        &format!("{topic}/error"),
        Duration::from_secs(5),
    )
    .await;
    let (client, pump) = mqtt_publisher(agent.mqtt, "fixer");
    // The ingest subscription is in place once a probe's error comes back.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        client
            .publish(topic.clone(), QoS::AtLeastOnce, false, "probe")
            .await
            .expect("publish");
        if errors.next(Duration::from_millis(300)).await.is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "no error reply to the probe");
    }
    while errors.next(Duration::from_millis(300)).await.is_some() {}

    let t0 = now_ms() - 60_000;
    let send = |body: String| {
        let (client, topic) = (client.clone(), topic.clone());
        async move {
            client
                .publish(topic, QoS::AtLeastOnce, false, body)
                .await
                .expect("publish")
        }
    };
    send(power(
        "boiler",
        false,
        &[(t0, 800.0), (t0 + 10_000, 810.25)],
    ))
    .await;
    let got = wait_readings(agent.http, "boiler", t0, |r| r.len() == 2).await;
    assert_eq!(got, vec![(t0, 800.0), (t0 + 10_000, 810.25)]);

    // A repeat is skipped silently; a different value is answered as a conflict.
    send(power("boiler", false, &[(t0 + 10_000, 810.25)])).await;
    send(power("boiler", false, &[(t0 + 10_000, 900.5)])).await;
    let reply = errors
        .next(Duration::from_secs(5))
        .await
        .expect("error reply");
    let doc = reply.json();
    println!("MQTT conflict reply: {doc}");
    assert_eq!(doc["reason"], "conflict", "{doc}");
    assert_eq!(doc["meter"], "boiler");
    assert_eq!(doc["problems"][0]["field"], "series[0].points[0].value");
    let reason = doc["problems"][0]["reason"].as_str().unwrap_or_default();
    for part in [
        "meter `boiler` power".to_string(),
        rfc3339_ms(t0 + 10_000),
        "offers 900.5 W".to_string(),
    ] {
        assert!(reason.contains(&part), "`{part}` in {reason}");
    }
    // Messages are handled concurrently, so the repeat may still be under way: the
    // conflict is then with that push, which the answer says.
    assert!(
        reason.contains("stored as 810.25 W")
            || reason.contains("being stored by another push as 810.25 W"),
        "{reason}"
    );

    // With "correct": true the value is replaced, and not answered.
    send(power("boiler", true, &[(t0 + 10_000, 900.5)])).await;
    let got = wait_readings(agent.http, "boiler", t0, |r| {
        r.contains(&(t0 + 10_000, 900.5))
    })
    .await;
    assert_eq!(got, vec![(t0, 800.0), (t0 + 10_000, 900.5)]);
    assert!(
        errors.next(Duration::from_millis(300)).await.is_none(),
        "a correction is not answered"
    );

    let metrics = http_get(agent.http, "/metrics").await.text();
    for (series, want) in [
        (
            "edge_ingest_corrected_points_total{transport=\"mqtt\"}",
            1.0,
        ),
        ("edge_ingest_skipped_points_total{transport=\"mqtt\"}", 1.0),
        (
            "edge_ingest_rejected_batches_total{transport=\"mqtt\",reason=\"conflict\"}",
            1.0,
        ),
    ] {
        assert_eq!(metric(&metrics, series), Some(want), "{series}");
    }
    pump.abort();
    agent.stop().await;
}

/// Numbers whose float32 shortest form is not what was pushed, and others, as sent.
const EXACT: [(&str, f64); 5] = [
    ("51.001953125", 51.001953125),
    ("0.5000000596046448", 0.5000000596046448),
    ("0.1", 0.1),
    ("1e-300", 1e-300),
    ("17179869184", 17_179_869_184.0),
];

/// Meter, `value` and source code of the first value of a reading record as it
/// travels upstream, decoded with the schemas its batches carried.
fn first_value(
    decoder: &edge_agent::sync::wire::Decoder,
    data: &[u8],
) -> Option<(String, f64, u8)> {
    let record = decoder.record(GW, data).ok()?;
    let reading = record.payload.as_reading()?;
    let value = reading.values.first()?;
    Some((reading.meter.clone(), value.value?, value.source.code()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_float64s_read_back_exactly_from_the_api_the_state_topic_and_upstream() {
    let dir = tempfile::tempdir().expect("temp dir");
    let up_port = free_port();
    let _upstream = BrokerProcess::start(env!("CARGO_BIN_EXE_upstream-broker"), up_port);
    let mut up = Subscriber::connect(
        edge_agent_tests::loopback(up_port),
        &format!("edge/{GW}/records"),
        Duration::from_secs(10),
    )
    .await;
    let extra = format!(
        "[upstream]\nhost = \"127.0.0.1\"\nport = {up_port}\nreconnect_min = \"50ms\"\nreconnect_max = \"500ms\"\n"
    );
    let agent = start_agent(&dir.path().join("store"), &extra).await;
    let mut state = Subscriber::connect(
        agent.mqtt,
        &format!("edge/{GW}/exact/state"),
        Duration::from_secs(10),
    )
    .await;

    // One push per value, so each is the newest reading when it is published.
    let t0 = now_ms() - 60_000;
    let mut seqs = Vec::new();
    for (i, (text, _)) in EXACT.iter().enumerate() {
        let body = format!(
            r#"{{"meter":"exact","unit":"W","kind":"power","points":[{{"ts":{},"value":{text}}}]}}"#,
            t0 + i as i64 * 1000
        );
        let r = post(agent.http, "/api/v1/ingest", "application/json", &body).await;
        assert_eq!(r.status, 200, "{}", r.text());
        seqs.push(r.json()["last_seq"].as_u64().expect("seq"));
        // The meters view: the newest reading's value, exactly.
        let meters = http_get(agent.http, "/api/v1/meters").await;
        assert!(
            meters.text().contains(&format!("\"value\":{text}")),
            "{text} in {}",
            meters.text()
        );
    }

    // The readings API: each number as sent, text and bits.
    let path = format!(
        "/api/v1/meters/exact/readings?start={}&end={}",
        rfc3339_ms(t0),
        rfc3339_ms(now_ms() + 60_000)
    );
    let r = http_get(agent.http, &path).await;
    assert_eq!(r.status, 200, "{}", r.text());
    for (text, v) in EXACT {
        assert!(
            r.text().contains(&format!("\"value\":{text}")),
            "{text} in {}",
            r.text()
        );
        assert!(
            readings(agent.http, "exact", t0)
                .await
                .iter()
                .any(|(_, got)| got.to_bits() == v.to_bits()),
            "{text}"
        );
    }
    println!("readings answer: {}", r.text());

    // The state topic: one message per push, each value as sent.
    let states = state
        .collect_until(Duration::from_secs(10), |seen| {
            EXACT.iter().all(|(text, _)| {
                seen.iter().any(|m| {
                    String::from_utf8_lossy(&m.payload).contains(&format!("\"value\":{text}"))
                })
            })
        })
        .await;
    for (text, v) in EXACT {
        let m = states
            .iter()
            .find(|m| String::from_utf8_lossy(&m.payload).contains(&format!("\"value\":{text}")))
            .unwrap_or_else(|| panic!("state with {text}"));
        let got = m.json()["values"]["power"]["value"]
            .as_f64()
            .unwrap_or(f64::NAN);
        assert_eq!(got.to_bits(), v.to_bits(), "{text}");
    }

    // Upstream: the stored record, its value bit for bit, tagged as a float64 (2).
    let mut found = std::collections::HashMap::new();
    let mut decoder = edge_agent::sync::wire::Decoder::default();
    let deadline = Instant::now() + Duration::from_secs(20);
    while found.len() < seqs.len() && Instant::now() < deadline {
        let Some(batch) = up.next(Duration::from_millis(500)).await else {
            continue;
        };
        let batch = decoder.batch(&batch.payload).expect("batch decodes");
        for rec in batch.records {
            if seqs.contains(&rec.seq) {
                found.insert(
                    rec.seq,
                    first_value(&decoder, &rec.data).expect("a reading record"),
                );
            }
        }
    }
    for (seq, (text, v)) in seqs.iter().zip(EXACT) {
        let (meter, got, source) = found
            .get(seq)
            .unwrap_or_else(|| panic!("seq {seq} upstream"))
            .clone();
        assert_eq!(meter, "exact");
        assert_eq!(got.to_bits(), v.to_bits(), "{text} upstream");
        assert_eq!(source, 2, "{text}: tagged as a float64");
    }
    agent.stop().await;
}
