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

/// A TCP proxy between the agent and its upstream broker, for fault injection:
/// dropping every connection (a flapping link) or silently stopping to forward
/// while keeping the connections open (a black hole).
pub struct Proxy {
    pub addr: SocketAddr,
    state: std::sync::Arc<ProxyState>,
}

#[derive(Default)]
struct ProxyState {
    /// While set, nothing is forwarded and nothing is closed.
    black_hole: std::sync::atomic::AtomicBool,
    /// Bumped to close every open connection.
    generation: std::sync::atomic::AtomicU64,
    /// Connections accepted so far.
    accepted: std::sync::atomic::AtomicU64,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let state = std::sync::Arc::new(ProxyState::default());
        let shared = state.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                let state = shared.clone();
                tokio::spawn(async move {
                    let generation = state.generation.load(Ordering::SeqCst);
                    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::select! {
                        _ = pump(cr, sw, &state, generation) => {}
                        _ = pump(sr, cw, &state, generation) => {}
                    }
                    // Both halves drop here: the connection closes on both sides.
                });
            }
        });
        Proxy { addr, state }
    }

    /// Closes every connection open now (new ones are accepted as usual).
    pub fn drop_connections(&self) {
        self.state
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Stops (or resumes) forwarding without closing anything.
    pub fn set_black_hole(&self, on: bool) {
        self.state
            .black_hole
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn accepted(&self) -> u64 {
        self.state
            .accepted
            .load(std::sync::atomic::Ordering::SeqCst)
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: &ProxyState,
    generation: u64,
) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if state.generation.load(Ordering::SeqCst) != generation {
            return;
        }
        if state.black_hole.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let n = match tokio::time::timeout(Duration::from_millis(50), from.read(&mut buf)).await {
            Err(_) => continue,
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => n,
        };
        // Bytes read before a black hole starts are held back, not forwarded.
        while state.black_hole.load(Ordering::SeqCst)
            && state.generation.load(Ordering::SeqCst) == generation
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
