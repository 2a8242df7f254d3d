//! Push ingest over MQTT: the JSON of an HTTP push, published on
//! `{prefix}/{gw}/ingest/{meter}` on the embedded broker.
//!
//! - The topic names the meter. A series may leave `meter` out (the topic's is used);
//!   one that gives it must give the same, else the message is rejected.
//! - A good message is stored (durably, all-or-nothing) and counted; nothing is
//!   answered. A bad one is counted and answered with a JSON error on
//!   `{topic}/error` (QoS 1, not retained): `{"error", "reason", "meter", "problems":
//!   [...], "problems_total", "truncated", "ts"}` (the first 100 problems, within
//!   64 KiB; `problems_total` counts all), nothing of it stored. Nothing a device
//!   sends stops the agent.
//! - A good message with points too late for the 15-minute intervals (older than
//!   `analytics.retention` behind the meter's newest sample; stored all the same)
//!   is answered on `{topic}/notice` (QoS 1, not retained): `{"meter", "stored",
//!   "skipped", "too_late_for_intervals", "ts"}`.
//! - A push for a polled meter (one without `accept_push = true`) is refused, named
//!   `series[0].meter`.
//! - A different value at a stored point refuses the message with reason
//!   `conflict` (the problem names the point, the stored and the offered value)
//!   unless its series says `"correct": true`; the same value again is skipped.
//!
//! This is the MQTT front end of [`crate::ingest`]: it checks and stores through
//! the same [`Ingestor`] as the HTTP one.
//!
//! The subscriber is a rumqttc client on the broker's loopback listener, like the
//! alarm-event publisher: it subscribes with QoS 1 (rumqttd's in-process links
//! receive at QoS 0 and can only publish QoS 0, so error replies could not be QoS 1),
//! it reconnects and subscribes again on its own if the link drops, and it sees
//! exactly what any other client on the broker sees (users, payload limits). Messages
//! are stored concurrently (up to [`CONCURRENT`] at a time), so they share the
//! store's group commits instead of waiting for one flush each.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, Publish, QoS};
use serde_json::json;
use tokio::sync::{watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use super::config::MqttConfig;
use super::{ingest_filter, loopback, Topics};
use crate::ingest::wire::{check_json, Rejection};
use crate::ingest::{
    clip, valid_meter_id, IngestError, Ingestor, Problem, RejectReason, Transport,
};
use crate::model::{now_ms, rfc3339_ms};

/// Messages being checked and stored at once.
pub const CONCURRENT: usize = 32;
/// Most bytes of problems listed in one error reply (the rest is counted).
const MAX_REPLY_PROBLEM_BYTES: usize = 64 << 10;
/// How long pushes under way may take to finish at shutdown.
const STOP_LIMIT: Duration = Duration::from_secs(5);

/// Where a push for `meter` is published.
pub fn ingest_topic(topics: &Topics, meter: &str) -> String {
    format!("{}/{}/ingest/{meter}", topics.prefix, topics.gateway)
}

/// Where the error reply to a message on `topic` goes.
pub fn error_topic(topic: &str) -> String {
    format!("{topic}/error")
}

/// Largest payload the embedded broker accepts (`max_payload_size`).
fn broker_max_payload(mqtt: &MqttConfig) -> usize {
    super::broker_settings(mqtt)
        .ok()
        .and_then(|s| s.v4)
        .and_then(|servers| {
            servers
                .values()
                .next()
                .map(|s| s.connections.max_payload_size)
        })
        .unwrap_or(256 << 10)
}

/// Starts the subscriber; it runs until `stop`, then lets pushes under way finish
/// (at most a few seconds) and disconnects. The receiver says whether the
/// subscription stands (the broker acknowledged it on the current connection): a push
/// published while it does not has no subscriber, and the broker drops it, so the
/// agent is not ready until it does.
pub fn start(
    ingestor: Arc<Ingestor>,
    mqtt: &MqttConfig,
    topics: Topics,
    stop: CancellationToken,
) -> (JoinHandle<()>, watch::Receiver<bool>) {
    let addr = loopback(mqtt.listen);
    let mut opts = MqttOptions::new(
        super::agent_client_id("ingest", &topics.gateway),
        addr.ip().to_string(),
        addr.port(),
    );
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_session(true);
    // Room for the largest message the broker lets through, plus the packet header.
    let max = broker_max_payload(mqtt) + 1024;
    opts.set_max_packet_size(max, max);
    // A reserved client id: nobody else can take this session over.
    super::agent_login(&mut opts);
    // Requests are the subscription and at most one error reply per message under
    // way: more than CONCURRENT never wait.
    let (client, events) = AsyncClient::new(opts, 4 * CONCURRENT);
    let (subscribed, subscribed_rx) = watch::channel(false);
    let task = tokio::spawn(run(client, events, ingestor, topics, subscribed, stop));
    (task, subscribed_rx)
}

async fn run(
    client: AsyncClient,
    mut events: rumqttc::EventLoop,
    ingestor: Arc<Ingestor>,
    topics: Topics,
    subscribed: watch::Sender<bool>,
    stop: CancellationToken,
) {
    let filter = ingest_filter(&topics);
    let prefix = format!("{}/{}/ingest/", topics.prefix, topics.gateway);
    let permits = Arc::new(Semaphore::new(CONCURRENT));
    let mut tasks = JoinSet::new();
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => break,
            event = events.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                subscribed.send_replace(false);
                // A clean session forgets subscriptions: subscribe on every connect.
                if let Err(e) = client.try_subscribe(filter.clone(), QoS::AtLeastOnce) {
                    tracing::warn!(error = %e, "ingest subscription not sent");
                }
                tracing::debug!(filter, "MQTT ingest subscribing");
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let granted = ack
                    .return_codes
                    .iter()
                    .all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_)));
                if !granted {
                    tracing::warn!(filter, codes = ?ack.return_codes, "MQTT ingest subscription refused");
                }
                subscribed.send_replace(granted);
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let permit = tokio::select! {
                    _ = stop.cancelled() => break,
                    permit = permits.clone().acquire_owned() => permit,
                };
                let Ok(permit) = permit else { break };
                let (ingestor, client, prefix) = (ingestor.clone(), client.clone(), prefix.clone());
                tasks.spawn(async move {
                    handle(&ingestor, &client, &prefix, publish).await;
                    drop(permit);
                });
                while tasks.try_join_next().is_some() {}
            }
            Ok(_) => {}
            Err(e) => {
                subscribed.send_replace(false);
                tracing::debug!(error = %e, "MQTT ingest connection");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        }
    }
    // Pushes under way finish (their replies still go out), then disconnect.
    let drain = async { while tasks.join_next().await.is_some() {} };
    let pump = async {
        loop {
            if events.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    tokio::select! {
        _ = tokio::time::timeout(STOP_LIMIT, drain) => {}
        _ = pump => {}
    }
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(200), async {
        loop {
            match events.poll().await {
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
}

/// Checks and stores one message, or answers why not.
async fn handle(ingestor: &Ingestor, client: &AsyncClient, prefix: &str, publish: Publish) {
    let topic = publish.topic.as_str();
    let meter = topic.strip_prefix(prefix).unwrap_or(topic);
    let checked = if valid_meter_id(meter) {
        check_json(&publish.payload, Some(meter), now_ms(), &ingestor.limits)
            .and_then(|checked| ingestor.check_meters(&checked).map(|()| checked))
    } else {
        Err(Rejection::one(
            RejectReason::Invalid,
            Problem::at(
                "topic",
                format!(
                    "`{}` is not a meter id (1-64 characters of a-z, A-Z, 0-9, `-` or `_`)",
                    clip(meter)
                ),
            ),
        ))
    };
    let rejection = match checked {
        Ok(mut checked) => match ingestor
            .store_with(
                Transport::Mqtt,
                std::mem::take(&mut checked.readings),
                &checked.correct,
            )
            .await
        {
            Ok((outcome, _)) => {
                tracing::debug!(
                    topic,
                    stored = outcome.stored,
                    skipped = outcome.skipped,
                    too_late = outcome.too_late_for_intervals,
                    "MQTT push stored"
                );
                if outcome.too_late_for_intervals > 0 {
                    let notice = json!({
                        "meter": clip(meter),
                        "stored": outcome.stored,
                        "skipped": outcome.skipped,
                        "too_late_for_intervals": outcome.too_late_for_intervals,
                        "ts": rfc3339_ms(now_ms()),
                    });
                    let topic = notice_topic(topic);
                    let body = notice.to_string().into_bytes();
                    if let Err(e) = client.try_publish(&topic, QoS::AtLeastOnce, false, body) {
                        tracing::warn!(topic, error = %e, "MQTT ingest notice not sent");
                    }
                }
                return;
            }
            Err(IngestError::Conflict(conflicts)) => checked.conflicts(&conflicts),
            Err(e) => {
                tracing::warn!(topic, error = %e, "MQTT push not stored");
                Rejection::one(RejectReason::Store, Problem::at("store", e.to_string()))
            }
        },
        Err(rejection) => {
            ingestor.reject(Transport::Mqtt, rejection.reason);
            rejection
        }
    };
    tracing::info!(
        topic,
        reason = rejection.reason.as_str(),
        "{}",
        rejection.summary()
    );
    let reply = error_reply(meter, &rejection);
    if let Err(e) = client.try_publish(error_topic(topic), QoS::AtLeastOnce, false, reply) {
        tracing::warn!(topic, error = %e, "MQTT ingest error reply not sent");
    }
}

/// Where the notice about points too late for intervals goes.
pub fn notice_topic(topic: &str) -> String {
    format!("{topic}/notice")
}

/// The error reply's JSON; the problem list is cut at [`MAX_REPLY_PROBLEM_BYTES`].
pub fn error_reply(meter: &str, rejection: &Rejection) -> Vec<u8> {
    let mut problems = Vec::new();
    let mut bytes = 0;
    for p in &rejection.problems {
        let value = serde_json::to_value(p).unwrap_or_default();
        bytes += value.to_string().len();
        if bytes > MAX_REPLY_PROBLEM_BYTES {
            break;
        }
        problems.push(value);
    }
    json!({
        "error": rejection.summary(),
        "reason": rejection.reason.as_str(),
        "meter": clip(meter),
        "problems_total": rejection.problems_total,
        "truncated": problems.len() < rejection.problems_total,
        "problems": problems,
        "ts": rfc3339_ms(now_ms()),
    })
    .to_string()
    .into_bytes()
}
