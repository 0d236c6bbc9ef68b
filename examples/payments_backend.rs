//! `payments_backend` — a payment service a payment engineer can copy from:
//! axum + PostgreSQL + panseal.
//!
//! * `POST /cards {"pan": "..."}` seals the PAN bound to its row id, stores
//!   the blind index and the masked form (never the PAN, never a CVV).
//! * `GET /cards/{id}` returns the masked form only.
//! * `POST /cards/{id}/reveal {"principal": "...", "purpose": "..."}` opens
//!   the PAN for a named principal and purpose (audited); a PAN under a
//!   retired DEK is re-sealed on the way (lazy re-seal).
//! * `POST /cards/lookup {"pan": "..."}` finds cards through the blind index
//!   (every live index-key version), never through masked values.
//!
//! ```text
//! cargo run --features postgres --example payments_backend -- --config panseal.json --listen 127.0.0.1:8080
//! ```
//!
//! The configuration must name a PostgreSQL key store; the `cards` table is
//! created in the same database. Errors are JSON `{"error": "..."}` with no
//! PAN in them. A production service would authenticate `principal`
//! (here it is taken from the request body to keep the example short).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use panseal::config::{ClientConfig, KeyStoreConfig};
use panseal::{Access, Context, Error, Pan, Panseal, PostgresKeyStore, SealedPan};
use serde::Deserialize;
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Client configuration (JSON) naming key service, PostgreSQL key store, audit sink.
    #[arg(long)]
    config: std::path::PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
}

struct App {
    panseal: Panseal,
    db: PostgresKeyStore,
}

type Shared = Arc<App>;

/// An error response that never carries a PAN: panseal's errors are PAN-free
/// by construction.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::Pan(_) | Error::Context(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Error::Decryption | Error::Format(_) => StatusCode::CONFLICT,
            Error::Key(_) => StatusCode::GONE,
            e if e.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

fn db_err(e: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("database: {e}"))
}

fn ctx(id: i64) -> Result<Context, ApiError> {
    Ok(Context::new("cards", "pan_sealed", id.to_string()).map_err(Error::from)?)
}

#[derive(Deserialize)]
struct NewCard {
    pan: String,
}

async fn create(
    State(app): State<Shared>,
    Json(body): Json<NewCard>,
) -> Result<impl IntoResponse, ApiError> {
    let pan = Pan::parse(&body.pan).map_err(Error::from)?;
    let index = app.panseal.blind_index(&pan).await?;
    let mut client = app.db.pool().get().await.map_err(db_err)?;
    let tx = client.transaction().await.map_err(db_err)?;
    // The row id is part of the sealing context, so reserve it first.
    let id: i64 = tx
        .query_one("SELECT nextval('cards_id_seq')", &[])
        .await
        .map_err(db_err)?
        .get(0);
    let sealed = app.panseal.seal_pan(&pan, &ctx(id)?).await?;
    tx.execute(
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
    tx.commit().await.map_err(db_err)?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "id": id, "masked": pan.masked() })),
    ))
}

async fn show(
    State(app): State<Shared>,
    Path(id): Path<i64>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let client = app.db.pool().get().await.map_err(db_err)?;
    let row = client
        .query_opt("SELECT masked FROM cards WHERE id = $1", &[&id])
        .await
        .map_err(db_err)?
        .ok_or(ApiError(StatusCode::NOT_FOUND, "no such card".into()))?;
    Ok(Json(json!({ "id": id, "masked": row.get::<_, String>(0) })))
}

#[derive(Deserialize)]
struct Reveal {
    principal: String,
    purpose: String,
}

async fn reveal(
    State(app): State<Shared>,
    Path(id): Path<i64>,
    Json(body): Json<Reveal>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let access = Access::new(&body.principal, &body.purpose).map_err(Error::from)?;
    let client = app.db.pool().get().await.map_err(db_err)?;
    let row = client
        .query_opt("SELECT pan_sealed FROM cards WHERE id = $1", &[&id])
        .await
        .map_err(db_err)?
        .ok_or(ApiError(StatusCode::NOT_FOUND, "no such card".into()))?;
    let stored: String = row.get(0);
    let sealed = SealedPan::from_text(&stored)?;
    let context = ctx(id)?;
    let opened = app.panseal.open_pan(&sealed, &context, &access).await?;
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

async fn lookup(
    State(app): State<Shared>,
    Json(body): Json<NewCard>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let pan = Pan::parse(&body.pan).map_err(Error::from)?;
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
            "SELECT id, masked FROM cards WHERE pan_index = ANY($1) ORDER BY id",
            &[&indexes],
        )
        .await
        .map_err(db_err)?;
    let cards: Vec<_> = rows
        .iter()
        .map(|r| json!({ "id": r.get::<_, i64>(0), "masked": r.get::<_, String>(1) }))
        .collect();
    Ok(Json(json!({ "cards": cards })))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
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
                 id bigserial PRIMARY KEY,
                 pan_sealed varchar(64) NOT NULL,
                 pan_index char(64) NOT NULL,
                 pan_index_version int NOT NULL,
                 masked varchar(19) NOT NULL,
                 created_at timestamptz NOT NULL DEFAULT now());
             CREATE INDEX IF NOT EXISTS cards_pan_index ON cards (pan_index);",
        )
        .await?;
    let panseal = config.builder()?.build().await?;
    let app = Arc::new(App { panseal, db });
    let router = Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/cards", post(create))
        .route("/cards/lookup", post(lookup))
        .route("/cards/{id}", get(show))
        .route("/cards/{id}/reveal", post(reveal))
        .with_state(app);
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!("payments_backend listening on {}", listener.local_addr()?);
    axum::serve(listener, router).await?;
    Ok(())
}
