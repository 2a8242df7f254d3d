//! The compact record encoding of block version 2, and the schemas it refers to.
//!
//! A reading stores its values by position in a *schema*: the meter and the list of
//! its values' quantity, unit, kind and source type. A schema is a record of its
//! own, kept in the `schemas` tree (key: big-endian u32 id) for as long as the store
//! lives, whatever the quota or retention deletes; ids are assigned by the store,
//! from 1, and never reused. A reading that has the same meter and field list as a
//! schema seen before refers to that schema's id; another field list gets a new
//! schema. Upstream, every batch carries the schemas its readings need (see
//! `sync::wire` and `docs/upstream-format.md`).
//!
//! All integers below are LEB128 varints (`varint`), signed ones zigzag-mapped first
//! (`zigzag`); text is a varint byte length followed by UTF-8; floats are IEEE 754
//! bits, little-endian.
//!
//! ```text
//! record  = reading | other
//! reading = u8 1, varint seq, varint schema id, zigzag ts_ms,
//!           status bitmap (ceil(n/8) bytes; bit i = byte i/8, bit i%8, LSB first),
//!           for each field i of the schema, in order:
//!             bit clear: the value in the field's natural form:
//!                        source 0 (f32): 4 bytes f32 | 1 (int): zigzag i64 | 2 (f64): 8 bytes f64
//!             bit set:   u8 code: 0 no value | 1 no value, NaN | 2 no value, infinite
//!                        | 3 no value, out of range | 4 value as 8 bytes f64
//!                        | 5 no value, not implemented (SunSpec)
//! other   = u8 2, varint seq, CBOR of model::Payload ({"interval": {...}}, {"event": ...},
//!           {"dropped": ...}, or a {"reading": ...} that has no schema)
//! schema  = u8 1 (version), varint id, text meter, varint n,
//!           n × (text quantity, text unit, u8 kind, u8 source)
//! ```
//!
//! Kind codes: 0 power, 1 energy_total, 2 energy_delta, 3 voltage, 4 current,
//! 5 frequency, 6 power_factor, 7 gauge. Source codes as `model::Source`.
//!
//! A value is written in its natural form only when that form gives back exactly the
//! stored f64 (an f32 register's value is an f32; an integer register's value is
//! an integer below 2^63 and not -0); any other number takes code 4. So decoding
//! gives back every value bit for bit, with its source, and the invalid markers.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use super::checksum::crc32c;
use super::StoreError;
use crate::model::{Invalid, Kind, Payload, Reading, Record, Source, Value};

/// Record tag: a reading by schema.
pub const TAG_READING: u8 = 1;
/// Record tag: any payload as CBOR.
pub const TAG_CBOR: u8 = 2;
/// Version byte of an encoded schema.
pub const SCHEMA_V1: u8 = 1;
/// Most schemas a store creates. Readings with a new field list beyond it are
/// stored in the self-describing CBOR form, so a client that pushes ever new
/// field lists cannot grow the schema table (held in memory) without bound.
pub const MAX_SCHEMAS: usize = 4096;
/// Most encoded bytes of all schemas together (their memory is a small multiple):
/// beyond it, as beyond [`MAX_SCHEMAS`], new field lists are stored as CBOR.
pub const MAX_SCHEMA_BYTES: usize = 1 << 20;
/// Most fields in one schema: readings with more are stored as CBOR.
pub const MAX_FIELDS: usize = 1024;

/// The tree of schemas.
pub(super) const TREE_SCHEMAS: &str = "schemas";

const NO_VALUE: u8 = 0;
const NAN: u8 = 1;
const INFINITE: u8 = 2;
const OUT_OF_RANGE: u8 = 3;
const AS_F64: u8 = 4;
const NOT_IMPLEMENTED: u8 = 5;

/// One position of a schema.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Field {
    pub quantity: String,
    pub unit: String,
    pub kind: Kind,
    pub source: Source,
}

/// A meter's field list under an id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schema {
    pub id: u32,
    pub meter: String,
    pub fields: Vec<Field>,
}

