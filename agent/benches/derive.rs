//! `cargo bench -p edge-agent --bench derive`: interval throughput, clustering time
//! (k = 3 and auto) and forecast time on one year of one meter's data.

fn main() -> std::io::Result<()> {
    let stdout = std::io::stdout();
    edge_agent::derive::bench::bench(&mut stdout.lock())
}
