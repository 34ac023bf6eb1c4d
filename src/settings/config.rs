//! `/etc/mados/persistence.toml` in the live root, merged with the kernel
//! command line (which wins) into the settings a boot runs with. Each key is
//! read on its own so that one bad value costs only that value: it is
//! reported and its default kept.

use crate::settings::cmdline::{BootParams, DataMode, DeviceSpec, Mode};
use crate::settings::size::{MIB, Size};
use serde::Serialize;
use std::path::Path;

pub const CONFIG_PATH: &str = "etc/mados/persistence.toml";

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TmpfsMount {
    pub path: String,
    pub size: Size,
}

/// What a boot runs with: defaults, then the config file, then the kernel
/// command line.
/// `on_iso_change`: the system overlays were made over another ISO build
/// (the stick was re-flashed with another release).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnIsoChange {
    /// Move the old overlays aside on the partition (renamed after the
    /// build they belong to, never deleted) and start fresh ones; the bind
    /// dirs (`/home`) stay.
    SetAside,
    /// Keep layering the old overlays over the new build.
    Keep,
}

/// `[tier]`: directories whose writes live in RAM and are synced to the
/// partition (the companion's RAM tier).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TierSettings {
    /// On unless `mados.tier=off` or `enabled = false`.
    pub enabled: bool,
    pub dirs: Vec<String>,
    /// Subdirectories kept out of the tier (written straight to the
    /// partition): systemd's journal by default, because journald keeps its
    /// active files open and mapped, and a copy of an open journal comes
    /// back after a reboot as a corrupt `.journal~`.
    pub exclude: Vec<String>,
    /// RAM for all tiers together (one tmpfs).
    pub budget: Size,
    /// Seconds between syncs.
    pub interval: u64,
    /// Seconds without tier writes after which a sync runs.
    pub idle: u64,
    /// Add the directories the daemon suggested (their write heat, saved on
    /// the partition) to `dirs` at boot, as far as the budget allows.
    pub adopt_suggested: bool,
}

impl Default for TierSettings {
    fn default() -> Self {
        TierSettings {
            enabled: true,
            dirs: vec!["/var/log".into()],
            exclude: vec!["/var/log/journal".into()],
            budget: Size::Bytes(1 << 30),
            interval: 300,
            idle: 30,
            adopt_suggested: false,
        }
    }
}

impl TierSettings {
    /// The budget in bytes: as configured, and by default min(1 GiB, 10%
    /// of RAM).
    pub fn budget_bytes(&self, ram: u64) -> u64 {
        if self.budget == TierSettings::default().budget {
            (1u64 << 30).min(ram / 10)
        } else {
            self.budget.resolve(ram)
        }
    }
}

/// `[cleanup]`: old files removed from the temp dirs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CleanupSettings {
    pub dirs: Vec<String>,
    /// Seconds between passes (0: no cleanup).
    pub every: u64,
    /// A file unused (mtime, atime and ctime) for longer is removed.
    pub age: u64,
}

impl Default for CleanupSettings {
    fn default() -> Self {
        CleanupSettings {
            dirs: vec!["/tmp".into(), "/var/tmp".into()],
            every: 60,
            age: 600,
        }
    }
}

/// `[user_cache]`: each user's `~/.cache` in RAM (a tmpfs of `size`), with
/// the `keep` subdirectories still on the partition (bind mounts). Only
/// with persistence: in RAM mode everything is in RAM already.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UserCacheSettings {
    /// On unless `mados.usercache=off` or `enabled = false`.
    pub enabled: bool,
    /// The tmpfs size limit for each user (RAM is used only as it fills).
    pub size: Size,
    /// Names of subdirectories of `~/.cache` kept on the partition.
    pub keep: Vec<String>,
}

impl Default for UserCacheSettings {
    fn default() -> Self {
        UserCacheSettings {
            enabled: true,
            size: Size::Percent(10),
            keep: vec!["paru".into(), "mesa_shader_cache".into()],
        }
    }
}

/// `[pin]`: files the daemon sees opened often kept in RAM
/// (`companion::heat`, `companion::pinset`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PinSettings {
    /// On unless `mados.pin=off` or `enabled = false`.
    pub enabled: bool,
    /// The most it locks; by default min(512 MiB, 10% of RAM). It gives
    /// way first: at most a quarter of available memory, halved under
    /// memory pressure.
    pub budget: Size,
    /// Seconds in which a file's heat halves.
    pub half_life: u64,
    /// Heat (about: opens within a half-life) at which a file is pinned,
    /// and below which a pinned one is let go.
    pub pin_high: f64,
    pub pin_low: f64,
    /// Files tracked at most (the coldest are forgotten first).
    pub tracked: usize,
    /// Seconds between two pin decisions.
    pub every: u64,
    /// Keep the hot set on the partition (at stop and every `save_every`
    /// seconds) and read it ahead at the next boot (`mados.prefetch=off`:
    /// not this boot).
    pub prefetch: bool,
    /// The most the read-ahead reads; by default min(1 GiB, 20% of RAM).
    pub prefetch_budget: Size,
    /// The read-ahead stops after this many seconds.
    pub prefetch_time: u64,
    pub save_every: u64,
}

