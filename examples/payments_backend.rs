//! `payments_backend` — a payment service to copy from: axum over TLS with
//! client certificates, PostgreSQL, panseal.
//!
//! Every caller is authenticated by its TLS client certificate (mutual TLS,
//! rustls): the certificate must chain to `--client-ca`, and its SHA-256
//! fingerprint must be listed in `--callers`, which names the principal and
//! its roles. **The principal comes from the certificate, never from the
//! request**; a body that names one is refused. Plain HTTP gets no answer.
//!
//! * `POST /cards {"pan": "..."}` (role `capture`) seals the PAN bound to a
//!   random 128-bit row id, stores the blind index and the masked form
//!   (never the PAN, never a CVV).
//! * `GET /cards/{id}` (role `lookup` or `reveal`) returns the masked form.
//! * `POST /cards/{id}/reveal {"purpose": "refund"}` (role `reveal`) opens
//!   the PAN for the authenticated principal and a purpose from a fixed list
//!   (`refund`, `chargeback`, `fraud-review`); audited by panseal; limited
//!   to N reveals per principal per window; a PAN under a retired DEK is
//!   re-sealed on the way (lazy re-seal).
//! * `POST /cards/lookup {"pan": "...", "purpose": "..."}` (role `lookup`)
//!   finds cards through the blind index (every live index-key version),
//!   never through masked values; limited per principal per window and
//!   written to the service's own audit log (`--app-audit`), allowed or not.
//!
//! * `GET /orders/{id}` (role `lookup` or `reveal`) and
//!   `POST /orders/{id}/reveal {"purpose": "refund"}` (role `reveal`): the
//!   back office's view of a browser checkout order; the reveal opens the
//!   ingest ciphertext with `Panseal::open_pan` under `--reveal-config`
//!   (inside panseal-keyd for a `reveal` credential), limited and audited
//!   like card reveals.
//!
//! Errors are JSON `{"error": "..."}` written by this program: they never
//! quote the request (no PAN sent in a malformed body comes back).
//!
//! **Browser checkout** (`--checkout-listen`, `--checkout-config`,
//! `--checkout-script`; README "Browser checkout"): a second HTTPS listener
//! for customers (server certificate only) serves `GET /checkout` (a new
//! order and the page, `examples/checkout/index.html`, with the scope's
//! active ingest public key fetched from panseal-keyd with a credential that
//! holds no `unwrap` and no `reveal`), `GET /checkout.js` (the page's script
//! bundled by `tests/js/build.mjs`, pinned by Subresource Integrity) and
//! `POST /checkout {"order_id", "card"}`: the page seals the card number
//! itself (HPKE, `FORMAT.md` §17) and posts only the 134-character
//! ciphertext, which is stored as it is. This process never sees a PAN on
//! that path; garbage gets 400 with a typed `reason` and stores nothing.
//!
//! ```text
//! cargo run --features postgres,keyd-client --example payments_backend -- \
//!     --config panseal.json --listen 127.0.0.1:8443 \
//!     --tls-cert server.pem --tls-key server.key.pem --client-ca ca.pem \
//!     --callers callers.json --app-audit app-audit.jsonl
//! ```
//!
//! `callers.json`:
//!
//! ```json
//! { "window_secs": 3600, "reveals_per_window": 20, "lookups_per_window": 100,
//!   "callers": [
//!     { "name": "refund-desk-1", "cert_sha256": "ab12…", "roles": ["reveal", "lookup"] },
//!     { "name": "checkout", "cert_sha256": "cd34…", "roles": ["capture"],
//!       "lookups_per_window": 0 } ] }
//! ```
//!
//! The limits here are per process. To bound what a stolen credential
//! reads across the fleet, give the reveal role its own configuration,
//! `--reveal-config reveal.json`, naming a panseal-keyd credential with the
//! `reveal` permission and without `unwrap`: this process then never holds
//! a DEK for reveals; keyd opens each record, counts distinct records per
//! principal per window (durably) and audits each one. keyd's
//! `quota-exceeded` answers 429 here.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::{IncomingStream, Listener};
use axum::{Json, Router};
use clap::Parser;
use panseal::config::{ClientConfig, KeyStoreConfig};
use panseal::{
    Access, Context, Error, IngestKeyInfo, IngestSealed, KeyService, KeyState, Pan, Panseal,
    PostgresKeyStore, RemoteKeyService, Scope, SealedPan, StoredPan,
};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

