//! `/proc/self/mountinfo`, parsed: what is mounted where, from which device
//! number. Devices are compared by `dev_t` (major:minor), never by path
//! strings: `/dev/disk/by-id/usb-…` and `/dev/sdb` are the same disk.

use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// major:minor of the filesystem's device (0:N for virtual ones).
    pub dev: (u32, u32),
    pub mountpoint: String,
    pub fstype: String,
    pub source: String,
    /// The superblock options (an overlay's `lowerdir=…,upperdir=…`).
    pub options: String,
}

impl Mount {
    /// The value of option `key` in the superblock options (an overlay's
    /// `upperdir`). Overlay paths escape `,` and `\\` with a backslash.
    pub fn option(&self, key: &str) -> Option<String> {
        let mut out = Vec::new();
        let mut cur = String::new();
        let mut esc = false;
        for c in self.options.chars() {
            match (esc, c) {
                (true, c) => {
                    cur.push(c);
                    esc = false;
                }
                (false, '\\') => esc = true,
                (false, ',') => out.push(std::mem::take(&mut cur)),
                (false, c) => cur.push(c),
            }
        }
        out.push(cur);
        out.into_iter()
            .find_map(|o| o.strip_prefix(&format!("{key}=")).map(String::from))
    }
}

/// Unescape mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parse mountinfo text; malformed lines are skipped.
pub fn parse(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            let (maj, min) = f.get(2)?.split_once(':')?;
            Some(Mount {
                dev: (maj.parse().ok()?, min.parse().ok()?),
                mountpoint: unescape(f.get(4)?),
                fstype: f.get(sep + 1)?.to_string(),
                source: unescape(f.get(sep + 2)?),
                options: unescape(f.get(sep + 3).unwrap_or(&"")),
            })
        })
        .collect()
}

pub fn read() -> Vec<Mount> {
    parse(&std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default())
}

/// The mount at exactly `mountpoint`, the last (topmost) one.
pub fn at<'a>(mounts: &'a [Mount], mountpoint: &str) -> Option<&'a Mount> {
    mounts.iter().rev().find(|m| m.mountpoint == mountpoint)
}

/// major:minor of a block device node (following the path: by-id links
/// name the same device).
pub fn dev_of(path: &Path) -> Option<(u32, u32)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = std::fs::metadata(path).ok()?;
    if !m.file_type().is_block_device() {
        return None;
    }
    let r = m.rdev();
    Some((
        nix::sys::stat::major(r) as u32,
        nix::sys::stat::minor(r) as u32,
    ))
}

/// Whether two paths name the same device: by `dev_t` for block devices
/// (`/dev/disk/by-id/usb-…` and `/dev/sdb` are one disk), by file identity
/// for image files.
pub fn same_device(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (dev_of(a), dev_of(b)) {
        (Some(x), Some(y)) => x == y,
        (None, None) => match (std::fs::metadata(a), std::fs::metadata(b)) {
            (Ok(x), Ok(y)) => (x.dev(), x.ino()) == (y.dev(), y.ino()),
            _ => false,
        },
        _ => false,
    }
}

/// Where the filesystem on device `dev` is mounted, if anywhere.
pub fn mounted(mounts: &[Mount], dev: (u32, u32)) -> Vec<&Mount> {
    mounts.iter().filter(|m| m.dev == dev).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 0:21 / /run rw,nosuid shared:5 - tmpfs run rw,mode=755
30 22 8:1 / /run/archiso/bootmnt ro,relatime shared:9 - iso9660 /dev/sda1 ro
31 22 8:3 / /run/archiso/cowspace rw,relatime shared:10 - ext4 /dev/sda3 rw
32 22 7:0 / /run/archiso/airootfs ro - squashfs /dev/loop0 ro
33 1 0:40 / /new\\040root rw - overlay airootfs rw,lowerdir=x
garbage line
";

    #[test]
    fn parses_by_device_number() {
        let m = parse(SAMPLE);
        assert_eq!(m.len(), 5);
        assert_eq!(at(&m, "/run/archiso/cowspace").unwrap().fstype, "ext4");
        assert_eq!(at(&m, "/run/archiso/cowspace").unwrap().dev, (8, 3));
        assert_eq!(at(&m, "/new root").unwrap().fstype, "overlay");
        assert_eq!(mounted(&m, (8, 1))[0].mountpoint, "/run/archiso/bootmnt");
        assert!(mounted(&m, (8, 2)).is_empty());
        assert!(at(&m, "/nowhere").is_none());
        let root = at(&m, "/new root").unwrap();
        assert_eq!(root.option("lowerdir").as_deref(), Some("x"));
        assert_eq!(root.option("upperdir"), None);
        let o = Mount {
            options: "rw,lowerdir=/a,upperdir=/run/archiso/cowspace/persistent_X/x86_64/upperdir,workdir=/w"
                .into(),
            ..root.clone()
        };
        assert_eq!(
            o.option("upperdir").as_deref(),
            Some("/run/archiso/cowspace/persistent_X/x86_64/upperdir")
        );
    }

    #[test]
    fn the_same_device_under_two_names() {
        let d = std::env::temp_dir().join(format!("mados-samedev-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("img"), "x").unwrap();
        std::fs::write(d.join("other"), "x").unwrap();
        std::os::unix::fs::symlink(d.join("img"), d.join("by-id-link")).unwrap();
        assert!(same_device(&d.join("img"), &d.join("by-id-link")));
        assert!(!same_device(&d.join("img"), &d.join("other")));
        assert!(!same_device(&d.join("img"), &d.join("missing")));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn device_numbers_of_nodes() {
        assert_eq!(
            dev_of(Path::new("/dev/null")),
            None,
            "a char device is not a block device"
        );
        assert_eq!(dev_of(Path::new("/nonexistent")), None);
    }
}
