//! Helpers for edge-agent's end-to-end tests: ports, MQTT subscribers, child agents.
//!
//! The simulators themselves live in `edge_agent::sim` (the demo needs them too).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

/// A free loopback port. rumqttd cannot report the port it bound for port 0, so the
/// tests pick one here (the tiny window before the broker binds it is acceptable).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// One message seen by a [`Subscriber`].
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

impl Message {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).unwrap_or(serde_json::Value::Null)
    }
}

/// A real MQTT client (rumqttc) subscribed to a filter, collecting messages.
pub struct Subscriber {
    pub client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Message>,
}

impl Subscriber {
    /// Connects (retrying until `limit`, the broker may still be starting) and subscribes.
    pub async fn connect(addr: SocketAddr, filter: &str, limit: Duration) -> Subscriber {
        let id = format!("test-{}", rand::random::<u32>());
        let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut events) = AsyncClient::new(opts, 100);
        client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("queue subscribe");
        let (tx, rx) = mpsc::unbounded_channel();
        let deadline = Instant::now() + limit;
        tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let msg = Message {
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                            retain: p.retain,
                        };
                        if tx.send(msg).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => {
                        if Instant::now() > deadline && tx.is_closed() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Subscriber { client, rx }
    }

    /// The next message, or `None` after `wait`.
    pub async fn next(&mut self, wait: Duration) -> Option<Message> {
        tokio::time::timeout(wait, self.rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// Collects messages until `done` says so or `limit` passes; returns all seen.
    pub async fn collect_until(
        &mut self,
        limit: Duration,
        mut done: impl FnMut(&[Message]) -> bool,
    ) -> Vec<Message> {
        let deadline = Instant::now() + limit;
        let mut seen = Vec::new();
        while Instant::now() < deadline && !done(&seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Some(m) = self.next(left).await {
                seen.push(m);
            }
        }
        seen
    }
}

/// Counts state messages per meter id (the `meter` field of the JSON).
pub fn states_per_meter(messages: &[Message]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for m in messages.iter().filter(|m| m.topic.ends_with("/state")) {
        if let Some(meter) = m.json()["meter"].as_str() {
            *counts.entry(meter.to_string()).or_insert(0) += 1;
        }
    }
    counts
}

/// Decodes a big-endian, high-word-first f32 from two registers, as Eastron serves it.
pub fn f32_from_words(hi: u16, lo: u16) -> f32 {
    f32::from_bits((u32::from(hi) << 16) | u32::from(lo))
}
