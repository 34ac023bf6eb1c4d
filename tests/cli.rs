//! The command-line surface: help with examples for every subcommand,
//! completions and the man page generated from the clap definitions, and
//! the documented exit codes for usage errors and refusals.

use std::process::{Command, Output};

fn mp(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mados-persistence"))
        .args(args)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn every_subcommand_explains_itself_with_an_example() {
    for sub in [
        "boot",
        "plan",
        "status",
        "enable",
        "disable",
        "remove",
        "completions",
        "man",
    ] {
        let o = mp(&[sub, "--help"]);
        assert!(o.status.success(), "{sub} --help failed");
        let text = stdout(&o);
        assert!(
            text.contains("Example"),
            "{sub} --help has no example:\n{text}"
        );
    }
    let top = stdout(&mp(&["--help"]));
    for sub in ["boot", "plan", "status", "enable", "disable", "remove"] {
        assert!(top.contains(sub), "--help does not list {sub}");
    }
}

#[test]
fn completions_and_man_page() {
    let bash = stdout(&mp(&["completions", "bash"]));
    assert!(
        bash.contains("_mados__persistence()") && bash.contains("enable"),
        "{bash}"
    );
    let zsh = stdout(&mp(&["completions", "zsh"]));
    assert!(zsh.starts_with("#compdef mados-persistence"), "{zsh}");
    let man = stdout(&mp(&["man"]));
    assert!(
        man.starts_with(".ie") || man.contains(".TH mados-persistence"),
        "{man}"
    );
    assert!(man.contains("status"), "{man}");
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(mp(&["frobnicate"]).status.code(), Some(2));
    assert_eq!(mp(&["enable", "--size", "lots"]).status.code(), Some(2));
    assert_eq!(mp(&["plan"]).status.code(), Some(2), "plan needs --device");
}

#[test]
fn plan_on_a_missing_file_is_an_error_with_context() {
    let o = mp(&["plan", "--device", "/nonexistent/stick.img"]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("opening /nonexistent/stick.img"), "{e}");
}
