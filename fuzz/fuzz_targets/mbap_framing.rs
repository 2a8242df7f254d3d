//! The Modbus TCP reply framing on arbitrary byte streams split arbitrarily: never a
//! panic, never a frame over 260 bytes, never a reply with another transaction id
//! than the outstanding request's passed on, at most one reply per request.
#![no_main]

use std::sync::Arc;

use edge_agent::acquire::mbap::{Exchange, FrameError, Transactions, HEADER_LEN, MAX_ADU};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Layout: start id (2 bytes), caller's id (2), chunk sizes (4), then the stream.
    if data.len() < 8 {
        return;
    }
    let start = u16::from_be_bytes([data[0], data[1]]);
    let caller = u16::from_be_bytes([data[2], data[3]]);
    let chunks = &data[4..8];
    let stream = &data[8..];
    let transactions = Arc::new(Transactions::starting_at(start));
    let mut exchange = Exchange::new(transactions.clone());
    let mut request = caller.to_be_bytes().to_vec();
    request.extend_from_slice(&[0, 0, 0, 6, 1, 3, 0, 0, 0, 1]);
    let (taken, sent) = exchange.request(&request).expect("a valid request frame");
    assert_eq!(taken, request.len());
    let sent = sent.expect("a complete request frame");
    assert_eq!(&sent[..2], &start.to_be_bytes());

    let mut passed = 0;
    let mut discarded = 0u64;
    let mut rest = stream;
    let mut sizes = chunks.iter().cycle();
    while !rest.is_empty() {
        let size = usize::from(*sizes.next().unwrap_or(&1)).clamp(1, rest.len());
        let mut chunk = &rest[..size];
        rest = &rest[size..];
        while !chunk.is_empty() {
            let (n, out) = match exchange.reply(chunk) {
                Ok(r) => r,
                Err(FrameError::Length(n)) => {
                    assert!(!(2..=254).contains(&n));
                    return;
                }
                Err(FrameError::Protocol(p)) => {
                    assert_ne!(p, 0);
                    return;
                }
            };
            assert!(n > 0, "progress on non-empty input");
            chunk = &chunk[n..];
            match out {
                Some(Ok(frame)) => {
                    assert!(frame.len() > HEADER_LEN && frame.len() <= MAX_ADU);
                    assert_eq!(&frame[..2], &caller.to_be_bytes());
                    passed += 1;
                }
                Some(Err(d)) => {
                    assert!(passed == 1 || d.transaction_id != start);
                    discarded += 1;
                }
                None => {}
            }
        }
    }
    assert!(passed <= 1);
    assert_eq!(transactions.discarded(), discarded);
});
