//! What goes over the wire upstream: record batches (CBOR, compact records), manifests and resend
//! requests (JSON), and the topics they use.
//!
//! # Topics (`{prefix}` is `upstream.topic_prefix`, `{gw}` the gateway id)
//!
//! | topic                       | direction | QoS | retained | payload                    |
//! |-----------------------------|-----------|-----|----------|----------------------------|
//! | `{prefix}/{gw}/status`      | up        | 1   | yes      | `online` / `offline` (will) |
//! | `{prefix}/{gw}/records`     | up        | 1   | no       | batch, CBOR (below)         |
//! | `{prefix}/{gw}/manifest`    | up        | 1   | no       | manifest, JSON (below)      |
//! | `{prefix}/{gw}/cmd/resend`  | down      | 1   | no       | `{"from":N,"to":M}`         |
//!
//! # Batch
//!
//! A CBOR map (`docs/upstream-format.md` has the full format and a decoder in
//! another language):
//!
//! ```text
//! { "v": 2, "gw": text, "recs": [ [d: uint, data: bytes], ... ], "schemas": [ bytes, ... ] }
//! ```
//!
//! Records are in ascending seq order; a record's seq is the previous one's plus `d`
//! (the first `d` is the seq itself). `data` holds the record exactly as the gateway
//! stored it: compact (`store::codec`: a reading by schema, or a tag byte and the
//! CBOR of any other payload), or, for a record of a version 1 block, the CBOR of
//! `{ "seq": uint, "payload": { kind: {...} } }`. Keeping the stored bytes lets the
//! upstream side check a manifest's CRC.
//!
//! `schemas` holds encoded schemas (`store::codec`) the records refer to: in the
//! live stream, those not yet sent on the current connection (every reconnect
//! starts afresh); in a resent batch, all of them. A consumer that joined in the
//! middle of a connection and meets an unknown schema asks for a resend of that
//! reading. Batches of the live stream are in ascending seq order and contiguous
//! apart from quarantined records; resent batches repeat earlier seqs. Subscribers
//! drop duplicates by `(gw, seq)`.
//!
//! # Manifest
//!
//! ```json
//! {"gw":"gw-01","from":1001,"to":2000,"count":1000,"crc32c":3735928559,"ts_ms":1700000000000}
//! ```
//!
//! `count` and `crc32c` (CRC-32C over the concatenated `data` bytes of the records
//! in `from..=to`, in seq order) cover every readable record of the range;
//! consecutive manifests cover consecutive ranges of acknowledged records.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::model::Record;
use crate::store::codec::{DecodeError, Schema};
use crate::store::RawRecord;

/// Topic names of one gateway upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTopics {
    pub status: String,
    pub records: String,
    pub manifest: String,
    pub resend: String,
}

impl UpstreamTopics {
    pub fn new(prefix: &str, gateway: &str) -> UpstreamTopics {
        let base = format!("{prefix}/{gateway}");
        UpstreamTopics {
            status: format!("{base}/status"),
            records: format!("{base}/records"),
            manifest: format!("{base}/manifest"),
            resend: format!("{base}/cmd/resend"),
        }
    }
}

/// A manifest: what the gateway vouches it delivered in `from..=to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest<'a> {
    #[serde(borrow)]
    pub gw: &'a str,
    pub from: u64,
    pub to: u64,
    pub count: u64,
    pub crc32c: u32,
    pub ts_ms: i64,
}

/// A resend request received on the command topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResendRequest {
    pub from: u64,
    pub to: u64,
}

impl ResendRequest {
    /// Parses and bounds a request: `1 <= from <= to`, at most `max_span` seqs.
    pub fn parse(payload: &[u8], max_span: u64) -> Result<ResendRequest, String> {
        let req: ResendRequest = serde_json::from_slice(payload)
            .map_err(|e| format!("not a {{\"from\":N,\"to\":M}} request: {e}"))?;
        if req.from == 0 || req.from > req.to {
            return Err(format!(
                "range {}..={} is empty or starts at 0",
                req.from, req.to
            ));
        }
        if req.to - req.from >= max_span {
            return Err(format!(
                "range {}..={} spans more than {max_span} seqs",
                req.from, req.to
            ));
        }
        Ok(req)
    }
}

