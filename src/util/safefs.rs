//! The one seam for privileged file operations on trees that users write
//! (a tier's RAM upper, its stage and lower on the partition, a user's
//! home, a RAM session's uppers): everything by directory fd.
//!
//! A `Dir` is an open directory. Below it, a path is resolved by
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV)`: no
//! symlink is followed anywhere in it, no `..` leaves it, no mount is
//! crossed. Entries are acted on with the `*at` calls relative to their
//! parent's fd (`renameat2`, `linkat` without following, `unlinkat`,
//! `mkdirat`, `mknodat`, `symlinkat`, `fchownat(AT_SYMLINK_NOFOLLOW)`);
//! attributes are set on an fd opened `O_NOFOLLOW` (`fchown`, `fchmod`,
//! `fsetxattr`, `futimens`) and read from `fstat` of the fd that is read.
//! Every open of an entry is `O_NOFOLLOW | O_NONBLOCK | O_NOCTTY |
//! O_CLOEXEC`; only a regular file is ever opened for its contents (a
//! FIFO, a socket or a device node never is), and its identity (device,
//! inode) is checked against what the walk saw. Removal is recursive by
//! fd and never leaves the device it started on. Names are `OsStr`.
//!
//! A kernel without `openat2` (before 5.6) is a clear error, never a
//! silent fallback to a path.
//!
//! Written here: the crates that offer "safe" path handling (cap-std,
//! openat) bring their own abstractions over the same calls and do not do
//! the overlayfs-specific parts (whiteouts, opaque marks, xattrs by fd);
//! the calls themselves are nix's.

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, RenameFlags, ResolveFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

pub type Stat = FileStat;

/// The type of an entry, from its `st_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Char,
    Block,
    Fifo,
    Socket,
}

pub fn kind(st: &Stat) -> Kind {
    match st.st_mode & nix::libc::S_IFMT {
        nix::libc::S_IFREG => Kind::File,
        nix::libc::S_IFDIR => Kind::Dir,
        nix::libc::S_IFLNK => Kind::Symlink,
        nix::libc::S_IFCHR => Kind::Char,
        nix::libc::S_IFBLK => Kind::Block,
        nix::libc::S_IFIFO => Kind::Fifo,
        _ => Kind::Socket,
    }
}

/// The same inode (device and inode number).
pub fn same(a: &Stat, b: &Stat) -> bool {
    a.st_dev == b.st_dev && a.st_ino == b.st_ino
}

pub fn mode_bits(st: &Stat) -> u32 {
    st.st_mode & 0o7777
}

/// The overlay marks that count: only the `trusted.` forms. Our overlays
/// are mounted without `userxattr`, where the kernel takes a
/// `user.overlay.*` attribute for an ordinary one a user may set on their
/// own file: honouring it would let a user whiteout or make opaque what a
/// fold then deletes below (another user's or root's data). Such an
/// attribute is carried as the plain attribute it is.
pub const WHITEOUT_XATTRS: [&str; 1] = ["trusted.overlay.whiteout"];
pub const OPAQUE_XATTRS: [&str; 1] = ["trusted.overlay.opaque"];

/// The flags of every open of an entry in a tree a user may write.
fn entry_flags() -> OFlag {
    OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC
}

fn beneath() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_XDEV
}

fn io_err(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// `name` must be one plain component: no `/`, not `.` or `..`, not empty.
fn check_name(name: &OsStr) -> io::Result<()> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') || b.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a plain name: {:?}", name),
        ));
    }
    Ok(())
}

/// `rel` made only of plain components (an empty path is the dir itself).
pub fn check_rel(rel: &Path) -> io::Result<()> {
    for c in rel.components() {
        match c {
            Component::Normal(n) => check_name(n)?,
            Component::CurDir => {}
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("not a relative path of plain names: {}", rel.display()),
                ));
            }
        }
    }
    Ok(())
}

/// An open directory; everything below it is reached by fd.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
}