#[derive(Parser)]
struct Args {
    /// Client configuration (JSON) naming key service, PostgreSQL key store, audit sink.
    #[arg(long)]
    config: PathBuf,
    /// Address to listen on (TLS only).
    #[arg(long, default_value = "127.0.0.1:8443")]
    listen: SocketAddr,
    /// Server certificate chain (PEM).
    #[arg(long)]
    tls_cert: PathBuf,
    /// Server private key (PEM).
    #[arg(long)]
    tls_key: PathBuf,
    /// CA that issues the callers' client certificates (PEM).
    #[arg(long)]
    client_ca: PathBuf,
    /// Callers: certificate fingerprints, principals, roles, limits (JSON).
    #[arg(long)]
    callers: PathBuf,
    /// The service's own audit log (JSON lines) for lookups and refusals.
    #[arg(long)]
    app_audit: PathBuf,
    /// Client configuration for the reveal role: a panseal-keyd `reveal`
    /// credential (without `unwrap`), so reveals open inside keyd under its
    /// record quotas. Default: `--config`.
    #[arg(long)]
    reveal_config: Option<PathBuf>,
    /// Browser checkout: address of the customers' HTTPS listener (server
    /// certificate only, no client certificate).
    #[arg(long, requires_all = ["checkout_config", "checkout_script"])]
    checkout_listen: Option<SocketAddr>,
    /// Browser checkout: client configuration naming a panseal-keyd
    /// credential without `unwrap` or `reveal` (it only reads the scope's
    /// ingest public keys) and the scope whose key the page seals with.
    #[arg(long)]
    checkout_config: Option<PathBuf>,
    /// Browser checkout: the page's bundled script (`node tests/js/build.mjs`
    /// writes `tests/js/dist/checkout.mjs`).
    #[arg(long)]
    checkout_script: Option<PathBuf>,
    /// Browser checkout: seconds a fetched list of ingest keys is used
    /// before asking keyd again (a rotation reaches pages this late).
    #[arg(long, default_value_t = 30)]
    ingest_keys_ttl_secs: u64,
}

// ---------------------------------------------------------------- callers

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Role {
    /// Store new cards.
    Capture,
    /// Find cards by PAN (blind index) and see masked forms.
    Lookup,
    /// Open a card's PAN.
    Reveal,
}

/// Why a PAN is revealed or looked up: a fixed list, so the audit log
/// answers "why" with a value a reviewer can count.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Purpose {
    Refund,
    Chargeback,
    FraudReview,
}

impl Purpose {
    fn as_str(self) -> &'static str {
        match self {
            Purpose::Refund => "refund",
            Purpose::Chargeback => "chargeback",
            Purpose::FraudReview => "fraud-review",
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CallerEntry {
    name: String,
    cert_sha256: String,
    roles: Vec<Role>,
    reveals_per_window: Option<u32>,
    lookups_per_window: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CallersFile {
    window_secs: u64,
    reveals_per_window: u32,
    lookups_per_window: u32,
    callers: Vec<CallerEntry>,
}

/// An authenticated caller.
#[derive(Debug)]
struct Caller {
    name: String,
    roles: Vec<Role>,
    reveals_per_window: u32,
    lookups_per_window: u32,
}

struct Callers {
    window: Duration,
    by_fingerprint: HashMap<[u8; 32], Arc<Caller>>,
}

impl Callers {
    fn load(path: &std::path::Path) -> Result<Callers, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let file: CallersFile =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if file.window_secs == 0 {
            return Err("window_secs must be at least 1".into());
        }
        let mut by_fingerprint = HashMap::new();
        for c in file.callers {
            let fp: [u8; 32] = hex::decode(c.cert_sha256.trim())
                .ok()
                .and_then(|v| v.try_into().ok())
                .ok_or_else(|| format!("caller {:?}: cert_sha256 is not 64 hex digits", c.name))?;
            if Access::new(&c.name, "x").is_err() {
                return Err(format!("caller {:?}: not a usable principal name", c.name));
            }
            let caller = Caller {
                reveals_per_window: c.reveals_per_window.unwrap_or(file.reveals_per_window),
                lookups_per_window: c.lookups_per_window.unwrap_or(file.lookups_per_window),
                name: c.name,
                roles: c.roles,
            };
            if by_fingerprint.insert(fp, Arc::new(caller)).is_some() {
                return Err("two callers share one certificate".into());
            }
        }
        Ok(Callers {
            window: Duration::from_secs(file.window_secs),
            by_fingerprint,
        })
    }
}

// ------------------------------------------------------------------ TLS

/// TLS handshakes in progress at most.
const MAX_HANDSHAKES: usize = 256;

/// What the TLS layer established about a connection: who is calling.
#[derive(Clone, Debug)]
struct Peer {
    caller: Option<Arc<Caller>>,
}

/// Accepts TCP connections, runs each TLS handshake in its own task (with
/// a deadline and a cap on how many run at once, so slow or silent clients
/// hold up nobody) and hands the
/// established connections to axum with the caller they authenticated.
struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, Peer)>,
}

impl TlsListener {
    fn start(tcp: TcpListener, acceptor: TlsAcceptor, callers: Arc<Callers>) -> TlsListener {
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        // At most this many handshakes at once; beyond, new connections are
        // closed at once rather than queued behind slow clients.
        let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let Ok((stream, _addr)) = tcp.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                    continue;
                };
                let (acceptor, callers, tx) = (acceptor.clone(), callers.clone(), tx.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    let handshake =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream));
                    // A failed handshake (plain HTTP, no or foreign client
                    // certificate) is dropped without an answer.
                    let Ok(Ok(tls)) = handshake.await else { return };
                    let caller = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .and_then(|leaf| {
                            let fp: [u8; 32] = Sha256::digest(leaf.as_ref()).into();
                            callers.by_fingerprint.get(&fp).cloned()
                        });
                    let _ = tx.send((tls, Peer { caller })).await;
                });
            }
        });
        TlsListener { ready }
    }
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept task never ends while the listener lives.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Peer> {
        Ok(Peer { caller: None })
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}