/// Appends a CBOR head (major type and argument) in its shortest form.
fn head(out: &mut Vec<u8>, major: u8, arg: u64) {
    let m = major << 5;
    if arg < 24 {
        out.push(m | arg as u8);
    } else if arg <= u8::MAX as u64 {
        out.extend_from_slice(&[m | 24, arg as u8]);
    } else if arg <= u16::MAX as u64 {
        out.push(m | 25);
        out.extend_from_slice(&(arg as u16).to_be_bytes());
    } else if arg <= u32::MAX as u64 {
        out.push(m | 26);
        out.extend_from_slice(&(arg as u32).to_be_bytes());
    } else {
        out.push(m | 27);
        out.extend_from_slice(&arg.to_be_bytes());
    }
}

fn text(out: &mut Vec<u8>, s: &str) {
    head(out, 3, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// Reads a CBOR head at `pos`: (major type, argument, position after it).
fn read_head(buf: &[u8], pos: usize) -> Option<(u8, u64, usize)> {
    let b = *buf.get(pos)?;
    let (major, info) = (b >> 5, b & 0x1f);
    let n = match info {
        0..=23 => return Some((major, info as u64, pos + 1)),
        24 => 1,
        25 => 2,
        26 => 4,
        27 => 8,
        _ => return None,
    };
    let bytes = buf.get(pos + 1..pos + 1 + n)?;
    let arg = bytes.iter().fold(0u64, |acc, b| (acc << 8) | *b as u64);
    Some((major, arg, pos + 1 + n))
}

fn read_text(buf: &[u8], pos: usize) -> Option<(&str, usize)> {
    let (major, len, at) = read_head(buf, pos)?;
    if major != 3 {
        return None;
    }
    let end = at.checked_add(usize::try_from(len).ok()?)?;
    Some((std::str::from_utf8(buf.get(at..end)?).ok()?, end))
}

/// Seq and payload kind of a stored record, read from the first bytes of its CBOR
/// (`{"seq": n, "payload": {kind: ...}}`) without decoding the rest.
pub fn peek_record(bytes: &[u8]) -> Option<(u64, &str)> {
    let (major, len, pos) = read_head(bytes, 0)?;
    if major != 5 || len != 2 {
        return None;
    }
    let (key, pos) = read_text(bytes, pos)?;
    if key != "seq" {
        return None;
    }
    let (major, seq, pos) = read_head(bytes, pos)?;
    if major != 0 {
        return None;
    }
    let (key, pos) = read_text(bytes, pos)?;
    if key != "payload" {
        return None;
    }
    let (major, len, pos) = read_head(bytes, pos)?;
    if major != 5 || len != 1 {
        return None;
    }
    read_text(bytes, pos).map(|(kind, _)| (seq, kind))
}

/// Encodes a batch of stored records for gateway `gw` (see the module doc), with
/// every schema its readings refer to (`schema` gives a schema's encoded bytes).
pub fn encode_batch(
    gw: &str,
    records: &[RawRecord],
    schema: &dyn Fn(u32) -> Option<Vec<u8>>,
    out: &mut Vec<u8>,
) {
    let mut batch = BatchEncoder::new(gw, out);
    for rec in records {
        batch.push(rec.seq, &rec.bytes);
    }
    let ids = batch.finish();
    let schemas: Vec<Vec<u8>> = ids.into_iter().filter_map(schema).collect();
    append_schemas(out, &schemas);
}

/// Version of the batch format (key `v`).
pub const BATCH_VERSION: u64 = 2;

/// Most bytes of a CBOR head.
const HEAD_MAX: usize = 9;

/// Builds a batch one record at a time, e.g. straight from the store's blocks
/// ([`crate::store::Store::visit_raw`]), without a copy of each record first.
/// [`BatchEncoder::finish`] names the schemas the records refer to; the batch is
/// complete once [`append_schemas`] has added the ones the receiver needs.
pub struct BatchEncoder<'a> {
    out: &'a mut Vec<u8>,
    header: Vec<u8>,
    count: u64,
    last_seq: u64,
    schemas: std::collections::BTreeSet<u32>,
}

impl<'a> BatchEncoder<'a> {
    /// Starts a batch in `out` (cleared).
    pub fn new(gw: &str, out: &'a mut Vec<u8>) -> Self {
        let mut header = Vec::with_capacity(16 + gw.len());
        head(&mut header, 5, 4);
        text(&mut header, "v");
        head(&mut header, 0, BATCH_VERSION);
        text(&mut header, "gw");
        text(&mut header, gw);
        text(&mut header, "recs");
        out.clear();
        out.resize(header.len() + HEAD_MAX, 0);
        BatchEncoder {
            out,
            header,
            count: 0,
            last_seq: 0,
            schemas: Default::default(),
        }
    }

    /// Appends one stored record; seqs must ascend.
    pub fn push(&mut self, seq: u64, bytes: &[u8]) {
        debug_assert!(seq > self.last_seq, "seqs ascend within a batch");
        let out = &mut *self.out;
        head(out, 4, 2);
        head(out, 0, seq.wrapping_sub(self.last_seq));
        head(out, 2, bytes.len() as u64);
        out.extend_from_slice(bytes);
        self.last_seq = seq;
        self.count += 1;
        if let Some(id) = crate::store::codec::peek_schema(bytes) {
            self.schemas.insert(id);
        }
    }

    /// Writes the header. `out` then holds the batch up to its `schemas` array,
    /// which [`append_schemas`] adds; returns the schema ids the records refer to.
    pub fn finish(self) -> Vec<u32> {
        let room = self.header.len() + HEAD_MAX;
        let mut header = self.header;
        head(&mut header, 4, self.count);
        let at = room - header.len();
        self.out[at..room].copy_from_slice(&header);
        self.out.drain(..at);
        self.schemas.into_iter().collect()
    }
}

/// Ends a batch that [`BatchEncoder::finish`] left in `out`: its `schemas` array.
pub fn append_schemas(out: &mut Vec<u8>, schemas: &[Vec<u8>]) {
    text(out, "schemas");
    head(out, 4, schemas.len() as u64);
    for s in schemas {
        head(out, 2, s.len() as u64);
        out.extend_from_slice(s);
    }
}

/// One element of a received batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireRecord {
    pub gw: String,
    pub seq: u64,
    /// Payload kind (`reading`, `interval`, `event`, `dropped`); empty when the
    /// record's head does not say.
    pub kind: String,
    /// The record's stored bytes.
    pub data: Vec<u8>,
}

