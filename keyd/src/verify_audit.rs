//! `panseal-keyd verify-audit`: checks the audit log's hash chain, and with
//! a configuration also that it reaches both anchors (the state's and
//! `audit.anchor`) under the audit key the state names.

use std::path::PathBuf;

use panseal::{read_audit_anchor, verify_audit_chain_anchored, AuditError, AuditKey, ChainSummary};

use crate::config::Config;

/// Where the log, its key and its anchor are.
pub(crate) enum Source {
    /// The server's configuration: the log, key and anchor in its folders,
    /// and its state.
    Config(PathBuf),
    /// Files named one by one (no state to compare with).
    Files {
        /// The audit log.
        log: PathBuf,
        /// The audit key file.
        key: PathBuf,
        /// An exported anchor, if any.
        anchor: Option<PathBuf>,
    },
}

/// Verifies; `Ok` is the report, `Err` the exit code (1: the log does not
/// verify; 2: it could not be checked) and the message.
pub(crate) fn run(source: &Source) -> Result<String, (u8, String)> {
    let (log, key_path, anchor_file, cfg) = match source {
        Source::Config(path) => {
            let cfg = Config::load(path).map_err(|e| (2, e.to_string()))?;
            (
                cfg.audit_path(),
                cfg.audit_key_path(),
                Some(cfg.audit_anchor_path()),
                Some(cfg),
            )
        }
        Source::Files { log, key, anchor } => (log.clone(), key.clone(), anchor.clone(), None),
    };
    let key = AuditKey::load_file(&key_path)
        .map_err(|e| (2, format!("audit key {}: {e}", key_path.display())))?;
    let mut anchor = ChainSummary::genesis();
    let mut named = String::new();
    if let Some(cfg) = &cfg {
        let paths = cfg.paths();
        if let Ok(bytes) = std::fs::read(&paths.state) {
            let snap = crate::state_file::decode_snapshot(&bytes, 0)
                .map_err(|e| (1, format!("state {}: {e}", paths.state.display())))?;
            let id = &snap.state.audit_key_id;
            if !id.is_empty() && id != &key.key_id() {
                return Err((
                    1,
                    format!(
                        "audit key {} is not the key this keyd's state names (replaced?): \
                         the log cannot be trusted",
                        key_path.display()
                    ),
                ));
            }
            if snap.state.audit.records > anchor.records {
                anchor = ChainSummary {
                    records: snap.state.audit.records,
                    head: snap.state.audit.head.clone(),
                };
                named = format!("the state {}", paths.state.display());
            }
        }
    }
    if let Some(a) = &anchor_file {
        match read_audit_anchor(a, &key) {
            Ok(s) if s.records >= anchor.records => {
                anchor = s;
                named = format!("the anchor {}", a.display());
            }
            Ok(_) => {}
            Err(AuditError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                if cfg.is_none() {
                    return Err((2, format!("anchor {}: {e}", a.display())));
                }
            }
            Err(e) => return Err((1, format!("anchor {}: {e}", a.display()))),
        }
    }
    match verify_audit_chain_anchored(&log, &key, &anchor) {
        Ok(s) => Ok(format!(
            "audit log {} verifies: {} records, head {}{}",
            log.display(),
            s.records,
            s.head,
            if anchor.records > 0 {
                format!("; reaches {} (record {})", named, anchor.records)
            } else {
                String::new()
            }
        )),
        Err(e @ AuditError::Tampered { .. }) => Err((
            1,
            format!(
                "audit log {}: {e}{}",
                log.display(),
                if anchor.records > 0 {
                    format!(" (anchored by {named}: {} records)", anchor.records)
                } else {
                    String::new()
                }
            ),
        )),
        Err(e) => Err((2, format!("{}: {e}", log.display()))),
    }
}