impl AsFd for Dir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Dir {
    /// Open a directory that root chose (the partition, the tier tmpfs, a
    /// path from state.json): its last component is not followed.
    pub fn open(path: &Path) -> io::Result<Dir> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | entry_flags(),
            Mode::empty(),
        )
        .map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("opening the directory {}: {e}", path.display()),
            )
        })?;
        Ok(Dir { fd })
    }

    /// `open`, but no symlink is followed in any component of `path`
    /// (mounts are crossed): for a root-chosen path that runs through a
    /// user's directories (a bind tier's lower, `home/<user>/...` on the
    /// partition), which the user may swap for a symlink at any time.
    pub fn open_no_symlinks(path: &Path) -> io::Result<Dir> {
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | entry_flags())
            .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS);
        let fd = nix::fcntl::openat2(nix::fcntl::AT_FDCWD, path, how).map_err(|e| {
            io::Error::new(
                io_err(e).kind(),
                format!(
                    "opening the directory {} (no symlink followed): {e}",
                    path.display()
                ),
            )
        })?;
        Ok(Dir { fd })
    }

    /// `open`, creating `path` (and its missing parents) first.
    pub fn open_or_create(path: &Path) -> io::Result<Dir> {
        std::fs::create_dir_all(path)?;
        Dir::open(path)
    }

    pub fn try_clone(&self) -> io::Result<Dir> {
        Ok(Dir {
            fd: self.fd.try_clone()?,
        })
    }

    /// The directory `rel` below this one, resolved without following a
    /// symlink, leaving it, or crossing a mount.
    pub fn dir(&self, rel: &Path) -> io::Result<Dir> {
        check_rel(rel)?;
        if rel.as_os_str().is_empty() {
            return self.try_clone();
        }
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | entry_flags())
            .resolve(beneath());
        match nix::fcntl::openat2(&self.fd, rel, how) {
            Ok(fd) => Ok(Dir { fd }),
            Err(Errno::ENOSYS) => Err(io::Error::other(
                "this kernel has no openat2 (Linux 5.6 or newer is needed to work safely on users' files)",
            )),
            Err(e) => Err(io_err(e)),
        }
    }

    /// The directory `rel` below this one, creating each missing component
    /// (mode `mode`, owned by the caller); an existing non-directory or a
    /// symlink is an error.
    pub fn dir_create(&self, rel: &Path, mode: u32) -> io::Result<Dir> {
        check_rel(rel)?;
        let mut cur = self.try_clone()?;
        for c in rel.components() {
            let Component::Normal(n) = c else { continue };
            match cur.mkdir(n, mode) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(nix::libc::EEXIST) => {}
                Err(e) => return Err(e),
            }
            cur = cur.dir(Path::new(n))?;
        }
        Ok(cur)
    }

    /// The directory `rel` below this one, each component opened from the
    /// last without following a symlink or leaving by `..`, but entering
    /// mounts (a mount target in the live root, below the persistent
    /// overlays); each missing component created first when `create`.
    /// The caller mounts on it through `proc_path`.
    pub fn dir_through_mounts(&self, rel: &Path, create: bool) -> io::Result<Dir> {
        check_rel(rel)?;
        let mut cur = self.try_clone()?;
        for c in rel.components() {
            let Component::Normal(n) = c else { continue };
            if create {
                match cur.mkdir(n, 0o755) {
                    Err(e) if e.raw_os_error() != Some(nix::libc::EEXIST) => return Err(e),
                    _ => {}
                }
            }
            let how = OpenHow::new()
                .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | entry_flags())
                .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
            let fd = nix::fcntl::openat2(&cur.fd, n, how).map_err(io_err)?;
            cur = Dir { fd };
        }
        Ok(cur)
    }

    /// `/proc/self/fd/N` for this directory: what `mount(2)` is given to
    /// act on exactly this directory, whatever its path shows now.
    pub fn fd_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }

    /// The names in this directory (without `.` and `..`), sorted.
    pub fn list(&self) -> io::Result<Vec<OsString>> {
        // a fresh open description of the same dir: its own offset
        let fd = nix::fcntl::openat(
            &self.fd,
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | entry_flags(),
            Mode::empty(),
        )
        .map_err(io_err)?;
        let mut d = nix::dir::Dir::from_fd(fd).map_err(io_err)?;
        let mut out = vec![];
        for e in d.iter() {
            let e = e.map_err(io_err)?;
            let n = e.file_name().to_bytes();
            if n != b"." && n != b".." {
                out.push(OsStr::from_bytes(n).to_os_string());
            }
        }
        out.sort();
        Ok(out)
    }

    /// The entry `name` itself (a symlink is not followed); `None` when
    /// there is none.
    pub fn lstat(&self, name: &OsStr) -> io::Result<Option<Stat>> {
        check_name(name)?;
        match nix::sys::stat::fstatat(&self.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(s) => Ok(Some(s)),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(io_err(e)),
        }
    }

    /// This directory's own status.
    pub fn stat(&self) -> io::Result<Stat> {
        nix::sys::stat::fstat(&self.fd).map_err(io_err)
    }

    /// Open the regular file `name` for reading. Anything else (a FIFO, a
    /// device, a socket, a symlink) is refused without being opened for
    /// its contents; with `want`, a file that is not that inode any more
    /// (swapped since the walk) is refused too. Both refusals are `gone`.
    /// Returns the file and its `fstat`.
    pub fn open_read(&self, name: &OsStr, want: Option<&Stat>) -> io::Result<(File, Stat)> {
        check_name(name)?;
        // O_PATH first: nothing of the entry is opened, whatever it is
        let p = nix::fcntl::openat(&self.fd, name, OFlag::O_PATH | entry_flags(), Mode::empty())
            .map_err(io_err)?;
        reopen_regular(p, &Path::new(name).display(), want)
    }

    /// Create the new file `name` (never through a symlink, never an
    /// existing one) for writing.
    pub fn create(&self, name: &OsStr, mode: u32) -> io::Result<File> {
        check_name(name)?;
        let fd = nix::fcntl::openat(
            &self.fd,
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | entry_flags(),
            Mode::from_bits_truncate(mode),
        )
        .map_err(io_err)?;
        Ok(File::from(fd))
    }

    /// Open the existing regular file `name` to write into it (at the
    /// offsets the caller gives: holes stay holes).
    pub fn open_write(&self, name: &OsStr) -> io::Result<(File, Stat)> {
        check_name(name)?;
        let fd = nix::fcntl::openat(
            &self.fd,
            name,
            OFlag::O_WRONLY | entry_flags(),
            Mode::empty(),
        )
        .map_err(io_err)?;
        let f = File::from(fd);
        let st = nix::sys::stat::fstat(&f).map_err(io_err)?;
        if kind(&st) != Kind::File {
            return Err(changed(format!("{:?} is not a regular file", name)));
        }
        Ok((f, st))
    }

    pub fn mkdir(&self, name: &OsStr, mode: u32) -> io::Result<()> {
        check_name(name)?;
        nix::sys::stat::mkdirat(&self.fd, name, Mode::from_bits_truncate(mode)).map_err(io_err)
    }

    /// A char/block device or FIFO like `st` (a char device 0/0 is an
    /// overlay whiteout).
    pub fn mknod(&self, name: &OsStr, st: &Stat) -> io::Result<()> {
        check_name(name)?;
        let k = match kind(st) {
            Kind::Char => SFlag::S_IFCHR,
            Kind::Block => SFlag::S_IFBLK,
            Kind::Fifo => SFlag::S_IFIFO,
            other => {
                return Err(io::Error::other(format!("mknod of a {other:?}")));
            }
        };
        nix::sys::stat::mknodat(
            &self.fd,
            name,
            k,
            Mode::from_bits_truncate(mode_bits(st)),
            st.st_rdev,
        )
        .map_err(io_err)
    }

    /// A whiteout (char device 0/0) named `name`.
    pub fn make_whiteout(&self, name: &OsStr) -> io::Result<()> {
        check_name(name)?;
        nix::sys::stat::mknodat(&self.fd, name, SFlag::S_IFCHR, Mode::empty(), 0).map_err(io_err)
    }

    pub fn symlink(&self, target: &OsStr, name: &OsStr) -> io::Result<()> {
        check_name(name)?;
        nix::unistd::symlinkat(target, &self.fd, name).map_err(io_err)
    }

    pub fn readlink(&self, name: &OsStr) -> io::Result<OsString> {
        check_name(name)?;
        nix::fcntl::readlinkat(&self.fd, name).map_err(io_err)
    }

    /// `renameat2` of `name` here to `to_name` in `to` (the same
    /// filesystem); neither is followed.
    pub fn rename(
        &self,
        name: &OsStr,
        to: &Dir,
        to_name: &OsStr,
        flags: RenameFlags,
    ) -> io::Result<()> {
        check_name(name)?;
        check_name(to_name)?;
        nix::fcntl::renameat2(&self.fd, name, &to.fd, to_name, flags).map_err(io_err)
    }

    /// A hard link `to_name` in `to` to the entry `name` here (a symlink
    /// is linked itself, never followed).
    pub fn link(&self, name: &OsStr, to: &Dir, to_name: &OsStr) -> io::Result<()> {
        check_name(name)?;
        check_name(to_name)?;
        nix::unistd::linkat(&self.fd, name, &to.fd, to_name, AtFlags::empty()).map_err(io_err)
    }

    pub fn unlink(&self, name: &OsStr) -> io::Result<()> {
        check_name(name)?;
        nix::unistd::unlinkat(&self.fd, name, nix::unistd::UnlinkatFlags::NoRemoveDir)
            .map_err(io_err)
    }

    pub fn rmdir(&self, name: &OsStr) -> io::Result<()> {
        check_name(name)?;
        nix::unistd::unlinkat(&self.fd, name, nix::unistd::UnlinkatFlags::RemoveDir).map_err(io_err)
    }

    /// Remove `name` whatever it is, a tree entry by entry by fd (never
    /// following a symlink, never leaving this directory's device);
    /// absent is fine.
    pub fn remove_all(&self, name: &OsStr) -> io::Result<()> {
        let dev = self.stat()?.st_dev;
        self.remove_all_on(name, dev)
    }

    fn remove_all_on(&self, name: &OsStr, dev: u64) -> io::Result<()> {
        let absent_ok = |r: io::Result<()>| match r {
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOENT) => Ok(()),
            r => r,
        };
        let other_fs =
            |n: &OsStr| io::Error::other(format!("{:?} is on another filesystem; not removed", n));
        let Some(st) = self.lstat(name)? else {
            return Ok(());
        };
        if kind(&st) != Kind::Dir {
            return absent_ok(self.unlink(name));
        }
        if st.st_dev != dev {
            return Err(other_fs(name));
        }
        let top = self.dir(Path::new(name))?;
        if !same(&top.stat()?, &st) {
            return Err(changed(format!("{:?} changed while removed", name)));
        }
        // Depth first with one directory open whatever the depth (a user's
        // tree may be deeper than the fds a process may hold, or than its
        // stack would take by recursion): each level keeps its name, stat
        // and the names left to remove, not its fd; going back up opens
        // `..`, which must be the directory we came down from.
        let mut levels: Vec<(OsString, Stat, std::vec::IntoIter<OsString>)> =
            vec![(name.to_os_string(), st, top.list()?.into_iter())];
        let mut cur = top;
        loop {
            let next = levels.last_mut().and_then(|l| l.2.next());
            if let Some(n) = next {
                let Some(cst) = cur.lstat(&n)? else { continue };
                if kind(&cst) != Kind::Dir {
                    absent_ok(cur.unlink(&n))?;
                    continue;
                }
                if cst.st_dev != dev {
                    return Err(other_fs(&n));
                }
                let d = cur.dir(Path::new(&n))?;
                if !same(&d.stat()?, &cst) {
                    return Err(changed(format!("{:?} changed while removed", n)));
                }
                let names = d.list()?.into_iter();
                levels.push((n, cst, names));
                cur = d;
                continue;
            }
            // `cur` is empty: it goes, from its parent
            let (n, _, _) = levels.pop().expect("a level");
            let Some((_, pst, _)) = levels.last() else {
                break;
            };
            let fd = nix::fcntl::openat(
                &cur.fd,
                "..",
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | entry_flags(),
                Mode::empty(),
            )
            .map_err(io_err)?;
            let parent = Dir { fd };
            if !same(&parent.stat()?, pst) {
                return Err(changed(format!("{:?} was moved while removed", n)));
            }
            match parent.rmdir(&n) {
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOENT) => {}
                r => r?,
            }
            cur = parent;
        }
        absent_ok(self.rmdir(name))
    }

    /// Remove everything in this directory (it stays).
    pub fn clear(&self) -> io::Result<()> {
        for n in self.list()? {
            self.remove_all(&n)?;
        }
        Ok(())
    }

    pub fn fsync(&self) -> io::Result<()> {
        nix::unistd::fsync(&self.fd).map_err(io_err)
    }

    pub fn syncfs(&self) -> io::Result<()> {
        nix::unistd::syncfs(&self.fd).map_err(io_err)
    }

    /// The path of the entry `name` through this fd (`/proc/self/fd/N/
    /// NAME`): for the l*xattr calls, which have no `*at` form. The dir
    /// is reached through its fd, only `name` is looked up (and, with the
    /// l* calls, not followed).
    fn proc_path(&self, name: &OsStr) -> PathBuf {
        let mut p = PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()));
        p.push(name);
        p
    }

    /// The extended attributes of the entry `name` (a symlink's own).
    /// A filesystem without them has none: that is no error.
    pub fn xattrs(&self, name: &OsStr) -> io::Result<Vec<(OsString, Vec<u8>)>> {
        check_name(name)?;
        read_xattrs(
            || xattr::list(self.proc_path(name)),
            |n| xattr::get(self.proc_path(name), n),
        )
    }

    /// An xattr of the entry `name` (not followed).
    pub fn xattr(&self, name: &OsStr, attr: &str) -> Option<Vec<u8>> {
        xattr::get(self.proc_path(name), attr).ok().flatten()
    }

    /// Whether the entry `name` with status `st` is an overlayfs whiteout.
    pub fn is_whiteout(&self, name: &OsStr, st: &Stat) -> bool {
        match kind(st) {
            Kind::Char => st.st_rdev == 0,
            Kind::File => {
                st.st_size == 0
                    && WHITEOUT_XATTRS
                        .iter()
                        .any(|a| self.xattr(name, a).is_some())
            }
            _ => false,
        }
    }

    /// Whether this directory is marked opaque.
    pub fn is_opaque(&self) -> bool {
        let f = self.as_file_ref();
        OPAQUE_XATTRS
            .iter()
            .any(|a| xattr::FileExt::get_xattr(&*f, a).ok().flatten().as_deref() == Some(b"y"))
    }

    /// Mark this directory opaque (`trusted.overlay.opaque=y`), or clear
    /// both forms of the mark.
    pub fn set_opaque(&self, on: bool) -> io::Result<()> {
        let f = self.as_file_ref();
        if on {
            return xattr::FileExt::set_xattr(&*f, OPAQUE_XATTRS[0], b"y");
        }
        for n in OPAQUE_XATTRS {
            match xattr::FileExt::remove_xattr(&*f, n) {
                Err(e) if !unsupported(&e) => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// This directory's own extended attributes.
    pub fn own_xattrs(&self) -> io::Result<Vec<(OsString, Vec<u8>)>> {
        let f = self.as_file_ref();
        read_xattrs(
            || xattr::FileExt::list_xattr(&*f),
            |n| xattr::FileExt::get_xattr(&*f, n),
        )
    }

    /// The fd as a `File` for the fd-based xattr calls, not closed after.
    fn as_file_ref(&self) -> std::mem::ManuallyDrop<File> {
        use std::os::fd::FromRawFd;
        // SAFETY: the fd stays open as long as self; ManuallyDrop never
        // closes it.
        std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(self.fd.as_raw_fd()) })
    }

    /// Set this directory's owner, mode, attributes and times as `st` and
    /// `xattrs` say (see `set_attrs_fd`).
    pub fn set_own_attrs(
        &self,
        st: &Stat,
        xattrs: &[(OsString, Vec<u8>)],
        not: &mut Vec<String>,
        what: &str,
    ) {
        let f = self.as_file_ref();
        set_attrs_fd(&f, st, xattrs, not, what);
    }

    /// Set the owner, mode (not of a symlink), attributes and times of
    /// the entry `name` here, one this process made (a symlink or a node
    /// in its own staging dir): by `*at` calls, never following `name`.
    pub fn set_entry_attrs(
        &self,
        name: &OsStr,
        st: &Stat,
        xattrs: &[(OsString, Vec<u8>)],
        not: &mut Vec<String>,
        what: &str,
    ) {
        let k = kind(st);
        if let Err(e) = nix::unistd::fchownat(
            &self.fd,
            name,
            Some(st.st_uid.into()),
            Some(st.st_gid.into()),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            not.push(format!("{what}: owner {}:{} ({e})", st.st_uid, st.st_gid));
        }
        if k != Kind::Symlink {
            // a node: opened O_PATH (never its device), chmod through it
            let r =
                nix::fcntl::openat(&self.fd, name, OFlag::O_PATH | entry_flags(), Mode::empty())
                    .and_then(|p| {
                        let s = nix::sys::stat::fstat(&p)?;
                        if kind(&s) != k {
                            return Err(Errno::ELOOP);
                        }
                        nix::sys::stat::fchmodat(
                            nix::fcntl::AT_FDCWD,
                            format!("/proc/self/fd/{}", p.as_raw_fd()).as_str(),
                            Mode::from_bits_truncate(mode_bits(st)),
                            nix::sys::stat::FchmodatFlags::FollowSymlink,
                        )
                    });
            if let Err(e) = r {
                not.push(format!("{what}: mode {:o} ({e})", mode_bits(st)));
            }
        }
        for (n, v) in xattrs {
            if let Err(e) = xattr::set(self.proc_path(name), n, v) {
                not.push(format!("{what}: attribute {} ({e})", n.to_string_lossy()));
            }
        }
        use nix::sys::stat::{UtimensatFlags, utimensat};
        use nix::sys::time::TimeSpec;
        if let Err(e) = utimensat(
            &self.fd,
            name,
            &TimeSpec::new(st.st_atime, st.st_atime_nsec),
            &TimeSpec::new(st.st_mtime, st.st_mtime_nsec),
            UtimensatFlags::NoFollowSymlink,
        ) {
            not.push(format!("{what}: times ({e})"));
        }
    }
}

