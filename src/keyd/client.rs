//! The client of `panseal-keyd`: a [`KeyService`] over HTTPS with mutual
//! TLS.
//!
//! * **Connection reuse**: idle HTTP/1.1 connections are pooled and reused;
//!   TLS handshakes happen only when the pool is empty.
//! * **Timeouts**: a connect timeout and a per-request deadline.
//! * **Retries with backoff, only when safe**: a request that was never
//!   sent (connection refused, pooled connection gone) is retried for every
//!   operation; a request that may have reached the server is retried only
//!   for operations that are safe to repeat (status, KEK info, wrap,
//!   generate, unwrap, rewrap). Rotation, retirement, destroy approvals,
//!   unsealing and acknowledgements are never sent twice.
//! * **Typed errors**: server down or unreachable →
//!   [`KeyServiceError::Unavailable`] (retryable); sealed →
//!   [`KeyServiceError::Sealed`]; refused → `PermissionDenied`,
//!   `QuotaExceeded`, `Environment`, …, exactly as the in-process service.
//!
//! The client runs its network I/O on a small runtime of its own, so it works
//! the same from any async runtime, from [`crate::blocking`] and from the C
//! ABI. Plaintext keys in request and response bodies live in buffers that
//! are wiped when dropped.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::Request;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::time::{sleep, timeout, timeout_at, Instant};
use tokio_rustls::TlsConnector;
use zeroize::Zeroizing;

use crate::access::Access;
use crate::error::AdmitItemError;
use crate::error::{ConfigError, Error, KeyServiceError};
use crate::format::SealedPan;
use crate::ingest::{IngestKeyInfo, IngestPublicKey};
use crate::keyd::protocol::{
    self as proto, AcknowledgeRequest, AuditReadRequest, AuditReadResponse, CollectRequest,
    CollectResponse, DekDestroyResponse, DekTarget, DestroyResponse, ErrorBody, GenerateRequest,
    GenerateResponse, KekStatus, KekTarget, KekVersionTarget, KeyMaterial, ReshareRequest,
    ReshareResponse, RewrapRequest, ShareText, StatusResponse, UnsealRequest, UnwrapRequest,
    UnwrapResponse, WithdrawRequest, WithdrawResponse, WrapRequest, WrappedResponse,
};
use crate::keyd::protocol::{
    Permission, RevealRequest as WireReveal, RevealResponse, WhoamiResponse, WireContext,
};
use crate::keys::{
    Dek, Environment, KeyRequest, KeyState, RecordTag, Scope, WrappedDek, WrappedKey,
};
use crate::keyservice::{
    sealed, AdmitOutput, AdmitRequest, IndexKeyInfo, IngestOpenRequest, KekInfo, KeyService,
    Permissions, RevealRequest, MAX_ADMIT_BATCH,
};
use crate::pan::{Pan, PanRules};
use crate::Opened;

/// Whether a request may be sent again after it may have reached the
/// server.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Repeat {
    Safe,
    OnlyIfUnsent,
}

/// A transport failure (no answer from the server).
struct Transport {
    sent: bool,
    message: String,
}

impl Transport {
    fn unsent(message: impl Into<String>) -> Self {
        Transport {
            sent: false,
            message: message.into(),
        }
    }
    fn sent(message: impl Into<String>) -> Self {
        Transport {
            sent: true,
            message: message.into(),
        }
    }
}

/// Dropping a runtime inside async code panics; this shuts it down in the
/// background instead.
struct OwnRuntime(Option<tokio::runtime::Runtime>);

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

struct Inner {
    address: String,
    server_name: ServerName<'static>,
    host_header: HeaderValue,
    connector: TlsConnector,
    authorization: Option<HeaderValue>,
    environment: Environment,
    scope: Option<Scope>,
    request_timeout: Duration,
    connect_timeout: Duration,
    retries: u32,
    backoff: Duration,
    max_idle: usize,
    pool: Mutex<Vec<SendRequest<Full<Bytes>>>>,
    requests: AtomicU64,
    connections: AtomicU64,
}

/// A [`KeyService`] served by a `panseal-keyd` process.
///
/// Cheap to clone; clones share the connection pool. Build one with
/// [`RemoteKeyService::builder`]. Besides the trait, it offers the custodian
/// operations of keyd: [`RemoteKeyService::rotate`], `retire`,
/// `approve_destroy`, `acknowledge`, `unseal`, `seal` and audit reading.
#[derive(Clone)]
pub struct RemoteKeyService {
    inner: Arc<Inner>,
    runtime: Arc<OwnRuntime>,
}

impl fmt::Debug for RemoteKeyService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteKeyService")
            .field("address", &self.inner.address)
            .field("environment", &self.inner.environment)
            .field("scope", &self.inner.scope)
            .finish_non_exhaustive()
    }
}

/// Builds a [`RemoteKeyService`].
pub struct RemoteKeyServiceBuilder {
    address: Option<String>,
    server_name: Option<String>,
    ca: Option<Source>,
    identity: Option<(Source, Source)>,
    token: Option<Zeroizing<String>>,
    environment: Option<String>,
    scope: Option<String>,
    request_timeout: Duration,
    connect_timeout: Duration,
    retries: u32,
    backoff: Duration,
    max_idle: usize,
}

enum Source {
    File(PathBuf),
    Bytes(Zeroizing<Vec<u8>>),
}

impl Source {
    fn read(&self, what: &str) -> Result<Zeroizing<Vec<u8>>, Error> {
        match self {
            Source::Bytes(b) => Ok(b.clone()),
            Source::File(p) => std::fs::read(p).map(Zeroizing::new).map_err(|e| {
                ConfigError::KeyServiceClient(format!("cannot read {what} {}: {e}", p.display()))
                    .into()
            }),
        }
    }
}

impl fmt::Debug for RemoteKeyServiceBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteKeyServiceBuilder")
            .field("address", &self.address)
            .field("environment", &self.environment)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

