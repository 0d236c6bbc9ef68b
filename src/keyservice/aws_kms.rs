//! The AWS KMS key service (and KMS-compatible endpoints through an
//! endpoint override).
//!
//! # Versions are keys under aliases
//!
//! Version `N` of KEK `name` is a symmetric KMS key (`SYMMETRIC_DEFAULT`,
//! `ENCRYPT_DECRYPT`: AES-256-GCM inside KMS) reached through the alias
//! `alias/panseal/<name>/v<N>`. [`KeyService::rotate_kek`] creates a new key
//! and the alias of the next version (`CreateKey` + `CreateAlias`); the
//! newest alias wraps, older ones only unwrap. So a record's
//! [`KekRef::version`] names exactly the KMS key its wrap was made with,
//! custodians can retire (`DisableKey`) and destroy (`ScheduleKeyDeletion`)
//! one version at a time, and a rewrap (`ReEncrypt`) moves a DEK to the
//! newest version without the DEK leaving KMS. KMS's own automatic rotation
//! may be enabled on any version key as well: it rotates that key's backing
//! material transparently (the ciphertext names it) and changes nothing
//! here.
//!
//! # Index keys and the record-MAC key
//!
//! Blind-index version `N` of scope `S` is an `HMAC_256`
//! `GENERATE_VERIFY_MAC` key under
//! `alias/panseal/<name>/index/<S escaped>/v<N>` (scope escaped into the
//! alias charset: `_` → `__`, `.` → `_d`, `:` → `_c`), its state in the tag
//! `panseal:index-state` (`active` / `lookup-only`); destroyed =
//! `ScheduleKeyDeletion`. Keyed hashes are `GenerateMac` (`HMAC_SHA_256`),
//! with bounded concurrency per batch. The record-MAC key is an `HMAC_256`
//! key under `alias/panseal/<name>/record-mac`: `GenerateMac` signs,
//! `VerifyMac` verifies.
//!
//! # Write-only ingest: not offered (yet)
//!
//! An ingest key would be an `ECC_NIST_P256` `KEY_AGREEMENT` key, opened
//! with `DeriveSharedSecret` (`ECDH`) and the split HPKE receiver, as the
//! PKCS#11 service does with `CKM_ECDH1_DERIVE`. The KMS-compatible
//! endpoint these tests run against, moto 5.2.1, accepts such a key in
//! `CreateKey` but answers `DeriveSharedSecret` with HTTP 500 ("The
//! derive_shared_secret action has not been implemented"), so the path
//! cannot be tested here and is not shipped: the ingest methods return
//! [`KeyServiceError::Unsupported`] naming this. Keep ingest keys in keyd
//! or a PKCS#11 token.
//!
//! # Binding
//!
//! Every `Encrypt`, `GenerateDataKey`, `Decrypt` and `ReEncrypt` carries the
//! encryption context `panseal:id`, `panseal:scope`, `panseal:environment`,
//! `panseal:purpose` and `panseal:kek` (`<name>#v<N>`), which KMS binds to
//! the ciphertext as AES-GCM associated data: a wrap moved to another record,
//! scope, environment, purpose or KEK version fails to decrypt
//! ([`KeyServiceError::UnwrapFailed`]). The context is not secret and shows
//! up in CloudTrail, which thereby records which DEK every `Decrypt` was for.
//! `Decrypt` and `ReEncrypt` also name the key the record says it was
//! wrapped under, and the key KMS reports having used is checked.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_kms::config::http::HttpResponse;
use aws_sdk_kms::config::{Credentials, Region};
use aws_sdk_kms::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{
    DataKeySpec, KeySpec, KeyState as KmsKeyState, KeyUsageType, MacAlgorithmSpec, Tag,
};
use aws_sdk_kms::Client;
use aws_smithy_http_client::tls::rustls_provider::CryptoMode;
use aws_smithy_http_client::tls::Provider;
use zeroize::Zeroizing;

use super::{
    sealed, AdmitOutput, AdmitRequest, IndexKeyInfo, IngestOpenRequest, KekInfo, KeyService,
    Permissions,
};
use crate::access::Access;
use crate::error::{AdmitItemError, KeyServiceError};
use crate::ingest::IngestKeyInfo;
use crate::keys::{
    unix_now, Dek, Environment, KekRef, KeyPurpose, KeyRequest, KeyState, RecordTag, Scope,
    WrappedDek, WrappedKey,
};
use crate::pan::Pan;
use crate::Opened;

const DEK_LEN: usize = 32;
/// What the ingest methods answer (see the module documentation).
const INGEST_UNSUPPORTED: &str = "write-only ingest on AWS KMS (ingest keys need \
     DeriveSharedSecret, which the tested KMS-compatible endpoint, moto 5.2.1, does not \
     implement; keep ingest keys in keyd or a PKCS#11 token)";
const ALIAS_PREFIX: &str = "alias/panseal/";
/// Longest KMS alias name.
const MAX_ALIAS_LEN: usize = 256;
/// Largest message `GenerateMac` accepts.
const MAX_MAC_MESSAGE: usize = 4096;
const STATE_TAG: &str = "panseal:index-state";
const CREATED_TAG: &str = "panseal:created";

/// Explicit AWS credentials (an access key, optionally temporary). The
/// secret parts are wiped on drop and never printed.
#[derive(Clone)]
pub struct AwsKmsCredentials {
    access_key_id: String,
    secret_access_key: Zeroizing<String>,
    session_token: Option<Zeroizing<String>>,
}

impl AwsKmsCredentials {
    /// Credentials from an access key id, its secret and, for temporary
    /// credentials, a session token.
    pub fn new(
        access_key_id: &str,
        secret_access_key: String,
        session_token: Option<String>,
    ) -> Self {
        AwsKmsCredentials {
            access_key_id: access_key_id.to_owned(),
            secret_access_key: Zeroizing::new(secret_access_key),
            session_token: session_token.map(Zeroizing::new),
        }
    }
}

impl std::fmt::Debug for AwsKmsCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsKmsCredentials")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

/// How to reach KMS and which KEK to use. Build with [`AwsKmsConfig::new`]
/// and the setters.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct AwsKmsConfig {
    /// The KEK's name: its versions are `alias/panseal/<name>/v<N>`.
    pub kek_name: String,
    /// The environment this service serves (`prod`, `test`, …).
    pub environment: Environment,
    /// AWS region; `None` takes it from the standard chain
    /// (`AWS_REGION`, profile, instance metadata).
    pub region: Option<String>,
    /// Endpoint override for KMS-compatible services or VPC endpoints
    /// (e.g. `http://127.0.0.1:4566`); `None` is the region's KMS endpoint.
    pub endpoint_url: Option<String>,
    /// Explicit credentials; `None` uses the standard chain (environment,
    /// shared config and credentials files, web identity, ECS and EC2
    /// instance roles).
    pub credentials: Option<AwsKmsCredentials>,
    /// TCP/TLS connect timeout (default 3 s).
    pub connect_timeout: Duration,
    /// Time allowed for one call including retries (default 10 s); past it
    /// the call is [`KeyServiceError::Unavailable`].
    pub operation_timeout: Duration,
    /// Attempts per call, the first included (default 3; the SDK's standard
    /// retry with backoff for throttling and transient failures).
    pub max_attempts: u32,
    /// How long the version list and each version's key state
    /// (`DescribeKey`) are trusted before they are read again (default
    /// 60 s). KMS refuses disabled and deleted keys itself; this check
    /// also refuses them in KMS-compatible services that do not, and turns
    /// a key pending deletion into [`KeyServiceError::KekDestroyed`]. Zero
    /// reads the state before every use.
    pub key_cache_ttl: Duration,
    /// Create version 1 (`CreateKey` + `CreateAlias`) if no version exists
    /// (default `false`: a missing KEK is [`KeyServiceError::UnknownKek`]).
    pub create_kek_if_missing: bool,
    /// What this handle offers its callers (default: everything but
    /// `reveal`); operations outside it fail with
    /// [`KeyServiceError::PermissionDenied`] before KMS is asked. The real
    /// boundary is the IAM policy of the credential (README, "AWS KMS").
    pub permissions: Permissions,
    /// Most `GenerateMac` calls in flight for one `blind_index` batch
    /// (default 16).
    pub mac_concurrency: usize,
}

