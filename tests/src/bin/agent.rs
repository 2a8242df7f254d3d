//! The agent's real command line, built inside this crate so the end-to-end tests can
//! start it as a child process (`CARGO_BIN_EXE_edge-agent-under-test`) and always get a
//! binary built from the current sources.

fn main() -> std::process::ExitCode {
    edge_agent::cli::main()
}
