//! Modbus TCP transport wrapper: transaction ids that keep moving across reconnects.
//!
//! tokio-modbus numbers the requests of each TCP connection from transaction id 0,
//! and the bus reconnects after a timeout. A reply that arrives late, on the new
//! connection (a TCP-to-RTU gateway or NAT that hands a held answer to the next
//! connection), would then carry the id of the first request on that connection and
//! be taken for its answer. [`MbapTransport`] sits between tokio-modbus and the TCP
//! stream and only frames MBAP (the 7-byte header and its length field); the
//! protocol itself stays tokio-modbus's. Outgoing, it gives each request the next id
//! of a per-bus counter ([`Transactions`]: random start, shared by the bus's
//! successive connections). Incoming, it passes on only the reply whose id is the
//! outstanding request's (with tokio-modbus's own id put back) and discards, counts
//! and logs every other frame. Frames are bounded by the Modbus TCP maximum of
//! [`MAX_ADU`] bytes; a header announcing more, or another protocol id, is an error
//! (the stream is out of step and the bus reconnects).
//!
//! The peer closing the connection is reported as such ("connection closed by the
//! meter") instead of the end of stream tokio-modbus turns into whatever OS error
//! happened last.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// MBAP header: transaction id, protocol id, length, unit id.
pub const HEADER_LEN: usize = 7;
/// Largest Modbus TCP ADU: the header and a PDU of at most 253 bytes.
pub const MAX_ADU: usize = 260;
/// The MBAP length field counts the unit id and the PDU (1..=253 bytes).
const MIN_LENGTH_FIELD: usize = 2;
const MAX_LENGTH_FIELD: usize = MAX_ADU - HEADER_LEN + 1;

/// A complete MBAP frame (header and PDU).
pub type Frame = heapless::Vec<u8, MAX_ADU>;

/// What is wrong with a frame's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// The protocol id is not 0 (Modbus).
    Protocol(u16),
    /// The length field is outside 2..=254: the frame would be empty or over
    /// [`MAX_ADU`] bytes.
    Length(u16),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Protocol(p) => {
                write!(f, "MBAP header: protocol id is {p}, expected 0 (Modbus)")
            }
            FrameError::Length(n) => write!(
                f,
                "MBAP header: length field is {n}, expected {MIN_LENGTH_FIELD}..={MAX_LENGTH_FIELD} (a frame of at most {MAX_ADU} bytes)"
            ),
        }
    }
}

impl std::error::Error for FrameError {}

impl From<FrameError> for io::Error {
    fn from(e: FrameError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// Collects the bytes of one MBAP frame in a fixed buffer of [`MAX_ADU`] bytes.
#[derive(Clone)]
pub struct FrameBuf {
    buf: [u8; MAX_ADU],
    len: usize,
}

impl Default for FrameBuf {
    fn default() -> Self {
        FrameBuf {
            buf: [0; MAX_ADU],
            len: 0,
        }
    }
}

impl fmt::Debug for FrameBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FrameBuf({} bytes)", self.len)
    }
}

impl FrameBuf {
    /// Size of the frame being collected: the header until it is complete, then the
    /// whole frame (checked to be at most [`MAX_ADU`] when the header completed).
    fn target(&self) -> usize {
        if self.len < HEADER_LEN {
            HEADER_LEN
        } else {
            HEADER_LEN - 1 + usize::from(u16::from_be_bytes([self.buf[4], self.buf[5]]))
        }
    }

    /// The bytes still missing from the frame, to be filled and then announced with
    /// [`FrameBuf::filled`]. Never more than the current frame needs, so bytes of
    /// the next frame are not read early.
    fn spare(&mut self) -> &mut [u8] {
        let target = self.target().min(MAX_ADU);
        &mut self.buf[self.len..target]
    }

    /// `n` bytes of [`FrameBuf::spare`] were filled. Checks the header once it is
    /// complete; after an error the buffer is empty again.
    fn filled(&mut self, n: usize) -> Result<(), FrameError> {
        let before = self.len;
        self.len = (self.len + n).min(self.target().min(MAX_ADU));
        if before < HEADER_LEN && self.len >= HEADER_LEN {
            let protocol = u16::from_be_bytes([self.buf[2], self.buf[3]]);
            let length = u16::from_be_bytes([self.buf[4], self.buf[5]]);
            let result = if protocol != 0 {
                Err(FrameError::Protocol(protocol))
            } else if !(MIN_LENGTH_FIELD..=MAX_LENGTH_FIELD).contains(&usize::from(length)) {
                Err(FrameError::Length(length))
            } else {
                Ok(())
            };
            if result.is_err() {
                self.len = 0;
            }
            return result;
        }
        Ok(())
    }