/// A received batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub gw: String,
    pub records: Vec<WireRecord>,
    pub schemas: Vec<Schema>,
}

/// Payload kind of a stored record: compact, or the CBOR of a version 1 block.
pub fn record_kind(bytes: &[u8]) -> Option<&str> {
    peek_record(bytes)
        .map(|(_, k)| k)
        .or_else(|| crate::store::codec::peek_kind(bytes))
}

/// Decodes a batch; `Err` names what is wrong.
pub fn decode(payload: &[u8]) -> Result<Batch, String> {
    let value: ciborium::Value =
        ciborium::from_reader(payload).map_err(|e| format!("not CBOR: {e}"))?;
    let map = value.into_map().map_err(|_| "batch is not a CBOR map")?;
    let mut batch = Batch {
        gw: String::new(),
        records: Vec::new(),
        schemas: Vec::new(),
    };
    let mut version = None;
    let mut recs = Vec::new();
    for (k, v) in map {
        match k.as_text() {
            Some("v") => version = v.as_integer().and_then(|i| u64::try_from(i).ok()),
            Some("gw") => batch.gw = v.into_text().map_err(|_| "gw is not text")?,
            Some("recs") => recs = v.into_array().map_err(|_| "recs is not an array")?,
            Some("schemas") => {
                for s in v.into_array().map_err(|_| "schemas is not an array")? {
                    let bytes = s.into_bytes().map_err(|_| "a schema is not bytes")?;
                    let schema = crate::store::codec::decode_schema(&bytes)
                        .map_err(|e| format!("schema: {e}"))?;
                    batch.schemas.push(schema);
                }
            }
            _ => {}
        }
    }
    if version != Some(BATCH_VERSION) {
        return Err(format!(
            "batch version {version:?}, expected {BATCH_VERSION}"
        ));
    }
    if batch.gw.is_empty() {
        return Err("batch lacks gw".into());
    }
    let mut seq = 0u64;
    for item in recs {
        let pair = item.into_array().map_err(|_| "a record is not an array")?;
        let [d, data]: [ciborium::Value; 2] = pair
            .try_into()
            .map_err(|_| "a record is not a pair [seq delta, data]")?;
        let d = d
            .as_integer()
            .and_then(|i| u64::try_from(i).ok())
            .filter(|&d| d > 0)
            .ok_or("seq delta is not a positive integer")?;
        seq = seq.checked_add(d).ok_or("seq overflows")?;
        let data = data.into_bytes().map_err(|_| "data is not bytes")?;
        batch.records.push(WireRecord {
            gw: batch.gw.clone(),
            seq,
            kind: record_kind(&data).unwrap_or_default().to_string(),
            data,
        });
    }
    Ok(batch)
}

