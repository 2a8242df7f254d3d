use super::*;
use crate::acquire::profile;
use crate::broker::state_json;
use crate::model::{Invalid, Payload, Reading, Value};

fn discovery() -> Discovery {
    let sdm120 = profile::builtin("sdm120").expect("built-in profile");
    Discovery::new(
        Topics::new("edge", "gw1"),
        "homeassistant",
        vec![DiscoveryMeter::from_profile("heat", &sdm120)],
    )
}

fn parse(config: &(String, Vec<u8>)) -> Json {
    serde_json::from_slice(&config.1).expect("config is JSON")
}

/// Renders a value template the way Home Assistant does: `value_json` is the state
/// document, `this` the entity's current state object.
fn render(template: &str, state_doc: &Json, this_state: &str) -> String {
    let mut env = minijinja::Environment::new();
    env.add_template("t", template).expect("template compiles");
    env.get_template("t")
        .expect("template")
        .render(minijinja::context! {
            value_json => minijinja::Value::from(minijinja::value::Serde(state_doc)),
            this => minijinja::context! { state => this_state },
        })
        .expect("template renders")
}

#[test]
fn one_config_per_quantity_with_the_required_keys() {
    let d = discovery();
    let sdm120 = profile::builtin("sdm120").expect("profile");
    let configs = d.configs();
    // The gateway's connectivity sensor, then one sensor per register.
    assert_eq!(configs.len(), 1 + sdm120.registers.len());
    let (gw_topic, _) = &configs[0];
    assert_eq!(gw_topic, "homeassistant/binary_sensor/gw1/gateway/config");
    let gw = parse(&configs[0]);
    assert_eq!(gw["state_topic"], "edge/gw1/status");
    assert_eq!(gw["device"]["identifiers"][0], "edge-agent.gw1");
    let mut topics = HashSet::new();
    for (config, register) in configs[1..].iter().zip(&sdm120.registers) {
        assert_eq!(
            config.0,
            format!("homeassistant/sensor/gw1/heat_{}/config", register.name)
        );
        assert!(topics.insert(config.0.clone()), "topic twice: {}", config.0);
        let c = parse(config);
        assert_eq!(c["state_topic"], "edge/gw1/heat/state");
        assert!(c.get("availability_topic").is_none(), "{c}");
        assert_eq!(c["availability_mode"], "all");
        let topics: Vec<&Json> = c["availability"]
            .as_array()
            .expect("availability list")
            .iter()
            .map(|a| &a["topic"])
            .collect();
        assert_eq!(topics, ["edge/gw1/status", "edge/gw1/heat/availability"]);
        for a in c["availability"].as_array().expect("list") {
            assert_eq!(a["payload_available"], "online");
            assert_eq!(a["payload_not_available"], "offline");
        }
        assert_eq!(
            c["unique_id"],
            format!("edge-agent.gw1.heat.{}", register.name)
        );
        assert_eq!(c["device"]["identifiers"][0], "edge-agent.gw1.heat");
        assert_eq!(c["device"]["manufacturer"], "Eastron");
        assert_eq!(c["device"]["model"], sdm120.model.as_str());
        assert_eq!(c["device"]["via_device"], "edge-agent.gw1");
        assert_eq!(c["origin"]["name"], "edge-agent");
        assert_eq!(c["origin"]["sw_version"], env!("CARGO_PKG_VERSION"));
        assert!(c["value_template"]
            .as_str()
            .is_some_and(|t| t.contains(&register.name)));
        if register.unit.is_empty() {
            assert!(c.get("unit_of_measurement").is_none(), "{c}");
        } else {
            assert_eq!(c["unit_of_measurement"], register.unit.as_str());
        }
    }
    let by_name = |name: &str| -> Json {
        configs
            .iter()
            .find(|(t, _)| t.ends_with(&format!("/heat_{name}/config")))
            .map(parse)
            .unwrap_or_else(|| panic!("no config for {name}"))
    };
    let energy = by_name("energy_import");
    assert_eq!(energy["device_class"], "energy");
    assert_eq!(energy["state_class"], "total_increasing");
    assert_eq!(energy["unit_of_measurement"], "kWh");
    let power = by_name("power");
    assert_eq!(power["device_class"], "power");
    assert_eq!(power["state_class"], "measurement");
    assert_eq!(power["name"], "Power");
    assert_eq!(by_name("voltage")["device_class"], "voltage");
    assert_eq!(by_name("current")["device_class"], "current");
    assert_eq!(by_name("frequency")["device_class"], "frequency");
    let pf = by_name("power_factor");
    assert_eq!(pf["device_class"], "power_factor");
    assert_eq!(pf["name"], "Power factor");
    // Decimals shown: 1 for V, 2 for A, 0 for W, 3 for kWh, 2 for Hz and the power factor.
    for (name, precision) in [
        ("voltage", 1),
        ("current", 2),
        ("power", 0),
        ("energy_import", 3),
        ("energy_total", 3),
        ("frequency", 2),
        ("power_factor", 2),
    ] {
        assert_eq!(
            by_name(name)["suggested_display_precision"],
            precision,
            "{name}"
        );
    }
}

