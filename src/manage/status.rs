//! `mados-persistence status`: what a person (or a script, with `--json`)
//! needs to know: is my work being saved, and if not, why. `gather` reads
//! the live system; `render` is pure and unit-tested on state samples.

use super::{RUN_DIR, mounted_targets, pending_path, read_state, usage};
use crate::boot::flags;
use crate::boot::state::{self, State};
use anyhow::Result;
use serde::Serialize;
use std::path::Path;

/// Use of a mounted filesystem, from statvfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub size: u64,
    pub used: u64,
    pub free: u64,
}

impl Usage {
    pub fn percent(&self) -> u64 {
        (self.used * 100).checked_div(self.size).unwrap_or(0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MountStatus {
    /// The path in the running system (`/etc`, not `/new_root/etc`).
    pub path: String,
    pub kind: String,
    pub mounted: bool,
    pub usage: Option<Usage>,
}

/// The `--json` document. Stable: fields are added, never renamed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    pub schema: u32,
    /// "persistent", "ram", or "unknown" (not booted with mados-persistence).
    pub mode: String,
    pub active: bool,
    pub reason: Option<crate::boot::detect::Reason>,
    pub boot_device: Option<crate::boot::state::BootDevice>,
    pub partition: Option<crate::boot::state::Partition>,
    pub partition_usage: Option<Usage>,
    pub full_warning: bool,
    pub mounts: Vec<MountStatus>,
    /// What will happen at next boot: "disabled-once", "disabled",
    /// "remove", "enabled" (created in this session), or null.
    pub next_boot: Option<String>,
    pub warnings: Vec<String>,
    pub log: String,
    pub state_file: String,
    /// The ISO build booted (label, uuid), when known.
    pub iso: Option<crate::boot::iso_build::IsoBuild>,
    /// Set when this boot found overlays made on another ISO build.
    pub iso_change: Option<crate::boot::iso_build::IsoChange>,
}

pub const FULL_PERCENT: u64 = 90;

/// Build the status from a boot's state and what is seen now.
pub fn build(
    st: Option<&State>,
    state_file: &str,
    mounted: &dyn Fn(&str) -> bool,
    usage: &dyn Fn(&str) -> Option<Usage>,
    next_boot: Option<String>,
) -> Status {
    let log = "/var/log/mados-persistence.log".to_string();
    let Some(st) = st else {
        return Status {
            schema: 1,
            mode: "unknown".into(),
            active: false,
            reason: Some(crate::boot::detect::Reason::new(
                "not_booted",
                format!(
                    "no {state_file}: this system was not booted from a madOS stick with mados-persistence"
                ),
            )),
            boot_device: None,
            partition: None,
            partition_usage: None,
            full_warning: false,
            mounts: vec![],
            next_boot,
            warnings: vec![],
            log,
            state_file: state_file.into(),
            iso: None,
            iso_change: None,
        };
    };
    let root = if st.root.is_empty() {
        "/new_root"
    } else {
        st.root.as_str()
    };
    let live = |t: &str| -> String {
        match t.strip_prefix(root) {
            Some("") => "/".into(),
            Some(rest) if rest.starts_with('/') => rest.into(),
            _ => t.into(),
        }
    };
    let mounts: Vec<MountStatus> = st
        .mounts
        .iter()
        .map(|m| {
            let path = live(&m.target.to_string_lossy());
            let kind = match m.fstype.as_str() {
                "overlay" => "overlay",
                "bind" => "bind",
                "tmpfs" if m.source == "cow" => "ram-upper",
                "tmpfs" => "tmpfs",
                "ext4" => "persistence",
                other => other,
            }
            .to_string();
            let usage = if matches!(kind.as_str(), "tmpfs" | "ram-upper" | "persistence") {
                usage(&path)
            } else {
                None
            };
            MountStatus {
                mounted: mounted(&path),
                path,
                kind,
                usage,
            }
        })
        .collect();
    let partition_usage = st
        .partition
        .as_ref()
        .filter(|_| st.mode == "persistent")
        .and_then(|p| usage(&p.mountpoint));
    let active =
        st.mode == "persistent" && mounts.iter().any(|m| m.kind == "persistence" && m.mounted);
    Status {
        schema: 1,
        mode: st.mode.clone(),
        active,
        reason: st.reason.clone(),
        boot_device: st.boot_device.clone(),
        partition: st.partition.clone(),
        full_warning: partition_usage.is_some_and(|u| u.percent() > FULL_PERCENT),
        partition_usage,
        mounts,
        next_boot,
        warnings: st.warnings.clone(),
        log,
        state_file: state_file.into(),
        iso: st.iso.clone(),
        iso_change: st.iso_change.clone(),
    }
}

fn h(b: u64) -> String {
    crate::settings::size::human(b)
}

/// Human-readable, aligned.
pub fn render(s: &Status) -> String {
    let mut o = String::new();
    let mut line = |k: &str, v: String| o.push_str(&format!("{k:<14}{v}\n"));
    let headline = match (s.mode.as_str(), s.active) {
        ("persistent", true) => "ACTIVE: your changes are saved to the stick".to_string(),
        ("persistent", false) => {
            "NOT ACTIVE: the persistence partition is no longer mounted; changes are not saved"
                .into()
        }
        ("ram", _) => "RAM MODE: changes are lost at shutdown".into(),
        _ => "UNKNOWN: not booted with mados-persistence".into(),
    };
    line("persistence:", headline);
    if let Some(r) = &s.reason {
        line("why:", format!("{} ({})", r.message, r.code));
    }
    if let Some(b) = &s.boot_device {
        line(
            "boot device:",
            format!("{} on {} — {}", b.device, b.disk, b.description),
        );
    }
    if let Some(p) = &s.partition {
        let mut v = format!("{} ({})", p.device, h(p.size));
        if p.mounted_from != p.device {
            v.push_str(&format!(", through {}", p.mounted_from));
        }
        if p.created {
            v.push_str(", created at this boot");
        }
        line("partition:", v);
        if let Some(u) = s.partition_usage {
            line(
                "space:",
                format!(
                    "{} used of {}, {} free ({}%)",
                    h(u.used),
                    h(u.size),
                    h(u.free),
                    u.percent()
                ),
            );
        }
        if s.mode == "persistent" {
            line("mounted at:", p.mountpoint.clone());
        }
        if let Some(f) = &p.fsck {
            line("fsck:", format!("{} (exit {})", f.summary, f.code));
        }
    }
    if let Some(i) = &s.iso {
        line("ISO build:", format!("{} ({})", i.label, i.uuid));
    }
    if let Some(c) = &s.iso_change {
        line(
            "ISO changed:",
            format!(
                "the stick was re-flashed: the overlays were made on {} ({})",
                c.previous.label, c.previous.uuid
            ),
        );
        match &c.set_aside {
            Some(p) => {
                line(
                    "",
                    format!(
                        "your old system changes (/etc /usr /var /opt) were set aside in {p}; /home was kept"
                    ),
                );
                line(
                    "",
                    format!(
                        "to bring them back (only sensible on the same release): `sudo mados-persistence disable --once`, \
                         reboot, mount the partition, move its overlays/ aside and {p} to overlays/, reboot"
                    ),
                );
            }
            None => line("", format!("policy {}: nothing was set aside", c.policy)),
        }
    }
    if s.full_warning {
        line(
            "WARNING:",
            format!(
                "persistence is over {FULL_PERCENT}% full; free space or the system may stop saving changes"
            ),
        );
    }
    if let Some(n) = &s.next_boot {
        let what = match n.as_str() {
            "disabled-once" => {
                "RAM mode for the next boot only (disable --once); persistent again after"
                    .to_string()
            }
            "disabled" => "RAM mode until `mados-persistence enable` (disable)".into(),
            "remove" => "the persistence partition will be removed (remove)".into(),
            "enabled" => {
                "persistence was created in this session and takes effect at next boot".into()
            }
            other => other.into(),
        };
        line("next boot:", what);
    }
    if !s.mounts.is_empty() {
        o.push_str("\nmounts:\n");
        let w = s.mounts.iter().map(|m| m.path.len()).max().unwrap_or(0);
        for m in &s.mounts {
            let use_ = m
                .usage
                .map(|u| format!("  {} of {} used", h(u.used), h(u.size)))
                .unwrap_or_default();
            o.push_str(&format!(
                "  {:<w$}  {:<12} {}{}\n",
                m.path,
                m.kind,
                if m.mounted { "mounted" } else { "NOT MOUNTED" },
                use_
            ));
        }
    }
    if !s.warnings.is_empty() {
        o.push_str("\nwarnings from boot:\n");
        for w in &s.warnings {
            o.push_str(&format!("  - {w}\n"));
        }
    }
    o.push_str(&format!("\nlog: {}   state: {}\n", s.log, s.state_file));
    o
}

pub fn status(json: bool) -> Result<()> {
    let st = read_state();
    let mounted = mounted_targets();
    let next = std::fs::read_to_string(pending_path())
        .ok()
        .map(|s| s.trim().to_string())
        .or_else(|| {
            let p = st
                .as_ref()
                .filter(|s| s.mode == "persistent")?
                .partition
                .as_ref()?;
            let f = flags::read(Path::new(&p.mountpoint));
            if f.remove {
                Some("remove".into())
            } else {
                f.disabled.map(|d| {
                    if d == flags::Disabled::Once {
                        "disabled-once"
                    } else {
                        "disabled"
                    }
                    .into()
                })
            }
        });
    let state_file = Path::new(RUN_DIR)
        .join(state::STATE_FILE)
        .display()
        .to_string();
    let s = build(
        st.as_ref(),
        &state_file,
        &|p| mounted.iter().any(|m| m == p),
        &usage,
        next,
    );
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!("{}", render(&s));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PERSISTENT: &str = r#"{
      "version": 1, "mode": "persistent", "reason": null, "root": "/new_root",
      "boot_device": {"device": "/dev/sda1", "disk": "/dev/sda", "kind": "usb", "description": "USB disk"},
      "partition": {"device": "/dev/sda3", "mounted_from": "/dev/sda3", "created": false, "start": 25165824,
                    "size": 2122317824, "mountpoint": "/run/mados/persistence",
                    "fsck": {"code": 0, "summary": "clean", "output": ""}},
      "mounts": [
        {"target": "/run/mados/persistence", "fstype": "ext4", "source": "/dev/sda3", "options": "noatime,commit=60"},
        {"target": "/new_root/etc", "fstype": "overlay", "source": "overlay", "options": ""},
        {"target": "/new_root/home", "fstype": "bind", "source": "/run/mados/persistence/home", "options": "bind"},
        {"target": "/new_root/tmp", "fstype": "tmpfs", "source": "tmpfs", "options": ""}
      ],
      "warnings": ["ignoring /dev/vda labelled 'persistence': it is not on the boot device sda"],
      "timings": [], "cmdline": ""
    }"#;

    const CDROM: &str = r#"{
      "version": 1, "mode": "ram", "root": "/new_root",
      "reason": {"code": "optical", "message": "booted from a CD/DVD, which cannot hold persistence"},
      "boot_device": {"device": "/dev/sr0", "disk": "/dev/sr0", "kind": "optical", "description": "CD/DVD drive"},
      "partition": null, "mounts": [], "warnings": [], "timings": [], "cmdline": ""
    }"#;

