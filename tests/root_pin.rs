//! Root tests of pinning (`companion::pin`, `companion::pinset`) on real
//! files of a disk filesystem: pinned pages stay resident after the page
//! cache is dropped while unpinned ones go; a file replaced by a rename is
//! pinned again as its new content and the old pages are released; the
//! budget holds; a file that cannot be pinned is skipped, not fatal.

mod common;

use common::*;
use mados_persistence::companion::heat::{FileId, PinPlan};
use mados_persistence::companion::pinset::PinSet;
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

const MIB: u64 = 1 << 20;

/// Pages of `p` in the page cache now, seen through a mapping of our own
/// (not locked), with `mincore`.
fn resident(p: &Path) -> usize {
    use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};
    let f = std::fs::File::open(p).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    // SAFETY: a fresh read-only mapping, only passed to mincore, unmapped here.
    unsafe {
        let a = mmap(
            None,
            NonZeroUsize::new(len).unwrap(),
            ProtFlags::PROT_READ,
            MapFlags::MAP_SHARED,
            &f,
            0,
        )
        .unwrap();
        let mut v = vec![0u8; len.div_ceil(4096)];
        assert_eq!(nix::libc::mincore(a.as_ptr(), len, v.as_mut_ptr()), 0);
        munmap(a, len).unwrap();
        v.iter().filter(|b| **b & 1 == 1).count()
    }
}

/// Written pages are dirty, and only clean ones can be dropped: sync first.
fn drop_caches() {
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "1\n").unwrap();
}

fn id_of(p: &Path) -> FileId {
    let m = std::fs::metadata(p).unwrap();
    (m.dev(), m.ino())
}

fn vm_lck_kb() -> u64 {
    mados_persistence::companion::pin::locked_kib().unwrap()
}

