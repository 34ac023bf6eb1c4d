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
    /// Mount this existing persistence filesystem.
    Use {
        device: String,
        explicit: bool,
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

/// The device holding the live ISO. `bootmnt` is the source device of
/// archiso's boot mount if one is mounted.
pub fn find_iso<'a>(
    devs: &'a [Probed],
    s: &Settings,
    bootmnt: Option<&str>,
) -> Result<&'a Probed, Reason> {
    let pick = |f: &dyn Fn(&Probed) -> bool| -> Option<&'a Probed> {
        // prefer the whole disk over partition 1 when both carry the ISO
        devs.iter()
            .filter(|p| f(p))
            .min_by_key(|p| p.dev.partition.is_some())
    };
    // What the initramfs actually mounted is the ground truth: the same
    // ISO may be on a CD and on a stick at once.
    if let Some(src) = bootmnt {
        let name = src.trim_start_matches("/dev/");
        if let Some(p) = pick(&|p| p.dev.name == name) {
            return Ok(p);
        }
    }
    if let Some(spec) = &s.iso_device {
        return pick(&|p| matches_spec(p, spec)).ok_or_else(|| {
            Reason::new(
                "no_boot_device",
                format!("archisodevice={spec:?} matches no block device"),
            )
        });
    }
    if let Some(uuid) = &s.iso_uuid {
        return pick(&|p| is_iso(p) && p.fs.as_ref().and_then(|f| f.uuid()) == Some(uuid.as_str()))
            .ok_or_else(|| {
                Reason::new(
                    "no_boot_device",
                    format!("no ISO 9660 volume has the UUID {uuid} (archisosearchuuid=)"),
                )
            });
    }
    if let Some(label) = &s.iso_label {
        return pick(&|p| is_iso(p) && p.fs.as_ref().is_some_and(|f| f.label() == label))
            .ok_or_else(|| {
                Reason::new(
                    "no_boot_device",
                    format!("no ISO 9660 volume is labelled {label}"),
                )
            });
    }
    let isos: Vec<&Probed> = devs.iter().filter(|p| is_iso(p)).collect();
    let disks: std::collections::BTreeSet<&str> = isos.iter().map(|p| p.dev.disk_name()).collect();
    match disks.len() {
        0 => Err(Reason::new(
            "no_boot_device",
            "no ISO 9660 volume found on any block device",
        )),
        1 => Ok(pick(&|p| is_iso(p)).unwrap()),
        _ => Err(Reason::new(
            "no_boot_device",
            format!(
                "several disks carry an ISO 9660 volume ({}); name one with archisolabel= or archisosearchuuid=",
                disks.into_iter().collect::<Vec<_>>().join(", ")
            ),
        )),
    }
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
        return match devs.iter().find(|p| matches_spec(p, spec)) {
            Some(p) => (
                Decision::Use {
                    device: p.dev.name.clone(),
                    explicit: true,
                },
                warnings,
            ),
            None => (
                Decision::Ram {
                    reason: Reason::new(
                        "no_device",
                        format!("cow_device={spec:?} matches no block device"),
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
    let labelled = |p: &&Probed| matches!(&p.fs, Some(Fs::Ext4(e)) if e.label == s.label);
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
    match mine.as_slice() {
        [one] => (
            Decision::Use {
                device: one.dev.name.clone(),
                explicit: false,
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
            group: 0,
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
        assert!(
            find_iso(&devs, &s, None)
                .unwrap_err()
                .message
                .contains("several disks")
        );
        assert_eq!(
            find_iso(&devs, &s, Some("/dev/sr0")).unwrap().dev.name,
            "sr0"
        );
        // the boot mount wins over a label both carry
        let s = Settings {
            iso_label: Some("MADOS".into()),
            ..Default::default()
        };
        devs.push(dev("sr1", None, iso("MADOS")));
        assert_eq!(
            find_iso(&devs, &s, Some("/dev/sr1")).unwrap().dev.name,
            "sr1"
        );
        assert_eq!(find_iso(&devs, &s, None).unwrap().dev.name, "sda");
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

    #[test]
    fn existing_partition_on_the_stick_is_used() {
        let mut devs = stick();
        devs.push(dev("sda3", Some("sda"), ext4("persistence")));
        let (d, _) = decide(&Settings::default(), &devs, Ok((&devs[0], &DiskKind::Usb)));
        assert_eq!(
            d,
            Decision::Use {
                device: "sda3".into(),
                explicit: false
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
                explicit: true
            }
        );
    }
}