impl Default for PinSettings {
    fn default() -> Self {
        PinSettings {
            enabled: true,
            budget: Size::Bytes(512 * MIB),
            half_life: 600,
            pin_high: 4.0,
            pin_low: 1.0,
            tracked: 20_000,
            every: 10,
            prefetch: true,
            prefetch_budget: Size::Bytes(1 << 30),
            prefetch_time: 60,
            save_every: 600,
        }
    }
}

impl PinSettings {
    /// The budget in bytes: as configured, and by default min(512 MiB,
    /// 10% of RAM).
    pub fn budget_bytes(&self, ram: u64) -> u64 {
        if self.budget == PinSettings::default().budget {
            (512 * MIB).min(ram / 10)
        } else {
            self.budget.resolve(ram)
        }
    }

    /// The read-ahead's byte budget: as configured, and by default
    /// min(1 GiB, 20% of RAM).
    pub fn prefetch_bytes(&self, ram: u64) -> u64 {
        if self.prefetch_budget == PinSettings::default().prefetch_budget {
            (1u64 << 30).min(ram / 5)
        } else {
            self.prefetch_budget.resolve(ram)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Settings {
    pub mode: Mode,
    pub label: String,
    /// `mados.persistence.device=`
    pub cow_device: Option<DeviceSpec>,
    /// archiso's own persistence was asked for (`cow_label=`/`cow_device=`).
    pub archiso_cow: Option<String>,
    pub cow_spacesize: Size,
    /// Cap on the size of a new persistence partition.
    pub max_size: Option<Size>,
    /// Less free space than this after the ISO: no partition is created.
    pub min_free: u64,
    pub data_mode: DataMode,
    /// A partition created at boot is encrypted (LUKS2): `encrypt = true`
    /// in the ISO's config or `mados.persistence.encrypt=yes`. Never a
    /// clear partition when it is set.
    pub encrypt: bool,
    /// Tests only: the argon2id cost of a partition created at boot
    /// (`mados.persistence.test_pbkdf=`), else the default.
    pub test_pbkdf: Option<String>,
    /// What a boot does when the ISO build differs from the one the
    /// overlays were made on.
    pub on_iso_change: OnIsoChange,
    pub overlay_dirs: Vec<String>,
    pub bind_dirs: Vec<String>,
    pub tmpfs: Vec<TmpfsMount>,
    pub cache_binds: Vec<String>,
    pub iso_label: Option<String>,
    pub iso_uuid: Option<String>,
    pub iso_device: Option<DeviceSpec>,
    pub debug: bool,
    pub tier: TierSettings,
    pub cleanup: CleanupSettings,
    pub user_cache: UserCacheSettings,
    pub pin: PinSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            mode: Mode::Auto,
            label: "persistence".into(),
            cow_device: None,
            archiso_cow: None,
            cow_spacesize: Size::Bytes(256 * MIB),
            max_size: None,
            min_free: 100 * MIB,
            data_mode: DataMode::Ordered,
            encrypt: false,
            test_pbkdf: None,
            on_iso_change: OnIsoChange::SetAside,
            overlay_dirs: ["/etc", "/usr", "/var", "/opt"].map(String::from).to_vec(),
            bind_dirs: vec!["/home".into()],
            tmpfs: vec![
                TmpfsMount {
                    path: "/tmp".into(),
                    size: Size::Bytes(5 << 30),
                },
                TmpfsMount {
                    path: "/var/tmp".into(),
                    size: Size::Bytes(1 << 30),
                },
            ],
            cache_binds: vec![],
            iso_label: None,
            iso_uuid: None,
            iso_device: None,
            debug: false,
            tier: TierSettings::default(),
            cleanup: CleanupSettings::default(),
            user_cache: UserCacheSettings::default(),
            pin: PinSettings::default(),
        }
    }
}

const KEYS: &[&str] = &[
    "mode",
    "label",
    "cow_spacesize",
    "max_size",
    "min_free",
    "data_mode",
    "encrypt",
    "on_iso_change",
    "overlay_dirs",
    "bind_dirs",
    "tmpfs",
    "cache_binds",
    "iso_label",
    "tier",
    "cleanup",
    "user_cache",
    "pin",
];

fn check_dir(key: &str, d: &str, warnings: &mut Vec<String>) -> bool {
    let ok = d.starts_with('/')
        && d != "/"
        && !d.split('/').any(|c| c == ".." || c == ".")
        && !d.contains("//");
    if !ok {
        warnings.push(format!(
            "config {key}: '{d}' is not an absolute directory path; skipped"
        ));
    }
    ok
}

/// Apply a config file's text on top of `s`; problems become warnings.
pub fn apply_toml(s: &mut Settings, text: &str, warnings: &mut Vec<String>) {
    let table: toml::Table = match text.parse() {
        Ok(t) => t,
        Err(e) => {
            warnings.push(format!(
                "config {CONFIG_PATH} is not valid TOML ({}); using the defaults",
                e.message()
            ));
            return;
        }
    };
    for (key, val) in &table {
        let bad = |warnings: &mut Vec<String>, want: &str| {
            warnings.push(format!(
                "config {key} = {val}: expected {want}; using the default"
            ))
        };
        let size = |v: &toml::Value| v.as_str().and_then(|t| Size::parse(t).ok());
        let dirs = |v: &toml::Value, warnings: &mut Vec<String>| -> Option<Vec<String>> {
            let arr = v.as_array()?;
            let mut out = Vec::new();
            for d in arr {
                let d = d.as_str()?;
                if check_dir(key, d, warnings) {
                    out.push(d.trim_end_matches('/').to_string());
                }
            }
            Some(out)
        };
        match key.as_str() {
            "mode" => match val.as_str().and_then(Mode::parse) {
                Some(m) => s.mode = m,
                None => bad(warnings, "\"auto\", \"off\", \"nocreate\" or \"force\""),
            },
            "label" => match val.as_str() {
                Some(l) if !l.is_empty() && l.len() <= 16 => s.label = l.into(),
                _ => bad(warnings, "a label of 1 to 16 characters"),
            },
            "iso_label" => match val.as_str() {
                Some(l) if !l.is_empty() => s.iso_label = Some(l.into()),
                _ => bad(warnings, "the ISO volume label"),
            },
            "cow_spacesize" => match size(val) {
                Some(v) => s.cow_spacesize = v,
                None => bad(warnings, "a size such as \"256M\" or \"25%\""),
            },
            "max_size" => match size(val) {
                Some(v @ Size::Bytes(_)) => s.max_size = Some(v),
                _ => bad(warnings, "an absolute size such as \"8G\""),
            },
            "min_free" => match size(val) {
                Some(Size::Bytes(b)) => s.min_free = b,
                _ => bad(warnings, "an absolute size such as \"100M\""),
            },
            "on_iso_change" => match val.as_str() {
                Some("set-aside") => s.on_iso_change = OnIsoChange::SetAside,
                Some("keep") => s.on_iso_change = OnIsoChange::Keep,
                _ => bad(warnings, "\"set-aside\" or \"keep\""),
            },
            "encrypt" => match val.as_bool() {
                Some(b) => s.encrypt = b,
                None => bad(warnings, "true or false"),
            },
            "data_mode" => match val.as_str() {
                Some("ordered") => s.data_mode = DataMode::Ordered,
                Some("writeback") => s.data_mode = DataMode::Writeback,
                _ => bad(warnings, "\"ordered\" or \"writeback\""),
            },
            "overlay_dirs" | "bind_dirs" | "cache_binds" => match dirs(val, warnings) {
                Some(d) => match key.as_str() {
                    "overlay_dirs" => s.overlay_dirs = d,
                    "bind_dirs" => s.bind_dirs = d,
                    _ => s.cache_binds = d,
                },
                None => bad(warnings, "a list of absolute directory paths"),
            },
            "tmpfs" => {
                let parsed = val.as_array().map(|arr| {
                    arr.iter()
                        .filter_map(|t| {
                            let path = t.get("path")?.as_str()?;
                            let size = size(t.get("size")?)?;
                            Some(TmpfsMount {
                                path: path.trim_end_matches('/').into(),
                                size,
                            })
                        })
                        .collect::<Vec<_>>()
                });
                match parsed {
                    Some(list) if list.len() == val.as_array().map_or(0, |a| a.len()) => {
                        s.tmpfs = list
                            .into_iter()
                            .filter(|t| check_dir("tmpfs", &t.path, warnings))
                            .collect()
                    }
                    _ => bad(warnings, "[[tmpfs]] tables with path and size"),
                }
            }
            "tier" => match val.as_table() {
                Some(t) => apply_tier(&mut s.tier, t, warnings),
                None => bad(warnings, "a [tier] table"),
            },
            "cleanup" => match val.as_table() {
                Some(t) => apply_cleanup(&mut s.cleanup, t, warnings),
                None => bad(warnings, "a [cleanup] table"),
            },
            "user_cache" => match val.as_table() {
                Some(t) => apply_user_cache(&mut s.user_cache, t, warnings),
                None => bad(warnings, "a [user_cache] table"),
            },
            "pin" => match val.as_table() {
                Some(t) => apply_pin(&mut s.pin, t, warnings),
                None => bad(warnings, "a [pin] table"),
            },
            _ => warnings.push(format!(
                "config: unknown key '{key}' (known: {}); ignored",
                KEYS.join(", ")
            )),
        }
    }
}

fn dir_list(key: &str, v: &toml::Value, warnings: &mut Vec<String>) -> Option<Vec<String>> {
    let arr = v.as_array()?;
    let mut out = Vec::new();
    for d in arr {
        let d = d.as_str()?;
        if check_dir(key, d, warnings) {
            out.push(d.trim_end_matches('/').to_string());
        }
    }
    Some(out)
}

fn seconds(v: &toml::Value) -> Option<u64> {
    v.as_integer()
        .and_then(|i| u64::try_from(i).ok())
        .filter(|s| *s > 0)
}

fn apply_tier(t: &mut TierSettings, table: &toml::Table, warnings: &mut Vec<String>) {
    for (k, v) in table {
        let mut bad = |want: &str| {
            warnings.push(format!(
                "config tier.{k} = {v}: expected {want}; using the default"
            ))
        };
        match k.as_str() {
            "enabled" => match v.as_bool() {
                Some(b) => t.enabled = b,
                None => bad("true or false"),
            },
            "dirs" | "exclude" => match dir_list(&format!("tier.{k}"), v, warnings) {
                Some(d) if k == "dirs" => t.dirs = d,
                Some(d) => t.exclude = d,
                None => warnings.push(format!(
                    "config tier.{k} = {v}: expected a list of absolute directory paths; using the default"
                )),
            },
            "budget" => match v.as_str().and_then(|x| Size::parse(x).ok()) {
                Some(b) => t.budget = b,
                None => bad("a size such as \"512M\" or \"10%\""),
            },
            "interval" | "idle" => match seconds(v) {
                Some(x) if k == "interval" => t.interval = x,
                Some(x) => t.idle = x,
                None => bad("a number of seconds"),
            },
            "adopt_suggested" => match v.as_bool() {
                Some(b) => t.adopt_suggested = b,
                None => bad("true or false"),
            },
            _ => warnings.push(format!(
                "config: unknown key 'tier.{k}' (known: enabled, dirs, exclude, budget, interval, idle, adopt_suggested); ignored"
            )),
        }
    }
}

fn apply_cleanup(c: &mut CleanupSettings, table: &toml::Table, warnings: &mut Vec<String>) {
    for (k, v) in table {
        match k.as_str() {
            "dirs" => match dir_list("cleanup.dirs", v, warnings) {
                Some(d) => c.dirs = d,
                None => warnings.push(format!(
                    "config cleanup.dirs = {v}: expected a list of absolute directory paths; using the default"
                )),
            },
            // every = 0 turns the cleanup off (as documented); age = 0
            // (everything not in use, at once) stays refused
            "every" => match v.as_integer().and_then(|i| u64::try_from(i).ok()) {
                Some(x) => c.every = x,
                None => warnings.push(format!(
                    "config cleanup.every = {v}: expected a number of seconds (0: off); using the default"
                )),
            },
            "age" => match seconds(v) {
                Some(x) => c.age = x,
                None => warnings.push(format!(
                    "config cleanup.{k} = {v}: expected a number of seconds; using the default"
                )),
            },
            _ => warnings.push(format!(
                "config: unknown key 'cleanup.{k}' (known: dirs, every, age); ignored"
            )),
        }
    }
}

fn apply_user_cache(c: &mut UserCacheSettings, table: &toml::Table, warnings: &mut Vec<String>) {
    for (k, v) in table {
        match k.as_str() {
            "enabled" => match v.as_bool() {
                Some(b) => c.enabled = b,
                None => warnings.push(format!(
                    "config user_cache.enabled = {v}: expected true or false; using the default"
                )),
            },
            "size" => match v.as_str().and_then(|x| Size::parse(x).ok()) {
                Some(b) => c.size = b,
                None => warnings.push(format!(
                    "config user_cache.size = {v}: expected a size such as \"512M\" or \"10%\"; using the default"
                )),
            },
            "keep" => match v.as_array() {
                Some(arr) => {
                    c.keep = arr
                        .iter()
                        .filter_map(|n| {
                            let ok = n.as_str().filter(|n| {
                                !n.is_empty() && *n != "." && *n != ".." && !n.contains('/')
                            });
                            if ok.is_none() {
                                warnings.push(format!(
                                    "config user_cache.keep: {n} is not a name inside ~/.cache; skipped"
                                ));
                            }
                            ok.map(String::from)
                        })
                        .collect()
                }
                None => warnings.push(format!(
                    "config user_cache.keep = {v}: expected a list of names; using the default"
                )),
            },
            _ => warnings.push(format!(
                "config: unknown key 'user_cache.{k}' (known: enabled, size, keep); ignored"
            )),
        }
    }
}

fn apply_pin(c: &mut PinSettings, table: &toml::Table, warnings: &mut Vec<String>) {
    let want = |warnings: &mut Vec<String>, k: &str, what: &str, v: &toml::Value| {
        warnings.push(format!(
            "config pin.{k} = {v}: expected {what}; using the default"
        ))
    };
    for (k, v) in table {
        match k.as_str() {
            "enabled" | "prefetch" => match v.as_bool() {
                Some(b) if k == "enabled" => c.enabled = b,
                Some(b) => c.prefetch = b,
                None => want(warnings, k, "true or false", v),
            },
            "budget" | "prefetch_budget" => match v.as_str().and_then(|x| Size::parse(x).ok()) {
                Some(b) if k == "budget" => c.budget = b,
                Some(b) => c.prefetch_budget = b,
                None => want(warnings, k, "a size such as \"256M\" or \"5%\"", v),
            },
            "half_life" | "every" | "prefetch_time" | "save_every" => match v
                .as_integer()
                .filter(|n| *n > 0)
            {
                Some(n) if k == "half_life" => c.half_life = n as u64,
                Some(n) if k == "prefetch_time" => c.prefetch_time = n as u64,
                Some(n) if k == "save_every" => c.save_every = n as u64,
                Some(n) => c.every = n as u64,
                None => want(warnings, k, "a number of seconds above 0", v),
            },
            "pin_high" | "pin_low" => match v
                .as_float()
                .or(v.as_integer().map(|n| n as f64))
                .filter(|x| x.is_finite() && *x > 0.0)
            {
                Some(x) if k == "pin_high" => c.pin_high = x,
                Some(x) => c.pin_low = x,
                None => want(warnings, k, "a number above 0", v),
            },
            "tracked" => match v.as_integer().filter(|n| (1..=10_000_000).contains(n)) {
                Some(n) => c.tracked = n as usize,
                None => want(warnings, k, "a number of files (1 to 10000000)", v),
            },
            _ => warnings.push(format!(
                "config: unknown key 'pin.{k}' (known: enabled, budget, half_life, pin_high, pin_low, tracked, every, prefetch, prefetch_budget, prefetch_time, save_every); ignored"
            )),
        }
    }
    if c.pin_low > c.pin_high {
        warnings.push(format!(
            "config pin.pin_low ({}) is above pin.pin_high ({}): using pin_low = pin_high",
            c.pin_low, c.pin_high
        ));
        c.pin_low = c.pin_high;
    }
}

/// Settings for a boot: defaults, the live root's config file if there is
/// one, then the kernel command line.
pub fn resolve(root: &Path, params: &BootParams, warnings: &mut Vec<String>) -> Settings {
    let path = root.join(CONFIG_PATH);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            warnings.push(format!(
                "reading {}: {e}; using the defaults",
                path.display()
            ));
            None
        }
    };
    resolve_text(text.as_deref(), params, warnings)
}

