//! [`Link`] over rumqttc.
//!
//! Each connection attempt gets a fresh `AsyncClient` and `EventLoop`. The session is
//! clean, and the sync replays from its cursor after every ConnAck, so nothing of an
//! earlier connection may reach the next one: neither rumqttc's buffered events nor
//! its packet ids, nor a request queued while the old connection was dying. A new
//! client and event loop per connection guarantee that through rumqttc's public API
//! alone (an event loop keeps requests it could not send and the events it read
//! ahead until it connects again).

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use rumqttc::{
    AsyncClient, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS, Transport,
};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use super::link::{Link, LinkEvent};
use super::wire::UpstreamTopics;
use super::{tls, SyncError, UpstreamConfig};

/// rumqttc's connection options for the upstream.
pub(super) fn options(
    cfg: &UpstreamConfig,
    gateway: &str,
    topics: &UpstreamTopics,
) -> Result<MqttOptions, SyncError> {
    let mut options = MqttOptions::new(cfg.client_id_or(gateway), cfg.host.clone(), cfg.port);
    options.set_keep_alive(cfg.keep_alive.0);
    options.set_clean_session(true);
    options.set_last_will(LastWill::new(
        topics.status.clone(),
        "offline",
        QoS::AtLeastOnce,
        true,
    ));
    // Room for a full batch and its framing; commands coming down are small.
    let outgoing = cfg.batch_bytes.0 as usize + cfg.batch_records * 64 + 4096;
    options.set_max_packet_size(64 << 10, outgoing);
    // More packet ids than this task ever has in flight: no collisions.
    options.set_inflight((cfg.inflight_batches + 16) as u16);
    if let Some(user) = &cfg.username {
        options.set_credentials(user.clone(), cfg.password.clone().unwrap_or_default());
    }
    if let Some(tls) = &cfg.tls {
        let config = tls::client_config(tls).map_err(SyncError::Tls)?;
        options.set_transport(Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(config),
        ));
    }
    Ok(options)
}

/// An event, with the client of the connection it opens (on ConnAck).
type Item = (LinkEvent, Option<AsyncClient>);

/// The upstream connection over rumqttc; its event loop runs on a task of its own.
pub(super) struct RumqttLink {
    events: mpsc::Receiver<Item>,
    /// The client of the connection the last `Connected` opened; `None` once it is
    /// down or reset.
    client: Option<AsyncClient>,
    reset: Arc<Notify>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl RumqttLink {
    /// Starts connecting (within a tokio runtime). `requests` bounds each
    /// connection's request queue; after a failure the next attempt waits a
    /// jittered backoff from `min` up to `max`.
    pub(super) fn start(
        options: MqttOptions,
        requests: usize,
        min: Duration,
        max: Duration,
    ) -> RumqttLink {
        let (tx, events) = mpsc::channel(256);
        let reset = Arc::new(Notify::new());
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(
            options,
            requests,
            min,
            max,
            tx,
            reset.clone(),
            stop.clone(),
        ));
        RumqttLink {
            events,
            client: None,
            reset,
            stop,
            task: Some(task),
        }
    }
}

