//! `plan --device`: read a device or image and say what `boot` would do,
//! as a JSON value and as text: use, create, adopt (a filesystem a
//! re-flash left), resume (a creation a power cut interrupted), or
//! nothing and why. Changes nothing.

use crate::disk::{partplan, stick};
use crate::settings::config::Settings;
use crate::settings::size::human;
use crate::settings::{cmdline, config};
use anyhow::Result;
use std::path::Path;

/// `plan --device PATH [--json] [--cmdline ...]`: print what boot would do.
pub fn plan(device: &Path, json: bool, cmdline: &str) -> Result<()> {
    crate::util::logging::init(false, log::LevelFilter::Warn);
    let mut warnings = vec![];
    let mut s = Settings::default();
    config::merge_params(&mut s, &cmdline::parse(cmdline));
    warnings.extend(cmdline::parse(cmdline).warnings);
    for w in &warnings {
        eprintln!("mados-persistence: warning: {w}");
    }
    let v = plan_device(device, &s)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_plan(&v);
    }
    Ok(())
}

/// For `plan --device`: read a device or image and say what boot would do.
pub fn plan_device(path: &Path, s: &Settings) -> Result<serde_json::Value> {
    let mut o = stick::open_device(path, false)?;
    let existing = stick::find_persistence(&mut o, &s.label);
    // an encrypted one (a LUKS2 volume labelled so) is used as well: the
    // boot unlocks it
    let encrypted = match &existing {
        Some(_) => None,
        None => stick::find_encrypted(&mut o, &s.label),
    };
    let existing = existing.or(encrypted.clone());
    // what `boot` and `enable` would decide (`stick::prepare`): finish an
    // interrupted creation, put back a filesystem a re-flash left, or a
    // new partition (shown with a zero GUID, so the plan is repeatable)
    let prepared = match &existing {
        Some(_) => None,
        None => Some(stick::prepare(&mut o, s)),
    };
    // tables the kernel and libfdisk read differently: refused (exit 3),
    // naming both readings, unless our own interrupted creation is there
    // to be resumed
    if let Some(why) = &o.layout.disagreement
        && !matches!(prepared, Some(Ok(stick::Prepared::Resume(_))))
    {
        return Err(crate::disk::layout::Invalid(why.clone()).into());
    }
    let (l, size, ss) = (&o.layout, o.layout.size, o.layout.sector_size);
    let action = match (&existing, prepared) {
        (Some(e), _) => serde_json::json!({
            "action": "use",
            "partition": e,
            "encrypted": encrypted.is_some(),
        }),
        (None, Some(Ok(stick::Prepared::Adopt(p)))) => {
            serde_json::json!({"action": "adopt", "plan": p})
        }
        (None, Some(Ok(stick::Prepared::Resume(c)))) => serde_json::json!({
            "action": "resume",
            "partition": {"number": c.number, "start": c.start, "size": c.size},
        }),
        (None, prepared) => match (
            partplan::plan(l, &stick::plan_options(s, [0; 16])),
            prepared,
        ) {
            // the layout itself refused: the refusal, by kind
            (Err(r), _) => {
                serde_json::json!({"action": "none", "refusal": r, "message": r.to_string()})
            }
            // refused beyond the plan (a filesystem in the way, a table
            // changed since an interrupted creation)
            (Ok(_), Some(Err(e))) => {
                serde_json::json!({"action": "none", "message": format!("{e:#}")})
            }
            (Ok(p), _) => serde_json::json!({"action": "create", "plan": p}),
        },
    };
    Ok(serde_json::json!({
        "device": path.display().to_string(),
        "size": size,
        "sector_size": ss,
        "layout": l,
        "extents": l.extents(),
        "used_end": l.used_end(),
        "result": action,
    }))
}

fn print_plan(v: &serde_json::Value) {
    let u = |x: &serde_json::Value| x.as_u64().unwrap_or(0);
    println!("device:       {}", v["device"].as_str().unwrap_or("?"));
    println!(
        "size:         {} ({} bytes, {}-byte sectors)",
        human(u(&v["size"])),
        u(&v["size"]),
        u(&v["sector_size"])
    );
    let l = &v["layout"];
    println!("table in use: {}", l["table"].as_str().unwrap_or("?"));
    if let Some(iso) = l["iso"].as_object() {
        println!(
            "ISO 9660:     '{}' uuid {} ({})",
            iso["label"].as_str().unwrap_or(""),
            iso["uuid"].as_str().unwrap_or(""),
            human(u(&iso["size"]))
        );
    }
    println!(
        "\nwhat is on it (nothing is placed below its end, byte {}):",
        u(&v["used_end"])
    );
    for e in v["extents"].as_array().into_iter().flatten() {
        println!(
            "  {:>14} .. {:<14} {}",
            u(&e["start"]),
            u(&e["end"]),
            e["what"].as_str().unwrap_or("")
        );
    }
    let f = l["findings"].as_array().cloned().unwrap_or_default();
    if !f.is_empty() {
        println!("\nfindings:");
        for x in f {
            println!("  - {}", x.as_str().unwrap_or(""));
        }
    }
    let r = &v["result"];
    println!();
    match r["action"].as_str() {
        Some("use") => println!(
            "{}persistence partition {} exists: nothing to do",
            if r["encrypted"] == true {
                "encrypted (LUKS2) "
            } else {
                ""
            },
            r["partition"]["number"]
        ),
        Some("resume") => println!(
            "partition {} at byte {} was started by an earlier run and not finished (power cut?): \
             would finish it (its table writes replayed from the claim, then formatted)",
            r["partition"]["number"],
            u(&r["partition"]["start"])
        ),
        Some(a @ ("create" | "adopt")) => {
            let p = &r["plan"];
            if a == "adopt" {
                println!(
                    "a 'persistence' filesystem left by an earlier release is at byte {} ({}): \
                     would put its entry back as partition {} in the {} table, never formatting it, writing:",
                    u(&p["start"]),
                    human(u(&p["size"])),
                    p["number"],
                    p["table"].as_str().unwrap_or("?")
                );
            } else {
                println!(
                    "would create partition {} in the {} table at byte {} ({}), writing:",
                    p["number"],
                    p["table"].as_str().unwrap_or("?"),
                    u(&p["start"]),
                    human(u(&p["size"]))
                );
            }
            for w in p["writes"].as_array().into_iter().flatten() {
                println!(
                    "  {} bytes at {}: {}",
                    u(&w["len"]),
                    u(&w["offset"]),
                    w["what"].as_str().unwrap_or("")
                );
            }
        }
        _ => println!(
            "would not create persistence: {}",
            r["message"].as_str().unwrap_or("?")
        ),
    }
}
