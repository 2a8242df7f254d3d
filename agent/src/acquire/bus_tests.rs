//! Bus task tests against a real Modbus TCP server with a register image.
//!
//! The tests about timing (intervals, timeouts, back-off, poll rates) run on paused
//! tokio time: the clock moves only when every task waits, so their figures are the
//! same on any machine (under emulation too). The servers are tasks of the same
//! runtime on loopback TCP, whose replies are readable as soon as they are written.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};
use tokio_modbus::prelude::ExceptionCode;
use tokio_util::sync::CancellationToken;

use super::decode::encode;
use super::profile::builtin;
use super::test_server::{Image, RtuTestServer, TestServer, Unit};
use super::{plan_meters, run_bus, MeterPlan, MeterState};
use crate::acquire::config::{BusConfig, DataType, WordOrder};
use crate::config::Config;
use crate::model::{Invalid, Reading};

/// Distinct, awkward f32 values for the SDM630 registers, within their ranges.
fn sdm630_values() -> Vec<(String, f32)> {
    let p = builtin("sdm630").expect("sdm630");
    let served = [
        230.1f32,
        229.97,
        231.000_01,
        0.1,
        12.345_678,
        7.0e-3,
        -1234.567,
        3.4e3,
        0.0,
        -0.0,
        49.99,
        123_456.79,
        0.001_234_5,
        98_765.43,
    ];
    p.registers
        .iter()
        .zip(served)
        .map(|(r, v)| (r.name.clone(), v))
        .collect()
}

fn sdm630_image() -> Image {
    let p = builtin("sdm630").expect("sdm630");
    let mut input = vec![0u16; 0x200];
    for (r, (_, v)) in p.registers.iter().zip(sdm630_values()) {
        let words = encode(DataType::F32, WordOrder::HighFirst, f64::from(v));
        let at = usize::from(r.address);
        input[at..at + words.len()].copy_from_slice(&words);
    }
    Image {
        input,
        holding: vec![0u16; 0x100],
    }
}

/// A config with one TCP bus and SDM630 meters `(id, unit id, interval)`.
fn tcp_config(address: &str, timeout: &str, meters: &[(&str, u8, &str)]) -> Config {
    let mut text = format!(
        "gateway_id = \"gw\"\n[[buses]]\nid = \"lan\"\ntype = \"tcp\"\naddress = \"{address}\"\ntimeout = \"{timeout}\"\nframe_gap = \"2ms\"\n"
    );
    for (id, unit, interval) in meters {
        text.push_str(&format!(
            "[[meters]]\nid = \"{id}\"\nbus = \"lan\"\nunit_id = {unit}\nprofile = \"sdm630\"\ninterval = \"{interval}\"\n"
        ));
    }
    let config = Config::from_toml(&text).expect("config parses");
    config.validate().expect("config is valid");
    config
}

fn one_bus(config: &Config) -> (BusConfig, Vec<MeterPlan>) {
    let mut buses = plan_meters(config).expect("plans");
    assert_eq!(buses.len(), 1);
    buses.remove(0)
}

struct Running {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    readings: mpsc::Receiver<Reading>,
}

fn start(bus: BusConfig, meters: Vec<MeterPlan>) -> Running {
    let (tx, rx) = mpsc::channel(1024);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run_bus(bus, meters, tx, shutdown.clone()));
    Running {
        shutdown,
        task,
        readings: rx,
    }
}

impl Running {
    /// Cancels the task and checks that it returns promptly.
    async fn stop(mut self) -> Vec<Reading> {
        self.shutdown.cancel();
        timeout(Duration::from_millis(200), self.task)
            .await
            .expect("bus task returns promptly after cancel")
            .expect("bus task does not panic");
        let mut rest = Vec::new();
        while let Ok(r) = self.readings.try_recv() {
            rest.push(r);
        }
        rest
    }
}

