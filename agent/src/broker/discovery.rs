//! Home Assistant MQTT discovery on the embedded broker.
//!
//! For every meter quantity a retained sensor config goes to
//! `{ha}/sensor/{gw}/{meter}_{quantity}/config` (`{ha}` = `mqtt.homeassistant_prefix`,
//! quantity characters outside `a-z A-Z 0-9 _ -` become `_`; a clash gets `_2`, `_3`
//! ...). It points at the meter's retained state topic with a value template that
//! picks the quantity, takes its availability from both the gateway's
//! `{prefix}/{gw}/status` and the meter's `{prefix}/{gw}/{meter}/availability`
//! (`online`/`offline`, `availability_mode: all`), sets
//! `suggested_display_precision` per kind and unit, and carries a device block per
//! meter (named `{gw} {meter}` or the meter's configured `name`; manufacturer and
//! model from its profile, `via_device` the gateway) and an origin block. The
//! gateway itself is a `binary_sensor` (connectivity, from the same status topic)
//! at `{ha}/binary_sensor/{gw}/gateway/config`, so its device exists for
//! `via_device`.
//!
//! Configured meters are announced at start from their profiles. A quantity that
//! first shows up in a stored reading (a pushed meter, or a pushed quantity of a
//! configured one) is announced then. Everything is sent again whenever Home
//! Assistant publishes `online` on `{ha}/status` (its birth message), which a
//! loopback rumqttc client listens for.
//!
//! Missing values: the state document carries `"value": null` for a value that is
//! not a plausible number (never NaN, never 0). The template renders a number only
//! for a JSON number. Otherwise an `energy_total` sensor keeps its previous state
//! (`this.state`), so a long-term statistic never sees a drop to 0 and back (which
//! it would count as a meter reset); other sensors render `None` (state unknown).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value as Json};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{LocalBroker, Topics};
use crate::acquire::config::BusConfig;
use crate::acquire::profile::Profile;
use crate::acquire::{MeterPlan, MeterStats};
use crate::broker::config::MqttConfig;
use crate::model::{Kind, Record};

/// Quantities announced after the start (pushed ones), at most; beyond that a
/// misbehaving pusher cannot grow the set further.
pub const MAX_LEARNED: usize = 4096;

/// One quantity of a meter.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantity {
    pub name: String,
    pub unit: String,
    pub kind: Kind,
}

/// A meter as Home Assistant sees it: a device with sensors.
#[derive(Debug, Clone, PartialEq)]
pub struct DiscoveryMeter {
    pub id: String,
    /// The device's name; `{gw} {id}` without one.
    pub name: Option<String>,
    pub manufacturer: Option<String>,
    pub model: Option<String>,
    pub quantities: Vec<Quantity>,
}

impl DiscoveryMeter {
    /// The configured meters with their profiles' quantities, in config order.
    pub fn from_plans(plans: &[(BusConfig, Vec<MeterPlan>)]) -> Vec<DiscoveryMeter> {
        plans
            .iter()
            .flat_map(|(_, meters)| meters)
            .map(|m| DiscoveryMeter {
                name: m.config.name.clone(),
                ..DiscoveryMeter::from_profile(&m.config.id, &m.profile)
            })
            .collect()
    }

    /// A meter read with `profile`: one quantity per register.
    pub fn from_profile(id: &str, profile: &Profile) -> DiscoveryMeter {
        let text = |s: &str| (!s.is_empty()).then(|| s.to_string());
        DiscoveryMeter {
            id: id.to_string(),
            name: None,
            manufacturer: text(&profile.manufacturer),
            model: text(&profile.model),
            quantities: profile
                .registers
                .iter()
                .map(|r| Quantity {
                    name: r.name.clone(),
                    unit: r.unit.clone(),
                    kind: r.kind,
                })
                .collect(),
        }
    }
}

/// Identifier of the gateway's device (`via_device` of every meter).
pub fn gateway_device_id(gateway: &str) -> String {
    format!("edge-agent.{gateway}")
}

/// Identifier of a meter's device. Ids cannot hold `.`, so these never clash.
pub fn meter_device_id(gateway: &str, meter: &str) -> String {
    format!("edge-agent.{gateway}.{meter}")
}

