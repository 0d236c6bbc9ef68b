//! A synchronous facade for callers without an async runtime (and for the C
//! ABI). Seal and open with a cached key run on the calling thread with no
//! runtime involved; only key-service and key-store calls go through an
//! internal Tokio runtime.
//!
//! Do not call these methods from inside an async task: use
//! [`crate::Panseal`] there.

use std::sync::Arc;

use crate::access::Access;
use crate::api::{Admission, OpenFor, Opened, PansealBuilder};
use crate::context::Context;
use crate::error::{AdmitItemError, ConfigError, Error};
use crate::format::SealedPan;
use crate::index::BlindIndex;
use crate::ingest::{IngestKeyInfo, IngestSealed, IngestSealer, SealedRef};
use crate::keys::{KeyId, KeyState};
use crate::pan::Pan;

/// The blocking counterpart of [`crate::Panseal`]. Cheap to clone and safe to
/// share between threads.
#[derive(Clone, Debug)]
pub struct Panseal {
    inner: crate::Panseal,
    runtime: Arc<tokio::runtime::Runtime>,
}

impl Panseal {
    /// Builds from an async builder, on an internal runtime.
    ///
    /// # Errors
    ///
    /// Those of [`PansealBuilder::build`], or a runtime that cannot start.
    pub fn build(builder: PansealBuilder) -> Result<Self, Error> {
        let runtime = Self::runtime()?;
        let inner = runtime.block_on(builder.build())?;
        Ok(Panseal {
            inner,
            runtime: Arc::new(runtime),
        })
    }

    /// Builds what a client configuration names, connecting its key service
    /// ([`crate::config::ClientConfig::connect`]) on the internal runtime
    /// the handle then uses: every key service, PKCS#11 and AWS KMS
    /// included.
    ///
    /// # Errors
    ///
    /// Those of [`crate::config::ClientConfig::connect`] and
    /// [`PansealBuilder::build`], or a runtime that cannot start.
    pub fn from_config(config: &crate::config::ClientConfig) -> Result<Self, Error> {
        let runtime = Self::runtime()?;
        let inner = runtime.block_on(async { config.connect().await?.build().await })?;
        Ok(Panseal {
            inner,
            runtime: Arc::new(runtime),
        })
    }

    fn runtime() -> Result<tokio::runtime::Runtime, Error> {
        Ok(tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("panseal-blocking")
            .enable_all()
            .build()
            .map_err(|e| ConfigError::Policy(format!("cannot start runtime: {e}")))?)
    }

    /// The async handle underneath (shares everything with this one).
    pub fn as_async(&self) -> &crate::Panseal {
        &self.inner
    }

    /// A handle for another scope. See [`crate::Panseal::with_scope`].
    ///
    /// # Errors
    ///
    /// An invalid scope name.
    pub fn with_scope(&self, scope: &str) -> Result<Self, Error> {
        Ok(Panseal {
            inner: self.inner.with_scope(scope)?,
            runtime: Arc::clone(&self.runtime),
        })
    }

    /// See [`crate::Panseal::seal_pan`].
    ///
    /// # Errors
    ///
    /// As [`crate::Panseal::seal_pan`].
    pub fn seal_pan(&self, pan: &Pan, context: &Context) -> Result<SealedPan, Error> {
        if let Some(sealed) = self.inner.try_seal_cached(pan, context) {
            return Ok(sealed);
        }
        self.runtime.block_on(self.inner.seal_pan(pan, context))
    }

