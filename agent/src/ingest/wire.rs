//! Push bodies as the front ends receive them, turned into checked [`Series`] and
//! [`Reading`]s, with every problem named and counted: the first
//! [`crate::ingest::MAX_PROBLEMS`] are kept, and text quoted from the body is cut to
//! [`crate::ingest::MAX_QUOTED`] characters, so a bad body's answer stays small.
//!
//! **JSON** (HTTP `application/json`, MQTT): one series `{meter, unit, kind, points:
//! [{ts, value}]}` or an array of them. The shape is checked field by field rather
//! than by one serde pass, so a batch with a bad `ts` type in one point and a
//! non-number value in another names both, with their paths. On MQTT, `meter` may be
//! left out (the topic's meter is used); when given it must equal the topic's. A
//! series may say `"correct": true`: its points may then replace different stored
//! values ([`Checked::correct`]). Numbers are parsed to the nearest f64.
//!
//! **CSV** (HTTP `text/csv`): one point per line, `meter,timestamp,quantity,value`
//! with an optional fifth column `unit`.
//! - `quantity` is the kind of the value and must be `power`, `energy_delta` or
//!   `energy_total`: pushed quantities are named after their kind (as in JSON pushes),
//!   which is also how the built-in profiles name a meter's total power and energy.
//! - `unit` defaults to the kind's base unit of the built-in profiles: `W` for
//!   `power`, `kWh` for `energy_delta` and `energy_total`. Given, it must fit the kind
//!   (`W`/`kW`, `Wh`/`kWh`).
//! - `timestamp` is RFC 3339 or integer Unix milliseconds, `value` a decimal number.
//! - A first line `meter,timestamp,quantity,value[,unit]` is a header and skipped;
//!   empty lines are skipped; fields are trimmed; there is no quoting (no field can
//!   hold a comma). `\n` or `\r\n` line ends.
//!
//! Lines become one series per (meter, quantity, unit), in order of appearance, so
//! a dry run shows them like a JSON push. Problems name lines from 1: `line[3].value`.

use std::collections::{HashMap, HashSet};

use serde::de::DeserializeSeed;
use serde_json::{Map, Value as Json};

use super::{
    clip, series_point_name, valid_meter_id, validate_into, ConflictList, Correct, IngestLimits,
    Point, PointValue, Problem, ProblemList, RejectReason, Series, Timestamp,
};
use crate::model::{rfc3339_ms, shortest_f64, Kind, Reading};

/// A batch that passed every check.
#[derive(Debug, Clone)]
pub struct Checked {
    pub series: Vec<Series>,
    /// What would be stored: one reading per meter and timestamp.
    pub readings: Vec<Reading>,
    /// The field naming each series' meter, as a problem names it
    /// (`series[0].meter`, or `line[3].meter` for the first line of a CSV series).
    pub meter_fields: Vec<String>,
    /// The series whose points may replace stored values (`"correct": true`).
    pub correct: Correct,
    /// CSV: the line of every point, by series; empty for JSON.
    pub lines: Vec<Vec<usize>>,
}

impl Checked {
    pub fn points(&self) -> usize {
        self.series.iter().map(|s| s.points.len()).sum()
    }