    fn st(j: &str) -> State {
        serde_json::from_str(j).unwrap()
    }

    #[test]
    fn persistent_and_nearly_full() {
        let s = st(PERSISTENT);
        let usage = |p: &str| {
            (p == "/run/mados/persistence").then_some(Usage {
                size: 1000,
                used: 950,
                free: 50,
            })
        };
        let status = build(Some(&s), "/run/x.json", &|p| p != "/etc", &usage, None);
        assert!(status.active);
        assert!(status.full_warning);
        assert_eq!(status.mounts[1].path, "/etc");
        assert!(!status.mounts[1].mounted);
        let text = render(&status);
        assert!(text.contains("ACTIVE: your changes are saved"), "{text}");
        assert!(text.contains("over 90% full"), "{text}");
        let etc = text
            .lines()
            .find(|l| l.trim_start().starts_with("/etc "))
            .unwrap();
        assert!(
            etc.contains("overlay") && etc.ends_with("NOT MOUNTED"),
            "{text}"
        );
        assert!(text.contains("ignoring /dev/vda"), "{text}");
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["partition_usage"]["used"], 950);
        assert_eq!(json["mounts"][2]["kind"], "bind");
    }

    #[test]
    fn ram_mode_says_why() {
        let s = st(CDROM);
        let status = build(Some(&s), "/run/x.json", &|_| true, &|_| None, None);
        assert!(!status.active);
        let text = render(&status);
        assert!(text.contains("RAM MODE"), "{text}");
        assert!(text.contains("booted from a CD/DVD"), "{text}");
        assert!(text.contains("(optical)"), "{text}");
    }

    #[test]
    fn not_booted_with_us() {
        let status = build(
            None,
            "/run/mados-persistence/state.json",
            &|_| false,
            &|_| None,
            None,
        );
        assert_eq!(status.mode, "unknown");
        assert!(render(&status).contains("not booted from a madOS stick"));
    }

    #[test]
    fn next_boot_is_shown() {
        let s = st(PERSISTENT);
        let status = build(
            Some(&s),
            "/x",
            &|_| true,
            &|_| None,
            Some("disabled-once".into()),
        );
        assert!(render(&status).contains("RAM mode for the next boot only"));
        assert_eq!(
            serde_json::to_value(&status).unwrap()["next_boot"],
            "disabled-once"
        );
    }
}