impl RemoteKeyService {
    /// A builder with defaults: 2 s connect timeout, 5 s request deadline,
    /// 3 retries from 50 ms backoff, up to 32 idle connections.
    pub fn builder() -> RemoteKeyServiceBuilder {
        RemoteKeyServiceBuilder {
            address: None,
            server_name: None,
            ca: None,
            identity: None,
            token: None,
            environment: None,
            scope: None,
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            retries: 3,
            backoff: Duration::from_millis(50),
            max_idle: 32,
        }
    }
}

impl RemoteKeyServiceBuilder {
    /// The server's `host:port` (e.g. `127.0.0.1:8443`). Required.
    pub fn address(mut self, address: &str) -> Self {
        self.address = Some(address.to_owned());
        self
    }

    /// The name the server certificate must be valid for; defaults to the
    /// host part of the address.
    pub fn server_name(mut self, name: &str) -> Self {
        self.server_name = Some(name.to_owned());
        self
    }

    /// The CA certificate (PEM file) the server certificate must chain to.
    /// Required.
    pub fn ca_pem_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca = Some(Source::File(path.into()));
        self
    }

    /// The CA certificate, as PEM text.
    pub fn ca_pem(mut self, pem: &[u8]) -> Self {
        self.ca = Some(Source::Bytes(Zeroizing::new(pem.to_vec())));
        self
    }

    /// This client's certificate and private key (PEM files): its principal
    /// at the server.
    pub fn client_identity_pem_files(
        mut self,
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> Self {
        self.identity = Some((Source::File(cert.into()), Source::File(key.into())));
        self
    }

    /// This client's certificate and private key, as PEM text.
    pub fn client_identity_pem(mut self, cert: &[u8], key: &[u8]) -> Self {
        self.identity = Some((
            Source::Bytes(Zeroizing::new(cert.to_vec())),
            Source::Bytes(Zeroizing::new(key.to_vec())),
        ));
        self
    }

    /// A bearer token instead of a client certificate. **Development only**:
    /// the server accepts tokens only when configured to.
    pub fn bearer_token(mut self, token: &str) -> Self {
        self.token = Some(Zeroizing::new(token.to_owned()));
        self
    }

    /// The environment tag this client works in (e.g. `prod`). Required.
    pub fn environment(mut self, environment: &str) -> Self {
        self.environment = Some(environment.to_owned());
        self
    }

    /// The scope whose KEK [`KeyService::kek_info`] and
    /// [`KeyService::rotate_kek`] refer to. Wrap and unwrap use the scope of
    /// each request.
    pub fn scope(mut self, scope: &str) -> Self {
        self.scope = Some(scope.to_owned());
        self
    }

    /// Deadline for one request (send and answer), per attempt.
    pub fn request_timeout(mut self, t: Duration) -> Self {
        self.request_timeout = t;
        self
    }

    /// Deadline for opening a connection (TCP and TLS).
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t;
        self
    }

    /// How many times a failed request is retried (when safe), and the
    /// first backoff (doubled each time).
    pub fn retries(mut self, retries: u32, backoff: Duration) -> Self {
        self.retries = retries;
        self.backoff = backoff;
        self
    }

    /// At most this many idle connections are kept for reuse.
    pub fn max_idle_connections(mut self, n: usize) -> Self {
        self.max_idle = n;
        self
    }

    /// Builds the client. Makes no connection yet.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Missing`] for a missing address, CA or credential;
    /// [`ConfigError::KeyServiceClient`] for unreadable or invalid
    /// certificates, keys or names; [`ConfigError::Name`] for a bad
    /// environment or scope.
    pub fn build(self) -> Result<RemoteKeyService, Error> {
        let bad = |m: String| Error::from(ConfigError::KeyServiceClient(m));
        let address = self.address.ok_or(ConfigError::Missing("keyd address"))?;
        let environment = Environment::new(
            self.environment
                .as_deref()
                .ok_or(ConfigError::Missing("environment"))?,
        )?;
        let scope = self.scope.as_deref().map(Scope::new).transpose()?;
        let host = match self.server_name {
            Some(n) => n,
            None => host_of(&address).ok_or_else(|| bad("address must be host:port".into()))?,
        };
        let server_name = ServerName::try_from(host.clone())
            .map_err(|_| bad(format!("{host:?} is not a valid server name")))?;
        let host_header = HeaderValue::from_str(&host).map_err(|_| bad("bad host".into()))?;

        let ca = self.ca.ok_or(ConfigError::Missing("keyd CA certificate"))?;
        let ca = ca.read("CA certificate")?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&ca) {
            let cert = cert.map_err(|e| bad(format!("CA certificate: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| bad(format!("CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(bad("CA file holds no certificate".into()));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| bad(e.to_string()))?
            .with_root_certificates(roots);
        let config = match (&self.identity, &self.token) {
            (Some((cert, key)), _) => {
                let cert = cert.read("client certificate")?;
                let key = key.read("client key")?;
                let chain = CertificateDer::pem_slice_iter(&cert)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| bad(format!("client certificate: {e}")))?;
                let key = PrivateKeyDer::from_pem_slice(&key)
                    .map_err(|e| bad(format!("client key: {e}")))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| bad(format!("client identity: {e}")))?
            }
            (None, Some(_)) => builder.with_no_client_auth(),
            (None, None) => {
                return Err(ConfigError::Missing("client certificate or bearer token").into())
            }
        };
        let authorization = match &self.token {
            Some(t) => {
                let mut v = HeaderValue::from_str(&format!("Bearer {}", t.as_str()))
                    .map_err(|_| bad("bearer token has invalid characters".into()))?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("panseal-keyd-client")
            .enable_all()
            .build()
            .map_err(|e| bad(format!("cannot start the client runtime: {e}")))?;
        Ok(RemoteKeyService {
            inner: Arc::new(Inner {
                address,
                server_name,
                host_header,
                connector: TlsConnector::from(Arc::new(config)),
                authorization,
                environment,
                scope,
                request_timeout: self.request_timeout,
                connect_timeout: self.connect_timeout,
                retries: self.retries,
                backoff: self.backoff,
                max_idle: self.max_idle,
                pool: Mutex::new(Vec::new()),
                requests: AtomicU64::new(0),
                connections: AtomicU64::new(0),
            }),
            runtime: Arc::new(OwnRuntime(Some(runtime))),
        })
    }
}

fn host_of(address: &str) -> Option<String> {
    let (host, port) = address.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| host.to_owned())
}