    /// The rejection of a batch the store refused for `conflicts`: each names its
    /// point's value field (`series[0].points[3].value`, `line[4].value`).
    pub fn conflicts(&self, conflicts: &ConflictList) -> Rejection {
        let wanted: HashSet<(&str, &str)> = conflicts
            .list
            .iter()
            .map(|c| (c.meter.as_str(), c.quantity.as_str()))
            .collect();
        // (meter, quantity, ts) -> (series, point) of the points that may conflict.
        let mut at: HashMap<(&str, &str, i64), (usize, usize)> = HashMap::new();
        for (s, series) in self.series.iter().enumerate() {
            if !wanted.contains(&(series.meter.as_str(), series.kind.as_str())) {
                continue;
            }
            for (p, point) in series.points.iter().enumerate() {
                let ts = match &point.ts {
                    Timestamp::UnixMs(ms) => Some(*ms),
                    Timestamp::Text(t) => super::parse_rfc3339_ms(t).ok(),
                };
                if let Some(ts) = ts {
                    at.insert((series.meter.as_str(), series.kind.as_str(), ts), (s, p));
                }
            }
        }
        let mut problems = ProblemList::default();
        for c in &conflicts.list {
            let found = at.get(&(c.meter.as_str(), c.quantity.as_str(), c.ts_ms));
            let line = found.and_then(|&(s, p)| self.lines.get(s)?.get(p).copied());
            let field = match (found, line) {
                (_, Some(line)) => format!("line[{line}].value"),
                (Some(&(s, p)), None) => series_point_name(s, p, Some("value")),
                (None, None) => "series".to_string(),
            };
            problems.push(Problem {
                series: found.map(|&(s, _)| s),
                point: found.map(|&(_, p)| p),
                ts: found.map(|&(s, p)| clip(&self.series[s].points[p].ts.to_string())),
                line,
                ..Problem::at(field, c.to_string())
            });
        }
        problems.total = conflicts.total;
        Rejection {
            reason: RejectReason::Conflict,
            problems_total: problems.total,
            problems: problems.list,
        }
    }
}

/// A batch that was not accepted; nothing of it is stored.
#[derive(Debug, Clone)]
pub struct Rejection {
    /// `Syntax` (unreadable) or `Invalid` (readable, with bad parts).
    pub reason: RejectReason,
    /// The first problems found (at most [`crate::ingest::MAX_PROBLEMS`]), in body
    /// order.
    pub problems: Vec<Problem>,
    /// Problems found in all, listed or not.
    pub problems_total: usize,
}

impl Rejection {
    fn syntax(problem: Problem) -> Rejection {
        Rejection {
            reason: RejectReason::Syntax,
            problems: vec![problem],
            problems_total: 1,
        }
    }

    /// A rejection with every problem of `problems`.
    pub fn invalid(problems: ProblemList) -> Rejection {
        Rejection {
            reason: RejectReason::Invalid,
            problems_total: problems.total,
            problems: problems.list,
        }
    }

    /// A rejection of one problem.
    pub fn one(reason: RejectReason, problem: Problem) -> Rejection {
        Rejection {
            reason,
            problems: vec![problem],
            problems_total: 1,
        }
    }

    /// Whether problems were found beyond the ones listed.
    pub fn truncated(&self) -> bool {
        self.problems_total > self.problems.len()
    }

    /// One line for logs and error messages.
    pub fn summary(&self) -> String {
        let first = self
            .problems
            .first()
            .map(|p| p.to_string())
            .unwrap_or_default();
        match self.problems_total.max(self.problems.len()) {
            0 | 1 => format!("batch rejected, nothing stored: {first}"),
            n => format!(
                "batch rejected, nothing stored: {first} (and {} more)",
                n - 1
            ),
        }
    }
}

const SERIES_KEYS: [&str; 5] = ["meter", "unit", "kind", "points", "correct"];
const POINT_KEYS: [&str; 2] = ["ts", "value"];
const PUSHABLE: &str = "use power, energy_delta or energy_total";
const METER_RULE: &str = "must be 1-64 characters of a-z, A-Z, 0-9, `-` or `_`";