impl AwsKmsConfig {
    /// A configuration with the defaults.
    pub fn new(kek_name: &str, environment: Environment) -> Self {
        AwsKmsConfig {
            kek_name: kek_name.to_owned(),
            environment,
            region: None,
            endpoint_url: None,
            credentials: None,
            connect_timeout: Duration::from_secs(3),
            operation_timeout: Duration::from_secs(10),
            max_attempts: 3,
            key_cache_ttl: Duration::from_secs(60),
            create_kek_if_missing: false,
            permissions: Permissions {
                reveal: false,
                ..Permissions::all()
            },
            mac_concurrency: 16,
        }
    }

    /// Sets [`AwsKmsConfig::permissions`] (`reveal` is always off).
    pub fn permissions(mut self, permissions: Permissions) -> Self {
        self.permissions = Permissions {
            reveal: false,
            ..permissions
        };
        self
    }

    /// Sets [`AwsKmsConfig::mac_concurrency`] (at least 1).
    pub fn mac_concurrency(mut self, n: usize) -> Self {
        self.mac_concurrency = n.max(1);
        self
    }

    /// Sets [`AwsKmsConfig::region`].
    pub fn region(mut self, region: &str) -> Self {
        self.region = Some(region.to_owned());
        self
    }

    /// Sets [`AwsKmsConfig::endpoint_url`].
    pub fn endpoint_url(mut self, url: &str) -> Self {
        self.endpoint_url = Some(url.to_owned());
        self
    }

    /// Sets [`AwsKmsConfig::credentials`].
    pub fn credentials(mut self, credentials: AwsKmsCredentials) -> Self {
        self.credentials = Some(credentials);
        self
    }

    /// Sets [`AwsKmsConfig::connect_timeout`] and
    /// [`AwsKmsConfig::operation_timeout`].
    pub fn timeouts(mut self, connect: Duration, operation: Duration) -> Self {
        self.connect_timeout = connect;
        self.operation_timeout = operation;
        self
    }

    /// Sets [`AwsKmsConfig::max_attempts`].
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// Sets [`AwsKmsConfig::key_cache_ttl`].
    pub fn key_cache_ttl(mut self, ttl: Duration) -> Self {
        self.key_cache_ttl = ttl;
        self
    }

    /// Sets [`AwsKmsConfig::create_kek_if_missing`].
    pub fn create_kek_if_missing(mut self, create: bool) -> Self {
        self.create_kek_if_missing = create;
        self
    }
}

/// What `DescribeKey` said about one version's key.
#[derive(Clone, Debug)]
struct KeyMeta {
    arn: String,
    key_id: String,
    state: KmsKeyState,
    symmetric: bool,
    read_at: Instant,
}

#[derive(Default)]
struct Versions {
    /// Version → key id the alias targets (from `ListAliases`).
    aliases: BTreeMap<u32, String>,
    listed_at: Option<Instant>,
    meta: HashMap<u32, KeyMeta>,
}

impl Versions {
    fn newest(&self) -> u32 {
        self.aliases.keys().next_back().copied().unwrap_or(0)
    }
}

struct Inner {
    client: Client,
    kek_name: String,
    environment: Environment,
    ttl: Duration,
    versions: RwLock<Versions>,
    permissions: Permissions,
    mac_concurrency: usize,
    /// Index-key versions per scope (newest first) and when they were read.
    index: RwLock<HashMap<Scope, (Instant, Vec<IndexVersion>)>>,
}

/// One index-key version: its KMS key and state.
#[derive(Clone, Debug)]
struct IndexVersion {
    version: u32,
    arn: String,
    /// The key id the alias targets.
    key_id: String,
    state: KeyState,
    created_at: u64,
}

/// A [`KeyService`] whose KEKs are AWS KMS keys (see the module
/// documentation for the version scheme and the binding, and the README,
/// "AWS KMS", for the IAM permissions each role needs). Cheap to clone.
#[derive(Clone)]
pub struct AwsKmsKeyService {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AwsKmsKeyService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsKmsKeyService")
            .field("kek_name", &self.inner.kek_name)
            .field("environment", &self.inner.environment)
            .finish_non_exhaustive()
    }
}