fn tls_acceptor(args: &Args) -> Result<TlsAcceptor, Box<dyn std::error::Error>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = CertificateDer::pem_file_iter(&args.tls_cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&args.tls_key)?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(&args.client_ca)? {
        roots.add(ca?)?;
    }
    // Client certificates are required: no anonymous connection.
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The customers' listener: the same server certificate, no client
/// certificate (a browser has none).
fn tls_acceptor_public(args: &Args) -> Result<TlsAcceptor, Box<dyn std::error::Error>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = CertificateDer::pem_file_iter(&args.tls_cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&args.tls_key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

// ---------------------------------------------------------- rate limits

/// Fixed-window counters per principal. Every attempt is charged before it
/// runs, so a caller looping over ids gets at most `limit` per window.
struct Limiter {
    window: Duration,
    used: Mutex<HashMap<String, (Instant, u32)>>,
}

impl Limiter {
    fn new(window: Duration) -> Limiter {
        Limiter {
            window,
            used: Mutex::new(HashMap::new()),
        }
    }

    /// Charges one use; `Err(seconds until the window resets)` when over.
    fn charge(&self, principal: &str, limit: u32) -> Result<(), u64> {
        let now = Instant::now();
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        let entry = used.entry(principal.to_owned()).or_insert((now, 0));
        if now.duration_since(entry.0) >= self.window {
            *entry = (now, 0);
        }
        if entry.1 >= limit {
            let left = self.window.saturating_sub(now.duration_since(entry.0));
            return Err(left.as_secs().max(1));
        }
        entry.1 += 1;
        Ok(())
    }
}

// ------------------------------------------------------------ app audit

/// The service's own audit log (JSON lines): lookups and refusals, with
/// the authenticated principal, never a PAN. Written before the answer
/// leaves; if it cannot be written, the request fails (fail closed).
struct AppAudit(Mutex<std::fs::File>);

impl AppAudit {
    fn record(&self, event: serde_json::Value) -> Result<(), ApiError> {
        let time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let mut line = json!({ "time": time });
        if let (Some(l), serde_json::Value::Object(e)) = (line.as_object_mut(), event) {
            l.extend(e);
        }
        let mut f = self.0.lock().unwrap_or_else(|e| e.into_inner());
        writeln!(f, "{line}")
            .and_then(|()| f.flush())
            .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "audit log unavailable"))
    }
}

// -------------------------------------------------------------- errors

/// An error response written by this program: a fixed message that never
/// quotes the request.
struct ApiError {
    status: StatusCode,
    message: String,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, message: &str) -> ApiError {
        ApiError {
            status,
            message: message.to_owned(),
            retry_after: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(json!({ "error": self.message }))).into_response();
        if let Some(secs) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::Pan(_) | Error::Context(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Error::Decryption | Error::Format(_) => StatusCode::CONFLICT,
            Error::Key(_) => StatusCode::GONE,
            Error::KeyService(panseal::KeyServiceError::QuotaExceeded(_)) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            e if e.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        // panseal's messages never contain a PAN (its tests scan them).
        ApiError::new(status, &e.to_string())
    }
}

fn db_err(_: impl std::fmt::Display) -> ApiError {
    // Database errors can quote values (a constraint message names the
    // row): the client gets a fixed text.
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "database error")
}

fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such card")
}

/// Parses a JSON body into `T` without ever quoting it back: serde's
/// messages cite the offending value (`invalid type: integer
/// `4111111111111111``), so they are replaced by one fixed message.
fn parse_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body unreadable or too large",
        )
    })?;
    serde_json::from_slice(&bytes).map_err(|_| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "request body is not the JSON object this endpoint expects",
        )
    })
}

/// A card id: 32 lowercase hex digits (128 random bits).
fn card_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Ok(Path(id)) = path else {
        return Err(not_found());
    };
    if id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(id)
    } else {
        Err(not_found())
    }
}

// ------------------------------------------------------------ handlers

struct App {
    panseal: Panseal,
    /// Opens for the reveal role (`--reveal-config`, else `panseal`).
    revealer: Panseal,
    db: PostgresKeyStore,
    reveals: Limiter,
    lookups: Limiter,
    audit: AppAudit,
    /// The browser checkout (`--checkout-*`), if enabled.
    checkout: Option<Checkout>,
}

type Shared = Arc<App>;

impl Peer {
    /// The caller, if its certificate is listed and it holds one of `roles`.
    fn require(&self, roles: &[Role]) -> Result<&Caller, ApiError> {
        let caller = self.caller.as_deref().ok_or_else(|| {
            ApiError::new(StatusCode::FORBIDDEN, "client certificate not registered")
        })?;
        if caller.roles.iter().any(|r| roles.contains(r)) {
            Ok(caller)
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "caller lacks the role for this request",
            ))
        }
    }
}

