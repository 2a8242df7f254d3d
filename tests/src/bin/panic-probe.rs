//! Test helper, not shipped: installs the agent's panic hook (as `edge-agent` does first
//! thing) and panics inside a tokio task, where the runtime would otherwise catch the
//! panic and keep the process running half-alive. The test expects SIGABRT.

fn main() {
    edge_agent::service::install_panic_hook();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let task = tokio::spawn(async {
            panic!("probe panic inside a task");
        });
        let _ = task.await;
        // Only reached if the panic did not end the process.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        println!("still running after a panic");
    });
}