/// Defaults, then `text` (a config file's content, if any), then the
/// kernel command line.
pub fn resolve_text(
    text: Option<&str>,
    params: &BootParams,
    warnings: &mut Vec<String>,
) -> Settings {
    let mut s = Settings::default();
    if let Some(text) = text {
        apply_toml(&mut s, text, warnings);
    }
    merge_params(&mut s, params);
    warnings.extend(params.warnings.iter().cloned());
    s
}

/// The keys a config file saved on the partition (the user's own
/// `/etc/mados/persistence.toml` in the persistent `/etc`) can change:
/// those a boot uses only after the partition is mounted and that change
/// what lives in RAM, not where the user's data is.
pub const LATE_KEYS: &[&str] = &[
    "tmpfs",
    "cache_binds",
    "tier",
    "cleanup",
    "user_cache",
    "pin",
];

/// `early` (the ISO's file and the command line, which found and mounted
/// the partition) with the [`LATE_KEYS`] taken from `late` (the same with
/// the user's saved file). A key the user changed that is not late is
/// reported, not applied: it was decided before the file could be read, or
/// it moves where data lives (`overlay_dirs`, `bind_dirs`).
pub fn with_late_keys(early: &Settings, late: &Settings) -> (Settings, Vec<String>) {
    let mut s = early.clone();
    s.tmpfs = late.tmpfs.clone();
    s.cache_binds = late.cache_binds.clone();
    s.tier = late.tier.clone();
    s.cleanup = late.cleanup.clone();
    s.user_cache = late.user_cache.clone();
    s.pin = late.pin.clone();
    let (e, l) = (
        serde_json::to_value(early).expect("settings serialise"),
        serde_json::to_value(late).expect("settings serialise"),
    );
    let mut notes = Vec::new();
    if let (Some(e), Some(l)) = (e.as_object(), l.as_object()) {
        for (k, ev) in e {
            if !LATE_KEYS.contains(&k.as_str()) && l.get(k) != Some(ev) {
                notes.push(format!(
                    "the saved /etc/mados/persistence.toml changes '{k}', which a boot takes only from the ISO's \
                     file or the kernel command line (it is decided before the partition is mounted, or it \
                     moves where data lives); not applied"
                ));
            }
        }
    }
    (s, notes)
}

