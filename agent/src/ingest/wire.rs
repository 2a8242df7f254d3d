//! Push bodies as the front ends receive them, turned into checked [`Series`] and
//! [`Reading`]s, with every problem named.
//!
//! **JSON** (HTTP `application/json`, MQTT): one series `{meter, unit, kind, points:
//! [{ts, value}]}` or an array of them. The shape is checked field by field rather
//! than by one serde pass, so a batch with a bad `ts` type in one point and a
//! non-number value in another names both, with their paths. On MQTT, `meter` may be
//! left out (the topic's meter is used); when given it must equal the topic's.
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

use serde_json::{Map, Value as Json};

use super::{
    series_point_name, valid_meter_id, validate_named, IngestError, IngestLimits, Point,
    PointValue, Problem, RejectReason, Series, Timestamp,
};
use crate::broker::rfc3339_ms;
use crate::model::{shortest_number, Kind, Reading};

/// A batch that passed every check.
#[derive(Debug, Clone)]
pub struct Checked {
    pub series: Vec<Series>,
    /// What would be stored: one reading per meter and timestamp.
    pub readings: Vec<Reading>,
}

impl Checked {
    pub fn points(&self) -> usize {
        self.series.iter().map(|s| s.points.len()).sum()
    }
}

/// A batch that was not accepted; nothing of it is stored.
#[derive(Debug, Clone)]
pub struct Rejection {
    /// `Syntax` (unreadable) or `Invalid` (readable, with bad parts).
    pub reason: RejectReason,
    /// Every problem, in body order.
    pub problems: Vec<Problem>,
}

impl Rejection {
    fn syntax(problem: Problem) -> Rejection {
        Rejection {
            reason: RejectReason::Syntax,
            problems: vec![problem],
        }
    }

    fn invalid(problems: Vec<Problem>) -> Rejection {
        Rejection {
            reason: RejectReason::Invalid,
            problems,
        }
    }

    /// One line for logs and error messages.
    pub fn summary(&self) -> String {
        let first = self
            .problems
            .first()
            .map(|p| p.to_string())
            .unwrap_or_default();
        match self.problems.len() {
            0 | 1 => format!("batch rejected, nothing stored: {first}"),
            n => format!(
                "batch rejected, nothing stored: {first} (and {} more)",
                n - 1
            ),
        }
    }
}

const SERIES_KEYS: [&str; 4] = ["meter", "unit", "kind", "points"];
const POINT_KEYS: [&str; 2] = ["ts", "value"];
const PUSHABLE: &str = "use power, energy_delta or energy_total";
const METER_RULE: &str = "must be 1-64 characters of a-z, A-Z, 0-9, `-` or `_`";

/// Parses and checks a JSON push. `topic_meter` is the meter named by an MQTT topic.
pub fn check_json(
    body: &[u8],
    topic_meter: Option<&str>,
    now_ms: i64,
    limits: &IngestLimits,
) -> Result<Checked, Rejection> {
    let doc: Json = serde_json::from_slice(body).map_err(|e| {
        Rejection::syntax(Problem {
            line: Some(e.line()),
            ..Problem::at("body", format!("not valid JSON: {e}"))
        })
    })?;
    let items: Vec<&Json> = match &doc {
        Json::Object(_) => vec![&doc],
        Json::Array(items) => items.iter().collect(),
        _ => {
            return Err(Rejection::invalid(vec![Problem::at(
                "body",
                "expected a series object {meter, unit, kind, points} or an array of them",
            )]))
        }
    };
    let mut shape = Shape::default();
    let batch: Vec<Series> = items
        .iter()
        .enumerate()
        .map(|(s, item)| shape.series(s, item, topic_meter))
        .collect();
    let validated = validate_named(batch.as_slice(), now_ms, limits, &series_point_name);
    let mut problems = shape.problems;
    let readings = match validated {
        Ok(readings) => readings,
        Err(IngestError::Rejected(found)) => {
            // Problems of parts already named as malformed come from their
            // placeholders: leave them out.
            problems.extend(found.into_iter().filter(|p| match (p.series, p.point) {
                (Some(s), None) => !shape.broken_series.contains(&s),
                (Some(s), Some(pt)) => !shape.broken_points.contains(&(s, pt)),
                (None, _) => true,
            }));
            Vec::new()
        }
        Err(IngestError::Store(_)) => Vec::new(),
    };
    if !problems.is_empty() {
        problems.sort_by_key(|p| (p.series, p.point.map_or(0, |pt| pt + 1)));
        return Err(Rejection::invalid(problems));
    }
    Ok(Checked {
        series: batch,
        readings,
    })
}

