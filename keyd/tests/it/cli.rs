//! `panseal-keyd`'s command line, run as a process: `--help` of every
//! subcommand and custodian action exits 0 and names its flags; usage
//! errors (unknown flag, missing required flag, bad value, unknown
//! subcommand) exit 2 with a message that names the problem.

use std::process::{Command, Output};

fn keyd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_panseal-keyd"))
        .args(args)
        .output()
        .expect("run panseal-keyd")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The connection flags every custodian action takes.
const CONN: &[&str] = &[
    "--address",
    "--server-name",
    "--ca",
    "--cert",
    "--key",
    "--environment",
];

/// Every subcommand with the flags its `--help` must name.
const COMMANDS: &[(&[&str], &[&str])] = &[
    (&["gen-dev-certs"], &["--out", "--client", "--host"]),
    (
        &["init"],
        &["--config", "--threshold", "--custodian", "--listen"],
    ),
    (&["serve"], &["--config", "--listen"]),
    (
        &["verify-audit"],
        &["--config", "--log", "--key", "--anchor"],
    ),
    (&["fingerprint"], &["CERT.pem"]),
    (&["check-config"], &["--config"]),
    (&["dev"], &["--dir", "--listen", "--environment"]),
    (&["wait"], &["--address", "--file", "--seconds"]),
];

/// Every custodian action with the flags (besides [`CONN`]) its `--help`
/// must name.
const ACTIONS: &[(&str, &[&str])] = &[
    ("status", &[]),
    ("acknowledge", &["--statement"]),
    ("collect-share", &["--share-file", "--statement"]),
    ("unseal", &["--share-file", "--expect-generation"]),
    ("seal", &[]),
    ("kek-status", &["--scope"]),
    ("rotate", &["--scope"]),
    ("retire", &["--scope", "--version"]),
    ("approve-destroy", &["--scope", "--version"]),
    ("approve-destroy-dek", &["--key-id", "--scope", "--purpose"]),
    ("withdraw", &["--scope", "--version"]),
    ("withdraw-dek", &["--key-id", "--scope", "--purpose"]),
    ("reshare", &["--threshold", "--custodian", "--share-file"]),
    ("index-create", &["--scope"]),
    ("index-list", &["--scope"]),
    ("index-retire", &["--scope", "--version"]),
    ("index-destroy", &["--scope", "--version"]),
    ("ingest-create", &["--scope"]),
    ("ingest-list", &["--scope"]),
    ("ingest-retire", &["--scope", "--version"]),
    ("ingest-destroy", &["--scope", "--version"]),
];