pub fn merge_params(s: &mut Settings, p: &BootParams) {
    if let Some(m) = p.mode {
        s.mode = m;
    }
    if let Some(l) = &p.label {
        s.label = l.clone();
    }
    if let Some(v) = p.cow_spacesize {
        s.cow_spacesize = v;
    }
    if let Some(v) = p.max_size {
        s.max_size = Some(v);
    }
    if let Some(v) = p.data_mode {
        s.data_mode = v;
    }
    // only ever turned on here: what the ISO's config asks stays
    s.encrypt |= p.encrypt;
    if p.test_pbkdf.is_some() {
        s.test_pbkdf = p.test_pbkdf.clone();
    }
    if p.device.is_some() {
        s.cow_device = p.device.clone();
    }
    s.archiso_cow = p.archiso_cow.clone();
    if let Some(l) = p.archisolabel.as_ref().or(p.live_label.as_ref()) {
        s.iso_label = Some(l.clone());
    }
    if p.archisosearchuuid.is_some() {
        s.iso_uuid = p.archisosearchuuid.clone();
    }
    if p.archisodevice.is_some() {
        s.iso_device = p.archisodevice.clone();
    }
    s.debug |= p.debug;
    if p.tier_off {
        s.tier.enabled = false;
    }
    if p.usercache_off {
        s.user_cache.enabled = false;
    }
    if p.pin_off {
        s.pin.enabled = false;
    }
    if p.prefetch_off {
        s.pin.prefetch = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::cmdline;

    #[test]
    fn encrypt_from_the_config_or_the_command_line_and_never_turned_off() {
        let mut w = vec![];
        let none = crate::settings::cmdline::parse("");
        assert!(!resolve_text(None, &none, &mut w).encrypt);
        assert!(resolve_text(Some("encrypt = true"), &none, &mut w).encrypt);
        let yes = crate::settings::cmdline::parse("mados.persistence.encrypt=yes");
        assert!(resolve_text(None, &yes, &mut w).encrypt);
        let no = crate::settings::cmdline::parse("mados.persistence.encrypt=no");
        assert!(resolve_text(Some("encrypt = true"), &no, &mut w).encrypt);
        assert!(
            w.is_empty() || w.iter().all(|x| x.contains("cannot be turned off")),
            "{w:?}"
        );
        let mut w = vec![];
        assert!(!resolve_text(Some("encrypt = \"yes\""), &none, &mut w).encrypt);
        assert!(w[0].contains("true or false"), "{w:?}");
    }

    #[test]
    fn defaults_follow_the_design() {
        let s = Settings::default();
        assert_eq!(s.overlay_dirs, ["/etc", "/usr", "/var", "/opt"]);
        assert_eq!(s.bind_dirs, ["/home"]);
        assert_eq!(
            s.tmpfs[0],
            TmpfsMount {
                path: "/tmp".into(),
                size: Size::Bytes(5 << 30)
            }
        );
        assert_eq!(s.cow_spacesize, Size::Bytes(256 * MIB));
        assert_eq!(s.label, "persistence");
    }

    #[test]
    fn file_overrides_defaults_and_cmdline_wins() {
        let mut w = vec![];
        let mut s = Settings::default();
        apply_toml(
            &mut s,
            r#"
mode = "nocreate"
cow_spacesize = "25%"
overlay_dirs = ["/etc", "/var/lib/"]
cache_binds = ["/var/cache/pacman/pkg"]
[[tmpfs]]
path = "/tmp"
size = "50%"
"#,
            &mut w,
        );
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(s.mode, Mode::Nocreate);
        assert_eq!(s.overlay_dirs, ["/etc", "/var/lib"]);
        assert_eq!(
            s.tmpfs,
            vec![TmpfsMount {
                path: "/tmp".into(),
                size: Size::Percent(50)
            }]
        );
        merge_params(
            &mut s,
            &cmdline::parse("mados.persistence=off cow_spacesize=64M"),
        );
        assert_eq!(s.mode, Mode::Off);
        assert_eq!(s.cow_spacesize, Size::Bytes(64 * MIB));
        assert_eq!(s.cache_binds, ["/var/cache/pacman/pkg"]);
    }

    #[test]
    fn bad_keys_cost_only_themselves() {
        let mut w = vec![];
        let mut s = Settings::default();
        apply_toml(
            &mut s,
            r#"
mode = "sometimes"
label = "persistence-but-far-too-long"
bind_dirs = ["home", "/srv"]
colour = "blue"
cow_spacesize = "128M"
"#,
            &mut w,
        );
        assert_eq!(s.mode, Mode::Auto);
        assert_eq!(s.label, "persistence");
        assert_eq!(s.bind_dirs, ["/srv"]);
        assert_eq!(s.cow_spacesize, Size::Bytes(128 * MIB));
        let all = w.join("\n");
        assert!(all.contains("mode"), "{all}");
        assert!(all.contains("'home' is not an absolute"), "{all}");
        assert!(all.contains("unknown key 'colour'"), "{all}");
        assert_eq!(w.len(), 4, "{all}");
    }

    #[test]
    fn shipped_config_parses_cleanly() {
        let text = include_str!("../../config/persistence.toml");
        let mut w = vec![];
        let mut s = Settings::default();
        apply_toml(&mut s, text, &mut w);
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(s.cache_binds, ["/var/cache/pacman/pkg"]);
        let defaults = Settings {
            cache_binds: s.cache_binds.clone(),
            ..Default::default()
        };
        assert_eq!(s, defaults, "the shipped file restates the defaults");
    }

    #[test]
    fn tier_and_cleanup_tables() {
        let mut w = vec![];
        let mut s = Settings::default();
        assert_eq!(s.tier.budget_bytes(4 << 30), (4u64 << 30) / 10);
        assert_eq!(s.tier.budget_bytes(64 << 30), 1 << 30);
        apply_toml(
            &mut s,
            r#"
[tier]
dirs = ["/var/log", "/home/live/.cache/"]
budget = "256M"
interval = 60
idle = 0
colour = 1
[cleanup]
age = 3600
"#,
            &mut w,
        );
        assert_eq!(s.tier.dirs, ["/var/log", "/home/live/.cache"]);
        assert_eq!(s.tier.budget_bytes(64 << 30), 256 << 20);
        assert_eq!(s.tier.interval, 60);
        assert_eq!(s.tier.idle, 30, "0 s refused");
        assert_eq!(s.cleanup.age, 3600);
        assert_eq!(s.cleanup.every, 60);
        assert_eq!(w.len(), 2, "{w:?}");
        merge_params(&mut s, &cmdline::parse("mados.tier=off"));
        assert!(!s.tier.enabled);
    }

    #[test]
    fn cleanup_every_0_turns_the_cleanup_off() {
        // the README: `[cleanup] every` 0 is off (the daemon skips the
        // passes); it was refused as "not a number of seconds" before
        let mut w = vec![];
        let mut s = Settings::default();
        apply_toml(&mut s, "[cleanup]\nevery = 0\n", &mut w);
        assert_eq!(s.cleanup.every, 0);
        assert!(w.is_empty(), "{w:?}");
        // age 0 stays refused (it would remove every file not in use)
        apply_toml(&mut s, "[cleanup]\nage = 0\nevery = -1\n", &mut w);
        assert_eq!((s.cleanup.age, s.cleanup.every), (600, 0));
        assert_eq!(w.len(), 2, "{w:?}");
    }

    #[test]
    fn pin_table() {
        let mut w = vec![];
        let mut s = Settings::default();
        assert!(s.pin.enabled);
        assert_eq!(s.pin.budget_bytes(2 << 30), (2u64 << 30) / 10);
        assert_eq!(s.pin.budget_bytes(64 << 30), 512 << 20);
        apply_toml(
            &mut s,
            r#"
[pin]
budget = "64M"
half_life = 60
pin_high = 3
pin_low = 0.5
tracked = 0
every = "often"
speed = 1
"#,
            &mut w,
        );
        assert_eq!(s.pin.budget_bytes(64 << 30), 64 << 20);
        assert_eq!(s.pin.half_life, 60);
        assert_eq!((s.pin.pin_high, s.pin.pin_low), (3.0, 0.5));
        assert_eq!(s.pin.tracked, 20_000, "0 files refused");
        assert_eq!(s.pin.every, 10, "not a number: the default");
        assert_eq!(w.len(), 3, "{w:?}");
        // a low bar above the high one is brought down to it
        apply_toml(&mut s, "[pin]\npin_low = 9\n", &mut w);
        assert_eq!(s.pin.pin_low, 3.0);
        assert!(w.last().unwrap().contains("above pin.pin_high"), "{w:?}");
        merge_params(&mut s, &cmdline::parse("mados.pin=off"));
        assert!(!s.pin.enabled);
        assert!(s.pin.prefetch);
        merge_params(&mut s, &cmdline::parse("mados.prefetch=off"));
        assert!(!s.pin.prefetch);
        assert_eq!(s.pin.prefetch_bytes(2 << 30), (2u64 << 30) / 5);
        apply_toml(
            &mut s,
            "[pin]\nprefetch_budget = \"64M\"\nprefetch_time = 5\nsave_every = 0\n[tier]\nadopt_suggested = true\n",
            &mut w,
        );
        assert_eq!(s.pin.prefetch_bytes(2 << 30), 64 << 20);
        assert_eq!(s.pin.prefetch_time, 5);
        assert_eq!(s.pin.save_every, 600, "0 s refused");
        assert!(s.tier.adopt_suggested);
    }

    #[test]
    fn a_saved_config_changes_only_what_lives_in_ram() {
        let params = cmdline::parse("mados.tier=off");
        let mut w = vec![];
        let early = resolve_text(Some("label = \"stick\""), &params, &mut w);
        let late = resolve_text(
            Some(
                r#"
label = "other"
bind_dirs = ["/srv"]
[tier]
dirs = ["/var/log", "/home/live/build"]
[user_cache]
size = "64M"
keep = ["pip", "a/b"]
"#,
            ),
            &params,
            &mut w,
        );
        let (s, notes) = with_late_keys(&early, &late);
        assert_eq!(s.tier.dirs, ["/var/log", "/home/live/build"]);
        assert!(!s.tier.enabled, "the command line still wins");
        assert_eq!(s.user_cache.size, Size::Bytes(64 * MIB));
        assert_eq!(s.user_cache.keep, ["pip"]);
        assert_eq!(s.label, "stick");
        assert_eq!(s.bind_dirs, ["/home"]);
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(
            notes[0].contains("'bind_dirs'") && notes[1].contains("'label'"),
            "{notes:?}"
        );
        assert!(w.iter().any(|m| m.contains("a/b")), "{w:?}");
        // the same file: nothing to report
        assert!(with_late_keys(&early, &early).1.is_empty());
    }

    #[test]
    fn every_late_key_is_taken_from_the_saved_file() {
        // the keys listed and the fields copied cannot drift apart
        let mut w = vec![];
        let p = cmdline::parse("");
        let early = resolve_text(None, &p, &mut w);
        let late = resolve_text(
            Some(
                r#"
cache_binds = ["/var/cache/x"]
[[tmpfs]]
path = "/scratch"
size = "1G"
[tier]
idle = 7
[cleanup]
age = 9
[user_cache]
enabled = false
[pin]
every = 3
"#,
            ),
            &p,
            &mut w,
        );
        assert!(w.is_empty(), "{w:?}");
        let (s, notes) = with_late_keys(&early, &late);
        assert!(notes.is_empty(), "{notes:?}");
        let (s, late, early) = (
            serde_json::to_value(&s).unwrap(),
            serde_json::to_value(&late).unwrap(),
            serde_json::to_value(&early).unwrap(),
        );
        for k in LATE_KEYS {
            assert_ne!(late[k], early[k], "the test changes {k}");
            assert_eq!(s[k], late[k], "{k} is taken from the saved file");
        }
    }

    #[test]
    fn broken_toml_keeps_defaults() {
        let mut w = vec![];
        let mut s = Settings::default();
        apply_toml(&mut s, "mode = ", &mut w);
        assert_eq!(s, Settings::default());
        assert!(w[0].contains("not valid TOML"));
    }

    #[test]
    fn resolve_reads_the_live_root() {
        let dir = std::env::temp_dir().join(format!("mados-cfg-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("etc/mados")).unwrap();
        std::fs::write(dir.join(CONFIG_PATH), "label = \"mystick\"\n").unwrap();
        let mut w = vec![];
        let s = resolve(
            &dir,
            &cmdline::parse("archisolabel=ARCH_X cow_spacesize=bad"),
            &mut w,
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(s.label, "mystick");
        assert_eq!(s.iso_label.as_deref(), Some("ARCH_X"));
        assert_eq!(w.len(), 1, "{w:?}");
    }
}
