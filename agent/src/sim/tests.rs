//! The servers against the real tokio-modbus client, and raw frames for the edges.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_modbus::client::Context;
use tokio_modbus::prelude::*;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::acquire::config::{DataType, RegisterConfig, RegisterTable, WordOrder};
use crate::acquire::profile::{builtin, Profile};
use crate::model::Kind;

const WAIT: Duration = Duration::from_secs(5);

fn profile(name: &str) -> Arc<Profile> {
    Arc::new(builtin(name).expect("built-in profile"))
}

struct Server {
    addr: SocketAddr,
    bus: Arc<SimBus>,
    shutdown: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn stop(self) {
        self.shutdown.cancel();
        let r = tokio::time::timeout(WAIT, self.task).await;
        assert!(matches!(r, Ok(Ok(Ok(())))), "server stops cleanly: {r:?}");
    }

    fn meter(&self, unit: u8) -> &Arc<SimMeter> {
        self.bus.meter(unit).expect("meter on bus")
    }

    async fn client(&self, unit: u8) -> Context {
        tokio_modbus::client::tcp::connect_slave(self.addr, Slave(unit))
            .await
            .expect("connect")
    }
}

async fn tcp_server(bus: SimBus) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let bus = Arc::new(bus);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(serve_tcp(listener, bus.clone(), shutdown.clone()));
    Server {
        addr,
        bus,
        shutdown,
        task,
    }
}

fn f32s(words: &[u16]) -> Vec<f32> {
    words
        .chunks_exact(2)
        .map(|w| f32::from_bits((u32::from(w[0]) << 16) | u32::from(w[1])))
        .collect()
}

async fn read_input(ctx: &mut Context, start: u16, count: u16) -> Vec<u16> {
    tokio::time::timeout(WAIT, ctx.read_input_registers(start, count))
        .await
        .expect("reply in time")
        .expect("no transport error")
        .expect("no exception")
}

fn last_served(meter: &SimMeter) -> Served {
    meter.served().last().cloned().expect("a served reply")
}

#[tokio::test]
async fn tcp_sdm630_blocks_decode_to_plausible_values() {
    let server =
        tcp_server(SimBus::new().with_meter(1, SimMeter::new(profile("sdm630"), 11))).await;
    let mut ctx = server.client(1).await;

    let words = read_input(&mut ctx, 0x00, 0x12).await;
    let v = f32s(&words);
    let served = last_served(server.meter(1));
    assert_eq!(
        served.words, words,
        "history holds exactly what the client got"
    );
    assert_eq!(
        (
            served.unit_id,
            served.function,
            served.table,
            served.start,
            served.count,
            served.reply
        ),
        (
            1,
            0x04,
            Some(RegisterTable::Input),
            0,
            0x12,
            ReplyKind::Data
        )
    );
    for k in 0..3 {
        let (volts, amps, watts) = (v[k], v[3 + k], v[6 + k]);
        assert!((220.0..=240.0).contains(&volts), "voltage {volts}");
        assert!(amps > 0.0 && amps < 20.0, "current {amps}");
        let pf = watts / (volts * amps);
        assert!((0.799..=1.001).contains(&pf), "P = V·I·pf with pf {pf}");
    }

    let total = f32s(&read_input(&mut ctx, 0x34, 2).await)[0];
    let sum: f32 = v[6..9].iter().sum();
    // Another instant: the noise moves the figure by a few percent at most.
    assert!(
        (total - sum).abs() < 0.1 * sum,
        "total {total} vs phases {sum}"
    );

    let e = f32s(&read_input(&mut ctx, 0x46, 6).await);
    assert!((49.9..=50.1).contains(&e[0]), "frequency {}", e[0]);
    assert!((1_000.0..=20_001.0).contains(&e[1]), "import {}", e[1]);
    assert!((0.0..=501.0).contains(&e[2]), "export {}", e[2]);
    let etotal = f32s(&read_input(&mut ctx, 0x156, 2).await)[0];
    assert!(
        (etotal - e[1] - e[2]).abs() < 0.01,
        "total = import + export"
    );

    let stats = server.meter(1).stats();
    assert_eq!(
        (stats.requests, stats.replies, stats.data_replies),
        (4, 4, 4)
    );
    server.stop().await;
}

