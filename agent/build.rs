//! Code layout of release binaries: the functions the agent runs in steady state are
//! placed together at the start of the code, so that the few pages they fill are all
//! the code that stays resident (docs/memory.md, "Code layout").
//!
//! `hot-functions.txt` lists their sections, one pattern a line, written by
//! `scripts/code-layout.sh`; gold's `--section-ordering-file` places them in that
//! order. Only release builds of the binary are ordered, and only where the target's
//! linker driver can use gold; elsewhere the build goes on with the default layout and
//! a warning. `EDGE_AGENT_CODE_LAYOUT=0` turns the ordering off.

use std::path::PathBuf;
use std::process::Command;

const ORDER_FILE: &str = "hot-functions.txt";

fn main() {
    println!("cargo:rerun-if-changed={ORDER_FILE}");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=EDGE_AGENT_CODE_LAYOUT");
    println!("cargo:rerun-if-env-changed=RUSTC_LINKER");

    let release = std::env::var("PROFILE").is_ok_and(|p| p == "release");
    let linux = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux");
    let off = std::env::var("EDGE_AGENT_CODE_LAYOUT").is_ok_and(|v| v == "0");
    if !release || !linux || off {
        return;
    }
    let Some(dir) = std::env::var_os("CARGO_MANIFEST_DIR") else {
        return;
    };
    let order = PathBuf::from(dir).join(ORDER_FILE);
    if !order.is_file() {
        return;
    }
    // The linker driver rustc calls: the target's configured linker, or `cc`.
    let linker = std::env::var("RUSTC_LINKER").unwrap_or_else(|_| "cc".into());
    let gold = Command::new(&linker)
        .args(["-fuse-ld=gold", "-Wl,--version"])
        .output()
        .is_ok_and(|out| {
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("gold")
        });
    if !gold {
        println!(
            "cargo:warning=code layout: `{linker} -fuse-ld=gold` does not work here; \
             the release binary keeps the default code layout (more resident code)"
        );
        return;
    }
    println!("cargo:rustc-link-arg-bins=-fuse-ld=gold");
    println!(
        "cargo:rustc-link-arg-bins=-Wl,--section-ordering-file={}",
        order.display()
    );
}