/// Home Assistant's device class for a kind and unit; `None` when the unit is not
/// one Home Assistant accepts for the class (it would reject the sensor).
pub fn device_class(kind: Kind, unit: &str) -> Option<&'static str> {
    let (class, units): (&str, &[&str]) = match kind {
        Kind::Power => ("power", &["W", "kW", "MW"]),
        Kind::EnergyTotal | Kind::EnergyDelta => ("energy", &["Wh", "kWh", "MWh"]),
        Kind::Voltage => ("voltage", &["V", "mV", "kV"]),
        Kind::Current => ("current", &["A", "mA"]),
        Kind::Frequency => ("frequency", &["Hz", "kHz"]),
        Kind::PowerFactor => ("power_factor", &["", "%"]),
        Kind::Gauge => match unit {
            "var" | "kvar" => ("reactive_power", &["var", "kvar"]),
            "VA" => ("apparent_power", &["VA"]),
            _ => return None,
        },
    };
    units.contains(&unit).then_some(class)
}

/// Decimals Home Assistant shows for a kind and unit (`suggested_display_precision`);
/// the state documents keep the exact values. `None` for a unit not listed here.
pub fn display_precision(kind: Kind, unit: &str) -> Option<u32> {
    let precision = match (kind, unit) {
        (Kind::Voltage, "V") => 1,
        (Kind::Voltage, "kV") => 3,
        (Kind::Voltage, "mV") => 0,
        (Kind::Current, "A") => 2,
        (Kind::Current, "mA") => 0,
        (Kind::Power, "W") => 0,
        (Kind::Power, "kW") => 3,
        (Kind::Power, "MW") => 6,
        (Kind::EnergyTotal | Kind::EnergyDelta, "Wh") => 0,
        (Kind::EnergyTotal | Kind::EnergyDelta, "kWh") => 3,
        (Kind::EnergyTotal | Kind::EnergyDelta, "MWh") => 6,
        (Kind::Frequency, "Hz") => 2,
        (Kind::PowerFactor, "") => 2,
        (Kind::PowerFactor, "%") => 0,
        (Kind::Gauge, "var" | "VA") => 0,
        (Kind::Gauge, "kvar" | "kVA") => 3,
        _ => return None,
    };
    Some(precision)
}

/// Home Assistant's state class: cumulative registers are `total_increasing`,
/// instantaneous values `measurement`. An `energy_delta` value is the energy of the
/// span until the next point, neither a running total nor a measurement Home
/// Assistant accepts for energy: no state class (shown, no long-term statistics).
pub fn state_class(kind: Kind) -> Option<&'static str> {
    match kind {
        Kind::EnergyTotal => Some("total_increasing"),
        Kind::EnergyDelta => None,
        _ => Some("measurement"),
    }
}

/// The template that picks `quantity` out of the state document (see the module
/// docs for missing values).
pub fn value_template(quantity: &str, kind: Kind) -> String {
    let key = serde_json::to_string(quantity).unwrap_or_default();
    let missing = if kind == Kind::EnergyTotal {
        "{% if this.state is defined and this.state not in ['unknown', 'unavailable', 'None', ''] %}{{ this.state }}{% else %}None{% endif %}"
    } else {
        "None"
    };
    format!(
        "{{% set q = value_json['values'][{key}] | default(none) %}}{{% if q is mapping and q['value'] is number %}}{{{{ q['value'] }}}}{{% else %}}{missing}{{% endif %}}"
    )
}

