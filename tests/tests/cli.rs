//! The command line as an operator uses it: `generate-config`, `check-config`.

use std::process::Command;

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_edge-agent-under-test"))
}

fn check(text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text).expect("write config");
    let out = agent()
        .arg("check-config")
        .arg(&path)
        .output()
        .expect("run check-config");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn generated() -> String {
    let out = agent()
        .arg("generate-config")
        .output()
        .expect("run generate-config");
    assert!(out.status.success());
    String::from_utf8(out.stdout).expect("utf-8 config")
}

#[test]
fn generated_config_passes_check_config() {
    let text = generated();
    assert!(text.contains("# "), "the default is commented");
    let (ok, stderr) = check(&text);
    assert!(ok, "generated config rejected: {stderr}");
}

#[test]
fn check_config_names_each_bad_field() {
    let base = generated();
    let cases: Vec<(String, &str)> = vec![
        (
            format!("{base}\nsurprise = true\n"),
            "unknown field `surprise`",
        ),
        (
            base.replace("unit_id = 1                      # 1..=247", "unit_id = 0"),
            "meters[main].unit_id: 0 is outside 1..=247",
        ),
        (
            base.replace("id = \"heatpump\"", "id = \"main\""),
            "meters[main].id: duplicate meter id",
        ),
        (
            base.replace("interval = \"10s\"", "interval = \"0s\""),
            "interval: must be greater than zero",
        ),
        (
            base.replace("bus = \"lan\"", "bus = \"nowhere\""),
            "meters[pv].bus: no bus with id `nowhere`",
        ),
        (
            base.replace("address = \"192.0.2.10:502\"", "port = \"/dev/ttyUSB0\"")
                .replace("type = \"tcp\"", "type = \"rtu\""),
            "buses[lan].port: serial port /dev/ttyUSB0 is already used by bus `rs485`",
        ),
        (
            base.replace("listen = \"127.0.0.1:1883\"", "listen = \"0.0.0.0:1883\""),
            "mqtt.listen: 0.0.0.0:1883 is not a loopback address",
        ),
    ];
    for (text, expected) in cases {
        let (ok, stderr) = check(&text);
        assert!(!ok, "accepted a config that should fail with `{expected}`");
        assert!(
            stderr.contains(expected),
            "expected `{expected}` in:\n{stderr}"
        );
    }
}

#[test]
fn check_config_reports_a_missing_file() {
    let out = agent()
        .args(["check-config", "/nonexistent/edge-agent.toml"])
        .output()
        .expect("run check-config");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/edge-agent.toml"));
}

#[test]
fn check_config_reports_every_error_of_a_file_with_its_rule() {
    let base = generated();
    let text = base
        .replace(
            "unit_id = 1                      # 1..=247",
            "unit_id = 300",
        )
        .replace("level = \"info\"", "level = \"edge_agent=loud\"")
        .replace("grace = \"2m\"", "grace = \"0s\"")
        .replace(
            "energy_quantity = \"energy_import\"",
            "energy_quantity = \"energy_bogus\"\nsurprise = 1",
        )
        .replace("gateway_id = \"gw-01\"", "gateway_id = \"gw 01\"");
    let (ok, stderr) = check(&text);
    assert!(!ok, "accepted a config with five errors");
    for expected in [
        "meters[main].unit_id: 300 is outside 1..=247",
        "meters[main].surprise: unknown field `surprise`",
        "log.level: `edge_agent=loud` is not a log filter",
        "analytics.grace: must be greater than zero",
        "gateway_id: `gw 01` must be 1-64 characters",
    ] {
        assert!(
            stderr.contains(expected),
            "expected `{expected}` in:\n{stderr}"
        );
    }
    assert!(!stderr.contains("expected u8"), "rules in words:\n{stderr}");
}

#[test]
fn run_checks_the_broker_file_before_it_creates_the_store() {
    let dir = tempfile::tempdir().expect("temp dir");
    let big = dir.path().join("rumqttd.toml");
    std::fs::write(&big, "#".repeat(65 << 10)).expect("write broker file");
    let store = dir.path().join("store");
    let text = format!(
        "gateway_id = \"gw\"\n[store]\npath = \"{}\"\n[mqtt]\nlisten = \"127.0.0.1:{}\"\nbroker_config = \"{}\"\n[http]\nlisten = \"127.0.0.1:{}\"\n",
        store.display(),
        edge_agent_tests::free_port(),
        big.display(),
        edge_agent_tests::free_port(),
    );
    let path = dir.path().join("config.toml");
    std::fs::write(&path, &text).expect("write config");
    let out = agent()
        .args(["run", "-c"])
        .arg(&path)
        .output()
        .expect("run the agent");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("mqtt.broker_config") && stderr.contains("larger than 64 KiB"),
        "{stderr}"
    );
    assert!(!store.exists(), "the store was created before the check");

    // The library entry point checks the same before it opens the store.
    let config = edge_agent::config::Config::from_toml(&text).expect("parses");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let result = runtime.block_on(edge_agent::run(
        config,
        tokio_util::sync::CancellationToken::new(),
    ));
    let e = format!("{:#}", result.expect_err("refused"));
    assert!(e.contains("mqtt.broker_config"), "{e}");
    assert!(!store.exists(), "the store was created before the check");
}