impl AwsKmsKeyService {
    /// Builds the KMS client (HTTPS through rustls; an `http://` endpoint
    /// override is allowed for local KMS-compatible servers), lists the
    /// KEK's versions and checks the newest, creating version 1 if asked
    /// to and none exists.
    ///
    /// # Errors
    ///
    /// [`KeyServiceError::Other`] for a bad name or a key that is not a
    /// symmetric encryption key; [`KeyServiceError::Unavailable`] if KMS
    /// cannot be reached; [`KeyServiceError::PermissionDenied`] for refused
    /// credentials; [`KeyServiceError::UnknownKek`] if no version exists and
    /// `create_kek_if_missing` is off.
    pub async fn connect(config: AwsKmsConfig) -> Result<Self, KeyServiceError> {
        validate_kek_name(&config.kek_name)?;
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let mut loader = aws_config::defaults(BehaviorVersion::v2026_01_12())
            .http_client(http)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(config.connect_timeout)
                    .operation_timeout(config.operation_timeout)
                    .build(),
            )
            .retry_config(RetryConfig::standard().with_max_attempts(config.max_attempts.max(1)));
        if let Some(region) = &config.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(url) = &config.endpoint_url {
            loader = loader.endpoint_url(url.clone());
        }
        if let Some(c) = &config.credentials {
            loader = loader.credentials_provider(Credentials::new(
                c.access_key_id.clone(),
                c.secret_access_key.as_str(),
                c.session_token.as_ref().map(|t| t.to_string()),
                None,
                "panseal-explicit",
            ));
        }
        let sdk = loader.load().await;
        let service = AwsKmsKeyService {
            inner: Arc::new(Inner {
                client: Client::new(&sdk),
                kek_name: config.kek_name,
                environment: config.environment,
                ttl: config.key_cache_ttl,
                versions: RwLock::new(Versions::default()),
                permissions: config.permissions,
                mac_concurrency: config.mac_concurrency.max(1),
                index: RwLock::new(HashMap::new()),
            }),
        };
        service.inner.list_versions().await?;
        if service.inner.read().newest() == 0 {
            if !config.create_kek_if_missing {
                return Err(KeyServiceError::UnknownKek(service.inner.kek_name.clone()));
            }
            service.inner.create_version(1).await?;
        }
        service.inner.info(true).await?;
        Ok(service)
    }

    /// The KEK's name (the `id` of every [`KekRef`] this service makes).
    pub fn kek_name(&self) -> &str {
        &self.inner.kek_name
    }

    /// The alias of version `version`: `alias/panseal/<name>/v<N>`.
    pub fn alias(&self, version: u32) -> String {
        self.inner.alias(version)
    }

    /// Disables the key of KEK version `version` (`DisableKey`): it neither
    /// wraps nor unwraps until [`AwsKmsKeyService::enable_kek`]. Needs
    /// `kms:DisableKey`.
    ///
    /// # Errors
    ///
    /// The version is unknown, or KMS refuses or fails.
    pub async fn disable_kek(&self, version: u32) -> Result<(), KeyServiceError> {
        self.require(self.inner.permissions.custodian, "custodian")?;
        let meta = self.inner.meta(version, true).await?;
        self.inner
            .client
            .disable_key()
            .key_id(&meta.key_id)
            .send()
            .await
            .map_err(|e| map_sdk(e, false))?;
        self.inner.forget(version);
        Ok(())
    }

    /// Enables a disabled KEK version again (`EnableKey`).
    ///
    /// # Errors
    ///
    /// The version is unknown, or KMS refuses or fails.
    pub async fn enable_kek(&self, version: u32) -> Result<(), KeyServiceError> {
        self.require(self.inner.permissions.custodian, "custodian")?;
        let meta = self.inner.meta_any_state(version).await?;
        self.inner
            .client
            .enable_key()
            .key_id(&meta.key_id)
            .send()
            .await
            .map_err(|e| map_sdk(e, false))?;
        self.inner.forget(version);
        Ok(())
    }

    /// Schedules the key of KEK version `version` for deletion after
    /// `pending_days` (7 to 30; `ScheduleKeyDeletion`). From now on the
    /// version is refused as destroyed; every DEK wrapped only under it is
    /// lost when KMS deletes the key. Rewrap first. The newest version is
    /// refused (rotate first).
    ///
    /// # Errors
    ///
    /// The newest or an unknown version, or KMS refuses or fails.
    pub async fn destroy_kek(
        &self,
        version: u32,
        pending_days: i32,
    ) -> Result<(), KeyServiceError> {
        self.require(self.inner.permissions.custodian, "custodian")?;
        self.inner.list_versions().await?;
        if version == self.inner.read().newest() {
            return Err(KeyServiceError::Other(
                "the newest KEK version cannot be destroyed; rotate first".into(),
            ));
        }
        let meta = self.inner.meta_any_state(version).await?;
        self.inner
            .client
            .schedule_key_deletion()
            .key_id(&meta.key_id)
            .pending_window_in_days(pending_days)
            .send()
            .await
            .map_err(|e| map_sdk(e, false))?;
        self.inner.forget(version);
        tracing::info!(kek = %self.inner.kek_ref(version), "KEK version scheduled for deletion");
        Ok(())
    }

    fn check_env(&self, request: &KeyRequest) -> Result<(), KeyServiceError> {
        if request.environment != self.inner.environment {
            return Err(KeyServiceError::Environment {
                service: self.inner.environment.to_string(),
                request: request.environment.to_string(),
            });
        }
        Ok(())
    }

    fn require(&self, ok: bool, what: &str) -> Result<(), KeyServiceError> {
        if ok {
            Ok(())
        } else {
            Err(KeyServiceError::PermissionDenied(format!(
                "this AWS KMS key service is not configured for {what}"
            )))
        }
    }

    fn check_kek_id(&self, wrapped: &WrappedKey) -> Result<(), KeyServiceError> {
        if wrapped.kek.id != self.inner.kek_name {
            return Err(KeyServiceError::UnknownKek(wrapped.kek.to_string()));
        }
        Ok(())
    }
}

impl Inner {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Versions> {
        self.versions.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Versions> {
        self.versions.write().unwrap_or_else(|p| p.into_inner())
    }

    fn kek_ref(&self, version: u32) -> KekRef {
        KekRef {
            id: self.kek_name.clone(),
            version,
        }
    }

    fn alias_prefix(&self) -> String {
        format!("{ALIAS_PREFIX}{}/v", self.kek_name)
    }

    fn alias(&self, version: u32) -> String {
        format!("{}{version}", self.alias_prefix())
    }

    fn forget(&self, version: u32) {
        self.write().meta.remove(&version);
    }

    /// The encryption context of a wrap under `kek`.
    fn context(&self, request: &KeyRequest, kek: &KekRef) -> HashMap<String, String> {
        let purpose = match request.purpose {
            KeyPurpose::Data => "data",
            KeyPurpose::Index => "index",
        };
        HashMap::from([
            ("panseal:id".to_owned(), request.id.to_string()),
            ("panseal:scope".to_owned(), request.scope.to_string()),
            (
                "panseal:environment".to_owned(),
                request.environment.to_string(),
            ),
            ("panseal:purpose".to_owned(), purpose.to_owned()),
            ("panseal:kek".to_owned(), kek.to_string()),
        ])
    }

    /// Reads every alias of the KEK (`ListAliases`, all pages).
    async fn list_versions(&self) -> Result<(), KeyServiceError> {
        let prefix = self.alias_prefix();
        let mut aliases = BTreeMap::new();
        let mut marker: Option<String> = None;
        loop {
            let page = self
                .client
                .list_aliases()
                .set_marker(marker.take())
                .limit(100)
                .send()
                .await
                .map_err(|e| map_sdk(e, false))?;
            for a in page.aliases() {
                let version = a
                    .alias_name()
                    .and_then(|n| n.strip_prefix(&prefix))
                    .and_then(|v| v.parse::<u32>().ok())
                    .filter(|v| *v >= 1);
                if let (Some(version), Some(target)) = (version, a.target_key_id()) {
                    aliases.insert(version, target.to_owned());
                }
            }
            match (page.truncated(), page.next_marker()) {
                (true, Some(next)) => marker = Some(next.to_owned()),
                _ => break,
            }
        }
        let mut v = self.write();
        // An alias re-pointed to another key invalidates what we knew.
        v.meta.retain(|version, _| aliases.contains_key(version));
        v.aliases = aliases;
        v.listed_at = Some(Instant::now());
        Ok(())
    }

    async fn list_if_stale(&self) -> Result<(), KeyServiceError> {
        let stale = self
            .read()
            .listed_at
            .is_none_or(|t| t.elapsed() >= self.ttl);
        if stale {
            self.list_versions().await?;
        }
        Ok(())
    }

    /// The key behind a version (`DescribeKey` of its alias), whatever its
    /// state.
    async fn meta_any_state(&self, version: u32) -> Result<KeyMeta, KeyServiceError> {
        let cached = self.read().meta.get(&version).cloned();
        if let Some(m) = cached {
            if m.read_at.elapsed() < self.ttl {
                return Ok(m);
            }
        }
        let out = self
            .client
            .describe_key()
            .key_id(self.alias(version))
            .send()
            .await;
        let out = match out {
            Ok(out) => out,
            Err(e) if e.code() == Some("NotFoundException") => {
                // No alias: if a newer version exists this one was deleted
                // (KMS deletes a key's aliases with it).
                self.list_versions().await?;
                let newest = self.read().newest();
                let name = self.kek_ref(version).to_string();
                return Err(if version >= 1 && version < newest {
                    KeyServiceError::KekDestroyed(name)
                } else {
                    KeyServiceError::UnknownKek(name)
                });
            }
            Err(e) => return Err(map_sdk(e, false)),
        };
        let md = out
            .key_metadata()
            .ok_or_else(|| KeyServiceError::Other("DescribeKey returned no key metadata".into()))?;
        let meta = KeyMeta {
            arn: md.arn().unwrap_or(md.key_id()).to_owned(),
            key_id: md.key_id().to_owned(),
            state: md.key_state().cloned().unwrap_or(KmsKeyState::Unavailable),
            symmetric: md.key_spec() == Some(&KeySpec::SymmetricDefault)
                && md.key_usage() == Some(&KeyUsageType::EncryptDecrypt),
            read_at: Instant::now(),
        };
        self.write().meta.insert(version, meta.clone());
        Ok(meta)
    }