/// Collects shape problems; malformed parts get placeholders that cannot collide
/// with good points (their own validation problems are dropped).
#[derive(Default)]
struct Shape {
    problems: Vec<Problem>,
    broken_series: HashSet<usize>,
    broken_points: HashSet<(usize, usize)>,
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

    fn point_problem(&mut self, s: usize, p: usize, field: Option<&str>, reason: String) {
        self.broken_points.insert((s, p));
        self.problems.push(Problem {
            series: Some(s),
            point: Some(p),
            ..Problem::at(series_point_name(s, p, field), reason)
        });
    }

    fn series(&mut self, s: usize, item: &Json, topic_meter: Option<&str>) -> Series {
        // A placeholder meter no good series has (not a valid id), so a broken
        // series never looks like a duplicate of another.
        let mut series = Series {
            meter: format!("\u{0}{s}"),
            unit: String::new(),
            kind: Kind::Power,
            points: Vec::new(),
        };
        let Some(obj) = item.as_object() else {
            self.series_problem(s, "", "expected an object {meter, unit, kind, points}");
            return series;
        };
        for key in obj.keys().filter(|k| !SERIES_KEYS.contains(&k.as_str())) {
            self.series_problem(
                s,
                key,
                format!("unknown field `{key}` (expected meter, unit, kind, points)"),
            );
        }
        match (obj.get("meter"), topic_meter) {
            (Some(Json::String(m)), Some(t)) if m != t => self.series_problem(
                s,
                "meter",
                format!("`{m}` does not match the topic's meter `{t}`"),
            ),
            (Some(Json::String(m)), _) => series.meter = m.clone(),
            (None, Some(t)) => series.meter = t.to_string(),
            (None, None) => self.series_problem(s, "meter", "missing"),
            (Some(other), _) => self.series_problem(s, "meter", format!("{other} is not a string")),
        }
        match obj.get("unit") {
            Some(Json::String(u)) => series.unit = u.clone(),
            None => self.series_problem(s, "unit", "missing"),
            Some(other) => self.series_problem(s, "unit", format!("{other} is not a string")),
        }
        match obj.get("kind") {
            Some(Json::String(k)) => {
                match serde_json::from_value::<Kind>(Json::String(k.clone())) {
                    Ok(kind) => series.kind = kind,
                    Err(_) => {
                        self.series_problem(s, "kind", format!("`{k}` is not a kind; {PUSHABLE}"))
                    }
                }
            }
            None => self.series_problem(s, "kind", "missing"),
            Some(other) => self.series_problem(s, "kind", format!("{other} is not a string")),
        }
        match obj.get("points") {
            Some(Json::Array(points)) => {
                series.points = points
                    .iter()
                    .enumerate()
                    .map(|(p, point)| self.point(s, p, point))
                    .collect();
            }
            None => self.series_problem(s, "points", "missing"),
            Some(other) => self.series_problem(
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
                self.series_problem(s, "meter", format!("`{given}` {METER_RULE}"));
            }
        }
        series
    }

