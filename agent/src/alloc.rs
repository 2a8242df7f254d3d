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
/// When the code pages mapped so far are let go ([`release_code_pages`]), counted
/// from the start of the runtime: once start-up is over (a few seconds, unless sled
/// recovers a long log), and again once the tasks that run every minute or so have run.
pub const CODE_RELEASE_AT: [Duration; 2] = [Duration::from_secs(15), Duration::from_secs(120)];
/// How often they are let go after that, so that code run once in a while (a save
/// every few minutes, a status request) does not stay mapped.
pub const CODE_RELEASE_EVERY: Duration = Duration::from_secs(600);

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

/// Hands free pages inside the arenas back to the system every [`TRIM_EVERY`], and
/// lets go of the code pages mapped so far at [`CODE_RELEASE_AT`] and then every
/// [`CODE_RELEASE_EVERY`], forever (spawn it on the runtime).
pub async fn trim_periodically() {
    let mut trim_every = tokio::time::interval(TRIM_EVERY);
    trim_every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let start = tokio::time::Instant::now();
    let mut release = CODE_RELEASE_AT
        .into_iter()
        .map(|after| start + after)
        .chain((1..).map(|n| start + CODE_RELEASE_AT[1] + CODE_RELEASE_EVERY.saturating_mul(n)))
        .peekable();
    loop {
        let next_release = *release.peek().unwrap_or(&start);
        tokio::select! {
            _ = trim_every.tick() => {
                trim();
            }
            _ = tokio::time::sleep_until(next_release) => {
                release_code_pages();
                release.next();
            }
        }
    }
}

/// Unmaps the pages of the program's code and read-only data (and the shared
/// libraries') from the process, keeping them in the page cache: the next access maps
/// a page again from there, without reading the disk. The code that runs in steady
/// state comes back; start-up code and code run once stop counting in the resident
/// set. The kernel maps code in windows around each page that runs (64 KiB), so what
/// comes back is smallest when the steady code sits together: the release build
/// orders it first (`agent/build.rs`, `agent/hot-functions.txt`, docs/memory.md).
///
/// Only private, read-only mappings of files that are code or a file's first segment
/// (headers and constants), and that hold no anonymous pages, are touched: their pages
/// are the file's, so dropping them loses nothing. (Read-only data the dynamic loader
/// relocated, such as `.data.rel.ro`, is a later segment holding anonymous pages: it
/// would lose its relocations and is left alone.) Returns the bytes advised.
pub fn release_code_pages() -> u64 {
    // x86_64 only for now: under qemu-arm the armv7 demo crashed at exit once its
    // code pages had been released (cross/qemu-demo.sh); not yet understood.
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    {
        let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
            return 0;
        };
        let mut released = 0;
        for (start, end) in releasable_mappings(&smaps) {
            // SAFETY: the range is a whole mapping of this process that holds only
            // clean pages of a file, opened read-only and never written: MADV_DONTNEED
            // drops the page table entries and the next access faults the same bytes
            // back in from the page cache. A mapping unmapped since smaps was read makes
            // madvise fail with ENOMEM, which is ignored.
            let rc = unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED)
            };
            if rc == 0 {
                released += (end - start) as u64;
            }
        }
        released
    }
    #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
    {
        0
    }
}

