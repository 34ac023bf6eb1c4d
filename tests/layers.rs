//! The module layers of ARCHITECTURE.md: `util < settings < disk < boot <
//! manage`, each stage importing only from its own folder and the ones
//! below it. Reads every source file and fails on an upward import.

use std::path::{Path, PathBuf};

const LAYERS: &[&str] = &["util", "settings", "disk", "boot", "companion", "manage"];

fn rank(stage: &str) -> Option<usize> {
    LAYERS.iter().position(|l| *l == stage)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Every `crate::STAGE` named in `text` (paths inside `use` lines and code).
fn imported_stages(text: &str) -> Vec<String> {
    text.match_indices("crate::")
        .map(|(i, m)| {
            text[i + m.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

#[test]
fn stages_import_only_downwards() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![];
    rust_files(&src, &mut files);
    let mut bad = vec![];
    let mut seen = 0;
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let Some(stage) = rel.components().next().and_then(|c| c.as_os_str().to_str()) else {
            continue;
        };
        // lib.rs and main.rs sit on top and may name any stage.
        let Some(own) = rank(stage) else { continue };
        let text = std::fs::read_to_string(f).unwrap();
        for dep in imported_stages(&text) {
            seen += 1;
            match rank(&dep) {
                Some(r) if r <= own => {}
                Some(_) => bad.push(format!("{} imports upward: crate::{dep}", rel.display())),
                None => bad.push(format!("{} names crate::{dep}, not a stage", rel.display())),
            }
        }
    }
    assert!(
        seen > 20,
        "found only {seen} crate:: paths; is the scan reading src/?"
    );
    assert!(bad.is_empty(), "layering broken:\n{}", bad.join("\n"));
}

#[test]
fn the_scan_sees_an_upward_import() {
    // The checker itself: a disk module naming boot must be caught.
    let deps = imported_stages("use crate::boot::state;\nlet x = crate::disk::layout::X;");
    assert_eq!(deps, ["boot", "disk"]);
    assert!(rank("boot").unwrap() > rank("disk").unwrap());
}