    fn point(&mut self, s: usize, p: usize, item: &Json) -> Point {
        // Negative and distinct per point: its own problems are dropped, and it can
        // never be taken for a duplicate of a good point.
        let mut point = Point::new(i64::MIN + p as i64, 0.0);
        let Some(obj) = item.as_object() else {
            self.point_problem(s, p, None, "expected an object {ts, value}".into());
            return point;
        };
        for key in obj.keys().filter(|k| !POINT_KEYS.contains(&k.as_str())) {
            self.point_problem(
                s,
                p,
                Some(key),
                format!("unknown field `{key}` (expected ts, value)"),
            );
        }
        match obj.get("ts") {
            Some(Json::String(t)) => point.ts = Timestamp::Text(t.clone()),
            Some(Json::Number(n)) if n.as_i64().is_some() => {
                point.ts = Timestamp::UnixMs(n.as_i64().unwrap_or_default())
            }
            Some(other) => self.point_problem(
                s,
                p,
                Some("ts"),
                format!("{other} is neither an RFC 3339 string nor integer Unix milliseconds"),
            ),
            None => self.point_problem(s, p, Some("ts"), "missing".into()),
        }
        match obj.get("value") {
            Some(Json::Number(n)) => {
                point.value = n.as_f64().map_or_else(
                    || PointValue::Other(Json::Number(n.clone())),
                    PointValue::Number,
                )
            }
            // Validation names it ("... is not a number").
            Some(other) => point.value = PointValue::Other(other.clone()),
            None => self.point_problem(s, p, Some("value"), "missing".into()),
        }
        point
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
    let mut problems = Vec::new();
    let mut batch: Vec<Series> = Vec::new();
    // Line number of every point, by series.
    let mut lines: Vec<Vec<usize>> = Vec::new();
    let mut index: HashMap<(String, Kind, String), usize> = HashMap::new();
    let mut first = true;
    for (i, raw) in text.split('\n').enumerate() {
        let line = i + 1;
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        if raw.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = raw.split(',').map(str::trim).collect();
        if std::mem::take(&mut first) && is_header(&fields) {
            continue;
        }
        let mut line_problem = |field: &str, reason: String| {
            problems.push(Problem {
                line: Some(line),
                ..Problem::at(format!("line[{line}].{field}"), reason)
            })
        };
        if !(4..=5).contains(&fields.len()) {
            problems.push(Problem {
                line: Some(line),
                ..Problem::at(
                    format!("line[{line}]"),
                    format!(
                        "expected 4 or 5 comma-separated fields ({CSV_HEADER}[,unit]), found {}",
                        fields.len()
                    ),
                )
            });
            continue;
        }
        let (meter, ts, quantity, value) = (fields[0], fields[1], fields[2], fields[3]);
        let mut ok = true;
        if !valid_meter_id(meter) {
            line_problem("meter", format!("`{meter}` {METER_RULE}"));
            ok = false;
        }
        let kind = match quantity {
            "power" => Some(Kind::Power),
            "energy_delta" => Some(Kind::EnergyDelta),
            "energy_total" => Some(Kind::EnergyTotal),
            other => {
                line_problem(
                    "quantity",
                    format!("`{other}` cannot be pushed; {PUSHABLE}"),
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
                    format!("`{u}` does not fit quantity {}; use {fits}", k.as_str()),
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
            Err(_) => PointValue::Other(Json::String(value.to_string())),
        };
        let key = (meter.to_string(), kind, unit.to_string());
        let s = *index.entry(key).or_insert_with(|| {
            batch.push(Series {
                meter: meter.to_string(),
                unit: unit.to_string(),
                kind,
                points: Vec::new(),
            });
            lines.push(Vec::new());
            batch.len() - 1
        });
        batch[s].points.push(Point { ts, value });
        lines[s].push(line);
    }
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
        match validate_named(&batch, now_ms, limits, &name) {
            Ok(readings) => readings,
            Err(e) => {
                problems.extend(e.problems().iter().cloned().map(|mut p| {
                    if let (Some(s), Some(pt)) = (p.series, p.point) {
                        p.line = Some(lines[s][pt]);
                    }
                    p
                }));
                Vec::new()
            }
        }
    };
    if !problems.is_empty() {
        problems.sort_by_key(|p| p.line);
        return Err(Rejection::invalid(problems));
    }
    Ok(Checked {
        series: batch,
        readings,
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

/// Checked series as JSON, normalised: RFC 3339 timestamps (UTC, milliseconds)
/// and numbers as stored. What a dry run answers.
pub fn series_json(series: &[Series]) -> Json {
    Json::Array(
        series
            .iter()
            .map(|s| {
                let points: Vec<Json> = s
                    .points
                    .iter()
                    .map(|p| {
                        let ts_ms = match &p.ts {
                            Timestamp::UnixMs(ms) => Some(*ms),
                            Timestamp::Text(t) => super::parse_rfc3339_ms(t).ok(),
                        };
                        let value = match &p.value {
                            PointValue::Number(v) => shortest_number(*v),
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
                serde_json::json!({
                    "meter": s.meter,
                    "quantity": s.kind.as_str(),
                    "unit": s.unit,
                    "kind": s.kind.as_str(),
                    "points": points,
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests;
