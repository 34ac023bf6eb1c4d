//! Root tests of set-aside overlays on a real ext4 (loop device).
//!
//! The boot's restore (`boot::set_aside::restore`) is stopped after every
//! step (`MADOS_PERSISTENCE_CUT=restore-<step>`: the process aborts there)
//! with overlays in place and without (after a re-flash the boot set them
//! aside already); at that instant `overlays` holds one whole tree, the
//! old or the restored, and the other is on the partition; the next run
//! finishes. Stopped before the exchange and run on another build, it
//! rolls back and waits. A chosen dir whose `overlays` is a symlink out
//! moves nothing. The commands `set-aside list/restore/delete --device`
//! on a stick image made by `enable`.

mod common;

use common::*;
use mados_persistence::boot::iso_build::{self, IsoBuild};
use mados_persistence::boot::set_aside::{self, Outcome, Request};
use mados_persistence::util::safefs::Dir;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Loop devices and mounts, one test at a time (as in root_cuts).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn r1() -> IsoBuild {
    IsoBuild {
        label: "MADOS_R1".into(),
        uuid: "u1".into(),
    }
}

fn build_of(s: &str) -> IsoBuild {
    let (l, u) = s.split_once(':').unwrap();
    IsoBuild {
        label: l.into(),
        uuid: u.into(),
    }
}

/// Run as a child by the tests below: the restore of a boot on the
/// partition `MADOS_SA_CHILD` of build `MADOS_SA_BUILD` (`label:uuid`),
/// its outcome printed; a cut point aborts it.
#[test]
fn child_restore() {
    let (Ok(pm), Ok(b)) = (
        std::env::var("MADOS_SA_CHILD"),
        std::env::var("MADOS_SA_BUILD"),
    ) else {
        return;
    };
    let o = set_aside::restore(Path::new(&pm), Some(&build_of(&b)));
    println!(
        "OUTCOME {}",
        serde_json::to_string(&o.map_err(|e| format!("{e:#}")).unwrap()).unwrap()
    );
}