/// Parses and checks a JSON push. `topic_meter` is the meter named by an MQTT topic.
///
/// The body is read straight into the series (no JSON tree): each point is checked
/// as it is read, a malformed one is named and dropped at once, and nested arrays
/// and objects where a scalar belongs are skipped, not built. So the memory a push
/// takes is a small multiple of its size, whatever it holds.
pub fn check_json(
    body: &[u8],
    topic_meter: Option<&str>,
    now_ms: i64,
    limits: &IngestLimits,
) -> Result<Checked, Rejection> {
    let mut shape = Shape::default();
    let doc = {
        let mut de = serde_json::Deserializer::from_slice(body);
        let doc = DeserializeSeed::deserialize(raw::DocSeed { shape: &mut shape }, &mut de)
            .and_then(|doc| de.end().map(|()| doc));
        doc.map_err(|e| {
            Rejection::syntax(Problem {
                line: Some(e.line()),
                ..Problem::at("body", format!("not valid JSON: {}", clip(&e.to_string())))
            })
        })?
    };
    let items = match doc {
        raw::Doc::One(series) => vec![raw::Obj::Fields(series)],
        raw::Doc::Many(items) => items,
        raw::Doc::Other(other) => {
            let mut problems = ProblemList::default();
            problems.push(Problem::at(
                "body",
                format!("expected a series object {{meter, unit, kind, points}} or an array of them, found {other}"),
            ));
            return Err(Rejection::invalid(problems));
        }
    };
    let mut positions = Vec::with_capacity(items.len());
    let batch: Vec<Series> = items
        .into_iter()
        .enumerate()
        .map(|(s, item)| {
            let (series, kept) = shape.series(s, item, topic_meter);
            positions.push(kept);
            series
        })
        .collect();
    let Shape {
        mut problems,
        broken_series,
        correct,
    } = shape;
    // Points dropped as malformed are not in the batch: name the others by their
    // place in the body.
    let position = |s: usize, p: usize| -> usize {
        match positions.get(s) {
            Some(Some(kept)) => kept.get(p).map_or(p, |&i| i as usize),
            _ => p,
        }
    };
    let name =
        |s: usize, p: usize, field: Option<&str>| series_point_name(s, position(s, p), field);
    let readings = validate_into(batch.as_slice(), now_ms, limits, &name, &mut |mut p| {
        // Problems of a series already named as malformed come from its
        // placeholders: leave them out.
        if let (Some(s), None) = (p.series, p.point) {
            if broken_series.contains(&s) {
                return;
            }
        }
        if let (Some(s), Some(pt)) = (p.series, p.point) {
            p.point = Some(position(s, pt));
        }
        problems.push(p);
    });
    if !problems.is_empty() {
        problems
            .list
            .sort_by_key(|p| (p.series, p.point.map_or(0, |pt| pt + 1)));
        return Err(Rejection::invalid(problems));
    }
    let meter_fields = (0..batch.len())
        .map(|s| format!("series[{s}].meter"))
        .collect();
    let correct = if correct.is_empty() {
        Correct::None
    } else {
        Correct::Series(
            correct
                .iter()
                .filter_map(|&s| batch.get(s))
                .map(|series| (series.meter.clone(), series.kind.as_str().to_string()))
                .collect(),
        )
    };
    Ok(Checked {
        series: batch,
        readings,
        meter_fields,
        correct,
        lines: Vec::new(),
    })
}

/// What a JSON push is read into: scalars, and points checked as they are read.
mod raw {
    use std::fmt;

    use serde::de::{
        Deserialize, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor,
    };

    use super::Shape;
    use crate::ingest::{clip, Point, MAX_PROBLEMS};

    /// A JSON value where a scalar belongs; arrays and objects are skipped.
    #[derive(Debug, Clone, PartialEq)]
    pub enum Any {
        Null,
        Bool(bool),
        Int(i64),
        /// Any other number.
        Float(f64),
        Str(String),
        Array,
        Object,
    }