#[test]
fn display_precision_follows_kind_and_unit() {
    assert_eq!(display_precision(Kind::Voltage, "V"), Some(1));
    assert_eq!(display_precision(Kind::Current, "A"), Some(2));
    assert_eq!(display_precision(Kind::Power, "W"), Some(0));
    assert_eq!(display_precision(Kind::Power, "kW"), Some(3));
    assert_eq!(display_precision(Kind::EnergyTotal, "kWh"), Some(3));
    assert_eq!(display_precision(Kind::EnergyDelta, "Wh"), Some(0));
    assert_eq!(display_precision(Kind::Frequency, "Hz"), Some(2));
    assert_eq!(display_precision(Kind::PowerFactor, ""), Some(2));
    assert_eq!(display_precision(Kind::Gauge, "°C"), None);
    // The precision is for display only: the state keeps the exact value.
    let d = discovery();
    let voltage = d
        .configs()
        .iter()
        .find(|(t, _)| t.ends_with("/heat_voltage/config"))
        .map(parse)
        .expect("voltage config");
    let served = 229.07318f32 as f64;
    let doc = state_json(
        "gw1",
        1,
        &reading(vec![value("voltage", "V", Kind::Voltage, Some(served))]),
    );
    let template = voltage["value_template"].as_str().expect("template");
    assert_eq!(render(template, &doc, "unknown"), "229.07318");
}

#[test]
fn classes_follow_kind_and_unit() {
    assert_eq!(device_class(Kind::Power, "kW"), Some("power"));
    assert_eq!(
        device_class(Kind::Power, "VA"),
        None,
        "unit HA would reject"
    );
    assert_eq!(device_class(Kind::EnergyDelta, "Wh"), Some("energy"));
    assert_eq!(device_class(Kind::Gauge, "var"), Some("reactive_power"));
    assert_eq!(device_class(Kind::Gauge, "VA"), Some("apparent_power"));
    assert_eq!(device_class(Kind::Gauge, "°"), None);
    assert_eq!(state_class(Kind::EnergyTotal), Some("total_increasing"));
    assert_eq!(state_class(Kind::Power), Some("measurement"));
    assert_eq!(state_class(Kind::EnergyDelta), None);
    assert_eq!(display_name("power_l1"), "Power L1");
    assert_eq!(display_name("energy_import"), "Energy import");
}

fn reading(values: Vec<Value>) -> Reading {
    Reading {
        meter: "heat".into(),
        ts_ms: 1_535_068_800_000,
        values,
    }
}

fn value(quantity: &str, unit: &str, kind: Kind, v: Option<f64>) -> Value {
    Value {
        quantity: quantity.into(),
        unit: unit.into(),
        kind,
        value: v,
        invalid: v.is_none().then_some(Invalid::Nan),
        source: Default::default(),
    }
}