/// Why bytes do not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

fn err<T>(what: impl Into<String>) -> Result<T, DecodeError> {
    Err(DecodeError(what.into()))
}

pub fn kind_code(kind: Kind) -> u8 {
    match kind {
        Kind::Power => 0,
        Kind::EnergyTotal => 1,
        Kind::EnergyDelta => 2,
        Kind::Voltage => 3,
        Kind::Current => 4,
        Kind::Frequency => 5,
        Kind::PowerFactor => 6,
        Kind::Gauge => 7,
    }
}

pub fn kind_of_code(code: u8) -> Option<Kind> {
    Some(match code {
        0 => Kind::Power,
        1 => Kind::EnergyTotal,
        2 => Kind::EnergyDelta,
        3 => Kind::Voltage,
        4 => Kind::Current,
        5 => Kind::Frequency,
        6 => Kind::PowerFactor,
        7 => Kind::Gauge,
        _ => return None,
    })
}

pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub fn put_zigzag(out: &mut Vec<u8>, v: i64) {
    put_varint(out, ((v << 1) ^ (v >> 63)) as u64);
}

fn put_text(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// A cursor over encoded bytes; every read names what it wanted when it fails.
pub struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, pos: 0 }
    }

    pub fn rest(&self) -> &'a [u8] {
        &self.bytes[self.pos..]
    }

    pub fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        let Some(&b) = self.bytes.get(self.pos) else {
            return err(format!("{what}: truncated"));
        };
        self.pos += 1;
        Ok(b)
    }

    pub fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return err(format!("{what}: truncated"));
        };
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    pub fn varint(&mut self, what: &str) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8(what)?;
            if shift == 63 && b > 1 {
                break;
            }
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        err(format!("{what}: varint longer than 64 bits"))
    }

    pub fn zigzag(&mut self, what: &str) -> Result<i64, DecodeError> {
        let u = self.varint(what)?;
        Ok(((u >> 1) as i64) ^ -((u & 1) as i64))
    }

    pub fn text(&mut self, what: &str) -> Result<&'a str, DecodeError> {
        let len = usize::try_from(self.varint(what)?).map_err(|_| DecodeError(what.into()))?;
        let bytes = self.take(len, what)?;
        std::str::from_utf8(bytes).map_err(|_| DecodeError(format!("{what}: not UTF-8")))
    }

    fn f32(&mut self, what: &str) -> Result<f32, DecodeError> {
        let b = self.take(4, what)?;
        Ok(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn f64(&mut self, what: &str) -> Result<f64, DecodeError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(f64::from_le_bytes(a))
    }
}

/// The field list of a reading, as a schema would hold it.
fn fields_of(r: &Reading) -> Vec<Field> {
    r.values
        .iter()
        .map(|v| Field {
            quantity: v.quantity.clone(),
            unit: v.unit.clone(),
            kind: v.kind,
            source: v.source,
        })
        .collect()
}

/// Whether a reading can be stored by schema and read back unchanged.
fn fits_schema(r: &Reading) -> bool {
    r.values.len() <= MAX_FIELDS
        && r.values
            .iter()
            .all(|v| v.value.is_none() || v.invalid.is_none())
}

/// Encodes a schema (the bytes stored in the tree before their CRC, and what a
/// batch carries upstream).
pub fn encode_schema(s: &Schema, out: &mut Vec<u8>) {
    let fields = s
        .fields
        .iter()
        .map(|f| (&*f.quantity, &*f.unit, f.kind, f.source));
    put_schema(out, s.id, &s.meter, s.fields.len(), fields);
}

/// The encoding of a schema from its parts (`n`: the number of fields).
fn put_schema<'a>(
    out: &mut Vec<u8>,
    id: u32,
    meter: &str,
    n: usize,
    fields: impl Iterator<Item = (&'a str, &'a str, Kind, Source)>,
) {
    out.push(SCHEMA_V1);
    put_varint(out, id as u64);
    put_text(out, meter);
    put_varint(out, n as u64);
    for (quantity, unit, kind, source) in fields {
        put_text(out, quantity);
        put_text(out, unit);
        out.push(kind_code(kind));
        out.push(source.code());
    }
}

