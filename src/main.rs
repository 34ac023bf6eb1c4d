//! The one binary: early boot (`boot`), planning (`plan`); after-boot
//! commands come as further subcommands. All logic is in the library.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use mados_persistence::{boot, cmdline, config, logging, size::human};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "mados-persistence",
    version,
    about = "Persistence for live USB sticks: keep /etc, /usr, /var, /opt and /home across reboots",
    long_about = "Persistence for live USB sticks.\n\n\
        In the initramfs, `boot` finds the stick the live ISO was booted from, creates or checks the \
        ext4 partition labelled `persistence` after the ISO, and layers it over the live root. \
        Anything unexpected ends in RAM mode with the reason recorded in \
        /run/mados-persistence/state.json; the stick stays bootable."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Early boot: find the stick, create/check/mount persistence, layer the overlays.
    #[command(
        after_help = "Example (mkinitcpio late hook):\n  mados-persistence boot --root /new_root"
    )]
    Boot {
        /// The live root assembled by the initramfs.
        #[arg(long, default_value = "/new_root")]
        root: PathBuf,
        /// Use this instead of /proc/cmdline.
        #[arg(long)]
        cmdline: Option<String>,
        /// Where sysfs is mounted.
        #[arg(long, default_value = "/sys", hide = true)]
        sysfs: PathBuf,
        /// The /run that will be moved into the new root.
        #[arg(long, default_value = "/run", hide = true)]
        run: PathBuf,
    },
    /// Show a device's or image's layout, its isohybrid gaps, and what boot would do. Changes nothing.
    #[command(
        after_help = "Examples:\n  mados-persistence plan --device /dev/sdb\n  mados-persistence plan --device madOS.img --json"
    )]
    Plan {
        /// A block device or a disk image file.
        #[arg(long)]
        device: PathBuf,
        /// Print one JSON document instead of text.
        #[arg(long)]
        json: bool,
        /// Kernel command line whose parameters apply (e.g. mados.persistence.size=8G).
        #[arg(long, default_value = "")]
        cmdline: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mados-persistence: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Boot {
            root,
            cmdline,
            sysfs,
            run,
        } => {
            let cmdline = match cmdline {
                Some(c) => c,
                None => {
                    std::fs::read_to_string("/proc/cmdline").context("reading /proc/cmdline")?
                }
            };
            let debug = cmdline::parse(&cmdline).debug;
            logging::init(
                true,
                if debug {
                    log::LevelFilter::Debug
                } else {
                    log::LevelFilter::Info
                },
            );
            let st = boot::run(&boot::BootOptions {
                root,
                cmdline,
                sysfs,
                run,
            });
            // The boot goes on whatever happened; the exit code only tells the hook.
            println!("mados-persistence: mode {}", st.mode);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Plan {
            device,
            json,
            cmdline,
        } => {
            logging::init(false, log::LevelFilter::Warn);
            let mut warnings = vec![];
            let mut s = config::Settings::default();
            config::merge_params(&mut s, &cmdline::parse(&cmdline));
            warnings.extend(cmdline::parse(&cmdline).warnings);
            for w in &warnings {
                eprintln!("mados-persistence: warning: {w}");
            }
            let v = boot::plan_device(&device, &s)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_plan(&v);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
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
            "persistence partition {} exists: nothing to do",
            r["partition"]["number"]
        ),
        Some("create") => {
            let p = &r["plan"];
            println!(
                "would create partition {} in the {} table at byte {} ({}), writing:",
                p["number"],
                p["table"].as_str().unwrap_or("?"),
                u(&p["start"]),
                human(u(&p["size"]))
            );
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
