use std::time::Duration;

use crate::error::ConfigError;

/// Hard ceiling on seals per DEK: NIST SP 800-38D §8.3 limits random 96-bit
/// nonces to 2^32 invocations per key.
pub const NONCE_LIMIT: u64 = 1 << 32;
/// Longest allowed DEK-cache TTL (PCI DSS 3.6.1.3–4: fewest forms and places).
pub const MAX_CACHE_TTL: Duration = Duration::from_secs(24 * 3600);

/// Rotation and caching policy (PCI DSS 3.7.4 cryptoperiods).
///
/// Defaults: a DEK seals for at most 30 days and at most 2^24 times
/// (1/256 of the NIST nonce limit), then opens for 3 more years; up to 1,024
/// unwrapped keys stay cached for at most 5 minutes; a writer re-reads its
/// active DEK's state from the key store every 60 seconds, so a custodian's
/// retirement reaches every instance within that time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub(crate) encrypt_period: Duration,
    pub(crate) decrypt_period: Duration,
    pub(crate) max_uses: u64,
    pub(crate) cache_capacity: usize,
    pub(crate) cache_ttl: Duration,
    pub(crate) recheck_interval: Duration,
    pub(crate) require_signed_records: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            encrypt_period: Duration::from_secs(30 * 24 * 3600),
            decrypt_period: Duration::from_secs(3 * 365 * 24 * 3600),
            max_uses: 1 << 24,
            cache_capacity: 1024,
            cache_ttl: Duration::from_secs(300),
            recheck_interval: Duration::from_secs(60),
            require_signed_records: false,
        }
    }
}

impl Policy {
    /// How long a new DEK may seal (originator-usage period).
    pub fn encrypt_period(mut self, d: Duration) -> Self {
        self.encrypt_period = d;
        self
    }

    /// How long after its encrypt period a DEK may still open
    /// (recipient-usage period beyond the originator period).
    pub fn decrypt_period(mut self, d: Duration) -> Self {
        self.decrypt_period = d;
        self
    }

    /// How many seals one DEK may perform before a fresh one is made.
    pub fn max_uses(mut self, n: u64) -> Self {
        self.max_uses = n;
        self
    }

    /// How many unwrapped keys the in-memory cache holds.
    pub fn cache_capacity(mut self, n: usize) -> Self {
        self.cache_capacity = n;
        self
    }

    /// How long an unwrapped key stays cached before it is unwrapped again.
    pub fn cache_ttl(mut self, d: Duration) -> Self {
        self.cache_ttl = d;
        self
    }

    /// How often a writer re-reads its active DEK's state from the store.
    pub fn recheck_interval(mut self, d: Duration) -> Self {
        self.recheck_interval = d;
        self
    }

    /// Refuse unsigned (version-1) key records: opening under one fails
    /// with [`crate::KeyError::Untagged`]. Turn on once
    /// [`crate::Panseal::upgrade_records`] has signed the old records
    /// (`FORMAT.md` §9). Default off: version-1 records still open (they
    /// are never sealed with).
    pub fn require_signed_records(mut self, on: bool) -> Self {
        self.require_signed_records = on;
        self
    }

    /// Checks the policy's bounds.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Policy`] naming the value out of range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_uses == 0 || self.max_uses > NONCE_LIMIT {
            return Err(ConfigError::Policy(format!(
                "max_uses must be between 1 and 2^32 (NIST SP 800-38D), got {}",
                self.max_uses
            )));
        }
        if self.encrypt_period.is_zero() {
            return Err(ConfigError::Policy("encrypt_period must be > 0".into()));
        }
        if self.cache_capacity == 0 {
            return Err(ConfigError::Policy("cache_capacity must be > 0".into()));
        }
        if self.cache_ttl.is_zero() || self.cache_ttl > MAX_CACHE_TTL {
            return Err(ConfigError::Policy(
                "cache_ttl must be > 0 and at most 24 hours".into(),
            ));
        }
        if self.recheck_interval.is_zero() {
            return Err(ConfigError::Policy("recheck_interval must be > 0".into()));
        }
        Ok(())
    }
}
