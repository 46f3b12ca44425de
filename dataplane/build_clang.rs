//! Finding clang for the build script (`build.rs`), and the `cargo::rerun-if-*` lines that make
//! cargo run the build script again when clang appears, changes or goes: a release binary built
//! before clang was installed must get the XDP program once it is (and `cargo build` runs again).
//! Included by `build.rs` and, for its unit tests, by the crate (`cfg(test)`).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// The environment variables that name clang, first one set wins.
pub(crate) const CLANG_VARS: [&str; 2] = ["UTURN_BPF_CLANG", "CLANG"];

/// Where `clang` (a name, or a path with a `/`) is: a path as given when it is a file; a name
/// looked up in the directories of `path` (a `PATH` value); `None` when not found.
pub(crate) fn find_clang(clang: &str, path: Option<&OsStr>) -> Option<PathBuf> {
    if clang.contains('/') {
        let p = PathBuf::from(clang);
        return p.is_file().then_some(p);
    }
    std::env::split_paths(path?).map(|dir| dir.join(clang)).find(|p| p.is_file())
}

/// The `cargo::rerun-if-*` lines for a build that looked for `clang` along `path` and found
/// `found`: the variables that choose clang, `PATH` itself, and the file found, or, when none
/// was, every existing directory of `path` (so clang installed into any of them reruns the
/// script; cargo compares their modification times).
pub(crate) fn rerun_directives(path: Option<&OsStr>, found: Option<&Path>) -> Vec<String> {
    let mut lines: Vec<String> = CLANG_VARS.iter().map(|v| format!("cargo::rerun-if-env-changed={v}")).collect();
    lines.push("cargo::rerun-if-env-changed=PATH".into());
    match found {
        Some(clang) => lines.push(format!("cargo::rerun-if-changed={}", clang.display())),
        None => {
            if let Some(path) = path {
                for dir in std::env::split_paths(path).filter(|d| d.is_absolute() && d.is_dir()) {
                    lines.push(format!("cargo::rerun-if-changed={}", dir.display()));
                }
            }
        }
    }
    lines
}