/// `power_l1` -> `Power L1`.
fn display_name(quantity: &str) -> String {
    quantity
        .split('_')
        .filter(|w| !w.is_empty())
        .enumerate()
        .map(|(i, w)| {
            let phase = w.len() == 2 && w.starts_with('l') && w.as_bytes()[1].is_ascii_digit();
            if phase {
                w.to_ascii_uppercase()
            } else if i == 0 {
                let mut c = w.chars();
                c.next()
                    .map(|f| f.to_uppercase().chain(c).collect())
                    .unwrap_or_default()
            } else {
                w.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn origin() -> Json {
    json!({"name": "edge-agent", "sw_version": env!("CARGO_PKG_VERSION")})
}

pub(crate) fn topic_safe(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The discovery configs of one gateway: what has been announced, to send again.
#[derive(Debug)]
pub struct Discovery {
    topics: Topics,
    ha_prefix: String,
    meters: HashMap<String, DiscoveryMeter>,
    announced: HashSet<(String, String)>,
    object_ids: HashSet<String>,
    /// (topic, payload) of every config, in announcement order.
    configs: Vec<(String, Vec<u8>)>,
    learned: usize,
    /// Meters that say what they are once discovered (SunSpec), by meter id.
    identities: HashMap<String, Arc<MeterStats>>,
}

impl Discovery {
    /// The configs of the gateway and the configured meters.
    pub fn new(topics: Topics, ha_prefix: &str, meters: Vec<DiscoveryMeter>) -> Discovery {
        let mut d = Discovery {
            topics,
            ha_prefix: ha_prefix.to_string(),
            meters: HashMap::new(),
            announced: HashSet::new(),
            object_ids: HashSet::new(),
            configs: Vec::new(),
            learned: 0,
            identities: HashMap::new(),
        };
        d.configs.push(d.gateway_config());
        for meter in meters {
            for q in &meter.quantities {
                d.announce(&meter, q);
            }
            d.meters.insert(meter.id.clone(), meter);
        }
        d
    }

    /// Takes the device info of sensors announced later (a SunSpec meter's, whose
    /// quantities are learned from its readings) from what the meters say about
    /// themselves once discovered: manufacturer, model, serial number, version.
    pub fn with_identities(mut self, plans: &[(BusConfig, Vec<MeterPlan>)]) -> Discovery {
        self.identities = plans
            .iter()
            .flat_map(|(_, meters)| meters)
            .map(|m| (m.config.id.clone(), m.stats.clone()))
            .collect();
        self
    }

    /// Every config, in announcement order.
    pub fn configs(&self) -> &[(String, Vec<u8>)] {
        &self.configs
    }

    fn gateway_config(&self) -> (String, Vec<u8>) {
        let gw = &self.topics.gateway;
        let topic = format!(
            "{}/binary_sensor/{}/gateway/config",
            self.ha_prefix,
            topic_safe(gw)
        );
        let doc = json!({
            "name": "Online",
            "unique_id": format!("{}.online", gateway_device_id(gw)),
            "state_topic": self.topics.status(),
            "payload_on": "online",
            "payload_off": "offline",
            "device_class": "connectivity",
            "entity_category": "diagnostic",
            "device": {
                "identifiers": [gateway_device_id(gw)],
                "name": format!("edge-agent {gw}"),
                "manufacturer": "edge-agent",
                "model": "Energy-meter gateway",
                "sw_version": env!("CARGO_PKG_VERSION"),
            },
            "origin": origin(),
        });
        (topic, doc.to_string().into_bytes())
    }

    /// Adds the config of `q` of `meter` unless it was announced; returns it.
    fn announce(&mut self, meter: &DiscoveryMeter, q: &Quantity) -> Option<(String, Vec<u8>)> {
        if !self.announced.insert((meter.id.clone(), q.name.clone())) {
            return None;
        }
        let base = format!("{}_{}", meter.id, topic_safe(&q.name));
        let mut object_id = base.clone();
        let mut n = 1;
        while !self.object_ids.insert(object_id.clone()) {
            n += 1;
            object_id = format!("{base}_{n}");
        }
        let gw = &self.topics.gateway;
        let topic = format!(
            "{}/sensor/{}/{object_id}/config",
            self.ha_prefix,
            topic_safe(gw)
        );
        let mut device = json!({
            "identifiers": [meter_device_id(gw, &meter.id)],
            "name": meter.name.clone().unwrap_or_else(|| format!("{gw} {}", meter.id)),
            "via_device": gateway_device_id(gw),
        });
        if let Some(m) = &meter.manufacturer {
            device["manufacturer"] = json!(m);
        }
        if let Some(m) = &meter.model {
            device["model"] = json!(m);
        }
        if let Some(i) = self.identities.get(&meter.id).and_then(|s| s.identity()) {
            for (key, v) in [
                ("manufacturer", i.manufacturer),
                ("model", i.model),
                ("serial_number", i.serial),
                ("sw_version", i.version),
            ] {
                if !v.is_empty() {
                    device[key] = json!(v);
                }
            }
        }
        let mut doc = json!({
            "name": display_name(&q.name),
            "unique_id": format!("{}.{}", meter_device_id(gw, &meter.id), q.name),
            "state_topic": self.topics.state(&meter.id),
            "value_template": value_template(&q.name, q.kind),
            "availability": [
                {
                    "topic": self.topics.status(),
                    "payload_available": "online",
                    "payload_not_available": "offline",
                },
                {
                    "topic": self.topics.availability(&meter.id),
                    "payload_available": "online",
                    "payload_not_available": "offline",
                },
            ],
            "availability_mode": "all",
            "device": device,
            "origin": origin(),
        });
        if !q.unit.is_empty() {
            doc["unit_of_measurement"] = json!(q.unit);
        }
        if let Some(class) = device_class(q.kind, &q.unit) {
            doc["device_class"] = json!(class);
        }
        if let Some(class) = state_class(q.kind) {
            doc["state_class"] = json!(class);
        }
        if let Some(precision) = display_precision(q.kind, &q.unit) {
            doc["suggested_display_precision"] = json!(precision);
        }
        let config = (topic, doc.to_string().into_bytes());
        self.configs.push(config.clone());
        Some(config)
    }

    /// Configs for quantities of stored readings not announced yet.
    pub fn learn(&mut self, records: &[Record]) -> Vec<(String, Vec<u8>)> {
        let mut new = Vec::new();
        for reading in records.iter().filter_map(|r| r.payload.as_reading()) {
            for v in &reading.values {
                if self
                    .announced
                    .contains(&(reading.meter.clone(), v.quantity.clone()))
                {
                    continue;
                }
                if self.learned >= MAX_LEARNED {
                    if self.learned == MAX_LEARNED {
                        tracing::warn!(
                            limit = MAX_LEARNED,
                            "Home Assistant discovery: too many pushed quantities; no more are announced"
                        );
                        self.learned += 1;
                    }
                    return new;
                }
                let meter = self
                    .meters
                    .entry(reading.meter.clone())
                    .or_insert_with(|| DiscoveryMeter {
                        id: reading.meter.clone(),
                        name: None,
                        manufacturer: None,
                        model: Some("pushed readings".into()),
                        quantities: Vec::new(),
                    })
                    .clone();
                let q = Quantity {
                    name: v.quantity.clone(),
                    unit: v.unit.clone(),
                    kind: v.kind,
                };
                if let Some(config) = self.announce(&meter, &q) {
                    self.learned += 1;
                    new.push(config);
                }
            }
        }
        new
    }
}

fn publish_all(broker: &LocalBroker, configs: &[(String, Vec<u8>)]) {
    for (topic, payload) in configs {
        if let Err(e) = broker.publish(topic, payload.clone(), true) {
            tracing::warn!(error = %e, topic, "discovery config not published");
        }
    }
}

/// Publishes the configs retained, then sends them again on every `online` on
/// `{ha}/status` and announces new quantities from `committed`, until `stop`.
pub fn start(
    broker: Arc<LocalBroker>,
    mqtt: &MqttConfig,
    discovery: Discovery,
    committed: broadcast::Receiver<Arc<Vec<Record>>>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    let addr = super::loopback(mqtt.listen);
    let mut opts = MqttOptions::new(
        super::agent_client_id("discovery", &broker.topics.gateway),
        addr.ip().to_string(),
        addr.port(),
    );
    opts.set_keep_alive(Duration::from_secs(30));
    // A reserved client id: nobody else can take this session over.
    super::agent_login(&mut opts);
    let (client, events) = AsyncClient::new(opts, 16);
    tokio::spawn(run(broker, client, events, discovery, committed, stop))
}

async fn run(
    broker: Arc<LocalBroker>,
    client: AsyncClient,
    mut events: rumqttc::EventLoop,
    mut discovery: Discovery,
    mut committed: broadcast::Receiver<Arc<Vec<Record>>>,
    stop: CancellationToken,
) {
    publish_all(&broker, discovery.configs());
    tracing::info!(
        configs = discovery.configs().len(),
        "Home Assistant discovery published"
    );
    let birth = format!("{}/status", discovery.ha_prefix);
    let mut committed_open = true;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            batch = committed.recv(), if committed_open => match batch {
                Ok(records) => publish_all(&broker, &discovery.learn(&records)),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::debug!(batches = n, "discovery skipped committed batches");
                }
                Err(broadcast::error::RecvError::Closed) => committed_open = false,
            },
            event = events.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if let Err(e) = client.try_subscribe(birth.clone(), QoS::AtLeastOnce) {
                        tracing::warn!(error = %e, "discovery subscription not sent");
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == birth => {
                    if p.payload.as_ref() == b"online" {
                        tracing::info!("Home Assistant is online: discovery sent again");
                        publish_all(&broker, discovery.configs());
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "discovery connection");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                }
            },
        }
    }
    let _ = client.try_disconnect();
}

#[cfg(test)]
mod tests;
