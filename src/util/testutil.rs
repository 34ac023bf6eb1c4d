//! Helpers for the library's own unit tests.

use std::path::PathBuf;

/// A fresh, empty directory for one test, named after `name` and the
/// process.
pub fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mados-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Root tests skip only outside CI (the caller prints why); CI must not
/// skip them.
pub fn is_root() -> bool {
    let root = nix::unistd::geteuid().is_root();
    assert!(
        root || std::env::var("CI").as_deref() != Ok("true"),
        "needs root, and CI must not skip it"
    );
    root
}
