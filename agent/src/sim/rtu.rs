//! Modbus RTU server over a byte stream, and over a pseudo-terminal pair.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crc::{Crc, CRC_16_MODBUS};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::task::JoinHandle;
use tokio_serial::{SerialPort, SerialStream};
use tokio_util::sync::CancellationToken;

use super::SimBus;

const CRC: Crc<u16> = Crc::<u16>::new(&CRC_16_MODBUS);

/// A read or write-single request: address, function, 4 data bytes, CRC.
const FIXED_FRAME: usize = 8;
/// Longest RTU frame; more buffered bytes than this are noise.
const MAX_FRAME: usize = 256;
/// Silence that ends a frame of unknown length. Modbus asks for 3.5 character
/// times (4 ms at 9600 baud); a pty has no baud rate, and a loaded test machine
/// needs slack.
const FRAME_GAP: Duration = Duration::from_millis(20);
/// How often the pty server clears the tty's exclusive flag (see [`rtu_pty`]).
const UNLOCK_EVERY: Duration = Duration::from_millis(50);

fn crc_ok(frame: &[u8]) -> bool {
    match frame {
        [body @ .., lo, hi] if frame.len() >= 4 => {
            CRC.checksum(body) == u16::from_le_bytes([*lo, *hi])
        }
        _ => false,
    }
}

fn with_crc(mut frame: Vec<u8>) -> Vec<u8> {
    let crc = CRC.checksum(&frame);
    frame.extend_from_slice(&crc.to_le_bytes());
    frame
}

/// Serves `bus` as Modbus RTU devices on `stream` until `shutdown` or end of stream.
pub async fn serve_rtu<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    bus: Arc<SimBus>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(MAX_FRAME);
    let mut chunk = [0u8; MAX_FRAME];
    loop {
        // Complete fixed-size frames are answered at once.
        while buf.len() >= FIXED_FRAME && crc_ok(&buf[..FIXED_FRAME]) {
            let frame: Vec<u8> = buf.drain(..FIXED_FRAME).collect();
            let busy = answer(&mut stream, &bus, &frame, &shutdown).await?;
            if shutdown.is_cancelled() {
                return Ok(());
            }
            if busy {
                // A late reply kept the device busy: what came in meanwhile is lost.
                buf.clear();
            }
        }

        let read = if buf.is_empty() {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                r = stream.read(&mut chunk) => Some(r?),
            }
        } else {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                r = tokio::time::timeout(FRAME_GAP, stream.read(&mut chunk)) => match r {
                    Ok(r) => Some(r?),
                    Err(_) => None,
                },
            }
        };
        match read {
            Some(0) => return Ok(()),
            Some(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > MAX_FRAME {
                    buf.clear();
                }
            }
            None => {
                // The line went quiet: the buffer is one frame of another length. A
                // valid one is a function we do not serve; anything else is dropped.
                let frame = std::mem::take(&mut buf);
                if crc_ok(&frame) {
                    answer(&mut stream, &bus, &frame, &shutdown).await?;
                }
            }
        }
    }
}

/// Answers one CRC-checked frame. Returns true if the reply was late.
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    bus: &SimBus,
    frame: &[u8],
    shutdown: &CancellationToken,
) -> io::Result<bool> {
    // The request's last character is in: the paced line's clock starts here, so
    // the simulator's own work overlaps the wire time.
    let arrived = tokio::time::Instant::now();
    let unit_id = frame[0];
    let pdu = &frame[1..frame.len() - 2];
    let Some(meter) = bus.meter(unit_id) else {
        return Ok(false);
    };
    // Reads have a fixed shape; another length for them is not a frame we know.
    if matches!(pdu.first(), Some(0x03 | 0x04)) && frame.len() != FIXED_FRAME {
        return Ok(false);
    }
    let Some(reply) = meter.handle(unit_id, pdu) else {
        return Ok(false);
    };
    let late = !reply.delay.is_zero();
    if late {
        let sleep = tokio::time::sleep(reply.delay);
        tokio::pin!(sleep);
        let mut discard = [0u8; MAX_FRAME];
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(true),
                _ = &mut sleep => break,
                r = stream.read(&mut discard) => if r? == 0 { break },
            }
        }
    }
    let mut adu = Vec::with_capacity(reply.pdu.len() + 3);
    adu.push(reply.frame_unit);
    adu.extend_from_slice(&reply.pdu);
    let mut bytes = with_crc(adu);
    if reply.garbage {
        bytes = meter.garbage_bytes(bytes.len());
    }
    if let Some(wire) = bus.wire_time(frame.len() + bytes.len()) {
        tokio::time::sleep_until(arrived + wire).await;
    }
    stream.write_all(&bytes).await?;
    stream.flush().await?;
    meter.sent(reply.record, late);
    Ok(late)
}

/// Creates a pseudo-terminal pair and serves `bus` on one side; returns the path of
/// the other side (e.g. `/dev/pts/5`), which the agent opens like a serial port,
/// and the server task. Must be called within a tokio runtime.
///
/// The server keeps the agent's side open too, so the path stays valid while the
/// agent closes and reopens it. The exclusive flag an opener sets (`TIOCEXCL`, the
/// default of `tokio_serial::new`) lives as long as the pty does, so a non-root
/// reopen would fail with EBUSY: the server clears it after every request it
/// receives and every 50 ms. Bytes the agent did not read before closing stay
/// queued, so an agent should clear its input after (re)opening.
pub fn rtu_pty(
    bus: Arc<SimBus>,
    shutdown: CancellationToken,
) -> io::Result<(PathBuf, JoinHandle<io::Result<()>>)> {
    let (server_side, agent_side) = SerialStream::pair().map_err(io::Error::from)?;
    let path = agent_side
        .name()
        .map(PathBuf::from)
        .ok_or_else(|| io::Error::other("pty has no path"))?;
    let fd = agent_side.as_raw_fd();
    let stream = PtyServer {
        stream: server_side,
        held: agent_side,
    };
    let task = tokio::spawn(async move {
        let serve = serve_rtu(stream, bus, shutdown);
        tokio::pin!(serve);
        let mut unlock = tokio::time::interval(UNLOCK_EVERY);
        loop {
            tokio::select! {
                r = &mut serve => return r,
                // `serve` owns the agent's side: while it runs, `fd` is open.
                _ = unlock.tick() => clear_exclusive(fd),
            }
        }
    });
    Ok((path, task))
}

fn clear_exclusive(fd: RawFd) {
    // SAFETY: callers pass an fd they keep open; TIOCNXCL takes no argument and
    // only clears a flag. A failure changes nothing, so the result is ignored.
    unsafe { libc::ioctl(fd, libc::TIOCNXCL) };
}

/// The server's side of the pty, holding the agent's side open.
struct PtyServer {
    stream: SerialStream,
    held: SerialStream,
}

impl AsyncRead for PtyServer {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            // Someone opened the agent's side and wrote: let them reopen it later.
            clear_exclusive(self.held.as_raw_fd());
        }
        r
    }
}

impl AsyncWrite for PtyServer {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
