//! The one binary: early boot (`boot`), planning (`plan`); after-boot
//! commands come as further subcommands. All logic is in the library.

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use mados_persistence::size::{Size, human};
use mados_persistence::{boot, cmdline, config, logging, manage};
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
    /// Is my work being saved, and if not, why? (no root needed)
    #[command(
        after_help = "Examples:\n  mados-persistence status\n  mados-persistence status --json | jq .mode"
    )]
    Status {
        /// Print one JSON document (schema in README: \"status --json\").
        #[arg(long)]
        json: bool,
    },
    /// Create persistence on the boot stick (or --device), keeping this session's changes.
    #[command(after_help = "Examples:\n  sudo mados-persistence enable\n  \
        mados-persistence enable --device madOS.img --size 4G --yes   # prepare an image before its first boot")]
    Enable {
        /// A block device or disk image file (default: the stick this system booted from).
        #[arg(long)]
        device: Option<PathBuf>,
        /// Cap on the new partition's size (default: all free space after the ISO).
        #[arg(long, value_parser = parse_size)]
        size: Option<Size>,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Boot in RAM mode from the next boot on (or once), keeping the data.
    #[command(
        after_help = "Examples:\n  sudo mados-persistence disable --once\n  sudo mados-persistence enable   # undo"
    )]
    Disable {
        /// Only the next boot runs in RAM mode.
        #[arg(long)]
        once: bool,
        /// A block device or disk image file (default: the boot stick).
        #[arg(long)]
        device: Option<PathBuf>,
    },
    /// Permanently delete the persistence partition; the ISO stays bootable.
    #[command(
        after_help = "Examples:\n  sudo mados-persistence remove\n  mados-persistence remove --device madOS.img --yes"
    )]
    Remove {
        /// Do not ask (otherwise you type the word `remove`).
        #[arg(long)]
        yes: bool,
        /// A block device or disk image file (default: the boot stick).
        #[arg(long)]
        device: Option<PathBuf>,
    },
    /// Print shell completions.
    #[command(
        after_help = "Example:\n  mados-persistence completions bash > /usr/share/bash-completion/completions/mados-persistence"
    )]
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff).
    #[command(
        after_help = "Example:\n  mados-persistence man > /usr/share/man/man8/mados-persistence.8"
    )]
    Man,
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

fn parse_size(s: &str) -> Result<Size, String> {
    match Size::parse(s) {
        Ok(Size::Percent(_)) => Err("give an absolute size such as 8G".into()),
        Ok(v) => Ok(v),
        Err(e) => Err(e.to_string()),
    }
}

/// Exit codes: 0 ok, 1 error, 2 usage (clap), 3 refused for safety.
fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) if e.downcast_ref::<manage::Refused>().is_some() => {
            eprintln!("mados-persistence: {e:#}");
            ExitCode::from(3)
        }
        Err(e) => {
            eprintln!("mados-persistence: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Settings for the after-boot commands: the running system's config.
fn running_settings() -> config::Settings {
    let mut w = vec![];
    let s = config::resolve(
        std::path::Path::new("/"),
        &cmdline::BootParams::default(),
        &mut w,
    );
    for x in w {
        eprintln!("mados-persistence: warning: {x}");
    }
    s
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
        Cmd::Status { json } => {
            manage::status(json)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Enable { device, size, yes } => {
            logging::init(false, log::LevelFilter::Warn);
            manage::enable(device, size, yes, &running_settings())?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Disable { once, device } => {
            logging::init(false, log::LevelFilter::Warn);
            manage::disable(device, once, &running_settings())?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Remove { yes, device } => {
            logging::init(false, log::LevelFilter::Warn);
            manage::remove(device, yes, &running_settings())?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "mados-persistence",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Man => {
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
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