    /// Copies as much of `input` as the current frame needs; returns the number of
    /// bytes taken.
    /// Stops at the end of the frame, so a complete frame is taken before the next.
    pub fn push(&mut self, input: &[u8]) -> Result<usize, FrameError> {
        let mut taken = 0;
        while taken < input.len() && self.take_ready().is_none() {
            let rest = &input[taken..];
            let spare = self.spare();
            let n = spare.len().min(rest.len());
            spare[..n].copy_from_slice(&rest[..n]);
            self.filled(n)?;
            taken += n;
        }
        Ok(taken)
    }

    /// Whether bytes of an unfinished frame are held.
    pub fn is_partial(&self) -> bool {
        self.len > 0 && self.take_ready().is_none()
    }

    fn take_ready(&self) -> Option<&[u8]> {
        (self.len >= HEADER_LEN && self.len == self.target()).then(|| &self.buf[..self.len])
    }

    /// The complete frame, if there is one; the buffer starts the next frame.
    pub fn take(&mut self) -> Option<Frame> {
        let frame = Frame::from_slice(self.take_ready()?).ok()?;
        self.len = 0;
        Some(frame)
    }
}

/// The transaction ids of one bus, shared by its successive connections.
#[derive(Debug)]
pub struct Transactions {
    next: AtomicU16,
    discarded: AtomicU64,
}

impl Transactions {
    /// Ids starting at `start`.
    pub fn starting_at(start: u16) -> Transactions {
        Transactions {
            next: AtomicU16::new(start),
            discarded: AtomicU64::new(0),
        }
    }

    /// Ids starting at a random value, so that not even a restarted agent starts
    /// where a reply still in flight would match.
    pub fn random() -> Transactions {
        Transactions::starting_at(rand::random())
    }

    /// The id the next request gets.
    pub fn peek(&self) -> u16 {
        self.next.load(Ordering::Relaxed)
    }

    fn take(&self) -> u16 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// Reply frames discarded because they answered no outstanding request.
    pub fn discarded(&self) -> u64 {
        self.discarded.load(Ordering::Relaxed)
    }
}

/// A reply frame that matched no outstanding request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Discarded {
    /// Its transaction id.
    pub transaction_id: u16,
    /// The id the outstanding request has on the wire, if one is outstanding.
    pub expected: Option<u16>,
}

/// One connection's request/reply matching, free of I/O (the fuzz targets and the
/// property tests drive it directly).
#[derive(Debug)]
pub struct Exchange {
    transactions: Arc<Transactions>,
    /// (id on the wire, id tokio-modbus gave) of the request awaiting its reply.
    outstanding: Option<(u16, u16)>,
    request: FrameBuf,
    reply: FrameBuf,
}

impl Exchange {
    pub fn new(transactions: Arc<Transactions>) -> Exchange {
        Exchange {
            transactions,
            outstanding: None,
            request: FrameBuf::default(),
            reply: FrameBuf::default(),
        }
    }

    /// Takes request bytes; returns how many were taken and, once a request frame is
    /// complete, the frame to send with its transaction id replaced by the bus's
    /// next one. A new request replaces the outstanding one: a reply to the earlier
    /// request is discarded from then on.
    pub fn request(&mut self, input: &[u8]) -> Result<(usize, Option<Frame>), FrameError> {
        let n = self.request.push(input)?;
        let Some(mut frame) = self.request.take() else {
            return Ok((n, None));
        };
        let caller = u16::from_be_bytes([frame[0], frame[1]]);
        let wire = self.transactions.take();
        frame[..2].copy_from_slice(&wire.to_be_bytes());
        self.outstanding = Some((wire, caller));
        Ok((n, Some(frame)))
    }

    /// The reply bytes still needed for the frame being collected (read into this).
    fn reply_spare(&mut self) -> &mut [u8] {
        self.reply.spare()
    }

    /// `n` bytes of [`Exchange::reply_spare`] were filled: the matched reply (with
    /// tokio-modbus's id put back), a discarded frame, or nothing yet.
    fn reply_filled(&mut self, n: usize) -> Result<Option<Result<Frame, Discarded>>, FrameError> {
        self.reply.filled(n)?;
        let Some(mut frame) = self.reply.take() else {
            return Ok(None);
        };
        let id = u16::from_be_bytes([frame[0], frame[1]]);
        match self.outstanding {
            Some((wire, caller)) if wire == id => {
                frame[..2].copy_from_slice(&caller.to_be_bytes());
                self.outstanding = None;
                Ok(Some(Ok(frame)))
            }
            other => {
                self.transactions.discarded.fetch_add(1, Ordering::Relaxed);
                Ok(Some(Err(Discarded {
                    transaction_id: id,
                    expected: other.map(|(wire, _)| wire),
                })))
            }
        }
    }

