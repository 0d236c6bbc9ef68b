//! `panseal-keyd init`: a new master key split into custodian shares, each
//! collected by its custodian over mutual TLS before anything is written;
//! then the audit key, the first audit record, state generation 0 and the
//! audit anchor.

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use panseal::{AuditKey, ChainedAuditLog};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::config::Config;
use crate::state::StateStore;
use crate::state_file::{Acknowledgement, AuditPosition, CustodianShare, State};
use crate::{api, seal, state, tls};

/// Initialises the server `config` names: `threshold`-of-`custodians`
/// shares, each collected by its custodian (`listen` overrides the
/// configured address while they do).
pub(crate) fn run(
    config: &Path,
    listen: Option<SocketAddr>,
    threshold: u8,
    custodians: &[String],
) -> Result<(), String> {
    run_with(config, listen, threshold, custodians, None)
}

/// Called once with the address `init` (or `serve`) listens on, from the
/// server's runtime: it must not block (`panseal-keyd dev` starts a thread
/// that plays the custodians).
pub(crate) type OnListening = Box<dyn FnOnce(SocketAddr) + Send>;

/// As [`run`], calling `on_listening` once the shares can be collected.
pub(crate) fn run_with(
    config: &Path,
    listen: Option<SocketAddr>,
    threshold: u8,
    custodians: &[String],
    on_listening: Option<OnListening>,
) -> Result<(), String> {
    let mut cfg = Config::load(config).map_err(|e| e.to_string())?;
    if let Some(l) = listen {
        cfg.listen = l;
    }
    api::validate_custodians(&cfg, threshold, custodians)?;
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|e| format!("{}: {e}", cfg.data_dir.display()))?;
    std::fs::create_dir_all(&cfg.anchor_dir)
        .map_err(|e| format!("{}: {e}", cfg.anchor_dir.display()))?;
    let paths = cfg.paths();
    let _lock = state::DirLock::take(&paths.lock).map_err(|e| e.to_string())?;
    for p in [&paths.state, &cfg.audit_path()] {
        if p.exists() {
            return Err(format!(
                "{} exists: this server is initialised already",
                p.display()
            ));
        }
    }
    let (master, key) = seal::MasterKey::generate();
    let split = seal::split(&key, threshold, custodians.len() as u8);
    drop(key);
    let salt = seal::new_salt();
    let mut shares = Vec::new();
    let mut texts = std::collections::BTreeMap::new();
    for (c, (x, text, bytes)) in custodians.iter().zip(split) {
        shares.push(CustodianShare {
            custodian: c.clone(),
            x,
            check: seal::share_check(&salt, &bytes),
        });
        texts.insert(c.clone(), text);
    }
    // Each custodian collects their own share over mutual TLS; nothing is
    // written to disk until every share has been collected.
    let acknowledgements = init_collect(&cfg, threshold, texts, on_listening)?;
    if let Some(dir) = cfg.audit_key_path().parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let audit_key = AuditKey::create_file(cfg.audit_key_path())
        .map_err(|e| format!("audit key {}: {e}", cfg.audit_key_path().display()))?;
    let audit_key_id = audit_key.key_id();
    let log = ChainedAuditLog::open(cfg.audit_path(), audit_key).map_err(|e| e.to_string())?;
    log.append(&api::system_record(
        "init",
        format!(
            "master key split {threshold}-of-{} among {}; each share collected by its custodian",
            custodians.len(),
            custodians.join(", ")
        ),
    ))
    .and_then(|_| log.sync())
    .map_err(|e| e.to_string())?;
    let pos = log.summary();
    let state = State {
        threshold,
        share_salt: salt,
        master_check: master.check_value(),
        shares,
        share_epoch: 0,
        acknowledgements,
        scopes: Default::default(),
        deks: Default::default(),
        generation: 0,
        audit: AuditPosition {
            records: pos.records,
            head: pos.head,
        },
        audit_key_id,
        index_keys: Default::default(),
        record_keys: Default::default(),
        registry: Default::default(),
        ingest_keys: Default::default(),
    };
    StateStore::create(&paths, &state, master.keys()).map_err(|e| e.to_string())?;
    log.write_anchor(cfg.audit_anchor_path())
        .map_err(|e| e.to_string())?;
    println!(
        "initialised {}: {threshold}-of-{} shares collected by {} (state generation 0)",
        cfg.data_dir.display(),
        custodians.len(),
        custodians.join(", ")
    );
    Ok(())
}

