//! The `edge-agent` binary.

fn main() -> std::process::ExitCode {
    edge_agent::cli::main()
}
