//! Modbus TCP server: MBAP header, one request at a time per connection.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::meter::{exception, ReplyKind, Served, SimMeter};
use super::SimBus;

/// Most replies held for a later connection; beyond, the oldest is forgotten.
const MAX_HELD: usize = 16;

/// A reply held back for a later connection (see `SimFaults::hold_for_next_connection`).
struct Held {
    /// The connection it was held from.
    from: u64,
    frame: Vec<u8>,
    meter: Arc<SimMeter>,
    record: Served,
}

/// What the connections of one listener share.
#[derive(Default)]
struct Shared {
    held: Mutex<VecDeque<Held>>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Held>> {
        // Plain data: a panic elsewhere cannot leave it inconsistent.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Serves `bus` on every connection accepted from `listener` until `shutdown`.
/// Returns once the connections have closed.
pub async fn serve_tcp(
    listener: TcpListener,
    bus: Arc<SimBus>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let mut connections = JoinSet::new();
    let shared = Arc::new(Shared::default());
    let mut accepted_count = 0u64;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    accepted_count += 1;
                    connections.spawn(connection(
                        stream,
                        bus.clone(),
                        shared.clone(),
                        accepted_count,
                        shutdown.clone(),
                    ));
                }
                Err(e) => {
                    // Usually transient (a reset before accept, out of fds): keep serving.
                    tracing::warn!("simulator: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    while connections.join_next().await.is_some() {}
    Ok(())
}

async fn connection(
    mut stream: TcpStream,
    bus: Arc<SimBus>,
    shared: Arc<Shared>,
    number: u64,
    shutdown: CancellationToken,
) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        r = serve_connection(&mut stream, &bus, &shared, number) => {
            if let Err(e) = r {
                if e.kind() != io::ErrorKind::UnexpectedEof {
                    tracing::debug!("simulator: tcp connection ended: {e}");
                }
            }
        }
    }
}

async fn serve_connection(
    stream: &mut TcpStream,
    bus: &SimBus,
    shared: &Shared,
    number: u64,
) -> io::Result<()> {
    let mut header = [0u8; 7];
    let mut pdu = vec![0u8; 253];
    loop {
        stream.read_exact(&mut header).await?;
        let transaction = [header[0], header[1]];
        let protocol = u16::from_be_bytes([header[2], header[3]]);
        let len = usize::from(u16::from_be_bytes([header[4], header[5]]));
        let unit_id = header[6];
        // Length counts the unit id and the PDU; a PDU is 1..=253 bytes.
        if protocol != 0 || !(2..=254).contains(&len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad MBAP header {header:02X?}"),
            ));
        }
        let pdu = &mut pdu[..len - 1];
        stream.read_exact(pdu).await?;

        let Some(meter) = bus.meter(unit_id) else {
            let function = pdu[0];
            let reply = [function | 0x80, exception::GATEWAY_TARGET_FAILED];
            stream
                .write_all(&frame(transaction, unit_id, &reply))
                .await?;
            continue;
        };
        let Some(reply) = meter.handle(unit_id, pdu) else {
            continue;
        };
        if !reply.delay.is_zero() {
            tokio::time::sleep(reply.delay).await;
        }
        let mut bytes = frame(transaction, reply.frame_unit, &reply.pdu);
        if reply.garbage {
            bytes = meter.garbage_bytes(bytes.len());
        }
        if reply.hold {
            let mut held = shared.lock();
            if held.len() >= MAX_HELD {
                held.pop_front();
            }
            let mut record = reply.record;
            record.reply = ReplyKind::Held;
            held.push_back(Held {
                from: number,
                frame: bytes,
                meter: meter.clone(),
                record,
            });
            continue;
        }
        // Replies held on other connections go out first, on this one.
        let replayed: Vec<Held> = {
            let mut held = shared.lock();
            let (theirs, ours): (VecDeque<Held>, VecDeque<Held>) =
                held.drain(..).partition(|h| h.from != number);
            *held = ours;
            theirs.into()
        };
        let mut out = Vec::new();
        for h in &replayed {
            out.extend_from_slice(&h.frame);
        }
        out.extend_from_slice(&bytes);
        stream.write_all(&out).await?;
        for h in replayed {
            h.meter.sent(h.record, false);
        }
        meter.sent(reply.record, !reply.delay.is_zero());
    }
}

fn frame(transaction: [u8; 2], unit_id: u8, pdu: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(7 + pdu.len());
    out.extend_from_slice(&transaction);
    out.extend_from_slice(&[0, 0]);
    // PDUs built here are at most 252 bytes: the length fits.
    out.extend_from_slice(&((pdu.len() + 1) as u16).to_be_bytes());
    out.push(unit_id);
    out.extend_from_slice(pdu);
    out
}
