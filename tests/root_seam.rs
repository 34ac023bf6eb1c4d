//! A property test of `util::safefs` as the sync, the session copy and
//! the fold use it: random trees with symlinks (to files and dirs outside,
//! absolute and `..`), hardlinks, FIFOs, sockets, device nodes, sparse
//! files and non-UTF-8 names, rearranged by a concurrent task between and
//! during the operations (files and dirs swapped for symlinks out of the
//! tree, for FIFOs, renamed, removed, made again). Whatever happens:
//! nothing outside the tree is read into a copy, written, chowned,
//! chmodded, linked or removed (two canary trees, one on the partition and
//! one elsewhere, compared before and after every operation); no operation
//! hangs; and once the task stops, a sync and a copy are exact for what
//! stayed put. Seeded: `SEAM_SEED` and `SEAM_ROUNDS` for longer runs.

mod common;

use common::tier::*;
use common::*;
use mados_persistence::companion::sync::{Manifest, sync_tier};
use mados_persistence::util::overlayfs::{FoldOptions, fold};
use mados_persistence::util::treecopy;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

const MARK: &[u8] = b"CANARY-SECRET";

/// A canary tree: root-only files holding MARK, a dir, a hardlinkable
/// file; its listing is compared after every operation.
fn canary(at: &Path) {
    fs::create_dir_all(at.join("dir")).unwrap();
    for f in ["secret", "dir/inner"] {
        fs::write(at.join(f), [MARK, b" of ", f.as_bytes()].concat()).unwrap();
        fs::set_permissions(at.join(f), fs::Permissions::from_mode(0o600)).unwrap();
    }
    fs::set_permissions(at.join("dir"), fs::Permissions::from_mode(0o700)).unwrap();
}

/// Everything about a tree a change outside it would touch: names,
/// kinds, owners, modes, link counts, contents, link targets.
fn snapshot(p: &Path) -> Vec<String> {
    let mut out = vec![];
    let mut stack = vec![p.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut es: Vec<_> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        es.sort();
        for e in es {
            let m = fs::symlink_metadata(&e).unwrap();
            let what = if m.is_dir() {
                stack.push(e.clone());
                "dir".to_string()
            } else if m.file_type().is_symlink() {
                format!("-> {:?}", fs::read_link(&e).unwrap())
            } else if m.is_file() {
                format!("crc {:08x}", crc32fast::hash(&fs::read(&e).unwrap()))
            } else {
                format!("node {:?} {}", m.file_type(), m.rdev())
            };
            let x: Vec<_> = xattr::list(&e)
                .map(|l| l.map(|n| n.to_string_lossy().into_owned()).collect())
                .unwrap_or_default();
            out.push(format!(
                "{:?} {what} uid={} gid={} mode={:o} nlink={} x={x:?}",
                e.strip_prefix(p).unwrap(),
                m.uid(),
                m.gid(),
                m.mode(),
                if m.is_dir() { 0 } else { m.nlink() }
            ));
        }
    }
    out.sort();
    out
}

/// Every regular file below `p` that holds the canaries' mark.
fn marked(p: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let mut stack = vec![p.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(m) = fs::symlink_metadata(e.path()) else {
                continue;
            };
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file()
                && fs::read(e.path())
                    .unwrap_or_default()
                    .windows(MARK.len())
                    .any(|w| w == MARK)
            {
                out.push(e.path());
            }
        }
    }
    out
}

fn name(rng: &mut Rng) -> Vec<u8> {
    let mut n = format!("n{}", rng.below(40)).into_bytes();
    if rng.below(8) == 0 {
        n.extend_from_slice(b"-\xff\xfe"); // not UTF-8
    }
    n
}

fn pick_dir(rng: &mut Rng, dirs: &[PathBuf]) -> PathBuf {
    dirs[rng.below(dirs.len() as u64) as usize].clone()
}