impl Inner {
    fn pooled(&self) -> Option<SendRequest<Full<Bytes>>> {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(s) = pool.pop() {
            if !s.is_closed() {
                return Some(s);
            }
        }
        None
    }

    fn give_back(&self, s: SendRequest<Full<Bytes>>) {
        if s.is_closed() {
            return;
        }
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < self.max_idle {
            pool.push(s);
        }
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, Transport> {
        let unreachable = |e: String| {
            Transport::unsent(format!("cannot connect to keyd at {}: {e}", self.address))
        };
        let tcp = timeout(self.connect_timeout, TcpStream::connect(&self.address))
            .await
            .map_err(|_| unreachable("connect timed out".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let tls = timeout(
            self.connect_timeout,
            self.connector.connect(self.server_name.clone(), tcp),
        )
        .await
        .map_err(|_| unreachable("TLS handshake timed out".into()))?
        .map_err(|e| unreachable(format!("TLS: {e}")))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| unreachable(format!("HTTP: {e}")))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        self.connections.fetch_add(1, Ordering::Relaxed);
        Ok(sender)
    }

    fn request(&self, path: &'static str, body: Bytes) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = hyper::Method::POST;
        *req.uri_mut() = hyper::Uri::from_static(path);
        let h = req.headers_mut();
        h.insert(HOST, self.host_header.clone());
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(a) = &self.authorization {
            h.insert(AUTHORIZATION, a.clone());
        }
        req
    }

    /// One attempt: `Ok` holds the server's answer (success body or its
    /// error), `Err` a transport failure.
    async fn attempt(
        &self,
        path: &'static str,
        body: &Bytes,
    ) -> Result<Result<Zeroizing<Vec<u8>>, KeyServiceError>, Transport> {
        let deadline = Instant::now() + self.request_timeout;
        // A pooled connection may have been closed by the server; such a
        // failure happens before anything is sent, so try the next one.
        let mut from_pool = true;
        let (sender, response) = loop {
            let mut sender = match self.pooled() {
                Some(s) if from_pool => s,
                _ => {
                    from_pool = false;
                    timeout_at(deadline, self.connect())
                        .await
                        .map_err(|_| Transport::unsent("connect deadline passed"))??
                }
            };
            if sender.ready().await.is_err() {
                if from_pool {
                    continue;
                }
                return Err(Transport::unsent("connection closed before the request"));
            }
            match timeout_at(
                deadline,
                sender.try_send_request(self.request(path, body.clone())),
            )
            .await
            {
                Err(_) => return Err(Transport::sent("request timed out")),
                Ok(Ok(r)) => break (sender, r),
                Ok(Err(mut e)) => {
                    let unsent = e.take_message().is_some();
                    if unsent && from_pool {
                        continue;
                    }
                    let msg = format!("keyd connection failed: {}", e.into_error());
                    return Err(if unsent {
                        Transport::unsent(msg)
                    } else {
                        Transport::sent(msg)
                    });
                }
            }
        };
        let status = response.status();
        let mut incoming = response.into_body();
        let mut buf = Zeroizing::new(Vec::new());
        loop {
            let frame = match timeout_at(deadline, incoming.frame()).await {
                Err(_) => return Err(Transport::sent("answer timed out")),
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(Transport::sent(format!("reading answer: {e}"))),
                Ok(Some(Ok(f))) => f,
            };
            if let Ok(data) = frame.into_data() {
                // The largest answer is an admit batch's.
                if buf.len() + data.len() > proto::MAX_ADMIT_BODY_BYTES {
                    return Err(Transport::sent("answer too large"));
                }
                // The answer may hold a key: no unwiped copy when it grows.
                proto::extend_wiped(&mut buf, &data);
            }
        }
        self.give_back(sender);
        if status.is_success() {
            return Ok(Ok(buf));
        }
        let err = match serde_json::from_slice::<ErrorBody>(&buf) {
            Ok(b) => b.into_error(),
            Err(_) => KeyServiceError::Other(format!("keyd answered HTTP {status}")),
        };
        Ok(Err(err))
    }

    async fn execute(
        &self,
        path: &'static str,
        body: Bytes,
        repeat: Repeat,
    ) -> Result<Zeroizing<Vec<u8>>, KeyServiceError> {
        let mut attempt = 0u32;
        loop {
            let failure = match self.attempt(path, &body).await {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(KeyServiceError::Unavailable(m))) if repeat == Repeat::Safe => {
                    Transport::sent(m)
                }
                Ok(Err(e)) => return Err(e),
                Err(t) => t,
            };
            let may_repeat = !failure.sent || repeat == Repeat::Safe;
            if attempt >= self.retries || !may_repeat {
                return Err(KeyServiceError::Unavailable(failure.message));
            }
            let backoff = self.backoff.saturating_mul(1 << attempt.min(6));
            sleep(backoff).await;
            attempt += 1;
        }
    }
}

impl RemoteKeyService {
    async fn call<Q: Serialize, A: DeserializeOwned>(
        &self,
        path: &'static str,
        request: &Q,
        repeat: Repeat,
    ) -> Result<A, KeyServiceError> {
        // The body may hold a key: one exact allocation, wiped when the
        // last reference goes.
        let body = proto::to_json_wiped(request)
            .map_err(|e| KeyServiceError::Other(format!("encoding request: {e}")))?;
        let body = Bytes::from_owner(body);
        self.inner.requests.fetch_add(1, Ordering::Relaxed);
        let inner = Arc::clone(&self.inner);
        let rt = self
            .runtime
            .0
            .as_ref()
            .ok_or_else(|| KeyServiceError::Unavailable("client is shut down".into()))?;
        let answer = rt
            .spawn(async move { inner.execute(path, body, repeat).await })
            .await
            .map_err(|_| KeyServiceError::Unavailable("client task failed".into()))??;
        // serde's messages can quote values (key material): say where only.
        serde_json::from_slice(&answer).map_err(|e| {
            KeyServiceError::Other(format!(
                "keyd answer does not parse (line {}, column {})",
                e.line(),
                e.column()
            ))
        })
    }