pub fn decode_schema(bytes: &[u8]) -> Result<Schema, DecodeError> {
    let mut r = Reader::new(bytes);
    if r.u8("schema version")? != SCHEMA_V1 {
        return err("schema version: unknown");
    }
    let id = u32::try_from(r.varint("schema id")?)
        .map_err(|_| DecodeError("schema id: above u32".into()))?;
    let meter = r.text("schema meter")?.to_string();
    let n = r.varint("schema field count")?;
    if n > MAX_FIELDS as u64 {
        return err("schema field count: too many");
    }
    let mut fields = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let quantity = r.text("schema quantity")?.to_string();
        let unit = r.text("schema unit")?.to_string();
        let kind = kind_of_code(r.u8("schema kind")?)
            .ok_or_else(|| DecodeError("schema kind: unknown code".into()))?;
        let source = Source::from_code(r.u8("schema source")? as u64);
        fields.push(Field {
            quantity,
            unit,
            kind,
            source,
        });
    }
    if !r.rest().is_empty() {
        return err("schema: bytes after the last field");
    }
    Ok(Schema { id, meter, fields })
}

/// Appends the compact encoding of `rec`: by schema `schema` when it is a reading
/// that has one, as CBOR otherwise.
pub fn encode_record(
    out: &mut Vec<u8>,
    rec: &Record,
    schema: Option<u32>,
) -> Result<(), StoreError> {
    match (&rec.payload, schema) {
        (Payload::Reading(r), Some(id)) => {
            out.push(TAG_READING);
            put_varint(out, rec.seq);
            put_varint(out, id as u64);
            put_zigzag(out, r.ts_ms);
            let bitmap = out.len();
            out.resize(bitmap + r.values.len().div_ceil(8), 0);
            for (i, v) in r.values.iter().enumerate() {
                let natural = v.value.filter(|&x| natural_fits(x, v.source));
                if let (Some(x), None) = (natural, v.invalid) {
                    match v.source {
                        Source::F32 => out.extend_from_slice(&(x as f32).to_le_bytes()),
                        Source::Int => put_zigzag(out, x as i64),
                        Source::F64 => out.extend_from_slice(&x.to_le_bytes()),
                    }
                    continue;
                }
                out[bitmap + i / 8] |= 1 << (i % 8);
                match (v.value, v.invalid) {
                    (Some(x), _) => {
                        out.push(AS_F64);
                        out.extend_from_slice(&x.to_le_bytes());
                    }
                    (None, None) => out.push(NO_VALUE),
                    (None, Some(Invalid::Nan)) => out.push(NAN),
                    (None, Some(Invalid::Infinite)) => out.push(INFINITE),
                    (None, Some(Invalid::OutOfRange)) => out.push(OUT_OF_RANGE),
                    (None, Some(Invalid::NotImplemented)) => out.push(NOT_IMPLEMENTED),
                }
            }
            Ok(())
        }
        _ => {
            out.push(TAG_CBOR);
            put_varint(out, rec.seq);
            ciborium::into_writer(&rec.payload, &mut *out).map_err(|e| StoreError::Encode {
                seq: rec.seq,
                reason: e.to_string(),
            })
        }
    }
}

/// Whether `x` written in `source`'s natural form reads back as exactly `x`.
fn natural_fits(x: f64, source: Source) -> bool {
    match source {
        Source::F32 => (x as f32) as f64 == x,
        Source::Int => x.fract() == 0.0 && x.abs() < 9.2e18 && !(x == 0.0 && x.is_sign_negative()),
        Source::F64 => true,
    }
}

/// Seq of a compact record, read from its head.
pub fn peek_seq(bytes: &[u8]) -> Option<u64> {
    let mut r = Reader::new(bytes);
    match r.u8("tag").ok()? {
        TAG_READING | TAG_CBOR => r.varint("seq").ok(),
        _ => None,
    }
}