    impl fmt::Display for Any {
        /// As JSON (strings quoted and cut), arrays and objects named.
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match self {
                Any::Null => f.write_str("null"),
                Any::Bool(b) => write!(f, "{b}"),
                Any::Int(i) => write!(f, "{i}"),
                Any::Float(x) => write!(f, "{x}"),
                Any::Str(s) => write!(f, "{}", serde_json::Value::String(clip(s))),
                Any::Array => f.write_str("an array"),
                Any::Object => f.write_str("an object"),
            }
        }
    }

    struct AnyVisitor;

    macro_rules! scalars {
        ($wrap:expr) => {
            fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
                Ok($wrap(self, Any::Bool(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
                Ok($wrap(self, Any::Int(v)))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
                Ok($wrap(
                    self,
                    i64::try_from(v).map_or(Any::Float(v as f64), Any::Int),
                ))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
                Ok($wrap(self, Any::Float(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok($wrap(self, Any::Str(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok($wrap(self, Any::Str(v)))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok($wrap(self, Any::Null))
            }
            fn visit_none<E>(self) -> Result<Self::Value, E> {
                Ok($wrap(self, Any::Null))
            }
        };
    }

    fn skip_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Any, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Any::Array)
    }

    fn skip_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Any, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Any::Object)
    }

    impl<'de> Visitor<'de> for AnyVisitor {
        type Value = Any;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON value")
        }
        scalars!(|_, a| a);
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Any, A::Error> {
            skip_seq(seq)
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Any, A::Error> {
            skip_map(map)
        }
    }

    impl<'de> Deserialize<'de> for Any {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Any, D::Error> {
            d.deserialize_any(AnyVisitor)
        }
    }

    /// Keys of an object that are not its fields: the first [`MAX_PROBLEMS`] (cut),
    /// and how many in all.
    #[derive(Debug, Default)]
    pub struct Unknown {
        pub keys: Vec<String>,
        pub total: usize,
    }

    fn unknown<'de, A: MapAccess<'de>>(
        slot: &mut Option<Box<Unknown>>,
        key: &str,
        map: &mut A,
    ) -> Result<(), A::Error> {
        map.next_value::<IgnoredAny>()?;
        let unknown = slot.get_or_insert_with(Box::default);
        unknown.total += 1;
        if unknown.keys.len() < MAX_PROBLEMS {
            unknown.keys.push(clip(key));
        }
        Ok(())
    }

    /// A point's fields as read.
    #[derive(Debug, Default)]
    pub struct PointFields {
        pub ts: Option<Any>,
        pub value: Option<Any>,
        pub unknown: Option<Box<Unknown>>,
    }

    /// A series' `points`: the points kept (malformed ones are named and dropped as
    /// they are read) with the body position of each when some were dropped.
    #[derive(Debug)]
    pub enum Points {
        Items(Vec<Point>, Option<Vec<u32>>),
        Other(Any),
    }

    #[derive(Debug, Default)]
    pub struct SeriesFields {
        pub meter: Option<Any>,
        pub unit: Option<Any>,
        pub kind: Option<Any>,
        pub points: Option<Points>,
        pub correct: Option<Any>,
        pub unknown: Option<Box<Unknown>>,
    }

    /// An object read as `T`, or what came instead.
    #[derive(Debug)]
    pub enum Obj<T> {
        Fields(T),
        Other(Any),
    }

    /// A whole push: one series, an array of them, or something else.
    #[derive(Debug)]
    pub enum Doc {
        One(SeriesFields),
        Many(Vec<Obj<SeriesFields>>),
        Other(Any),
    }

    pub struct DocSeed<'a> {
        pub shape: &'a mut Shape,
    }

    impl<'de> DeserializeSeed<'de> for DocSeed<'_> {
        type Value = Doc;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Doc, D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for DocSeed<'_> {
        type Value = Doc;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON value")
        }
        scalars!(|_, a| Doc::Other(a));
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Doc, A::Error> {
            let mut items = Vec::new();
            loop {
                let seed = SeriesSeed {
                    shape: &mut *self.shape,
                    s: items.len(),
                };
                match seq.next_element_seed(seed)? {
                    Some(item) => items.push(item),
                    None => break,
                }
            }
            Ok(Doc::Many(items))
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Doc, A::Error> {
            series_fields(self.shape, 0, map).map(Doc::One)
        }
    }

    struct SeriesSeed<'a> {
        shape: &'a mut Shape,
        s: usize,
    }

    impl<'de> DeserializeSeed<'de> for SeriesSeed<'_> {
        type Value = Obj<SeriesFields>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for SeriesSeed<'_> {
        type Value = Obj<SeriesFields>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON value")
        }
        scalars!(|_, a| Obj::Other(a));
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            skip_seq(seq).map(Obj::Other)
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            series_fields(self.shape, self.s, map).map(Obj::Fields)
        }
    }

    fn series_fields<'de, A: MapAccess<'de>>(
        shape: &mut Shape,
        s: usize,
        mut map: A,
    ) -> Result<SeriesFields, A::Error> {
        let mut fields = SeriesFields::default();
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "meter" => fields.meter = Some(map.next_value()?),
                "unit" => fields.unit = Some(map.next_value()?),
                "kind" => fields.kind = Some(map.next_value()?),
                "correct" => fields.correct = Some(map.next_value()?),
                "points" => {
                    fields.points = Some(map.next_value_seed(PointsSeed {
                        shape: &mut *shape,
                        s,
                    })?)
                }
                _ => unknown(&mut fields.unknown, &key, &mut map)?,
            }
        }
        Ok(fields)
    }

    struct PointsSeed<'a> {
        shape: &'a mut Shape,
        s: usize,
    }

    impl<'de> DeserializeSeed<'de> for PointsSeed<'_> {
        type Value = Points;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Points, D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for PointsSeed<'_> {
        type Value = Points;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON value")
        }
        scalars!(|_, a| Points::Other(a));
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Points, A::Error> {
            let mut points = Vec::new();
            let mut kept: Option<Vec<u32>> = None;
            let mut p = 0usize;
            loop {
                let seed = PointSeed {
                    shape: &mut *self.shape,
                    s: self.s,
                    p,
                };
                match seq.next_element_seed(seed)? {
                    None => break,
                    Some(Some(point)) => {
                        if let Some(kept) = &mut kept {
                            kept.push(u32::try_from(p).unwrap_or(u32::MAX));
                        }
                        points.push(point);
                    }
                    Some(None) => {
                        // The first dropped point: from now on positions differ.
                        kept.get_or_insert_with(|| {
                            (0..points.len())
                                .map(|i| u32::try_from(i).unwrap_or(u32::MAX))
                                .collect()
                        });
                    }
                }
                p += 1;
            }
            Ok(Points::Items(points, kept))
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Points, A::Error> {
            skip_map(map).map(Points::Other)
        }
    }

    struct PointSeed<'a> {
        shape: &'a mut Shape,
        s: usize,
        p: usize,
    }

    impl<'de> DeserializeSeed<'de> for PointSeed<'_> {
        type Value = Option<Point>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<Point>, D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for PointSeed<'_> {
        type Value = Option<Point>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON value")
        }
        scalars!(|seed: Self, a| seed.not_object(a));
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Option<Point>, A::Error> {
            let other = skip_seq(seq)?;
            Ok(self.not_object(other))
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<Point>, A::Error> {
            let mut fields = PointFields::default();
            while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                match key.as_ref() {
                    "ts" => fields.ts = Some(map.next_value()?),
                    "value" => fields.value = Some(map.next_value()?),
                    _ => unknown(&mut fields.unknown, &key, &mut map)?,
                }
            }
            Ok(self.shape.point(self.s, self.p, fields))
        }
    }

    impl PointSeed<'_> {
        fn not_object(self, other: Any) -> Option<Point> {
            self.shape.point_problem(
                self.s,
                self.p,
                None,
                format!("expected an object {{ts, value}}, found {other}"),
            );
            None
        }
    }
}