    /// Test only (`hazmat-test-keys`): sends `body` to `path` as this
    /// client's principal and returns the raw answer body (success or
    /// error), so a test can play a caller that bypasses this client's
    /// checks and scan every byte keyd answers.
    ///
    /// # Errors
    ///
    /// Transport errors only.
    #[cfg(feature = "hazmat-test-keys")]
    #[doc(hidden)]
    pub async fn raw_call(
        &self,
        path: &'static str,
        body: &serde_json::Value,
    ) -> Result<Result<Vec<u8>, KeyServiceError>, KeyServiceError> {
        let body = Bytes::from(serde_json::to_vec(body).unwrap_or_default());
        let inner = Arc::clone(&self.inner);
        let rt = self
            .runtime
            .0
            .as_ref()
            .ok_or_else(|| KeyServiceError::Unavailable("client is shut down".into()))?;
        let r = rt
            .spawn(async move { inner.attempt(path, &body).await })
            .await
            .map_err(|_| KeyServiceError::Unavailable("client task failed".into()))?;
        match r {
            Ok(Ok(b)) => Ok(Ok(b.to_vec())),
            Ok(Err(e)) => Ok(Err(e)),
            Err(t) => Err(KeyServiceError::Unavailable(t.message)),
        }
    }

    /// The environment this client works in.
    pub fn environment(&self) -> &Environment {
        &self.inner.environment
    }

    /// Requests made so far (each may have been retried). A steady-state
    /// open served from the DEK cache makes none.
    pub fn requests_made(&self) -> u64 {
        self.inner.requests.load(Ordering::Relaxed)
    }

    /// TLS connections opened so far (reuse keeps this low).
    pub fn connections_opened(&self) -> u64 {
        self.inner.connections.load(Ordering::Relaxed)
    }

    /// The server's state and this principal's rights. Works while sealed.
    ///
    /// # Errors
    ///
    /// Transport and authentication errors.
    pub async fn status(&self) -> Result<StatusResponse, KeyServiceError> {
        self.call(proto::STATUS, &serde_json::json!({}), Repeat::Safe)
            .await
    }

    fn target(&self, scope: &Scope) -> KekTarget {
        KekTarget {
            environment: self.inner.environment.clone(),
            scope: scope.clone(),
        }
    }

    fn version_target(&self, scope: &Scope, version: u32) -> KekVersionTarget {
        KekVersionTarget {
            environment: self.inner.environment.clone(),
            scope: scope.clone(),
            version,
        }
    }

    /// A scope's KEK and all its versions.
    ///
    /// # Errors
    ///
    /// Transport errors, `Sealed`, `PermissionDenied`.
    pub async fn kek_status(&self, scope: &Scope) -> Result<KekStatus, KeyServiceError> {
        self.call(proto::KEK_INFO, &self.target(scope), Repeat::Safe)
            .await
    }

    /// Rotates a scope's KEK: a new version wraps from now on, the previous
    /// one becomes decrypt-only. Needs `custodian`. Never sent twice.
    ///
    /// # Errors
    ///
    /// Transport errors, `Sealed`, `PermissionDenied`.
    pub async fn rotate(&self, scope: &Scope) -> Result<KekStatus, KeyServiceError> {
        self.call(proto::KEK_ROTATE, &self.target(scope), Repeat::OnlyIfUnsent)
            .await
    }

    /// Retires a KEK version (decrypt only). Needs `custodian`.
    ///
    /// # Errors
    ///
    /// Transport errors, `Sealed`, `PermissionDenied`, `UnknownKek`, or
    /// `Other` for the newest version or a forbidden transition.
    pub async fn retire(&self, scope: &Scope, version: u32) -> Result<KekStatus, KeyServiceError> {
        let t = self.version_target(scope, version);
        self.call(proto::KEK_RETIRE, &t, Repeat::OnlyIfUnsent).await
    }

    /// This custodian's approval to destroy a KEK version. The version is
    /// destroyed when a second, different custodian approves (dual control,
    /// PCI DSS 3.7.6). Needs `custodian`.
    ///
    /// # Errors
    ///
    /// Transport errors, `Sealed`, `PermissionDenied`, `UnknownKek`, or
    /// `Other` when this custodian already approved or the version is the
    /// newest.
    pub async fn approve_destroy(
        &self,
        scope: &Scope,
        version: u32,
    ) -> Result<DestroyResponse, KeyServiceError> {
        let t = self.version_target(scope, version);
        self.call(proto::KEK_DESTROY, &t, Repeat::OnlyIfUnsent)
            .await
    }

    /// Records this custodian's acknowledgement of their responsibilities
    /// (PCI DSS 3.7.8); required before their unseal share is accepted.
    ///
    /// # Errors
    ///
    /// Transport errors, `PermissionDenied`.
    pub async fn acknowledge(&self, statement: &str) -> Result<StatusResponse, KeyServiceError> {
        let r = AcknowledgeRequest {
            statement: statement.to_owned(),
        };
        self.call(proto::ACKNOWLEDGE, &r, Repeat::OnlyIfUnsent)
            .await
    }