    /// Takes reply bytes; returns how many were taken and, once a frame is complete,
    /// either the reply to the outstanding request or the discarded frame's ids.
    pub fn reply(
        &mut self,
        input: &[u8],
    ) -> Result<(usize, Option<Result<Frame, Discarded>>), FrameError> {
        let mut taken = 0;
        while taken < input.len() {
            let rest = &input[taken..];
            let spare = self.reply_spare();
            let n = spare.len().min(rest.len());
            spare[..n].copy_from_slice(&rest[..n]);
            taken += n;
            if let Some(out) = self.reply_filled(n)? {
                return Ok((taken, Some(out)));
            }
        }
        Ok((taken, None))
    }

    /// Whether part of a reply frame is held.
    pub fn reply_is_partial(&self) -> bool {
        self.reply.is_partial()
    }
}

/// The TCP stream as tokio-modbus sees it; see the module docs.
pub struct MbapTransport<T> {
    inner: T,
    exchange: Exchange,
    /// A rewritten request not yet fully written to `inner`.
    to_send: Frame,
    sent: usize,
    /// A matched reply not yet fully read by tokio-modbus.
    to_deliver: Frame,
    delivered: usize,
    /// Discarded frames on this connection (the first is logged as a warning).
    discarded_here: u64,
}

impl<T> fmt::Debug for MbapTransport<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MbapTransport")
            .field("exchange", &self.exchange)
            .finish_non_exhaustive()
    }
}

impl<T> MbapTransport<T> {
    pub fn new(inner: T, transactions: Arc<Transactions>) -> MbapTransport<T> {
        MbapTransport {
            inner,
            exchange: Exchange::new(transactions),
            to_send: Frame::new(),
            sent: 0,
            to_deliver: Frame::new(),
            delivered: 0,
            discarded_here: 0,
        }
    }
}

/// The error for the peer closing the connection.
pub fn closed_by_peer(mid_frame: bool) -> io::Error {
    let what = if mid_frame {
        "connection closed by the meter in the middle of a reply"
    } else {
        "connection closed by the meter"
    };
    io::Error::new(io::ErrorKind::UnexpectedEof, what)
}