#[tokio::test]
async fn spans_over_gaps_read_zero_and_bad_ranges_are_exceptions() {
    let server = tcp_server(SimBus::new().with_meter(1, SimMeter::new(profile("sdm630"), 1))).await;
    let mut ctx = server.client(1).await;
    let words = read_input(&mut ctx, 0x10, 0x26).await;
    assert!(words[2..0x24].iter().all(|&w| w == 0));
    assert!(f32s(&words[0..2])[0] > 0.0 && f32s(&words[0x24..])[0] > 0.0);

    let r = ctx.read_input_registers(0x158, 2).await.expect("transport");
    assert_eq!(r, Err(ExceptionCode::IllegalDataAddress));
    let r = ctx.read_holding_registers(0, 2).await.expect("transport");
    assert_eq!(r, Err(ExceptionCode::IllegalDataAddress), "no holding map");
    let r = ctx.read_coils(0, 8).await.expect("transport");
    assert_eq!(r, Err(ExceptionCode::IllegalFunction));
    let served = last_served(server.meter(1));
    assert_eq!(
        (served.function, served.reply),
        (0x01, ReplyKind::Exception(1))
    );
    assert_eq!(server.meter(1).stats().exceptions, 3);

    let mut other = server.client(7).await;
    let r = other.read_input_registers(0, 2).await.expect("transport");
    assert_eq!(
        r,
        Err(ExceptionCode::GatewayTargetDevice),
        "unit not on the bus"
    );
    server.stop().await;
}