fn assert_help(args: &[&str], flags: &[&str]) {
    let mut with_help = args.to_vec();
    with_help.push("--help");
    let o = keyd(&with_help);
    assert_eq!(o.status.code(), Some(0), "{args:?} --help: {}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("Usage:"), "{args:?} --help:\n{text}");
    for f in flags {
        assert!(
            text.contains(f),
            "{args:?} --help does not name {f}:\n{text}"
        );
    }
}

#[test]
fn help_of_the_program_names_every_subcommand() {
    for args in [&["--help"][..], &["help"], &["-h"]] {
        let o = keyd(args);
        assert_eq!(o.status.code(), Some(0), "{args:?}");
        let text = stdout(&o);
        for (cmd, _) in COMMANDS {
            assert!(text.contains(cmd[0]), "{args:?} does not name {}", cmd[0]);
        }
        assert!(text.contains("custodian"));
    }
}

#[test]
fn help_of_every_subcommand_exits_0_and_names_its_flags() {
    for (args, flags) in COMMANDS {
        assert_help(args, flags);
    }
    // `help SUBCOMMAND` works as well.
    let o = keyd(&["help", "serve"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains("--listen"));
}

#[test]
fn help_of_every_custodian_action_exits_0_and_names_its_flags() {
    let o = keyd(&["custodian", "--help"]);
    assert_eq!(o.status.code(), Some(0));
    let list = stdout(&o);
    for (action, flags) in ACTIONS {
        assert!(
            list.contains(action),
            "custodian --help does not list {action}"
        );
        let mut all: Vec<&str> = CONN.to_vec();
        all.extend_from_slice(flags);
        assert_help(&["custodian", action], &all);
    }
}

#[test]
fn no_arguments_prints_the_usage_and_exits_2() {
    let o = keyd(&[]);
    assert_eq!(o.status.code(), Some(2));
    let text = stderr(&o);
    assert!(text.contains("Usage:") && text.contains("serve"), "{text}");
}

/// Exit 2, and stderr contains every one of `needles`.
fn assert_usage_error(args: &[&str], needles: &[&str]) {
    let o = keyd(args);
    let text = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{args:?}: {text}");
    for n in needles {
        assert!(text.contains(n), "{args:?}: {n:?} not in\n{text}");
    }
}

#[test]
fn an_unknown_flag_exits_2_and_names_it() {
    assert_usage_error(
        &["serve", "--config", "keyd.toml", "--port", "1"],
        &["unexpected argument", "--port"],
    );
    assert_usage_error(
        &["custodian", "seal", "--scope", "payments"],
        &["unexpected argument", "--scope"],
    );
}

#[test]
fn a_missing_required_flag_exits_2_and_names_it() {
    assert_usage_error(&["serve"], &["required", "--config"]);
    assert_usage_error(&["gen-dev-certs"], &["required", "--out"]);
    assert_usage_error(
        &["init", "--config", "keyd.toml", "--threshold", "2"],
        &["required", "--custodian"],
    );
    assert_usage_error(&["verify-audit"], &["required", "--log", "--key"]);
    assert_usage_error(&["fingerprint"], &["required", "CERT.pem"]);
    assert_usage_error(
        &[
            "custodian",
            "rotate",
            "--address",
            "127.0.0.1:1",
            "--ca",
            "ca.pem",
            "--cert",
            "a.pem",
            "--key",
            "a.key.pem",
            "--environment",
            "test",
        ],
        &["required", "--scope"],
    );
    assert_usage_error(&["custodian", "status"], &["required", "--address"]);
    assert_usage_error(&["custodian"], &["Usage:"]);
}

#[test]
fn a_bad_value_exits_2_and_names_the_flag() {
    assert_usage_error(
        &["serve", "--config", "keyd.toml", "--listen", "nowhere"],
        &["invalid value", "nowhere", "--listen"],
    );
    assert_usage_error(
        &[
            "init",
            "--config",
            "keyd.toml",
            "--threshold",
            "two",
            "--custodian",
            "alice",
        ],
        &["invalid value", "two", "--threshold"],
    );
    let conn = [
        "--address",
        "127.0.0.1:1",
        "--ca",
        "ca.pem",
        "--cert",
        "a.pem",
        "--key",
        "a.key.pem",
        "--environment",
        "test",
    ];
    let mut retire = vec![
        "custodian",
        "retire",
        "--scope",
        "payments",
        "--version",
        "x",
    ];
    retire.extend(conn);
    assert_usage_error(&retire, &["invalid value", "--version"]);
    let mut dek = vec![
        "custodian",
        "withdraw-dek",
        "--key-id",
        "00",
        "--scope",
        "payments",
        "--purpose",
        "audit",
    ];
    dek.extend(conn);
    assert_usage_error(&dek, &["invalid value", "audit", "data", "index"]);
    // Both ways of naming the log at once.
    assert_usage_error(
        &[
            "verify-audit",
            "--config",
            "keyd.toml",
            "--log",
            "audit.log",
        ],
        &["cannot be used with"],
    );
}

#[test]
fn an_unknown_subcommand_or_action_exits_2() {
    assert_usage_error(&["start"], &["unrecognized subcommand", "start"]);
    assert_usage_error(
        &["custodian", "destroy"],
        &["unrecognized subcommand", "destroy"],
    );
}

/// A failing command (not a usage error) still exits 2 with its reason, as
/// before clap.
#[test]
fn a_failing_command_exits_2_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.toml");
    let o = keyd(&["serve", "--config", missing.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).starts_with("panseal-keyd: "), "{}", stderr(&o));
    assert!(stderr(&o).contains("missing.toml"), "{}", stderr(&o));
}

/// A flag given twice: the last one counts (as the hand-written parser
/// did), and `--flag=value` works too; a repeatable flag keeps every value.
#[test]
fn a_repeated_flag_takes_the_last_value() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs");
    let o = keyd(&[
        "gen-dev-certs",
        "--out",
        "/nonexistent/never/written",
        &format!("--out={}", out.display()),
        "--client",
        "alice",
        "--client=bob",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(out.join("alice.pem").exists());
    assert!(out.join("bob.pem").exists());
    let fp = keyd(&["fingerprint", out.join("alice.pem").to_str().unwrap()]);
    assert_eq!(fp.status.code(), Some(0));
    let printed = stdout(&fp);
    let written = std::fs::read_to_string(out.join("alice.sha256")).unwrap();
    assert_eq!(printed.trim(), written.trim());
}

/// `check-config` loads a configuration as `serve` does: a good one exits 0
/// listing every principal; a principal scope that is a pattern (only
/// `auto_create_scopes` and `[[record_cap]]` take patterns), a missing
/// certificate file or an unknown field exit 2 naming what is wrong, and
/// nothing is written beside the configuration.
#[test]
fn check_config_lists_principals_and_names_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let o = keyd(&[
        "gen-dev-certs",
        "--out",
        certs.to_str().unwrap(),
        "--client",
        "checkout",
        "--client",
        "alice",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let base = "listen = \"127.0.0.1:8443\"\ndata_dir = \"data\"\nenvironments = [\"prod\"]\n\
                tls_cert = \"certs/server.pem\"\ntls_key = \"certs/server.key.pem\"\n\
                client_ca = \"certs/ca.pem\"\n\
                [[principal]]\nname = \"alice\"\ncert = \"certs/alice.pem\"\n\
                environment = \"prod\"\nscopes = [\"*\"]\npermissions = [\"custodian\"]\n";
    let check = |extra: &str| {
        let path = dir.path().join("keyd.toml");
        std::fs::write(&path, format!("{base}{extra}")).unwrap();
        keyd(&["check-config", "--config", path.to_str().unwrap()])
    };
    let good = "[[principal]]\nname = \"checkout\"\ncert = \"certs/checkout.pem\"\n\
                environment = \"prod\"\nscopes = [\"merchant-42\"]\npermissions = [\"wrap\", \"index\"]\n";
    let o = check(good);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("valid; listen 127.0.0.1:8443, environments prod, 2 principals"),
        "{out}"
    );
    assert!(
        out.contains("alice: environment prod, scopes *, permissions custodian"),
        "{out}"
    );
    assert!(
        out.contains("checkout: environment prod, scopes merchant-42, permissions wrap, index"),
        "{out}"
    );
    for (extra, needle) in [
        (
            good.replace("merchant-42", "merchant-*"),
            "principal \"checkout\": invalid name",
        ),
        (good.replace("checkout.pem", "missing.pem"), "missing.pem"),
        (format!("{good}colour = \"blue\"\n"), "colour"),
    ] {
        let o = check(&extra);
        assert_eq!(o.status.code(), Some(2), "{extra}");
        assert!(
            stderr(&o).contains(needle),
            "{needle:?} not in {}",
            stderr(&o)
        );
    }
    assert!(
        !dir.path().join("data").exists(),
        "check-config wrote a data directory"
    );
}