#[test]
fn templates_pick_the_value_and_never_make_a_missing_energy_zero() {
    let energy = value_template("energy_import", Kind::EnergyTotal);
    let power = value_template("power", Kind::Power);
    let served: f32 = 1234.5677;
    let good = state_json(
        "gw1",
        7,
        &reading(vec![
            value(
                "energy_import",
                "kWh",
                Kind::EnergyTotal,
                Some(served as f64),
            ),
            value("power", "W", Kind::Power, Some(230.1f32 as f64)),
        ]),
    );
    let rendered = render(&energy, &good, "1200.5");
    assert_eq!(
        rendered.parse::<f32>().map(f32::to_bits),
        Ok(served.to_bits())
    );
    assert_eq!(render(&power, &good, "unknown"), "230.1");

    // The meter served NaN: the state document says null, never 0 or NaN.
    let missing = state_json(
        "gw1",
        8,
        &reading(vec![
            value("energy_import", "kWh", Kind::EnergyTotal, None),
            value("power", "W", Kind::Power, None),
        ]),
    );
    assert_eq!(missing["values"]["energy_import"]["value"], Json::Null);
    assert!(!missing.to_string().contains("NaN"));
    // Energy keeps the previous state; without one it is unknown. Power is unknown.
    assert_eq!(render(&energy, &missing, "1234.5677"), "1234.5677");
    assert_eq!(render(&energy, &missing, "unknown"), "None");
    assert_eq!(render(&energy, &missing, "unavailable"), "None");
    assert_eq!(render(&power, &missing, "230.1"), "None");
    // A reading without the quantity at all (a pushed reading of another one).
    let other = state_json(
        "gw1",
        9,
        &reading(vec![value("voltage", "V", Kind::Voltage, Some(1.0))]),
    );
    assert_eq!(render(&energy, &other, "1234.5677"), "1234.5677");
    assert_eq!(render(&power, &other, "5"), "None");
    // A real zero stays a zero.
    let zero = state_json(
        "gw1",
        10,
        &reading(vec![value("power", "W", Kind::Power, Some(0.0))]),
    );
    assert_eq!(render(&power, &zero, "5").parse::<f64>(), Ok(0.0));
}

#[test]
fn pushed_quantities_are_announced_once() {
    let mut d = discovery();
    let before = d.configs().len();
    let record = |seq: u64, meter: &str, values: Vec<Value>| Record {
        seq,
        payload: Payload::Reading(Reading {
            meter: meter.into(),
            ts_ms: 0,
            values,
        }),
    };
    let batch = vec![
        // Known quantity of a configured meter: nothing new.
        record(1, "heat", vec![value("power", "W", Kind::Power, Some(1.0))]),
        // New quantity of a configured meter, and a pushed meter.
        record(
            2,
            "heat",
            vec![value("energy_delta", "Wh", Kind::EnergyDelta, Some(1.0))],
        ),
        record(3, "pv", vec![value("power", "kW", Kind::Power, Some(1.0))]),
        record(4, "pv", vec![value("power", "kW", Kind::Power, Some(2.0))]),
    ];
    let new = d.learn(&batch);
    assert_eq!(new.len(), 2, "{new:?}");
    assert_eq!(
        new[0].0,
        "homeassistant/sensor/gw1/heat_energy_delta/config"
    );
    assert_eq!(parse(&new[0])["device"]["manufacturer"], "Eastron");
    assert_eq!(parse(&new[0])["device_class"], "energy");
    assert!(parse(&new[0]).get("state_class").is_none());
    let pv = parse(&new[1]);
    assert_eq!(new[1].0, "homeassistant/sensor/gw1/pv_power/config");
    assert_eq!(pv["state_topic"], "edge/gw1/pv/state");
    assert_eq!(pv["unit_of_measurement"], "kW");
    assert_eq!(pv["device"]["via_device"], "edge-agent.gw1");
    assert_eq!(d.configs().len(), before + 2);
    assert!(d.learn(&batch).is_empty(), "announced once");
}

