//! What the embedded broker lets a LAN client do, and how its failures are seen.
//!
//! - **Who may publish what.** Clients may publish on the ingest topics
//!   (`{prefix}/{gw}/ingest/{meter}`, one level) and anywhere outside the agent's
//!   topics, which includes Home Assistant's birth topic `{ha}/status`. Everything
//!   else under `{prefix}/{gw}/` (status, states, intervals, events, error replies)
//!   and the agent's discovery configs (`{ha}/{component}/{gw}/...`) belong to the
//!   agent. The patched rumqttd calls [`lan_may_publish`] for every publish and will
//!   message of a client that is not the agent; a refused one is dropped before it
//!   is retained or forwarded, its acknowledgement still sent (a QoS 1 client does
//!   not resend it forever), and counted.
//! - **Reserved client ids.** The agent's in-process link (`edge-agent`) and its
//!   loopback clients (`edge-agent-{ingest,discovery,events}-{gw}`) use ids nobody
//!   else gets: the broker's auth handler refuses a connection with one of them
//!   unless it logs in as [`AGENT_USER`] with this process's random secret. Without
//!   that, a client with the same id would take the session over (MQTT says the
//!   newer connection wins).
//! - **Connection cap.** The listener holds at most `mqtt.max_connections`; a
//!   connection beyond it is closed as soon as it is accepted. The cap stays below
//!   the router's `max_connections`, so the router never refuses a connection (the
//!   path of rumqttd's panic, upstream issue #1062, also fixed in the patch).
//! - **Failures.** The panic hook ([`crate::service::install_panic_hook`]) lets a
//!   panic on the broker's own threads ([`is_broker_thread`]) unwind that thread
//!   instead of aborting the process, and counts it here; the supervisor
//!   ([`super::supervise`]) then starts the broker again.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use super::Topics;
use crate::broker::config::MqttConfig;

/// Username of the agent's own loopback clients.
pub const AGENT_USER: &str = "edge-agent";
/// Client id of the agent's in-process link (retained status and states).
pub const AGENT_LINK_ID: &str = "edge-agent";
/// The loopback clients the agent runs (`edge-agent-{role}-{gw}`).
pub const AGENT_ROLES: [&str; 3] = ["ingest", "discovery", "events"];
/// Links the agent holds into the router besides the listener's connections.
pub const IN_PROCESS_LINKS: usize = 1;
/// Name of the listener's thread (`[v4.1] name`).
pub const LISTENER_THREAD: &str = "mqtt-listener";
/// Name of rumqttd's router thread (`router-{id}`, the broker id is 0).
pub const ROUTER_THREAD: &str = "router-0";

/// Panics on the broker's threads since the process started.
static BROKER_PANICS: AtomicU64 = AtomicU64::new(0);

/// Whether a thread of this name is one of the embedded broker's.
pub fn is_broker_thread(name: Option<&str>) -> bool {
    matches!(name, Some(LISTENER_THREAD | ROUTER_THREAD))
}

/// Counts a panic on a broker thread (the panic hook calls it).
pub fn note_broker_panic() {
    BROKER_PANICS.fetch_add(1, Ordering::Relaxed);
}

/// Panics on the broker's threads since the process started.
pub fn broker_panics() -> u64 {
    BROKER_PANICS.load(Ordering::Relaxed)
}

/// The embedded broker's counters, for the status document and `/metrics`.
#[derive(Debug, Default)]
pub struct BrokerStats {
    /// Publishes and wills refused by the publish rule.
    pub refused_publishes: AtomicU64,
    /// Connections refused for a reserved client id without the agent's secret.
    pub refused_client_ids: AtomicU64,
    /// Failures seen by the supervisor (each starts a restart attempt).
    pub failures: AtomicU64,
    /// Successful restarts.
    pub restarts: AtomicU64,
    /// Fault injection for tests: the next publish through the router panics there.
    panic_next: AtomicBool,
    /// The running broker's filter-log meter and `mqtt.log_max_bytes`.
    pub(super) log: std::sync::Mutex<Option<rumqttd::LogMeter>>,
    pub(super) log_max_bytes: AtomicU64,
}

impl BrokerStats {
    /// Broker panics since the process started (all brokers of the process).
    pub fn panics(&self) -> u64 {
        broker_panics()
    }

    /// Memory of the running broker's per-filter message logs.
    pub fn log_memory(&self) -> super::LogMemory {
        let max_bytes = self.log_max_bytes.load(Ordering::Relaxed);
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        match log.as_ref() {
            Some(m) => super::LogMemory {
                filters: m.filters() as u64,
                bytes: m.bytes_in_use() as u64,
                reserved_bytes: m.reserved_bytes() as u64,
                max_bytes,
                refused: m.refused() as u64,
            },
            None => super::LogMemory {
                max_bytes,
                ..super::LogMemory::default()
            },
        }
    }

    /// Makes the router thread panic at the next publish it handles (tests only).
    #[doc(hidden)]
    pub fn panic_router_for_test(&self) {
        self.panic_next.store(true, Ordering::SeqCst);
    }
}

/// This process's secret for the agent's own clients: random, never stored.
fn secret() -> &'static str {
    static SECRET: OnceLock<String> = OnceLock::new();
    SECRET.get_or_init(|| {
        let bytes: [u8; 24] = rand::random();
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    })
}

/// Client id of one of the agent's loopback clients.
pub fn agent_client_id(role: &str, gateway: &str) -> String {
    format!("edge-agent-{role}-{gateway}")
}