    /// Submits this custodian's unseal share. The server unseals when the
    /// threshold of distinct custodians' shares is reached.
    ///
    /// # Errors
    ///
    /// Transport errors, `PermissionDenied` (not a custodian, or no
    /// acknowledgement on record), `Other` for a refused or duplicate share
    /// (without detail) or a server that is not sealed.
    pub async fn unseal(&self, share: ShareText) -> Result<StatusResponse, KeyServiceError> {
        self.unseal_expecting(share, None).await
    }

    /// As [`RemoteKeyService::unseal`], and the share is refused unless the
    /// server's state is at `expected_generation` (the generation this
    /// custodian noted: a restored older state shows a smaller one).
    ///
    /// # Errors
    ///
    /// As [`RemoteKeyService::unseal`]; `Other` for a generation mismatch.
    pub async fn unseal_expecting(
        &self,
        share: ShareText,
        expected_generation: Option<u64>,
    ) -> Result<StatusResponse, KeyServiceError> {
        self.call(
            proto::UNSEAL,
            &UnsealRequest {
                share,
                expected_generation,
            },
            Repeat::OnlyIfUnsent,
        )
        .await
    }

    /// This custodian's approval to destroy the DEK (or index key)
    /// `request`: with a second, different custodian's unexpired approval,
    /// keyd never unwraps or rewraps it again (dual control, PCI DSS 3.7.6).
    /// Needs `custodian` in the key's scope.
    ///
    /// # Errors
    ///
    /// Transport errors, `Sealed`, `PermissionDenied`, `Other` when this
    /// custodian already approved, `KekDestroyed` when already destroyed.
    pub async fn approve_dek_destroy(
        &self,
        request: &KeyRequest,
    ) -> Result<DekDestroyResponse, KeyServiceError> {
        let t = DekTarget {
            key: request.into(),
        };
        self.call(proto::DEK_DESTROY, &t, Repeat::OnlyIfUnsent)
            .await
    }

    /// Withdraws this custodian's pending approval to destroy a KEK version.
    ///
    /// # Errors
    ///
    /// Transport errors, `Sealed`, `PermissionDenied`, `Other` when there is
    /// no such pending approval.
    pub async fn withdraw_destroy(
        &self,
        scope: &Scope,
        version: u32,
    ) -> Result<WithdrawResponse, KeyServiceError> {
        let r = WithdrawRequest {
            kek: Some(self.version_target(scope, version)),
            dek: None,
        };
        self.call(proto::APPROVAL_WITHDRAW, &r, Repeat::OnlyIfUnsent)
            .await
    }

    /// Withdraws this custodian's pending approval to destroy a DEK.
    ///
    /// # Errors
    ///
    /// As [`RemoteKeyService::withdraw_destroy`].
    pub async fn withdraw_dek_destroy(
        &self,
        request: &KeyRequest,
    ) -> Result<WithdrawResponse, KeyServiceError> {
        let r = WithdrawRequest {
            kek: None,
            dek: Some(request.into()),
        };
        self.call(proto::APPROVAL_WITHDRAW, &r, Repeat::OnlyIfUnsent)
            .await
    }

    /// This custodian's vote, with their current share, for new shares
    /// `threshold`-of-n among `custodians` (see [`ReshareRequest`]).
    ///
    /// # Errors
    ///
    /// Transport errors, `Sealed`, `PermissionDenied`, `Other` for a refused
    /// share or a proposal that differs from the pending one.
    pub async fn reshare(
        &self,
        threshold: u8,
        custodians: &[String],
        share: ShareText,
    ) -> Result<ReshareResponse, KeyServiceError> {
        let r = ReshareRequest {
            threshold,
            custodians: custodians.to_vec(),
            share,
        };
        self.call(proto::RESHARE, &r, Repeat::OnlyIfUnsent).await
    }

    /// Collects this custodian's new share (after `init` or a re-share),
    /// once, recording `statement` as their acknowledgement.
    ///
    /// # Errors
    ///
    /// Transport errors, `PermissionDenied` (not named), `Other` when
    /// already collected or nothing is waiting.
    pub async fn collect_share(
        &self,
        statement: Option<&str>,
    ) -> Result<CollectResponse, KeyServiceError> {
        let r = CollectRequest {
            statement: statement.map(str::to_owned),
        };
        self.call(proto::SHARE_COLLECT, &r, Repeat::OnlyIfUnsent)
            .await
    }

    /// Seals the server again: it forgets every key until unsealed.
    ///
    /// # Errors
    ///
    /// Transport errors, `PermissionDenied`.
    pub async fn seal(&self) -> Result<StatusResponse, KeyServiceError> {
        self.call(proto::SEAL, &serde_json::json!({}), Repeat::OnlyIfUnsent)
            .await
    }

    /// Reads up to `limit` raw audit records from record `from` (1-based).
    /// Needs `audit-read`.
    ///
    /// # Errors
    ///
    /// Transport errors, `Sealed`, `PermissionDenied`.
    pub async fn audit_records(
        &self,
        from: u64,
        limit: u32,
    ) -> Result<Vec<String>, KeyServiceError> {
        let r: AuditReadResponse = self
            .call(
                proto::AUDIT,
                &AuditReadRequest { from, limit },
                Repeat::Safe,
            )
            .await?;
        Ok(r.records)
    }

    fn info_from(&self, s: KekStatus) -> KekInfo {
        let state = s
            .versions
            .iter()
            .find(|v| v.version == s.active_version)
            .map(|v| v.state)
            .unwrap_or(KeyState::Active);
        KekInfo {
            id: s.kek_id,
            version: s.active_version,
            algorithm: s.algorithm,
            strength_bits: s.strength_bits,
            environment: s.environment.to_string(),
            state,
        }
    }

