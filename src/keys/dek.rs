use std::fmt;

use aes_gcm::{Aes256Gcm, KeyInit};
use rand_core::{OsRng, RngCore};
use secrecy::{ExposeSecret, SecretBox};

/// A 256-bit data-encryption (or index) key in the clear.
///
/// Lives only in process memory: no `Serialize`, a `Debug` that prints
/// `Dek(..)`, wiped on drop. New keys come from the OS CSPRNG or from a key
/// service's generator (PCI DSS 3.7.1); building one from caller bytes is
/// possible only with the `hazmat-test-keys` feature.
pub struct Dek {
    key: SecretBox<[u8; 32]>,
}

impl Dek {
    /// A fresh key from the OS CSPRNG.
    pub fn generate() -> Self {
        let mut key = SecretBox::new(Box::new([0u8; 32]));
        OsRng.fill_bytes(secrecy::ExposeSecretMut::expose_secret_mut(&mut key));
        Dek { key }
    }

    /// For key-service implementations in this crate: a key from unwrapped
    /// bytes. The caller's copy must be wiped by the caller.
    pub(crate) fn from_unwrapped(bytes: &[u8; 32]) -> Self {
        // Copied straight into the (wiping) box: no temporary on the stack.
        Dek {
            key: SecretBox::init_with_mut(|k: &mut [u8; 32]| k.copy_from_slice(bytes)),
        }
    }

    /// Builds a key from caller-supplied bytes. **Hazardous**: only for
    /// known-answer tests and test vectors; production keys must come from
    /// [`Dek::generate`] or a key service.
    #[cfg(feature = "hazmat-test-keys")]
    pub fn from_bytes_insecure(mut bytes: [u8; 32]) -> Self {
        let dek = Self::from_unwrapped(&bytes);
        zeroize::Zeroize::zeroize(&mut bytes);
        dek
    }

    pub(crate) fn expose_secret(&self) -> &[u8; 32] {
        self.key.expose_secret()
    }

    pub(crate) fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(self.key.expose_secret().into())
    }
}

impl fmt::Debug for Dek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Dek(..)")
    }
}