#[test]
fn pins_survive_dropped_caches_follow_replacement_and_keep_the_budget() {
    if !require_root("pins_survive_dropped_caches_follow_replacement_and_keep_the_budget") {
        return;
    }
    // a disk filesystem (tmpfs pages cannot be dropped)
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("pin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let files: Vec<PathBuf> = (0..3).map(|i| d.join(format!("hot{i}"))).collect();
    for (i, f) in files.iter().enumerate() {
        std::fs::write(f, vec![i as u8 + 1; MIB as usize]).unwrap();
    }
    let cold = d.join("cold");
    std::fs::write(&cold, vec![9u8; MIB as usize]).unwrap();
    let paths: HashMap<FileId, PathBuf> = files.iter().map(|f| (id_of(f), f.clone())).collect();
    let lck0 = vm_lck_kb();

    // three planned, a budget for two: the hottest two are pinned
    let mut set = PinSet::default();
    let budget = 2 * MIB + MIB / 2;
    let plan = PinPlan {
        pin: files.iter().map(|f| id_of(f)).collect(),
        unpin: vec![],
        bytes: 3 * MIB,
    };
    let a = set.apply(&plan, |id| paths.get(&id).cloned(), budget);
    assert_eq!((a.pinned, a.failed), (2, 0), "{a:?}");
    assert!(set.bytes() <= budget);
    assert!(set.get(id_of(&files[0])).is_some() && set.get(id_of(&files[1])).is_some());
    assert!(vm_lck_kb() >= lck0 + 2048, "locked: {} kB", vm_lck_kb());

    // the page cache dropped: pinned pages stay, the others go
    std::fs::read(&cold).unwrap();
    std::fs::read(&files[2]).unwrap();
    drop_caches();
    assert_eq!(resident(&files[0]), 256);
    assert_eq!(resident(&files[1]), 256);
    assert_eq!(resident(&files[2]), 0, "an unpinned file stayed resident");
    assert_eq!(resident(&cold), 0);

    // hot0 replaced by a rename (an editor, a package manager): the new
    // content is pinned, the old pages are released
    let old = id_of(&files[0]);
    let tmp = d.join("hot0.new");
    std::fs::write(&tmp, vec![7u8; MIB as usize]).unwrap();
    std::fs::rename(&tmp, &files[0]).unwrap();
    let new = id_of(&files[0]);
    assert_ne!(old, new);
    let moved = set.refresh(budget);
    assert_eq!(moved, vec![(old, Some(new))]);
    assert!(set.get(new).is_some() && set.get(old).is_none());
    drop_caches();
    assert_eq!(resident(&files[0]), 256, "the new content is pinned");
    assert!(vm_lck_kb() < lck0 + 3072, "the old pages are still locked");

    // hot1 rewritten in place and grown past the budget: released, not re-pinned
    std::fs::write(&files[1], vec![5u8; 2 * MIB as usize]).unwrap();
    let moved = set.refresh(budget);
    assert_eq!(moved.len(), 1);
    assert_eq!(moved[0].1, None, "{moved:?}");
    assert!(set.bytes() <= budget);

    // a planned file that is gone: counted, the rest goes on
    let gone = (id_of(&cold).0, u64::MAX);
    let plan = PinPlan {
        pin: vec![gone, id_of(&files[2])],
        unpin: vec![],
        bytes: 0,
    };
    let mut paths2 = paths.clone();
    paths2.insert(gone, d.join("no-such-file"));
    let a = set.apply(&plan, |id| paths2.get(&id).cloned(), budget);
    assert_eq!((a.pinned, a.failed), (1, 1), "{a:?}");
    assert!(
        set.last_failure
            .as_deref()
            .unwrap()
            .contains("no-such-file")
    );

    // pressure: the budget shrinks, the coldest go first
    let hottest = [id_of(&files[2]), new];
    assert_eq!(set.shrink_to(MIB, &hottest), 1);
    assert!(set.get(id_of(&files[2])).is_some() && set.get(new).is_none());
    drop(set);
    assert!(vm_lck_kb() <= lck0 + 4, "pins released on drop");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_pin_through_an_overlay_keeps_the_real_files_pages() {
    if !require_root("a_pin_through_an_overlay_keeps_the_real_files_pages") {
        return;
    }
    // the overlay as the live root has it: a read-only lower, an upper
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).unwrap();
    run("mount", &["--make-rprivate", "/"]);
    let d =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("pin-ovl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    for s in ["lower", "upper", "work", "view"] {
        std::fs::create_dir_all(d.join(s)).unwrap();
    }
    std::fs::write(d.join("lower/lib.so"), vec![3u8; MIB as usize]).unwrap();
    std::fs::write(d.join("upper/conf"), vec![4u8; MIB as usize]).unwrap();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        d.join("lower").display(),
        d.join("upper").display(),
        d.join("work").display()
    );
    run(
        "mount",
        &[
            "-t",
            "overlay",
            "-o",
            &opts,
            "ovl",
            d.join("view").to_str().unwrap(),
        ],
    );
    let mut set = PinSet::default();
    let view: Vec<PathBuf> = ["lib.so", "conf"]
        .iter()
        .map(|n| d.join("view").join(n))
        .collect();
    let plan = PinPlan {
        pin: view.iter().map(|p| id_of(p)).collect(),
        unpin: vec![],
        bytes: 2 * MIB,
    };
    let paths: HashMap<FileId, PathBuf> = view.iter().map(|p| (id_of(p), p.clone())).collect();
    let a = set.apply(&plan, |id| paths.get(&id).cloned(), 4 * MIB);
    assert_eq!((a.pinned, a.failed), (2, 0), "{a:?}");
    drop_caches();
    // the pages kept are the real files' (overlayfs maps the real file)
    assert_eq!(resident(&d.join("lower/lib.so")), 256);
    assert_eq!(resident(&d.join("upper/conf")), 256);
    drop(set);
    drop_caches();
    assert_eq!(
        resident(&d.join("lower/lib.so")),
        0,
        "released with the pin"
    );
    run("umount", &[d.join("view").to_str().unwrap()]);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn opens_by_other_processes_heat_a_file_and_our_own_do_not() {
    if !require_root("opens_by_other_processes_heat_a_file_and_our_own_do_not") {
        return;
    }
    use mados_persistence::companion::heat::Heat;
    use mados_persistence::companion::hot::{Hot, Sink};
    use mados_persistence::companion::writeheat::DirHeat;
    use std::collections::HashMap;
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).unwrap();
    run("mount", &["--make-rprivate", "/"]);
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("hot-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    run(
        "mount",
        &["-t", "tmpfs", "-o", "size=16M", "hot", d.to_str().unwrap()],
    );
    let (f, g) = (d.join("often"), d.join("once"));
    std::fs::write(&f, b"0123456789").unwrap();
    std::fs::write(&g, b"x").unwrap();
    std::fs::write(d.join("empty"), b"").unwrap();
    let (mut hot, failed) = Hot::new(&[(d.as_path(), true)]).unwrap();
    assert!(failed.is_empty(), "{failed:?}");
    for _ in 0..3 {
        run("cat", &[f.to_str().unwrap()]);
    }
    run(
        "cat",
        &[g.to_str().unwrap(), d.join("empty").to_str().unwrap()],
    );
    // this process's own opens (the daemon's pins) are not counted
    for _ in 0..5 {
        std::fs::read(&g).unwrap();
    }
    let mut heat = Heat::new(600.0, 100);
    let mut dirs = DirHeat::new(600.0, 100);
    let (watch, mut first) = (HashMap::from([(id_of(&g), 0usize)]), vec![]);
    let mut sink = Sink {
        heat: &mut heat,
        dirs: &mut dirs,
        watch: &watch,
        first: &mut first,
    };
    assert_eq!(hot.drain(&mut sink, 0.0), 4);
    // written and closed by another process: a write of its dir
    run("sh", &["-c", &format!("echo x > {}/new", d.display())]);
    // its open is counted too when the events merged (it has a size by
    // the time it is read), else skipped as empty
    assert!(hot.drain(&mut sink, 0.5) <= 1);
    assert_eq!(first, vec![id_of(&g)], "the watched file's open reported");
    assert!((dirs.heat(d.to_str().unwrap(), 0.5) - 1.0).abs() < 1e-9);
    assert_eq!(dirs.writes, 1);
    assert!((heat.heat(id_of(&f), 0.0) - 3.0).abs() < 1e-9);
    assert!((heat.heat(id_of(&g), 0.0) - 1.0).abs() < 1e-9);
    assert_eq!(
        heat.heat(id_of(&d.join("empty")), 0.0),
        0.0,
        "empty files are skipped"
    );
    let top = heat.hottest(1, 0.0);
    assert_eq!(top[0].1.path, f.to_str().unwrap());
    assert_eq!(top[0].1.size, 10);
    let mut sink = Sink {
        heat: &mut heat,
        dirs: &mut dirs,
        watch: &watch,
        first: &mut first,
    };
    assert_eq!(hot.drain(&mut sink, 1.0), 0, "drained");
    assert!(hot.events == 4 || hot.events == 5, "{}", hot.events);
    assert_eq!(hot.overflows, 0);
    run("umount", &[d.to_str().unwrap()]);
    std::fs::remove_dir_all(&d).unwrap();
}