#[tokio::test]
async fn tcp_poll_returns_the_served_f32s_bit_exactly() {
    let server = TestServer::start(sdm630_image(), &[(1, Unit::Serve)]).await;
    let config = tcp_config(&server.addr.to_string(), "500ms", &[("main", 1, "10s")]);
    let (bus, meters) = one_bus(&config);
    let blocks = meters[0].blocks.len();
    assert_eq!(blocks, 4, "SDM630 profile reads in four blocks");
    let stats = meters[0].stats.clone();
    let before = crate::model::now_ms();
    let mut run = start(bus, meters);
    let reading = timeout(Duration::from_secs(5), run.readings.recv())
        .await
        .expect("a reading within 5 s")
        .expect("channel open");
    run.stop().await;

    assert_eq!(reading.meter, "main");
    assert!(reading.ts_ms >= before && reading.ts_ms <= crate::model::now_ms());
    let expected = sdm630_values();
    assert_eq!(reading.values.len(), expected.len());
    for (v, (name, served)) in reading.values.iter().zip(&expected) {
        assert_eq!(&v.quantity, name);
        assert_eq!(v.invalid, None, "{name}");
        let got = v.value.expect("a number");
        // Bit-exact: the f64 is the served f32, widened.
        assert_eq!(got.to_bits(), f64::from(*served).to_bits(), "{name}");
    }
    assert_eq!(server.requests(1), blocks, "one request per block");
    let snap = stats.snapshot();
    assert_eq!(snap.successes, 1);
    assert_eq!(snap.state, MeterState::Ok);
    // The reading is stamped when the last reply arrived, after the poll started.
    assert_eq!(snap.last_success_ms, Some(reading.ts_ms));
    assert!(snap
        .last_poll_ms
        .is_some_and(|started| started <= reading.ts_ms));
    assert!(snap.last_latency_ms.is_some());
}

#[tokio::test]
async fn nan_in_the_image_is_flagged_not_stored_as_a_number() {
    let mut image = sdm630_image();
    // power_l1 at 0x0C: a NaN; frequency at 0x46: 80 Hz, outside 40..=70.
    image.input[0x0C..0x0E].copy_from_slice(&encode(DataType::F32, WordOrder::HighFirst, f64::NAN));
    image.input[0x46..0x48].copy_from_slice(&encode(DataType::F32, WordOrder::HighFirst, 80.0));
    let server = TestServer::start(image, &[(1, Unit::Serve)]).await;
    let config = tcp_config(&server.addr.to_string(), "500ms", &[("main", 1, "10s")]);
    let (bus, meters) = one_bus(&config);
    let stats = meters[0].stats.clone();
    let mut run = start(bus, meters);
    let reading = timeout(Duration::from_secs(5), run.readings.recv())
        .await
        .expect("a reading")
        .expect("channel open");
    run.stop().await;
    let by_name: HashMap<&str, _> = reading
        .values
        .iter()
        .map(|v| (v.quantity.as_str(), v))
        .collect();
    assert_eq!(by_name["power_l1"].value, None);
    assert_eq!(by_name["power_l1"].invalid, Some(Invalid::Nan));
    assert_eq!(by_name["frequency"].value, None);
    assert_eq!(by_name["frequency"].invalid, Some(Invalid::OutOfRange));
    assert_eq!(by_name["voltage_l1"].value, Some(f64::from(230.1f32)));
    assert_eq!(stats.snapshot().invalid_values, 2);
}