/// Collects shape problems; a malformed series gets placeholders that cannot
/// collide with good points (its own validation problems are dropped).
#[derive(Default)]
pub(crate) struct Shape {
    problems: ProblemList,
    broken_series: HashSet<usize>,
    /// Series that say `"correct": true`.
    correct: Vec<usize>,
}

impl Shape {
    fn series_problem(&mut self, s: usize, field: &str, reason: impl Into<String>) {
        self.broken_series.insert(s);
        let path = if field.is_empty() {
            format!("series[{s}]")
        } else {
            format!("series[{s}].{field}")
        };
        self.problems.push(Problem {
            series: Some(s),
            ..Problem::at(path, reason)
        });
    }

    /// A problem of a point at its body position.
    fn point_problem(&mut self, s: usize, p: usize, field: Option<&str>, reason: String) {
        self.problems.push(Problem {
            series: Some(s),
            point: Some(p),
            ..Problem::at(series_point_name(s, p, field), reason)
        });
    }

    fn unknown_keys(
        &mut self,
        unknown: Option<Box<raw::Unknown>>,
        expected: &str,
        mut report: impl FnMut(&mut Shape, &str, String),
    ) {
        let Some(unknown) = unknown else { return };
        for key in &unknown.keys {
            report(
                self,
                key,
                format!("unknown field `{key}` (expected {expected})"),
            );
        }
        self.problems.total += unknown.total - unknown.keys.len();
    }