/// An entry that is not (any more) what the caller expects: replaced
/// since the walk, or not a regular file. Told apart from I/O errors by
/// `gone`.
#[derive(Debug)]
struct Changed(String);

impl std::fmt::Display for Changed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Changed {}

fn changed(what: String) -> io::Error {
    io::Error::other(Changed(what))
}

/// Whether `e` says the entry is not there (any more) as expected: removed,
/// a symlink or a non-directory on the way, a mount crossed, a path too
/// long, or `Changed`. A tree a user rearranges while root works on it
/// gives these; the caller leaves that entry for its next pass.
pub fn gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            nix::libc::ENOENT
                | nix::libc::ENOTDIR
                | nix::libc::ELOOP
                | nix::libc::EXDEV
                | nix::libc::ENAMETOOLONG
        )
    ) || e.get_ref().is_some_and(|i| i.is::<Changed>())
}

/// The regular file an `O_PATH` fd holds, opened for reading through that
/// very inode (`/proc/self/fd/N`, never a name again) with `O_NOCTTY |
/// O_NONBLOCK`, after `fstat` said it is a regular file (and, with
/// `want`, the inode the caller saw): a FIFO, socket or device is never
/// opened, no driver's `open` runs, no terminal is taken.
fn reopen_regular(
    p: OwnedFd,
    what: &dyn std::fmt::Display,
    want: Option<&Stat>,
) -> io::Result<(File, Stat)> {
    let st = nix::sys::stat::fstat(&p).map_err(io_err)?;
    if kind(&st) != Kind::File {
        return Err(changed(format!("{what} is not a regular file; not opened")));
    }
    if want.is_some_and(|w| !same(w, &st)) {
        return Err(changed(format!("{what} changed while read")));
    }
    let fd = nix::fcntl::openat(
        nix::fcntl::AT_FDCWD,
        format!("/proc/self/fd/{}", p.as_raw_fd()).as_str(),
        OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(io_err)?;
    let f = File::from(fd);
    let st2 = nix::sys::stat::fstat(&f).map_err(io_err)?;
    if !same(&st, &st2) || kind(&st2) != Kind::File {
        return Err(changed(format!("{what} changed while read")));
    }
    Ok((f, st2))
}

/// `path` (absolute, any path a user can change: a hot file, a hot-set
/// entry from the partition) resolved without following a symlink in any
/// component (mounts are crossed), to an `O_PATH` fd: nothing is opened.
pub fn resolve_path(path: &Path) -> io::Result<OwnedFd> {
    // openat2 refuses flags O_PATH ignores (EINVAL): only these three
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS);
    match nix::fcntl::openat2(nix::fcntl::AT_FDCWD, path, how) {
        Ok(fd) => Ok(fd),
        Err(Errno::ENOSYS) => Err(io::Error::other(
            "this kernel has no openat2 (Linux 5.6 or newer is needed to work safely on users' files)",
        )),
        Err(e) => Err(io_err(e)),
    }
}