fn ctx(id: &str) -> Result<Context, ApiError> {
    Ok(Context::new("cards", "pan_sealed", id).map_err(Error::from)?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewCard {
    pan: String,
}

async fn create(
    State(app): State<Shared>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    peer.require(&[Role::Capture])?;
    let body: NewCard = parse_body(body)?;
    let pan = Pan::parse(&body.pan).map_err(Error::from)?;
    let index = app.panseal.blind_index(&pan).await?;
    // Random ids: nobody can walk the table by counting.
    let id = hex::encode(rand::random::<[u8; 16]>());
    let sealed = app.panseal.seal_pan(&pan, &ctx(&id)?).await?;
    let client = app.db.pool().get().await.map_err(db_err)?;
    client
        .execute(
            "INSERT INTO cards (id, pan_sealed, pan_index, pan_index_version, masked)
             VALUES ($1, $2, $3, $4, $5)",
            &[
                &id,
                &sealed.to_text(),
                &index.to_hex(),
                &(index.version() as i32),
                &pan.masked(),
            ],
        )
        .await
        .map_err(db_err)?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "id": id, "masked": pan.masked() })),
    ))
}

async fn show(
    State(app): State<Shared>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    peer.require(&[Role::Lookup, Role::Reveal])?;
    let id = card_id(path)?;
    let client = app.db.pool().get().await.map_err(db_err)?;
    let row = client
        .query_opt("SELECT masked FROM cards WHERE id = $1", &[&id])
        .await
        .map_err(db_err)?
        .ok_or_else(not_found)?;
    Ok(Json(json!({ "id": id, "masked": row.get::<_, String>(0) })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Reveal {
    purpose: Purpose,
}

async fn reveal(
    State(app): State<Shared>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let caller = match peer.require(&[Role::Reveal]) {
        Ok(c) => c,
        Err(e) => {
            if let Some(c) = &peer.caller {
                app.audit
                    .record(json!({ "event": "reveal", "principal": c.name,
                    "outcome": "refused", "reason": "role" }))?;
            }
            return Err(e);
        }
    };
    let id = card_id(path)?;
    let body: Reveal = parse_body(body)?;
    if let Err(retry) = app.reveals.charge(&caller.name, caller.reveals_per_window) {
        app.audit
            .record(json!({ "event": "reveal", "principal": caller.name,
            "purpose": body.purpose.as_str(), "card": id, "outcome": "refused",
            "reason": "rate-limit" }))?;
        return Err(ApiError {
            retry_after: Some(retry),
            ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "reveal limit reached")
        });
    }
    let access = Access::new(&caller.name, body.purpose.as_str()).map_err(Error::from)?;
    let client = app.db.pool().get().await.map_err(db_err)?;
    let row = client
        .query_opt("SELECT pan_sealed FROM cards WHERE id = $1", &[&id])
        .await
        .map_err(db_err)?
        .ok_or_else(not_found)?;
    let stored: String = row.get(0);
    let sealed = SealedPan::from_text(&stored)?;
    let context = ctx(&id)?;
    // Audited by panseal (principal, purpose, record), fail closed.
    let opened = app.revealer.open_pan(&sealed, &context, &access).await?;
    let mut resealed = false;
    if opened.needs_reseal {
        // Lazy migration off a retired DEK; compare-and-set so a concurrent
        // write wins.
        let fresh = app.panseal.seal_pan(&opened.pan, &context).await?;
        resealed = client
            .execute(
                "UPDATE cards SET pan_sealed = $2 WHERE id = $1 AND pan_sealed = $3",
                &[&id, &fresh.to_text(), &stored],
            )
            .await
            .map_err(db_err)?
            == 1;
    }
    Ok(Json(
        json!({ "id": id, "pan": opened.pan.expose_digits(), "resealed": resealed }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Lookup {
    pan: String,
    purpose: Purpose,
}

async fn lookup(
    State(app): State<Shared>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let caller = peer.require(&[Role::Lookup])?;
    let body: Lookup = parse_body(body)?;
    let purpose = body.purpose.as_str();
    // Charged before the PAN is even parsed: every guess counts, so a
    // BIN + last-four search (10^5 candidates) is bounded by the limit.
    if let Err(retry) = app.lookups.charge(&caller.name, caller.lookups_per_window) {
        app.audit
            .record(json!({ "event": "lookup", "principal": caller.name,
            "purpose": purpose, "outcome": "refused", "reason": "rate-limit" }))?;
        return Err(ApiError {
            retry_after: Some(retry),
            ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "lookup limit reached")
        });
    }
    let pan = match Pan::parse(&body.pan) {
        Ok(p) => p,
        Err(e) => {
            app.audit
                .record(json!({ "event": "lookup", "principal": caller.name,
                "purpose": purpose, "outcome": "refused", "reason": "invalid-pan" }))?;
            return Err(Error::from(e).into());
        }
    };
    let indexes: Vec<String> = app
        .panseal
        .blind_indexes(&pan)
        .await?
        .iter()
        .map(|i| i.to_hex())
        .collect();
    let client = app.db.pool().get().await.map_err(db_err)?;
    let rows = client
        .query(
            "SELECT id, masked FROM cards WHERE pan_index = ANY($1) ORDER BY created_at, id",
            &[&indexes],
        )
        .await
        .map_err(db_err)?;
    let ids: Vec<String> = rows.iter().map(|r| r.get::<_, String>(0)).collect();
    app.audit
        .record(json!({ "event": "lookup", "principal": caller.name,
        "purpose": purpose, "outcome": "success", "cards": ids }))?;
    let cards: Vec<_> = rows
        .iter()
        .map(|r| json!({ "id": r.get::<_, String>(0), "masked": r.get::<_, String>(1) }))
        .collect();
    Ok(Json(json!({ "cards": cards })))
}

// ------------------------------------------------------ browser checkout

/// Where a checkout order's card is stored: the context the page binds
/// the ciphertext to (row key = the order id).
const ORDERS_TABLE: &str = "orders";
const ORDERS_COLUMN: &str = "card_sealed";
/// The demo order's amount.
const ORDER_AMOUNT: &str = "EUR 42.00";
/// At most one extra fetch per this interval when a ciphertext names a key
/// the cached list lacks (a rotation since the last fetch).
const INGEST_KEYS_REFRESH: Duration = Duration::from_secs(5);

/// The page, with `{{NAME}}` placeholders.
const CHECKOUT_HTML: &str = include_str!("checkout/index.html");

/// Why `POST /checkout` refused a body: the `reason` of the 400 answer.
/// Nothing is stored on any of them.
#[derive(Debug, thiserror::Error)]
enum CheckoutRejection {
    /// Not `{"order_id": "...", "card": "..."}` (also: any other field).
    #[error("the body is not the JSON object {{\"order_id\", \"card\"}}")]
    MalformedBody,
    /// No open order has this id.
    #[error("no such order")]
    UnknownOrder,
    /// The order already has a card.
    #[error("the order is already paid")]
    AlreadyPaid,
    /// `card` is not the text form of an ingest ciphertext.
    #[error("the card is not an ingest ciphertext (FORMAT.md section 17)")]
    MalformedCiphertext,
    /// Sealed with a key version or key tag this scope does not have.
    #[error("the card is sealed with an unknown ingest key")]
    UnknownIngestKey,
    /// Sealed with a retired key (the page is older than a rotation).
    #[error("the card is sealed with a retired ingest key: reload the page")]
    RetiredIngestKey,
    /// The same ciphertext is already stored (for this or another order):
    /// a captured request played again.
    #[error("the card ciphertext was already submitted")]
    ReplayedCiphertext,
}

impl CheckoutRejection {
    fn reason(&self) -> &'static str {
        match self {
            CheckoutRejection::MalformedBody => "malformed-body",
            CheckoutRejection::UnknownOrder => "unknown-order",
            CheckoutRejection::AlreadyPaid => "already-paid",
            CheckoutRejection::MalformedCiphertext => "malformed-ciphertext",
            CheckoutRejection::UnknownIngestKey => "unknown-ingest-key",
            CheckoutRejection::RetiredIngestKey => "retired-ingest-key",
            CheckoutRejection::ReplayedCiphertext => "replayed-ciphertext",
        }
    }
}

impl IntoResponse for CheckoutRejection {
    fn into_response(self) -> Response {
        let status = match self {
            CheckoutRejection::AlreadyPaid => StatusCode::CONFLICT,
            _ => StatusCode::BAD_REQUEST,
        };
        eprintln!("checkout: refused a card ({})", self.reason());
        (
            status,
            Json(json!({ "error": self.to_string(), "reason": self.reason() })),
        )
            .into_response()
    }
}

/// The checkout front end: a keyd client that can read public keys and
/// nothing else, and the page's assets.
struct Checkout {
    keys: RemoteKeyService,
    scope: Scope,
    ttl: Duration,
    listed: tokio::sync::Mutex<Option<(Instant, Vec<IngestKeyInfo>)>>,
    last_refresh: Mutex<Option<Instant>>,
    script: Bytes,
    /// `sha384-…` of the script (Subresource Integrity).
    script_integrity: String,
    /// Content-Security-Policy of the page (the style block by hash).
    csp: String,
}

impl Checkout {
    fn new(keys: RemoteKeyService, scope: Scope, ttl: Duration, script: Vec<u8>) -> Checkout {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let script_integrity = format!("sha384-{}", b64.encode(sha2::Sha384::digest(&script)));
        let style = CHECKOUT_HTML
            .split_once("<style>")
            .and_then(|(_, rest)| rest.split_once("</style>"))
            .map_or("", |(style, _)| style);
        let style_hash = b64.encode(Sha256::digest(style.as_bytes()));
        let csp = format!(
            "default-src 'none'; script-src 'self'; style-src 'sha256-{style_hash}'; \
             connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
        );
        Checkout {
            keys,
            scope,
            ttl,
            listed: tokio::sync::Mutex::new(None),
            last_refresh: Mutex::new(None),
            script: Bytes::from(script),
            script_integrity,
            csp,
        }
    }

    /// The scope's live ingest keys, from keyd at most every
    /// `--ingest-keys-ttl-secs` (or sooner when `refresh`).
    async fn ingest_keys(&self, refresh: bool) -> Result<Vec<IngestKeyInfo>, ApiError> {
        let mut listed = self.listed.lock().await;
        if let Some((at, keys)) = listed.as_ref() {
            if !refresh && at.elapsed() < self.ttl {
                return Ok(keys.clone());
            }
        }
        let keys = self
            .keys
            .ingest_keys(&self.scope)
            .await
            .map_err(Error::from)?;
        *listed = Some((Instant::now(), keys.clone()));
        Ok(keys)
    }

    /// The listed key that `sealed` names (version and key tag), fetching
    /// the list again (rate-limited) if the cached one lacks it.
    async fn key_of(&self, sealed: &IngestSealed) -> Result<IngestKeyInfo, CheckoutRejection> {
        let find = |keys: &[IngestKeyInfo]| {
            keys.iter()
                .find(|k| {
                    k.public_key.version() == sealed.key_version()
                        && k.public_key.key_tag() == sealed.key_tag()
                })
                .cloned()
        };
        let keys = self
            .ingest_keys(false)
            .await
            .map_err(|_| CheckoutRejection::UnknownIngestKey)?;
        if let Some(k) = find(&keys) {
            return Ok(k);
        }
        let may_refresh = {
            let mut last = self.last_refresh.lock().unwrap_or_else(|e| e.into_inner());
            let ok = last.is_none_or(|t| t.elapsed() >= INGEST_KEYS_REFRESH);
            if ok {
                *last = Some(Instant::now());
            }
            ok
        };
        if may_refresh {
            if let Ok(keys) = self.ingest_keys(true).await {
                if let Some(k) = find(&keys) {
                    return Ok(k);
                }
            }
        }
        Err(CheckoutRejection::UnknownIngestKey)
    }
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn checkout_of(app: &App) -> Result<&Checkout, ApiError> {
    app.checkout
        .as_ref()
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "no such endpoint"))
}

/// `GET /checkout`: a new order and the page, with the active ingest
/// public key embedded.
async fn checkout_page(State(app): State<Shared>) -> Result<Response, ApiError> {
    let checkout = checkout_of(&app)?;
    let keys = checkout.ingest_keys(false).await?;
    let Some(active) = keys.iter().find(|k| k.state == KeyState::Active) else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the scope has no active ingest key",
        ));
    };
    let key = &active.public_key;
    let id = hex::encode(rand::random::<[u8; 16]>());
    let client = app.db.pool().get().await.map_err(db_err)?;
    client
        .execute(
            "INSERT INTO orders (id, amount) VALUES ($1, $2)",
            &[&id, &ORDER_AMOUNT],
        )
        .await
        .map_err(db_err)?;
    eprintln!(
        "checkout: order {id} opened (ingest key {}/{} v{})",
        key.environment(),
        key.scope(),
        key.version()
    );
    let fingerprint = key.fingerprint();
    let html = CHECKOUT_HTML
        .replace("{{ORDER_ID}}", &id)
        .replace("{{AMOUNT}}", ORDER_AMOUNT)
        .replace("{{INGEST_KEY}}", &html_escape(&key.to_text()))
        .replace("{{TABLE}}", ORDERS_TABLE)
        .replace("{{COLUMN}}", ORDERS_COLUMN)
        .replace(
            "{{KEY_NAME}}",
            &html_escape(&format!("{} v{}", key.scope(), key.version())),
        )
        .replace("{{KEY_FINGERPRINT}}", &fingerprint[..16])
        .replace("{{SCRIPT_INTEGRITY}}", &checkout.script_integrity);
    let mut resp = ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response();
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&checkout.csp) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    Ok(resp)
}