fn child(pm: &Path, b: &IsoBuild, cut: Option<&str>) -> Output {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args([
        "--exact",
        "child_restore",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("MADOS_SA_CHILD", pm)
    .env("MADOS_SA_BUILD", format!("{}:{}", b.label, b.uuid))
    .stdin(Stdio::null());
    if let Some(p) = cut {
        c.env("MADOS_PERSISTENCE_CUT", p);
    }
    c.output().unwrap()
}

fn outcome(o: &Output) -> String {
    let t = String::from_utf8_lossy(&o.stdout);
    t.lines()
        .find_map(|l| l.split_once("OUTCOME ").map(|x| x.1))
        .unwrap_or_else(|| panic!("no outcome: {t}{}", String::from_utf8_lossy(&o.stderr)))
        .to_string()
}

fn read(p: &Path) -> Option<String> {
    std::fs::read_to_string(p).ok()
}

/// A partition with `overlays` (when `old`), and set-aside/MADOS_R1_u1
/// made on release 1, and a restore of it requested.
fn scene(pm: &Path, old: bool) {
    for e in std::fs::read_dir(pm).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap() != "lost+found" {
            std::fs::remove_dir_all(&p).unwrap();
        }
    }
    if old {
        std::fs::create_dir_all(pm.join("overlays/etc/upper")).unwrap();
        std::fs::write(pm.join("overlays/etc/upper/f"), "old").unwrap();
        std::fs::create_dir_all(pm.join("overlays/usr/upper/lib")).unwrap();
        std::fs::write(
            pm.join("overlays/usr/upper/lib/old-lib"),
            vec![7u8; 300_000],
        )
        .unwrap();
    }
    let src = pm.join("set-aside/MADOS_R1_u1");
    std::fs::create_dir_all(src.join("overlays/etc/upper")).unwrap();
    std::fs::write(src.join("overlays/etc/upper/f"), "r1").unwrap();
    std::fs::create_dir_all(src.join("overlays/usr/upper/share")).unwrap();
    std::fs::write(src.join("overlays/usr/upper/share/r1-file"), "r1 data").unwrap();
    nix::sys::stat::mknod(
        &src.join("overlays/usr/upper/gone"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::empty(),
        0,
    )
    .unwrap();
    set_aside::write_meta(&Dir::open(&src).unwrap(), &r1()).unwrap();
    std::fs::create_dir_all(pm.join(".mados")).unwrap();
    std::fs::write(
        pm.join(iso_build::RECORD),
        serde_json::to_string(&r1()).unwrap(),
    )
    .unwrap();
    let root = Dir::open(pm).unwrap();
    set_aside::write_request(
        &root,
        &Request {
            name: "MADOS_R1_u1".into(),
            requested_at: 1,
            started: None,
        },
    )
    .unwrap();
}

/// Where each tree is: (`overlays/etc/upper/f`, the old tree's path if
/// not in `overlays`, the r1 tree's path if not in `overlays`).
fn where_trees(pm: &Path) -> (Option<String>, Vec<PathBuf>) {
    let in_place = read(&pm.join("overlays/etc/upper/f"));
    let mut elsewhere = vec![];
    if let Ok(rd) = std::fs::read_dir(pm.join("set-aside")) {
        for e in rd {
            let p = e.unwrap().path().join("overlays/etc/upper/f");
            if p.exists() {
                elsewhere.push(p);
            }
        }
    }
    (in_place, elsewhere)
}

fn assert_done(pm: &Path, old: bool, what: &str) {
    assert_eq!(
        read(&pm.join("overlays/etc/upper/f")).as_deref(),
        Some("r1"),
        "{what}"
    );
    assert_eq!(
        read(&pm.join("overlays/usr/upper/share/r1-file")).as_deref(),
        Some("r1 data"),
        "{what}"
    );
    let w = std::fs::symlink_metadata(pm.join("overlays/usr/upper/gone")).unwrap();
    assert!(
        std::os::unix::fs::FileTypeExt::is_char_device(&w.file_type()),
        "{what}: the whiteout came back as one"
    );
    assert!(
        !pm.join("set-aside/MADOS_R1_u1").exists(),
        "{what}: the chosen dir is gone"
    );
    assert!(
        !pm.join(set_aside::REQUEST).exists(),
        "{what}: the request is cleared"
    );
    let aside = pm.join("set-aside/MADOS_R1_u1-2");
    if old {
        assert_eq!(
            read(&aside.join("overlays/etc/upper/f")).as_deref(),
            Some("old"),
            "{what}"
        );
        assert_eq!(
            std::fs::read(aside.join("overlays/usr/upper/lib/old-lib"))
                .unwrap()
                .len(),
            300_000,
            "{what}"
        );
        let meta: set_aside::Meta =
            serde_json::from_str(&read(&aside.join(set_aside::META)).unwrap()).unwrap();
        assert_eq!(
            meta.build,
            r1(),
            "{what}: the old ones recorded as release 1's"
        );
    } else {
        assert!(!aside.exists(), "{what}");
    }
}

#[test]
fn the_boot_restore_cut_after_every_step_is_finished_or_rolled_back() {
    if !require_root("the_boot_restore_cut_after_every_step_is_finished_or_rolled_back") {
        return;
    }
    let _g = serial();
    let d = tmpdir("setaside-cuts");
    let img = d.join("part.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    run("mkfs.ext4", &["-q", "-F", img.to_str().unwrap()]);
    let pm = d.join("pm");
    std::fs::create_dir_all(&pm).unwrap();
    // a thread of its own: the namespace is this thread's
    std::thread::spawn(move || {
        private_mounts();
        run(
            "mount",
            &["-o", "loop", img.to_str().unwrap(), pm.to_str().unwrap()],
        );
        let paths: [(bool, &[&str]); 2] = [
            (
                true,
                &[
                    "journal",
                    "aside",
                    "exchange",
                    "moveold",
                    "dropsource",
                    "clear",
                ],
            ),
            (false, &["journal", "movein", "dropsource", "clear"]),
        ];
        for (old, points) in paths {
            // uncut
            scene(&pm, old);
            let o = child(&pm, &r1(), None);
            assert!(outcome(&o).contains("restored"), "{}", outcome(&o));
            assert_done(&pm, old, &format!("old {old}: uncut"));
            for p in points {
                let what = format!("old {old}: cut after {p}");
                scene(&pm, old);
                let o = child(&pm, &r1(), Some(&format!("restore-{p}")));
                assert!(!o.status.success(), "{what}: the cut point was not reached");
                // one whole tree in place, the other on the partition
                let (in_place, elsewhere) = where_trees(&pm);
                match in_place.as_deref() {
                    Some("old") => assert_eq!(elsewhere.len(), 1, "{what}"),
                    Some("r1") => assert_eq!(elsewhere.len(), usize::from(old), "{what}"),
                    None => assert!(!old && elsewhere.len() == 1, "{what}: nothing in place"),
                    Some(x) => panic!("{what}: {x}"),
                }
                let o = outcome(&child(&pm, &r1(), None));
                // stopped after the last step: nothing left to do
                assert!(
                    o.contains("restored") || (*p == "clear" && o == "null"),
                    "{what}: {o}"
                );
                assert_done(&pm, old, &what);
            }
        }
        // stopped before the exchange, then the stick carries another
        // build: rolled back, waits; then release 1 again: done
        scene(&pm, true);
        assert!(!child(&pm, &r1(), Some("restore-aside")).status.success());
        assert!(pm.join("set-aside/MADOS_R1_u1-2").exists());
        let r2 = IsoBuild {
            label: "MADOS_R2".into(),
            uuid: "u2".into(),
        };
        let o = outcome(&child(&pm, &r2, None));
        assert!(o.contains("waiting") && o.contains("MADOS_R2 (u2)"), "{o}");
        assert_eq!(
            read(&pm.join("overlays/etc/upper/f")).as_deref(),
            Some("old")
        );
        assert!(
            !pm.join("set-aside/MADOS_R1_u1-2").exists(),
            "the prepared dir removed"
        );
        let req: Request =
            serde_json::from_str(&read(&pm.join(set_aside::REQUEST)).unwrap()).unwrap();
        assert_eq!(req.started, None, "the request stays, unstarted");
        let o = outcome(&child(&pm, &r2, None));
        assert!(o.contains("waiting"), "{o}");
        assert!(outcome(&child(&pm, &r1(), None)).contains("restored"));
        assert_done(&pm, true, "rolled back, then release 1");
        // the chosen dir's overlays a symlink out: nothing moves
        scene(&pm, true);
        let outside = pm.parent().unwrap().join("outside");
        std::fs::create_dir_all(outside.join("etc/upper")).unwrap();
        std::fs::write(outside.join("etc/upper/f"), "outside").unwrap();
        let src = pm.join("set-aside/MADOS_R1_u1");
        std::fs::remove_dir_all(src.join("overlays")).unwrap();
        std::os::unix::fs::symlink(&outside, src.join("overlays")).unwrap();
        let o = child(&pm, &r1(), None);
        assert!(
            !o.status.success(),
            "a symlink as the chosen overlays is refused"
        );
        assert_eq!(
            read(&pm.join("overlays/etc/upper/f")).as_deref(),
            Some("old")
        );
        assert_eq!(
            read(&outside.join("etc/upper/f")).as_deref(),
            Some("outside")
        );
        assert!(
            std::fs::symlink_metadata(src.join("overlays"))
                .unwrap()
                .is_symlink()
        );
        // garbage as the request: dropped, nothing moved
        scene(&pm, true);
        std::fs::write(
            pm.join(set_aside::REQUEST),
            "{\"name\": \"../../etc\", \"requested_at\": 1}",
        )
        .unwrap();
        let o = outcome(&child(&pm, &r1(), None));
        assert!(o.contains("dropped"), "{o}");
        assert_eq!(
            read(&pm.join("overlays/etc/upper/f")).as_deref(),
            Some("old")
        );
        assert!(!pm.join(set_aside::REQUEST).exists());
        run("umount", &[pm.to_str().unwrap()]);
    })
    .join()
    .unwrap();
    std::fs::remove_dir_all(&d).unwrap();
}

fn ok(args: &[&str]) -> String {
    let o = mp(args);
    assert!(o.status.success(), "{args:?}: {}", text(&o));
    text(&o)
}

fn refused(args: &[&str]) -> String {
    let o = mp(args);
    assert_eq!(o.status.code(), Some(3), "{args:?}: {}", text(&o));
    text(&o)
}

#[test]
fn list_restore_delete_on_a_stick_image() {
    if !require_root("list_restore_delete_on_a_stick_image") {
        return;
    }
    let _g = serial();
    let d = tmpdir("setaside-cli");
    let img = image("archiso", &d, Some(1 << 30));
    let p = img.to_str().unwrap().to_string();
    ok(&["enable", "--device", &p, "--size", "200M", "--yes"]);
    let l: serde_json::Value =
        serde_json::from_str(&ok(&["set-aside", "list", "--device", &p, "--json"])).unwrap();
    assert_eq!(l["entries"].as_array().unwrap().len(), 0);
    let stick = IsoBuild {
        label: l["stick"]["label"].as_str().unwrap().into(),
        uuid: l["stick"]["uuid"].as_str().unwrap().into(),
    };
    let mine = iso_build::dir_name(&stick);
    let plan: serde_json::Value =
        serde_json::from_str(&ok(&["plan", "--device", &p, "--json"])).unwrap();
    let start = plan["result"]["partition"]["start"].as_u64().unwrap();
    let size = plan["result"]["partition"]["size"].as_u64().unwrap();
    let pm = d.join("pm");
    std::fs::create_dir_all(&pm).unwrap();
    let (p2, pm2, mine2, stick2) = (p.clone(), pm.clone(), mine.clone(), stick.clone());
    std::thread::spawn(move || {
        private_mounts();
        let lo = loop_part(&p2, start, size);
        let lo = lo.trim();
        run("mount", &[lo, pm2.to_str().unwrap()]);
        std::fs::create_dir_all(pm2.join("overlays/etc/upper")).unwrap();
        std::fs::write(pm2.join("overlays/etc/upper/f"), "now").unwrap();
        // made on this stick's build, with its record
        let a = pm2.join("set-aside").join(&mine2);
        std::fs::create_dir_all(a.join("overlays/etc/upper")).unwrap();
        std::fs::write(a.join("overlays/etc/upper/f"), vec![b'x'; 200_000]).unwrap();
        set_aside::write_meta(&Dir::open(&a).unwrap(), &stick2).unwrap();
        // another release's, from an older version (no record)
        let b = pm2.join("set-aside/OTHER_2025-01-01-00-00-00-00");
        std::fs::create_dir_all(b.join("overlays/usr/upper")).unwrap();
        std::fs::write(b.join("overlays/usr/upper/g"), "other").unwrap();
        run("umount", &[pm2.to_str().unwrap()]);
        run("losetup", &["-d", lo]);
    })
    .join()
    .unwrap();
    let l: serde_json::Value =
        serde_json::from_str(&ok(&["set-aside", "list", "--device", &p, "--json"])).unwrap();
    let e = l["entries"].as_array().unwrap();
    assert_eq!(e.len(), 2, "{l}");
    let other = e
        .iter()
        .find(|x| x["name"] == "OTHER_2025-01-01-00-00-00-00")
        .unwrap();
    let same = e.iter().find(|x| x["name"] == mine.as_str()).unwrap();
    assert_eq!(other["known_from"], "name");
    assert_eq!(other["restorable_now"], false);
    assert_eq!(same["known_from"], "record");
    assert_eq!(same["build"]["label"], stick.label.as_str());
    assert_eq!(same["restorable_now"], true);
    assert!(same["size"].as_u64().unwrap() >= 200_000, "{same}");
    assert!(same["at"].as_u64().unwrap() > 1_700_000_000);
    let t = ok(&["set-aside", "list", "--device", &p]);
    assert!(
        t.contains("OTHER_2025-01-01-00-00-00-00") && t.contains("restorable at the next boot"),
        "{t}"
    );
    // another release's: recorded, and said so
    let t = ok(&[
        "set-aside",
        "restore",
        "OTHER_2025-01-01-00-00-00-00",
        "--device",
        &p,
    ]);
    assert!(t.contains("Not now") && t.contains(&stick.label), "{t}");
    let t = refused(&[
        "set-aside",
        "delete",
        "OTHER_2025-01-01-00-00-00-00",
        "--device",
        &p,
        "--yes",
    ]);
    assert!(
        t.contains("restore of OTHER_2025-01-01-00-00-00-00 is requested"),
        "{t}"
    );
    assert!(ok(&["set-aside", "restore", "--cancel", "--device", &p]).contains("withdrawn"));
    refused(&[
        "set-aside",
        "delete",
        "OTHER_2025-01-01-00-00-00-00",
        "--device",
        &p,
    ]);
    refused(&["set-aside", "restore", "NOPE", "--device", &p]);
    refused(&[
        "set-aside",
        "delete",
        "../overlays",
        "--device",
        &p,
        "--yes",
    ]);
    let t = ok(&[
        "set-aside",
        "delete",
        "OTHER_2025-01-01-00-00-00-00",
        "--device",
        &p,
        "--yes",
    ]);
    assert!(t.contains("freed"), "{t}");
    let t = ok(&["set-aside", "restore", &mine, "--device", &p]);
    assert!(t.contains("restored at the next boot"), "{t}");
    let l: serde_json::Value =
        serde_json::from_str(&ok(&["set-aside", "list", "--device", &p, "--json"])).unwrap();
    assert_eq!(l["entries"].as_array().unwrap().len(), 1);
    assert_eq!(l["restore_requested"]["name"], mine.as_str());
    // the next boot of this build carries it out
    std::thread::spawn(move || {
        private_mounts();
        let lo = loop_part(&p, start, size);
        let lo = lo.trim();
        run("mount", &[lo, pm.to_str().unwrap()]);
        let o = set_aside::restore(&pm, Some(&stick)).unwrap();
        assert!(matches!(o, Some(Outcome::Restored(_))), "{o:?}");
        assert_eq!(
            std::fs::read(pm.join("overlays/etc/upper/f"))
                .unwrap()
                .len(),
            200_000
        );
        assert_eq!(
            read(&pm.join(format!("set-aside/{mine}-2/overlays/etc/upper/f"))).as_deref(),
            Some("now")
        );
        run("umount", &[pm.to_str().unwrap()]);
        run("losetup", &["-d", lo]);
    })
    .join()
    .unwrap();
    std::fs::remove_dir_all(&d).unwrap();
}