/// Schema id a compact reading refers to; `None` for other records.
pub fn peek_schema(bytes: &[u8]) -> Option<u32> {
    let mut r = Reader::new(bytes);
    if r.u8("tag").ok()? != TAG_READING {
        return None;
    }
    r.varint("seq").ok()?;
    u32::try_from(r.varint("schema").ok()?).ok()
}

/// Timestamp of a compact reading, read from its head without its schema; `None` for
/// other records.
pub fn peek_reading_ts(bytes: &[u8]) -> Option<i64> {
    let mut r = Reader::new(bytes);
    if r.u8("tag").ok()? != TAG_READING {
        return None;
    }
    r.varint("seq").ok()?;
    r.varint("schema").ok()?;
    r.zigzag("ts_ms").ok()
}

/// Decodes a compact record; `schema` looks up a schema by id.
pub fn decode_record(
    bytes: &[u8],
    schema: &dyn Fn(u32) -> Option<Arc<Schema>>,
) -> Result<Record, DecodeError> {
    let mut r = Reader::new(bytes);
    let tag = r.u8("record tag")?;
    let seq = r.varint("seq")?;
    match tag {
        TAG_READING => {
            let id = u32::try_from(r.varint("schema id")?)
                .map_err(|_| DecodeError("schema id: above u32".into()))?;
            let Some(s) = schema(id) else {
                return err(format!("schema {id}: unknown"));
            };
            let ts_ms = r.zigzag("ts_ms")?;
            let bitmap = r.take(s.fields.len().div_ceil(8), "status bitmap")?;
            let mut values = Vec::with_capacity(s.fields.len());
            for (i, f) in s.fields.iter().enumerate() {
                let (value, invalid) = if bitmap[i / 8] & (1 << (i % 8)) == 0 {
                    let x = match f.source {
                        Source::F32 => r.f32(&f.quantity)? as f64,
                        Source::Int => r.zigzag(&f.quantity)? as f64,
                        Source::F64 => r.f64(&f.quantity)?,
                    };
                    (Some(x), None)
                } else {
                    match r.u8(&f.quantity)? {
                        NO_VALUE => (None, None),
                        NAN => (None, Some(Invalid::Nan)),
                        INFINITE => (None, Some(Invalid::Infinite)),
                        OUT_OF_RANGE => (None, Some(Invalid::OutOfRange)),
                        NOT_IMPLEMENTED => (None, Some(Invalid::NotImplemented)),
                        AS_F64 => (Some(r.f64(&f.quantity)?), None),
                        _ => return err(format!("{}: unknown status code", f.quantity)),
                    }
                };
                values.push(Value {
                    quantity: f.quantity.clone(),
                    unit: f.unit.clone(),
                    kind: f.kind,
                    value,
                    invalid,
                    source: f.source,
                });
            }
            if !r.rest().is_empty() {
                return err("reading: bytes after the last value");
            }
            Ok(Record {
                seq,
                payload: Payload::Reading(Reading {
                    meter: s.meter.clone(),
                    ts_ms,
                    values,
                }),
            })
        }
        TAG_CBOR => {
            let payload: Payload = ciborium::from_reader(r.rest())
                .map_err(|e| DecodeError(format!("payload: {e}")))?;
            Ok(Record { seq, payload })
        }
        _ => err("record tag: unknown"),
    }
}

/// Decodes a record as a store holds it and upstream carries it: the compact form,
/// or the CBOR of `model::Record` of a version 1 block (it starts with 0xa2, a CBOR
/// map of two pairs, which no compact record does).
pub fn decode_stored(
    bytes: &[u8],
    schema: &dyn Fn(u32) -> Option<Arc<Schema>>,
) -> Result<Record, DecodeError> {
    if bytes.first() == Some(&0xa2) {
        return ciborium::from_reader(bytes).map_err(|e| DecodeError(format!("record: {e}")));
    }
    decode_record(bytes, schema)
}