#[tokio::test(start_paused = true)]
async fn failures_are_counted_by_kind() {
    let server = TestServer::start(
        sdm630_image(),
        &[
            (1, Unit::Serve),
            (2, Unit::Exception(ExceptionCode::IllegalDataAddress)),
            (4, Unit::Short),
            // Unit 3 is not served: it never answers.
        ],
    )
    .await;
    let config = tcp_config(
        &server.addr.to_string(),
        "100ms",
        &[
            ("ok", 1, "100ms"),
            ("exception", 2, "100ms"),
            ("silent", 3, "100ms"),
            ("short", 4, "100ms"),
        ],
    );
    let (bus, meters) = one_bus(&config);
    let stats: Vec<_> = meters.iter().map(|m| m.stats.clone()).collect();
    let run = start(bus, meters);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let readings = run.stop().await;
    let snaps: Vec<_> = stats.iter().map(|s| s.snapshot()).collect();
    let [ok, exc, silent, short] = &snaps[..] else {
        panic!("four meters");
    };
    let counts = |s: &super::MeterStatsSnapshot| {
        (
            s.timeouts,
            s.exceptions,
            s.transport_errors,
            s.decode_errors,
        )
    };
    assert!(ok.successes >= 5, "{ok:?}");
    assert_eq!(counts(ok), (0, 0, 0, 0), "{ok:?}");
    assert_eq!(ok.state, MeterState::Ok);

    assert_eq!(exc.successes, 0);
    assert!(exc.exceptions >= 3, "{exc:?}");
    assert_eq!(counts(exc), (0, exc.exceptions, 0, 0), "{exc:?}");
    assert_eq!(exc.consecutive_failures as u64, exc.exceptions);
    assert_eq!(
        server.requests(2) as u64,
        exc.exceptions,
        "a poll stops at its first failed block"
    );

    assert_eq!(silent.successes, 0);
    assert!(silent.timeouts >= 1, "{silent:?}");
    assert_eq!(counts(silent), (silent.timeouts, 0, 0, 0), "{silent:?}");
    assert_eq!(silent.state, MeterState::BackingOff);

    assert_eq!(short.successes, 0);
    assert!(short.decode_errors >= 3, "{short:?}");
    assert_eq!(counts(short), (0, 0, 0, short.decode_errors), "{short:?}");

    // Only the healthy meter produced readings: no partial readings of failed polls.
    assert!(readings.iter().all(|r| r.meter == "ok"));
}

#[tokio::test(start_paused = true)]
async fn unreachable_server_counts_transport_errors() {
    // A port bound but not listening, held for the whole test: connecting is refused.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let addr = socket.local_addr().expect("addr");
    let config = tcp_config(&addr.to_string(), "200ms", &[("main", 1, "50ms")]);
    let (bus, meters) = one_bus(&config);
    let stats = meters[0].stats.clone();
    let run = start(bus, meters);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let readings = run.stop().await;
    assert!(readings.is_empty());
    let s = stats.snapshot();
    assert!(s.transport_errors >= 2, "{s:?}");
    assert_eq!(
        (s.timeouts, s.exceptions, s.decode_errors, s.successes),
        (0, 0, 0, 0)
    );
    // The status page says why it fails and when it is tried again.
    let error = s.last_error.as_deref().expect("the last error kept");
    assert!(error.starts_with("transport error"), "{error}");
    let (failed, retry) = (
        s.last_error_ms.expect("when it failed"),
        s.next_retry_ms.expect("when it is tried again"),
    );
    assert!(retry > failed, "{s:?}");
}

#[tokio::test(start_paused = true)]
async fn reconnect_after_timeout_and_the_next_poll_succeeds() {
    // The first request is answered only after the timeout; the late reply must not
    // be taken as an answer, and the next poll (on a new connection) succeeds.
    let server = TestServer::start(
        sdm630_image(),
        &[(1, Unit::LateFirst(1, Duration::from_millis(300)))],
    )
    .await;
    let config = tcp_config(&server.addr.to_string(), "100ms", &[("main", 1, "50ms")]);
    let (bus, meters) = one_bus(&config);
    let stats = meters[0].stats.clone();
    let mut run = start(bus, meters);
    let reading = timeout(Duration::from_secs(5), run.readings.recv())
        .await
        .expect("a reading after the timeout")
        .expect("channel open");
    run.stop().await;
    let expected = sdm630_values();
    for (v, (_, served)) in reading.values.iter().zip(&expected) {
        assert_eq!(
            v.value.map(f64::to_bits),
            Some(f64::from(*served).to_bits())
        );
    }
    let s = stats.snapshot();
    assert_eq!(s.timeouts, 1, "{s:?}");
    assert_eq!(s.successes, 1, "{s:?}");
    assert_eq!(s.transport_errors, 0, "{s:?}");
    assert!(server.connections() >= 2, "reconnected after the timeout");
}

