//! `edge-agent sim`: N simulated meters as Modbus TCP unit ids 1..=N on one listener,
//! as the footprint harness (scripts/footprint.sh) runs it.

use std::process::{Command, Stdio};
use std::time::Duration;

use edge_agent_tests::{free_port, poll_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads input registers 0..2 (phase 1 voltage of an SDM630) from `unit`; returns
/// the reply's unit id, function code and the rest of the PDU.
async fn read_voltage(stream: &mut TcpStream, tid: u16, unit: u8) -> Vec<u8> {
    let mut req = tid.to_be_bytes().to_vec();
    req.extend_from_slice(&[0, 0, 0, 6, unit, 0x04, 0, 0, 0, 2]);
    stream.write_all(&req).await.expect("write request");
    let mut header = [0u8; 6];
    stream.read_exact(&mut header).await.expect("MBAP header");
    assert_eq!(&header[..2], &tid.to_be_bytes(), "transaction id echoed");
    let len = usize::from(u16::from_be_bytes([header[4], header[5]]));
    let mut rest = vec![0u8; len];
    stream.read_exact(&mut rest).await.expect("reply");
    rest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_command_serves_n_meters_and_stops_on_sigterm() {
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_edge-agent-under-test"))
        .args(["sim", "--profile", "sdm630", "--meters", "3"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the simulator");

    let mut stream = poll_until(Duration::from_secs(30), || async {
        let connected = TcpStream::connect(("127.0.0.1", port)).await;
        let done = connected.is_ok();
        (connected, done)
    })
    .await
    .unwrap_or_else(|e| panic!("the simulator does not listen on {port}: {e}"));
    for unit in 1..=3u8 {
        let reply = tokio::time::timeout(
            Duration::from_secs(10),
            read_voltage(&mut stream, u16::from(unit), unit),
        )
        .await
        .expect("reply in time");
        assert_eq!(&reply[..3], &[unit, 0x04, 4], "unit {unit} answers");
        let volts = f32::from_be_bytes([reply[3], reply[4], reply[5], reply[6]]);
        assert!((180.0..280.0).contains(&volts), "unit {unit}: {volts} V");
    }
    // Unit 4 is not there: a gateway's "target device failed to respond".
    let reply = tokio::time::timeout(Duration::from_secs(10), read_voltage(&mut stream, 4, 4))
        .await
        .expect("reply in time");
    assert_eq!(reply, vec![4, 0x84, 0x0B]);

    // SAFETY: plain kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0, "send SIGTERM");
    drop(stream);
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait for the simulator");
    assert_eq!(status.code(), Some(0), "the simulator exits 0 on SIGTERM");
}