    /// The key behind a version, refused unless it is an enabled symmetric
    /// encryption key. `fresh` ignores the cache.
    async fn meta(&self, version: u32, fresh: bool) -> Result<KeyMeta, KeyServiceError> {
        if fresh {
            self.forget(version);
        }
        let meta = self.meta_any_state(version).await?;
        let name = self.kek_ref(version).to_string();
        if !meta.symmetric {
            return Err(KeyServiceError::Other(format!(
                "KEK {name} is not a SYMMETRIC_DEFAULT ENCRYPT_DECRYPT KMS key"
            )));
        }
        match meta.state {
            KmsKeyState::Enabled => Ok(meta),
            KmsKeyState::Disabled => Err(KeyServiceError::KekDisabled(name)),
            KmsKeyState::PendingDeletion | KmsKeyState::PendingReplicaDeletion => {
                Err(KeyServiceError::KekDestroyed(name))
            }
            KmsKeyState::Unavailable => Err(KeyServiceError::Unavailable(format!(
                "the key of KEK {name} is unavailable (its custom key store is disconnected)"
            ))),
            other => Err(KeyServiceError::Other(format!(
                "the key of KEK {name} is in state {}",
                other.as_str()
            ))),
        }
    }

    /// The newest version and its key (after a fresh list if the cached
    /// one is stale or `fresh`).
    async fn current(&self, fresh: bool) -> Result<(u32, KeyMeta), KeyServiceError> {
        if fresh {
            self.list_versions().await?;
        } else {
            self.list_if_stale().await?;
        }
        let newest = self.read().newest();
        if newest == 0 {
            return Err(KeyServiceError::UnknownKek(self.kek_name.clone()));
        }
        Ok((newest, self.meta(newest, fresh).await?))
    }

    async fn info(&self, fresh: bool) -> Result<KekInfo, KeyServiceError> {
        let (version, _meta) = self.current(fresh).await?;
        Ok(KekInfo {
            id: self.kek_name.clone(),
            version,
            // SYMMETRIC_DEFAULT is AES-256-GCM in KMS's HSMs; anything else
            // was refused by `meta`.
            algorithm: "AES-256-GCM (AWS KMS SYMMETRIC_DEFAULT)".into(),
            strength_bits: 256,
            environment: self.environment.to_string(),
            state: KeyState::Active,
        })
    }

    /// `CreateKey` + `CreateAlias` for `version`. If another process created
    /// the alias first, the key made here is scheduled for deletion (it
    /// never wrapped anything) and theirs is used.
    async fn create_version(&self, version: u32) -> Result<(), KeyServiceError> {
        let tag = |k: &str, v: String| {
            Tag::builder()
                .tag_key(k)
                .tag_value(v)
                .build()
                .map_err(|e| KeyServiceError::Other(format!("KMS tag: {e}")))
        };
        let created = self
            .client
            .create_key()
            .key_spec(KeySpec::SymmetricDefault)
            .key_usage(KeyUsageType::EncryptDecrypt)
            .description(format!(
                "panseal KEK {} version {version} ({})",
                self.kek_name, self.environment
            ))
            .tags(tag("panseal:kek", self.kek_name.clone())?)
            .tags(tag("panseal:version", version.to_string())?)
            .tags(tag("panseal:environment", self.environment.to_string())?)
            .send()
            .await
            .map_err(|e| map_sdk(e, false))?;
        let key_id = created
            .key_metadata()
            .map(|m| m.key_id().to_owned())
            .ok_or_else(|| KeyServiceError::Other("CreateKey returned no key id".into()))?;
        let alias = self
            .client
            .create_alias()
            .alias_name(self.alias(version))
            .target_key_id(&key_id)
            .send()
            .await;
        match alias {
            Ok(_) => {
                tracing::info!(kek = %self.kek_ref(version), "KEK version created");
            }
            Err(e) if e.code() == Some("AlreadyExistsException") => {
                tracing::warn!(
                    kek = %self.kek_ref(version),
                    "another process created this KEK version first; deleting the spare key"
                );
                if let Err(e) = self
                    .client
                    .schedule_key_deletion()
                    .key_id(&key_id)
                    .pending_window_in_days(7)
                    .send()
                    .await
                {
                    tracing::warn!(error = %DisplayErrorContext(&e), "could not schedule the spare key's deletion");
                }
            }
            Err(e) => return Err(map_sdk(e, false)),
        }
        self.list_versions().await
    }
}

/// A scope as it appears in a KMS alias (`[a-zA-Z0-9/_-]` only): letters,
/// digits and `-` as they are, `_` as `__`, `.` as `_d`, `:` as `_c`.
/// Unambiguous, and never produces `/`.
fn escape_scope(scope: &Scope) -> String {
    let mut out = String::with_capacity(scope.as_str().len() * 2);
    for c in scope.as_str().chars() {
        match c {
            '_' => out.push_str("__"),
            '.' => out.push_str("_d"),
            ':' => out.push_str("_c"),
            c => out.push(c),
        }
    }
    out
}

fn tag(k: &str, v: String) -> Result<Tag, KeyServiceError> {
    Tag::builder()
        .tag_key(k)
        .tag_value(v)
        .build()
        .map_err(|e| KeyServiceError::Other(format!("KMS tag: {e}")))
}

fn state_tag(state: KeyState) -> &'static str {
    if state == KeyState::Active {
        "active"
    } else {
        "lookup-only"
    }
}

impl Inner {
    /// `alias/panseal/<name>/index/<escaped scope>/v`.
    fn index_alias_prefix(&self, scope: &Scope) -> Result<String, KeyServiceError> {
        let p = format!(
            "{ALIAS_PREFIX}{}/index/{}/v",
            self.kek_name,
            escape_scope(scope)
        );
        if p.len() + 10 > MAX_ALIAS_LEN {
            return Err(KeyServiceError::Other(format!(
                "scope {scope} is too long for a KMS alias once escaped"
            )));
        }
        Ok(p)
    }

    fn record_alias(&self) -> String {
        format!("{ALIAS_PREFIX}{}/record-mac", self.kek_name)
    }

