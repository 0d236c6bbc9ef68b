//! `audit_verify` — verify a hash-chained audit log (PCI DSS 10.3.2/10.3.4)
//! and summarize it: who opened how many distinct card records, for which
//! purpose, with how many failures (PCI DSS 10.2.1–2). Works on the
//! library's own chained log (`"audit": {"type": "chained", …}`); keyd's
//! request log is verified by `panseal-keyd verify-audit`.
//!
//! ```text
//! cargo run --example audit_verify -- --log audit.log --key audit.key \
//!     [--anchor audit.anchor] [--write-anchor audit.anchor] [--json]
//! ```
//!
//! A chain alone cannot show a cut tail or a deleted log: `--write-anchor`
//! saves the verified count and head (MACed under the audit key) to a file
//! kept elsewhere; `--anchor` later refuses a log that no longer reaches it.
//!
//! Exit status: 0 intact, 1 tampered (the first bad record is named), 2 for
//! any other error.

use std::collections::{BTreeMap, HashSet};
use std::process::ExitCode;

use clap::Parser;
use panseal::{read_audit_anchor, verify_audit_chain_anchored, AuditError, AuditKey, ChainSummary};
use serde::Serialize;

#[derive(Parser)]
#[command(about = "Verify a hash-chained audit log and summarize who opened what")]
struct Args {
    /// The log file.
    #[arg(long)]
    log: std::path::PathBuf,
    /// The chain key file (64 hex digits).
    #[arg(long)]
    key: std::path::PathBuf,
    /// An anchor written earlier: the log must still reach it.
    #[arg(long)]
    anchor: Option<std::path::PathBuf>,
    /// After verifying, write the log's count and head to this anchor file.
    #[arg(long)]
    write_anchor: Option<std::path::PathBuf>,
    /// JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Default, Serialize)]
struct PerAccess {
    principal: String,
    purpose: String,
    opens: u64,
    failures: u64,
    distinct_records: usize,
    distinct_keys: usize,
    #[serde(skip)]
    records: HashSet<String>,
    #[serde(skip)]
    keys: HashSet<String>,
}

#[derive(Serialize)]
struct Report {
    records: u64,
    head: String,
    accesses: Vec<PerAccess>,
    unwraps: u64,
    key_state_changes: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Tampered(msg)) => {
            eprintln!("audit_verify: TAMPERED: {msg}");
            ExitCode::from(1)
        }
        Err(Failure::Other(msg)) => {
            eprintln!("audit_verify: {msg}");
            ExitCode::from(2)
        }
    }
}

enum Failure {
    Tampered(String),
    Other(String),
}

fn run(args: &Args) -> Result<(), Failure> {
    let other = |e: &dyn std::fmt::Display| Failure::Other(e.to_string());
    let key = AuditKey::load_file(&args.key).map_err(|e| other(&e))?;
    let anchor = match &args.anchor {
        Some(a) => read_audit_anchor(a, &key).map_err(|e| match e {
            AuditError::Rejected(m) => Failure::Tampered(format!("anchor {}: {m}", a.display())),
            e => other(&e),
        })?,
        None => ChainSummary::genesis(),
    };
    let summary = match verify_audit_chain_anchored(&args.log, &key, &anchor) {
        Ok(s) => s,
        Err(e @ AuditError::Tampered { .. }) => return Err(Failure::Tampered(e.to_string())),
        Err(e) => return Err(other(&e)),
    };
    if let Some(path) = &args.write_anchor {
        let key = AuditKey::load_file(&args.key).map_err(|e| other(&e))?;
        panseal::ChainedAuditLog::open_anchored(&args.log, key, &summary)
            .and_then(|log| log.write_anchor(path))
            .map_err(|e| other(&e))?;
    }
    // Intact: now read the events.
    let text = std::fs::read_to_string(&args.log).map_err(|e| other(&e))?;
    let mut per: BTreeMap<(String, String), PerAccess> = BTreeMap::new();
    let (mut unwraps, mut changes) = (0, 0);
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| other(&e))?;
        let e = &v["event"];
        let s = |k: &str| e[k].as_str().unwrap_or("").to_owned();
        match e["operation"].as_str() {
            Some("open") => {
                let entry = per.entry((s("principal"), s("purpose"))).or_default();
                entry.principal = s("principal");
                entry.purpose = s("purpose");
                entry.opens += 1;
                if e["outcome"] == "failure" {
                    entry.failures += 1;
                } else {
                    entry
                        .records
                        .insert(format!("{}|{}", s("scope"), e["context"]));
                    entry.keys.insert(s("key_id"));
                }
            }
            Some("unwrap") => unwraps += 1,
            Some("key-state-changed") => changes += 1,
            _ => {}
        }
    }
    let accesses: Vec<PerAccess> = per
        .into_values()
        .map(|mut a| {
            a.distinct_records = a.records.len();
            a.distinct_keys = a.keys.len();
            a
        })
        .collect();
    let report = Report {
        records: summary.records,
        head: summary.head,
        accesses,
        unwraps,
        key_state_changes: changes,
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(|e| other(&e))?
        );
        return Ok(());
    }
    println!(
        "intact: {} records, head {} (keep these elsewhere to detect a cut-off tail)",
        report.records, report.head
    );
    println!(
        "{:<24} {:<20} {:>8} {:>9} {:>17}",
        "principal", "purpose", "opens", "failures", "distinct records"
    );
    for a in &report.accesses {
        println!(
            "{:<24} {:<20} {:>8} {:>9} {:>17}",
            a.principal, a.purpose, a.opens, a.failures, a.distinct_records
        );
    }
    println!(
        "key unwraps: {}; key state changes: {}",
        report.unwraps, report.key_state_changes
    );
    Ok(())
}