    fn default_scope(&self) -> Result<&Scope, KeyServiceError> {
        self.inner.scope.as_ref().ok_or_else(|| {
            KeyServiceError::Other(
                "this RemoteKeyService has no scope: set one in the builder or use rotate(scope)"
                    .into(),
            )
        })
    }
}

impl sealed::Sealed for RemoteKeyService {}

#[async_trait]
impl KeyService for RemoteKeyService {
    async fn kek_info(&self) -> Result<KekInfo, KeyServiceError> {
        match &self.inner.scope {
            Some(scope) => Ok(self.info_from(self.kek_status(scope).await?)),
            None => {
                let s = self.status().await?;
                if s.sealed {
                    return Err(KeyServiceError::Sealed);
                }
                Ok(KekInfo {
                    id: "keyd".into(),
                    version: 0,
                    algorithm: "AES-256-GCM".into(),
                    strength_bits: 256,
                    environment: s.environment.to_string(),
                    state: KeyState::Active,
                })
            }
        }
    }

    async fn wrap(&self, request: &KeyRequest, dek: &Dek) -> Result<WrappedKey, KeyServiceError> {
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(dek.expose_secret());
        let r = WrapRequest {
            key: request.into(),
            dek: KeyMaterial::new(key),
        };
        let a: WrappedResponse = self.call(proto::WRAP, &r, Repeat::Safe).await?;
        Ok(a.wrapped.into())
    }

    async fn generate(&self, request: &KeyRequest) -> Result<(Dek, WrappedKey), KeyServiceError> {
        let r = GenerateRequest {
            key: request.into(),
        };
        let a: GenerateResponse = self.call(proto::GENERATE, &r, Repeat::Safe).await?;
        Ok((Dek::from_unwrapped(a.dek.expose_secret()), a.wrapped.into()))
    }

    async fn unwrap(
        &self,
        request: &KeyRequest,
        wrapped: &WrappedKey,
        access: &Access,
    ) -> Result<Dek, KeyServiceError> {
        let r = UnwrapRequest {
            key: request.into(),
            wrapped: wrapped.into(),
            on_behalf_of: access.principal().to_owned(),
            purpose: access.purpose().to_owned(),
        };
        let a: UnwrapResponse = self.call(proto::UNWRAP, &r, Repeat::Safe).await?;
        Ok(Dek::from_unwrapped(a.dek.expose_secret()))
    }

    async fn rewrap(
        &self,
        request: &KeyRequest,
        wrapped: &WrappedKey,
    ) -> Result<WrappedKey, KeyServiceError> {
        let r = RewrapRequest {
            key: request.into(),
            wrapped: wrapped.into(),
        };
        let a: WrappedResponse = self.call(proto::REWRAP, &r, Repeat::Safe).await?;
        Ok(a.wrapped.into())
    }

    async fn rotate_kek(&self) -> Result<KekInfo, KeyServiceError> {
        let scope = self.default_scope()?.clone();
        Ok(self.info_from(self.rotate(&scope).await?))
    }

    /// `POST /v1/whoami`, mapped to the library's [`Permissions`].
    async fn permissions(&self) -> Result<Permissions, KeyServiceError> {
        let a: WhoamiResponse = self
            .call(proto::WHOAMI, &serde_json::json!({}), Repeat::Safe)
            .await?;
        let has = |p: Permission| a.permissions.contains(&p);
        Ok(Permissions {
            wrap: has(Permission::Wrap),
            unwrap: has(Permission::Unwrap),
            index: has(Permission::Index),
            reveal: has(Permission::Reveal),
            rewrap: has(Permission::Rewrap),
            admit: has(Permission::Admit),
            custodian: has(Permission::Custodian),
        })
    }

    /// `POST /v1/reveal`: keyd opens the record and answers its digits.
    /// Sent again only if it never reached keyd (a repeat would be counted
    /// and audited twice).
    async fn reveal(
        &self,
        request: &RevealRequest<'_>,
        access: &Access,
    ) -> Result<Opened, KeyServiceError> {
        let r = WireReveal {
            record: request.record.to_bytes(),
            sealed: request.sealed.as_bytes().to_vec(),
            context: WireContext {
                table: request.context.table().to_owned(),
                column: request.context.column().to_owned(),
                row_key: request.context.row_key().to_vec(),
            },
            on_behalf_of: access.principal().to_owned(),
            purpose: access.purpose().to_owned(),
        };
        let a: RevealResponse = self.call(proto::REVEAL, &r, Repeat::OnlyIfUnsent).await?;
        // Any PAN length the library seals (8 to 19 digits) comes back.
        let rules =
            PanRules::with_min_digits(8).map_err(|_| KeyServiceError::Other("PAN rules".into()))?;
        let pan = Pan::parse_with(a.pan.expose_secret(), &rules)
            .map_err(|_| KeyServiceError::Other("keyd answered a malformed PAN".into()))?;
        Ok(Opened {
            pan,
            needs_reseal: a.needs_reseal,
        })
    }
    async fn index_keys(&self, scope: &Scope) -> Result<Vec<IndexKeyInfo>, KeyServiceError> {
        let a: proto::IndexKeysResponse = self
            .call(proto::INDEX_KEYS, &self.target(scope), Repeat::Safe)
            .await?;
        Ok(index_infos(a))
    }

    async fn blind_index(
        &self,
        scope: &Scope,
        versions: &[u32],
        pans: &[&Pan],
        access: &Access,
    ) -> Result<Vec<[u8; 32]>, KeyServiceError> {
        if versions.is_empty() || pans.is_empty() {
            return Ok(Vec::new());
        }
        // Split into requests of at most MAX_INDEX_BATCH hashes; any
        // failure (keyd down mid-batch) returns the error and nothing else.
        let per = (proto::MAX_INDEX_BATCH / versions.len()).max(1);
        let mut out = Vec::with_capacity(pans.len() * versions.len());
        for (chunk_no, chunk) in pans.chunks(per).enumerate() {
            let r = proto::IndexHashRequest {
                environment: self.inner.environment.clone(),
                scope: scope.clone(),
                versions: versions.to_vec(),
                pans: chunk
                    .iter()
                    .map(|p| proto::WirePan::new(p.expose_digits()))
                    .collect(),
                on_behalf_of: access.principal().to_owned(),
                purpose: access.purpose().to_owned(),
            };
            let a: proto::IndexHashResponse = self
                .call(proto::INDEX_HASH, &r, Repeat::Safe)
                .await
                .map_err(|e| match e {
                    KeyServiceError::BatchItem { index, reason } => KeyServiceError::BatchItem {
                        index: index + chunk_no * per,
                        reason,
                    },
                    other => other,
                })?;
            if a.hashes.len() != chunk.len() * versions.len() * 32 {
                return Err(KeyServiceError::Other(
                    "keyd answered a keyed-hash batch of the wrong size".into(),
                ));
            }
            out.extend(a.hashes.chunks_exact(32).map(|c| {
                let mut h = [0u8; 32];
                h.copy_from_slice(c);
                h
            }));
        }
        Ok(out)
    }