/// Payload kind of a compact record (`reading`, `interval`, ...) from its head.
pub fn peek_kind(bytes: &[u8]) -> Option<&str> {
    let mut r = Reader::new(bytes);
    match r.u8("tag").ok()? {
        TAG_READING => Some("reading"),
        TAG_CBOR => {
            r.varint("seq").ok()?;
            // A CBOR map of one pair whose key is the kind's name.
            let rest = r.rest();
            if rest.first()? != &0xa1 {
                return None;
            }
            let head = *rest.get(1)?;
            let (len, at) = match head {
                0x60..=0x77 => ((head - 0x60) as usize, 2),
                0x78 => (*rest.get(2)? as usize, 3),
                _ => return None,
            };
            std::str::from_utf8(rest.get(at..at + len)?).ok()
        }
        _ => None,
    }
}

#[derive(Default)]
struct Table {
    by_id: HashMap<u32, Arc<Schema>>,
    /// Encoded (meter, fields) -> id.
    by_shape: HashMap<Vec<u8>, u32>,
    next_id: u32,
    /// Encoded bytes of the schemas held.
    bytes: usize,
}

/// The store's schemas: all of them in memory (at most [`MAX_SCHEMAS`]), and in the
/// `schemas` tree.
pub(super) struct Schemas {
    pub(super) tree: sled::Tree,
    table: RwLock<Table>,
}

/// The key of a schema's shape: meter and fields as a schema of id 0 encodes them.
fn shape_key(meter: &str, fields: &[Field]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + fields.len() * 16);
    let parts = fields
        .iter()
        .map(|f| (&*f.quantity, &*f.unit, f.kind, f.source));
    put_schema(&mut out, 0, meter, fields.len(), parts);
    out
}

/// Writes the key of a reading's shape (as [`shape_key`] of its meter and fields)
/// into `out`, without building the field list.
fn put_reading_shape(out: &mut Vec<u8>, r: &Reading) {
    out.clear();
    let parts = r
        .values
        .iter()
        .map(|v| (&*v.quantity, &*v.unit, v.kind, v.source));
    put_schema(out, 0, &r.meter, r.values.len(), parts);
}

impl Schemas {
    /// Loads every schema of the tree. A stored schema that fails its CRC or does
    /// not decode is left out (readings that refer to it are quarantined when read);
    /// its id is never given again.
    pub(super) fn open(tree: sled::Tree) -> Result<Schemas, sled::Error> {
        let mut table = Table {
            next_id: 1,
            ..Table::default()
        };
        for entry in tree.iter() {
            let (k, v) = entry?;
            let Some(id) = <[u8; 4]>::try_from(&k[..]).ok().map(u32::from_be_bytes) else {
                continue;
            };
            table.next_id = table.next_id.max(id.saturating_add(1));
            let Some(body) = v.len().checked_sub(4).map(|n| &v[..n]) else {
                continue;
            };
            if super::read_u32(&v, body.len()) != Some(crc32c(body)) {
                tracing::warn!(target: "edge_agent::store", id, "stored schema fails its CRC");
                continue;
            }
            match decode_schema(body) {
                Ok(s) if s.id == id => {
                    table.bytes += body.len();
                    table.by_shape.insert(shape_key(&s.meter, &s.fields), s.id);
                    table.by_id.insert(id, Arc::new(s));
                }
                _ => {
                    tracing::warn!(target: "edge_agent::store", id, "stored schema does not decode")
                }
            }
        }
        Ok(Schemas {
            tree,
            table: RwLock::new(table),
        })
    }

    pub(super) fn get(&self, id: u32) -> Option<Arc<Schema>> {
        self.table
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_id
            .get(&id)
            .cloned()
    }

    /// Number of schemas held.
    pub(super) fn len(&self) -> usize {
        self.table
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_id
            .len()
    }

    /// The encoded schema `id` (as a batch carries it upstream).
    pub(super) fn encoded(&self, id: u32) -> Option<Vec<u8>> {
        let s = self.get(id)?;
        let mut out = Vec::new();
        encode_schema(&s, &mut out);
        Some(out)
    }