    /// See [`crate::Panseal::open_pan`].
    ///
    /// # Errors
    ///
    /// As [`crate::Panseal::open_pan`].
    pub fn open_pan<'s>(
        &self,
        sealed: impl Into<SealedRef<'s>>,
        context: &Context,
        access: &Access,
    ) -> Result<Opened, Error> {
        let sealed = sealed.into();
        if let SealedRef::Compact(compact) = sealed {
            if let Some(result) =
                self.inner
                    .try_open_cached(compact, context, access, OpenFor::Caller)
            {
                return result;
            }
        }
        self.runtime
            .block_on(self.inner.open_pan(sealed, context, access))
    }

    /// See [`crate::Panseal::reseal`].
    ///
    /// # Errors
    ///
    /// As [`crate::Panseal::reseal`].
    pub fn reseal<'s>(
        &self,
        sealed: impl Into<SealedRef<'s>>,
        context: &Context,
        access: &Access,
    ) -> Result<SealedPan, Error> {
        let sealed = sealed.into();
        let cached = match sealed {
            SealedRef::Compact(compact) => {
                self.inner
                    .try_open_cached(compact, context, access, OpenFor::Reseal)
            }
            _ => None,
        };
        match cached {
            Some(opened) => self.seal_pan(&opened?.pan, context),
            None => self
                .runtime
                .block_on(self.inner.reseal(sealed, context, access)),
        }
    }

    /// See [`crate::Panseal::admit`].
    ///
    /// # Errors
    ///
    /// As [`crate::Panseal::admit`].
    pub fn admit(
        &self,
        items: &[(IngestSealed, Context)],
    ) -> Result<Vec<Result<Admission, AdmitItemError>>, Error> {
        self.runtime.block_on(self.inner.admit(items))
    }

    /// See [`crate::Panseal::admit_one`].
    ///
    /// # Errors
    ///
    /// As [`crate::Panseal::admit_one`].
    pub fn admit_one(&self, sealed: &IngestSealed, context: &Context) -> Result<Admission, Error> {
        self.runtime.block_on(self.inner.admit_one(sealed, context))
    }

    /// See [`crate::Panseal::ingest_keys`].
    ///
    /// # Errors
    ///
    /// As [`crate::Panseal::ingest_keys`].
    pub fn ingest_keys(&self) -> Result<Vec<IngestKeyInfo>, Error> {
        self.runtime.block_on(self.inner.ingest_keys())
    }

    /// See [`crate::Panseal::ingest_sealer`].
    ///
    /// # Errors
    ///
    /// As [`crate::Panseal::ingest_sealer`].
    pub fn ingest_sealer(&self, pinned_fingerprint: Option<&str>) -> Result<IngestSealer, Error> {
        self.runtime
            .block_on(self.inner.ingest_sealer(pinned_fingerprint))
    }

    /// See [`crate::Panseal::rotate_ingest_key`].
    ///
    /// # Errors
    ///
    /// As [`crate::Panseal::rotate_ingest_key`].
    pub fn rotate_ingest_key(&self) -> Result<IngestKeyInfo, Error> {
        self.runtime.block_on(self.inner.rotate_ingest_key())
    }

    /// See [`crate::Panseal::blind_index`].
    ///
    /// # Errors
    ///
    /// As [`crate::Panseal::blind_index`].
    pub fn blind_index(&self, pan: &Pan) -> Result<BlindIndex, Error> {
        self.runtime.block_on(self.inner.blind_index(pan))
    }

    /// See [`crate::Panseal::blind_indexes`].
    ///
    /// # Errors
    ///
    /// As [`crate::Panseal::blind_indexes`].
    pub fn blind_indexes(&self, pan: &Pan) -> Result<Vec<BlindIndex>, Error> {
        self.runtime.block_on(self.inner.blind_indexes(pan))
    }

    /// See [`crate::Panseal::blind_index_batch`]: one key-service request.
    ///
    /// # Errors
    ///
    /// As [`crate::Panseal::blind_index_batch`].
    pub fn blind_index_batch(&self, pans: &[Pan]) -> Result<Vec<BlindIndex>, Error> {
        self.runtime.block_on(self.inner.blind_index_batch(pans))
    }

    /// See [`crate::Panseal::blind_indexes_batch`]: one key-service request.
    ///
    /// # Errors
    ///
    /// As [`crate::Panseal::blind_indexes_batch`].
    pub fn blind_indexes_batch(&self, pans: &[Pan]) -> Result<Vec<Vec<BlindIndex>>, Error> {
        self.runtime.block_on(self.inner.blind_indexes_batch(pans))
    }

    /// See [`crate::Panseal::upgrade_records`].
    ///
    /// # Errors
    ///
    /// As [`crate::Panseal::upgrade_records`].
    pub fn upgrade_records(&self) -> Result<u64, Error> {
        self.runtime.block_on(self.inner.upgrade_records())
    }

    /// See [`crate::Panseal::rotate_dek`].
    ///
    /// # Errors
    ///
    /// As [`crate::Panseal::rotate_dek`].
    pub fn rotate_dek(&self) -> Result<Option<KeyId>, Error> {
        self.runtime.block_on(self.inner.rotate_dek())
    }

    /// See [`crate::Panseal::rotate_index_key`].
    ///
    /// # Errors
    ///
    /// As [`crate::Panseal::rotate_index_key`].
    pub fn rotate_index_key(&self) -> Result<u32, Error> {
        self.runtime.block_on(self.inner.rotate_index_key())
    }

    /// See [`crate::Panseal::set_key_state`].
    ///
    /// # Errors
    ///
    /// As [`crate::Panseal::set_key_state`].
    pub fn set_key_state(&self, id: KeyId, state: KeyState) -> Result<(), Error> {
        self.runtime.block_on(self.inner.set_key_state(id, state))
    }

    /// See [`crate::Panseal::report_usage`].
    ///
    /// # Errors
    ///
    /// As [`crate::Panseal::report_usage`].
    pub fn report_usage(&self) -> Result<(), Error> {
        self.runtime.block_on(self.inner.report_usage())
    }
}
