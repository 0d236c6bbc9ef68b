//! [`Access`]: who asks and why. Every open names a principal and a purpose;
//! the audit log records it and the key services check and pass it on, so it
//! lives below both (PCI DSS 7.2, 10.2.1).

use serde::Serialize;

use crate::error::ConfigError;

/// Who is asking and why: every open names a principal and a purpose.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Access {
    principal: String,
    purpose: String,
}

impl Access {
    /// An access by `principal` (a user or service identity) for `purpose`
    /// (e.g. `refund`, `chargeback`, `settlement`).
    ///
    /// # Errors
    ///
    /// [`ConfigError::Name`] if either is empty or longer than 256 bytes.
    pub fn new(principal: &str, purpose: &str) -> Result<Self, ConfigError> {
        for (what, v) in [("principal", principal), ("purpose", purpose)] {
            if v.is_empty() || v.len() > 256 || v.chars().any(char::is_control) {
                return Err(ConfigError::Name(format!(
                    "{what} must be 1 to 256 printable characters"
                )));
            }
        }
        Ok(Access {
            principal: principal.to_owned(),
            purpose: purpose.to_owned(),
        })
    }

    /// The library's own identity, for key lifecycle events it performs.
    pub(crate) fn system(purpose: &str) -> Self {
        Access {
            principal: "panseal".into(),
            purpose: purpose.into(),
        }
    }

    /// The principal.
    pub fn principal(&self) -> &str {
        &self.principal
    }

    /// The purpose.
    pub fn purpose(&self) -> &str {
        &self.purpose
    }
}
