//! A model of what Home Assistant's MQTT integration does with discovery, for the
//! end-to-end tests: one connection subscribed to `homeassistant/#`; a new config
//! makes an entity, which subscribes its state topic and each of its availability
//! topics on that same connection (again, when another entity holds them already:
//! Home Assistant relies on the broker replaying retained messages on every
//! subscribe); a message reaches only the entities subscribed before it arrived;
//! availability follows `availability_mode` (`latest` by default, `all`, `any`);
//! value templates are rendered with `value_json` and `this.state`; an empty config
//! removes the entity.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value as Json;
use tokio::sync::mpsc;

/// One entity as Home Assistant holds it.
#[derive(Debug, Clone)]
pub struct Entity {
    /// `sensor` or `binary_sensor`.
    pub component: String,
    pub config: Json,
    /// The state before availability: `unknown` until a state message renders one.
    pub state: String,
    /// Per availability topic: the last payload seen after the entity subscribed.
    availability: Vec<(String, Option<String>)>,
    /// Topic of the latest availability message (for `latest`).
    latest: Option<String>,
}

impl Entity {
    fn available_payload(&self, topic: &str) -> String {
        self.availability_conf(topic, "payload_available", "online")
    }

    fn availability_conf(&self, topic: &str, key: &str, default: &str) -> String {
        // Per-topic payloads in the `availability` list, else the entity-wide keys.
        if let Some(list) = self.config["availability"].as_array() {
            for a in list {
                if a["topic"] == topic {
                    if let Some(p) = a[key].as_str() {
                        return p.to_string();
                    }
                }
            }
        }
        self.config[key].as_str().unwrap_or(default).to_string()
    }

    fn topic_available(&self, topic: &str, payload: &Option<String>) -> bool {
        payload.as_deref() == Some(self.available_payload(topic).as_str())
    }

    /// Whether Home Assistant shows the entity as available.
    pub fn available(&self) -> bool {
        if self.availability.is_empty() {
            return true;
        }
        match self.config["availability_mode"]
            .as_str()
            .unwrap_or("latest")
        {
            "all" => self
                .availability
                .iter()
                .all(|(t, p)| self.topic_available(t, p)),
            "any" => self
                .availability
                .iter()
                .any(|(t, p)| self.topic_available(t, p)),
            _ => match &self.latest {
                Some(latest) => self
                    .availability
                    .iter()
                    .any(|(t, p)| t == latest && self.topic_available(t, p)),
                None => false,
            },
        }
    }

    /// What Home Assistant shows: `unavailable`, or the state.
    pub fn shown(&self) -> String {
        if self.available() {
            self.state.clone()
        } else {
            "unavailable".to_string()
        }
    }

    fn availability_topics(config: &Json) -> Vec<String> {
        let mut topics = Vec::new();
        if let Some(t) = config["availability_topic"].as_str() {
            topics.push(t.to_string());
        }
        if let Some(list) = config["availability"].as_array() {
            topics.extend(
                list.iter()
                    .filter_map(|a| a["topic"].as_str().map(String::from)),
            );
        }
        topics
    }

    fn on_state(&mut self, payload: &[u8]) {
        if self.component == "binary_sensor" {
            let text = String::from_utf8_lossy(payload);
            let on = self.config["payload_on"].as_str().unwrap_or("ON");
            let off = self.config["payload_off"].as_str().unwrap_or("OFF");
            if text == on {
                self.state = "on".into();
            } else if text == off {
                self.state = "off".into();
            }
            return;
        }
        let Some(template) = self.config["value_template"].as_str() else {
            self.state = String::from_utf8_lossy(payload).into_owned();
            return;
        };
        let value_json: Json = serde_json::from_slice(payload).unwrap_or(Json::Null);
        let mut env = minijinja::Environment::new();
        let rendered = env.add_template("t", template).and_then(|()| {
            env.get_template("t")?.render(minijinja::context! {
                value_json => minijinja::Value::from(minijinja::value::Serde(&value_json)),
                this => minijinja::context! { state => self.state.clone() },
            })
        });
        match rendered {
            Ok(text) if text == "None" || text.is_empty() => self.state = "unknown".into(),
            Ok(text) => self.state = text,
            // Home Assistant logs a template error and keeps the state.
            Err(_) => {}
        }
    }
}

/// A Home Assistant-like MQTT client (see the module docs).
pub struct HomeAssistant {
    pub client: AsyncClient,
    rx: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    /// Entities by unique id.
    pub entities: HashMap<String, Entity>,
    /// Subscribed topic -> unique ids of the entities subscribed to it.
    routes: HashMap<String, Vec<String>>,
    /// Every SUBSCRIBE sent for an entity topic (topic, count).
    pub subscribes: HashMap<String, usize>,
}

