//! The memory allocator's settings. The agent uses glibc's malloc, tuned for a small,
//! long-running process with a dozen threads (see docs/memory.md, "Allocator and soak
//! figures"):
//!
//! - at most [`ARENA_MAX`] arenas instead of glibc's 8 per core: every thread that
//!   allocates (sled's seven IO threads, the broker's, tokio's) otherwise gets an
//!   arena of its own, each holding freed memory for itself;
//! - a fixed mmap threshold ([`MMAP_THRESHOLD`]): glibc's sliding threshold rises
//!   after a large block is freed (up to 32 MiB on 64-bit), after which large,
//!   short-lived buffers come from, and stay in, the arenas; with a fixed one they
//!   are mapped and returned to the system when freed;
//! - a trim threshold ([`TRIM_THRESHOLD`]) and a periodic `malloc_trim(0)`
//!   ([`TRIM_EVERY`]), which hands free pages in the middle of the arenas back too,
//!   not just the top of each heap.
//!
//! The `MALLOC_ARENA_MAX`, `MALLOC_MMAP_THRESHOLD_` and `MALLOC_TRIM_THRESHOLD_`
//! environment variables still win: a value set there is left alone.

use std::time::Duration;

/// Most malloc arenas.
pub const ARENA_MAX: i32 = 2;
/// Allocations from this size up are mapped on their own and unmapped when freed.
pub const MMAP_THRESHOLD: i32 = 128 << 10;
/// Free memory at the top of a heap beyond this goes back to the system at once.
pub const TRIM_THRESHOLD: i32 = 128 << 10;
/// How often free pages inside the arenas are handed back.
pub const TRIM_EVERY: Duration = Duration::from_secs(10);

/// Applies the settings; call first thing in `main`, before any thread starts.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    for (env, param, value) in [
        ("MALLOC_ARENA_MAX", libc::M_ARENA_MAX, ARENA_MAX),
        (
            "MALLOC_MMAP_THRESHOLD_",
            libc::M_MMAP_THRESHOLD,
            MMAP_THRESHOLD,
        ),
        (
            "MALLOC_TRIM_THRESHOLD_",
            libc::M_TRIM_THRESHOLD,
            TRIM_THRESHOLD,
        ),
    ] {
        if std::env::var_os(env).is_none() {
            // SAFETY: mallopt only sets a tunable; glibc validates the value and
            // returns 0 when it refuses one, which leaves glibc's default in place.
            unsafe {
                libc::mallopt(param, value);
            }
        }
    }
}

/// Hands free pages inside the arenas back to the system every [`TRIM_EVERY`],
/// forever (spawn it on the runtime).
pub async fn trim_periodically() {
    let mut every = tokio::time::interval(TRIM_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        trim();
    }
}

/// Returns free memory to the system now; `true` if any was released.
pub fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes the arenas' locks itself; 0 keeps no padding.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
