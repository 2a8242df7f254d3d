//! `GET /api/v1/openapi.json`: the OpenAPI 3 description of every `/api/v1`
//! endpoint. A test holds it and the router to each other: every route served is
//! described with exactly the methods it answers, and every described path is served.
//! Written out rather than derived with utoipa: the handlers build their answers with
//! `json!`, not typed structs, so a derive would have little to derive from.

use std::sync::OnceLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value as Json_};

use super::analytics_api::{DEFAULT_EVENTS, MAX_FORECAST_DAYS, MAX_SERIES_DAYS, MAX_TOP};
use crate::analytics::events::RECENT_EVENTS;

/// The document, built once.
pub fn document() -> &'static Json_ {
    static DOC: OnceLock<Json_> = OnceLock::new();
    DOC.get_or_init(build)
}

pub async fn serve() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        document().to_string(),
    )
        .into_response()
}

fn param_ref(name: &str) -> Json_ {
    json!({ "$ref": format!("#/components/parameters/{name}") })
}

fn schema_ref(name: &str) -> Json_ {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn response_ref(name: &str) -> Json_ {
    json!({ "$ref": format!("#/components/responses/{name}") })
}

/// Adds the error answers any request can get, whatever its endpoint: a bad or
/// unknown parameter or a head hyper cannot parse (400), no token (401), a declared
/// body over http.max_body (413), an overlong target (414), a foreign `Host` (421),
/// too many or too large headers (431), and no free connection or store-query turn
/// (503, with `Retry-After`).
fn add_common(responses: &mut Json_) {
    for (code, name) in [
        ("400", "BadRequest"),
        ("401", "Unauthorized"),
        ("413", "TooLarge"),
        ("414", "UriTooLong"),
        ("421", "MisdirectedRequest"),
        ("431", "HeadersTooLarge"),
        ("503", "Unavailable"),
    ] {
        if responses.get(code).is_none() {
            responses[code] = response_ref(name);
        }
    }
}

/// A JSON 200 answer with `schema`, plus the error answers every read can give and
/// `errors` besides.
fn read_responses(description: &str, schema: Json_, errors: &[&str]) -> Json_ {
    let mut responses = json!({
        "200": {
            "description": description,
            "content": { "application/json": { "schema": schema } },
        },
    });
    for code in errors {
        let name = match *code {
            "400" => "BadRequest",
            "404" => "NotFound",
            "500" => "InternalError",
            other => other,
        };
        responses[*code] = response_ref(name);
    }
    add_common(&mut responses);
    responses
}

fn get(summary: &str, description: &str, parameters: Vec<Json_>, responses: Json_) -> Json_ {
    json!({
        "get": {
            "summary": summary,
            "description": description,
            "parameters": parameters,
            "responses": responses,
        }
    })
}

fn build() -> Json_ {
    let window_note = |default: &str| {
        format!("The window is [start, end), times in RFC 3339. Without them: {default}.")
    };
    let mut doc = json!({
        "openapi": "3.0.3",
        "info": {
            "title": "edge-agent local API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The gateway's local JSON API. Timestamps are RFC 3339 (UTC, milliseconds). \
    Every error is JSON `{\"error\": ..., \"field\": ...}`; `field` names the query parameter, header, \
    path segment or body at fault. Requests must name this gateway in `Host` (localhost, its address \
    or a configured http.hostnames entry; others get 421). With http.token set, writes need \
    `Authorization: Bearer <token>`, and so does every request once the server listens on a \
    non-loopback address (reads also accept the token as HTTP Basic password).",
        },
        "servers": [{ "url": "/" }],
        "security": [{}, { "bearer": [] }, { "basic": [] }],
        "paths": {
            "/api/v1/status": get(
                "Gateway status",
                "Gateway id, version, uptime, readiness, the store's figures, the upstream link \
    and every configured meter's poll counters.",
                vec![],
                read_responses("The status document", schema_ref("Status"), &["500"]),
            ),
            "/api/v1/meters": get(
                "Meters and their latest values",
                "Configured meters in config order, then pushed meters seen since the start, \
    each with its latest reading (values with units) and the last few readings.",
                vec![],
                read_responses("The meters", schema_ref("Meters"), &[]),
            ),
            "/api/v1/meters/{id}/readings": get(
                "A meter's stored readings",
                &format!("{} At most 366 days; `limit` readings per answer, \
    `next_start` says where to continue.", window_note("the last hour")),
                vec![param_ref("MeterId"), param_ref("Start"), param_ref("End"), json!({
                    "name": "limit", "in": "query", "required": false,
                    "description": "Most readings answered (1..=100000, default 10000).",
                    "schema": { "type": "integer", "minimum": 1, "maximum": 100000, "default": 10000 },
                })],
                read_responses("The readings", schema_ref("Readings"), &["400", "404", "500"]),
            ),
            "/api/v1/meters/{id}/series": get(
                "A meter's 15-minute energy series",
                &format!("Every stored 15-minute interval starting in the window, latest \
    revision of each, in time order. {} At most {MAX_SERIES_DAYS} days.",
                    window_note("the last 24 hours")),
                vec![param_ref("MeterId"), param_ref("Start"), param_ref("End")],
                read_responses("The series", schema_ref("Series"), &["400", "404", "500"]),
            ),
            "/api/v1/meters/{id}/energy": get(
                "A meter's energy in a window",
                &format!("Total energy at any boundaries: stored intervals for the whole \
    quarters, raw samples for the partial edges. {} 404 also when the meter has no energy data.",
                    window_note("the last 24 hours")),
                vec![param_ref("MeterId"), param_ref("Start"), param_ref("End")],
                read_responses("The energy", schema_ref("Energy"), &["400", "404", "500"]),
            ),
            "/api/v1/meters/{id}/forecast": get(
                "A meter's energy forecast",
                &format!("Forecast per 15-minute interval and in total, from the meter's \
    complete intervals, with the backtest error on its own history. {} At most \
    {MAX_FORECAST_DAYS} days. 404 also when the meter has no interval to forecast from.",
                    window_note("the 24 hours from the current quarter")),
                vec![param_ref("MeterId"), param_ref("Start"), param_ref("End")],
                read_responses("The forecast", schema_ref("Forecast"), &["400", "404", "500"]),
            ),
            "/api/v1/top": get(
                "Top meters by energy",
                &format!("The `n` meters with the most energy in the window, largest first. {}",
                    window_note("everything stored")),
                vec![param_ref("Start"), param_ref("End"), json!({
                    "name": "n", "in": "query", "required": false,
                    "description": format!("How many meters (1..={MAX_TOP}, default 3)."),
                    "schema": { "type": "integer", "minimum": 1, "maximum": MAX_TOP, "default": 3 },
                })],
                read_responses("The top meters", schema_ref("Top"), &["400", "500"]),
            ),
            "/api/v1/clusters": get(
                "Operating-state clusters of every meter",
                "The stored cluster summaries (recomputed by the analytics stage every \
    analytics.cluster_every readings of a meter, never per request).",
                vec![],
                read_responses("The clusters", schema_ref("Clusters"), &["400", "500"]),
            ),
            "/api/v1/events": get(
                "Alarm events and active alarms",
                &format!("The most recent alarm events (raised and cleared), newest first; the \
    last {RECENT_EVENTS} are kept. And the alarms raised now."),
                vec![json!({
                    "name": "limit", "in": "query", "required": false,
                    "description": format!("Most events answered (1..={RECENT_EVENTS}, default {DEFAULT_EVENTS})."),
                    "schema": { "type": "integer", "minimum": 1, "maximum": RECENT_EVENTS, "default": DEFAULT_EVENTS },
                })],
                read_responses("The events", schema_ref("Events"), &["400", "500"]),
            ),
            "/api/v1/live": {
                "get": {
                    "summary": "Live updates (server-sent events)",
                    "description": "A `text/event-stream`: event `meters` (the /api/v1/meters \
    document) when new readings were stored, at most once a second, and event `status` (the \
    /api/v1/status document) every 5 seconds.",
                    "parameters": [],
                    "responses": {
                        "200": {
                            "description": "The event stream",
                            "content": { "text/event-stream": { "schema": { "type": "string" } } },
                        },
                        "401": response_ref("Unauthorized"),
                        "421": response_ref("MisdirectedRequest"),
                    },
                }
            },
            "/api/v1/meters/{id}/intervals/recompute": {
                "post": {
                    "summary": "Recompute a meter's intervals",
                    "description": "Rebuilds the closed 15-minute intervals of the meter that start in \
    [start, end) from its stored readings, and stores and publishes a new revision of each one whose \
    figures changed (for late data older than analytics.retention, which intervals no longer take \
    by themselves). `start` and `end` are required; the window may span at most \
    analytics.max_recompute. Needs the bearer token when http.token is set.",
                    "security": [{ "bearer": [] }],
                    "parameters": [param_ref("MeterId"), param_ref("Start"), param_ref("End")],
                    "responses": {
                        "200": {
                            "description": "The intervals recomputed and how many got a new revision",
                            "content": { "application/json": { "schema": {
                                "type": "object",
                                "properties": {
                                    "meter": { "type": "string" },
                                    "start": { "type": "string", "format": "date-time" },
                                    "end": { "type": "string", "format": "date-time" },
                                    "intervals": { "type": "integer", "minimum": 0 },
                                    "revised": { "type": "integer", "minimum": 0 },
                                },
                            } } },
                        },
                        "400": response_ref("BadRequest"),
                        "401": response_ref("Unauthorized"),
                        "404": response_ref("NotFound"),
                        "421": response_ref("MisdirectedRequest"),
                        "503": response_ref("Unavailable"),
                        "500": response_ref("InternalError"),
                    },
                }
            },
            "/api/v1/openapi.json": get(
                "This document",
                "The OpenAPI 3 description of /api/v1.",
                vec![],
                read_responses("The OpenAPI document", json!({ "type": "object" }), &[]),
            ),
            "/api/v1/ingest": {
                "post": {
                    "summary": "Push readings",
                    "description": "Stores pushed series. JSON: one series \
    `{meter, unit, kind, points: [{ts, value}]}` or an array of them; CSV (`text/csv`): lines \
    `meter,timestamp,quantity,value`. `kind` is power (W, kW), energy_delta or energy_total (Wh, kWh); \
    `ts` RFC 3339 or Unix milliseconds. The answer comes once the batch is durable. A batch with \
    any bad point is rejected whole, nothing of it stored, and the answer names every bad point. \
    A point whose meter, quantity and timestamp are stored with the same value is skipped; with a \
    different value the batch is refused (409) unless its series says `\"correct\": true` or the \
    request has `?correct=true`: the point is then stored as a correction that reads and intervals \
    follow. Needs the bearer token when http.token is set.",
                    "security": [{ "bearer": [] }],
                    "parameters": [{
                        "name": "dry_run", "in": "query", "required": false,
                        "description": "true: only parse and validate, store nothing, and answer the parsed series.",
                        "schema": { "type": "boolean", "default": false },
                    }, {
                        "name": "correct", "in": "query", "required": false,
                        "description": "true: any point of the batch may replace a different stored value (a correction); for CSV bodies, which have no series flag.",
                        "schema": { "type": "boolean", "default": false },
                    }],
                    "requestBody": {
                        "required": true,
                        "content": {
                            "application/json": { "schema": { "oneOf": [
                                schema_ref("IngestSeries"),
                                { "type": "array", "items": schema_ref("IngestSeries") },
                            ] } },
                            "text/csv": { "schema": { "type": "string" } },
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "Stored (or, with dry_run, validated) batch",
                            "content": { "application/json": { "schema": schema_ref("IngestOutcome") } },
                        },
                        "400": {
                            "description": "Rejected batch (the body does not parse as JSON or CSV), or a bad or repeated parameter: nothing stored",
                            "content": { "application/json": { "schema": schema_ref("IngestRejected") } },
                        },
                        "401": response_ref("Unauthorized"),
                        "408": response_ref("BodyTimeout"),
                        "413": response_ref("TooLarge"),
                        "415": response_ref("UnsupportedMediaType"),
                        "421": response_ref("MisdirectedRequest"),
                        "409": {
                            "description": "Refused batch: a point's meter, quantity and timestamp hold a different value and the push does not correct it; nothing stored; `problems` names each such point with the stored and the offered value",
                            "content": { "application/json": { "schema": schema_ref("IngestRejected") } },
                        },
                        "422": {
                            "description": "Rejected batch (bad points or series): nothing stored; `problems` names every bad point",
                            "content": { "application/json": { "schema": schema_ref("IngestRejected") } },
                        },
                        "503": response_ref("Unavailable"),
                        "500": response_ref("InternalError"),
                    },
                }
            },
        },
        "components": components(),
    });
    // Every operation can get the answers of the server, the guard and the
    // parameter check, whatever its own.
    if let Some(paths) = doc["paths"].as_object_mut() {
        for item in paths.values_mut() {
            if let Some(ops) = item.as_object_mut() {
                for op in ops.values_mut() {
                    add_common(&mut op["responses"]);
                }
            }
        }
    }
    doc
}

fn components() -> Json_ {
    let time = || json!({ "type": "string", "format": "date-time" });
    let nullable_time = || json!({ "type": "string", "format": "date-time", "nullable": true });
    let number = || json!({ "type": "number" });
    let nullable_number = || json!({ "type": "number", "nullable": true });
    let integer = || json!({ "type": "integer", "minimum": 0 });
    let error = |description: &str| {
        json!({
            "description": description,
            "content": { "application/json": { "schema": schema_ref("Error") } },
        })
    };
    let mut schemas = serde_json::Map::new();
    schemas.insert("Error".into(), json!({
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": { "type": "string", "description": "What is wrong" },
                    "field": { "type": "string", "description": "The parameter, header, path segment or body at fault" },
                },
            }));
    schemas.insert("Flags".into(), json!({
                "type": "object",
                "properties": {
                    "gap": { "type": "boolean", "description": "Part of the time has no data" },
                    "reset": { "type": "boolean", "description": "A counter reset or meter swap" },
                    "estimated": { "type": "boolean", "description": "Some energy rests on an assumed spacing" },
                },
            }));
    schemas.insert(
        "Status".into(),
        json!({
            "type": "object",
            "properties": {
                "gateway": { "type": "string" },
                "version": { "type": "string" },
                "now": time(),
                "started": time(),
                "uptime_s": integer(),
                "ready": { "type": "boolean" },
                "not_ready_because": { "type": "string", "nullable": true },
                "store": {
                    "type": "object",
                    "properties": {
                        "records": integer(), "first_seq": integer(), "last_seq": integer(),
                        "quarantined": integer(), "disk_bytes": integer(), "quota_bytes": integer(),
                        "live_bytes": integer(), "dropped": integer(),
                        "write_blocked": { "type": "boolean" }, "write_failed": { "type": "boolean" },
                        "held": integer(), "held_dropped": integer(), "free_bytes": integer(),
                        "journal": { "type": "string", "enum": ["buffered", "runtime+direct", "runtime+buffered"] },
                    },
                },
                "upstream": schema_ref("Upstream"),
                "broker": {
                    "type": "object",
                    "nullable": true,
                    "description": "The embedded MQTT broker's counters since the start.",
                    "properties": {
                        "restarts": integer(), "failures": integer(), "panics": integer(),
                        "refused_publishes": integer(), "refused_client_ids": integer(),
                    },
                },
                "meters": { "type": "array", "items": schema_ref("MeterStatus") },
                "memory": {
                    "type": "object",
                    "description": "Resident set and the largest bounded memory consumers (docs/memory.md).",
                    "properties": {
                        "rss_bytes": { "type": "integer", "nullable": true },
                        "store_cache_bytes": integer(),
                        "held_readings": integer(),
                        "held_readings_max": integer(),
                        "broker_log": {
                            "type": "object",
                            "nullable": true,
                            "description": "The embedded broker's per-filter message logs; null without the broker.",
                            "properties": {
                                "filters": integer(), "bytes": integer(), "reserved_bytes": integer(),
                                "max_bytes": integer(), "refused_subscriptions": integer(),
                            },
                        },
                    },
                },
            },
        }),
    );
    schemas.insert(
        "Upstream".into(),
        json!({
            "type": "object",
            "nullable": true,
            "description": "The upstream link; null when no [upstream] is configured.",
            "properties": {
                "state": { "type": "string", "enum": ["offline", "catching_up", "live"] },
                "cursor": integer(),
                "last_seq": integer(),
                "backlog": integer(),
                "oldest_unacked_age_s": nullable_number(),
                "drain_rate": number(),
                "delivered": integer(),
                "dropped": integer(),
                "inflight_batches": integer(),
                "connects": integer(),
                "resent": integer(),
                "bad_commands": integer(),
                "manifests": integer(),
                "cursor_writes": integer(),
                "last_error": { "type": "string", "nullable": true },
            },
        }),
    );
    schemas.insert(
        "MeterStatus".into(),
        json!({
            "type": "object",
            "properties": {
                "id": { "type": "string" },
                "state": { "type": "string", "enum": ["pending", "ok", "failing", "backing_off"] },
                "polls": integer(),
                "success_rate": nullable_number(),
                "last_poll": nullable_time(),
                "last_success": nullable_time(),
                "latency_ms": nullable_number(),
                "successes": integer(), "timeouts": integer(), "exceptions": integer(),
                "transport_errors": integer(), "decode_errors": integer(),
                "invalid_values": integer(), "consecutive_failures": integer(),
                "last_error": { "type": "string", "nullable": true, "maxLength": 259,
                    "description": "Why the last failed poll failed (kept after the meter answers again; cut to 256 bytes and `…`)" },
                "last_error_at": nullable_time(),
                "next_retry": { "type": "string", "format": "date-time", "nullable": true,
                    "description": "When a failing meter is tried next; null while it answers" },
            },
        }),
    );
    schemas.insert(
        "Value".into(),
        json!({
            "type": "object",
            "properties": {
                "quantity": { "type": "string" },
                "unit": { "type": "string" },
                "kind": { "type": "string" },
                "value": nullable_number(),
                "invalid": { "type": "string", "description": "Why `value` is null" },
            },
        }),
    );
    schemas.insert(
        "Reading".into(),
        json!({
            "type": "object",
            "properties": {
                "ts": time(),
                "seq": integer(),
                "values": { "type": "array", "items": schema_ref("Value") },
            },
        }),
    );
    schemas.insert("Meters".into(), json!({
                "type": "object",
                "properties": {
                    "meters": { "type": "array", "items": {
                        "type": "object",
                        "properties": {
                            "id": { "type": "string" },
                            "manufacturer": { "type": "string", "nullable": true },
                            "model": { "type": "string", "nullable": true },
                            "serial": { "type": "string", "nullable": true },
                            "polled": { "type": "boolean" },
                            "state": { "type": "string", "nullable": true },
                            "latest": { "allOf": [schema_ref("Reading")], "nullable": true },
                            "recent": { "type": "array", "items": {
                                "type": "object",
                                "properties": {
                                    "ts": time(),
                                    "values": { "type": "object", "additionalProperties": nullable_number() },
                                },
                            } },
                        },
                    } },
                },
            }));
    schemas.insert(
        "Readings".into(),
        json!({
            "type": "object",
            "properties": {
                "meter": { "type": "string" },
                "start": time(),
                "end": time(),
                "count": integer(),
                "truncated": { "type": "boolean" },
                "next_start": nullable_time(),
                "readings": { "type": "array", "items": schema_ref("Reading") },
            },
        }),
    );
    schemas.insert(
        "Interval".into(),
        json!({
            "type": "object",
            "properties": {
                "start": time(),
                "end": time(),
                "energy_kwh": number(),
                "coverage": { "type": "number", "minimum": 0, "maximum": 1 },
                "samples": integer(),
                "min_w": nullable_number(),
                "mean_w": nullable_number(),
                "max_w": nullable_number(),
                "flags": schema_ref("Flags"),
                "revision": integer(),
                "seq": integer(),
            },
        }),
    );
    schemas.insert(
        "Series".into(),
        json!({
            "type": "object",
            "properties": {
                "meter": { "type": "string" },
                "quantity": { "type": "string", "nullable": true },
                "start": time(),
                "end": time(),
                "count": integer(),
                "intervals": { "type": "array", "items": schema_ref("Interval") },
            },
        }),
    );
    schemas.insert(
        "Energy".into(),
        json!({
            "type": "object",
            "properties": {
                "meter": { "type": "string" },
                "quantity": { "type": "string" },
                "start": time(),
                "end": time(),
                "energy_kwh": number(),
                "coverage": { "type": "number", "minimum": 0, "maximum": 1 },
                "flags": schema_ref("Flags"),
            },
        }),
    );
    schemas.insert(
        "Top".into(),
        json!({
            "type": "object",
            "properties": {
                "start": time(),
                "end": time(),
                "n": integer(),
                "meters": { "type": "array", "items": {
                    "type": "object",
                    "properties": { "meter": { "type": "string" }, "energy_kwh": number() },
                } },
            },
        }),
    );
    schemas.insert(
        "Forecast".into(),
        json!({
            "type": "object",
            "properties": {
                "meter": { "type": "string" },
                "start": time(),
                "end": time(),
                "total_kwh": number(),
                "trend_kwh_per_day": number(),
                "complete_days": integer(),
                "backtest": {
                    "type": "object",
                    "nullable": true,
                    "properties": {
                        "day_start": time(),
                        "intervals": integer(),
                        "mape_pct": number(),
                        "wape_pct": number(),
                    },
                },
                "intervals": { "type": "array", "items": {
                    "type": "object",
                    "properties": {
                        "start": time(),
                        "energy_kwh": number(),
                        "fraction": { "type": "number", "minimum": 0, "maximum": 1 },
                    },
                } },
            },
        }),
    );
    schemas.insert(
        "Clusters".into(),
        json!({
            "type": "object",
            "properties": {
                "clusters": { "type": "array", "items": schema_ref("ClusterSummary") },
            },
        }),
    );
    schemas.insert(
        "ClusterSummary".into(),
        json!({
            "type": "object",
            "properties": {
                "meter": { "type": "string" },
                "quantity": { "type": "string" },
                "computed": time(),
                "requested": { "oneOf": [{ "type": "integer" }, { "type": "string", "enum": ["auto"] }] },
                "k": integer(),
                "criterion": { "type": "string" },
                "scores": { "type": "array", "items": {
                    "type": "object",
                    "properties": { "k": integer(), "bic": number() },
                } },
                "n": integer(),
                "skipped": integer(),
                "first": nullable_time(),
                "last": nullable_time(),
                "energy_kwh": number(),
                "clusters": { "type": "array", "items": schema_ref("Cluster") },
            },
        }),
    );
    schemas.insert(
        "Cluster".into(),
        json!({
            "type": "object",
            "properties": {
                "centre_w": number(), "min_w": number(), "max_w": number(),
                "std_w": number(), "count": integer(), "share_time": number(),
                "energy_kwh": number(), "share_energy": number(),
                "top_hours": { "type": "array", "items": {
                    "type": "object",
                    "properties": { "hour": integer(), "count": integer() },
                } },
            },
        }),
    );
    schemas.insert(
        "Event".into(),
        json!({
            "type": "object",
            "properties": {
                "gateway": { "type": "string" },
                "seq": integer(),
                "ts": time(),
                "ts_ms": { "type": "integer" },
                "meter": { "type": "string" },
                "rule": { "type": "string" },
                "quantity": { "type": "string" },
                "state": { "type": "string", "enum": ["raised", "cleared"] },
                "value": number(),
                "threshold": number(),
                "count": integer(),
            },
        }),
    );
    schemas.insert(
        "Events".into(),
        json!({
            "type": "object",
            "properties": {
                "active": { "type": "array", "items": {
                    "type": "object",
                    "properties": {
                        "rule": { "type": "string" },
                        "meter": { "type": "string" },
                        "warnings": integer(),
                        "since": nullable_time(),
                        "event": { "allOf": [schema_ref("Event")], "nullable": true },
                    },
                } },
                "count": integer(),
                "kept": integer(),
                "events": { "type": "array", "items": schema_ref("Event") },
            },
        }),
    );
    schemas.insert(
        "IngestSeries".into(),
        json!({
            "type": "object",
            "required": ["meter", "unit", "kind", "points"],
            "additionalProperties": false,
            "properties": {
                "meter": { "type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$" },
                "unit": { "type": "string", "enum": ["W", "kW", "Wh", "kWh"] },
                "kind": { "type": "string", "enum": ["power", "energy_delta", "energy_total"] },
                "correct": { "type": "boolean", "default": false, "description": "true: the series' points may replace different stored values (corrections)." },
                "points": { "type": "array", "items": {
                    "type": "object",
                    "required": ["ts", "value"],
                    "additionalProperties": false,
                    "properties": {
                        "ts": { "oneOf": [time(), { "type": "integer" }] },
                        "value": number(),
                    },
                } },
            },
        }),
    );
    schemas.insert(
        "IngestOutcome".into(),
        json!({
            "type": "object",
            "description": "What the batch did; with dry_run the parsed series instead.",
            "properties": {
                "stored": integer(),
                "skipped": integer(),
                "corrected": integer(),
                "too_late_for_intervals": integer(),
                "readings": integer(),
                "first_seq": { "type": "integer", "nullable": true },
                "last_seq": { "type": "integer", "nullable": true },
            },
        }),
    );
    schemas.insert(
        "IngestRejected".into(),
        json!({
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": { "type": "string" },
                "field": { "type": "string" },
                "problems": { "type": "array", "items": {
                    "type": "object",
                    "properties": {
                        "field": { "type": "string", "description": "e.g. series[0].points[3].ts" },
                        "series": integer(),
                        "point": integer(),
                        "ts": { "type": "string" },
                        "reason": { "type": "string" },
                    },
                }, "description": "The first 100 problems found" },
                "problems_total": { "type": "integer", "description": "Problems found in all" },
                "truncated": { "type": "boolean", "description": "Whether problems were left out of the list" },
            },
        }),
    );
    json!({
        "securitySchemes": {
            "bearer": { "type": "http", "scheme": "bearer", "description": "http.token" },
            "basic": { "type": "http", "scheme": "basic", "description": "Any user name, http.token as password (reads only)" },
        },
        "parameters": {
            "MeterId": {
                "name": "id", "in": "path", "required": true,
                "description": "Meter id (configured, or pushed).",
                "schema": { "type": "string" },
            },
            "Start": {
                "name": "start", "in": "query", "required": false,
                "description": "Window start, inclusive (RFC 3339, 1970..9999).",
                "schema": { "type": "string", "format": "date-time" },
            },
            "End": {
                "name": "end", "in": "query", "required": false,
                "description": "Window end, exclusive (RFC 3339, 1970..9999); after start.",
                "schema": { "type": "string", "format": "date-time" },
            },
        },
        "responses": {
            "BadRequest": error("A bad parameter; `field` names it"),
            "NotFound": error("No such meter (`field` is `id`) or endpoint (`field` is `path`)"),
            "Unauthorized": error("The token is missing or wrong (`field` is `Authorization`)"),
            "MisdirectedRequest": error("The Host header does not name this gateway (`field` is `Host`)"),
            "TooLarge": error("The body is larger than http.max_body (`field` is `body`)"),
            "UriTooLong": error("The path and query are too long (`field` is `path` or `query`)"),
            "HeadersTooLarge": error("Too many headers, or too large a head (`field` is `headers`)"),
            "BodyTimeout": error("The body did not arrive within http.body_timeout (`field` is `body`); the connection closes"),
            "UnsupportedMediaType": error("The Content-Type is not accepted (`field` is `Content-Type`)"),
            "Unavailable": error("No free connection, no store-query turn within http.heavy_query_wait, push ingest not available, or the store cannot take the batch; `Retry-After` says when to retry"),
            "InternalError": error("The store could not be read"),
        },
        "schemas": schemas,
    })
}