    async fn create_index_key(&self, scope: &Scope) -> Result<IndexKeyInfo, KeyServiceError> {
        let a: proto::IndexKeysResponse = self
            .call(
                proto::INDEX_CREATE,
                &self.target(scope),
                Repeat::OnlyIfUnsent,
            )
            .await?;
        index_infos(a)
            .into_iter()
            .next()
            .ok_or_else(|| KeyServiceError::Other("keyd created no index key".into()))
    }

    async fn set_index_key_state(
        &self,
        scope: &Scope,
        version: u32,
        state: KeyState,
    ) -> Result<(), KeyServiceError> {
        let r = proto::IndexStateRequest {
            environment: self.inner.environment.clone(),
            scope: scope.clone(),
            version,
            state,
        };
        let _: proto::IndexKeysResponse = self
            .call(proto::INDEX_STATE, &r, Repeat::OnlyIfUnsent)
            .await?;
        Ok(())
    }

    async fn authenticate_record(
        &self,
        previous: Option<&WrappedDek>,
        record: &WrappedDek,
    ) -> Result<RecordTag, KeyServiceError> {
        // Version 2 encoding (it carries the sequence); the tag field of
        // the record to sign is ignored by keyd (zeros here).
        let mut next = record.clone();
        next.tag = Some(next.tag.unwrap_or(RecordTag([0; 32])));
        let r = proto::RecordSignRequest {
            previous: previous.map(WrappedDek::to_bytes),
            record: next.to_bytes(),
        };
        // Not repeated once sent: a second sign of the same change is
        // refused as stale (the first took).
        let a: proto::RecordSignResponse = self
            .call(proto::RECORD_SIGN, &r, Repeat::OnlyIfUnsent)
            .await?;
        let tag: [u8; 32] = a.tag.as_slice().try_into().map_err(|_| {
            KeyServiceError::Other("keyd answered a record tag of the wrong size".into())
        })?;
        Ok(RecordTag(tag))
    }

    async fn verify_record(&self, record: &WrappedDek) -> Result<(), KeyServiceError> {
        let r = proto::RecordVerifyRequest {
            record: record.to_bytes(),
        };
        let a: proto::RecordVerifyResponse =
            self.call(proto::RECORD_VERIFY, &r, Repeat::Safe).await?;
        match a.result {
            proto::RecordCheck::Ok => Ok(()),
            proto::RecordCheck::Tampered => {
                Err(KeyServiceError::RecordTampered(record.id.to_string()))
            }
            proto::RecordCheck::Stale => Err(KeyServiceError::RecordStale(record.id.to_string())),
        }
    }

    async fn ingest_keys(&self, scope: &Scope) -> Result<Vec<IngestKeyInfo>, KeyServiceError> {
        let a: proto::IngestKeysResponse = self
            .call(proto::INGEST_KEYS, &self.target(scope), Repeat::Safe)
            .await?;
        ingest_infos(a)
    }

    async fn create_ingest_key(&self, scope: &Scope) -> Result<IngestKeyInfo, KeyServiceError> {
        let a: proto::IngestKeysResponse = self
            .call(
                proto::INGEST_CREATE,
                &self.target(scope),
                Repeat::OnlyIfUnsent,
            )
            .await?;
        ingest_infos(a)?
            .into_iter()
            .next()
            .ok_or_else(|| KeyServiceError::Other("keyd created no ingest key".into()))
    }

    async fn set_ingest_key_state(
        &self,
        scope: &Scope,
        version: u32,
        state: KeyState,
    ) -> Result<(), KeyServiceError> {
        let r = proto::IngestStateRequest {
            environment: self.inner.environment.clone(),
            scope: scope.clone(),
            version,
            state,
        };
        let _: proto::IngestKeysResponse = self
            .call(proto::INGEST_STATE, &r, Repeat::OnlyIfUnsent)
            .await?;
        Ok(())
    }

    /// `POST /v1/ingest/open`. Sent again only if it never reached keyd
    /// (a repeat would be counted and audited twice).
    async fn open_ingest(
        &self,
        request: &IngestOpenRequest<'_>,
        access: &Access,
    ) -> Result<Opened, KeyServiceError> {
        let r = proto::IngestOpenRequest {
            environment: self.inner.environment.clone(),
            scope: request.scope.clone(),
            sealed: request.sealed.to_text(),
            context: wire_context(request.context),
            on_behalf_of: access.principal().to_owned(),
            purpose: access.purpose().to_owned(),
        };
        let a: RevealResponse = self
            .call(proto::INGEST_OPEN, &r, Repeat::OnlyIfUnsent)
            .await?;
        let rules =
            PanRules::with_min_digits(8).map_err(|_| KeyServiceError::Other("PAN rules".into()))?;
        let pan = Pan::parse_with(a.pan.expose_secret(), &rules)
            .map_err(|_| KeyServiceError::Other("keyd answered a malformed PAN".into()))?;
        Ok(Opened {
            pan,
            needs_reseal: a.needs_reseal,
        })
    }