    /// The series of a body item, and the body position of each kept point when
    /// some were dropped.
    fn series(
        &mut self,
        s: usize,
        item: raw::Obj<raw::SeriesFields>,
        topic_meter: Option<&str>,
    ) -> (Series, Option<Vec<u32>>) {
        use raw::Any;
        // A placeholder meter no good series has (not a valid id), so a broken
        // series never looks like a duplicate of another.
        let mut series = Series {
            meter: format!("\u{0}{s}"),
            unit: String::new(),
            kind: Kind::Power,
            points: Vec::new(),
        };
        let mut kept = None;
        let obj = match item {
            raw::Obj::Fields(obj) => obj,
            raw::Obj::Other(other) => {
                self.series_problem(
                    s,
                    "",
                    format!("expected an object {{meter, unit, kind, points}}, found {other}"),
                );
                return (series, kept);
            }
        };
        self.unknown_keys(
            obj.unknown,
            &SERIES_KEYS.join(", "),
            |shape, key, reason| shape.series_problem(s, key, reason),
        );
        match (obj.meter, topic_meter) {
            (Some(Any::Str(m)), Some(t)) if m != t => self.series_problem(
                s,
                "meter",
                format!(
                    "`{}` does not match the topic's meter `{}`",
                    clip(&m),
                    clip(t)
                ),
            ),
            (Some(Any::Str(m)), _) => series.meter = m,
            (None, Some(t)) => series.meter = t.to_string(),
            (None, None) => self.series_problem(s, "meter", "missing"),
            (Some(other), _) => self.series_problem(s, "meter", format!("{other} is not a string")),
        }
        match obj.unit {
            Some(Any::Str(u)) => series.unit = u,
            None => self.series_problem(s, "unit", "missing"),
            Some(other) => self.series_problem(s, "unit", format!("{other} is not a string")),
        }
        match obj.kind {
            Some(Any::Str(k)) => match serde_json::from_value::<Kind>(Json::String(k.clone())) {
                Ok(kind) => series.kind = kind,
                Err(_) => self.series_problem(
                    s,
                    "kind",
                    format!("`{}` is not a kind; {PUSHABLE}", clip(&k)),
                ),
            },
            None => self.series_problem(s, "kind", "missing"),
            Some(other) => self.series_problem(s, "kind", format!("{other} is not a string")),
        }
        match obj.correct {
            Some(Any::Bool(true)) => self.correct.push(s),
            None | Some(Any::Bool(false)) => {}
            Some(other) => {
                self.series_problem(s, "correct", format!("{other} is not true or false"))
            }
        }
        match obj.points {
            Some(raw::Points::Items(points, positions)) => {
                series.points = points;
                kept = positions;
            }
            None => self.series_problem(s, "points", "missing"),
            Some(raw::Points::Other(other)) => self.series_problem(
                s,
                "points",
                format!("{other} is not an array of {{ts, value}}"),
            ),
        }
        if self.broken_series.contains(&s) {
            // Validation skips this series' own fields: check the meter here, then
            // keep the placeholder so its points are never taken for duplicates of
            // another series' (its kind may be a placeholder too).
            let given = std::mem::replace(&mut series.meter, format!("\u{0}{s}"));
            if !given.starts_with('\u{0}') && !valid_meter_id(&given) {
                self.series_problem(s, "meter", format!("`{}` {METER_RULE}", clip(&given)));
            }
        }
        (series, kept)
    }

    /// A point as read; `None` (named as a problem) when malformed. A value that is
    /// not a number is named here and the point kept, so validation still checks
    /// its timestamp.
    fn point(&mut self, s: usize, p: usize, obj: raw::PointFields) -> Option<Point> {
        use raw::Any;
        let mut ok = true;
        let mut bad = |shape: &mut Shape, field: Option<&str>, reason: String| {
            ok = false;
            shape.point_problem(s, p, field, reason);
        };
        self.unknown_keys(obj.unknown, &POINT_KEYS.join(", "), |shape, key, reason| {
            bad(shape, Some(key), reason)
        });
        let ts = match obj.ts {
            Some(Any::Str(t)) => Some(Timestamp::Text(t)),
            Some(Any::Int(ms)) => Some(Timestamp::UnixMs(ms)),
            Some(other) => {
                bad(
                    self,
                    Some("ts"),
                    format!("{other} is neither an RFC 3339 string nor integer Unix milliseconds"),
                );
                None
            }
            None => {
                bad(self, Some("ts"), "missing".into());
                None
            }
        };
        let value = match obj.value {
            Some(Any::Int(v)) => Some(v as f64),
            Some(Any::Float(v)) => Some(v),
            Some(other) => {
                // Its timestamp is still checked by validation.
                self.point_problem(s, p, Some("value"), format!("{other} is not a number"));
                Some(0.0)
            }
            None => {
                bad(self, Some("value"), "missing".into());
                None
            }
        };
        match (ts, value, ok) {
            (Some(ts), Some(value), true) => Some(Point {
                ts,
                value: PointValue::Number(value),
            }),
            _ => None,
        }
    }
}

