//! The status page in a real browser: Debian's headless Chromium, driven over the
//! WebDriver protocol by chromedriver through the `fantoccini` client, loads the page
//! from a running demo. The test reads the rendered DOM: every meter's values, bars in the energy charts, a value
//! that changes live without a reload. It saves a PNG screenshot and prints its path.
//!
//! Needs `chromium` and `chromium-driver` (`.ci/run` installs them).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use edge_agent_tests::{free_port, http_request, loopback, poll_until, wait_ready};
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Kills the child when the test ends, however it ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A WebDriver session on a local chromedriver, through fantoccini.
struct Browser {
    client: fantoccini::Client,
}

impl Browser {
    async fn start(driver: SocketAddr, profile: &std::path::Path) -> Browser {
        // The flags keep Chromium off the network it would otherwise try to reach
        // (updates, sync, QUIC probes), which a closed gateway LAN refuses.
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1200,1600",
            &format!("--user-data-dir={}", profile.display()),
        ];
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
        });
        let Value::Object(caps) = caps else {
            unreachable!("a json! object literal is an object")
        };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = fantoccini::ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://{driver}"))
            .await
            .unwrap_or_else(|e| panic!("a chromedriver session: {e}"));
        Browser { client }
    }

    async fn open(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("open {url}: {e}"));
    }

    /// Runs `script` (a function body) in the page and returns its value.
    async fn eval(&self, script: &str) -> Value {
        self.client
            .execute(script, Vec::new())
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Evaluates `script` until it returns something other than null/false.
    async fn wait_for(&self, script: &str, limit: Duration, what: &str) -> Value {
        let seen = |v: &Value| !(v.is_null() || *v == json!(false));
        let v = poll_until(limit, || async {
            let v = self.eval(script).await;
            let done = seen(&v);
            (v, done)
        })
        .await;
        assert!(seen(&v), "{what}: not seen within {limit:?}");
        v
    }

    async fn screenshot(&self) -> Vec<u8> {
        self.client
            .screenshot()
            .await
            .unwrap_or_else(|e| panic!("screenshot: {e}"))
    }

    async fn quit(self) {
        self.client
            .close()
            .await
            .unwrap_or_else(|e| panic!("end the session: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_values_bars_and_live_updates_in_a_real_browser() {
    for tool in [CHROMIUM, CHROMEDRIVER] {
        assert!(
            std::path::Path::new(tool).exists(),
            "{tool} is missing: install Debian's chromium and chromium-driver (.ci/run does)"
        );
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let http = loopback(free_port());
    let _demo = Reaped(
        Command::new(env!("CARGO_BIN_EXE_edge-agent-under-test"))
            .arg("demo")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--mqtt-listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--upstream-listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--http-listen", &http.to_string()])
            .args(["--interval", "500ms"])
            .args(["--history-days", "2"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the demo"),
    );
    wait_ready(http, Duration::from_secs(60)).await;

    let driver = loopback(free_port());
    let _chromedriver = Reaped(
        Command::new(CHROMEDRIVER)
            .arg(format!("--port={}", driver.port()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver"),
    );
    // chromedriver answers /status once it listens.
    let up = poll_until(Duration::from_secs(20), || async {
        let up = http_request(driver, "GET", "/status", &[], b"")
            .await
            .is_ok();
        (up, up)
    })
    .await;
    assert!(up, "chromedriver did not start");
    let browser = Browser::start(driver, &dir.path().join("chromium-profile")).await;
    browser.open(&format!("http://{http}/")).await;

    // Every simulated meter shows values with units.
    let meters = ["main", "pv", "heatpump", "garage"];
    for meter in meters {
        let script = format!(
            "const s = document.querySelector('section.meter[data-meter=\"{meter}\"]');
             if (!s) return null;
             const v = [...s.querySelectorAll('td.v')].map((td) => td.textContent.trim());
             return v.length && v.every((t) => /^-?[0-9]/.test(t)) ? v : null;"
        );
        let values = browser
            .wait_for(
                &script,
                Duration::from_secs(30),
                &format!("values of {meter}"),
            )
            .await;
        println!("{meter}: {values}");
        // For people: at most 3 decimals, the exact value in the cell's title.
        let shown = browser
            .eval(&format!(
                "return [...document.querySelectorAll('section.meter[data-meter=\"{meter}\"] td.v')]
                   .map((td) => [td.textContent.trim(), td.title]);"
            ))
            .await;
        for pair in shown.as_array().expect("cells") {
            let (text, title) = (
                pair[0].as_str().unwrap_or(""),
                pair[1].as_str().unwrap_or(""),
            );
            let number = text.split(' ').next().unwrap_or("");
            let decimals = number.split_once('.').map_or(0, |(_, d)| d.len());
            assert!(decimals <= 3, "{meter}: {text}");
            assert!(!title.is_empty(), "{meter}: {text} has no exact value");
        }
    }

    // The examples, formatted by the page itself.
    let formatted = browser
        .eval(
            "return [num(0.9419719, ''), num(531.13873, 'W'), num(12345.6, 'W'), num(null, 'V')];",
        )
        .await;
    assert_eq!(formatted, json!(["0.942", "531.1 W", "12.35 kW", "–"]));

    // Counts since the start say so, with the time.
    let since = browser
        .wait_for(
            "const t = document.getElementById('up-since').textContent;
             return t.startsWith('since start (') ? t : null;",
            Duration::from_secs(20),
            "delivered since start",
        )
        .await;
    println!("upstream: {since}");

    // Before the cluster answer is in, the card says it is loading, not that no
    // clusters exist.
    let loading = browser
        .eval("const was = slowLoaded; slowLoaded = false; const t = clustersHtml(undefined); slowLoaded = was; return t;")
        .await;
    assert!(
        loading
            .as_str()
            .is_some_and(|t| t.contains("loading…") && !t.contains("not computed")),
        "{loading}"
    );

    // A meter that does not answer: its card says why and when it is tried again.
    let failure = browser
        .eval(
            "const i = status.meters.findIndex((m) => m.id === 'main');
             status.meters[i] = Object.assign({}, status.meters[i], {
               state: 'backing_off',
               last_error: 'timeout connecting to 127.0.0.1:1502',
               last_error_at: new Date(Date.now() - 4000).toISOString(),
               next_retry: new Date(Date.now() + 30000).toISOString() });
             render();
             const f = document.querySelector('section.meter[data-meter=\"main\"] .failure');
             return f ? f.textContent : null;",
        )
        .await;
    let failure = failure.as_str().unwrap_or_default().to_string();
    assert!(
        failure.contains("timeout connecting to 127.0.0.1:1502") && failure.contains("next try in"),
        "{failure}"
    );

    // The charts have bars (the demo's history fills the last 24 hours).
    let bars = browser
        .wait_for(
            "const n = document.querySelectorAll('svg.chart rect.bar').length;
             return n > 0 ? n : null;",
            Duration::from_secs(30),
            "chart bars",
        )
        .await;
    println!("chart bars: {bars}");
    assert!(bars.as_u64().unwrap_or(0) >= 4 * 48, "bars: {bars}");
    for meter in meters {
        let n = browser
            .eval(&format!(
                "return document.querySelectorAll('section.meter[data-meter=\"{meter}\"] svg.chart rect.bar').length;"
            ))
            .await;
        assert!(n.as_u64().unwrap_or(0) > 0, "{meter} has no bars");
    }

    // A value changes live, in the same document (a marker set now survives).
    let first = browser
        .eval(
            "window.__sameDocument = true;
             const td = document.querySelector('section.meter[data-meter=\"main\"] td.v');
             return td ? td.title : null;",
        )
        .await;
    let changed = browser
        .wait_for(
            &format!(
                "const td = document.querySelector('section.meter[data-meter=\"main\"] td.v');
                 return td && td.title !== {first} && window.__sameDocument === true
                   ? td.title : null;"
            ),
            Duration::from_secs(20),
            "a live change of main's first value",
        )
        .await;
    println!("main's first value went from {first} to {changed} without a reload");
    let conn = browser
        .eval("return document.getElementById('conn').textContent;")
        .await;
    assert_eq!(conn, json!("live"), "the page follows the live stream");

    // Screenshot, kept beside the build for a person to look at.
    let png = browser.screenshot().await;
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    std::fs::write(&path, &png).expect("write the screenshot");
    println!("screenshot: {} ({} bytes)", path.display(), png.len());
    browser.quit().await;
}