    /// `POST /v1/generate-wrapped`: only the wrap comes back.
    async fn generate_wrapped(&self, request: &KeyRequest) -> Result<WrappedKey, KeyServiceError> {
        crate::keyservice::refuse_index_purpose(request)?;
        let r = GenerateRequest {
            key: request.into(),
        };
        let a: WrappedResponse = self.call(proto::GENERATE_WRAPPED, &r, Repeat::Safe).await?;
        Ok(a.wrapped.into())
    }

    /// `POST /v1/admit`, split into requests of at most
    /// [`MAX_ADMIT_BATCH`] items and [`proto::MAX_ADMIT_BODY_BYTES`].
    /// Never sent twice once it may have reached keyd (charged and
    /// audited); an error in a later chunk returns the error alone.
    async fn admit(
        &self,
        request: &AdmitRequest<'_>,
        access: &Access,
    ) -> Result<Vec<Result<AdmitOutput, AdmitItemError>>, KeyServiceError> {
        if request.items.is_empty() {
            return Ok(Vec::new());
        }
        let record = request.record.to_bytes();
        // Room for the record, the versions and the JSON around them.
        let budget = proto::MAX_ADMIT_BODY_BYTES - 16 * 1024 - record.len() * 2;
        let mut chunks: Vec<&[crate::keyservice::AdmitItem<'_>]> = Vec::new();
        let (mut start, mut size) = (0usize, 0usize);
        for (i, item) in request.items.iter().enumerate() {
            let c = item.context;
            let n = 200 + c.table().len() * 6 + c.column().len() * 6 + c.row_key().len() * 4 / 3;
            if i > start && (i - start >= MAX_ADMIT_BATCH || size + n > budget) {
                chunks.push(&request.items[start..i]);
                start = i;
                size = 0;
            }
            size += n;
        }
        chunks.push(&request.items[start..]);
        let versions = request.index_versions.len();
        let mut out = Vec::with_capacity(request.items.len());
        for chunk in chunks {
            let r = proto::AdmitRequest {
                record: record.clone(),
                index_versions: request.index_versions.to_vec(),
                items: chunk
                    .iter()
                    .map(|it| proto::WireAdmitItem {
                        sealed: it.sealed.to_text(),
                        context: wire_context(it.context),
                    })
                    .collect(),
                on_behalf_of: access.principal().to_owned(),
                purpose: access.purpose().to_owned(),
            };
            let a: proto::AdmitResponse = self.call(proto::ADMIT, &r, Repeat::OnlyIfUnsent).await?;
            if a.results.len() != chunk.len() {
                return Err(KeyServiceError::Other(
                    "keyd answered an admit batch of the wrong size".into(),
                ));
            }
            for res in a.results {
                out.push(match res {
                    proto::WireAdmitResult::Ok { sealed, index } => {
                        let sealed = SealedPan::from_bytes(&sealed).map_err(|_| {
                            KeyServiceError::Other("keyd answered a malformed ciphertext".into())
                        })?;
                        if index.len() != versions * 32 {
                            return Err(KeyServiceError::Other(
                                "keyd answered index values of the wrong size".into(),
                            ));
                        }
                        let index = index
                            .chunks_exact(32)
                            .map(|c| {
                                let mut h = [0u8; 32];
                                h.copy_from_slice(c);
                                h
                            })
                            .collect();
                        Ok(AdmitOutput::new(sealed, index))
                    }
                    proto::WireAdmitResult::Error { error, version } => Err(match error {
                        proto::AdmitItemErrorKind::Malformed => AdmitItemError::Malformed,
                        proto::AdmitItemErrorKind::KeyMismatch => AdmitItemError::KeyMismatch,
                        proto::AdmitItemErrorKind::UnknownIngestKey => {
                            AdmitItemError::UnknownIngestKey(version.unwrap_or(0))
                        }
                        proto::AdmitItemErrorKind::OpenFailed => AdmitItemError::OpenFailed,
                    }),
                });
            }
        }
        Ok(out)
    }
}

fn wire_context(c: &crate::Context) -> WireContext {
    WireContext {
        table: c.table().to_owned(),
        column: c.column().to_owned(),
        row_key: c.row_key().to_vec(),
    }
}

fn ingest_infos(a: proto::IngestKeysResponse) -> Result<Vec<IngestKeyInfo>, KeyServiceError> {
    a.versions
        .into_iter()
        .map(|v| {
            let public_key = IngestPublicKey::from_text(&v.public_key).map_err(|_| {
                KeyServiceError::Other("keyd answered a malformed ingest public key".into())
            })?;
            if public_key.scope() != &a.scope
                || public_key.environment() != &a.environment
                || public_key.version() != v.version
            {
                return Err(KeyServiceError::Other(
                    "keyd answered an ingest public key of another scope or version".into(),
                ));
            }
            Ok(IngestKeyInfo {
                public_key,
                state: v.state,
                created_at: v.created_at,
            })
        })
        .collect()
}

fn index_infos(a: proto::IndexKeysResponse) -> Vec<IndexKeyInfo> {
    a.versions
        .into_iter()
        .map(|v| IndexKeyInfo {
            scope: a.scope.clone(),
            version: v.version,
            state: v.state,
            created_at: v.created_at,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_is_taken_from_the_address() {
        assert_eq!(host_of("127.0.0.1:8443").as_deref(), Some("127.0.0.1"));
        assert_eq!(host_of("[::1]:8443").as_deref(), Some("::1"));
        assert_eq!(host_of("keyd.internal:1").as_deref(), Some("keyd.internal"));
        assert_eq!(host_of("no-port"), None);
    }

    #[test]
    fn builder_refuses_missing_parts() {
        let e = RemoteKeyService::builder().build().unwrap_err();
        assert!(matches!(e, Error::Config(ConfigError::Missing(_))), "{e}");
        let e = RemoteKeyService::builder()
            .address("127.0.0.1:1")
            .environment("test")
            .ca_pem(b"not pem")
            .bearer_token("t")
            .build()
            .unwrap_err();
        assert!(
            matches!(e, Error::Config(ConfigError::KeyServiceClient(_))),
            "{e}"
        );
    }
}