/// Acceptance (issue 17, point 1): `edge-agent profiles` lists at least 22 meter
/// families with manufacturer, model, bus types and quantities, and a config may use
/// every profile it lists.
#[test]
fn profiles_lists_the_families_a_config_can_use() {
    let out = agent().arg("profiles").output().expect("run profiles");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("header").split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "MANUFACTURER", "MODEL", "BUSES", "QUANTITIES"]
    );
    let names: Vec<&str> = lines
        .map(|l| {
            assert!(l.contains("rtu") || l.contains("tcp"), "bus types: {l}");
            assert!(l.contains("power"), "quantities: {l}");
            l.split_whitespace().next().expect("a name")
        })
        .collect();
    assert!(names.len() >= 26, "{} families:\n{text}", names.len());
    for expected in [
        "sdm72dm",
        "abb_b23",
        "cg_em24",
        "janitza_umg96rm",
        "iem3155",
        "saia_ale3",
        "socomec_countis_e34_e44",
    ] {
        assert!(names.contains(&expected), "{expected} missing:\n{text}");
    }
    let mut config = String::from(
        "gateway_id = \"gw\"\n[[buses]]\nid = \"lan\"\ntype = \"tcp\"\naddress = \"127.0.0.1:502\"\n",
    );
    for (i, name) in names.iter().enumerate() {
        config.push_str(&format!(
            "[[meters]]\nid = \"m{i}\"\nbus = \"lan\"\nunit_id = {}\nprofile = \"{name}\"\n",
            i + 1
        ));
    }
    let (ok, stderr) = check(&config);
    assert!(ok, "a listed profile is rejected: {stderr}");
}

/// Acceptance (issue 17, point 2): `edge-agent scan --bus ID` lists the unit ids that
/// answer on a configured bus and the SunSpec models each has, against simulated
/// devices on Modbus TCP (a SunSpec inverter at unit 1, an SDM630 at unit 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_lists_answering_units_and_their_sunspec_models() {
    use edge_agent::sim::sunspec::{device, SimIdentity};
    use edge_agent::sim::{serve_tcp, SimBus, SimMeter};
    use std::sync::Arc;

    let identity = SimIdentity {
        manufacturer: "Acme Solar",
        model: "AS-5000TL",
        version: "2.1",
        serial: "INV0001",
    };
    let sdm = edge_agent::acquire::profile::builtin("sdm630").expect("sdm630");
    let bus = Arc::new(
        SimBus::new()
            .with_meter(1, device(40000, &identity, &[103, 120, 203], 1))
            .with_meter(2, SimMeter::new(Arc::new(sdm), 2)),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(serve_tcp(listener, bus, shutdown.clone()));

    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("config.toml");
    std::fs::write(
        &path,
        format!(
            "gateway_id = \"gw\"\n[[buses]]\nid = \"lan\"\ntype = \"tcp\"\naddress = \"{addr}\"\n"
        ),
    )
    .expect("write config");
    let config = path.to_str().expect("utf-8 path").to_string();
    let out = tokio::task::spawn_blocking(move || {
        agent()
            .args(["scan", "-c", &config, "--bus", "lan", "--units", "1-4"])
            .output()
    })
    .await
    .expect("joins")
    .expect("run scan");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[..2],
        [
            "unit 1: SunSpec at 40000: Acme Solar AS-5000TL serial INV0001; models 1 (66), 103 (50), 120 (26), 203 (105)",
            "unit 2: answers; no SunSpec marker `SunS` at holding register 40000, 0 or 50000",
        ],
        "{text}"
    );
    assert!(
        lines[2].starts_with("bus lan: 2 of units 1-4 answered"),
        "{text}"
    );
    assert_eq!(lines.len(), 3, "{text}");

    // An unknown bus fails and names the flag.
    let out = agent()
        .args([
            "scan",
            "-c",
            path.to_str().expect("utf-8"),
            "--bus",
            "rs485",
        ])
        .output()
        .expect("run scan");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--bus: no bus `rs485`"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    shutdown.cancel();
    let _ = server.await;
}
