//! A stand-alone rumqttd for the upstream tests: `upstream-broker PORT`. It runs as a
//! child process so a test can stop it (SIGKILL) and start it again on the same port,
//! which an in-process rumqttd cannot do. Its commit log is sized so a subscriber
//! that falls a few MiB behind does not lose messages.

use std::net::SocketAddr;
use std::time::Duration;

use edge_agent::broker::{LocalBroker, DEFAULT_BROKER_CONFIG};
use edge_agent::config::{ByteSize, MqttConfig};

fn main() -> std::process::ExitCode {
    let Some(port) = std::env::args().nth(1).and_then(|p| p.parse::<u16>().ok()) else {
        eprintln!("usage: upstream-broker PORT");
        return std::process::ExitCode::FAILURE;
    };
    let settings =
        DEFAULT_BROKER_CONFIG.replace("max_payload_size = 262144", "max_payload_size = 4194304");
    let file = std::env::temp_dir().join(format!("upstream-broker-{}.toml", std::process::id()));
    if let Err(e) = std::fs::write(&file, settings) {
        eprintln!("cannot write {}: {e}", file.display());
        return std::process::ExitCode::FAILURE;
    }
    let mqtt = MqttConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], port)),
        broker_config: Some(file.clone()),
        log_segment_size: ByteSize(16 << 20),
        log_segment_count: 16,
        log_max_bytes: ByteSize(1 << 30),
        ..MqttConfig::default()
    };
    let started = LocalBroker::start(&mqtt, "upstream-broker");
    let _ = std::fs::remove_file(&file);
    match started {
        Ok(_broker) => {
            println!("ready");
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        Err(e) => {
            eprintln!("upstream broker: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