#[tokio::test]
async fn energy_counters_never_decrease() {
    // One model hour per wall second, so the counters visibly move.
    let meter = SimMeter::new(profile("sdm630"), 3).with_time_scale(3_600.0);
    let server = tcp_server(SimBus::new().with_meter(1, meter)).await;
    let mut ctx = server.client(1).await;
    let first = f32s(&read_input(&mut ctx, 0x48, 4).await);
    let mut last = first.clone();
    for _ in 0..300 {
        let now = f32s(&read_input(&mut ctx, 0x48, 4).await);
        assert!(now[0] >= last[0], "import {} after {}", now[0], last[0]);
        assert!(now[1] >= last[1], "export {} after {}", now[1], last[1]);
        last = now;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let end = f32s(&read_input(&mut ctx, 0x48, 4).await);
    assert!(end[0] > first[0], "import grew: {} -> {}", first[0], end[0]);
    server.stop().await;
}

#[tokio::test]
async fn exception_fault_arrives_as_a_modbus_exception() {
    let server = tcp_server(SimBus::new().with_meter(4, SimMeter::new(profile("sdm120"), 2))).await;
    let mut ctx = server.client(4).await;
    let faults = server.meter(4).faults();
    faults.exception(0x04, 2);
    for _ in 0..2 {
        let r = ctx.read_input_registers(0, 2).await.expect("transport");
        assert_eq!(r, Err(ExceptionCode::ServerDeviceFailure));
    }
    assert!(!faults.armed());
    read_input(&mut ctx, 0, 2).await;
    let stats = server.meter(4).stats();
    assert_eq!((stats.exceptions, stats.data_replies), (2, 1));
    server.stop().await;
}

#[tokio::test]
async fn silence_makes_the_client_time_out_until_lifted() {
    let server = tcp_server(SimBus::new().with_meter(1, SimMeter::new(profile("sdm120"), 2))).await;
    let mut ctx = server.client(1).await;
    let faults = server.meter(1).faults();
    faults.silence(true);
    for _ in 0..2 {
        let r =
            tokio::time::timeout(Duration::from_millis(200), ctx.read_input_registers(0, 2)).await;
        assert!(r.is_err(), "no reply while silent: {r:?}");
    }
    faults.silence(false);
    // The silenced exchanges left nothing behind: a new connection, as an agent
    // reconnects after a timeout, reads normally.
    let mut ctx = server.client(1).await;
    read_input(&mut ctx, 0, 2).await;
    let stats = server.meter(1).stats();
    assert_eq!((stats.silenced, stats.replies), (2, 1));
    server.stop().await;
}

#[tokio::test]
async fn late_reply_is_delayed_and_counted() {
    let server = tcp_server(SimBus::new().with_meter(1, SimMeter::new(profile("sdm120"), 2))).await;
    let mut ctx = server.client(1).await;
    server
        .meter(1)
        .faults()
        .late_reply(Duration::from_millis(150), 1);
    let started = Instant::now();
    read_input(&mut ctx, 0, 2).await;
    assert!(started.elapsed() >= Duration::from_millis(150));
    read_input(&mut ctx, 0, 2).await;
    let stats = server.meter(1).stats();
    assert_eq!((stats.late, stats.data_replies), (1, 2));
    server.stop().await;
}

#[tokio::test]
async fn garbage_and_wrong_unit_fail_at_the_client_and_serving_goes_on() {
    let server = tcp_server(SimBus::new().with_meter(1, SimMeter::new(profile("sdm630"), 2))).await;
    let faults = server.meter(1).faults();
    let mut ctx = server.client(1).await;

    faults.wrong_unit(1);
    let r = tokio::time::timeout(WAIT, ctx.read_input_registers(0, 2))
        .await
        .expect("a reply");
    assert!(
        matches!(
            r,
            Err(tokio_modbus::Error::Protocol(
                tokio_modbus::ProtocolError::HeaderMismatch { .. }
            ))
        ),
        "{r:?}"
    );
    assert_eq!(last_served(server.meter(1)).reply, ReplyKind::WrongUnit(2));
    read_input(&mut ctx, 0, 2).await;

    faults.garbage(1);
    // Random bytes: the client either rejects them or waits for a frame that never
    // completes; both are errors to it.
    let r = tokio::time::timeout(Duration::from_millis(500), ctx.read_input_registers(0, 2)).await;
    assert!(!matches!(r, Ok(Ok(Ok(_)))), "{r:?}");
    let mut ctx = server.client(1).await;
    read_input(&mut ctx, 0, 2).await;

    let stats = server.meter(1).stats();
    assert_eq!(
        (stats.garbage, stats.wrong_unit, stats.data_replies),
        (1, 1, 2)
    );
    server.stop().await;
}

#[tokio::test]
async fn user_map_with_u32_low_first_and_scale_round_trips() {
    let reg =
        |name: &str, address, data_type, word_order, scale, unit: &str, kind| RegisterConfig {
            name: name.into(),
            address,
            table: RegisterTable::Holding,
            data_type,
            word_order,
            scale,
            unit: unit.into(),
            kind,
            min: Some(0.0),
            max: None,
        };
    let map = Profile {
        name: "pump".into(),
        manufacturer: "ACME".into(),
        model: "P1".into(),
        registers: vec![
            reg(
                "energy",
                100,
                DataType::U32,
                WordOrder::LowFirst,
                0.01,
                "kWh",
                Kind::EnergyTotal,
            ),
            reg(
                "power",
                104,
                DataType::I16,
                WordOrder::HighFirst,
                10.0,
                "W",
                Kind::Power,
            ),
            reg(
                "voltage",
                105,
                DataType::U16,
                WordOrder::HighFirst,
                0.1,
                "V",
                Kind::Voltage,
            ),
            reg(
                "hours",
                108,
                DataType::F64,
                WordOrder::LowFirst,
                1.0,
                "h",
                Kind::Gauge,
            ),
        ],
    };
    let server = tcp_server(SimBus::new().with_meter(9, SimMeter::new(Arc::new(map), 5))).await;
    let mut ctx = server.client(9).await;
    let w = tokio::time::timeout(WAIT, ctx.read_holding_registers(100, 12))
        .await
        .expect("in time")
        .expect("transport")
        .expect("no exception");
    let meter = server.meter(9);
    let served = last_served(meter);
    assert_eq!(served.words, w);
    assert_eq!(served.table, Some(RegisterTable::Holding));
    let at = served.model_time;
    let model = |n: &str| meter.value_at(n, at).expect(n);

    let energy = f64::from((u32::from(w[1]) << 16) | u32::from(w[0])) * 0.01;
    assert!(
        (energy - model("energy")).abs() <= 0.005 + 1e-9,
        "{energy} vs {}",
        model("energy")
    );
    assert!(energy > 1_000.0, "a lifetime total: {energy}");
    assert_eq!(&w[2..4], &[0, 0], "gap");
    let power = f64::from(w[4] as i16) * 10.0;
    assert!(
        (power - model("power")).abs() <= 5.0,
        "{power} vs {}",
        model("power")
    );
    let volts = f64::from(w[5]) * 0.1;
    assert!(
        (volts - model("voltage")).abs() <= 0.05 + 1e-9,
        "{volts} vs {}",
        model("voltage")
    );
    let hours = f64::from_bits(
        (u64::from(w[11]) << 48)
            | (u64::from(w[10]) << 32)
            | (u64::from(w[9]) << 16)
            | u64::from(w[8]),
    );
    assert_eq!(hours, model("hours"), "f64 travels exactly");
    assert!((0.0..=100.0).contains(&hours));
    server.stop().await;
}

/// Sends one raw MBAP request and returns the raw reply.
async fn raw_tcp(stream: &mut TcpStream, tid: u16, unit: u8, pdu: &[u8]) -> Vec<u8> {
    let mut req = tid.to_be_bytes().to_vec();
    req.extend_from_slice(&[0, 0]);
    req.extend_from_slice(&((pdu.len() + 1) as u16).to_be_bytes());
    req.push(unit);
    req.extend_from_slice(pdu);
    stream.write_all(&req).await.expect("write");
    let mut header = [0u8; 7];
    stream.read_exact(&mut header).await.expect("header");
    let len = usize::from(u16::from_be_bytes([header[4], header[5]]));
    let mut rest = vec![0u8; len - 1];
    stream.read_exact(&mut rest).await.expect("pdu");
    let mut out = header.to_vec();
    out.extend_from_slice(&rest);
    out
}

#[tokio::test]
async fn raw_tcp_frames_follow_the_spec() {
    let server = tcp_server(SimBus::new().with_meter(1, SimMeter::new(profile("sdm120"), 2))).await;
    let mut s = TcpStream::connect(server.addr).await.expect("connect");
    let r = raw_tcp(&mut s, 0xBEEF, 1, &[0x04, 0, 0, 0, 2]).await;
    assert_eq!(
        &r[..9],
        &[0xBE, 0xEF, 0, 0, 0, 7, 1, 0x04, 4],
        "tid echoed, length, byte count"
    );
    for (pdu, code) in [
        (&[0x04, 0, 0, 0, 0][..], 0x02),
        (&[0x04, 0, 0, 0, 126][..], 0x02),
        (&[0x04, 0x01, 0x58, 0, 2][..], 0x02),
        (&[0x04, 0, 0, 0][..], 0x03),
        (&[0x10, 0, 0, 0, 1, 2, 0, 0][..], 0x01),
    ] {
        let r = raw_tcp(&mut s, 7, 1, pdu).await;
        assert_eq!(
            r,
            vec![0, 7, 0, 0, 0, 3, 1, pdu[0] | 0x80, code],
            "{pdu:02X?}"
        );
    }
    let r = raw_tcp(&mut s, 8, 3, &[0x03, 0, 0, 0, 2]).await;
    assert_eq!(
        r,
        vec![0, 8, 0, 0, 0, 3, 3, 0x83, 0x0B],
        "gateway target failed"
    );

    // A protocol id other than 0 is not Modbus: the connection closes.
    s.write_all(&[0, 1, 0, 9, 0, 6, 1, 4, 0, 0, 0, 2])
        .await
        .expect("write");
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf))
        .await
        .expect("closed in time");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    server.stop().await;
}