impl<T: AsyncWrite + Unpin> MbapTransport<T> {
    /// Writes the rest of the pending request frame.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.to_send.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.to_send[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for MbapTransport<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.delivered < this.to_deliver.len() {
                let rest = &this.to_deliver[this.delivered..];
                let n = rest.len().min(buf.remaining());
                buf.put_slice(&rest[..n]);
                this.delivered += n;
                return Poll::Ready(Ok(()));
            }
            let mut spare = ReadBuf::new(this.exchange.reply_spare());
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut spare))?;
            let n = spare.filled().len();
            if n == 0 {
                return Poll::Ready(Err(closed_by_peer(this.exchange.reply_is_partial())));
            }
            match this.exchange.reply_filled(n)? {
                None => {}
                Some(Ok(frame)) => {
                    this.to_deliver = frame;
                    this.delivered = 0;
                }
                Some(Err(d)) => {
                    this.discarded_here += 1;
                    let discarded_total = this.exchange.transactions.discarded();
                    if this.discarded_here == 1 {
                        tracing::warn!(
                            transaction_id = d.transaction_id,
                            expected = ?d.expected,
                            discarded_total,
                            "discarded a Modbus TCP reply that answers no outstanding request (a late or stray reply)"
                        );
                    } else {
                        tracing::debug!(
                            transaction_id = d.transaction_id,
                            expected = ?d.expected,
                            discarded_total,
                            "discarded a Modbus TCP reply that answers no outstanding request"
                        );
                    }
                }
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for MbapTransport<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let (n, frame) = this
            .exchange
            .request(buf)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        if let Some(frame) = frame {
            this.to_send = frame;
            this.sent = 0;
            // Start writing now; the rest goes out on the next write or flush.
            if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(id: u16, unit: u8, pdu: &[u8]) -> Vec<u8> {
        let mut out = id.to_be_bytes().to_vec();
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&((pdu.len() + 1) as u16).to_be_bytes());
        out.push(unit);
        out.extend_from_slice(pdu);
        out
    }

    /// Feeds `bytes` in chunks of the given sizes; returns the passed replies and the
    /// ids of the discarded ones, or the first framing error.
    fn feed_replies(
        ex: &mut Exchange,
        bytes: &[u8],
        chunks: &[usize],
    ) -> Result<(Vec<Frame>, Vec<u16>), FrameError> {
        let (mut passed, mut dropped) = (Vec::new(), Vec::new());
        let mut rest = bytes;
        let mut sizes = chunks.iter().cycle();
        while !rest.is_empty() {
            let size = sizes.next().copied().unwrap_or(1).clamp(1, rest.len());
            let mut chunk = &rest[..size];
            rest = &rest[size..];
            while !chunk.is_empty() {
                let (n, out) = ex.reply(chunk)?;
                chunk = &chunk[n..];
                match out {
                    Some(Ok(f)) => passed.push(f),
                    Some(Err(d)) => dropped.push(d.transaction_id),
                    None => {}
                }
            }
        }
        Ok((passed, dropped))
    }

    #[test]
    fn ids_move_across_connections_and_map_back() {
        let t = Arc::new(Transactions::starting_at(0xFFFE));
        let mut first = Exchange::new(t.clone());
        let req = frame(0, 1, &[4, 0, 0, 0, 2]);
        let (n, sent) = first.request(&req).expect("valid request");
        assert_eq!(n, req.len());
        let sent = sent.expect("complete frame");
        assert_eq!(&sent[..2], &0xFFFEu16.to_be_bytes());
        assert_eq!(&sent[2..], &req[2..]);
        // A new connection: tokio-modbus starts at 0 again, the wire id moves on.
        let mut second = Exchange::new(t.clone());
        let (_, sent) = second.request(&req).expect("valid request");
        assert_eq!(&sent.expect("frame")[..2], &0xFFFFu16.to_be_bytes());
        // The first connection's reply reaches the second: discarded.
        let stale = frame(0xFFFE, 1, &[4, 4, 0, 1, 0, 2]);
        let fresh = frame(0xFFFF, 1, &[4, 4, 0, 3, 0, 4]);
        let both = [stale.clone(), fresh.clone()].concat();
        let (passed, dropped) = feed_replies(&mut second, &both, &[3]).expect("valid frames");
        assert_eq!(dropped, vec![0xFFFE]);
        assert_eq!(passed.len(), 1);
        assert_eq!(&passed[0][..2], &[0, 0], "tokio-modbus's own id put back");
        assert_eq!(&passed[0][2..], &fresh[2..]);
        assert_eq!(t.discarded(), 1);
        // Ids wrap.
        let (_, sent) = second.request(&req).expect("valid request");
        assert_eq!(&sent.expect("frame")[..2], &[0, 0]);
        // A duplicate of an answered reply is discarded too.
        let (passed, dropped) = feed_replies(&mut second, &fresh, &[260]).expect("valid");
        assert!(passed.is_empty());
        assert_eq!(dropped, vec![0xFFFF]);
    }

    #[test]
    fn oversized_or_foreign_frames_are_errors() {
        let t = Arc::new(Transactions::starting_at(7));
        let mut ex = Exchange::new(t);
        let mut big = frame(7, 1, &[4]);
        big[4..6].copy_from_slice(&255u16.to_be_bytes());
        assert_eq!(
            feed_replies(&mut ex, &big, &[1]),
            Err(FrameError::Length(255))
        );
        let mut empty = frame(7, 1, &[]);
        empty[4..6].copy_from_slice(&1u16.to_be_bytes());
        assert_eq!(
            feed_replies(&mut ex, &empty, &[7]),
            Err(FrameError::Length(1))
        );
        let mut foreign = frame(7, 1, &[4, 0]);
        foreign[2..4].copy_from_slice(&0x1234u16.to_be_bytes());
        let e = feed_replies(&mut ex, &foreign, &[9]).expect_err("protocol id");
        assert_eq!(e, FrameError::Protocol(0x1234));
        assert_eq!(
            e.to_string(),
            "MBAP header: protocol id is 4660, expected 0 (Modbus)"
        );
        assert!(FrameError::Length(300)
            .to_string()
            .contains("length field is 300"));
    }

    /// Over a real socket with tokio-modbus's client: a reply header announcing a
    /// 64 KiB frame is refused at the header (nothing of it is buffered), and a
    /// stray reply before the real one is discarded and counted.
    #[tokio::test]
    async fn over_a_socket_with_tokio_modbus() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio_modbus::client::Client;
        use tokio_modbus::{Request, Response, Slave};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let mut request = [0u8; 12];
            let serve = |request: [u8; 12], id_delta: u16| {
                let id = u16::from_be_bytes([request[0], request[1]]).wrapping_add(id_delta);
                frame(id, request[6], &[4, 2, 0x12, 0x34])
            };
            // First request: a stray frame, then the answer.
            if stream.read_exact(&mut request).await.is_err() {
                return;
            }
            let both = [serve(request, 1), serve(request, 0)].concat();
            let _ = stream.write_all(&both).await;
            // Second request: a header announcing 65535 bytes, then bytes that never end.
            if stream.read_exact(&mut request).await.is_err() {
                return;
            }
            let mut huge = frame(u16::from_be_bytes([request[0], request[1]]), 1, &[4, 2]);
            huge[4..6].copy_from_slice(&u16::MAX.to_be_bytes());
            let _ = stream.write_all(&huge).await;
            let _ = stream.write_all(&[0u8; 4096]).await;
        });
        let t = Arc::new(Transactions::random());
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut ctx = tokio_modbus::client::tcp::attach_slave(
            MbapTransport::new(stream, t.clone()),
            Slave(1),
        );
        let reply = ctx
            .call(Request::ReadInputRegisters(0, 1))
            .await
            .expect("transport")
            .expect("no exception");
        assert_eq!(reply, Response::ReadInputRegisters(vec![0x1234]));
        assert_eq!(t.discarded(), 1);
        let e = ctx
            .call(Request::ReadInputRegisters(0, 1))
            .await
            .expect_err("oversized frame");
        assert!(e.to_string().contains("length field is 65535"), "{e}");
        server.abort();
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Arbitrary bytes split arbitrarily: no panic, no frame over MAX_ADU, and
        /// nothing but the outstanding request's id passed on.
        #[test]
        fn arbitrary_reply_streams(
            bytes in prop::collection::vec(any::<u8>(), 0..1200),
            chunks in prop::collection::vec(1usize..300, 1..8),
            start in any::<u16>(),
            caller in any::<u16>(),
        ) {
            let t = Arc::new(Transactions::starting_at(start));
            let mut ex = Exchange::new(t.clone());
            let (_, sent) = ex.request(&frame(caller, 1, &[3, 0, 0, 0, 1])).expect("valid");
            prop_assert!(sent.is_some());
            match feed_replies(&mut ex, &bytes, &chunks) {
                Ok((passed, dropped)) => {
                    prop_assert!(passed.len() <= 1, "one reply per request");
                    for f in &passed {
                        prop_assert!(f.len() <= MAX_ADU && f.len() > HEADER_LEN);
                        prop_assert_eq!(&f[..2], &caller.to_be_bytes());
                    }
                    prop_assert!(!dropped.contains(&start) || passed.len() == 1);
                    prop_assert_eq!(t.discarded(), dropped.len() as u64);
                }
                Err(FrameError::Length(n)) => prop_assert!(!(2..=254).contains(&n)),
                Err(FrameError::Protocol(p)) => prop_assert_ne!(p, 0),
            }
        }

        /// Well-formed frames with random ids and PDUs, split arbitrarily: exactly
        /// the one with the outstanding id is passed, whole and unchanged but its id.
        #[test]
        fn well_formed_streams_pass_only_the_match(
            frames in prop::collection::vec((any::<u16>(), prop::collection::vec(any::<u8>(), 1..253)), 0..6),
            at in 0usize..6,
            pdu in prop::collection::vec(any::<u8>(), 1..253),
            chunks in prop::collection::vec(1usize..400, 1..8),
            start in any::<u16>(),
        ) {
            let t = Arc::new(Transactions::starting_at(start));
            let mut ex = Exchange::new(t.clone());
            ex.request(&frame(9, 1, &[3, 0, 0, 0, 1])).expect("valid");
            let mut stream: Vec<Vec<u8>> = frames
                .iter()
                .filter(|(id, _)| *id != start)
                .map(|(id, p)| frame(*id, 1, p))
                .collect();
            let expected = frame(start, 1, &pdu);
            stream.insert(at.min(stream.len()), expected.clone());
            let others = stream.len() - 1;
            let (passed, dropped) = feed_replies(&mut ex, &stream.concat(), &chunks).expect("valid frames");
            prop_assert_eq!(passed.len(), 1);
            prop_assert_eq!(&passed[0][..2], &9u16.to_be_bytes());
            prop_assert_eq!(&passed[0][2..], &expected[2..]);
            prop_assert_eq!(dropped.len(), others);
        }
    }
}