/// The CSV header line (without or with the unit column).
const CSV_HEADER: &str = "meter,timestamp,quantity,value";

/// Parses and checks a CSV push (see the module docs).
pub fn check_csv(body: &[u8], now_ms: i64, limits: &IngestLimits) -> Result<Checked, Rejection> {
    let text = std::str::from_utf8(body).map_err(|e| {
        let line = body[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1;
        Rejection::syntax(Problem {
            line: Some(line),
            ..Problem::at(format!("line[{line}]"), "not UTF-8 text")
        })
    })?;
    let mut problems = ProblemList::default();
    let mut batch: Vec<Series> = Vec::new();
    // Line number of every point, by series.
    let mut lines: Vec<Vec<usize>> = Vec::new();
    let mut index: HashMap<(String, Kind, &str), usize> = HashMap::new();
    let mut first = true;
    for (i, raw) in text.split('\n').enumerate() {
        let line = i + 1;
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        if raw.trim().is_empty() {
            continue;
        }
        let count = raw.split(',').count();
        if !(4..=5).contains(&count) {
            first = false;
            problems.push(Problem {
                line: Some(line),
                ..Problem::at(
                    format!("line[{line}]"),
                    format!(
                        "expected 4 or 5 comma-separated fields ({CSV_HEADER}[,unit]), found {count}"
                    ),
                )
            });
            continue;
        }
        let mut fields = ["", "", "", "", ""];
        for (slot, field) in fields.iter_mut().zip(raw.split(',')) {
            *slot = field.trim();
        }
        let fields = &fields[..count];
        if std::mem::take(&mut first) && is_header(fields) {
            continue;
        }
        let mut line_problem = |field: &str, reason: String| {
            problems.push(Problem {
                line: Some(line),
                ..Problem::at(format!("line[{line}].{field}"), reason)
            })
        };
        let (meter, ts, quantity, value) = (fields[0], fields[1], fields[2], fields[3]);
        let mut ok = true;
        if !valid_meter_id(meter) {
            line_problem("meter", format!("`{}` {METER_RULE}", clip(meter)));
            ok = false;
        }
        let kind = match quantity {
            "power" => Some(Kind::Power),
            "energy_delta" => Some(Kind::EnergyDelta),
            "energy_total" => Some(Kind::EnergyTotal),
            other => {
                line_problem(
                    "quantity",
                    format!("`{}` cannot be pushed; {PUSHABLE}", clip(other)),
                );
                ok = false;
                None
            }
        };
        let unit = match (kind, fields.get(4).copied()) {
            (None, _) => None,
            (Some(Kind::Power), None) => Some("W"),
            (Some(_), None) => Some("kWh"),
            (Some(Kind::Power), Some(u @ ("W" | "kW"))) => Some(u),
            (Some(Kind::EnergyDelta | Kind::EnergyTotal), Some(u @ ("Wh" | "kWh"))) => Some(u),
            (Some(k), Some(u)) => {
                let fits = if k == Kind::Power {
                    "W or kW"
                } else {
                    "Wh or kWh"
                };
                line_problem(
                    "unit",
                    format!(
                        "`{}` does not fit quantity {}; use {fits}",
                        clip(u),
                        k.as_str()
                    ),
                );
                ok = false;
                None
            }
        };
        let (Some(kind), Some(unit), true) = (kind, unit, ok) else {
            continue;
        };
        let ts = match ts.parse::<i64>() {
            Ok(ms) => Timestamp::UnixMs(ms),
            Err(_) => Timestamp::Text(ts.to_string()),
        };
        let value = match value.parse::<f64>() {
            Ok(v) => PointValue::Number(v),
            Err(_) => PointValue::Other(Json::String(clip(value))),
        };
        let s = match index.get(&(meter.to_string(), kind, unit)) {
            Some(&s) => s,
            None => {
                batch.push(Series {
                    meter: meter.to_string(),
                    unit: unit.to_string(),
                    kind,
                    points: Vec::new(),
                });
                lines.push(Vec::new());
                index.insert((meter.to_string(), kind, unit), batch.len() - 1);
                batch.len() - 1
            }
        };
        batch[s].points.push(Point { ts, value });
        lines[s].push(line);
    }
    drop(index);
    if batch.is_empty() && problems.is_empty() {
        problems.push(Problem::at(
            "body",
            format!("no CSV lines ({CSV_HEADER}[,unit])"),
        ));
    }
    let name = |s: usize, p: usize, field: Option<&str>| -> String {
        let line = lines[s][p];
        match field {
            Some("ts") => format!("line[{line}].timestamp"),
            Some(f) => format!("line[{line}].{f}"),
            None => format!("line[{line}]"),
        }
    };
    let readings = if batch.is_empty() {
        Vec::new()
    } else {
        validate_into(&batch, now_ms, limits, &name, &mut |mut p| {
            if let (Some(s), Some(pt)) = (p.series, p.point) {
                p.line = Some(lines[s][pt]);
            }
            problems.push(p)
        })
    };
    if !problems.is_empty() {
        problems.list.sort_by_key(|p| p.line);
        return Err(Rejection::invalid(problems));
    }
    let meter_fields = lines
        .iter()
        .map(|l| format!("line[{}].meter", l.first().copied().unwrap_or(0)))
        .collect();
    Ok(Checked {
        series: batch,
        readings,
        meter_fields,
        correct: Correct::None,
        lines,
    })
}

fn is_header(fields: &[&str]) -> bool {
    let names: Vec<String> = fields.iter().map(|f| f.to_ascii_lowercase()).collect();
    let expected: Vec<&str> = CSV_HEADER.split(',').collect();
    names.len() >= 4
        && names.len() <= 5
        && names[..4] == expected[..]
        && names.get(4).map_or(true, |u| u == "unit")
}

/// Most points a dry run echoes (all are checked and counted).
pub const MAX_ECHO_POINTS: usize = 1000;

/// Checked series as JSON, normalised: RFC 3339 timestamps (UTC, milliseconds)
/// and numbers as stored. What a dry run answers.
pub fn series_json(series: &[Series]) -> Json {
    series_json_limited(series, usize::MAX).0
}

/// [`series_json`] with at most `max_points` points in all (series past the limit
/// are left out, the last one shown may be cut); also returns the points shown.
pub fn series_json_limited(series: &[Series], max_points: usize) -> (Json, usize) {
    let mut left = max_points;
    let mut out = Vec::new();
    for s in series {
        if left == 0 {
            break;
        }
        let points: Vec<Json> = s
            .points
            .iter()
            .take(left)
            .map(|p| {
                let ts_ms = match &p.ts {
                    Timestamp::UnixMs(ms) => Some(*ms),
                    Timestamp::Text(t) => super::parse_rfc3339_ms(t).ok(),
                };
                let value = match &p.value {
                    // As it will be stored and read back: a pushed f64.
                    PointValue::Number(v) => shortest_f64(*v),
                    PointValue::Other(v) => v.clone(),
                };
                let mut out = Map::new();
                out.insert(
                    "ts".into(),
                    ts_ms.map_or(Json::Null, |ms| rfc3339_ms(ms).into()),
                );
                out.insert("value".into(), value);
                Json::Object(out)
            })
            .collect();
        left -= points.len();
        out.push(serde_json::json!({
            "meter": s.meter,
            "quantity": s.kind.as_str(),
            "unit": s.unit,
            "kind": s.kind.as_str(),
            "points": points,
        }));
    }
    (Json::Array(out), max_points - left)
}

#[cfg(test)]
mod tests;
