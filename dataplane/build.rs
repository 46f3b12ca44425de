//! Compiles the XDP programs in `bpf/` with clang (`-target bpf`) into `OUT_DIR`, when clang is
//! there. Without it the crate builds without the XDP fast path (`cfg(uturn_xdp)` unset) and
//! `xdp = "native" | "generic"` is refused at start with a message saying why. clang is
//! `UTURN_BPF_CLANG`, else `CLANG`, else `clang` on `PATH`; the script runs again when any of
//! those change or clang appears (see `build_clang.rs`).

use std::path::PathBuf;
use std::process::Command;

#[path = "build_clang.rs"]
mod build_clang;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(uturn_xdp)");
    println!("cargo::rerun-if-changed=bpf/channel_relay.c");
    println!("cargo::rerun-if-changed=bpf/channel_relay.h");
    println!("cargo::rerun-if-changed=build_clang.rs");
    let clang = build_clang::CLANG_VARS.iter().find_map(|v| std::env::var(v).ok()).unwrap_or_else(|| "clang".into());
    let path = std::env::var_os("PATH");
    let found = build_clang::find_clang(&clang, path.as_deref());
    for line in build_clang::rerun_directives(path.as_deref(), found.as_deref()) {
        println!("{line}");
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let object = out.join("channel_relay.o");
    // Debian keeps asm/types.h under the multiarch directory.
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let multiarch = format!("/usr/include/{arch}-linux-gnu");
    let status = Command::new(&clang)
        .args(["-O2", "-g", "-Wall", "-target", "bpf", "-I", &multiarch, "-c", "bpf/channel_relay.c", "-o"])
        .arg(&object)
        .status();
    match status {
        Ok(s) if s.success() => println!("cargo::rustc-cfg=uturn_xdp"),
        Ok(s) => {
            // Missing headers (libbpf-dev): run again when they are installed.
            if std::path::Path::new("/usr/include").is_dir() {
                println!("cargo::rerun-if-changed=/usr/include");
            }
            println!("cargo::warning=clang failed ({s}) on bpf/channel_relay.c: building without the XDP fast path")
        }
        Err(e) => println!(
            "cargo::warning={clang} not found ({e}): building without the XDP fast path (apt-get install clang libbpf-dev)"
        ),
    }
}
