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
/// would lose its relocations and is left alone.) Nothing is touched unless
/// /proc/self/smaps describes this very process ([`releasable`]): under qemu-user 7.2
/// it is the emulator's own smaps, whose addresses are off by the emulator's guest
/// base, and releasing its ranges dropped the relocated page after each of the
/// guest's code mappings (the armv7 demo then crashed). Returns the bytes advised.
pub fn release_code_pages() -> u64 {
    #[cfg(target_os = "linux")]
    {
        let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
            return 0;
        };
        let Ok(exe) = std::fs::read_link("/proc/self/exe") else {
            return 0;
        };
        let Some(exe) = exe.to_str() else {
            return 0;
        };
        let code = release_code_pages as fn() -> u64 as usize;
        let mut released = 0;
        for (start, end) in releasable(&smaps, code, exe) {
            // SAFETY: the range is a whole mapping of this process (smaps was checked to
            // describe it) that holds only clean pages of a file, opened read-only and
            // never written: MADV_DONTNEED drops the page table entries and the next
            // access faults the same bytes back in from the page cache. A mapping
            // unmapped since smaps was read makes madvise fail with ENOMEM, which is
            // ignored.
            let rc = unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED)
            };
            if rc == 0 {
                released += (end - start) as u64;
            }
        }
        released
    }
    #[cfg(not(target_os = "linux"))]
    {
        0
    }
}

/// The mappings of `smaps` to release ([`releasable_mappings`]), or none when `smaps`
/// does not describe this process ([`describes_this_process`]).
pub fn releasable(smaps: &str, code: usize, exe: &str) -> Vec<(usize, usize)> {
    if describes_this_process(smaps, code, exe) {
        releasable_mappings(smaps)
    } else {
        Vec::new()
    }
}

/// Whether `smaps` describes the address space of the process that reads it: the
/// mapping that holds `code` (the address of a function of this program) is listed,
/// executable, and a mapping of `exe` (the program's path, /proc/self/exe). qemu-user
/// 7.2 hands a guest that opens /proc/self/smaps the emulator's own file (only
/// /proc/self/maps is emulated): it lists the guest's mappings at host addresses
/// (guest address + guest base, 0x1000 for 32-bit guests on x86_64), read-only
/// (qemu runs translated code, never the guest's pages), and qemu's own mappings
/// besides; the guest's code address falls in none of its executable mappings.
pub fn describes_this_process(smaps: &str, code: usize, exe: &str) -> bool {
    smaps.lines().filter_map(Mapping::parse).any(|m| {
        m.start <= code && code < m.end && m.perms.as_bytes().get(2) == Some(&b'x') && m.path == exe
    })
}

/// A mapping's header line in /proc/PID/smaps or maps:
/// `start-end perms offset dev inode path`.
struct Mapping<'a> {
    start: usize,
    end: usize,
    perms: &'a str,
    offset: &'a str,
    /// The rest of the line: a path (spaces and a ` (deleted)` suffix included), a
    /// `[name]`, or empty.
    path: &'a str,
}

impl<'a> Mapping<'a> {
    fn parse(line: &'a str) -> Option<Self> {
        fn field<'a>(rest: &mut &'a str) -> &'a str {
            let s = rest.trim_start();
            let (f, r) = s.split_at(s.find(char::is_whitespace).unwrap_or(s.len()));
            *rest = r;
            f
        }
        let mut rest = line;
        let (start, end) = field(&mut rest).split_once('-')?;
        let perms = field(&mut rest);
        let offset = field(&mut rest);
        let dev = field(&mut rest);
        let inode = field(&mut rest);
        if perms.len() != 4 || dev.is_empty() || inode.is_empty() {
            return None;
        }
        Some(Mapping {
            start: usize::from_str_radix(start, 16).ok()?,
            end: usize::from_str_radix(end, 16).ok()?,
            perms,
            offset,
            path: rest.trim_start(),
        })
    }
}

