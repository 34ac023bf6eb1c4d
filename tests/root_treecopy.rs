//! Root test of the faithful copy `enable` saves a RAM session with: an
//! overlay upper layer holding both whiteout forms, an opaque directory,
//! file capabilities, set-id modes, owners, times, hardlinks, symlinks,
//! device nodes, a FIFO and a socket, copied over a target that already
//! holds older entries. Everything is carried but the socket, which the
//! report names.

mod common;

use common::*;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

/// A v2 `security.capability` value: cap_net_raw (13), permitted + effective.
fn cap_net_raw() -> Vec<u8> {
    let mut v = vec![];
    for w in [0x0200_0001u32, 1 << 13, 0, 0, 0] {
        v.extend_from_slice(&w.to_le_bytes());
    }
    v
}

fn mknod(p: &Path, kind: nix::sys::stat::SFlag, dev: u64) {
    nix::sys::stat::mknod(
        p,
        kind,
        nix::sys::stat::Mode::from_bits_truncate(0o644),
        dev,
    )
    .unwrap();
}

#[test]
fn an_upper_layer_is_copied_with_everything_overlayfs_needs() {
    if !require_root("an_upper_layer_is_copied_with_everything_overlayfs_needs") {
        return;
    }
    use nix::sys::stat::SFlag;
    let d = tmpdir("treecopy");
    let (src, dst) = (d.join("upper"), d.join("saved"));
    fs::create_dir_all(src.join("opaque")).unwrap();
    // char 0/0: a whiteout (hostname deleted in the session)
    mknod(&src.join("hostname"), SFlag::S_IFCHR, 0);
    // the xattr whiteout form
    fs::write(src.join("xwhiteout"), "").unwrap();
    xattr::set(src.join("xwhiteout"), "trusted.overlay.whiteout", b"").unwrap();
    // an opaque dir: hides what is below it
    xattr::set(src.join("opaque"), "trusted.overlay.opaque", b"y").unwrap();
    fs::write(src.join("opaque/new"), "new").unwrap();
    // a set-uid file with a capability, an owner and an old mtime
    let ping = src.join("ping");
    fs::write(&ping, "binary").unwrap();
    std::os::unix::fs::chown(&ping, Some(1234), Some(2345)).unwrap();
    fs::set_permissions(&ping, fs::Permissions::from_mode(0o4755)).unwrap();
    xattr::set(&ping, "security.capability", &cap_net_raw()).unwrap();
    xattr::set(&ping, "user.note", b"kept").unwrap();
    let old = nix::sys::time::TimeSpec::new(978_307_200, 0); // 2001-01-01
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        &ping,
        &old,
        &old,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
    fs::write(src.join("hard1"), "same").unwrap();
    fs::hard_link(src.join("hard1"), src.join("hard2")).unwrap();
    std::os::unix::fs::symlink("../elsewhere", src.join("link")).unwrap();
    nix::unistd::mkfifo(
        &src.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    mknod(
        &src.join("sda9"),
        SFlag::S_IFBLK,
        nix::sys::stat::makedev(8, 9),
    );
    let _sock = std::os::unix::net::UnixListener::bind(src.join("sock")).unwrap();
    // what an earlier save left in the target
    fs::create_dir_all(dst.join("opaque")).unwrap();
    fs::write(dst.join("opaque/old"), "old").unwrap();
    fs::write(dst.join("hostname"), "was a file").unwrap();

    let r = mados_persistence::util::treecopy::copy(&src, &dst).unwrap();

    assert_eq!(r.not_carried.len(), 1, "{:?}", r.not_carried);
    assert!(r.not_carried[0].contains("sock"), "{:?}", r.not_carried);
    let m = fs::symlink_metadata(dst.join("hostname")).unwrap();
    assert!(
        m.file_type().is_char_device() && m.rdev() == 0,
        "whiteout 0/0"
    );
    assert_eq!(
        xattr::get(dst.join("xwhiteout"), "trusted.overlay.whiteout").unwrap(),
        Some(vec![])
    );
    assert_eq!(
        xattr::get(dst.join("opaque"), "trusted.overlay.opaque").unwrap(),
        Some(b"y".to_vec())
    );
    assert!(
        !dst.join("opaque/old").exists(),
        "an opaque dir replaces what was there"
    );
    assert_eq!(fs::read_to_string(dst.join("opaque/new")).unwrap(), "new");
    let p = fs::metadata(dst.join("ping")).unwrap();
    assert_eq!((p.uid(), p.gid(), p.mode() & 0o7777), (1234, 2345, 0o4755));
    assert_eq!(p.mtime(), 978_307_200);
    assert_eq!(
        xattr::get(dst.join("ping"), "security.capability").unwrap(),
        Some(cap_net_raw()),
        "the capability survives the chown"
    );
    assert_eq!(
        xattr::get(dst.join("ping"), "user.note").unwrap(),
        Some(b"kept".to_vec())
    );
    assert_eq!(
        fs::metadata(dst.join("hard1")).unwrap().ino(),
        fs::metadata(dst.join("hard2")).unwrap().ino(),
        "hardlinks stay links"
    );
    assert_eq!(
        fs::read_link(dst.join("link")).unwrap(),
        Path::new("../elsewhere")
    );
    assert!(
        fs::symlink_metadata(dst.join("fifo"))
            .unwrap()
            .file_type()
            .is_fifo()
    );
    let b = fs::symlink_metadata(dst.join("sda9")).unwrap();
    assert!(b.file_type().is_block_device() && b.rdev() == nix::sys::stat::makedev(8, 9));
    fs::remove_dir_all(&d).unwrap();
}
