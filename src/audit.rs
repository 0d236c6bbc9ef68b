//! Audit events and sinks (PCI DSS 10.2.1, 10.2.2).
//!
//! Every open and every unwrap emits an [`AuditEvent`]: who (principal), why
//! (purpose), what (operation, key id, context — never the PAN), when, and
//! the outcome. Opening fails closed when no sink is configured or the sink
//! fails. [`ChainedAuditLog`] keeps events in a tamper-evident, HMAC-chained
//! file (PCI DSS 10.3.2, 10.3.4) with [`verify_audit_chain`].

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::access::Access;
use crate::context::Context;
use crate::error::AuditError;
use crate::keys::{KeyId, Scope};

// The raw chain functions are used by keyd (feature `keyd-server`) and the
// chain's own tests.
#[cfg_attr(not(feature = "keyd-server"), allow(dead_code, unreachable_pub))]
mod chain;

#[cfg(feature = "keyd-server")]
pub use chain::{chain_raw_events, parse_audit_anchor, verify_audit_bytes};
pub use chain::{
    read_audit_anchor, verify_audit_chain, verify_audit_chain_anchored, AuditKey, ChainSummary,
    ChainedAuditLog,
};

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Operation {
    /// A sealed PAN was opened (or an attempt failed).
    Open,
    /// A key was unwrapped by the key service (cache miss).
    Unwrap,
    /// A new DEK or index key was created and stored.
    KeyCreated,
    /// A key changed state (retired, compromised, destroyed).
    KeyStateChanged,
}

/// Whether it worked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// It worked.
    Success,
    /// It failed.
    Failure,
}

/// One audit event. Borrowed, so emitting one on the open path allocates
/// nothing; sinks that keep events copy what they need.
#[derive(Clone, Copy, Debug, Serialize)]
#[non_exhaustive]
pub struct AuditEvent<'a> {
    /// When.
    #[serde(serialize_with = "ser_time")]
    pub time: SystemTime,
    /// What.
    pub operation: Operation,
    /// Success or failure.
    pub outcome: Outcome,
    /// On failure, the error kind (never contains a PAN or key).
    pub failure: Option<&'a str>,
    /// Who.
    pub principal: &'a str,
    /// Why.
    pub purpose: &'a str,
    /// The key scope.
    pub scope: &'a str,
    /// The key involved.
    pub key_id: Option<KeyId>,
    /// The record involved (table, column, row key), for opens.
    pub context: Option<&'a Context>,
}

fn ser_time<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    s.serialize_f64(d.as_secs_f64())
}

impl Serialize for Context {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Context", 3)?;
        st.serialize_field("table", self.table())?;
        st.serialize_field("column", self.column())?;
        st.serialize_field("row_key", &String::from_utf8_lossy(self.row_key()))?;
        st.end()
    }
}

/// Where audit events go. Called synchronously on the open path: keep it
/// fast, and return an error rather than drop an event (the open then
/// fails: fail closed).
pub trait AuditSink: Send + Sync {
    /// Records one event.
    ///
    /// # Errors
    ///
    /// [`AuditError`] if the event could not be recorded.
    fn record(&self, event: &AuditEvent<'_>) -> Result<(), AuditError>;
}

/// An owned copy of an event, as kept by [`MemoryAuditSink`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RecordedEvent {
    /// When.
    pub time: SystemTime,
    /// What.
    pub operation: Operation,
    /// Success or failure.
    pub outcome: Outcome,
    /// On failure, the error kind.
    pub failure: Option<String>,
    /// Who.
    pub principal: String,
    /// Why.
    pub purpose: String,
    /// The key scope.
    pub scope: String,
    /// The key involved.
    pub key_id: Option<KeyId>,
    /// The record involved.
    pub context: Option<(String, String, Vec<u8>)>,
}

/// Keeps events in memory; for tests and examples.
#[derive(Default)]
pub struct MemoryAuditSink {
    events: Mutex<Vec<RecordedEvent>>,
}

impl MemoryAuditSink {
    /// An empty sink.
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of every event so far.
    pub fn events(&self) -> Vec<RecordedEvent> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl AuditSink for MemoryAuditSink {
    fn record(&self, e: &AuditEvent<'_>) -> Result<(), AuditError> {
        let rec = RecordedEvent {
            time: e.time,
            operation: e.operation,
            outcome: e.outcome,
            failure: e.failure.map(str::to_owned),
            principal: e.principal.to_owned(),
            purpose: e.purpose.to_owned(),
            scope: e.scope.to_owned(),
            key_id: e.key_id,
            context: e.context.map(|c| {
                (
                    c.table().to_owned(),
                    c.column().to_owned(),
                    c.row_key().to_vec(),
                )
            }),
        };
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(rec);
        Ok(())
    }
}

impl<T: AuditSink + ?Sized> AuditSink for std::sync::Arc<T> {
    fn record(&self, event: &AuditEvent<'_>) -> Result<(), AuditError> {
        (**self).record(event)
    }
}

/// Appends one JSON object per event to a file, flushed per event.
pub struct JsonLinesAuditSink {
    out: Mutex<BufWriter<File>>,
}

impl JsonLinesAuditSink {
    /// Opens (or creates) `path` for appending.
    ///
    /// # Errors
    ///
    /// An I/O error opening the file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, AuditError> {
        let f = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(JsonLinesAuditSink {
            out: Mutex::new(BufWriter::new(f)),
        })
    }
}

impl AuditSink for JsonLinesAuditSink {
    fn record(&self, event: &AuditEvent<'_>) -> Result<(), AuditError> {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        serde_json::to_writer(&mut *out, event).map_err(|e| AuditError::Rejected(e.to_string()))?;
        out.write_all(b"\n")?;
        out.flush()?;
        Ok(())
    }
}

/// Helper for emitting events with less ceremony.
pub(crate) struct Emitter<'a> {
    pub(crate) sink: &'a dyn AuditSink,
    pub(crate) scope: &'a Scope,
}

impl Emitter<'_> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn emit(
        &self,
        time: SystemTime,
        operation: Operation,
        result: Result<(), &str>,
        access: &Access,
        key_id: Option<KeyId>,
        context: Option<&Context>,
    ) -> Result<(), AuditError> {
        self.sink.record(&AuditEvent {
            time,
            operation,
            outcome: if result.is_ok() {
                Outcome::Success
            } else {
                Outcome::Failure
            },
            failure: result.err(),
            principal: access.principal(),
            purpose: access.purpose(),
            scope: self.scope.as_str(),
            key_id,
            context,
        })
    }
}