/// `GET /checkout.js`: the page's script (pinned by the page's SRI hash).
async fn checkout_script(State(app): State<Shared>) -> Result<Response, ApiError> {
    let checkout = checkout_of(&app)?;
    Ok((
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        checkout.script.clone(),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckoutBody {
    order_id: String,
    card: String,
}

/// `POST /checkout`: stores the ingest ciphertext the page sealed. The
/// server holds no private key, so it checks the form and the key the
/// ciphertext names; the context binding is checked when keyd opens or
/// admits it.
async fn checkout_submit(
    State(app): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Response> {
    let checkout = checkout_of(&app).map_err(IntoResponse::into_response)?;
    let body: CheckoutBody = body
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(CheckoutRejection::MalformedBody)
        .map_err(IntoResponse::into_response)?;
    let id = card_id(Ok(Path(body.order_id)))
        .map_err(|_| CheckoutRejection::UnknownOrder.into_response())?;
    let sealed = IngestSealed::from_text(&body.card)
        .map_err(|_| CheckoutRejection::MalformedCiphertext.into_response())?;
    let client = app
        .db
        .pool()
        .get()
        .await
        .map_err(|e| db_err(e).into_response())?;
    let paid = client
        .query_opt(
            "SELECT card_sealed IS NOT NULL FROM orders WHERE id = $1",
            &[&id],
        )
        .await
        .map_err(|e| db_err(e).into_response())?
        .ok_or_else(|| CheckoutRejection::UnknownOrder.into_response())?
        .get::<_, bool>(0);
    if paid {
        return Err(CheckoutRejection::AlreadyPaid.into_response());
    }
    let key = checkout
        .key_of(&sealed)
        .await
        .map_err(IntoResponse::into_response)?;
    if key.state != KeyState::Active {
        return Err(CheckoutRejection::RetiredIngestKey.into_response());
    }
    let version = i64::from(sealed.key_version());
    let text = sealed.to_text();
    let replayed = client
        .query_opt("SELECT 1 FROM orders WHERE card_sealed = $1", &[&text])
        .await
        .map_err(|e| db_err(e).into_response())?
        .is_some();
    if replayed {
        return Err(CheckoutRejection::ReplayedCiphertext.into_response());
    }
    let updated = client
        .execute(
            "UPDATE orders SET card_sealed = $2, ingest_key_version = $3, status = 'paid',
                 paid_at = now()
             WHERE id = $1 AND card_sealed IS NULL",
            &[&id, &text, &version],
        )
        .await
        // A concurrent submission of the same ciphertext loses on the
        // unique index.
        .map_err(|_| CheckoutRejection::ReplayedCiphertext.into_response())?;
    if updated != 1 {
        // A concurrent payment won.
        return Err(CheckoutRejection::AlreadyPaid.into_response());
    }
    eprintln!(
        "checkout: order {id} paid, card stored sealed (ingest key v{})",
        sealed.key_version()
    );
    Ok((
        StatusCode::CREATED,
        Json(json!({ "order_id": id, "status": "paid" })),
    )
        .into_response())
}

/// `GET /orders/{id}` (back office): the order without its card.
async fn order_show(
    State(app): State<Shared>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    peer.require(&[Role::Lookup, Role::Reveal])?;
    let id = card_id(path)?;
    let client = app.db.pool().get().await.map_err(db_err)?;
    let row = client
        .query_opt(
            "SELECT status, amount, ingest_key_version FROM orders WHERE id = $1",
            &[&id],
        )
        .await
        .map_err(db_err)?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "no such order"))?;
    Ok(Json(json!({
        "id": id,
        "status": row.get::<_, String>(0),
        "amount": row.get::<_, String>(1),
        "ingest_key_version": row.get::<_, Option<i64>>(2),
    })))
}

/// `POST /orders/{id}/reveal` (back office, role `reveal`): opens the
/// order's ingest ciphertext through the reveal credential
/// (`--reveal-config`; with panseal-keyd's `reveal` permission it opens
/// inside keyd, counted and audited there), under the same per-caller
/// limit and app audit as card reveals.
async fn order_reveal(
    State(app): State<Shared>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let caller = match peer.require(&[Role::Reveal]) {
        Ok(c) => c,
        Err(e) => {
            if let Some(c) = &peer.caller {
                app.audit
                    .record(json!({ "event": "order-reveal", "principal": c.name,
                    "outcome": "refused", "reason": "role" }))?;
            }
            return Err(e);
        }
    };
    let id = card_id(path)?;
    let body: Reveal = parse_body(body)?;
    let checkout = checkout_of(&app)?;
    if let Err(retry) = app.reveals.charge(&caller.name, caller.reveals_per_window) {
        app.audit
            .record(json!({ "event": "order-reveal", "principal": caller.name,
            "purpose": body.purpose.as_str(), "order": id, "outcome": "refused",
            "reason": "rate-limit" }))?;
        return Err(ApiError {
            retry_after: Some(retry),
            ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "reveal limit reached")
        });
    }
    let access = Access::new(&caller.name, body.purpose.as_str()).map_err(Error::from)?;
    let client = app.db.pool().get().await.map_err(db_err)?;
    let row = client
        .query_opt("SELECT card_sealed FROM orders WHERE id = $1", &[&id])
        .await
        .map_err(db_err)?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "no such order"))?;
    let Some(stored) = row.get::<_, Option<String>>(0) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "the order has no card",
        ));
    };
    // Either form: the ingest ciphertext the page posted, or the compact
    // one an admission job (examples/admit.rs) replaced it with.
    let sealed = StoredPan::from_text(&stored)?;
    let context = Context::new(ORDERS_TABLE, ORDERS_COLUMN, id.as_str()).map_err(Error::from)?;
    // panseal sends it to the key service (`open_ingest`: keyd's reveal
    // path for a reveal-only credential, counted and audited there) and
    // audits one open under the authenticated principal.
    let opened = app
        .revealer
        .with_scope(checkout.scope.as_str())?
        .open_pan(&sealed, &context, &access)
        .await;
    app.audit
        .record(json!({ "event": "order-reveal", "principal": caller.name,
        "purpose": body.purpose.as_str(), "order": id,
        "outcome": if opened.is_ok() { "success" } else { "failure" } }))?;
    let opened = opened?;
    // Not re-sealed here: admission (`Panseal::admit`) turns ingest
    // ciphertexts into the compact form inside the key service.
    Ok(Json(json!({
        "id": id,
        "pan": opened.pan.expose_digits(),
        "masked": opened.pan.masked(),
    })))
}

