use std::net::{IpAddr, SocketAddr};

use super::guard::{base64_decode, host_name, Guard};
use crate::status::config::HttpConfig;

fn guard(listen: &str, hostnames: &[&str]) -> Guard {
    let config = HttpConfig {
        listen: listen.parse().expect("address"),
        hostnames: hostnames.iter().map(|h| h.to_string()).collect(),
        ..HttpConfig::default()
    };
    Guard::new(&config, config.listen)
}

#[test]
fn host_header_is_split_from_its_port() {
    assert_eq!(host_name("LocalHost:8080").as_deref(), Some("localhost"));
    assert_eq!(host_name("gw.local.").as_deref(), Some("gw.local"));
    assert_eq!(host_name("[::1]:8080").as_deref(), Some("[::1]"));
    assert_eq!(host_name("[::1]").as_deref(), Some("[::1]"));
    assert_eq!(host_name("[::1]x"), None);
    assert_eq!(host_name("evil.com:http"), None);
    assert_eq!(host_name(""), None);
}

#[test]
fn only_this_gateways_names_pass() {
    let local: IpAddr = "127.0.0.1".parse().expect("ip");
    let g = guard("127.0.0.1:8080", &["gw-01.lan"]);
    for ok in [
        "localhost",
        "localhost:8080",
        "127.0.0.1:8080",
        "gw-01.lan",
        "GW-01.LAN:8080",
    ] {
        assert!(g.host_allowed(ok, local), "{ok}");
    }
    for bad in [
        "evil.com",
        "127.0.0.1.nip.io",
        "10.0.0.1:8080",
        "gw-01.lan.evil.com",
        "[::1]",
    ] {
        assert!(!g.host_allowed(bad, local), "{bad}");
    }
    // Listening on every address: the address the request came in on is this gateway.
    let any = guard("0.0.0.0:8080", &[]);
    let lan: IpAddr = "192.168.1.20".parse().expect("ip");
    assert!(any.host_allowed("192.168.1.20:8080", lan));
    assert!(!any.host_allowed("192.168.1.21:8080", lan));
    let _: SocketAddr = "[::1]:1".parse().expect("v6");
}

#[test]
fn base64_decodes_basic_credentials() {
    assert_eq!(
        base64_decode("dXNlcjpzZWNyZXQ=").as_deref(),
        Some(&b"user:secret"[..])
    );
    assert_eq!(base64_decode("YQ").as_deref(), Some(&b"a"[..]));
    assert_eq!(base64_decode("a b"), None);
}

/// A required condition holds readiness back, with its reason, until it turns true,
/// and again when it turns false (the MQTT ingest's subscription after a reconnect).
#[test]
fn readiness_waits_for_its_required_conditions() {
    let (subscribed, rx) = tokio::sync::watch::channel(false);
    let mut readiness = super::Readiness::new(crate::service::Liveness::new());
    readiness.require("the MQTT ingest is not subscribed", rx);
    assert_eq!(
        readiness.check(),
        Err("the MQTT ingest is not subscribed".to_string())
    );
    subscribed.send_replace(true);
    assert_eq!(readiness.check(), Ok(()));
    subscribed.send_replace(false);
    assert!(readiness.check().is_err());
}
