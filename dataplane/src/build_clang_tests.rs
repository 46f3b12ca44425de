//! Tests of the build script's clang lookup (`build_clang.rs`): the script must run again when
//! clang appears on `PATH`, so a release binary built before clang was installed gets the XDP
//! program on the next `cargo build`.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use crate::build_clang::{find_clang, rerun_directives};

/// A fresh, empty directory under the system's temporary directory.
fn empty_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("uturn-build-clang-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn without_clang_the_script_reruns_when_a_path_directory_or_the_variables_change() {
    let (a, b) = (empty_dir("none-a"), empty_dir("none-b"));
    let path = std::env::join_paths([&a, &b]).unwrap();
    assert_eq!(find_clang("clang", Some(&path)), None);
    let lines = rerun_directives(Some(&path), None);
    for want in [
        "cargo::rerun-if-env-changed=UTURN_BPF_CLANG".to_string(),
        "cargo::rerun-if-env-changed=CLANG".to_string(),
        "cargo::rerun-if-env-changed=PATH".to_string(),
        format!("cargo::rerun-if-changed={}", a.display()),
        format!("cargo::rerun-if-changed={}", b.display()),
    ] {
        assert!(lines.contains(&want), "{want} missing from {lines:?}");
    }
    // A directory that does not exist would make cargo rerun the script on every build.
    let gone = a.join("gone");
    let lines = rerun_directives(Some(&std::env::join_paths([&gone]).unwrap()), None);
    assert!(!lines.iter().any(|l| l.contains("gone")), "{lines:?}");
    let _ = (std::fs::remove_dir_all(a), std::fs::remove_dir_all(b));
}

#[test]
fn clang_on_path_is_found_and_watched() {
    let (a, b) = (empty_dir("found-a"), empty_dir("found-b"));
    let clang = b.join("clang");
    std::fs::write(&clang, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&clang, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path: OsString = std::env::join_paths([&a, &b]).unwrap();
    let found = find_clang("clang", Some(&path));
    assert_eq!(found.as_deref(), Some(clang.as_path()));
    let lines = rerun_directives(Some(&path), found.as_deref());
    assert!(lines.contains(&format!("cargo::rerun-if-changed={}", clang.display())), "{lines:?}");
    assert!(lines.contains(&"cargo::rerun-if-env-changed=PATH".to_string()), "{lines:?}");
    // A path (CLANG=/usr/bin/clang-19) is taken as given.
    assert_eq!(find_clang(clang.to_str().unwrap(), None).as_deref(), Some(clang.as_path()));
    assert_eq!(find_clang(a.join("clang").to_str().unwrap(), Some(&path)), None);
    let _ = (std::fs::remove_dir_all(a), std::fs::remove_dir_all(b));
}