impl Link for RumqttLink {
    fn publish(&mut self, topic: &str, retain: bool, payload: Vec<u8>) -> bool {
        let Some(client) = &self.client else {
            return false;
        };
        match client.try_publish(topic, QoS::AtLeastOnce, retain, payload) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(target: "edge_agent::sync", error = %e, "request queue full");
                false
            }
        }
    }

    fn subscribe(&mut self, topic: &str) -> bool {
        self.client
            .as_ref()
            .is_some_and(|c| c.try_subscribe(topic, QoS::AtLeastOnce).is_ok())
    }

    fn next_event(&mut self) -> impl std::future::Future<Output = Option<LinkEvent>> + Send + '_ {
        async move {
            // `recv` is cancel-safe, and nothing after it awaits.
            let (event, client) = self.events.recv().await?;
            match &event {
                LinkEvent::Connected => self.client = client,
                LinkEvent::Down { .. } => self.client = None,
                _ => {}
            }
            Some(event)
        }
    }

    fn reset(&mut self) {
        self.client = None;
        self.reset.notify_one();
    }

    fn disconnect(&mut self, farewell: Option<(String, Vec<u8>)>) {
        if let Some(client) = &self.client {
            if let Some((topic, payload)) = farewell {
                let _ = client.try_publish(topic, QoS::AtMostOnce, true, payload);
            }
            let _ = client.try_disconnect();
        }
    }

    fn stop(&mut self) -> impl std::future::Future<Output = ()> + Send + '_ {
        async move {
            self.stop.cancel();
            self.client = None;
            if let Some(task) = self.task.take() {
                let _ = task.await;
            }
        }
    }
}

/// What the sync needs of a rumqttc event (`None`: nothing).
fn translate(event: Event) -> Option<LinkEvent> {
    Some(match event {
        Event::Incoming(Packet::ConnAck(_)) => LinkEvent::Connected,
        Event::Incoming(Packet::PubAck(ack)) => LinkEvent::Acked(ack.pkid),
        Event::Incoming(Packet::Publish(p)) => LinkEvent::Message {
            topic: p.topic,
            payload: p.payload.to_vec(),
        },
        Event::Incoming(_) => LinkEvent::Heard,
        Event::Outgoing(Outgoing::Publish(pkid)) => LinkEvent::Sent(pkid),
        Event::Outgoing(Outgoing::Disconnect) => LinkEvent::Closed,
        Event::Outgoing(_) => return None,
    })
}

/// Owns rumqttc's event loop and forwards its events in order. `EventLoop::poll` is
/// not cancel-safe while connecting (a dropped poll closes a connection the broker
/// has just accepted, and the broker then publishes the will), so it is polled here
/// to completion, never raced against other work. `reset` drops the connection
/// (dead-link watchdog); after a failure the next attempt waits a jittered backoff.
async fn run(
    options: MqttOptions,
    requests: usize,
    min: Duration,
    max: Duration,
    tx: mpsc::Sender<Item>,
    reset: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut failures = 0u32;
    // The connection being made or in use, and its client until its ConnAck hands
    // it over.
    let mut current: Option<(EventLoop, Option<AsyncClient>)> = None;
    loop {
        let (eventloop, client) = current.get_or_insert_with(|| {
            let (client, eventloop) = AsyncClient::new(options.clone(), requests);
            (eventloop, Some(client))
        });
        let polled = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = reset.notified() => {
                // Drops the socket and everything queued for it; the next
                // connection starts afresh at once.
                current = None;
                continue;
            }
            polled = eventloop.poll() => polled,
        };
        let item = match polled {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                failures = 0;
                (LinkEvent::Connected, client.take())
            }
            Ok(event) => match translate(event) {
                Some(event) => (event, None),
                None => continue,
            },
            Err(e) => {
                // The event loop goes with the connection: what it kept for a
                // next session (requests, read-ahead events) must not reach it.
                current = None;
                let retry_in = backoff(min, max, failures);
                failures = failures.saturating_add(1);
                let down = LinkEvent::Down {
                    reason: e.to_string(),
                    retry_in,
                };
                if tx.send((down, None)).await.is_err() {
                    return;
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(retry_in) => {}
                }
                continue;
            }
        };
        if tx.send(item).await.is_err() {
            return;
        }
    }
}

/// Delay before reconnect attempt number `failures + 1`: doubling from `min` up to
/// `max`, then jittered to between half and all of it, so a fleet does not
/// reconnect in step.
fn backoff(min: Duration, max: Duration, failures: u32) -> Duration {
    let exp = min.saturating_mul(1u32 << failures.min(16)).min(max);
    exp.mul_f64(rand::thread_rng().gen_range(0.5..=1.0))
}