    /// Every alias with `prefix` and its target key (`ListAliases`, all pages).
    async fn aliases(&self, prefix: &str) -> Result<Vec<(String, String)>, KeyServiceError> {
        let mut out = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let page = self
                .client
                .list_aliases()
                .set_marker(marker.take())
                .limit(100)
                .send()
                .await
                .map_err(|e| map_sdk(e, false))?;
            for a in page.aliases() {
                if let (Some(name), Some(target)) = (a.alias_name(), a.target_key_id()) {
                    if name.starts_with(prefix) {
                        out.push((name.to_owned(), target.to_owned()));
                    }
                }
            }
            match (page.truncated(), page.next_marker()) {
                (true, Some(next)) => marker = Some(next.to_owned()),
                _ => break,
            }
        }
        Ok(out)
    }

    /// The key behind an HMAC alias target, refused unless it is an
    /// enabled `HMAC_256` `GENERATE_VERIFY_MAC` key. `Ok(None)` for a key
    /// pending deletion (destroyed).
    async fn hmac_key(&self, key_id: &str, what: &str) -> Result<Option<String>, KeyServiceError> {
        let out = self
            .client
            .describe_key()
            .key_id(key_id)
            .send()
            .await
            .map_err(|e| map_sdk(e, false))?;
        let md = out
            .key_metadata()
            .ok_or_else(|| KeyServiceError::Other("DescribeKey returned no key metadata".into()))?;
        if md.key_spec() != Some(&KeySpec::Hmac256)
            || md.key_usage() != Some(&KeyUsageType::GenerateVerifyMac)
        {
            return Err(KeyServiceError::Other(format!(
                "{what} is not an HMAC_256 GENERATE_VERIFY_MAC KMS key"
            )));
        }
        match md.key_state() {
            Some(KmsKeyState::Enabled) => Ok(Some(md.arn().unwrap_or(md.key_id()).to_owned())),
            Some(KmsKeyState::PendingDeletion) => Ok(None),
            Some(KmsKeyState::Disabled) => Err(KeyServiceError::KekDisabled(what.to_owned())),
            other => Err(KeyServiceError::Other(format!(
                "{what} is in state {:?}",
                other.map(|s| s.as_str())
            ))),
        }
    }

    /// Reads `scope`'s index-key versions from KMS, newest first.
    async fn scan_index(&self, scope: &Scope) -> Result<Vec<IndexVersion>, KeyServiceError> {
        let prefix = self.index_alias_prefix(scope)?;
        let mut out = Vec::new();
        for (name, target) in self.aliases(&prefix).await? {
            let Some(version) = name
                .strip_prefix(&prefix)
                .and_then(|v| v.parse::<u32>().ok())
                .filter(|v| *v >= 1)
            else {
                continue;
            };
            let what = format!("index key {name}");
            let Some(arn) = self.hmac_key(&target, &what).await? else {
                continue;
            };
            let tags = self
                .client
                .list_resource_tags()
                .key_id(&arn)
                .send()
                .await
                .map_err(|e| map_sdk(e, false))?;
            let mut state = None;
            let mut created_at = 0;
            for t in tags.tags() {
                match t.tag_key() {
                    STATE_TAG => {
                        state = match t.tag_value() {
                            "active" => Some(KeyState::Active),
                            "lookup-only" => Some(KeyState::DecryptOnly),
                            _ => None,
                        }
                    }
                    CREATED_TAG => created_at = t.tag_value().parse().unwrap_or(0),
                    _ => {}
                }
            }
            let state = state.ok_or_else(|| {
                KeyServiceError::Other(format!("{what} has no valid {STATE_TAG} tag"))
            })?;
            out.push(IndexVersion {
                version,
                arn,
                key_id: target,
                state,
                created_at,
            });
        }
        out.sort_by_key(|v| std::cmp::Reverse(v.version));
        self.index
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(scope.clone(), (Instant::now(), out.clone()));
        Ok(out)
    }

    async fn index_versions(
        &self,
        scope: &Scope,
        fresh: bool,
    ) -> Result<Vec<IndexVersion>, KeyServiceError> {
        if !fresh {
            let cached = self
                .index
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(scope)
                .filter(|(at, v)| at.elapsed() < self.ttl && !v.is_empty())
                .map(|(_, v)| v.clone());
            if let Some(v) = cached {
                return Ok(v);
            }
        }
        self.scan_index(scope).await
    }

    /// Creates an `HMAC_256` key with `tags` and points `alias` at it.
    async fn create_hmac_key(
        &self,
        alias: &str,
        description: String,
        tags: Vec<Tag>,
    ) -> Result<String, KeyServiceError> {
        let created = self
            .client
            .create_key()
            .key_spec(KeySpec::Hmac256)
            .key_usage(KeyUsageType::GenerateVerifyMac)
            .description(description)
            .set_tags(Some(tags))
            .send()
            .await
            .map_err(|e| map_sdk(e, false))?;
        let md = created
            .key_metadata()
            .ok_or_else(|| KeyServiceError::Other("CreateKey returned no key metadata".into()))?;
        let key_id = md.key_id().to_owned();
        let arn = md.arn().unwrap_or(md.key_id()).to_owned();
        match self
            .client
            .create_alias()
            .alias_name(alias)
            .target_key_id(&key_id)
            .send()
            .await
        {
            Ok(_) => Ok(arn),
            Err(e) => {
                // Another process made it first (or the alias is refused):
                // the spare key never MACed anything.
                let _ = self
                    .client
                    .schedule_key_deletion()
                    .key_id(&key_id)
                    .pending_window_in_days(7)
                    .send()
                    .await;
                if e.code() == Some("AlreadyExistsException") {
                    Err(KeyServiceError::Other(format!(
                        "{alias} was created concurrently; retry"
                    )))
                } else {
                    Err(map_sdk(e, false))
                }
            }
        }
    }

    async fn generate_mac(&self, key: &str, message: Vec<u8>) -> Result<[u8; 32], KeyServiceError> {
        // The SDK's request buffers are not wiped; see the README.
        let out = self
            .client
            .generate_mac()
            .key_id(key)
            .mac_algorithm(MacAlgorithmSpec::HmacSha256)
            .message(Blob::new(message))
            .send()
            .await
            .map_err(|e| map_sdk(e, false))?;
        let mac = out.mac().map(|b| b.as_ref()).unwrap_or_default();
        <[u8; 32]>::try_from(mac)
            .map_err(|_| KeyServiceError::Other("GenerateMac returned no 32-byte MAC".into()))
    }

    /// The record-MAC key (`alias/panseal/<name>/record-mac`), created if
    /// asked and missing.
    async fn record_key(&self, create: bool) -> Result<Option<String>, KeyServiceError> {
        let alias = self.record_alias();
        let found = self
            .aliases(&alias)
            .await?
            .into_iter()
            .find(|(n, _)| *n == alias);
        match found {
            Some((_, target)) => {
                self.hmac_key(&target, &format!("record-MAC key {alias}"))
                    .await
            }
            None if create => {
                let arn = self
                    .create_hmac_key(
                        &alias,
                        format!(
                            "panseal record-MAC key of {} ({})",
                            self.kek_name, self.environment
                        ),
                        vec![
                            tag("panseal:kek", self.kek_name.clone())?,
                            tag("panseal:environment", self.environment.to_string())?,
                            tag("panseal:purpose", "record-mac".into())?,
                        ],
                    )
                    .await?;
                tracing::info!(alias = %alias, "record-MAC key created");
                Ok(Some(arn))
            }
            None => Ok(None),
        }
    }

    async fn record_verifies(&self, record: &WrappedDek) -> Result<bool, KeyServiceError> {
        let Some(tag) = record.tag else {
            return Ok(false);
        };
        let Some(key) = self.record_key(false).await? else {
            return Ok(false);
        };
        let message = record.signed_bytes();
        if message.len() > MAX_MAC_MESSAGE {
            return Ok(false);
        }
        let out = self
            .client
            .verify_mac()
            .key_id(&key)
            .mac_algorithm(MacAlgorithmSpec::HmacSha256)
            .message(Blob::new(message))
            .mac(Blob::new(tag.0.to_vec()))
            .send()
            .await;
        match out {
            Ok(o) => Ok(o.mac_valid()),
            Err(e) if e.code() == Some("KMSInvalidMacException") => Ok(false),
            Err(e) => Err(map_sdk(e, false)),
        }
    }
}

fn validate_kek_name(name: &str) -> Result<(), KeyServiceError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
    {
        return Err(KeyServiceError::Other(
            "KEK name must be 1 to 64 characters from A-Z a-z 0-9 _ - (it becomes part of a KMS alias)"
                .into(),
        ));
    }
    Ok(())
}