/// One random entry made in `dir` (below the tree `top`), pointing out
/// of the tree at `outside` where it is a link.
fn make_one(rng: &mut Rng, dir: &Path, outside: &[PathBuf]) {
    let p = dir.join(OsStr::from_bytes(&name(rng)));
    let _ = fs::remove_file(&p);
    let _ = fs::remove_dir_all(&p);
    let out = &outside[rng.below(outside.len() as u64) as usize];
    let _ = match rng.below(10) {
        0 | 1 => fs::create_dir(&p),
        2..=4 => fs::write(
            &p,
            vec![b'a' + rng.below(26) as u8; rng.below(9000) as usize],
        ),
        5 => std::os::unix::fs::symlink(out.join("secret"), &p),
        6 => std::os::unix::fs::symlink(out.join("dir"), &p),
        7 => std::os::unix::fs::symlink("../../../../../../../../etc", &p),
        8 => nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o644))
            .map_err(std::io::Error::from),
        _ => match rng.below(3) {
            // a device node (/dev/null's numbers), a socket, a hardlink
            0 => nix::sys::stat::mknod(
                &p,
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::from_bits_truncate(0o666),
                nix::sys::stat::makedev(1, 3),
            )
            .map_err(std::io::Error::from),
            1 => std::os::unix::net::UnixListener::bind(&p).map(drop),
            _ => {
                let src = dir.join("hl-src");
                let _ = fs::write(&src, "linked");
                fs::hard_link(&src, &p)
            }
        },
    };
}

/// All dirs below `top` (itself included), not following symlinks.
fn dirs_of(top: &Path) -> Vec<PathBuf> {
    let mut out = vec![top.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        if let Ok(rd) = fs::read_dir(&out[i]) {
            for e in rd.flatten() {
                if fs::symlink_metadata(e.path()).is_ok_and(|m| m.is_dir()) {
                    out.push(e.path());
                }
            }
        }
        i += 1;
    }
    out
}

/// The concurrent task: swaps what is there for links out, FIFOs, new
/// entries; renames and removes; until told to stop.
fn mutate(top: PathBuf, outside: Vec<PathBuf>, seed: u64, stop: Arc<AtomicBool>) {
    let mut rng = Rng(seed);
    while !stop.load(Ordering::Relaxed) {
        let dirs = dirs_of(&top);
        let d = pick_dir(&mut rng, &dirs);
        match rng.below(4) {
            0 => {
                // swap an entry for a symlink out of the tree, atomically
                let victim = d.join(OsStr::from_bytes(&name(&mut rng)));
                let tmp = d.join(".swap");
                let out = &outside[rng.below(outside.len() as u64) as usize];
                let _ = fs::remove_file(&tmp);
                if std::os::unix::fs::symlink(out.join("dir"), &tmp).is_ok() {
                    let _ = fs::rename(&tmp, &victim);
                }
            }
            1 => {
                let a = d.join(OsStr::from_bytes(&name(&mut rng)));
                let b = pick_dir(&mut rng, &dirs).join(OsStr::from_bytes(&name(&mut rng)));
                let _ = fs::rename(a, b);
            }
            2 => {
                let _ = fs::remove_file(d.join(OsStr::from_bytes(&name(&mut rng))));
            }
            _ => make_one(&mut rng, &d, &outside),
        }
    }
}

/// The tree as a user sees it, for comparing a source and its copy.
fn view_of(p: &Path) -> Vec<String> {
    snapshot(p)
        .into_iter()
        .map(|l| l.replace("nlink=", "links="))
        .collect()
}

