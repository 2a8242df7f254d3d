//! The local HTTP interface over real HTTP on loopback, with the agent polling
//! simulated Modbus TCP meters: the documented JSON, the guard (foreign `Host`, token,
//! body limit, and the process's memory under a 10 MiB body), `/metrics` parsed as
//! Prometheus text and moving (polls, store, and the upstream link to a real broker
//! that is then killed), `/readyz`, the live stream and the page.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edge_agent::acquire::profile;
use edge_agent::config::Config;
use edge_agent::sim::{self, SimBus, SimMeter};
use edge_agent_tests::{
    free_port, http_get, http_raw, http_request, http_request_refused_early, lan_meters_toml_with,
    loopback, poll_until, wait_ready, BrokerProcess, HttpResponse, Subscriber,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "test-token-0123456789";

/// Two simulated meters on one Modbus TCP server: `main` (SDM630), `aux` (SDM120).
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

fn config_text(
    store: &Path,
    tcp: &str,
    http: &str,
    token: Option<&str>,
    upstream: Option<u16>,
    http_extra: &str,
) -> String {
    let token = token.map_or(String::new(), |t| format!("token = \"{t}\"\n"));
    let upstream = upstream.map_or(String::new(), |port| {
        format!(
            "[upstream]\nhost = \"127.0.0.1\"\nport = {port}\nreconnect_min = \"50ms\"\nreconnect_max = \"200ms\"\n"
        )
    });
    format!(
        r#"
gateway_id = "http-gw"
[store]
path = "{store}"
flush_interval = "50ms"
[mqtt]
listen = "127.0.0.1:{mqtt}"
[http]
listen = "{http}"
{token}
{http_extra}
{upstream}
{meters}"#,
        store = store.display(),
        mqtt = free_port(),
        meters = lan_meters_toml_with(tcp, "aux", "100ms"),
    )
}

struct Agent {
    http: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

impl Agent {
    async fn start(listen_ip: &str, token: Option<&str>, sims: &CancellationToken) -> Agent {
        Agent::start_with(listen_ip, token, None, sims).await
    }

    async fn start_with(
        listen_ip: &str,
        token: Option<&str>,
        upstream: Option<u16>,
        sims: &CancellationToken,
    ) -> Agent {
        Agent::start_full(listen_ip, token, upstream, "", sims).await
    }

    /// With more `[http]` keys (`http_extra`, TOML lines).
    async fn start_full(
        listen_ip: &str,
        token: Option<&str>,
        upstream: Option<u16>,
        http_extra: &str,
        sims: &CancellationToken,
    ) -> Agent {
        let tcp = start_sims(sims).await;
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let text = config_text(
            &dir.path().join("store"),
            &tcp,
            &format!("{listen_ip}:{port}"),
            token,
            upstream,
            http_extra,
        );
        let config = Config::from_toml(&text).expect("config parses");
        config.validate().expect("config valid");
        let stop = CancellationToken::new();
        let task = tokio::spawn(edge_agent::run(config, stop.clone()));
        Agent {
            http: loopback(port),
            stop,
            task,
            _dir: dir,
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("agent stops")
            .expect("agent task")
            .expect("agent ran cleanly");
    }
}

/// Polls `path` until `done` holds for its JSON (or panics after `limit`).
async fn wait_json(
    addr: SocketAddr,
    path: &str,
    limit: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let (json, held) = poll_until(limit, || async {
        let r = http_get(addr, path).await;
        let json = r.json();
        let held = r.status == 200 && done(&json);
        ((json, held), held)
    })
    .await;
    assert!(held, "{path} never satisfied: {json}");
    json
}

fn assert_json_error(r: &HttpResponse, status: u16, field: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    assert!(
        r.header("content-type")
            .is_some_and(|v| v.starts_with("application/json")),
        "{:?}",
        r.headers
    );
    let json = r.json();
    assert_eq!(json["field"], field, "{json}");
    assert!(
        json["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{json}"
    );
}

fn is_rfc3339(v: &serde_json::Value) -> bool {
    v.as_str()
        .is_some_and(|s| edge_agent::ingest::parse_rfc3339_ms(s).is_ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_answers_the_documented_json() {
    let sims = CancellationToken::new();
    let agent = Agent::start("127.0.0.1", Some(TOKEN), &sims).await;
    let addr = agent.http;
    let ready = wait_ready(addr, Duration::from_secs(10)).await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(ready.json()["ready"], true);
    assert_eq!(http_get(addr, "/healthz").await.json()["status"], "alive");

    // Both meters polled a few times, and those readings committed (a poll counts
    // as a success before the group commit that stores it).
    let status = wait_json(addr, "/api/v1/status", Duration::from_secs(10), |s| {
        s["store"]["records"].as_u64().unwrap_or(0) >= 6
            && s["meters"].as_array().is_some_and(|ms| {
                ms.len() == 2 && ms.iter().all(|m| m["successes"].as_u64().unwrap_or(0) >= 3)
            })
    })
    .await;
    assert_eq!(status["gateway"], "http-gw");
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert!(status["uptime_s"].is_u64());
    assert!(is_rfc3339(&status["now"]), "{status}");
    let store = &status["store"];
    for key in [
        "records",
        "last_seq",
        "quarantined",
        "disk_bytes",
        "quota_bytes",
    ] {
        assert!(store[key].is_u64(), "store.{key} in {store}");
    }
    assert!(store["records"].as_u64() >= Some(6), "{store}");
    assert!(store["disk_bytes"].as_u64() > Some(0));
    assert_eq!(store["quota_bytes"], 1u64 << 30);
    // No [upstream] section.
    assert_eq!(status["upstream"], serde_json::Value::Null);
    let meters = status["meters"].as_array().expect("meters");
    assert_eq!(meters[0]["id"], "main");
    assert_eq!(meters[1]["id"], "aux");
    for m in meters {
        assert_eq!(m["state"], "ok", "{m}");
        assert_eq!(m["success_rate"], 1.0, "{m}");
        assert!(is_rfc3339(&m["last_poll"]), "{m}");
        assert!(m["latency_ms"].as_f64().is_some_and(|l| l > 0.0), "{m}");
        assert_eq!(m["timeouts"], 0);
    }

    // Latest values with units, timestamp and the profile's maker and model.
    let meters = http_get(addr, "/api/v1/meters").await.json();
    let list = meters["meters"].as_array().expect("meters");
    assert_eq!(list.len(), 2, "{meters}");
    let main = &list[0];
    assert_eq!(main["id"], "main");
    assert_eq!(main["manufacturer"], "Eastron");
    assert_eq!(main["model"], "SDM630");
    assert!(is_rfc3339(&main["latest"]["ts"]), "{main}");
    let values = main["latest"]["values"].as_array().expect("values");
    let voltage = values
        .iter()
        .find(|v| v["quantity"] == "voltage_l1")
        .expect("voltage_l1");
    assert_eq!(voltage["unit"], "V");
    assert!(
        voltage["value"].as_f64().is_some_and(|v| v > 100.0),
        "{voltage}"
    );
    assert!(!main["recent"].as_array().expect("recent").is_empty());

    // Readings in [start, end).
    let now = edge_agent::model::now_ms();
    let start = edge_agent::broker::rfc3339_ms(now - 60_000);
    let end = edge_agent::broker::rfc3339_ms(now + 1_000);
    let r = http_get(
        addr,
        &format!("/api/v1/meters/aux/readings?start={start}&end={end}"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    let readings = body["readings"].as_array().expect("readings");
    assert!(readings.len() >= 3, "{body}");
    assert_eq!(body["count"], readings.len());
    assert_eq!(body["truncated"], false);
    let mut last = i64::MIN;
    for reading in readings {
        let ts = edge_agent::ingest::parse_rfc3339_ms(reading["ts"].as_str().expect("ts"))
            .expect("RFC 3339");
        assert!(ts >= now - 60_000 && ts < now + 1_000 && ts >= last);
        last = ts;
    }
    let r = http_get(
        addr,
        &format!("/api/v1/meters/aux/readings?start={start}&end={end}&limit=2"),
    )
    .await;
    assert_eq!(r.json()["count"], 2);
    assert_eq!(r.json()["truncated"], true);
    assert!(is_rfc3339(&r.json()["next_start"]));

    // Bad parameters are named.
    let bad = |q: &str| format!("/api/v1/meters/aux/readings?{q}");
    assert_json_error(&http_get(addr, &bad("start=yesterday")).await, 400, "start");
    assert_json_error(
        &http_get(
            addr,
            &bad(&format!("start={start}&end=2024-13-01T00:00:00Z")),
        )
        .await,
        400,
        "end",
    );
    assert_json_error(
        &http_get(addr, &bad(&format!("start={end}&end={start}"))).await,
        400,
        "start",
    );
    assert_json_error(
        &http_get(addr, &bad(&format!("start={start}&end={start}"))).await,
        400,
        "start",
    );
    assert_json_error(&http_get(addr, &bad("limit=0")).await, 400, "limit");
    assert_json_error(&http_get(addr, &bad("colour=red")).await, 400, "colour");
    assert_json_error(
        &http_get(addr, "/api/v1/meters/nope/readings").await,
        404,
        "id",
    );
    assert_json_error(&http_get(addr, "/api/v1/nothing").await, 404, "path");

    // The page: self-contained, phone-sized.
    let page = http_get(addr, "/").await;
    assert_eq!(page.status, 200);
    let html = page.text();
    assert!(html.contains("name=\"viewport\""));
    assert!(html.contains("/api/v1/live"));
    for external in ["http://", "https://", "src=", "<link"] {
        assert!(
            !html.contains(external),
            "the page refers to something outside: {external}"
        );
    }

    agent.stop().await;
    sims.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guard_refuses_foreign_hosts_and_writes_without_the_token() {
    let sims = CancellationToken::new();
    let agent = Agent::start("127.0.0.1", Some(TOKEN), &sims).await;
    let addr = agent.http;
    wait_ready(addr, Duration::from_secs(10)).await;
    let req = |method: &'static str, path: &'static str, headers: Vec<(&'static str, String)>| async move {
        let h: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        http_request(addr, method, path, &h, &[])
            .await
            .expect("request")
    };

    // DNS rebinding: the browser sends the attacker's name.
    for host in [
        "evil.example",
        "evil.example:8080",
        "127.0.0.1.nip.io",
        "10.1.2.3",
    ] {
        let r = req("GET", "/api/v1/status", vec![("Host", host.to_string())]).await;
        assert_json_error(&r, 421, "Host");
    }
    for host in [
        "localhost",
        &format!("localhost:{}", addr.port()),
        &addr.to_string(),
    ] {
        let r = req("GET", "/api/v1/status", vec![("Host", host.to_string())]).await;
        assert_eq!(r.status, 200, "{host}: {}", r.text());
    }

    // On loopback reads are open; writes need the bearer token.
    let r = req("POST", "/api/v1/status", vec![]).await;
    assert_json_error(&r, 401, "Authorization");
    let r = req(
        "DELETE",
        "/api/v1/meters",
        vec![("Authorization", "Bearer wrong-token-0123456".into())],
    )
    .await;
    assert_json_error(&r, 401, "Authorization");
    // Basic credentials are for reads only.
    let basic = format!("Basic {}", base64(&format!("x:{TOKEN}")));
    let r = req("POST", "/api/v1/status", vec![("Authorization", basic)]).await;
    assert_json_error(&r, 401, "Authorization");
    // With the token the write reaches the router (no write endpoint here yet: 405).
    let r = req(
        "POST",
        "/api/v1/status",
        vec![("Authorization", format!("Bearer {TOKEN}"))],
    )
    .await;
    assert_json_error(&r, 405, "method");

    agent.stop().await;
    sims.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_public_address_everything_needs_the_token() {
    let sims = CancellationToken::new();
    // 0.0.0.0 is not loopback: the rule for a gateway reachable from the LAN.
    let agent = Agent::start("0.0.0.0", Some(TOKEN), &sims).await;
    let addr = agent.http;
    let bearer = format!("Bearer {TOKEN}");
    let ready = poll_until(Duration::from_secs(10), || async {
        let r = http_request(addr, "GET", "/readyz", &[("Authorization", &bearer)], &[]).await;
        let ready = r.is_ok_and(|r| r.status == 200);
        (ready, ready)
    })
    .await;
    assert!(ready, "not ready");
    for path in [
        "/",
        "/healthz",
        "/readyz",
        "/metrics",
        "/api/v1/status",
        "/api/v1/meters",
        "/api/v1/live",
    ] {
        let r = http_request(addr, "GET", path, &[], &[])
            .await
            .expect("request");
        assert_json_error(&r, 401, "Authorization");
        assert!(
            r.header("www-authenticate")
                .is_some_and(|v| v.contains("Basic")),
            "{path}"
        );
    }
    let r = http_request(
        addr,
        "GET",
        "/api/v1/status",
        &[("Authorization", &bearer)],
        &[],
    )
    .await
    .expect("request");
    assert_eq!(r.status, 200, "{}", r.text());
    let basic = format!("Basic {}", base64(&format!("operator:{TOKEN}")));
    let r = http_request(
        addr,
        "GET",
        "/api/v1/meters",
        &[("Authorization", &basic)],
        &[],
    )
    .await
    .expect("request");
    assert_eq!(r.status, 200, "{}", r.text());
    agent.stop().await;
    sims.cancel();
}

fn base64(text: &str) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in text.as_bytes().chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A strict parser of the Prometheus text format (0.0.4): every line is a `# HELP`,
/// a `# TYPE` or a sample `name{label="value",...} number`; every sample belongs to a
/// declared family. Returns samples keyed by name and sorted label text.
fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = HashMap::new();
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !n.starts_with(|c: char| c.is_ascii_digit())
    };
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name) = (parts.next().expect("kind"), parts.next().expect("name"));
            assert!(name_ok(name), "bad metric name in {line:?}");
            match kind {
                "HELP" => {}
                "TYPE" => {
                    let t = parts.next().expect("type");
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&t),
                        "{line:?}"
                    );
                    types.insert(name.to_string(), t.to_string());
                }
                _ => panic!("unknown comment {line:?}"),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => {
                let inner = rest.strip_suffix('}').unwrap_or_else(|| panic!("{line:?}"));
                let mut pairs: Vec<String> = Vec::new();
                for pair in inner.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once("=\"").unwrap_or_else(|| panic!("{line:?}"));
                    assert!(name_ok(k), "bad label name in {line:?}");
                    pairs.push(format!("{k}={}", v.trim_end_matches('"')));
                }
                pairs.sort();
                (n, pairs.join(","))
            }
            None => (series, String::new()),
        };
        assert!(name_ok(name), "bad sample name in {line:?}");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        assert!(
            types.contains_key(family),
            "sample without # TYPE: {line:?}"
        );
        samples.insert(format!("{name}{{{labels}}}"), value);
    }
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_move_as_polls_happen() {
    let sims = CancellationToken::new();
    let upstream_port = free_port();
    let mut upstream = BrokerProcess::start(env!("CARGO_BIN_EXE_upstream-broker"), upstream_port);
    let agent = Agent::start_with("127.0.0.1", None, Some(upstream_port), &sims).await;
    let addr = agent.http;
    wait_ready(addr, Duration::from_secs(10)).await;
    let scrape = || async {
        let r = http_get(addr, "/metrics").await;
        assert_eq!(r.status, 200);
        assert!(r
            .header("content-type")
            .is_some_and(|v| v.starts_with("text/plain; version=0.0.4")));
        parse_prometheus(&r.text())
    };
    let key =
        |meter: &str, outcome: &str| format!("edge_polls_total{{meter={meter},outcome={outcome}}}");
    let first = scrape().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let second = scrape().await;
    for meter in ["main", "aux"] {
        let (a, b) = (
            first[&key(meter, "success")],
            second[&key(meter, "success")],
        );
        assert!(
            b >= a + 5.0,
            "{meter}: successes {a} -> {b} in 1.5 s at 100 ms"
        );
        for outcome in ["timeout", "exception", "transport", "decode"] {
            assert_eq!(second[&key(meter, outcome)], 0.0, "{meter} {outcome}");
        }
        let count = second[&format!("edge_poll_latency_seconds_count{{meter={meter}}}")];
        let inf = second[&format!("edge_poll_latency_seconds_bucket{{le=+Inf,meter={meter}}}")];
        assert_eq!(count, inf);
        assert!(
            count >= second[&key(meter, "success")] - 2.0,
            "histogram counts the polls"
        );
        assert!(second[&format!("edge_poll_latency_seconds_sum{{meter={meter}}}")] > 0.0);
        assert_eq!(second[&format!("edge_meter_up{{meter={meter}}}")], 1.0);
    }
    assert!(second["edge_store_records{}"] > first["edge_store_records{}"]);
    assert!(second["edge_store_disk_bytes{}"] > 0.0);
    assert_eq!(second["edge_store_quota_bytes{}"], f64::from(1u32 << 30));
    assert_eq!(second["edge_store_quarantined_total{}"], 0.0);
    assert_eq!(second["edge_store_dropped_records_total{}"], 0.0);
    assert_eq!(second["edge_store_held_dropped_readings_total{}"], 0.0);

    // Upstream: the link to a live broker delivers...
    let state = |m: &HashMap<String, f64>, s: &str| m[&format!("edge_upstream_state{{state={s}}}")];
    let scrape_until = |what: &'static str, done: fn(&HashMap<String, f64>) -> bool| async move {
        let (m, held) = poll_until(Duration::from_secs(15), || async {
            let m = scrape().await;
            let held = done(&m);
            ((m, held), held)
        })
        .await;
        assert!(held, "metrics never showed {what}");
        m
    };
    let live = scrape_until("a live, delivering upstream", |m| {
        m["edge_upstream_state{state=live}"] == 1.0
            && m["edge_upstream_delivered_records_total{}"] > 0.0
    })
    .await;
    println!(
        "upstream live: delivered {}, backlog {}, connects {}, drain rate {}/s",
        live["edge_upstream_delivered_records_total{}"],
        live["edge_upstream_backlog_records{}"],
        live["edge_upstream_connects_total{}"],
        live["edge_upstream_drain_rate_records_per_second{}"],
    );
    assert_eq!(live["edge_upstream_configured{}"], 1.0);
    assert_eq!(state(&live, "offline") + state(&live, "catching_up"), 0.0);
    assert!(live["edge_upstream_connects_total{}"] >= 1.0);
    assert!(live["edge_upstream_cursor_seq{}"] > 0.0);
    assert_eq!(live["edge_upstream_resent_records_total{}"], 0.0);
    for family in [
        "edge_upstream_backlog_records{}",
        "edge_upstream_oldest_unacked_age_seconds{}",
        "edge_upstream_drain_rate_records_per_second{}",
        "edge_upstream_inflight_batches{}",
    ] {
        assert!(live[family] >= 0.0, "{family}");
    }
    // ...and once it is gone, the state says so and the backlog and its age grow.
    upstream.kill();
    let down = scrape_until("an offline upstream with a backlog", |m| {
        m["edge_upstream_state{state=offline}"] == 1.0
            && m["edge_upstream_backlog_records{}"] >= 10.0
            && m["edge_upstream_oldest_unacked_age_seconds{}"] > 0.0
    })
    .await;
    println!(
        "upstream down: backlog {}, oldest unacknowledged {} s, delivered {}",
        down["edge_upstream_backlog_records{}"],
        down["edge_upstream_oldest_unacked_age_seconds{}"],
        down["edge_upstream_delivered_records_total{}"],
    );
    assert_eq!(state(&down, "live") + state(&down, "catching_up"), 0.0);
    assert!(
        down["edge_upstream_delivered_records_total{}"]
            >= live["edge_upstream_delivered_records_total{}"]
    );
    // The status document shows the same link.
    let status = http_get(addr, "/api/v1/status").await.json();
    assert_eq!(status["upstream"]["state"], "offline", "{status}");
    assert!(
        status["upstream"]["backlog"].as_u64() >= Some(10),
        "{status}"
    );
    agent.stop().await;
    sims.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_stream_sends_meter_updates() {
    let sims = CancellationToken::new();
    let agent = Agent::start("127.0.0.1", None, &sims).await;
    let addr = agent.http;
    wait_ready(addr, Duration::from_secs(10)).await;
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(format!("GET /api/v1/live HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .expect("send");
    let mut seen = String::new();
    let mut buf = vec![0u8; 16 * 1024];
    let deadline = Instant::now() + Duration::from_secs(10);
    // Two `meters` events with different latest timestamps: values change live.
    let mut stamps: Vec<String> = Vec::new();
    while stamps.len() < 2 {
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, stream.read(&mut buf))
            .await
            .expect("events in time")
            .expect("read");
        assert!(n > 0, "stream closed: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        stamps = seen
            .split("event: meters\ndata: ")
            .skip(1)
            .filter_map(|e| {
                let json: serde_json::Value = serde_json::from_str(e.lines().next()?).ok()?;
                json["meters"][0]["latest"]["ts"]
                    .as_str()
                    .map(str::to_owned)
            })
            .collect();
        stamps.dedup();
    }
    assert!(seen.contains("text/event-stream"), "{seen}");
    agent.stop().await;
    sims.cancel();
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_10_mib_body_is_refused_without_the_process_growing() {
    let sims = CancellationToken::new();
    let tcp = start_sims(&sims).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let config_path = write_token_config(dir.path(), &tcp, port);
    let mut child = spawn_agent(&config_path, None);
    let addr = loopback(port);
    assert_eq!(wait_ready(addr, Duration::from_secs(15)).await.status, 200);
    // Let the agent settle (first polls, first commits) before the baseline.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = rss_kib(child.id());
    let body = vec![b'x'; 10 << 20];
    let bearer = format!("Bearer {TOKEN}");
    for _ in 0..3 {
        // Declared length: refused before any of it is read.
        let r = http_request_refused_early(
            addr,
            "POST",
            "/api/v1/meters",
            &[("Authorization", &bearer)],
            &body,
        )
        .await
        .expect("request");
        assert_json_error(&r, 413, "body");
        // Read endpoints ignore a body; a chunked one is not buffered either.
        let r = http_request_refused_early(
            addr,
            "GET",
            "/api/v1/status",
            &[("Transfer-Encoding", "chunked")],
            &body,
        )
        .await
        .expect("request");
        assert!(r.status < 500, "{}", r.status);
    }
    let after = rss_kib(child.id());
    let grown = after.saturating_sub(before);
    println!("RSS before {before} KiB, after 3 x 2 bodies of 10 MiB: {after} KiB (+{grown} KiB)");
    assert!(grown < 4 * 1024, "the agent grew by {grown} KiB");
    // Still serving.
    assert_eq!(http_get(addr, "/healthz").await.status, 200);
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status}");
    sims.cancel();
}

/// Reads until the server closes the connection (EOF or reset) or `limit` passes;
/// returns what arrived and whether it closed.
async fn read_until_closed(stream: &mut tokio::net::TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let deadline = Instant::now() + limit;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return (got, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (got, true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_half_sent_and_trickled_requests_are_cut_off() {
    let sims = CancellationToken::new();
    let extra = "header_timeout = \"300ms\"\nbody_timeout = \"600ms\"\nidle_timeout = \"500ms\"\n";
    let agent = Agent::start_full("127.0.0.1", Some(TOKEN), None, extra, &sims).await;
    let addr = agent.http;
    wait_ready(addr, Duration::from_secs(10)).await;
    // Each limit is under a second; anything still open after 5 s was never closed.
    let limit = Duration::from_secs(5);

    // A connection that never sends anything.
    let began = Instant::now();
    let mut idle = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (got, closed) = read_until_closed(&mut idle, limit).await;
    assert!(closed, "an idle connection was still open after {limit:?}");
    assert!(got.is_empty());
    println!("idle connection closed after {:?}", began.elapsed());

    // A head sent a byte every 100 ms: it moves, but never ends.
    let began = Instant::now();
    let mut slow = tokio::net::TcpStream::connect(addr).await.expect("connect");
    slow.write_all(format!("GET /api/v1/status HTTP/1.1\r\nHost: {addr}\r\nX-Slow: ").as_bytes())
        .await
        .expect("send");
    let closed = loop {
        if slow.write_all(b"a").await.is_err() {
            break true;
        }
        let mut byte = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(100), slow.read(&mut byte)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            _ => {}
        }
        if began.elapsed() > limit {
            break false;
        }
    };
    assert!(closed, "a head trickling in was still read after {limit:?}");
    println!("trickled head cut off after {:?}", began.elapsed());

    // A keep-alive connection after its answer.
    let mut keep = tokio::net::TcpStream::connect(addr).await.expect("connect");
    keep.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .expect("send");
    let began = Instant::now();
    let (got, closed) = read_until_closed(&mut keep, limit).await;
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    assert!(
        closed,
        "an idle keep-alive connection was still open after {limit:?}"
    );
    println!(
        "idle keep-alive connection closed after {:?}",
        began.elapsed()
    );

    // A body sent a byte every 100 ms: 408 naming the body, then closed.
    let began = Instant::now();
    let mut trickle = tokio::net::TcpStream::connect(addr).await.expect("connect");
    trickle
        .write_all(
            format!(
                "POST /api/v1/ingest HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .expect("send");
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4096];
    let closed = loop {
        if trickle.write_all(b" ").await.is_err() {
            break true;
        }
        match tokio::time::timeout(Duration::from_millis(100), trickle.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
        if began.elapsed() > limit {
            break false;
        }
    };
    assert!(closed, "a body trickling in was still read after {limit:?}");
    let text = String::from_utf8_lossy(&got).into_owned();
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    let body: serde_json::Value =
        serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap_or("")).expect("JSON");
    assert_eq!(body["field"], "body", "{body}");
    println!("trickled body refused (408) after {:?}", began.elapsed());

    // Requests sent at once are still served.
    assert_eq!(http_get(addr, "/api/v1/status").await.status, 200);
    agent.stop().await;
    sims.cancel();
}

/// `LimitNOFILE=` of the packaged service unit.
fn service_nofile() -> u64 {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/edge-agent.service");
    let text = std::fs::read_to_string(&unit).expect("read the service unit");
    text.lines()
        .find_map(|l| l.trim().strip_prefix("LimitNOFILE="))
        .and_then(|v| v.trim().parse().ok())
        .expect("the service unit sets LimitNOFILE= to a number")
}

/// Raises this process's soft RLIMIT_NOFILE to at least `want`; panics saying why
/// when the hard limit is lower.
// `rlim_t` is u64 here but u32 on 32-bit targets: the conversions are needed there.
#[allow(clippy::useless_conversion)]
fn raise_nofile(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    let got = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    assert_eq!(got, 0, "getrlimit: {}", std::io::Error::last_os_error());
    if u64::from(lim.rlim_cur) >= want {
        return;
    }
    assert!(
        u64::from(lim.rlim_max) >= want,
        "this test holds {want} open files, but the hard RLIMIT_NOFILE is {}: raise it (ulimit -Hn)",
        lim.rlim_max
    );
    lim.rlim_cur = want as libc::rlim_t;
    // SAFETY: as above.
    let set = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    assert_eq!(set, 0, "setrlimit: {}", std::io::Error::last_os_error());
}

/// Opens up to `n` connections to `addr`, 100 at a time (each given two seconds: a
/// server that stops accepting leaves them in its backlog, then unanswered), keeping
/// those that were established.
async fn hold_connections(addr: SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut held = Vec::with_capacity(n);
    let mut left = n;
    while left > 0 {
        let batch = left.min(100);
        left -= batch;
        let mut connects = tokio::task::JoinSet::new();
        for _ in 0..batch {
            connects.spawn(tokio::time::timeout(
                Duration::from_secs(2),
                tokio::net::TcpStream::connect(addr),
            ));
        }
        while let Some(done) = connects.join_next().await {
            if let Ok(Ok(Ok(stream))) = done {
                held.push(stream);
            }
        }
    }
    held
}

/// The agent binary as a child with `config`, its RLIMIT_NOFILE set to `nofile`.
/// Writes the config of an agent process with the write token, its HTTP server on
/// `port` and its store in `dir`; returns the file's path.
fn write_token_config(dir: &Path, tcp: &str, port: u16) -> std::path::PathBuf {
    let path = dir.join("config.toml");
    let text = config_text(
        &dir.join("store"),
        tcp,
        &format!("127.0.0.1:{port}"),
        Some(TOKEN),
        None,
        "",
    );
    std::fs::write(&path, text).expect("write config");
    path
}

fn spawn_agent(config: &Path, nofile: Option<u64>) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(agent_binary());
    command
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(n) = nofile {
        // SAFETY: setrlimit is async-signal-safe; the closure allocates nothing.
        unsafe {
            command.pre_exec(move || {
                let lim = libc::rlimit {
                    rlim_cur: n as libc::rlim_t,
                    rlim_max: n as libc::rlim_t,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    command.spawn().expect("start the agent")
}

/// 2,000 idle connections held against the HTTP port and 2,000 against the MQTT port
/// of an agent whose file limit is the service unit's `LimitNOFILE=`: the status still
/// answers within a second, and the meters are still polled and stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_connections_on_both_ports_locks_out_nothing() {
    idle_flood(2_000, 2_000).await;
}

/// Holds `http` idle connections against the HTTP port and `mqtt` against the MQTT
/// port of an agent process at the unit's `LimitNOFILE=`, then checks that the status
/// answers within a second (three times) and that readings keep being stored.
async fn idle_flood(http: usize, mqtt: usize) {
    let budget = service_nofile();
    // The test's own ends of the connections, and its other files.
    raise_nofile((http + mqtt) as u64 + 256);
    let sims = CancellationToken::new();
    let tcp = start_sims(&sims).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let text = config_text(
        &dir.path().join("store"),
        &tcp,
        &format!("127.0.0.1:{port}"),
        None,
        None,
        "",
    );
    let mqtt_addr = Config::from_toml(&text).expect("config parses").mqtt.listen;
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, text).expect("write config");
    let mut child = spawn_agent(&config_path, Some(budget));
    let addr = loopback(port);
    assert_eq!(wait_ready(addr, Duration::from_secs(15)).await.status, 200);
    let records = |s: &serde_json::Value| s["store"]["records"].as_u64().unwrap_or(0);
    let before = records(&http_get(addr, "/api/v1/status").await.json());

    let began = Instant::now();
    let http_flood = hold_connections(addr, http).await;
    let mqtt_flood = hold_connections(mqtt_addr, mqtt).await;
    println!(
        "held {} HTTP and {} MQTT connections after {:?} (agent's LimitNOFILE {budget})",
        http_flood.len(),
        mqtt_flood.len(),
        began.elapsed()
    );
    for round in 0..3 {
        let asked = Instant::now();
        let status = tokio::time::timeout(Duration::from_secs(1), http_get(addr, "/api/v1/status"))
            .await
            .unwrap_or_else(|_| panic!("round {round}: /api/v1/status took over a second"));
        assert_eq!(status.status, 200, "{}", status.text());
        println!("status answered in {:?}", asked.elapsed());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Polling goes on: more readings are stored while the connections are held.
    let now = poll_until(Duration::from_secs(10), || async {
        let now = records(&http_get(addr, "/api/v1/status").await.json());
        (now, now >= before + 10)
    })
    .await;
    assert!(
        now >= before + 10,
        "readings stopped being stored: {before} -> {now}"
    );
    println!("records {before} -> {now} under the flood");
    if mqtt > 0 {
        // The broker is not locked out for longer than a connection may wait for its
        // CONNECT (5 s in broker-config/rumqttd.toml): a real client gets in and is
        // handed the retained status while the flood's sockets are still held.
        let asked = Instant::now();
        let mut client =
            Subscriber::connect(mqtt_addr, "edge/http-gw/status", Duration::from_secs(15)).await;
        let status = client
            .next(Duration::from_secs(15))
            .await
            .expect("an MQTT client gets in and receives the retained status under the flood");
        assert_eq!(status.payload, b"online");
        println!("MQTT client served after {:?}", asked.elapsed());
    }
    drop(http_flood);
    drop(mqtt_flood);
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status}");
    sims.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_edges_are_consistent() {
    let sims = CancellationToken::new();
    let agent = Agent::start("127.0.0.1", Some(TOKEN), &sims).await;
    let addr = agent.http;
    wait_ready(addr, Duration::from_secs(10)).await;
    let bearer = format!("Bearer {TOKEN}");

    // A repeated parameter is refused, naming it, and nothing of the batch is stored.
    let batch = br#"{"meter":"twice","unit":"W","kind":"power","points":[{"ts":"2024-01-01T00:00:00Z","value":1}]}"#;
    for query in ["dry_run=true&dry_run=false", "dry_run=false&dry_run=false"] {
        let r = http_request(
            addr,
            "POST",
            &format!("/api/v1/ingest?{query}"),
            &[
                ("Authorization", &bearer),
                ("Content-Type", "application/json"),
            ],
            batch,
        )
        .await
        .expect("request");
        assert_json_error(&r, 400, "dry_run");
    }
    let r = http_get(addr, "/api/v1/meters/twice/readings").await;
    assert_json_error(&r, 404, "id");

    // An unknown parameter is refused on every endpoint.
    for path in [
        "/",
        "/healthz",
        "/readyz",
        "/metrics",
        "/api/v1/status",
        "/api/v1/meters",
        "/api/v1/live",
        "/api/v1/openapi.json",
        "/api/v1/clusters",
        "/api/v1/events",
        "/api/v1/top",
        "/api/v1/meters/main/readings",
    ] {
        let r = http_get(addr, &format!("{path}?bogus=1")).await;
        assert_json_error(&r, 400, "bogus");
        let r = http_get(addr, &format!("{path}?bogus=1&bogus=2")).await;
        assert_json_error(&r, 400, "bogus");
    }
    let r = http_request(
        addr,
        "POST",
        "/api/v1/ingest?bogus=1",
        &[
            ("Authorization", &bearer),
            ("Content-Type", "application/json"),
        ],
        batch,
    )
    .await
    .expect("request");
    assert_json_error(&r, 400, "bogus");

    // Two Host headers, or an absolute target naming another host: 421.
    let raw = |text: String| async move {
        edge_agent_tests::http_raw(addr, text.as_bytes())
            .await
            .expect("answer")
    };
    let r = raw(format!(
        "GET /api/v1/status HTTP/1.1\r\nHost: {addr}\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
    ))
    .await;
    assert_json_error(&r, 421, "Host");
    let r = raw(format!(
        "GET /api/v1/status HTTP/1.1\r\nHost: {addr}\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    ))
    .await;
    assert_json_error(&r, 421, "Host");
    let r = raw(format!(
        "GET http://evil.example/api/v1/status HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    ))
    .await;
    assert_json_error(&r, 421, "Host");
    let r = raw(format!(
        "GET http://{addr}/api/v1/status HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    ))
    .await;
    assert_eq!(r.status, 200, "{}", r.text());

    // What hyper refuses before the router sees it still answers JSON naming the fault.
    let r = raw(format!(
        "POST /api/v1/ingest HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 12abc\r\n\r\n"
    ))
    .await;
    assert_json_error(&r, 400, "Content-Length");
    let r = raw(format!(
        "POST /api/v1/ingest HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"
    ))
    .await;
    assert_json_error(&r, 400, "Content-Length");
    let many: String = (0..150).map(|i| format!("X-H{i}: {i}\r\n")).collect();
    let r = raw(format!(
        "GET /healthz HTTP/1.1\r\nHost: {addr}\r\n{many}\r\n"
    ))
    .await;
    assert_json_error(&r, 431, "headers");
    let r = raw(format!(
        "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nX-Bad: a\u{1}b\r\n\r\n"
    ))
    .await;
    assert_json_error(&r, 400, "X-Bad");
    let r = raw("GET /healthz\r\n\r\n".to_string()).await;
    assert_json_error(&r, 400, "request line");
    // A chunked body whose framing breaks reaches the handler, which answers JSON.
    let r = raw(format!(
        "POST /api/v1/ingest?dry_run=true HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n[{{}}]\r\nzz\r\n"
    ))
    .await;
    assert_json_error(&r, 400, "body");

    agent.stop().await;
    sims.cancel();
}

/// The agent binary of a memory or flood test: `EDGE_AGENT_UNDER_TEST` names another
/// build (to measure an older one the same way), else this one.
fn agent_binary() -> String {
    std::env::var("EDGE_AGENT_UNDER_TEST")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_edge-agent-under-test").to_string())
}

/// Eight concurrent readings queries over a week of 10-second readings, each asking
/// for up to 100,000 readings at once: the agent's memory stays bounded (answers are
/// capped in bytes and store queries take turns), and the whole week still comes back
/// page by page through `next_start`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_week_long_readings_queries_stay_small() {
    const STEP_MS: i64 = 10_000;
    const DAY_MS: i64 = 86_400_000;
    let sims = CancellationToken::new();
    let tcp = start_sims(&sims).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let config_path = write_token_config(dir.path(), &tcp, port);
    let mut child = spawn_agent(&config_path, None);
    let addr = loopback(port);
    assert_eq!(wait_ready(addr, Duration::from_secs(15)).await.status, 200);

    // A week of power readings of meter `week`, pushed a day per batch.
    let end = edge_agent::model::now_ms() / STEP_MS * STEP_MS - 60_000;
    let start = end - 7 * DAY_MS;
    let bearer = format!("Bearer {TOKEN}");
    let mut total = 0;
    for day in 0..7 {
        let from = start + day * DAY_MS;
        let points: Vec<String> = (from..from + DAY_MS)
            .step_by(STEP_MS as usize)
            .map(|ts| format!("{{\"ts\":{ts},\"value\":{}}}", 1000 + ts / STEP_MS % 500))
            .collect();
        total += points.len();
        let body = format!(
            "{{\"meter\":\"week\",\"unit\":\"W\",\"kind\":\"power\",\"points\":[{}]}}",
            points.join(",")
        );
        let r = http_request(
            addr,
            "POST",
            "/api/v1/ingest",
            &[
                ("Authorization", &bearer),
                ("Content-Type", "application/json"),
            ],
            body.as_bytes(),
        )
        .await
        .expect("push");
        assert_eq!(r.status, 200, "{}", r.text());
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = child.id();
    let before = rss_kib(pid);
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(before));
    let sampling = CancellationToken::new();
    let sampler = {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        tokio::spawn(async move {
            while !sampling.is_cancelled() {
                if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                    if let Some(kib) = status
                        .lines()
                        .find_map(|l| l.strip_prefix("VmRSS:"))
                        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                    {
                        peak.fetch_max(kib, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let week = format!(
        "start={}&end={}",
        edge_agent::broker::rfc3339_ms(start),
        edge_agent::broker::rfc3339_ms(end)
    );
    let began = Instant::now();
    let mut queries = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let path = format!("/api/v1/meters/week/readings?{week}&limit=100000");
        queries.spawn(async move { http_get(addr, &path).await });
    }
    let mut answered = 0;
    let mut refused = 0;
    while let Some(r) = queries.join_next().await {
        let r = r.expect("query task");
        match r.status {
            200 => {
                let json = r.json();
                assert!(json["count"].as_u64() > Some(0), "{json}");
                answered += 1;
            }
            503 => {
                assert!(r.header("retry-after").is_some(), "{:?}", r.headers);
                refused += 1;
            }
            other => panic!("readings answered {other}: {}", r.text()),
        }
    }
    let took = began.elapsed();
    sampling.cancel();
    sampler.await.expect("sampler");
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    let grown = peak.saturating_sub(before);
    println!(
        "8 concurrent week-long readings queries ({total} readings stored): {answered} answered, \
{refused} told to retry, in {took:?}; RSS {before} KiB before, peak {peak} KiB (+{grown} KiB)"
    );

    // Page by page, the whole week comes back.
    let mut next = edge_agent::broker::rfc3339_ms(start);
    let mut got = 0;
    let mut pages = 0;
    loop {
        let path = format!(
            "/api/v1/meters/week/readings?start={next}&end={}&limit=100000",
            edge_agent::broker::rfc3339_ms(end)
        );
        let r = http_get(addr, &path).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let json = r.json();
        got += json["count"].as_u64().expect("count");
        pages += 1;
        match json["next_start"].as_str() {
            Some(n) => next = n.to_string(),
            None => break,
        }
    }
    println!("the week in {pages} pages");
    assert_eq!(got, total as u64);
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status}");
    sims.cancel();
    assert!(
        grown < 48 * 1024,
        "eight readings queries grew the agent by {grown} KiB"
    );
}

/// A connection that got one keep-alive answer to `GET /healthz` and is now idle.
async fn answered_keep_alive(addr: SocketAddr) -> tokio::net::TcpStream {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .expect("send");
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    let answered = |seen: &[u8]| {
        let text = String::from_utf8_lossy(seen);
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            return false;
        };
        let length = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().to_string())
            })
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
        body.len() >= length
    };
    while !answered(&seen) {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("answer in time")
            .expect("read");
        assert!(
            n > 0,
            "closed before the answer: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(
        seen.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&seen)
    );
    stream
}

/// With `max_connections = 2`: a new connection closes the one idle the longest and
/// is served; when both are busy (live streams), it gets 503 naming the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_max_connections_the_longest_idle_makes_room() {
    let sims = CancellationToken::new();
    let agent = Agent::start_full("127.0.0.1", None, None, "max_connections = 2\n", &sims).await;
    let addr = agent.http;
    wait_ready(addr, Duration::from_secs(10)).await;
    // Each connection is answered once (so the server holds it), then idles.
    let mut oldest = answered_keep_alive(addr).await;
    let _newer = answered_keep_alive(addr).await;
    assert_eq!(http_get(addr, "/healthz").await.status, 200);
    let (_, closed) = read_until_closed(&mut oldest, Duration::from_secs(5)).await;
    assert!(
        closed,
        "the longest idle connection was not closed for the new one"
    );

    // Two live streams keep both connections busy.
    let mut streams = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(format!("GET /api/v1/live HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .expect("send");
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("stream head in time")
            .expect("read");
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        streams.push(s);
    }
    // The 503 is written as the connection is accepted, before its request is read;
    // a client that sends only then (hyper's) may see it as an unasked-for answer, so
    // the request goes out as raw bytes.
    let r = http_raw(
        addr,
        format!("GET /api/v1/status HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes(),
    )
    .await
    .expect("an answer");
    assert_json_error(&r, 503, "connection");
    assert_eq!(r.header("retry-after"), Some("1"));
    drop(streams);
    // Until the server has seen the streams go, a new connection may be refused
    // before its request is read: that is not yet room, so it is polled again.
    let healthz = poll_until(Duration::from_secs(5), || async {
        let r = http_request(addr, "GET", "/healthz", &[], &[]).await;
        let status = r.map_or(0, |r| r.status);
        (status, status == 200)
    })
    .await;
    assert_eq!(healthz, 200, "no room after the streams ended");
    agent.stop().await;
    sims.cancel();
}
