//! Logging to stderr, in a form journald reads well.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `RUST_LOG` overrides the configured level.
/// rumqttd's own log is off by default: it reports every client that disconnects
/// (and the agent's start-up probe) at error level, which would bury the agent's
/// messages; `RUST_LOG=rumqttd=warn` brings it back. Under
/// systemd (`JOURNAL_STREAM` set) timestamps and colours are left out: the journal
/// adds its own timestamps.
pub fn init(level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(format!("{level},rumqttd=off")))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(true);
    // A second init (tests, demo inside a test) is not an error worth failing for.
    if under_journal {
        let _ = builder.without_time().try_init();
    } else {
        let _ = builder.try_init();
    }
}
