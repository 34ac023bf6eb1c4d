//! The kernel command line: split it the way the kernel does and turn the
//! parameters we honour into typed values. Bad values never fail the boot:
//! they become warnings naming the parameter and the default kept.

use crate::settings::size::Size;
use serde::Serialize;

/// `mados.persistence=`: what the boot may do with persistence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Use persistence on a USB boot stick; create it when there is room.
    #[default]
    Auto,
    /// RAM only.
    Off,
    /// Use an existing persistence partition, never create one.
    Nocreate,
    /// Like auto, and also on non-USB boot disks (VM disks).
    Force,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        Some(match s {
            "auto" | "on" | "1" | "yes" => Mode::Auto,
            "off" | "0" | "no" => Mode::Off,
            "nocreate" => Mode::Nocreate,
            "force" => Mode::Force,
            _ => return None,
        })
    }
}

/// ext4 data journaling mode for the persistence mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DataMode {
    #[default]
    Ordered,
    Writeback,
}

/// How the user named a device (`mados.persistence.device=`, `archisodevice=`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "by", content = "value")]
pub enum DeviceSpec {
    Path(String),
    Label(String),
    Uuid(String),
}

impl DeviceSpec {
    pub fn parse(s: &str) -> DeviceSpec {
        if let Some(l) = s.strip_prefix("LABEL=") {
            DeviceSpec::Label(l.to_string())
        } else if let Some(u) = s.strip_prefix("UUID=") {
            DeviceSpec::Uuid(u.to_string())
        } else if let Some(l) = s.strip_prefix("/dev/disk/by-label/") {
            DeviceSpec::Label(l.to_string())
        } else if let Some(u) = s.strip_prefix("/dev/disk/by-uuid/") {
            DeviceSpec::Uuid(u.to_string())
        } else {
            DeviceSpec::Path(s.to_string())
        }
    }
}

/// Everything we read from the kernel command line. `None` means "not
/// given": the config file or the built-in default decides.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BootParams {
    pub cow_spacesize: Option<Size>,
    /// `mados.persistence.label=`: our partition's filesystem label.
    pub label: Option<String>,
    /// `mados.persistence.device=`: use this device, never create.
    pub device: Option<DeviceSpec>,
    /// archiso's own persistence (`cow_label=` / `cow_device=`, the word as
    /// given): archiso mounts that filesystem itself, so we stand down.
    pub archiso_cow: Option<String>,
    pub archisolabel: Option<String>,
    pub archisosearchuuid: Option<String>,
    pub archisodevice: Option<DeviceSpec>,
    /// dracut's `root=live:CDLABEL=…` names the ISO the same way.
    pub live_label: Option<String>,
    pub mode: Option<Mode>,
    pub max_size: Option<Size>,
    pub data_mode: Option<DataMode>,
    /// `mados.persistence.encrypt=yes`: a persistence partition created
    /// at this boot is encrypted (it can only ask for it, never turn off
    /// what the ISO's config asks).
    pub encrypt: bool,
    /// `mados.persistence.test_pbkdf=MEMKIB:ITER`: tests only (argon2id
    /// under QEMU TCG); never a default.
    pub test_pbkdf: Option<String>,
    pub debug: bool,
    /// `mados.tier=off`: no RAM tier this boot (`on` is the default).
    pub tier_off: bool,
    /// `mados.usercache=off`: each user's `~/.cache` stays on the
    /// partition this boot.
    pub usercache_off: bool,
    /// `mados.pin=off`: the daemon pins nothing this boot.
    pub pin_off: bool,
    /// `mados.prefetch=off`: the daemon reads no hot set ahead this boot.
    pub prefetch_off: bool,
    pub warnings: Vec<String>,
}