/// Maps an SDK failure. `decrypting`: the call decrypts a stored wrap, so
/// the errors that mean "this ciphertext does not authenticate" become the
/// opaque [`KeyServiceError::UnwrapFailed`].
fn map_sdk<E>(e: SdkError<E, HttpResponse>, decrypting: bool) -> KeyServiceError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match &e {
        SdkError::TimeoutError(_) => {
            KeyServiceError::Unavailable("AWS KMS did not answer in time".into())
        }
        SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => KeyServiceError::Unavailable(
            format!("AWS KMS unreachable: {}", DisplayErrorContext(&e)),
        ),
        SdkError::ServiceError(s) if s.err().code().is_some() => {
            classify(s.err().code(), s.err().message(), decrypting)
        }
        SdkError::ServiceError(s) => {
            // An HTTP error without a KMS error body: a proxy, a load
            // balancer or a failing server.
            let status = s.raw().status().as_u16();
            let detail = format!("AWS KMS answered HTTP {status} without an error code");
            if status >= 500 {
                KeyServiceError::Unavailable(detail)
            } else {
                KeyServiceError::Other(detail)
            }
        }
        _ => KeyServiceError::Other(format!("AWS KMS request: {}", DisplayErrorContext(&e))),
    }
}

/// Maps a KMS error code. Messages from KMS name keys and actions, never key
/// material.
fn classify(code: Option<&str>, message: Option<&str>, decrypting: bool) -> KeyServiceError {
    let code = code.unwrap_or("unknown error");
    let detail = match message {
        Some(m) if !m.is_empty() => format!("AWS KMS {code}: {m}"),
        _ => format!("AWS KMS {code}"),
    };
    match code {
        "InvalidCiphertextException" | "IncorrectKeyException" if decrypting => {
            KeyServiceError::UnwrapFailed
        }
        // KMS answers a ciphertext that names a key this caller cannot use
        // (altered, or made under another key) with AccessDenied ("The
        // ciphertext refers to a customer master key that does not
        // exist…", or no message from some compatible servers): the wrap
        // does not authenticate. A credential without kms:Decrypt gets
        // "User: … is not authorized to perform: kms:Decrypt …", which is
        // a permission problem.
        "AccessDeniedException"
            if decrypting && !message.is_some_and(|m| m.contains("not authorized")) =>
        {
            KeyServiceError::UnwrapFailed
        }
        "AccessDeniedException"
        | "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "IncompleteSignature"
        | "MissingAuthenticationToken"
        | "ExpiredTokenException"
        | "InvalidClientTokenId" => KeyServiceError::PermissionDenied(detail),
        "NotFoundException" => KeyServiceError::UnknownKek(detail),
        "DisabledException" => KeyServiceError::KekDisabled(detail),
        "KMSInvalidStateException" => {
            if message.is_some_and(|m| m.to_ascii_lowercase().contains("pending deletion")) {
                KeyServiceError::KekDestroyed(detail)
            } else {
                KeyServiceError::KekDisabled(detail)
            }
        }
        "ThrottlingException" | "LimitExceededException" | "RequestLimitExceeded" => {
            KeyServiceError::QuotaExceeded(detail)
        }
        "KMSInternalException"
        | "DependencyTimeoutException"
        | "KeyUnavailableException"
        | "ServiceUnavailable"
        | "ServiceUnavailableException"
        | "InternalFailure"
        | "InternalServerError" => KeyServiceError::Unavailable(detail),
        _ => KeyServiceError::Other(detail),
    }
}

/// Takes a plaintext key out of an SDK blob into a zeroizing buffer.
fn take_key(blob: Option<Blob>) -> Result<Zeroizing<[u8; DEK_LEN]>, KeyServiceError> {
    let bytes = Zeroizing::new(blob.map(Blob::into_inner).unwrap_or_default());
    if bytes.len() != DEK_LEN {
        return Err(KeyServiceError::UnwrapFailed);
    }
    let mut key = Zeroizing::new([0u8; DEK_LEN]);
    key.copy_from_slice(&bytes);
    Ok(key)
}

impl sealed::Sealed for AwsKmsKeyService {}

#[async_trait]
impl KeyService for AwsKmsKeyService {
    async fn kek_info(&self) -> Result<KekInfo, KeyServiceError> {
        self.inner.info(true).await
    }

    async fn wrap(&self, request: &KeyRequest, dek: &Dek) -> Result<WrappedKey, KeyServiceError> {
        self.require(self.inner.permissions.wrap, "wrap")?;
        self.check_env(request)?;
        super::refuse_index_purpose(request)?;
        let (version, meta) = self.inner.current(false).await?;
        let kek = self.inner.kek_ref(version);
        let out = self
            .inner
            .client
            .encrypt()
            .key_id(&meta.arn)
            // The SDK's request buffers are not wiped; see the README.
            .plaintext(Blob::new(dek.expose_secret().to_vec()))
            .set_encryption_context(Some(self.inner.context(request, &kek)))
            .send()
            .await
            .map_err(|e| map_sdk(e, false))?;
        let bytes = out
            .ciphertext_blob
            .map(Blob::into_inner)
            .ok_or_else(|| KeyServiceError::Other("Encrypt returned no ciphertext".into()))?;
        Ok(WrappedKey { kek, bytes })
    }

    /// `GenerateDataKey` (AES-256): the DEK comes from KMS's generator.
    async fn generate(&self, request: &KeyRequest) -> Result<(Dek, WrappedKey), KeyServiceError> {
        self.require(self.inner.permissions.wrap, "wrap")?;
        self.check_env(request)?;
        super::refuse_index_purpose(request)?;
        let (version, meta) = self.inner.current(false).await?;
        let kek = self.inner.kek_ref(version);
        let mut out = self
            .inner
            .client
            .generate_data_key()
            .key_id(&meta.arn)
            .key_spec(DataKeySpec::Aes256)
            .set_encryption_context(Some(self.inner.context(request, &kek)))
            .send()
            .await
            .map_err(|e| map_sdk(e, false))?;
        let key = take_key(out.plaintext.take()).map_err(|_| {
            KeyServiceError::Other("GenerateDataKey returned no 32-byte key".into())
        })?;
        let bytes = out
            .ciphertext_blob
            .take()
            .map(Blob::into_inner)
            .ok_or_else(|| {
                KeyServiceError::Other("GenerateDataKey returned no ciphertext".into())
            })?;
        Ok((Dek::from_unwrapped(&key), WrappedKey { kek, bytes }))
    }

    async fn unwrap(
        &self,
        request: &KeyRequest,
        wrapped: &WrappedKey,
        _access: &Access,
    ) -> Result<Dek, KeyServiceError> {
        self.require(self.inner.permissions.unwrap, "unwrap")?;
        self.check_env(request)?;
        super::refuse_index_purpose(request)?;
        self.check_kek_id(wrapped)?;
        if wrapped.bytes.is_empty() || wrapped.kek.version == 0 {
            return Err(KeyServiceError::UnwrapFailed);
        }
        let meta = self.inner.meta(wrapped.kek.version, false).await?;
        let mut out = self
            .inner
            .client
            .decrypt()
            .key_id(&meta.arn)
            .ciphertext_blob(Blob::new(wrapped.bytes.clone()))
            .set_encryption_context(Some(self.inner.context(request, &wrapped.kek)))
            .send()
            .await
            .map_err(|e| map_sdk(e, true))?;
        let key = take_key(out.plaintext.take())?;
        if out.key_id() != Some(meta.arn.as_str()) {
            return Err(KeyServiceError::UnwrapFailed);
        }
        Ok(Dek::from_unwrapped(&key))
    }