/// Decodes a batch's records; `Err` names what is wrong.
pub fn decode_batch(payload: &[u8]) -> Result<Vec<WireRecord>, String> {
    decode(payload).map(|b| b.records)
}

/// An upstream consumer's decoder: learns the schemas batches carry, per gateway,
/// and decodes records with them.
#[derive(Debug, Default)]
pub struct Decoder {
    schemas: HashMap<String, HashMap<u32, Arc<Schema>>>,
}

impl Decoder {
    /// Decodes a batch and learns its schemas.
    pub fn batch(&mut self, payload: &[u8]) -> Result<Batch, String> {
        let batch = decode(payload)?;
        let known = self.schemas.entry(batch.gw.clone()).or_default();
        for s in &batch.schemas {
            if known.len() < crate::store::codec::MAX_SCHEMAS || known.contains_key(&s.id) {
                known.insert(s.id, Arc::new(s.clone()));
            }
        }
        Ok(batch)
    }

    /// The schemas learnt for gateway `gw`, by id.
    pub fn schemas_of(&self, gw: &str) -> Vec<Arc<Schema>> {
        let mut out: Vec<Arc<Schema>> = self
            .schemas
            .get(gw)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        out.sort_by_key(|s| s.id);
        out
    }

    /// Learns a schema of gateway `gw` (one kept from an earlier run, say), within
    /// the same bound as [`Decoder::batch`].
    pub fn learn(&mut self, gw: &str, schema: Schema) {
        let known = self.schemas.entry(gw.to_string()).or_default();
        if known.len() < crate::store::codec::MAX_SCHEMAS || known.contains_key(&schema.id) {
            known.insert(schema.id, Arc::new(schema));
        }
    }

    /// Whether schema `id` of gateway `gw` is known.
    pub fn knows(&self, gw: &str, id: u32) -> bool {
        self.schemas.get(gw).is_some_and(|m| m.contains_key(&id))
    }

    /// Decodes one record of gateway `gw` with the schemas learnt so far.
    pub fn record(&self, gw: &str, data: &[u8]) -> Result<Record, DecodeError> {
        let known = self.schemas.get(gw);
        crate::store::codec::decode_stored(data, &|id| known.and_then(|m| m.get(&id)).cloned())
    }
}

