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

    async fn next_event(&mut self) -> Option<LinkEvent> {
        // `recv` is cancel-safe, and nothing after it awaits.
        let (event, client) = self.events.recv().await?;
        match &event {
            LinkEvent::Connected => self.client = client,
            LinkEvent::Down { .. } => self.client = None,
            _ => {}
        }
        Some(event)
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

    async fn stop(&mut self) {
        self.stop.cancel();
        self.client = None;
        if let Some(task) = self.task.take() {
            let _ = task.await;
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

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::broker::LocalBroker;
    use crate::config::MqttConfig;
    use crate::testkit::free_port;

    /// Relays connections to `target` until the current generation is cut.
    async fn relay(listener: tokio::net::TcpListener, target: SocketAddr, cut: Arc<Notify>) {
        let generation = Arc::new(std::sync::Mutex::new(CancellationToken::new()));
        let cutter = generation.clone();
        tokio::spawn(async move {
            loop {
                cut.notified().await;
                let mut current = cutter.lock().unwrap_or_else(|e| e.into_inner());
                current.cancel();
                *current = CancellationToken::new();
            }
        });
        while let Ok((mut inbound, _)) = listener.accept().await {
            let token = generation.lock().unwrap_or_else(|e| e.into_inner()).clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                }
            });
        }
    }

    /// A plain client of `addr` subscribed to `filter`: the topics it receives.
    async fn subscriber(addr: SocketAddr, filter: &str) -> mpsc::UnboundedReceiver<String> {
        let options = MqttOptions::new("watcher", addr.ip().to_string(), addr.port());
        let (client, mut events) = AsyncClient::new(options, 16);
        client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("subscribe queued");
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let _client = client;
            let mut ready = Some(ready_tx);
            while let Ok(event) = events.poll().await {
                match event {
                    Event::Incoming(Packet::SubAck(_)) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                    Event::Incoming(Packet::Publish(p)) if tx.send(p.topic.clone()).is_err() => {
                        return
                    }
                    _ => {}
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(30), ready_rx)
            .await
            .expect("subscribed within 30 s")
            .expect("subscriber alive");
        rx
    }

    async fn next(link: &mut RumqttLink) -> LinkEvent {
        tokio::time::timeout(Duration::from_secs(30), link.next_event())
            .await
            .expect("an event within 30 s")
            .expect("the link runs")
    }

    /// Waits for the first event that `keep` accepts.
    async fn until(link: &mut RumqttLink, keep: impl Fn(&LinkEvent) -> bool) -> LinkEvent {
        loop {
            let event = next(link).await;
            if keep(&event) {
                return event;
            }
        }
    }

    /// Each connection is a new session: a publish asked for while the old one was
    /// dying never goes out on the next, and packet ids start afresh.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lost_connection_leaves_nothing_for_the_next_one() {
        let broker_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let _broker = LocalBroker::start(
            &crate::broker::upstream_logs(MqttConfig {
                listen: broker_addr,
                ..MqttConfig::default()
            }),
            "upstream",
        )
        .expect("upstream broker starts");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("relay binds");
        let relay_addr = listener.local_addr().expect("relay address");
        let cut = Arc::new(Notify::new());
        tokio::spawn(relay(listener, broker_addr, cut.clone()));
        let mut seen = subscriber(broker_addr, "t/#").await;

        let options = MqttOptions::new("link", "127.0.0.1", relay_addr.port());
        let ms = Duration::from_millis(50);
        let mut link = RumqttLink::start(options, 64, ms, ms);
        assert_eq!(next(&mut link).await, LinkEvent::Connected);
        assert!(link.publish("t/first", false, b"1".to_vec()));
        assert_eq!(
            until(&mut link, |e| matches!(e, LinkEvent::Sent(_))).await,
            LinkEvent::Sent(1)
        );
        assert_eq!(
            until(&mut link, |e| matches!(e, LinkEvent::Acked(_))).await,
            LinkEvent::Acked(1)
        );

        // The connection dies: what is asked for after the loss showed belongs to
        // no session (an event loop kept across connections queued it for the next).
        cut.notify_one();
        until(&mut link, |e| matches!(e, LinkEvent::Down { .. })).await;
        assert!(
            !link.publish("t/stale", false, b"x".to_vec()),
            "no connection"
        );

        // The next connection sends what is asked of it, and only that.
        until(&mut link, |e| *e == LinkEvent::Connected).await;
        assert!(link.publish("t/second", false, b"2".to_vec()));
        let first_sent = until(&mut link, |e| matches!(e, LinkEvent::Sent(_))).await;
        assert_eq!(first_sent, LinkEvent::Sent(1), "packet ids start afresh");
        let mut topics = Vec::new();
        while topics.last().map(String::as_str) != Some("t/second") {
            let topic = tokio::time::timeout(Duration::from_secs(30), seen.recv())
                .await
                .expect("delivered within 30 s")
                .expect("subscriber alive");
            topics.push(topic);
        }
        assert_eq!(topics, ["t/first", "t/second"]);
        link.stop().await;
    }
}