    /// `ReEncrypt` under the newest version: the DEK never leaves KMS.
    async fn rewrap(
        &self,
        request: &KeyRequest,
        wrapped: &WrappedKey,
    ) -> Result<WrappedKey, KeyServiceError> {
        self.require(self.inner.permissions.rewrap, "rewrap")?;
        self.check_env(request)?;
        self.check_kek_id(wrapped)?;
        if wrapped.bytes.is_empty() || wrapped.kek.version == 0 {
            return Err(KeyServiceError::UnwrapFailed);
        }
        let source = self.inner.meta(wrapped.kek.version, false).await?;
        let (version, dest) = self.inner.current(false).await?;
        let kek = self.inner.kek_ref(version);
        let out = self
            .inner
            .client
            .re_encrypt()
            .ciphertext_blob(Blob::new(wrapped.bytes.clone()))
            .source_key_id(&source.arn)
            .set_source_encryption_context(Some(self.inner.context(request, &wrapped.kek)))
            .destination_key_id(&dest.arn)
            .set_destination_encryption_context(Some(self.inner.context(request, &kek)))
            .send()
            .await
            .map_err(|e| map_sdk(e, true))?;
        if out.source_key_id() != Some(source.arn.as_str()) {
            return Err(KeyServiceError::UnwrapFailed);
        }
        let bytes = out
            .ciphertext_blob
            .map(Blob::into_inner)
            .ok_or_else(|| KeyServiceError::Other("ReEncrypt returned no ciphertext".into()))?;
        Ok(WrappedKey { kek, bytes })
    }

    async fn permissions(&self) -> Result<Permissions, KeyServiceError> {
        Ok(self.inner.permissions)
    }

    async fn index_keys(&self, scope: &Scope) -> Result<Vec<IndexKeyInfo>, KeyServiceError> {
        self.require(self.inner.permissions.index, "index")?;
        Ok(self
            .inner
            .index_versions(scope, true)
            .await?
            .into_iter()
            .map(|v| IndexKeyInfo {
                scope: scope.clone(),
                version: v.version,
                state: v.state,
                created_at: v.created_at,
            })
            .collect())
    }

