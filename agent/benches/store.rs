//! `cargo bench -p edge-agent --bench store`: store throughput, CPU, RSS and bytes
//! written per record at a 1M-record backlog. `EDGE_BENCH_RECORDS` and
//! `EDGE_BENCH_BATCH` change the record count and records per flush;
//! `EDGE_BENCH_DIR` the directory (use a real disk, not tmpfs). With
//! `EDGE_BENCH_RUNTIME_DIR` (a tmpfs, such as `/dev/shm`) a phase with the runtime
//! journal there follows; `EDGE_BENCH_FRAMED_ONLY=1` stops after those (profiling).

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

fn main() -> std::io::Result<()> {
    let records = env_num("EDGE_BENCH_RECORDS", 1_000_000);
    let batch = env_num("EDGE_BENCH_BATCH", 200) as usize;
    let stdout = std::io::stdout();
    edge_agent::store::bench::bench(&mut stdout.lock(), records, batch)
}