#[test]
fn nothing_outside_the_tree_is_ever_touched_and_what_stayed_put_is_copied_exactly() {
    if !require_root(
        "nothing_outside_the_tree_is_ever_touched_and_what_stayed_put_is_copied_exactly",
    ) {
        return;
    }
    let seed: u64 = std::env::var("SEAM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EA4_5EED);
    let rounds: u64 = std::env::var("SEAM_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let r = rig("seam");
    let pm = r.d.join("pm");
    let outside = vec![pm.join("canary"), r.d.join("canary")];
    for c in &outside {
        canary(c);
    }
    let before: Vec<_> = outside.iter().map(|c| snapshot(c)).collect();
    let check = |what: &str| {
        for (c, b) in outside.iter().zip(&before) {
            assert_eq!(
                &snapshot(c),
                b,
                "{what}: the canary {} changed",
                c.display()
            );
        }
    };
    // the tree, through the tier's overlay as a user writes it
    let top = r.view.join("t");
    fs::create_dir_all(&top).unwrap();
    let mut rng = Rng(seed);
    for _ in 0..300 {
        let dirs = dirs_of(&top);
        let d = pick_dir(&mut rng, &dirs);
        make_one(&mut rng, &d, &outside);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let task = {
        let (top, outside, stop) = (top.clone(), outside.clone(), stop.clone());
        std::thread::spawn(move || mutate(top, outside, seed ^ 0xA5A5, stop))
    };
    let mut m = Manifest::default();
    let (mut failed, mut raced) = (0u64, 0u64);
    for i in 0..rounds {
        match sync_tier(&r.tier, &mut m) {
            Ok(rep) => raced += rep.raced,
            Err(_) => failed += 1,
        }
        check(&format!("sync {i}"));
        let stage = Path::new(&r.tier.stage);
        assert!(marked(stage).is_empty(), "sync {i}: {:?}", marked(stage));
        if i % 4 == 0 {
            // the session copy of the tree as it changes, then a fold of
            // that copy onto another dir (as boot places a saved session)
            let dst = r.d.join(format!("copy-{i}"));
            let _ = treecopy::copy(&top, &dst);
            check(&format!("copy {i}"));
            assert!(marked(&dst).is_empty(), "copy {i}: {:?}", marked(&dst));
            let below = r.d.join(format!("below-{i}"));
            fs::create_dir_all(&below).unwrap();
            let _ = fold(
                &dst,
                &below,
                &FoldOptions {
                    keep_whiteouts: false,
                    skip: &[],
                },
            );
            check(&format!("fold {i}"));
            fs::remove_dir_all(&below).unwrap();
            let _ = fs::remove_dir_all(&dst);
        }
    }
    stop.store(true, Ordering::Relaxed);
    task.join().unwrap();
    eprintln!("seam: {rounds} rounds, {failed} syncs failed, {raced} entries changed under a sync");
    // what stayed put: the stage mirrors the upper, a copy the tree
    sync_tier(&r.tier, &mut m).unwrap();
    check("the last sync");
    let (stage, upper) = (
        view_of(Path::new(&r.tier.stage)),
        view_of(Path::new(&r.tier.upper)),
    );
    // a socket is carried as an empty file holding its place (its program
    // makes it again) by the sync, and not at all by the copy: left out
    let only = |a: &[String], b: &[String]| -> Vec<String> {
        let path = |l: &String| l.split(' ').next().unwrap_or("").to_string();
        let sockets: Vec<String> = a
            .iter()
            .chain(b)
            .filter(|l| l.contains(" mode=14"))
            .map(path)
            .collect();
        a.iter()
            .filter(|l| !b.contains(l) && !sockets.contains(&path(l)))
            .cloned()
            .collect()
    };
    assert_eq!(
        (only(&stage, &upper), only(&upper, &stage)),
        (vec![], vec![]),
        "the stage is not the upper after a quiet sync (stage only, upper only)"
    );
    let dst = r.d.join("copy-last");
    let rep = treecopy::copy(&top, &dst).unwrap();
    check("the last copy");
    let sockets = rep
        .not_carried
        .iter()
        .filter(|n| n.contains("a socket"))
        .count();
    assert_eq!(
        rep.not_carried.len(),
        sockets,
        "only sockets are not carried: {:?}",
        rep.not_carried
    );
    let copied = view_of(&dst);
    assert_eq!(
        (only(&copied, &view_of(&top)), only(&view_of(&top), &copied)),
        (vec![], vec![]),
        "the copy is not the tree after a quiet copy (copy only, tree only)"
    );
    fs::remove_dir_all(&r.d).ok();
}