/// CRC-32C of `a ++ b` from `crc(a)`, `crc(b)` and `b`'s length (zlib's method:
/// advance `crc(a)` over `len_b` zero bytes with GF(2) matrix squaring).
pub fn crc32c_combine(crc_a: u32, crc_b: u32, len_b: u64) -> u32 {
    fn times(mat: &[u32; 32], mut vec: u32) -> u32 {
        let mut sum = 0;
        let mut i = 0;
        while vec != 0 {
            if vec & 1 != 0 {
                sum ^= mat[i];
            }
            vec >>= 1;
            i += 1;
        }
        sum
    }
    fn square(out: &mut [u32; 32], mat: &[u32; 32]) {
        for n in 0..32 {
            out[n] = times(mat, mat[n]);
        }
    }
    if len_b == 0 {
        return crc_a;
    }
    let mut even = [0u32; 32];
    let mut odd = [0u32; 32];
    // The operator for one zero bit: the reflected Castagnoli polynomial.
    odd[0] = 0x82F6_3B78;
    let mut row = 1;
    for slot in odd.iter_mut().skip(1) {
        *slot = row;
        row <<= 1;
    }
    square(&mut even, &odd); // two zero bits
    square(&mut odd, &even); // four zero bits
    let mut crc = crc_a;
    let mut len = len_b;
    loop {
        square(&mut even, &odd);
        if len & 1 != 0 {
            crc = times(&even, crc);
        }
        len >>= 1;
        if len == 0 {
            break;
        }
        square(&mut odd, &even);
        if len & 1 != 0 {
            crc = times(&odd, crc);
        }
        len >>= 1;
        if len == 0 {
            break;
        }
    }
    crc ^ crc_b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Kind, Payload, Reading, Value};
    use crate::store::crc32c;

    fn stored(seq: u64) -> Vec<u8> {
        let rec = Record {
            seq,
            payload: Payload::Reading(Reading {
                meter: "main".into(),
                ts_ms: 1_700_000_000_000,
                values: vec![Value {
                    quantity: "power".into(),
                    unit: "W".into(),
                    kind: Kind::Power,
                    value: Some(230.5),
                    invalid: None,
                    source: Default::default(),
                }],
            }),
        };
        let mut out = Vec::new();
        ciborium::into_writer(&rec, &mut out).expect("encode");
        out
    }

    #[test]
    fn peek_reads_seq_and_kind_of_stored_records() {
        for seq in [1, 23, 24, 255, 256, 70_000, 5_000_000_000] {
            assert_eq!(peek_record(&stored(seq)), Some((seq, "reading")));
        }
        assert_eq!(peek_record(b"\xff"), None);
        assert_eq!(peek_record(&[]), None);
    }

    fn reading(seq: u64) -> Record {
        let mut rec: Record = ciborium::from_reader(&stored(seq)[..]).expect("record");
        if let Payload::Reading(r) = &mut rec.payload {
            r.values[0].value = Some(seq as f64 + 0.5);
        }
        rec
    }

    fn schema() -> Schema {
        Schema {
            id: 1,
            meter: "main".into(),
            fields: vec![crate::store::codec::Field {
                quantity: "power".into(),
                unit: "W".into(),
                kind: Kind::Power,
                source: Default::default(),
            }],
        }
    }

    fn compact(seq: u64) -> Vec<u8> {
        let mut out = Vec::new();
        crate::store::codec::encode_record(&mut out, &reading(seq), Some(1)).expect("encodes");
        out
    }

    fn schema_bytes(id: u32) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        crate::store::codec::encode_schema(&schema(), &mut out);
        (id == 1).then_some(out)
    }

    #[test]
    fn batch_round_trips_and_decodes_with_a_generic_cbor_reader() {
        // Compact records, a gap (a quarantined seq), and version 1 records.
        let records: Vec<RawRecord> = [300, 301, 303, 70_000]
            .into_iter()
            .map(|seq| RawRecord {
                seq,
                bytes: compact(seq),
            })
            .chain((70_001..70_003).map(|seq| RawRecord {
                seq,
                bytes: stored(seq),
            }))
            .collect();
        let mut buf = Vec::new();
        encode_batch("gw-1", &records, &schema_bytes, &mut buf);
        let batch = decode(&buf).expect("decodes");
        assert_eq!(batch.gw, "gw-1");
        assert_eq!(batch.schemas, vec![schema()]);
        assert_eq!(batch.records.len(), 6);
        let mut decoder = Decoder::default();
        decoder.batch(&buf).expect("decodes");
        for (w, r) in batch.records.iter().zip(&records) {
            assert_eq!(
                (w.gw.as_str(), w.seq, w.kind.as_str()),
                ("gw-1", r.seq, "reading")
            );
            assert_eq!(w.data, r.bytes);
            let rec = decoder.record("gw-1", &w.data).expect("record");
            assert_eq!(rec.seq, r.seq);
            if r.seq < 70_001 {
                assert_eq!(rec, reading(r.seq));
            }
        }
        // Without the schema, a compact reading does not decode.
        assert!(Decoder::default().record("gw-1", &compact(300)).is_err());
        // The batch is plain CBOR.
        let generic: ciborium::Value = ciborium::from_reader(&buf[..]).expect("CBOR");
        assert_eq!(generic.as_map().map(Vec::len), Some(4));
        assert!(decode_batch(b"\x01").is_err());
        assert!(decode_batch(b"garbage").is_err());
    }

    /// The worked example of `docs/upstream-format.md`, byte for byte.
    #[test]
    fn the_documented_example_batch_is_what_the_encoder_writes() {
        let rec = Record {
            seq: 1,
            payload: Payload::Reading(Reading {
                meter: "pv".into(),
                ts_ms: 1_700_000_000_000,
                values: vec![Value {
                    quantity: "power".into(),
                    unit: "W".into(),
                    kind: Kind::Power,
                    value: Some(230.1f32 as f64),
                    invalid: None,
                    source: Default::default(),
                }],
            }),
        };
        let mut data = Vec::new();
        crate::store::codec::encode_record(&mut data, &rec, Some(1)).expect("encodes");
        let s = Schema {
            meter: "pv".into(),
            ..schema()
        };
        let mut out = Vec::new();
        encode_batch(
            "gw-01",
            &[RawRecord {
                seq: 1,
                bytes: data,
            }],
            &|_| {
                let mut b = Vec::new();
                crate::store::codec::encode_schema(&s, &mut b);
                Some(b)
            },
            &mut out,
        );
        let hex: String = out.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            concat!(
                "a4",
                "6176",
                "02",
                "626777",
                "6567772d3031",
                "6472656373",
                "81",
                "82",
                "01",
                "4e",
                "01",
                "01",
                "01",
                "80a0abfef962",
                "00",
                "9a196643",
                "67736368656d6173",
                "81",
                "50",
                "01",
                "01",
                "027076",
                "01",
                "05706f776572",
                "0157",
                "00",
                "00",
            )
        );
        let mut decoder = Decoder::default();
        let batch = decoder.batch(&out).expect("decodes");
        assert_eq!(decoder.record("gw-01", &batch.records[0].data), Ok(rec));
    }

    #[test]
    fn a_reading_on_the_wire_takes_a_quarter_of_the_bytes_it_took_before() {
        use crate::sync::bench::upstream_bytes_per_reading;
        // A backlog's batch, with the schema; a live batch of one reading, after it.
        for (n, with_schema) in [(500, true), (50, true), (1, false)] {
            let (before, after) = upstream_bytes_per_reading(n, 1_000_000, with_schema);
            assert!(
                after * 4.0 <= before,
                "batches of {n}: {after} bytes per reading, {before} before"
            );
        }
    }

    #[test]
    fn resend_requests_are_validated_and_bounded() {
        assert_eq!(
            ResendRequest::parse(br#"{"from":5,"to":9}"#, 100),
            Ok(ResendRequest { from: 5, to: 9 })
        );
        for bad in [
            &br#"{"from":9,"to":5}"#[..],
            br#"{"from":0,"to":5}"#,
            br#"{"from":1,"to":101}"#,
            br#"{"from":"a","to":5}"#,
            br#"{"from":1,"to":2,"x":1}"#,
            b"\xff\xfe",
            b"",
        ] {
            assert!(ResendRequest::parse(bad, 100).is_err(), "{bad:?}");
        }
        assert!(ResendRequest::parse(br#"{"from":1,"to":100}"#, 100).is_ok());
    }

    #[test]
    fn crc_combine_matches_crc_of_concatenation() {
        let a = b"the first part of the stream".repeat(7);
        let b = b"and the second, somewhat longer part".repeat(13);
        let whole: Vec<u8> = a.iter().chain(b.iter()).copied().collect();
        assert_eq!(
            crc32c_combine(crc32c(&a), crc32c(&b), b.len() as u64),
            crc32c(&whole)
        );
        assert_eq!(crc32c_combine(crc32c(&a), crc32c(b""), 0), crc32c(&a));
    }
}