/// Logs an agent client in with the process's secret (its reserved id needs it).
pub fn agent_login(opts: &mut rumqttc::MqttOptions) {
    opts.set_credentials(AGENT_USER, secret());
}

/// The client ids nobody but the agent may use.
pub fn reserved_ids(gateway: &str) -> HashSet<String> {
    let mut ids: HashSet<String> = AGENT_ROLES
        .iter()
        .map(|role| agent_client_id(role, gateway))
        .collect();
    ids.insert(AGENT_LINK_ID.to_string());
    ids
}

/// Whether a client that is not the agent may publish on `topic` (see the module
/// documentation).
pub fn lan_may_publish(topics: &Topics, ha_prefix: &str, topic: &str) -> bool {
    let own = format!("{}/{}", topics.prefix, topics.gateway);
    if let Some(rest) = topic.strip_prefix(own.as_str()) {
        if rest.is_empty() {
            return false;
        }
        if let Some(under) = rest.strip_prefix('/') {
            return under
                .strip_prefix("ingest/")
                .is_some_and(|meter| !meter.is_empty() && !meter.contains('/'));
        }
    }
    // `{ha}/{component}/{gw}/...`: the agent's discovery configs.
    let node = super::discovery::topic_safe(&topics.gateway);
    if let Some(rest) = topic
        .strip_prefix(ha_prefix)
        .and_then(|r| r.strip_prefix('/'))
    {
        let mut levels = rest.splitn(3, '/');
        let (_component, id, more) = (levels.next(), levels.next(), levels.next());
        if id == Some(node.as_str()) && more.is_some() {
            return false;
        }
    }
    true
}

/// Compares two secrets in time independent of where they differ.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Installs the publish rule (router) and the login check (listener) into rumqttd's
/// settings.
pub fn install(
    settings: &mut rumqttd::Config,
    mqtt: &MqttConfig,
    topics: &Topics,
    stats: Arc<BrokerStats>,
) {
    let reserved = Arc::new(reserved_ids(&topics.gateway));
    let (ids, rule_topics, ha, filter_stats) = (
        reserved.clone(),
        topics.clone(),
        mqtt.homeassistant_prefix.clone(),
        stats.clone(),
    );
    settings.router.publish_filter = Some(rumqttd::PublishFilter(Arc::new(
        move |client_id: &str, topic: &str| {
            if filter_stats.panic_next.swap(false, Ordering::SeqCst) {
                panic!("fault injected into the broker's router (test)");
            }
            if ids.contains(client_id) || lan_may_publish(&rule_topics, &ha, topic) {
                return true;
            }
            let n = filter_stats
                .refused_publishes
                .fetch_add(1, Ordering::Relaxed)
                + 1;
            // The first few, then one in a thousand: a flood does not flood the log.
            if n <= 10 || n % 1000 == 0 {
                tracing::warn!(
                    client_id,
                    topic,
                    refused_total = n,
                    "MQTT publish on the agent's topic refused"
                );
            }
            false
        },
    )));
    let users = mqtt.users.clone();
    if let Some(servers) = settings.v4.as_mut() {
        for server in servers.values_mut() {
            let (reserved, users, stats) = (reserved.clone(), users.clone(), stats.clone());
            server.set_auth_handler(move |client_id: String, user: String, pass: String| {
                let ok = if reserved.contains(&client_id) {
                    let ok = user == AGENT_USER && same_secret(&pass, secret());
                    if !ok {
                        stats.refused_client_ids.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            client_id,
                            "MQTT connection with the agent's client id refused"
                        );
                    }
                    ok
                } else if users.is_empty() {
                    true
                } else {
                    users
                        .get(&user)
                        .is_some_and(|stored| same_secret(stored, &pass))
                };
                std::future::ready(ok)
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lan_clients_publish_on_ingest_and_foreign_topics_only() {
        let t = Topics::new("edge", "gw1");
        let ok = |topic: &str| lan_may_publish(&t, "homeassistant", topic);
        assert!(ok("edge/gw1/ingest/main"));
        assert!(ok("homeassistant/status"));
        assert!(
            ok("edge/gw2/status"),
            "another gateway's topics are not ours"
        );
        assert!(ok("edge/gw10/status"));
        assert!(ok("kitchen/light"));
        assert!(ok("homeassistant/sensor/other/x/config"));
        for refused in [
            "edge/gw1/status",
            "edge/gw1",
            "edge/gw1/",
            "edge/gw1/main/state",
            "edge/gw1/main/energy/15m",
            "edge/gw1/events",
            "edge/gw1/ingest/main/error",
            "edge/gw1/ingest/",
            "edge/gw1/ingest",
            "homeassistant/sensor/gw1/main_power/config",
            "homeassistant/binary_sensor/gw1/gateway/config",
        ] {
            assert!(!ok(refused), "{refused} must be refused");
        }
    }

    #[test]
    fn reserved_ids_cover_every_agent_client() {
        let ids = reserved_ids("gw1");
        for id in [
            "edge-agent",
            "edge-agent-ingest-gw1",
            "edge-agent-discovery-gw1",
            "edge-agent-events-gw1",
        ] {
            assert!(ids.contains(id), "{id}");
        }
        assert!(!ids.contains("edge-agent-ingest-gw2"));
        assert!(same_secret(secret(), secret()));
        assert!(!same_secret(secret(), ""));
        assert_eq!(secret().len(), 48);
    }
}
