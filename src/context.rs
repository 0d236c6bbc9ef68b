//! The context a sealed PAN is bound to.
//!
//! A [`Context`] names where a ciphertext lives — table, column and row key —
//! and is authenticated as AES-GCM associated data. A ciphertext copied to
//! another row, column or table fails to open with the opaque
//! [`crate::Error::Decryption`].
//!
//! This module validates the parts; their byte encoding (the associated
//! data) is `format::aad`'s.

use std::fmt;

use crate::error::ContextError;
use crate::format::aad;

/// Longest table name, in bytes.
pub const MAX_TABLE_LEN: usize = 255;
/// Longest column name, in bytes.
pub const MAX_COLUMN_LEN: usize = 255;
/// Longest row key, in bytes.
pub const MAX_ROW_KEY_LEN: usize = 512;

/// Where a sealed PAN lives: table, column and row key.
///
/// Encoded once at construction (see `FORMAT.md`, "Context encoding"), so
/// sealing and opening do not re-encode it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Context {
    encoded: Vec<u8>,
    table_len: usize,
    column_len: usize,
}

impl Context {
    /// A context from a table name, a column name and the row's key (for
    /// example the primary key, as bytes or text). None of them may be empty.
    ///
    /// The row key must be stable for the life of the row and must not be
    /// the PAN itself.
    ///
    /// # Errors
    ///
    /// [`ContextError`] if a part is empty or too long.
    pub fn new(table: &str, column: &str, row_key: impl AsRef<[u8]>) -> Result<Self, ContextError> {
        let row_key = row_key.as_ref();
        check("table", table.as_bytes(), MAX_TABLE_LEN)?;
        check("column", column.as_bytes(), MAX_COLUMN_LEN)?;
        check("row key", row_key, MAX_ROW_KEY_LEN)?;
        // The limits above keep every part within a u16 length.
        const { assert!(MAX_TABLE_LEN <= 0xFFFF && MAX_COLUMN_LEN <= 0xFFFF) };
        const { assert!(MAX_ROW_KEY_LEN <= 0xFFFF) };
        Ok(Context {
            encoded: aad::encode_context(table.as_bytes(), column.as_bytes(), row_key),
            table_len: table.len(),
            column_len: column.len(),
        })
    }

    /// The table name.
    pub fn table(&self) -> &str {
        std::str::from_utf8(self.parts().0).unwrap_or("")
    }

    /// The column name.
    pub fn column(&self) -> &str {
        std::str::from_utf8(self.parts().1).unwrap_or("")
    }

    /// The row key bytes.
    pub fn row_key(&self) -> &[u8] {
        self.parts().2
    }

    /// The canonical encoding authenticated as associated data.
    pub fn encoded(&self) -> &[u8] {
        &self.encoded
    }

    fn parts(&self) -> (&[u8], &[u8], &[u8]) {
        aad::context_parts(&self.encoded, self.table_len, self.column_len)
    }
}

fn check(part: &'static str, bytes: &[u8], max: usize) -> Result<(), ContextError> {
    if bytes.is_empty() {
        return Err(ContextError::Empty(part));
    }
    if bytes.len() > max {
        return Err(ContextError::TooLong {
            part,
            len: bytes.len(),
            max,
        });
    }
    Ok(())
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("table", &self.table())
            .field("column", &self.column())
            .field("row_key", &String::from_utf8_lossy(self.row_key()))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_with_lengths() {
        let c = Context::new("cards", "pan", "42").unwrap();
        assert_eq!(c.encoded(), b"\x00\x05cards\x00\x03pan\x00\x0242");
        assert_eq!(c.table(), "cards");
        assert_eq!(c.column(), "pan");
        assert_eq!(c.row_key(), b"42");
    }

    #[test]
    fn parts_cannot_run_together() {
        let a = Context::new("ab", "c", "d").unwrap();
        let b = Context::new("a", "bc", "d").unwrap();
        assert_ne!(a.encoded(), b.encoded());
    }

    #[test]
    fn limits() {
        assert_eq!(
            Context::new("", "c", "1").unwrap_err(),
            ContextError::Empty("table")
        );
        assert!(Context::new("t", "c", vec![0u8; MAX_ROW_KEY_LEN]).is_ok());
        assert!(Context::new("t", "c", vec![0u8; MAX_ROW_KEY_LEN + 1]).is_err());
    }
}