async fn fallback() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such endpoint")
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let callers = Arc::new(Callers::load(&args.callers)?);
    let acceptor = tls_acceptor(&args)?;
    let config = ClientConfig::from_file(&args.config)?;
    let KeyStoreConfig::Postgres { url, .. } = &config.key_store else {
        return Err("the configuration must name a PostgreSQL key store".into());
    };
    let db = PostgresKeyStore::connect(url, 8).await?;
    db.pool()
        .get()
        .await?
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS cards (
                 id char(32) PRIMARY KEY,
                 pan_sealed varchar(64) NOT NULL,
                 pan_index char(64) NOT NULL,
                 pan_index_version int NOT NULL,
                 masked varchar(19) NOT NULL,
                 created_at timestamptz NOT NULL DEFAULT now());
             CREATE INDEX IF NOT EXISTS cards_pan_index ON cards (pan_index);
             CREATE TABLE IF NOT EXISTS orders (
                 id char(32) PRIMARY KEY,
                 amount varchar(32) NOT NULL,
                 status varchar(16) NOT NULL DEFAULT 'open',
                 card_sealed varchar(140),
                 ingest_key_version bigint,
                 created_at timestamptz NOT NULL DEFAULT now(),
                 paid_at timestamptz);
             CREATE UNIQUE INDEX IF NOT EXISTS orders_card_sealed ON orders (card_sealed);",
        )
        .await?;
    let panseal = config.connect().await?.build().await?;
    let revealer = match &args.reveal_config {
        Some(path) => {
            ClientConfig::from_file(path)?
                .connect()
                .await?
                .build()
                .await?
        }
        None => panseal.clone(),
    };
    let checkout = match (&args.checkout_config, &args.checkout_script) {
        (Some(config), Some(script)) => {
            let front = ClientConfig::from_file(config)?;
            let keys = front.keyd_client()?;
            // The page's credential reads public keys only: refuse one
            // with any permission (on the internet-facing listener, even
            // `wrap` or `index` is an oracle or a DEK).
            let held = keys.permissions().await?;
            if held != panseal::Permissions::none() {
                return Err("--checkout-config: the checkout credential must hold no permission (it only lists ingest public keys)".into());
            }
            let script = std::fs::read(script)
                .map_err(|e| format!("--checkout-script {}: {e}", script.display()))?;
            Some(Checkout::new(
                keys,
                Scope::new(&front.scope)?,
                Duration::from_secs(args.ingest_keys_ttl_secs),
                script,
            ))
        }
        _ => None,
    };
    let audit = AppAudit(Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&args.app_audit)?,
    ));
    let app = Arc::new(App {
        panseal,
        revealer,
        db,
        reveals: Limiter::new(callers.window),
        lookups: Limiter::new(callers.window),
        audit,
        checkout,
    });
    let router = Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/cards", post(create))
        .route("/cards/lookup", post(lookup))
        .route("/cards/{id}", get(show))
        .route("/cards/{id}/reveal", post(reveal))
        .route("/orders/{id}", get(order_show))
        .route("/orders/{id}/reveal", post(order_reveal))
        .fallback(fallback)
        .layer(DefaultBodyLimit::max(1024))
        .with_state(app.clone());
    let tcp = TcpListener::bind(args.listen).await?;
    println!(
        "payments_backend listening on https://{}",
        tcp.local_addr()?
    );
    // Customers: server certificate only, and only the checkout routes.
    let storefront = match args.checkout_listen {
        Some(addr) if app.checkout.is_some() => {
            let tcp = TcpListener::bind(addr).await?;
            println!("payments_backend checkout on https://{}", tcp.local_addr()?);
            let router = Router::new()
                .route("/checkout", get(checkout_page).post(checkout_submit))
                .route("/checkout.js", get(checkout_script))
                .fallback(fallback)
                .layer(DefaultBodyLimit::max(1024))
                .with_state(app.clone());
            let nobody = Arc::new(Callers {
                window: callers.window,
                by_fingerprint: HashMap::new(),
            });
            let listener = TlsListener::start(tcp, tls_acceptor_public(&args)?, nobody);
            Some(tokio::spawn(async move {
                axum::serve(
                    listener,
                    router.into_make_service_with_connect_info::<Peer>(),
                )
                .await
            }))
        }
        _ => None,
    };
    let listener = TlsListener::start(tcp, acceptor, callers);
    let back_office = axum::serve(
        listener,
        router.into_make_service_with_connect_info::<Peer>(),
    );
    match storefront {
        Some(storefront) => tokio::select! {
            r = back_office => r?,
            r = storefront => r??,
        },
        None => back_office.await?,
    }
    Ok(())
}