    /// One `GenerateMac` (`HMAC_SHA_256`) per (PAN, version), at most
    /// `mac_concurrency` in flight; the first failure cancels the rest.
    async fn blind_index(
        &self,
        scope: &Scope,
        versions: &[u32],
        pans: &[&Pan],
        _access: &Access,
    ) -> Result<Vec<[u8; 32]>, KeyServiceError> {
        self.require(self.inner.permissions.index, "index")?;
        if pans.is_empty() || versions.is_empty() {
            return Ok(Vec::new());
        }
        let mut live = self.inner.index_versions(scope, false).await?;
        let mut arns = Vec::with_capacity(versions.len());
        for v in versions {
            let mut found = live.iter().find(|k| k.version == *v);
            if found.is_none() {
                live = self.inner.index_versions(scope, true).await?;
                found = live.iter().find(|k| k.version == *v);
            }
            match found {
                Some(k) => arns.push(k.arn.clone()),
                None => {
                    return Err(KeyServiceError::UnknownIndexKey {
                        scope: scope.to_string(),
                        version: *v,
                    })
                }
            }
        }
        let digits: Arc<Vec<Zeroizing<Vec<u8>>>> = Arc::new(
            pans.iter()
                .map(|p| Zeroizing::new(p.expose_digits().as_bytes().to_vec()))
                .collect(),
        );
        let arns = Arc::new(arns);
        let total = digits.len() * arns.len();
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..self.inner.mac_concurrency.min(total) {
            let (inner, digits, arns, next) = (
                Arc::clone(&self.inner),
                Arc::clone(&digits),
                Arc::clone(&arns),
                Arc::clone(&next),
            );
            workers.spawn(async move {
                let mut done = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= total {
                        return Ok::<_, KeyServiceError>(done);
                    }
                    let (p, v) = (i / arns.len(), i % arns.len());
                    let mac = inner.generate_mac(&arns[v], digits[p].to_vec()).await?;
                    done.push((i, mac));
                }
            });
        }
        let mut out = vec![[0u8; 32]; total];
        while let Some(joined) = workers.join_next().await {
            let part = match joined {
                Ok(Ok(part)) => part,
                Ok(Err(e)) => {
                    workers.abort_all();
                    return Err(e);
                }
                Err(_) => {
                    workers.abort_all();
                    return Err(KeyServiceError::Other("GenerateMac task failed".into()));
                }
            };
            for (i, mac) in part {
                out[i] = mac;
            }
        }
        Ok(out)
    }

    /// `CreateKey` (`HMAC_256`, `GENERATE_VERIFY_MAC`) + `CreateAlias`
    /// `alias/panseal/<name>/index/<scope>/v<N>`, tagged active; the
    /// previous active version is re-tagged lookup-only.
    async fn create_index_key(&self, scope: &Scope) -> Result<IndexKeyInfo, KeyServiceError> {
        self.require(self.inner.permissions.custodian, "custodian")?;
        let live = self.inner.index_versions(scope, true).await?;
        // Versions are numbered past every alias, live or pending deletion.
        let prefix = self.inner.index_alias_prefix(scope)?;
        let newest_alias = self
            .inner
            .aliases(&prefix)
            .await?
            .iter()
            .filter_map(|(n, _)| n.strip_prefix(&prefix)?.parse::<u32>().ok())
            .max()
            .unwrap_or(0);
        let newest = live.first().map_or(0, |k| k.version).max(newest_alias);
        let version = newest
            .checked_add(1)
            .ok_or_else(|| KeyServiceError::Other("index-key version overflow".into()))?;
        let now = unix_now();
        self.inner
            .create_hmac_key(
                &format!("{prefix}{version}"),
                format!(
                    "panseal index key {} scope {scope} version {version} ({})",
                    self.inner.kek_name, self.inner.environment
                ),
                vec![
                    tag("panseal:kek", self.inner.kek_name.clone())?,
                    tag("panseal:environment", self.inner.environment.to_string())?,
                    tag("panseal:scope", scope.to_string())?,
                    tag("panseal:version", version.to_string())?,
                    tag(STATE_TAG, "active".into())?,
                    tag(CREATED_TAG, now.to_string())?,
                ],
            )
            .await?;
        for old in live.iter().filter(|k| k.state == KeyState::Active) {
            self.inner
                .client
                .tag_resource()
                .key_id(&old.arn)
                .tags(tag(STATE_TAG, state_tag(KeyState::DecryptOnly).into())?)
                .send()
                .await
                .map_err(|e| map_sdk(e, false))?;
        }
        self.inner.scan_index(scope).await?;
        tracing::info!(scope = %scope, version, "index key created in KMS");
        Ok(IndexKeyInfo {
            scope: scope.clone(),
            version,
            state: KeyState::Active,
            created_at: now,
        })
    }

    /// Lookup-only: the state tag. Destroyed: `DeleteAlias` and
    /// `ScheduleKeyDeletion` (7 days). The newest version is never destroyed.
    async fn set_index_key_state(
        &self,
        scope: &Scope,
        version: u32,
        state: KeyState,
    ) -> Result<(), KeyServiceError> {
        self.require(self.inner.permissions.custodian, "custodian")?;
        let live = self.inner.index_versions(scope, true).await?;
        let Some(key) = live.iter().find(|k| k.version == version) else {
            return Err(KeyServiceError::UnknownIndexKey {
                scope: scope.to_string(),
                version,
            });
        };
        if state == key.state {
            return Ok(());
        }
        if !key.state.can_become(state) {
            return Err(KeyServiceError::Other(format!(
                "index key v{version}: state may only move forward ({:?} -> {state:?} refused)",
                key.state
            )));
        }
        match state {
            KeyState::DecryptOnly => {
                self.inner
                    .client
                    .tag_resource()
                    .key_id(&key.arn)
                    .tags(tag(STATE_TAG, state_tag(state).into())?)
                    .send()
                    .await
                    .map_err(|e| map_sdk(e, false))?;
            }
            KeyState::Destroyed => {
                if live.first().map(|k| k.version) == Some(version) {
                    return Err(KeyServiceError::Other(
                        "the newest index-key version cannot be destroyed; create a new one first"
                            .into(),
                    ));
                }
                self.inner
                    .client
                    .schedule_key_deletion()
                    .key_id(&key.key_id)
                    .pending_window_in_days(7)
                    .send()
                    .await
                    .map_err(|e| map_sdk(e, false))?;
                // The alias stays until KMS deletes the key, and the
                // newest version is never destroyed, so a number is never
                // reused; a key pending deletion is not listed or used.
            }
            other => {
                return Err(KeyServiceError::Other(format!(
                    "index keys are active, lookup-only or destroyed ({other:?} refused)"
                )))
            }
        }
        self.inner.scan_index(scope).await?;
        Ok(())
    }

    /// Verifies `previous`'s tag, applies [`WrappedDek::check_transition`]
    /// with the configured permissions, then `GenerateMac` over
    /// `record.signed_bytes()` under the record-MAC key (created on first use).
    async fn authenticate_record(
        &self,
        previous: Option<&WrappedDek>,
        record: &WrappedDek,
    ) -> Result<RecordTag, KeyServiceError> {
        WrappedDek::check_transition(previous, record, &self.inner.permissions, unix_now())
            .map_err(KeyServiceError::RecordTransition)?;
        if let Some(p) = previous {
            if !self.inner.record_verifies(p).await? {
                return Err(KeyServiceError::RecordTampered(p.id.to_string()));
            }
        }
        let message = record.signed_bytes();
        if message.len() > MAX_MAC_MESSAGE {
            return Err(KeyServiceError::Other(format!(
                "record {} is {} bytes; GenerateMac takes at most {MAX_MAC_MESSAGE}",
                record.id,
                message.len()
            )));
        }
        let key = self.inner.record_key(true).await?.ok_or_else(|| {
            KeyServiceError::Other("the record-MAC key is pending deletion".into())
        })?;
        Ok(RecordTag(self.inner.generate_mac(&key, message).await?))
    }

    /// `VerifyMac`. Stateless: a rolled-back record that once verified
    /// still does (only keyd remembers sequences).
    async fn verify_record(&self, record: &WrappedDek) -> Result<(), KeyServiceError> {
        if self.inner.record_verifies(record).await? {
            Ok(())
        } else {
            Err(KeyServiceError::RecordTampered(record.id.to_string()))
        }
    }

    async fn rotate_kek(&self) -> Result<KekInfo, KeyServiceError> {
        self.require(self.inner.permissions.custodian, "custodian")?;
        self.inner.list_versions().await?;
        let next = self
            .inner
            .read()
            .newest()
            .checked_add(1)
            .ok_or_else(|| KeyServiceError::Other("KEK version overflow".into()))?;
        self.inner.create_version(next).await?;
        self.inner.info(true).await
    }
    // ----- write-only ingest: unsupported ------------------------------------

    async fn ingest_keys(&self, _scope: &Scope) -> Result<Vec<IngestKeyInfo>, KeyServiceError> {
        Err(KeyServiceError::Unsupported(INGEST_UNSUPPORTED))
    }

    async fn create_ingest_key(&self, _scope: &Scope) -> Result<IngestKeyInfo, KeyServiceError> {
        Err(KeyServiceError::Unsupported(INGEST_UNSUPPORTED))
    }

    async fn set_ingest_key_state(
        &self,
        _scope: &Scope,
        _version: u32,
        _state: KeyState,
    ) -> Result<(), KeyServiceError> {
        Err(KeyServiceError::Unsupported(INGEST_UNSUPPORTED))
    }

    async fn open_ingest(
        &self,
        _request: &IngestOpenRequest<'_>,
        _access: &Access,
    ) -> Result<Opened, KeyServiceError> {
        Err(KeyServiceError::Unsupported(INGEST_UNSUPPORTED))
    }

    async fn admit(
        &self,
        _request: &AdmitRequest<'_>,
        _access: &Access,
    ) -> Result<Vec<Result<AdmitOutput, AdmitItemError>>, KeyServiceError> {
        Err(KeyServiceError::Unsupported(INGEST_UNSUPPORTED))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kms_errors_map_to_what_callers_act_on() {
        use KeyServiceError as E;
        let c = classify;
        assert_eq!(
            c(Some("InvalidCiphertextException"), None, true),
            E::UnwrapFailed
        );
        assert_eq!(
            c(Some("IncorrectKeyException"), None, true),
            E::UnwrapFailed
        );
        assert_eq!(
            c(
                Some("AccessDeniedException"),
                Some("The ciphertext refers to a customer master key that does not exist, does not exist in this region, or you are not allowed to access."),
                true
            ),
            E::UnwrapFailed
        );
        assert!(matches!(
            c(
                Some("AccessDeniedException"),
                Some("User: arn:aws:iam::1:user/front is not authorized to perform: kms:Decrypt"),
                true
            ),
            E::PermissionDenied(_)
        ));
        assert_eq!(
            c(Some("AccessDeniedException"), None, true),
            E::UnwrapFailed
        );
        assert!(matches!(
            c(Some("AccessDeniedException"), None, false),
            E::PermissionDenied(_)
        ));
        assert!(matches!(
            c(Some("DisabledException"), None, true),
            E::KekDisabled(_)
        ));
        assert!(matches!(
            c(
                Some("KMSInvalidStateException"),
                Some("arn:aws:kms:eu-west-1:1:key/k is pending deletion."),
                true
            ),
            E::KekDestroyed(_)
        ));
        assert!(matches!(
            c(Some("KMSInvalidStateException"), Some("disabled"), true),
            E::KekDisabled(_)
        ));
        let t = c(Some("ThrottlingException"), Some("Rate exceeded"), false);
        assert!(matches!(t, E::QuotaExceeded(_)) && t.is_retryable());
        for code in [
            "KMSInternalException",
            "DependencyTimeoutException",
            "KeyUnavailableException",
        ] {
            let e = c(Some(code), None, true);
            assert!(matches!(e, E::Unavailable(_)) && e.is_retryable(), "{code}");
        }
        assert!(matches!(
            c(Some("NotFoundException"), None, false),
            E::UnknownKek(_)
        ));
        // Outside a decrypt an invalid ciphertext is not an unwrap failure.
        assert!(matches!(
            c(Some("InvalidCiphertextException"), None, false),
            E::Other(_)
        ));
    }

    #[test]
    fn scopes_escape_into_the_alias_charset_without_collisions() {
        let names = [
            "a.b", "a:b", "a_b", "a__b", "a_db", "a_cb", "a-b", "ab", "a._:b",
        ];
        let mut seen = std::collections::HashSet::new();
        for n in names {
            let e = escape_scope(&Scope::new(n).unwrap());
            assert!(
                e.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
                "{e}"
            );
            assert!(seen.insert(e.clone()), "{n} collides as {e}");
        }
        assert_eq!(escape_scope(&Scope::new("m.1:x_y").unwrap()), "m_d1_cx__y");
    }

    #[test]
    fn credentials_and_names_are_checked_and_never_printed() {
        let c = AwsKmsCredentials::new(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG".into(),
            Some("tok-123".into()),
        );
        let text = format!("{c:?}");
        assert!(
            !text.contains("wJalrXUtnFEMI") && !text.contains("tok-123"),
            "{text}"
        );
        let cfg = AwsKmsConfig::new("cards", Environment::new("test").unwrap()).credentials(c);
        let text = format!("{cfg:?}");
        assert!(
            !text.contains("wJalrXUtnFEMI") && !text.contains("tok-123"),
            "{text}"
        );
        assert!(validate_kek_name("cards-prod_1").is_ok());
        for bad in ["", "a/b", "a:b", "a.b", &"x".repeat(65)] {
            assert!(validate_kek_name(bad).is_err(), "{bad:?}");
        }
    }
}