/// The `(start, end)` of every mapping in `smaps` (the text of /proc/PID/smaps) that
/// is backed by a file, private, read-only, executable or at the file's start, holds
/// resident pages and no anonymous ones. A mapping must show its `Rss` and `Anonymous`
/// figures: an emulator's smaps (qemu-user prints 0 for every figure, whatever the
/// host did with the pages) releases nothing, since it cannot say what is safe.
pub fn releasable_mappings(smaps: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    // The mapping being read: its range, whether it qualifies so far, and whether it
    // showed resident pages and no anonymous ones.
    let mut current: Option<(usize, usize, bool, bool, bool)> = None;
    let mut finish = |current: &mut Option<(usize, usize, bool, bool, bool)>| {
        if let Some((start, end, true, true, true)) = current.take() {
            out.push((start, end));
        }
    };
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if let Some((start, end)) = first.split_once('-').and_then(|(s, e)| {
            Some((
                usize::from_str_radix(s, 16).ok()?,
                usize::from_str_radix(e, 16).ok()?,
            ))
        }) {
            finish(&mut current);
            let perms = fields.next().unwrap_or("");
            let offset = fields.next().unwrap_or("");
            let path = fields.nth(2).unwrap_or("");
            // Code, or the first segment of a file (its headers and constants): the
            // dynamic loader relocates neither.
            let ok = perms.len() == 4
                && perms.starts_with('r')
                && !perms.contains('w')
                && perms.ends_with('p')
                && (perms.contains('x') || offset.bytes().all(|b| b == b'0'))
                && path.starts_with('/')
                && end > start;
            current = Some((start, end, ok, false, false));
        } else if let Some(c) = current.as_mut() {
            let kib = fields.next().and_then(|v| v.parse::<u64>().ok());
            match first {
                "Rss:" => c.3 = kib.is_some_and(|k| k > 0),
                "Anonymous:" => c.4 = kib == Some(0),
                _ => {}
            }
        }
    }
    finish(&mut current);
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    // 64-bit addresses, as on the machines that release code pages (x86_64).
    #[cfg(target_pointer_width = "64")]
    const SMAPS: &str = "\
55d0c0000000-55d0c0100000 r--p 00000000 fe:00 42 /usr/bin/edge-agent
Size:               1024 kB
Rss:                 512 kB
Anonymous:             0 kB
VmFlags: rd mr mw me dw sd
55d0c0100000-55d0c0800000 r-xp 00100000 fe:00 42 /usr/bin/edge-agent
Rss:                4096 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me dw sd
55d0c0800000-55d0c0860000 r--p 00800000 fe:00 42 /usr/bin/edge-agent
Rss:                 376 kB
Anonymous:           376 kB
VmFlags: rd mr mw me dw ac sd
55d0c0860000-55d0c0864000 rw-p 00860000 fe:00 42 /usr/bin/edge-agent
Anonymous:            16 kB
55d0c1000000-55d0c1200000 rw-p 00000000 00:00 0 [heap]
Anonymous:          2048 kB
7f0000000000-7f0000010000 r--s 00000000 fe:00 77 /var/lib/edge-agent/store/db
Anonymous:             0 kB
7f0000080000-7f00000d0000 r--p 0017c000 fe:00 99 /usr/lib/x86_64-linux-gnu/libc.so.6
Anonymous:             0 kB
7f0000100000-7f0000200000 r-xp 00026000 fe:00 99 /usr/lib/x86_64-linux-gnu/libc.so.6
Rss:                 800 kB
Anonymous:             0 kB
7f0000300000-7f0000400000 r-xp 00000000 fe:00 98 /usr/lib/x86_64-linux-gnu/libm.so.6
Rss:                   0 kB
Anonymous:             0 kB
7ffc00000000-7ffc00002000 r-xp 00000000 00:00 0 [vdso]
Anonymous:             0 kB
";

    #[cfg(target_pointer_width = "64")]
    #[test]
    fn only_clean_read_only_private_file_mappings_are_released() {
        assert_eq!(
            releasable_mappings(SMAPS),
            vec![
                (0x55d0c0000000, 0x55d0c0100000),
                (0x55d0c0100000, 0x55d0c0800000),
                (0x7f0000100000, 0x7f0000200000),
            ],
            "relocated or later read-only segments, writable, shared and special mappings, \
             and mappings with nothing resident, stay"
        );
    }

    /// qemu-user's emulated smaps prints 0 for every figure of every mapping: nothing
    /// can be told safe, so nothing is released (releasing there crashed the guest at
    /// exit: code it had not run yet came back as zeros).
    #[test]
    fn an_emulators_smaps_releases_nothing() {
        let emulated = "\
00010000-00800000 r-xp 00000000 fe:00 42 /usr/bin/edge-agent
Size:               7104 kB
Rss:                   0 kB
Anonymous:             0 kB
00800000-00810000 r--p 00000000 fe:00 42 /usr/bin/edge-agent
Size:                 64 kB
Rss:                   0 kB
Anonymous:             0 kB
00900000-00910000 r-xp 00000000 fe:00 43 /usr/lib/libc.so.6
";
        assert_eq!(releasable_mappings(emulated), vec![]);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn releasing_code_pages_leaves_the_process_working() {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("/proc/self/smaps");
        // Under qemu-user (CI runs these tests for armv7 there) every figure is 0, and
        // nothing may be released; on a kernel the test binary's code is.
        let emulated = !smaps
            .lines()
            .any(|l| l.starts_with("Rss:") && l.split_whitespace().nth(1) != Some("0"));
        let released = release_code_pages();
        if emulated || !cfg!(target_arch = "x86_64") {
            assert_eq!(
                released, 0,
                "released only on x86_64, and never under an emulator"
            );
        } else {
            assert!(released > 0, "the test binary's code is released");
        }
        // The code runs again from the page cache.
        let text: String = (0..1000)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        assert_eq!(text.len(), 1000);
        #[cfg(target_pointer_width = "64")]
        assert_eq!(releasable_mappings(SMAPS).len(), 3);
    }
}