/// Acceptance: a dead meter must not cut the poll rate of the healthy meters on
/// its bus by more than 10%.
#[tokio::test(start_paused = true)]
async fn dead_meter_does_not_starve_the_bus() {
    const RUN: Duration = Duration::from_secs(6);
    let healthy = [(1, Unit::Serve), (2, Unit::Serve)];
    let server_a = TestServer::start(sdm630_image(), &healthy).await;
    let server_b = TestServer::start(sdm630_image(), &healthy).await;
    let without = tcp_config(
        &server_a.addr.to_string(),
        "200ms",
        &[("h1", 1, "100ms"), ("h2", 2, "100ms")],
    );
    let with = tcp_config(
        &server_b.addr.to_string(),
        "200ms",
        &[("h1", 1, "100ms"), ("h2", 2, "100ms"), ("dead", 3, "100ms")],
    );
    let (bus_a, meters_a) = one_bus(&without);
    let (bus_b, meters_b) = one_bus(&with);
    let dead_stats = meters_b[2].stats.clone();
    // Paused time: both rates are the bus task's own, whatever the machine's load.
    let t0 = Instant::now();
    let run_a = start(bus_a, meters_a);
    let run_b = start(bus_b, meters_b);
    tokio::time::sleep(RUN.saturating_sub(t0.elapsed())).await;
    let elapsed = t0.elapsed().as_secs_f64();
    let (ra, rb) = (run_a.stop().await, run_b.stop().await);
    let rate = |rs: &[Reading]| {
        rs.iter().filter(|r| r.meter.starts_with('h')).count() as f64 / 2.0 / elapsed
    };
    let (rate_without, rate_with) = (rate(&ra), rate(&rb));
    let reduction = 1.0 - rate_with / rate_without;
    let dead = dead_stats.snapshot();
    println!(
        "healthy poll rate per meter: without dead meter {rate_without:.2}/s, with dead meter {rate_with:.2}/s, reduction {:.1}%; dead meter: {} timeouts, state {:?}",
        reduction * 100.0,
        dead.timeouts,
        dead.state
    );
    assert!(
        rate_without > 7.0,
        "healthy meters poll near 10/s: {rate_without}"
    );
    assert!(
        reduction <= 0.10,
        "reduction {:.1}% > 10%",
        reduction * 100.0
    );
    assert!(dead.timeouts >= 1);
    assert_eq!(dead.successes, 0);
    assert!(rb.iter().all(|r| r.meter != "dead"));
}