impl HomeAssistant {
    /// Connects to the broker at `addr` and subscribes to `homeassistant/#`.
    pub async fn connect(addr: SocketAddr) -> HomeAssistant {
        let id = format!("ha-{}", rand::random::<u32>());
        let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut events) = AsyncClient::new(opts, 1000);
        client
            .subscribe("homeassistant/#", QoS::AtLeastOnce)
            .await
            .expect("queue subscribe");
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if tx.send((p.topic.clone(), p.payload.to_vec())).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => {
                        if tx.is_closed() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        HomeAssistant {
            client,
            rx,
            entities: HashMap::new(),
            routes: HashMap::new(),
            subscribes: HashMap::new(),
        }
    }

    async fn subscribe(&mut self, topic: &str, unique_id: &str) {
        let ids = self.routes.entry(topic.to_string()).or_default();
        if !ids.iter().any(|i| i == unique_id) {
            ids.push(unique_id.to_string());
        }
        *self.subscribes.entry(topic.to_string()).or_default() += 1;
        self.client
            .subscribe(topic, QoS::AtLeastOnce)
            .await
            .expect("queue subscribe");
    }

    async fn handle(&mut self, topic: String, payload: Vec<u8>) {
        if let Some(rest) = topic.strip_prefix("homeassistant/") {
            if let Some(component) = rest.split('/').next().filter(|_| rest.ends_with("/config")) {
                self.on_config(component.to_string(), &topic, &payload)
                    .await;
            }
            return;
        }
        let Some(ids) = self.routes.get(&topic) else {
            return;
        };
        for id in ids.clone() {
            let Some(e) = self.entities.get_mut(&id) else {
                continue;
            };
            let mut availability = false;
            for (t, last) in e.availability.iter_mut() {
                if *t == topic {
                    *last = Some(String::from_utf8_lossy(&payload).into_owned());
                    availability = true;
                }
            }
            if availability {
                e.latest = Some(topic.clone());
            }
            if e.config["state_topic"] == topic.as_str() {
                e.on_state(&payload);
            }
        }
    }

    async fn on_config(&mut self, component: String, topic: &str, payload: &[u8]) {
        if payload.is_empty() {
            // An empty config removes the entity discovered on that topic.
            self.entities
                .retain(|_, e| e.config["__topic"].as_str() != Some(topic));
            return;
        }
        let Ok(mut config) = serde_json::from_slice::<Json>(payload) else {
            return;
        };
        let Some(unique_id) = config["unique_id"].as_str().map(String::from) else {
            return;
        };
        config["__topic"] = Json::from(topic);
        if let Some(old) = self.entities.get_mut(&unique_id) {
            // The same config again changes nothing; a changed one updates in place.
            if old.config == config {
                return;
            }
        }
        let availability: Vec<(String, Option<String>)> = Entity::availability_topics(&config)
            .into_iter()
            .map(|t| (t, None))
            .collect();
        let entity = Entity {
            component,
            config: config.clone(),
            state: "unknown".into(),
            availability: availability.clone(),
            latest: None,
        };
        self.entities.insert(unique_id.clone(), entity);
        if let Some(state) = config["state_topic"].as_str() {
            self.subscribe(state, &unique_id).await;
        }
        for (t, _) in availability {
            self.subscribe(&t, &unique_id).await;
        }
    }

    /// Handles messages until `done` holds (true) or `limit` passes (false).
    pub async fn run_until(
        &mut self,
        limit: Duration,
        mut done: impl FnMut(&HomeAssistant) -> bool,
    ) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if done(self) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some((topic, payload))) => self.handle(topic, payload).await,
                _ => return done(self),
            }
        }
    }

    /// The entity with this unique id.
    pub fn entity(&self, unique_id: &str) -> Option<&Entity> {
        self.entities.get(unique_id)
    }

    /// What Home Assistant shows for the entity (`None` when it does not exist).
    pub fn shown(&self, unique_id: &str) -> Option<String> {
        self.entity(unique_id).map(Entity::shown)
    }

    /// A line per entity for failure messages.
    pub fn describe(&self) -> String {
        let mut lines: Vec<String> = self
            .entities
            .iter()
            .map(|(id, e)| format!("{id}: {} ({:?})", e.shown(), e.availability))
            .collect();
        lines.sort();
        lines.join("\n")
    }
}