/// Serves `/v1/share/collect` (and `/v1/status`) until every custodian has
/// collected their share; returns the acknowledgements given with them.
fn init_collect(
    cfg: &Config,
    threshold: u8,
    texts: std::collections::BTreeMap<String, zeroize::Zeroizing<String>>,
    on_listening: Option<OnListening>,
) -> Result<std::collections::BTreeMap<String, Acknowledgement>, String> {
    use panseal::keyd::server::protocol::{
        self as proto, CollectRequest, CollectResponse, ErrorBody, ErrorKind, ShareText,
        StatusResponse,
    };
    use std::sync::Mutex;
    struct Pickup {
        texts: std::collections::BTreeMap<String, zeroize::Zeroizing<String>>,
        acks: std::collections::BTreeMap<String, Acknowledgement>,
    }
    let tls = TlsAcceptor::from(Arc::new(tls::server_config(cfg)?));
    let by_cert = cfg.by_cert.clone();
    let principals = cfg.principals.clone();
    let names: Vec<String> = texts.keys().cloned().collect();
    let pickup = Arc::new(Mutex::new(Pickup {
        texts,
        acks: Default::default(),
    }));
    let done = Arc::new(tokio::sync::Notify::new());
    let listen = cfg.listen;
    let timeout = cfg.request_timeout;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let bound = listener.local_addr().map_err(|e| e.to_string())?;
        println!(
            "panseal-keyd initialising on {bound}: waiting for {} to collect their shares \
             (`panseal-keyd custodian collect-share`)",
            names.join(", ")
        );
        let _ = std::io::stdout().flush();
        if let Some(f) = on_listening {
            f(bound);
        }
        let accept = async {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (tls, by_cert, principals, pickup, done) = (
                    tls.clone(),
                    by_cert.clone(),
                    principals.clone(),
                    pickup.clone(),
                    done.clone(),
                );
                tokio::spawn(async move {
                    let Ok(Ok(stream)) = tokio::time::timeout(timeout, tls.accept(tcp)).await
                    else {
                        return;
                    };
                    let who = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| <[u8; 32]>::from(Sha256::digest(c.as_ref())))
                        .and_then(|fp| by_cert.get(&fp).map(|&i| principals[i].clone()));
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let (who, pickup, done) = (who.clone(), pickup.clone(), done.clone());
                        async move {
                            let path = req.uri().path().to_owned();
                            let body = http_body_util::BodyExt::collect(http_body_util::Limited::new(
                                req.into_body(),
                                proto::MAX_BODY_BYTES,
                            ))
                            .await
                            .map(|b| zeroize::Zeroizing::new(b.to_bytes().to_vec()))
                            .unwrap_or_default();
                            let err = |k: ErrorKind, m: &str| {
                                (k.status(), zeroize::Zeroizing::new(serde_json::to_vec(&ErrorBody::new(k, m)).unwrap_or_default()))
                            };
                            let (status, out) = match (&who, path.as_str()) {
                                (None, _) => err(ErrorKind::Unauthenticated, "no known client certificate"),
                                (Some(p), proto::STATUS) => {
                                    let pk = pickup.lock().unwrap_or_else(|e| e.into_inner());
                                    (200, zeroize::Zeroizing::new(serde_json::to_vec(&StatusResponse {
                                        sealed: true,
                                        threshold: u32::from(threshold),
                                        submitted: Vec::new(),
                                        principal: p.name.clone(),
                                        environment: p.environment.clone(),
                                        permissions: p.permissions.iter().copied().collect(),
                                        acknowledged: pk.acks.contains_key(&p.name),
                                        state_generation: 0,
                                        awaiting_collection: pk.texts.keys().cloned().collect(),
                                    }).unwrap_or_default()))
                                }
                                (Some(p), proto::SHARE_COLLECT) => {
                                    let r: CollectRequest = serde_json::from_slice(&body).unwrap_or_default();
                                    let mut pk = pickup.lock().unwrap_or_else(|e| e.into_inner());
                                    match pk.texts.remove(&p.name) {
                                        None => err(ErrorKind::Conflict, "no share waits for you (collected already, or not named)"),
                                        Some(text) => {
                                            if let Some(st) = r.statement.filter(|s| !s.trim().is_empty()) {
                                                pk.acks.insert(p.name.clone(), Acknowledgement {
                                                    custodian: p.name.clone(),
                                                    statement_sha256: hex::encode(Sha256::digest(st.as_bytes())),
                                                    at: std::time::SystemTime::now()
                                                        .duration_since(std::time::UNIX_EPOCH)
                                                        .map(|d| d.as_secs())
                                                        .unwrap_or(0),
                                                });
                                            }
                                            let awaiting: Vec<String> = pk.texts.keys().cloned().collect();
                                            if awaiting.is_empty() {
                                                done.notify_one();
                                            }
                                            (200, proto::to_json_wiped(&CollectResponse {
                                                share: ShareText::new(text.to_string()),
                                                awaiting_collection: awaiting,
                                            }).unwrap_or_default())
                                        }
                                    }
                                }
                                _ => err(ErrorKind::Sealed, "keyd is initialising: custodians collect their shares"),
                            };
                            let mut r = hyper::Response::new(http_body_util::Full::new(
                                bytes::Bytes::from_owner(out),
                            ));
                            *r.status_mut() = hyper::StatusCode::from_u16(status)
                                .unwrap_or(hyper::StatusCode::BAD_REQUEST);
                            Ok::<_, Infallible>(r)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(timeout)
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        };
        tokio::select! {
            () = accept => Err("accept loop ended".to_owned()),
            () = done.notified() => Ok(()),
            _ = tokio::signal::ctrl_c() => Err("interrupted: nothing written; run init again".to_owned()),
        }
    })?;
    // Let the last answer leave before the runtime stops.
    std::thread::sleep(Duration::from_millis(200));
    drop(rt);
    let pk = pickup.lock().unwrap_or_else(|e| e.into_inner());
    Ok(pk.acks.clone())
}