    /// The schema id of each record (`None`: stored as CBOR). New field lists get a
    /// new schema, written to the tree and flushed before this returns, so a record
    /// is never durable before the schema it refers to.
    pub(super) fn assign(&self, records: &[Record]) -> Result<Vec<Option<u32>>, StoreError> {
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        let mut ids = Vec::with_capacity(records.len());
        let mut added: Vec<Vec<u8>> = Vec::new();
        let mut batch = sled::Batch::default();
        // The shape key of each reading is built in one buffer; a run of readings of
        // one shape (the usual batch) is looked up once.
        let (mut key, mut last_key, mut last_id) = (Vec::new(), Vec::new(), None);
        for rec in records {
            let Payload::Reading(r) = &rec.payload else {
                ids.push(None);
                continue;
            };
            if !fits_schema(r) {
                ids.push(None);
                continue;
            }
            put_reading_shape(&mut key, r);
            if last_id.is_some() && key == last_key {
                ids.push(last_id);
                continue;
            }
            if let Some(&id) = table.by_shape.get(key.as_slice()) {
                std::mem::swap(&mut key, &mut last_key);
                last_id = Some(id);
                ids.push(last_id);
                continue;
            }
            if table.by_id.len() >= MAX_SCHEMAS
                || table.bytes + key.len() > MAX_SCHEMA_BYTES
                || table.next_id == u32::MAX
            {
                ids.push(None);
                continue;
            }
            let fields = fields_of(r);
            let key = key.clone();
            let id = table.next_id;
            table.next_id += 1;
            let schema = Schema {
                id,
                meter: r.meter.clone(),
                fields,
            };
            let mut value = Vec::new();
            encode_schema(&schema, &mut value);
            let crc = crc32c(&value);
            value.extend_from_slice(&crc.to_le_bytes());
            batch.insert(&id.to_be_bytes(), value);
            table.bytes += key.len();
            table.by_id.insert(id, Arc::new(schema));
            table.by_shape.insert(key.clone(), id);
            added.push(key);
            ids.push(Some(id));
        }
        if added.is_empty() {
            return Ok(ids);
        }
        let written = self
            .tree
            .apply_batch(batch)
            .and_then(|()| self.tree.flush());
        if let Err(e) = written {
            // The ids stay taken (the schemas may still reach the disk), but the
            // field lists get new schemas on the retry.
            for key in added {
                table.by_shape.remove(&key);
            }
            return Err(e.into());
        }
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(q: &str, source: Source, v: Option<f64>, invalid: Option<Invalid>) -> Value {
        Value {
            quantity: q.into(),
            unit: "W".into(),
            kind: Kind::Power,
            value: v,
            invalid,
            source,
        }
    }

    fn schema_of(r: &Reading, id: u32) -> Arc<Schema> {
        Arc::new(Schema {
            id,
            meter: r.meter.clone(),
            fields: fields_of(r),
        })
    }

    fn round_trip(r: Reading) -> (Vec<u8>, Record) {
        let rec = Record {
            seq: 300,
            payload: Payload::Reading(r.clone()),
        };
        let mut out = Vec::new();
        encode_record(&mut out, &rec, Some(7)).expect("encodes");
        let s = schema_of(&r, 7);
        let back = decode_record(&out, &|id| (id == 7).then(|| s.clone())).expect("decodes");
        (out, back)
    }

    #[test]
    fn values_keep_their_source_type_bit_for_bit_and_their_invalid_markers() {
        let r = Reading {
            meter: "m".into(),
            ts_ms: -5,
            values: vec![
                value("a", Source::F32, Some(230.1f32 as f64), None),
                value("b", Source::F32, Some(0.1), None),
                value("c", Source::F32, Some(-0.0), None),
                value("d", Source::Int, Some(4_294_967_040.0), None),
                value("e", Source::Int, Some(8578.88), None),
                value("f", Source::Int, Some(-0.0), None),
                value("g", Source::F64, Some(51.001953125), None),
                value("h", Source::F64, Some(1e-300), None),
                value("i", Source::F32, None, Some(Invalid::Nan)),
                value("j", Source::Int, None, Some(Invalid::Infinite)),
                value("k", Source::F64, None, Some(Invalid::OutOfRange)),
                value("l", Source::F32, None, None),
                value("m", Source::Int, Some(-12.0), None),
                value("n", Source::Int, None, Some(Invalid::NotImplemented)),
            ],
        };
        let (_, back) = round_trip(r.clone());
        assert_eq!(back.seq, 300);
        let got = back.payload.as_reading().expect("a reading");
        assert_eq!(got.meter, r.meter);
        assert_eq!(got.ts_ms, r.ts_ms);
        assert_eq!(got.values.len(), r.values.len());
        for (g, w) in got.values.iter().zip(&r.values) {
            assert_eq!(
                g.value.map(f64::to_bits),
                w.value.map(f64::to_bits),
                "{}",
                w.quantity
            );
            assert_eq!(
                (g.invalid, g.source),
                (w.invalid, w.source),
                "{}",
                w.quantity
            );
            assert_eq!(g.number_json(), w.number_json(), "{}", w.quantity);
        }
    }

    #[test]
    fn an_sdm630_reading_takes_at_most_100_bytes() {
        let Payload::Reading(r) = super::super::bench::sample_payload("sdm630-1", 12_345) else {
            unreachable!("the sample is a reading")
        };
        let rec = Record {
            seq: 50_000_000,
            payload: Payload::Reading(r.clone()),
        };
        let mut out = Vec::new();
        encode_record(&mut out, &rec, Some(3)).expect("encodes");
        let framed = out.len() + super::super::FRAME_OVERHEAD;
        assert!(framed <= 100, "{framed} bytes stored");
        let mut cbor = Vec::new();
        ciborium::into_writer(&rec, &mut cbor).expect("encodes");
        assert!(cbor.len() > 500, "the CBOR form took {}", cbor.len());
        let s = schema_of(&r, 3);
        let back = decode_record(&out, &|_| Some(s.clone())).expect("decodes");
        assert_eq!(back, rec);
    }

    #[test]
    fn other_payloads_and_schemas_round_trip() {
        let rec = Record {
            seq: 9,
            payload: Payload::Dropped(crate::model::DropEvent {
                reason: crate::model::DropReason::Quota,
                ranges: vec![(1, 4)],
                count: 4,
                total: 4,
                ts_ms: 1,
            }),
        };
        let mut out = Vec::new();
        encode_record(&mut out, &rec, None).expect("encodes");
        assert_eq!(peek_kind(&out), Some("dropped"));
        assert_eq!(peek_seq(&out), Some(9));
        assert_eq!(decode_record(&out, &|_| None), Ok(rec));
        let s = Schema {
            id: 70_000,
            meter: "pv".into(),
            fields: vec![Field {
                quantity: "energy".into(),
                unit: "kWh".into(),
                kind: Kind::EnergyTotal,
                source: Source::Int,
            }],
        };
        let mut bytes = Vec::new();
        encode_schema(&s, &mut bytes);
        assert_eq!(decode_schema(&bytes), Ok(s));
    }

    #[test]
    fn a_reading_whose_schema_is_unknown_or_bytes_are_cut_does_not_decode() {
        let r = Reading {
            meter: "m".into(),
            ts_ms: 1,
            values: vec![value("a", Source::F64, Some(1.5), None)],
        };
        let (bytes, _) = round_trip(r.clone());
        assert!(decode_record(&bytes, &|_| None).is_err());
        let s = schema_of(&r, 7);
        for cut in 0..bytes.len() {
            assert!(decode_record(&bytes[..cut], &|_| Some(s.clone())).is_err());
        }
        for cut in 0..bytes.len() {
            let _ = decode_schema(&bytes[..cut]);
        }
    }
}