/// The `(start, end)` of every mapping in `smaps` (the text of /proc/PID/smaps) that
/// is backed by a file, private, read-only, executable or at the file's start, holds
/// resident pages and no anonymous ones. A mapping must show its `Rss` and `Anonymous`
/// figures: an smaps that prints 0 for every figure releases nothing, since it cannot
/// say what is safe. Whether `smaps` is this process's own is [`releasable`]'s check.
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
        let Some(first) = line.split_whitespace().next() else {
            continue;
        };
        if !first.ends_with(':') {
            // A mapping's header: what follows belongs to it. A header that does not
            // parse (an address wider than this target's) qualifies nothing.
            finish(&mut current);
            let Some(m) = Mapping::parse(line) else {
                continue;
            };
            let perms = m.perms;
            // Code, or the first segment of a file (its headers and constants): the
            // dynamic loader relocates neither.
            let ok = perms.starts_with('r')
                && !perms.contains('w')
                && perms.ends_with('p')
                && (perms.contains('x') || m.offset.bytes().all(|b| b == b'0'))
                && m.path.starts_with('/')
                && m.end > m.start;
            current = Some((m.start, m.end, ok, false, false));
        } else if let Some(c) = current.as_mut() {
            let kib = line
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok());
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

    // 64-bit addresses, as on x86_64 and aarch64.
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
        let expected = vec![
            (0x55d0c0000000, 0x55d0c0100000),
            (0x55d0c0100000, 0x55d0c0800000),
            (0x7f0000100000, 0x7f0000200000),
        ];
        assert_eq!(
            releasable_mappings(SMAPS),
            expected,
            "relocated or later read-only segments, writable, shared and special mappings, \
             and mappings with nothing resident, stay"
        );
        // The program's code is at 0x55d0c0100000-0x55d0c0800000: this smaps is its own.
        assert_eq!(
            releasable(SMAPS, 0x55d0c0123456, "/usr/bin/edge-agent"),
            expected
        );
    }

    /// What an armv7 guest read from /proc/self/smaps under qemu-arm 7.2 on x86_64 (cut
    /// down): qemu's own smaps. The guest's maps (emulated) had its libc's code at
    /// 3f662000-3f76c000 and relocated data at 3f76c000, the agent's code at
    /// 40000000-409df000 r-xp and relocated data (`.data.rel.ro`, GOT) at 409df000; its
    /// release function was at 40479b74. Here each mapping sits one page higher (qemu's
    /// guest base), read-only, and qemu's own mappings follow.
    const QEMU_ARM_SMAPS: &str = "\
00001000-3f663000 ---p 00000000 00:00 0
Rss:                   0 kB
Anonymous:             0 kB
3f663000-3f76d000 r--p 00000000 fe:00 1098266 /usr/arm-linux-gnueabihf/lib/libc.so.6
Rss:                 744 kB
Anonymous:             0 kB
3f76d000-3f76f000 r--p 00109000 fe:00 1098266 /usr/arm-linux-gnueabihf/lib/libc.so.6
Rss:                   8 kB
Anonymous:             8 kB
40001000-409e0000 r--p 00000000 fe:00 42 /usr/bin/edge-agent
Rss:                3100 kB
Anonymous:             0 kB
409e0000-40a0e000 r--p 009de000 fe:00 42 /usr/bin/edge-agent
Rss:                 184 kB
Anonymous:           184 kB
40a0e000-40a10000 rw-p 00a0c000 fe:00 42 /usr/bin/edge-agent
Rss:                   8 kB
Anonymous:             8 kB
40a10000-ffff1000 ---p 00000000 00:00 0
Rss:                   0 kB
Anonymous:             0 kB
559cedd5b000-559cedefb000 r-xp 00078000 fe:00 10199126 /usr/bin/qemu-arm
Rss:                1404 kB
Anonymous:             0 kB
559d1e570000-559d1e774000 rw-p 00000000 00:00 0 [heap]
Rss:                2000 kB
Anonymous:          2000 kB
";

    /// Releasing those ranges as guest addresses dropped the guest's relocated page
    /// after each code mapping (40001000-409e0000 holds 409df000), and the armv7 demo
    /// crashed: an smaps that does not list this program's code, executable, at the
    /// address it runs from releases nothing.
    #[test]
    fn an_smaps_that_is_not_this_process_releases_nothing() {
        let shifted = releasable_mappings(QEMU_ARM_SMAPS);
        assert!(
            shifted.contains(&(0x3f663000, 0x3f76d000))
                && shifted.contains(&(0x40001000, 0x409e0000)),
            "the rules alone would release the shifted ranges: {shifted:x?}"
        );
        let exe = "/usr/bin/edge-agent";
        assert!(!describes_this_process(QEMU_ARM_SMAPS, 0x40479b74, exe));
        assert_eq!(releasable(QEMU_ARM_SMAPS, 0x40479b74, exe), vec![]);
        // Nor with this test's own function address, whatever the target.
        let here = an_smaps_that_is_not_this_process_releases_nothing as fn() as usize;
        assert_eq!(releasable(QEMU_ARM_SMAPS, here, exe), vec![]);

        // The same process as a kernel shows it: the code mapping holds the function.
        let own = "\
40000000-409df000 r-xp 00000000 fe:00 42 /usr/bin/edge-agent
Rss:                3100 kB
Anonymous:             0 kB
409df000-40a0d000 r--p 009de000 fe:00 42 /usr/bin/edge-agent
Rss:                 184 kB
Anonymous:           184 kB
";
        assert_eq!(
            releasable(own, 0x40479b74, exe),
            vec![(0x40000000, 0x409df000)]
        );
        // Another program's code there, or the function outside every mapping: nothing.
        assert_eq!(releasable(own, 0x40479b74, "/usr/bin/other"), vec![]);
        assert_eq!(releasable(own, 0x50000000, exe), vec![]);
    }

    /// An smaps that prints 0 for every figure (as an emulator that makes one up does)
    /// releases nothing: it cannot say what is safe.
    #[test]
    fn an_smaps_without_figures_releases_nothing() {
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
        assert_eq!(releasable(emulated, 0x10400, "/usr/bin/edge-agent"), vec![]);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn releasing_code_pages_leaves_the_process_working() {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("/proc/self/smaps");
        // Under qemu-user (CI runs these tests for armv7 there) the smaps read is qemu's
        // own, its binary listed, and nothing may be released; on a kernel the test
        // binary's code is.
        let emulated = smaps.contains("/qemu-")
            || !smaps
                .lines()
                .any(|l| l.starts_with("Rss:") && l.split_whitespace().nth(1) != Some("0"));
        let released = release_code_pages();
        if emulated {
            assert_eq!(released, 0, "nothing is released under an emulator");
        } else {
            assert!(released > 0, "the test binary's code is released");
        }
        // The code runs again from the page cache.
        let text: String = (0..1000)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        assert_eq!(text.len(), 1000);
        assert!(!releasable_mappings(QEMU_ARM_SMAPS).is_empty());
    }
}