fn rtu_frame(body: &[u8]) -> Vec<u8> {
    let crc = crc::Crc::<u16>::new(&crc::CRC_16_MODBUS).checksum(body);
    let mut out = body.to_vec();
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

async fn read_frame(
    s: &mut tokio::io::DuplexStream,
    len: usize,
    within: Duration,
) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; len];
    tokio::time::timeout(within, s.read_exact(&mut buf))
        .await
        .ok()?
        .ok()?;
    Some(buf)
}

#[tokio::test]
async fn raw_rtu_frames_follow_the_spec() {
    let bus = Arc::new(
        SimBus::new()
            .with_meter(1, SimMeter::new(profile("sdm630"), 1))
            .with_meter(2, SimMeter::new(profile("sdm120"), 2)),
    );
    let (mut client, server) = tokio::io::duplex(1024);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(serve_rtu(server, bus.clone(), shutdown.clone()));
    let quiet = Duration::from_millis(150);

    client
        .write_all(&rtu_frame(&[2, 0x04, 0, 0, 0, 2]))
        .await
        .expect("write");
    let r = read_frame(&mut client, 9, WAIT).await.expect("reply");
    assert_eq!(&r[..3], &[2, 0x04, 4]);
    assert_eq!(r, rtu_frame(&r[..7]), "reply CRC");
    let words = last_served(bus.meter(2).expect("meter")).words;
    assert_eq!(
        words,
        vec![
            u16::from_be_bytes([r[3], r[4]]),
            u16::from_be_bytes([r[5], r[6]])
        ]
    );

    // A bad CRC, and a unit id not on the bus: no reply at all.
    let mut bad = rtu_frame(&[2, 0x04, 0, 0, 0, 2]);
    bad[7] ^= 0xFF;
    client.write_all(&bad).await.expect("write");
    assert_eq!(read_frame(&mut client, 1, quiet).await, None);
    client
        .write_all(&rtu_frame(&[5, 0x04, 0, 0, 0, 2]))
        .await
        .expect("write");
    assert_eq!(read_frame(&mut client, 1, quiet).await, None);

    // Write single register (8 bytes) and write multiple (longer, framed by the
    // gap): illegal function.
    client
        .write_all(&rtu_frame(&[1, 0x06, 0, 0, 0, 1]))
        .await
        .expect("write");
    let r = read_frame(&mut client, 5, WAIT).await.expect("reply");
    assert_eq!(r, rtu_frame(&[1, 0x86, 0x01]));
    client
        .write_all(&rtu_frame(&[1, 0x10, 0, 0, 0, 1, 2, 0, 7]))
        .await
        .expect("write");
    let r = read_frame(&mut client, 5, WAIT).await.expect("reply");
    assert_eq!(r, rtu_frame(&[1, 0x90, 0x01]));

    // Range errors, and a request that still works after all of the above.
    client
        .write_all(&rtu_frame(&[1, 0x04, 0, 0, 0, 0]))
        .await
        .expect("write");
    let r = read_frame(&mut client, 5, WAIT).await.expect("reply");
    assert_eq!(r, rtu_frame(&[1, 0x84, 0x02]));
    client
        .write_all(&rtu_frame(&[1, 0x04, 0, 0, 0, 6]))
        .await
        .expect("write");
    let r = read_frame(&mut client, 17, WAIT).await.expect("reply");
    assert_eq!(&r[..3], &[1, 0x04, 12]);

    // While a late reply is pending, whatever arrives is lost, as on a busy device.
    bus.meter(1)
        .expect("meter")
        .faults()
        .late_reply(Duration::from_millis(200), 1);
    let requests = || bus.meter(1).map_or(0, |m| m.stats().requests);
    let before = requests();
    client
        .write_all(&rtu_frame(&[1, 0x04, 0, 0, 0, 2]))
        .await
        .expect("write");
    // The device has taken the request and holds its reply back.
    crate::testkit::wait_until("the late request taken", WAIT, || requests() > before).await;
    client
        .write_all(&rtu_frame(&[1, 0x04, 0, 2, 0, 2]))
        .await
        .expect("write");
    let r = read_frame(&mut client, 9, WAIT).await.expect("late reply");
    assert_eq!(&r[..3], &[1, 0x04, 4]);
    assert_eq!(
        read_frame(&mut client, 1, quiet).await,
        None,
        "second request was lost"
    );
    let stats = bus.meter(1).expect("meter").stats();
    assert_eq!(
        (stats.requests, stats.late),
        (5, 1),
        "the lost request never reached the meter"
    );

    shutdown.cancel();
    let r = tokio::time::timeout(WAIT, task).await;
    assert!(matches!(r, Ok(Ok(Ok(())))), "{r:?}");
}