#[test]
fn clashing_object_ids_get_a_suffix() {
    let meter = DiscoveryMeter {
        id: "m".into(),
        name: None,
        manufacturer: None,
        model: None,
        quantities: vec![
            Quantity {
                name: "a.b".into(),
                unit: "W".into(),
                kind: Kind::Power,
            },
            Quantity {
                name: "a b".into(),
                unit: "W".into(),
                kind: Kind::Power,
            },
        ],
    };
    let d = Discovery::new(Topics::new("edge", "gw1"), "ha", vec![meter]);
    let topics: Vec<&str> = d.configs().iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        topics[1..],
        ["ha/sensor/gw1/m_a_b/config", "ha/sensor/gw1/m_a_b_2/config"]
    );
    let ids: HashSet<String> = d.configs()[1..]
        .iter()
        .map(|c| {
            parse(c)["unique_id"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(ids.len(), 2);
}

/// Home Assistant's entity id: the device name and the entity name, slugified.
fn entity_id(config: &Json) -> String {
    let text = format!(
        "{} {}",
        config["device"]["name"].as_str().unwrap_or_default(),
        config["name"].as_str().unwrap_or_default()
    );
    let mut slug = String::new();
    for c in text.to_lowercase().chars() {
        if c.is_ascii_alphanumeric() {
            slug.push(c);
        } else if !slug.ends_with('_') {
            slug.push('_');
        }
    }
    format!("sensor.{}", slug.trim_matches('_'))
}

#[test]
fn devices_are_named_after_gateway_and_meter_or_their_configured_name() {
    let sdm120 = profile::builtin("sdm120").expect("built-in profile");
    let power = |gw: &str, name: Option<&str>| -> Json {
        let d = Discovery::new(
            Topics::new("edge", gw),
            "homeassistant",
            vec![DiscoveryMeter {
                name: name.map(String::from),
                ..DiscoveryMeter::from_profile("main", &sdm120)
            }],
        );
        d.configs()
            .iter()
            .find(|(t, _)| t.ends_with("/main_power/config"))
            .map(parse)
            .expect("power config")
    };
    let a = power("gw1", None);
    let b = power("gw2", None);
    assert_eq!(a["device"]["name"], "gw1 main");
    assert_eq!(b["device"]["name"], "gw2 main");
    assert_eq!(entity_id(&a), "sensor.gw1_main_power");
    assert_eq!(entity_id(&b), "sensor.gw2_main_power", "no collision");
    let named = power("gw1", Some("Heat pump"));
    assert_eq!(named["device"]["name"], "Heat pump");
    // The unique_id does not depend on the name: a rename keeps the entity.
    assert_eq!(named["unique_id"], a["unique_id"]);
    assert_eq!(a["unique_id"], "edge-agent.gw1.main.power");
    assert_eq!(named["device"]["identifiers"], a["device"]["identifiers"]);
}

/// A SunSpec meter's sensors are learned from its readings; their device says what
/// discovery found in the device's common model.
#[test]
fn a_discovered_meter_names_its_device() {
    let text = "gateway_id = \"gw1\"\n[[buses]]\nid = \"lan\"\ntype = \"tcp\"\naddress = \"127.0.0.1:502\"\n\
        [[meters]]\nid = \"solar\"\nbus = \"lan\"\nunit_id = 1\nprofile = \"sunspec\"\n";
    let config = crate::config::Config::from_toml(text).expect("parses");
    let plans = crate::acquire::plan_meters(&config).expect("plans");
    let mut d = Discovery::new(
        Topics::new("edge", "gw1"),
        "homeassistant",
        DiscoveryMeter::from_plans(&plans),
    )
    .with_identities(&plans);
    assert_eq!(d.configs().len(), 1, "no sensors before the first reading");
    plans[0].1[0]
        .stats
        .set_identity(crate::acquire::sunspec::Identity {
            manufacturer: "Acme Solar".into(),
            model: "AS-5000TL".into(),
            version: "2.1".into(),
            serial: "INV0001".into(),
        });
    let batch = vec![Record {
        seq: 1,
        payload: Payload::Reading(Reading {
            meter: "solar".into(),
            ts_ms: 0,
            values: vec![value("power", "W", Kind::Power, Some(1.0))],
        }),
    }];
    let new = d.learn(&batch);
    assert_eq!(new.len(), 1, "{new:?}");
    let device = &parse(&new[0])["device"];
    assert_eq!(device["manufacturer"], "Acme Solar");
    assert_eq!(device["model"], "AS-5000TL");
    assert_eq!(device["serial_number"], "INV0001");
    assert_eq!(device["sw_version"], "2.1");
}