/// The regular file at `path` (`resolve_path`), opened for reading as
/// `Dir::open_read` opens one.
pub fn open_regular_path(path: &Path) -> io::Result<(File, Stat)> {
    reopen_regular(resolve_path(path)?, &path.display(), None)
}

fn read_xattrs<L, I, G>(list: L, get: G) -> io::Result<Vec<(OsString, Vec<u8>)>>
where
    L: FnOnce() -> io::Result<I>,
    I: Iterator<Item = OsString>,
    G: Fn(&OsStr) -> io::Result<Option<Vec<u8>>>,
{
    let names = match list() {
        Ok(n) => n,
        // a filesystem without extended attributes has none to lose
        Err(e) if unsupported(&e) => return Ok(vec![]),
        Err(e) => return Err(e),
    };
    let mut out = vec![];
    for n in names {
        match get(&n) {
            Ok(Some(v)) => out.push((n, v)),
            Ok(None) => {}
            Err(e) if unsupported(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

fn unsupported(e: &io::Error) -> bool {
    e.raw_os_error() == Some(nix::libc::EOPNOTSUPP) || e.raw_os_error() == Some(nix::libc::ENODATA)
}

/// The extended attributes of an open file (or dir).
pub fn file_xattrs(f: &File) -> io::Result<Vec<(OsString, Vec<u8>)>> {
    read_xattrs(
        || xattr::FileExt::list_xattr(f),
        |n| xattr::FileExt::get_xattr(f, n),
    )
}

/// Owner, then mode (chown clears set-id bits), then extended attributes
/// (`security.capability` too is cleared by chown), then times, all on
/// the open fd `f`. What cannot be carried is pushed to `not`, never
/// fatal; `what` names the source in those lines.
pub fn set_attrs_fd(
    f: &File,
    st: &Stat,
    xattrs: &[(OsString, Vec<u8>)],
    not: &mut Vec<String>,
    what: &str,
) {
    if let Err(e) = nix::unistd::fchown(f, Some(st.st_uid.into()), Some(st.st_gid.into())) {
        not.push(format!("{what}: owner {}:{} ({e})", st.st_uid, st.st_gid));
    }
    if let Err(e) = nix::sys::stat::fchmod(f, Mode::from_bits_truncate(mode_bits(st))) {
        not.push(format!("{what}: mode {:o} ({e})", mode_bits(st)));
    }
    for (n, v) in xattrs {
        if let Err(e) = xattr::FileExt::set_xattr(f, n, v) {
            not.push(format!("{what}: attribute {} ({e})", n.to_string_lossy()));
        }
    }
    use nix::sys::time::TimeSpec;
    if let Err(e) = nix::sys::stat::futimens(
        f,
        &TimeSpec::new(st.st_atime, st.st_atime_nsec),
        &TimeSpec::new(st.st_mtime, st.st_mtime_nsec),
    ) {
        not.push(format!("{what}: times ({e})"));
    }
}

/// Split `rel` into its parent and last name (`None` for an empty path).
pub fn split(rel: &Path) -> Option<(&Path, &OsStr)> {
    Some((rel.parent().unwrap_or(Path::new("")), rel.file_name()?))
}

/// A lossless text form of a relative path for JSON (names need not be
/// UTF-8): `%` and every byte of a non-UTF-8 sequence as `%XX`.
pub fn encode(rel: &Path) -> String {
    let mut out = String::new();
    for chunk in rel.as_os_str().as_bytes().utf8_chunks() {
        for ch in chunk.valid().chars() {
            if ch == '%' {
                out.push_str("%25");
            } else {
                out.push(ch);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The inverse of `encode`; `None` for text `encode` never makes.
pub fn decode(s: &str) -> Option<PathBuf> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(PathBuf::from(OsStr::from_bytes(&out)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    #[test]
    fn paths_round_trip_through_their_text_form() {
        for raw in [
            &b"a/b"[..],
            b"100%/x",
            b"bad\xff\xfename",
            b"%41",
            b"\xc3\xa9t\xc3\xa9",
        ] {
            let p = PathBuf::from(OsStr::from_bytes(raw));
            let e = encode(&p);
            assert_eq!(decode(&e).unwrap(), p, "{e}");
        }
        assert_eq!(encode(Path::new("%41")), "%2541");
        assert!(decode("%4").is_none());
        assert!(decode("%zz").is_none());
    }

    #[test]
    fn nothing_below_is_reached_through_a_symlink() {
        let t = crate::util::testutil::tmp("safefs-links");
        fs::create_dir_all(t.join("root/a")).unwrap();
        fs::create_dir_all(t.join("outside")).unwrap();
        fs::write(t.join("outside/secret"), "s").unwrap();
        symlink(t.join("outside"), t.join("root/a/l")).unwrap();
        symlink("../..", t.join("root/a/up")).unwrap();
        symlink(t.join("outside/secret"), t.join("root/a/f")).unwrap();
        let r = Dir::open(&t.join("root")).unwrap();
        assert!(r.dir(Path::new("a/l")).is_err(), "followed a symlink");
        assert!(r.dir(Path::new("a/up")).is_err());
        assert!(r.dir(Path::new("a/../..")).is_err(), "left the tree");
        assert!(r.dir(Path::new("/etc")).is_err());
        let a = r.dir(Path::new("a")).unwrap();
        assert!(
            a.open_read(OsStr::new("f"), None).is_err(),
            "read through a symlink"
        );
        assert_eq!(
            a.readlink(OsStr::new("f")).unwrap(),
            t.join("outside/secret")
        );
        // removal takes the links, never what they point at
        r.remove_all(OsStr::new("a")).unwrap();
        assert_eq!(fs::read_to_string(t.join("outside/secret")).unwrap(), "s");
        assert!(Dir::open(&t.join("root/a")).is_err());
        fs::remove_dir_all(&t).unwrap();
    }

    #[test]
    fn a_fifo_is_never_opened_and_a_swapped_file_is_refused() {
        let t = crate::util::testutil::tmp("safefs-fifo");
        nix::unistd::mkfifo(&t.join("fifo"), Mode::from_bits_truncate(0o644)).unwrap();
        fs::write(t.join("f"), "one").unwrap();
        let d = Dir::open(&t).unwrap();
        // would block forever if it were opened for reading
        assert!(d.open_read(OsStr::new("fifo"), None).is_err());
        let seen = d.lstat(OsStr::new("f")).unwrap().unwrap();
        fs::write(t.join("g"), "two").unwrap();
        fs::rename(t.join("g"), t.join("f")).unwrap();
        let e = d.open_read(OsStr::new("f"), Some(&seen)).unwrap_err();
        assert!(e.to_string().contains("changed"), "{e}");
        let (mut f, st) = d.open_read(OsStr::new("f"), None).unwrap();
        let mut s = String::new();
        std::io::Read::read_to_string(&mut f, &mut s).unwrap();
        assert_eq!((s.as_str(), st.st_size), ("two", 3));
        assert!(d.lstat(OsStr::new("none")).unwrap().is_none());
        assert!(d.lstat(OsStr::new("../x")).is_err(), "not a plain name");
        fs::remove_dir_all(&t).unwrap();
    }

    #[test]
    fn a_filesystem_without_attributes_has_none_to_lose() {
        // listxattr failing with EOPNOTSUPP (seen on the real archiso's
        // /home in a RAM session) is an empty list, not a loss
        let unsupported = || -> io::Result<std::vec::IntoIter<OsString>> {
            Err(io::Error::from_raw_os_error(nix::libc::EOPNOTSUPP))
        };
        let none = read_xattrs(unsupported, |_| Ok(None)).unwrap();
        assert!(none.is_empty());
        // but an attribute that exists and cannot be read is an error
        let listed = || -> io::Result<std::vec::IntoIter<OsString>> {
            Ok(vec![OsString::from("user.x")].into_iter())
        };
        assert!(
            read_xattrs(listed, |_| Err(io::Error::from_raw_os_error(
                nix::libc::EIO
            )))
            .is_err()
        );
        let got = read_xattrs(listed, |_| Ok(Some(b"v".to_vec()))).unwrap();
        assert_eq!(got, vec![(OsString::from("user.x"), b"v".to_vec())]);
    }

    #[test]
    fn dirs_are_created_below_without_following() {
        let t = crate::util::testutil::tmp("safefs-create");
        fs::create_dir_all(t.join("root")).unwrap();
        fs::create_dir_all(t.join("outside")).unwrap();
        symlink(t.join("outside"), t.join("root/l")).unwrap();
        let r = Dir::open(&t.join("root")).unwrap();
        r.dir_create(Path::new("x/y/z"), 0o755).unwrap();
        assert!(t.join("root/x/y/z").is_dir());
        assert!(r.dir_create(Path::new("l/new"), 0o755).is_err());
        assert!(!t.join("outside/new").exists());
        fs::remove_dir_all(&t).unwrap();
    }
}