fn open_port(path: &std::path::Path) -> tokio_serial::SerialStream {
    let line = crate::acquire::serial::LineSettings {
        baud_rate: 9600,
        parity: crate::acquire::config::Parity::None,
        data_bits: 8,
        stop_bits: 1,
    };
    crate::acquire::serial::open(path, line).expect("open the pty by path")
}

/// Whether the tty at `path` has its exclusive flag (TIOCEXCL) set; `None` where
/// the TIOCGEXCL query itself is not available (qemu user-mode emulation does not
/// translate it, and the ARM test run uses it).
#[cfg(target_os = "linux")]
fn exclusive(path: &std::path::Path) -> Option<bool> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    // Root may open an exclusive tty anyway; others get EBUSY while the flag is set.
    let probe = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(path)
        .expect("probe the tty");
    let mut flag: libc::c_int = -1;
    // SAFETY: TIOCGEXCL writes one int through the pointer, which outlives the call.
    let rc = unsafe { libc::ioctl(probe.as_raw_fd(), libc::TIOCGEXCL, &mut flag) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        eprintln!("TIOCGEXCL unavailable here ({e}); exclusive flag not checked");
        return None;
    }
    Some(flag != 0)
}

#[tokio::test]
async fn rtu_pty_serves_sdm120_to_tokio_modbus_and_survives_reopen() {
    let bus = Arc::new(
        SimBus::new()
            .with_meter(1, SimMeter::new(profile("sdm630"), 1))
            .with_meter(2, SimMeter::new(profile("sdm120"), 2)),
    );
    let shutdown = CancellationToken::new();
    let (path, task) = rtu_pty(bus.clone(), shutdown.clone()).expect("pty");
    assert!(path.exists(), "{}", path.display());
    let meter = bus.meter(2).expect("meter").clone();

    let mut ctx = tokio_modbus::client::rtu::attach_slave(open_port(&path), Slave(2));
    let words = read_input(&mut ctx, 0, 0x20).await;
    assert_eq!(last_served(&meter).words, words, "bit-exact history");
    let v = f32s(&words);
    let (volts, amps, watts, pf) = (v[0], v[3], v[6], v[15]);
    assert!((220.0..=240.0).contains(&volts), "{volts}");
    assert!((0.8..=1.0).contains(&pf), "{pf}");
    assert!(
        (watts - volts * amps * pf).abs() < 1e-3 * watts,
        "P = V·I·pf"
    );
    #[cfg(target_os = "linux")]
    assert_ne!(
        exclusive(&path),
        Some(true),
        "opened exclusive, but reopenable after a request"
    );
    ctx.set_slave(Slave(1));
    let l3 = f32s(&read_input(&mut ctx, 4, 2).await)[0];
    assert!((220.0..=240.0).contains(&l3));

    // A timeout, then the agent closes and reopens the port by name.
    ctx.set_slave(Slave(2));
    meter.faults().silence(true);
    let r = tokio::time::timeout(Duration::from_millis(200), ctx.read_input_registers(0, 2)).await;
    assert!(r.is_err(), "{r:?}");
    drop(ctx);
    meter.faults().silence(false);
    let mut ctx = tokio_modbus::client::rtu::attach_slave(open_port(&path), Slave(2));
    read_input(&mut ctx, 0x48, 4).await;

    // Wrong unit and garbage fail at the client; after a reopen it reads again.
    meter.faults().wrong_unit(1);
    let r = tokio::time::timeout(WAIT, ctx.read_input_registers(0, 2))
        .await
        .expect("a reply");
    assert!(matches!(r, Err(tokio_modbus::Error::Protocol(_))), "{r:?}");
    meter.faults().garbage(1);
    let r = tokio::time::timeout(Duration::from_millis(300), ctx.read_input_registers(0, 2)).await;
    assert!(!matches!(r, Ok(Ok(Ok(_)))), "{r:?}");
    drop(ctx);
    let mut ctx = tokio_modbus::client::rtu::attach_slave(open_port(&path), Slave(2));
    read_input(&mut ctx, 0, 2).await;
    let stats = meter.stats();
    assert_eq!((stats.wrong_unit, stats.garbage, stats.silenced), (1, 1, 1));
    drop(ctx);

    shutdown.cancel();
    let r = tokio::time::timeout(WAIT, task).await;
    assert!(matches!(r, Ok(Ok(Ok(())))), "{r:?}");
}

