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
//! Errors are JSON `{"error": "..."}` written by this program: they never
//! quote the request (no PAN sent in a malformed body comes back).
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
use panseal::{Access, Context, Error, Pan, Panseal, PostgresKeyStore, SealedPan};
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
             CREATE INDEX IF NOT EXISTS cards_pan_index ON cards (pan_index);",
        )
        .await?;
    let panseal = config.builder()?.build().await?;
    let revealer = match &args.reveal_config {
        Some(path) => ClientConfig::from_file(path)?.builder()?.build().await?,
        None => panseal.clone(),
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
    });
    let router = Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/cards", post(create))
        .route("/cards/lookup", post(lookup))
        .route("/cards/{id}", get(show))
        .route("/cards/{id}/reveal", post(reveal))
        .fallback(fallback)
        .layer(DefaultBodyLimit::max(1024))
        .with_state(app);
    let tcp = TcpListener::bind(args.listen).await?;
    println!(
        "payments_backend listening on https://{}",
        tcp.local_addr()?
    );
    let listener = TlsListener::start(tcp, acceptor, callers);
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<Peer>(),
    )
    .await?;
    Ok(())
}
