//! Which device did we boot from, what is it, and may persistence be used
//! there? Pure decisions over devices already probed.

use crate::disk::superblock::Fs;
use crate::disk::sysfs::{BlockDev, DiskKind};
use crate::settings::cmdline::{DeviceSpec, Mode};
use crate::settings::config::Settings;
use serde::Serialize;

/// A block device and the filesystem found on it, if any.
#[derive(Debug, Clone, Serialize)]
pub struct Probed {
    pub dev: BlockDev,
    pub fs: Option<Fs>,
}

/// Why a boot runs in RAM mode: a stable code for scripts, a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Reason {
    pub code: String,
    pub message: String,
}

impl Reason {
    pub fn new(code: &str, message: impl Into<String>) -> Reason {
        Reason {
            code: code.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Decision {
    /// Mount this existing persistence filesystem; `read_only`: the
    /// device or its disk is write-protected, so it is mounted read-only
    /// under RAM uppers and nothing is written to it.
    Use {
        device: String,
        explicit: bool,
        #[serde(default)]
        read_only: bool,
    },
    /// Create a persistence partition on this disk.
    Create {
        disk: String,
    },
    Ram {
        reason: Reason,
    },
}

fn matches_spec(p: &Probed, spec: &DeviceSpec) -> bool {
    match spec {
        DeviceSpec::Path(path) => {
            p.dev.dev_path().to_string_lossy() == *path
                || path.strip_prefix("/dev/") == Some(&p.dev.name)
        }
        DeviceSpec::Label(l) => p.fs.as_ref().is_some_and(|f| f.label() == l),
        DeviceSpec::Uuid(u) => {
            p.fs.as_ref()
                .and_then(|f| f.uuid())
                .is_some_and(|x| x.eq_ignore_ascii_case(u))
        }
    }
}

fn is_iso(p: &Probed) -> bool {
    matches!(p.fs, Some(Fs::Iso9660(_)))
}

/// The ISO 9660 build a device carries: (label, uuid).
fn build_of(p: &Probed) -> Option<(&str, &str)> {
    match &p.fs {
        Some(Fs::Iso9660(i)) => Some((i.label.as_str(), i.uuid.as_str())),
        _ => None,
    }
}

/// The device holding the live ISO. `bootmnt` is the source device of
/// the initramfs' boot mount (archiso's bootmnt, dracut's live mount).
///
/// Ambiguity is refused, not guessed: the candidates are every device that
/// carries the same ISO build as the boot mount (or matches the name the
/// command line gives, or every ISO when none is given), and when they lie
/// on more than one disk the answer is `ambiguous`, naming them. The real
/// archiso hook finds its ISO by label through udev, so with a CD and a
/// stick of the same release it may mount the stick's copy although the
/// firmware booted the CD: nothing on either may be written then.
pub fn find_iso<'a>(
    devs: &'a [Probed],
    s: &Settings,
    bootmnt: Option<&str>,
) -> Result<&'a Probed, Reason> {
    let mounted = bootmnt.and_then(|src| {
        let name = src.trim_start_matches("/dev/");
        devs.iter().find(|p| p.dev.name == name)
    });
    let (candidates, what): (Vec<&Probed>, String) = if let Some(m) = mounted {
        match build_of(m) {
            Some(b) => (
                devs.iter().filter(|p| build_of(p) == Some(b)).collect(),
                format!("the ISO build {} ({})", b.0, b.1),
            ),
            // mounted, but no ISO 9660 superblock seen: it alone
            None => (vec![m], String::new()),
        }
    } else if let Some(spec) = &s.iso_device {
        (
            devs.iter().filter(|p| matches_spec(p, spec)).collect(),
            format!("archisodevice={spec:?}"),
        )
    } else if let Some(uuid) = &s.iso_uuid {
        (
            devs.iter()
                .filter(|p| build_of(p).is_some_and(|b| b.1 == uuid))
                .collect(),
            format!("the ISO 9660 UUID {uuid} (archisosearchuuid=)"),
        )
    } else if let Some(label) = &s.iso_label {
        (
            devs.iter()
                .filter(|p| build_of(p).is_some_and(|b| b.0 == label))
                .collect(),
            format!("the ISO 9660 label {label}"),
        )
    } else {
        (
            devs.iter().filter(|p| is_iso(p)).collect(),
            "an ISO 9660 volume".into(),
        )
    };
    let disks: std::collections::BTreeSet<&str> =
        candidates.iter().map(|p| p.dev.disk_name()).collect();
    match disks.len() {
        0 => Err(Reason::new(
            "no_boot_device",
            format!("no block device carries {what}"),
        )),
        // prefer the device the initramfs mounted, else the whole disk
        // over partition 1 when both carry the ISO
        1 => Ok(mounted.unwrap_or_else(|| {
            candidates
                .iter()
                .min_by_key(|p| p.dev.partition.is_some())
                .expect("one candidate")
        })),
        _ => Err(Reason::new(
            "ambiguous",
            format!(
                "{what} is on several disks ({}); not knowing which one was booted, nothing is written \
                 to any of them (detach the others, or name the ISO with archisosearchuuid=)",
                candidates
                    .iter()
                    .map(|p| p.dev.dev_path().display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

/// The device `p`, or the disk it is on, is write-protected (sysfs `ro`,
/// or `BLKROGET` as the boot's probe ORs in): a lock switch, an SD
/// card's lock, a read-only device.
pub fn write_protected(devs: &[Probed], p: &Probed) -> bool {
    p.dev.read_only
        || devs
            .iter()
            .any(|d| d.dev.name == p.dev.disk_name() && d.dev.read_only)
}

/// Why nothing is created on a write-protected disk.
fn read_only_reason(disk: &str) -> Reason {
    Reason::new(
        "read_only",
        format!(
            "/dev/{disk} is write-protected (a lock switch, an SD card's lock, or a read-only device): \
             nothing is written to it, no persistence partition is created; changes are kept in RAM"
        ),
    )
}

/// Whether persistence may be used on a boot disk of this kind.
pub fn kind_allows(kind: &DiskKind, mode: Mode) -> Result<(), Reason> {
    match kind {
        DiskKind::Usb => Ok(()),
        DiskKind::Optical => Err(Reason::new(
            "optical",
            "booted from a CD/DVD, which cannot hold persistence",
        )),
        DiskKind::IsoFile { backing } => Err(Reason::new(
            "iso_file",
            format!(
                "booted from an ISO file ({backing}); write the ISO to a USB stick to use persistence"
            ),
        )),
        _ if mode == Mode::Force => Ok(()),
        k => Err(Reason::new(
            "not_usb",
            format!(
                "booted from a {}; persistence is only used on USB sticks (mados.persistence=force allows it)",
                k.describe()
            ),
        )),
    }
}

/// The boot's decision. `devs` are all probed devices; `iso` the one the
/// ISO was found on and `kind` its disk's kind. Labelled filesystems on
/// other disks are ignored (a stranger's stick must not inject /etc); they
/// are returned as warnings.
pub fn decide(
    s: &Settings,
    devs: &[Probed],
    iso: Result<(&Probed, &DiskKind), Reason>,
) -> (Decision, Vec<String>) {
    let mut warnings = Vec::new();
    if s.mode == Mode::Off {
        return (
            Decision::Ram {
                reason: Reason::new("off", "persistence is turned off (mados.persistence=off)"),
            },
            warnings,
        );
    }
    if let Some(spec) = &s.cow_device {
        let found: Vec<&Probed> = devs.iter().filter(|p| matches_spec(p, spec)).collect();
        if found.len() > 1 {
            return (
                Decision::Ram {
                    reason: Reason::new(
                        "ambiguous",
                        format!(
                            "mados.persistence.device={spec:?} matches several devices ({}); refusing to guess",
                            found
                                .iter()
                                .map(|p| p.dev.dev_path().display().to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ),
                },
                warnings,
            );
        }
        return match found.first() {
            Some(p) => (
                Decision::Use {
                    device: p.dev.name.clone(),
                    explicit: true,
                    read_only: write_protected(devs, p),
                },
                warnings,
            ),
            None => (
                Decision::Ram {
                    reason: Reason::new(
                        "no_device",
                        format!("mados.persistence.device={spec:?} matches no block device"),
                    ),
                },
                warnings,
            ),
        };
    }
    let (iso, kind) = match iso {
        Ok(x) => x,
        Err(r) => return (Decision::Ram { reason: r }, warnings),
    };
    let disk = iso.dev.disk_name().to_string();
    // an ext4 filesystem, or a LUKS2 volume (encrypted persistence, by
    // its header's label), labelled as the settings say
    let labelled = |p: &&Probed| {
        matches!(&p.fs, Some(Fs::Ext4(e)) if e.label == s.label)
            || matches!(&p.fs, Some(Fs::Luks2(h)) if h.label == s.label)
    };
    for p in devs
        .iter()
        .filter(labelled)
        .filter(|p| p.dev.disk_name() != disk)
    {
        warnings.push(format!(
            "ignoring {} labelled '{}': it is not on the boot device {disk}",
            p.dev.dev_path().display(),
            s.label
        ));
    }
    if let Err(r) = kind_allows(kind, s.mode) {
        return (Decision::Ram { reason: r }, warnings);
    }
    let mine: Vec<&Probed> = devs
        .iter()
        .filter(labelled)
        .filter(|p| p.dev.parent.as_deref() == Some(disk.as_str()))
        .collect();
    let disk_ro = devs.iter().any(|d| d.dev.name == disk && d.dev.read_only);
    match mine.as_slice() {
        [one] => (
            Decision::Use {
                device: one.dev.name.clone(),
                explicit: false,
                read_only: write_protected(devs, one),
            },
            warnings,
        ),
        // before `nocreate`: the stick's state is what the user needs to know
        [] if disk_ro => (
            Decision::Ram {
                reason: read_only_reason(&disk),
            },
            warnings,
        ),
        [] if s.mode == Mode::Nocreate => (
            Decision::Ram {
                reason: Reason::new(
                    "nocreate",
                    format!(
                        "no '{}' partition on {disk} and creating one is off (nocreate)",
                        s.label
                    ),
                ),
            },
            warnings,
        ),
        [] => (Decision::Create { disk }, warnings),
        many => (
            Decision::Ram {
                reason: Reason::new(
                    "ambiguous",
                    format!(
                        "{} partitions on {disk} are labelled '{}' ({}); refusing to guess",
                        many.len(),
                        s.label,
                        many.iter()
                            .map(|p| p.dev.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ),
            },
            warnings,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::superblock::{Ext4Info, IsoInfo};

    fn dev(name: &str, parent: Option<&str>, fs: Option<Fs>) -> Probed {
        Probed {
            dev: BlockDev {
                name: name.into(),
                parent: parent.map(String::from),
                partition: parent.map(|_| name.chars().last().unwrap().to_digit(10).unwrap()),
                start: 0,
                size: 1 << 30,
                removable: true,
                read_only: false,
                devnum: (8, 0),
                holders: vec![],
            },
            fs,
        }
    }
    fn iso(label: &str) -> Option<Fs> {
        Some(Fs::Iso9660(IsoInfo {
            label: label.into(),
            uuid: "2026-11-22-22-55-41-00".into(),
            size: 1 << 20,
        }))
    }
    fn ext4(label: &str) -> Option<Fs> {
        Some(Fs::Ext4(Ext4Info {
            label: label.into(),
            uuid: "u".into(),
            block_size: 4096,
            blocks: 1,
            free_blocks: 1,
            has_journal: true,
            clean: true,
            needs_recovery: false,
            group: 0,
            wear: Default::default(),
        }))
    }

    fn stick() -> Vec<Probed> {
        vec![
            dev("sda", None, iso("MADOS")),
            dev("sda1", Some("sda"), iso("MADOS")),
            dev("sda2", Some("sda"), None),
            dev("vda", None, None),
            dev("vda1", Some("vda"), ext4("persistence")),
        ]
    }

    #[test]
    fn finds_the_iso_by_uuid_label_or_alone() {
        let devs = stick();
        let mut s = Settings::default();
        assert_eq!(find_iso(&devs, &s, None).unwrap().dev.name, "sda");
        s.iso_uuid = Some("2026-11-22-22-55-41-00".into());
        assert_eq!(find_iso(&devs, &s, None).unwrap().dev.name, "sda");
        s.iso_uuid = Some("1999-01-01-00-00-00-00".into());
        assert_eq!(
            find_iso(&devs, &s, None).unwrap_err().code,
            "no_boot_device"
        );
        s.iso_uuid = None;
        s.iso_label = Some("OTHER".into());
        assert!(
            find_iso(&devs, &s, None)
                .unwrap_err()
                .message
                .contains("OTHER")
        );
        s.iso_label = None;
        s.iso_device = Some(DeviceSpec::Path("/dev/sda1".into()));
        assert_eq!(find_iso(&devs, &s, None).unwrap().dev.name, "sda1");
    }

    #[test]
    fn two_isos_need_a_name() {
        let mut devs = stick();
        devs.push(dev("sr0", None, iso("OTHER")));
        let s = Settings::default();
        let e = find_iso(&devs, &s, None).unwrap_err();
        assert_eq!(e.code, "ambiguous");
        assert!(
            e.message.contains("/dev/sr0") && e.message.contains("/dev/sda"),
            "{}",
            e.message
        );
        // the boot mount names another build: that one
        assert_eq!(
            find_iso(&devs, &s, Some("/dev/sr0")).unwrap().dev.name,
            "sr0"
        );
        let s = Settings {
            iso_label: Some("OTHER".into()),
            ..Default::default()
        };
        assert_eq!(find_iso(&devs, &s, None).unwrap().dev.name, "sr0");
    }

    #[test]
    fn the_same_build_on_two_disks_is_ambiguous_even_with_a_boot_mount() {
        // a CD and a stick of the same release: archiso mounted the stick's
        // copy, but the firmware may have booted the CD
        let mut devs = stick();
        devs.push(dev("sr1", None, iso("MADOS")));
        for bootmnt in [Some("/dev/sda1"), Some("/dev/sr1"), None] {
            let e = find_iso(&devs, &Settings::default(), bootmnt).unwrap_err();
            assert_eq!(e.code, "ambiguous", "{bootmnt:?}");
            assert!(e.message.contains("/dev/sr1"), "{}", e.message);
        }
        let s = Settings {
            iso_label: Some("MADOS".into()),
            ..Default::default()
        };
        assert_eq!(find_iso(&devs, &s, None).unwrap_err().code, "ambiguous");
        // a LABEL= device spec matching several is refused the same way
        let s = Settings {
            iso_device: Some(DeviceSpec::Label("MADOS".into())),
            ..Default::default()
        };
        assert_eq!(find_iso(&devs, &s, None).unwrap_err().code, "ambiguous");
        // ... and one on the boot disk only is fine
        devs.pop();
        assert_eq!(
            find_iso(&devs, &s, Some("/dev/sda1")).unwrap().dev.name,
            "sda1"
        );
    }

    #[test]
    fn usb_without_persistence_creates_and_ignores_other_disks() {
        let devs = stick();
        let s = Settings::default();
        let (d, w) = decide(&s, &devs, Ok((&devs[0], &DiskKind::Usb)));
        assert_eq!(d, Decision::Create { disk: "sda".into() });
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("ignoring /dev/vda1"), "{w:?}");
    }

    fn luks(label: &str) -> Option<Fs> {
        Some(Fs::Luks2(crate::disk::luks::Luks2Header {
            label: label.into(),
            uuid: "u".into(),
            hdr_size: 16384,
            seqid: 1,
            secondary: false,
        }))
    }

    #[test]
    fn an_encrypted_persistence_is_used_never_created_beside() {
        let mut devs = stick();
        devs.push(dev("sda3", Some("sda"), luks("persistence")));
        let (d, _) = decide(&Settings::default(), &devs, Ok((&devs[0], &DiskKind::Usb)));
        assert_eq!(
            d,
            Decision::Use {
                device: "sda3".into(),
                explicit: false,
                read_only: false
            }
        );
        // another label: not ours, so creation goes on as before
        let mut devs = stick();
        devs.push(dev("sda3", Some("sda"), luks("vault")));
        let (d, _) = decide(&Settings::default(), &devs, Ok((&devs[0], &DiskKind::Usb)));
        assert_eq!(d, Decision::Create { disk: "sda".into() });
        // a clear and an encrypted one: which? refused
        let mut devs = stick();
        devs.push(dev("sda3", Some("sda"), luks("persistence")));
        devs.push(dev("sda4", Some("sda"), ext4("persistence")));
        let (d, _) = decide(&Settings::default(), &devs, Ok((&devs[0], &DiskKind::Usb)));
        assert!(matches!(d, Decision::Ram { reason } if reason.code == "ambiguous"));
        // on another disk: ignored with a warning
        let mut devs = stick();
        devs.push(dev("sdb", None, None));
        devs.push(dev("sdb1", Some("sdb"), luks("persistence")));
        let (d, w) = decide(&Settings::default(), &devs, Ok((&devs[0], &DiskKind::Usb)));
        assert_eq!(d, Decision::Create { disk: "sda".into() });
        assert!(w.iter().any(|w| w.contains("sdb1")), "{w:?}");
    }

    #[test]
    fn existing_partition_on_the_stick_is_used() {
        let mut devs = stick();
        devs.push(dev("sda3", Some("sda"), ext4("persistence")));
        let (d, _) = decide(&Settings::default(), &devs, Ok((&devs[0], &DiskKind::Usb)));
        assert_eq!(
            d,
            Decision::Use {
                device: "sda3".into(),
                explicit: false,
                read_only: false
            }
        );
        let s = Settings {
            mode: Mode::Off,
            ..Default::default()
        };
        assert!(
            matches!(decide(&s, &devs, Ok((&devs[0], &DiskKind::Usb))).0, Decision::Ram { reason } if reason.code == "off")
        );
    }

    #[test]
    fn media_kinds() {
        let devs = stick();
        let s = Settings::default();
        let ram = |k: DiskKind, s: &Settings| match decide(s, &devs, Ok((&devs[0], &k))).0 {
            Decision::Ram { reason } => reason.code,
            d => panic!("{d:?}"),
        };
        assert_eq!(ram(DiskKind::Optical, &s), "optical");
        assert_eq!(
            ram(
                DiskKind::IsoFile {
                    backing: "/a.iso".into()
                },
                &s
            ),
            "iso_file"
        );
        assert_eq!(
            ram(
                DiskKind::Internal {
                    bus: "virtio".into()
                },
                &s
            ),
            "not_usb"
        );
        let force = Settings {
            mode: Mode::Force,
            ..Default::default()
        };
        assert!(matches!(
            decide(
                &force,
                &devs,
                Ok((
                    &devs[0],
                    &DiskKind::Internal {
                        bus: "virtio".into()
                    }
                ))
            )
            .0,
            Decision::Create { .. }
        ));
        assert_eq!(ram(DiskKind::Optical, &force), "optical");
        let noc = Settings {
            mode: Mode::Nocreate,
            ..Default::default()
        };
        assert_eq!(ram(DiskKind::Usb, &noc), "nocreate");
    }

    #[test]
    fn an_explicit_device_matching_two_is_refused() {
        let mut devs = stick();
        devs.push(dev("sdb1", Some("sdb"), ext4("persistence")));
        let s = Settings {
            cow_device: Some(DeviceSpec::Label("persistence".into())),
            ..Default::default()
        };
        let (d, _) = decide(&s, &devs, Err(Reason::new("x", "y")));
        match d {
            Decision::Ram { reason } => assert_eq!(reason.code, "ambiguous"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn explicit_cow_device_is_trusted() {
        let devs = stick();
        let s = Settings {
            cow_device: Some(DeviceSpec::Label("persistence".into())),
            ..Default::default()
        };
        let (d, _) = decide(&s, &devs, Err(Reason::new("no_boot_device", "x")));
        assert_eq!(
            d,
            Decision::Use {
                device: "vda1".into(),
                explicit: true,
                read_only: false
            }
        );
    }

    #[test]
    fn a_write_protected_stick_is_used_read_only_and_never_created_on() {
        let ro = |mut devs: Vec<Probed>, name: &str| {
            devs.iter_mut()
                .filter(|p| p.dev.name == name)
                .for_each(|p| p.dev.read_only = true);
            devs
        };
        let s = Settings::default();
        // the disk locked: no partition is created, RAM mode says why
        let devs = ro(stick(), "sda");
        match decide(&s, &devs, Ok((&devs[0], &DiskKind::Usb))).0 {
            Decision::Ram { reason } => {
                assert_eq!(reason.code, "read_only");
                assert!(
                    reason.message.contains("/dev/sda is write-protected"),
                    "{}",
                    reason.message
                );
            }
            d => panic!("{d:?}"),
        }
        // ... also with nocreate, and found from the ISO's partition
        let noc = Settings {
            mode: Mode::Nocreate,
            ..Default::default()
        };
        match decide(&noc, &devs, Ok((&devs[1], &DiskKind::Usb))).0 {
            Decision::Ram { reason } => assert_eq!(reason.code, "read_only"),
            d => panic!("{d:?}"),
        }
        // an existing persistence on a locked disk: used read-only
        let mut with = stick();
        with.push(dev("sda3", Some("sda"), ext4("persistence")));
        let devs = ro(with.clone(), "sda");
        assert_eq!(
            decide(&s, &devs, Ok((&devs[0], &DiskKind::Usb))).0,
            Decision::Use {
                device: "sda3".into(),
                explicit: false,
                read_only: true
            }
        );
        // only the partition read-only (BLKROSET on it): the same
        let devs = ro(with.clone(), "sda3");
        assert!(matches!(
            decide(&s, &devs, Ok((&devs[0], &DiskKind::Usb))).0,
            Decision::Use {
                read_only: true,
                ..
            }
        ));
        // only another partition read-only: not this one's business
        let devs = ro(with, "sda1");
        assert!(matches!(
            decide(&s, &devs, Ok((&devs[0], &DiskKind::Usb))).0,
            Decision::Use {
                read_only: false,
                ..
            }
        ));
        // an explicit device on a locked disk: read-only too
        let mut devs = stick();
        devs.push(dev("sdb", None, None));
        devs.push(dev("sdb1", Some("sdb"), ext4("mine")));
        let devs = ro(devs, "sdb");
        let s = Settings {
            cow_device: Some(DeviceSpec::Label("mine".into())),
            ..Default::default()
        };
        assert!(matches!(
            decide(&s, &devs, Err(Reason::new("no_boot_device", "x"))).0,
            Decision::Use {
                read_only: true,
                explicit: true,
                ..
            }
        ));
    }
}