/// Split like the kernel does: whitespace separates, double quotes group.
pub fn split(cmdline: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

pub fn parse(cmdline: &str) -> BootParams {
    let mut p = BootParams::default();
    for word in split(cmdline) {
        let (key, val) = match word.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (word.as_str(), None),
        };
        let need = |p: &mut BootParams| -> Option<String> {
            match val {
                Some(v) if !v.is_empty() => Some(v.to_string()),
                _ => {
                    p.warnings
                        .push(format!("kernel parameter '{key}' needs a value; ignored"));
                    None
                }
            }
        };
        match key {
            "cow_spacesize" => {
                if let Some(v) = need(&mut p) {
                    match Size::parse(&v) {
                        Ok(s) => p.cow_spacesize = Some(s),
                        Err(e) => p
                            .warnings
                            .push(format!("cow_spacesize={v}: {e}; using the default")),
                    }
                }
            }
            // archiso's own parameters keep archiso's meaning
            "cow_label" | "cow_device" if val.is_some_and(|v| !v.is_empty()) => {
                p.archiso_cow = Some(word.clone())
            }
            "mados.persistence.label" => {
                if let Some(v) = need(&mut p) {
                    if v.len() > 16 {
                        // mke2fs would cut it, and later boots would not find it
                        p.warnings.push(format!(
                            "mados.persistence.label={v}: an ext4 label holds at most 16 bytes; using the default"
                        ));
                    } else {
                        p.label = Some(v);
                    }
                }
            }
            "mados.persistence.device" => p.device = need(&mut p).map(|v| DeviceSpec::parse(&v)),
            "archisolabel" => p.archisolabel = need(&mut p),
            "archisosearchuuid" => p.archisosearchuuid = need(&mut p),
            "archisodevice" => p.archisodevice = need(&mut p).map(|v| DeviceSpec::parse(&v)),
            "root" => {
                if let Some(l) = val.and_then(|v| v.strip_prefix("live:CDLABEL=")) {
                    p.live_label = Some(l.to_string());
                } else if let Some(l) = val.and_then(|v| v.strip_prefix("live:LABEL=")) {
                    p.live_label = Some(l.to_string());
                }
            }
            "mados.persistence" => {
                if let Some(v) = need(&mut p) {
                    match Mode::parse(&v) {
                        Some(m) => p.mode = Some(m),
                        None => p.warnings.push(format!(
                            "mados.persistence={v}: expected auto, off, nocreate or force; using auto"
                        )),
                    }
                }
            }
            "mados.persistence.size" => {
                if let Some(v) = need(&mut p) {
                    match Size::parse(&v) {
                        Ok(Size::Percent(_)) => p.warnings.push(format!(
                            "mados.persistence.size={v}: give an absolute size such as 8G; no cap used"
                        )),
                        Ok(s) => p.max_size = Some(s),
                        Err(e) => p
                            .warnings
                            .push(format!("mados.persistence.size={v}: {e}; no cap used")),
                    }
                }
            }
            "mados.persistence.data" => {
                if let Some(v) = need(&mut p) {
                    match v.as_str() {
                        "ordered" => p.data_mode = Some(DataMode::Ordered),
                        "writeback" => p.data_mode = Some(DataMode::Writeback),
                        _ => p.warnings.push(format!(
                            "mados.persistence.data={v}: expected ordered or writeback; using ordered"
                        )),
                    }
                }
            }
            "mados.persistence.encrypt" => match val {
                Some("yes" | "1" | "on") => p.encrypt = true,
                _ => p.warnings.push(format!(
                    "{word}: expected mados.persistence.encrypt=yes (encryption the ISO asks for cannot be \
                     turned off here); ignored"
                )),
            },
            "mados.persistence.test_pbkdf" => {
                if let Some(v) = need(&mut p) {
                    p.test_pbkdf = Some(v);
                }
            }
            "mados.tier" | "mados.usercache" | "mados.pin" | "mados.prefetch" => {
                let off = match val {
                    Some("off" | "0" | "no") => true,
                    Some("on" | "1" | "yes") => false,
                    _ => {
                        p.warnings
                            .push(format!("{word}: expected {key}=off or on; ignored"));
                        continue;
                    }
                };
                match key {
                    "mados.tier" => p.tier_off = off,
                    "mados.pin" => p.pin_off = off,
                    "mados.prefetch" => p.prefetch_off = off,
                    _ => p.usercache_off = off,
                }
            }
            "mados.debug" => p.debug = !matches!(val, Some("0" | "off" | "no")),
            k if k.starts_with("mados.") => p
                .warnings
                .push(format!("unknown kernel parameter '{word}'; ignored")),
            _ => {}
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encrypt_can_be_asked_for_not_turned_off() {
        assert!(parse("mados.persistence.encrypt=yes").encrypt);
        let p = parse("mados.persistence.encrypt=no");
        assert!(!p.encrypt);
        assert!(
            p.warnings[0].contains("cannot be turned off"),
            "{:?}",
            p.warnings
        );
        assert!(!parse("quiet").encrypt);
        assert_eq!(
            parse("mados.persistence.test_pbkdf=65536:4")
                .test_pbkdf
                .as_deref(),
            Some("65536:4")
        );
    }

    #[test]
    fn tier_switch() {
        assert!(parse("mados.tier=off").tier_off);
        assert!(!parse("mados.tier=on").tier_off);
        assert!(parse("mados.usercache=off").usercache_off);
        assert!(parse("mados.pin=off").pin_off);
        assert!(!parse("mados.pin=on").pin_off);
        assert!(!parse("mados.pin=off").usercache_off);
        assert!(!parse("mados.usercache=off").tier_off);
        assert!(parse("mados.usercache=bad").warnings[0].contains("mados.usercache=off or on"));
        let p = parse("mados.tier=sometimes");
        assert!(!p.tier_off);
        assert_eq!(p.warnings.len(), 1);
    }

    #[test]
    fn splits_with_quotes() {
        assert_eq!(
            split(" a=1  b=\"x y\" c\n"),
            vec!["a=1".to_string(), "b=x y".into(), "c".into()]
        );
        assert!(split("   ").is_empty());
    }

    #[test]
    fn archiso_style_line() {
        let p = parse(
            "BOOT_IMAGE=/arch/boot/x86_64/vmlinuz-linux archisobasedir=arch \
             archisosearchuuid=2026-11-22-22-55-41-00 cow_spacesize=1G quiet",
        );
        assert_eq!(
            p.archisosearchuuid.as_deref(),
            Some("2026-11-22-22-55-41-00")
        );
        assert_eq!(p.cow_spacesize, Some(Size::Bytes(1 << 30)));
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        assert_eq!(p.mode, None);
    }

    #[test]
    fn our_parameters() {
        let p = parse(
            "mados.persistence=nocreate mados.persistence.size=8G mados.persistence.label=mine \
             mados.persistence.device=LABEL=stick archisodevice=/dev/sr0 mados.debug \
             mados.persistence.data=writeback root=live:CDLABEL=MADOS",
        );
        assert_eq!(p.mode, Some(Mode::Nocreate));
        assert_eq!(p.max_size, Some(Size::Bytes(8 << 30)));
        assert_eq!(p.label.as_deref(), Some("mine"));
        assert_eq!(p.device, Some(DeviceSpec::Label("stick".into())));
        assert_eq!(p.archiso_cow, None);
        assert_eq!(p.archisodevice, Some(DeviceSpec::Path("/dev/sr0".into())));
        assert_eq!(p.live_label.as_deref(), Some("MADOS"));
        assert_eq!(p.data_mode, Some(DataMode::Writeback));
        assert!(p.debug);
    }

    #[test]
    fn bad_values_warn_and_keep_defaults() {
        let p = parse(
            "cow_spacesize=lots mados.persistence=maybe mados.persistence.size=50% \
             mados.frobnicate=1 mados.persistence.label= mados.persistence.data=journal \
             mados.persistence.label=a-label-of-17-byt",
        );
        assert_eq!(p.cow_spacesize, None);
        assert_eq!(p.mode, None);
        assert_eq!(p.max_size, None);
        assert_eq!(p.label, None);
        assert_eq!(p.data_mode, None);
        let w = p.warnings.join("\n");
        for needle in [
            "cow_spacesize=lots",
            "mados.persistence=maybe",
            "mados.persistence.size=50%",
            "mados.frobnicate=1",
            "'mados.persistence.label' needs a value",
            "at most 16 bytes",
            "mados.persistence.data=journal",
        ] {
            assert!(w.contains(needle), "missing warning for {needle}: {w}");
        }
        assert_eq!(p.warnings.len(), 7);
    }

    #[test]
    fn archiso_persistence_keeps_its_own_names() {
        // archiso's cow_label=/cow_device= are archiso's: recorded so that
        // boot stands down, never taken as ours
        let p = parse("archisolabel=ARCH_202611 cow_label=mystick cow_spacesize=1G");
        assert_eq!(p.archiso_cow.as_deref(), Some("cow_label=mystick"));
        assert_eq!(p.label, None);
        assert_eq!(p.device, None);
        assert_eq!(p.cow_spacesize, Some(Size::Bytes(1 << 30)));
        let p = parse("cow_device=/dev/disk/by-label/x");
        assert_eq!(
            p.archiso_cow.as_deref(),
            Some("cow_device=/dev/disk/by-label/x")
        );
        assert_eq!(parse("cow_label=").archiso_cow, None);
    }

    #[test]
    fn uuid_and_label_specs() {
        assert_eq!(
            DeviceSpec::parse("UUID=ab-cd"),
            DeviceSpec::Uuid("ab-cd".into())
        );
        assert_eq!(
            DeviceSpec::parse("/dev/disk/by-label/ARCH_2026"),
            DeviceSpec::Label("ARCH_2026".into())
        );
    }
}