#[test]
fn served_history_is_bounded() {
    let meter = SimMeter::new(profile("sdm120"), 1);
    for i in 0..(SERVED_CAPACITY + 5) {
        let reply = meter.handle(1, &[0x04, 0, 0, 0, 2]).expect("reply");
        let mut record = reply.record;
        record.start = (i % 1000) as u16;
        meter.sent(record, false);
    }
    let served = meter.served();
    assert_eq!(served.len(), SERVED_CAPACITY);
    assert_eq!(served[0].start, 5, "oldest dropped first");
    assert_eq!(meter.stats().data_replies, (SERVED_CAPACITY + 5) as u64);
}

#[tokio::test]
async fn sim_command_bus_serves_n_meters_as_unit_ids_one_to_n() {
    let bus = command::sim_bus(&profile("sdm630"), 3);
    assert_eq!(
        bus.meters().map(|(u, _)| u).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    let server = tcp_server(bus).await;
    let mut s = TcpStream::connect(server.addr).await.expect("connect");
    // Phase 1 voltage (input registers 0..2) of each meter, on one connection.
    let mut volts = Vec::new();
    for unit in 1..=3u8 {
        let r = raw_tcp(&mut s, u16::from(unit), unit, &[0x04, 0, 0, 0, 2]).await;
        assert_eq!(&r[6..9], &[unit, 0x04, 4], "unit {unit} answers");
        volts.push(
            f32s(&[
                u16::from_be_bytes([r[9], r[10]]),
                u16::from_be_bytes([r[11], r[12]]),
            ])[0],
        );
    }
    assert!(
        volts.iter().all(|v| (180.0..280.0).contains(v)),
        "{volts:?}"
    );
    // Each meter has its own seed: not three copies of one.
    assert!(volts[0] != volts[1] || volts[1] != volts[2], "{volts:?}");
    // Unit N+1 is not on the bus.
    let r = raw_tcp(&mut s, 9, 4, &[0x04, 0, 0, 0, 2]).await;
    assert_eq!(r, vec![0, 9, 0, 0, 0, 3, 4, 0x84, 0x0B]);
    server.stop().await;
}
