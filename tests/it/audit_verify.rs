//! `audit_verify` on the library's chained audit log: the summary counts
//! who opened how many distinct records for which purpose; any edit or
//! deletion is caught and named.

use crate::common;

use std::process::Command;

use common::example_binary;
use panseal::config::ClientConfig;
use panseal::{blocking, Access, Context, Pan};

#[test]
fn audit_verify_summarizes_and_catches_tampering() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.log");
    let key = dir.path().join("audit.key");
    let config = ClientConfig::from_json(&format!(
        r#"{{"environment":"test","scope":"m","key_service":{{"type":"local"}},
            "key_store":{{"type":"memory"}},
            "audit":{{"type":"chained","path":"{}","key_file":"{}"}}}}"#,
        log.display(),
        key.display()
    ))
    .unwrap();
    let ps = blocking::Panseal::build(config.builder().unwrap()).unwrap();
    let pan = Pan::parse("4111111111111111").unwrap();
    let rows: Vec<_> = (0..3)
        .map(|i| {
            let c = Context::new("cards", "pan", i.to_string()).unwrap();
            (c.clone(), ps.seal_pan(&pan, &c).unwrap())
        })
        .collect();
    let alice = Access::new("alice", "refund").unwrap();
    let bob = Access::new("bob", "chargeback").unwrap();
    for (c, s) in &rows {
        ps.open_pan(s, c, &alice).unwrap();
    }
    ps.open_pan(&rows[0].1, &rows[0].0, &alice).unwrap();
    ps.open_pan(&rows[1].1, &rows[1].0, &bob).unwrap();
    assert!(ps.open_pan(&rows[1].1, &rows[2].0, &bob).is_err());
    drop(ps);

    let tool = example_binary("audit_verify");
    let run = || {
        Command::new(&tool)
            .arg("--log")
            .arg(&log)
            .arg("--key")
            .arg(&key)
            .arg("--json")
            .output()
            .unwrap()
    };
    let out = run();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let who = |p: &str| {
        report["accesses"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["principal"] == p)
            .unwrap()
            .clone()
    };
    assert_eq!(who("alice")["opens"], 4);
    assert_eq!(who("alice")["distinct_records"], 3);
    assert_eq!(who("alice")["purpose"], "refund");
    assert_eq!(who("bob")["opens"], 2);
    assert_eq!(who("bob")["failures"], 1);
    assert_eq!(who("bob")["distinct_records"], 1);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("4111111111111111"));

    // Edit one record: caught, and named.
    let original = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = original.lines().collect();
    let target = lines.iter().position(|l| l.contains("\"bob\"")).unwrap();
    let mut edited: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    edited[target] = edited[target].replace("\"bob\"", "\"eve\"");
    std::fs::write(&log, edited.join("\n") + "\n").unwrap();
    let out = run();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("TAMPERED"), "{err}");
    assert!(
        err.contains(&(target + 1).to_string()),
        "names record {}: {err}",
        target + 1
    );
    // Delete one record: caught too.
    let mut deleted: Vec<&str> = lines.clone();
    deleted.remove(1);
    std::fs::write(&log, deleted.join("\n") + "\n").unwrap();
    assert_eq!(run().status.code(), Some(1));
    // Restored, it verifies again.
    std::fs::write(&log, &original).unwrap();
    assert!(run().status.success());

    // With an anchor kept elsewhere, a cut tail and a deleted log are
    // caught too (the chain alone cannot show either).
    let anchor = dir.path().join("elsewhere.anchor");
    let with = |extra: &[&std::ffi::OsStr]| {
        Command::new(&tool)
            .arg("--log")
            .arg(&log)
            .arg("--key")
            .arg(&key)
            .args(extra)
            .output()
            .unwrap()
    };
    let o = with(&["--write-anchor".as_ref(), anchor.as_os_str()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cut = lines[..lines.len() - 2].join("\n") + "\n";
    std::fs::write(&log, cut).unwrap();
    assert!(run().status.success(), "the chain alone accepts a cut tail");
    let o = with(&["--anchor".as_ref(), anchor.as_os_str()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("log cut"));
    std::fs::remove_file(&log).unwrap();
    let o = with(&["--anchor".as_ref(), anchor.as_os_str()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("missing"));
    std::fs::write(&log, &original).unwrap();
    assert!(with(&["--anchor".as_ref(), anchor.as_os_str()])
        .status
        .success());
}