/// RTU over a pseudo-terminal: the device answers the first request after the
/// timeout (with stale data). The late reply must be discarded, not taken as the
/// answer to a later request; the next poll succeeds with the current data.
// Real time: a pty hands bytes over through the kernel's tty work queue, so with paused
// time the clock jumps past the bus timeout before a reply is readable.
#[tokio::test]
async fn rtu_late_reply_is_never_taken_as_the_next_answer() {
    use std::os::unix::fs::OpenOptionsExt;
    use tokio_serial::SerialPort;
    let (master, slave) = tokio_serial::SerialStream::pair().expect("pty pair");
    let path = slave.name().expect("pty slave has a name");
    // Keep the slave side open (without the exclusive lock serialport takes) so the
    // pty stays up while the bus closes and reopens the port.
    let keeper = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&path)
        .expect("open pty slave");
    drop(slave);
    let server = RtuTestServer::start(
        master,
        sdm630_image(),
        &[(1, Unit::LateFirst(1, Duration::from_millis(130)))],
    );
    let text = format!(
        "gateway_id = \"gw\"\n[[buses]]\nid = \"rs485\"\ntype = \"rtu\"\nport = \"{path}\"\nbaud_rate = 9600\ntimeout = \"100ms\"\nframe_gap = \"5ms\"\n[[meters]]\nid = \"main\"\nbus = \"rs485\"\nunit_id = 1\nprofile = \"sdm630\"\ninterval = \"50ms\"\n"
    );
    let config = Config::from_toml(&text).expect("parses");
    config.validate().expect("valid");
    let (bus, meters) = one_bus(&config);
    let stats = meters[0].stats.clone();
    let mut run = start(bus, meters);
    let mut readings = Vec::new();
    while readings.len() < 3 {
        let r = timeout(Duration::from_secs(5), run.readings.recv()).await;
        let r = r
            .unwrap_or_else(|_| {
                panic!(
                    "readings keep coming: {:?}, {} requests",
                    stats.snapshot(),
                    server.requests(1)
                )
            })
            .expect("channel open");
        readings.push(r);
    }
    run.stop().await;
    let expected = sdm630_values();
    for reading in &readings {
        for (v, (name, served)) in reading.values.iter().zip(&expected) {
            assert_eq!(
                v.value.map(f64::to_bits),
                Some(f64::from(*served).to_bits()),
                "{name}: stale data taken as an answer"
            );
        }
    }
    let s = stats.snapshot();
    assert_eq!(s.timeouts, 1, "{s:?}");
    assert_eq!(
        (s.decode_errors, s.transport_errors, s.exceptions),
        (0, 0, 0),
        "{s:?}"
    );
    // The timed-out request plus four blocks for each of the three readings.
    assert!(server.requests(1) > 3 * 4);
    drop(keeper);
}

/// Acceptance (issue 12, point 9): a reply held back across a reconnect and handed
/// to the new connection (as a TCP-to-RTU gateway or NAT can) is never stored as a
/// fresh reading. tokio-modbus numbers each connection's requests from 0, so without
/// ids that move across reconnects the held reply matches the new first request.
#[tokio::test(start_paused = true)]
async fn tcp_reply_held_across_a_reconnect_is_never_stored() {
    use super::test_server::ReplayGateway;
    let fresh = 1234.5f32;
    let mut input = vec![0u16; 16];
    input[..2].copy_from_slice(&encode(
        DataType::F32,
        WordOrder::HighFirst,
        f64::from(fresh),
    ));
    let gateway = ReplayGateway::start(input).await;
    let text = format!(
        "gateway_id = \"gw\"\n[[buses]]\nid = \"lan\"\ntype = \"tcp\"\naddress = \"{}\"\ntimeout = \"500ms\"\nframe_gap = \"2ms\"\n[[meters]]\nid = \"pv\"\nbus = \"lan\"\nunit_id = 1\nprofile = \"one\"\ninterval = \"50ms\"\n[profiles.one]\nregisters = [ {{ name = \"power\", address = 0, table = \"input\", type = \"f32\", unit = \"W\", kind = \"power\" }} ]\n",
        gateway.addr
    );
    let config = Config::from_toml(&text).expect("parses");
    config.validate().expect("valid");
    let (bus, meters) = one_bus(&config);
    assert_eq!(meters[0].blocks.len(), 1, "one request per poll");
    let stats = meters[0].stats.clone();
    let mut run = start(bus, meters);
    let mut readings = Vec::new();
    while readings.len() < 3 {
        let r = timeout(Duration::from_secs(10), run.readings.recv())
            .await
            .unwrap_or_else(|_| panic!("readings keep coming: {:?}", stats.snapshot()))
            .expect("channel open");
        readings.push(r);
    }
    run.stop().await;
    assert_eq!(
        gateway.replayed(),
        1,
        "the held reply reached the new connection"
    );
    for r in &readings {
        assert_eq!(
            r.values[0].value.map(f64::to_bits),
            Some(f64::from(fresh).to_bits()),
            "a stale reply was stored as a reading: {r:?}"
        );
    }
    let s = stats.snapshot();
    assert_eq!(s.timeouts, 1, "{s:?}");
    assert_eq!((s.transport_errors, s.decode_errors), (0, 0), "{s:?}");
}
