//! `panseal-keyd`: panseal's own key service.
//!
//! A separate process that holds the key-encryption keys (KEKs), so that a
//! compromise of the payment application or a dump of its database never
//! yields them. HTTPS (rustls, TLS 1.3) with client certificates as
//! principals, per-principal policy and unwrap quotas, versioned KEKs per
//! scope with dual-control destruction, a master key split into k-of-n
//! Shamir shares (the server starts sealed), and a hash-chained audit log
//! of every request.
//!
//! ```text
//! panseal-keyd gen-dev-certs --out DIR [--client NAME]... [--host NAME]...
//! panseal-keyd init --config FILE --threshold K --custodian NAME... [--listen IP:PORT]
//! panseal-keyd serve --config FILE [--listen IP:PORT]
//! panseal-keyd verify-audit (--config FILE | --log FILE --key FILE [--anchor FILE])
//! panseal-keyd fingerprint CERT.pem
//! panseal-keyd custodian ACTION --address HOST:PORT --ca CA.pem --cert ME.pem
//!     --key ME.key.pem --environment ENV [--server-name NAME] [--scope S]
//!     [--version N] [--key-id ID] [--purpose data|index] [--share-file FILE]
//!     [--statement TEXT] [--expect-generation N] [--threshold K] [--custodian NAME]...
//! ```

#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod api;
mod certs;
mod config;
mod custodian;
mod quota;
mod seal;
mod state;
#[doc(hidden)]
pub mod state_file;

use std::convert::Infallible;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use crate::state_file::{Acknowledgement, AuditPosition, CustodianShare, State};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use panseal::{
    read_audit_anchor, verify_audit_chain_anchored, AuditError, AuditKey, ChainSummary,
    ChainedAuditLog,
};
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::config::Config;
use crate::state::StateStore;

const USAGE: &str = "usage:
  panseal-keyd gen-dev-certs --out DIR [--client NAME]... [--host NAME]...
  panseal-keyd init --config FILE --threshold K --custodian NAME... [--listen IP:PORT]
      (waits until every custodian ran `custodian collect-share`)
  panseal-keyd serve --config FILE [--listen IP:PORT]
  panseal-keyd verify-audit (--config FILE | --log FILE --key FILE [--anchor FILE])
  panseal-keyd fingerprint CERT.pem
  panseal-keyd custodian ACTION --address HOST:PORT --ca CA.pem --cert ME.pem --key ME.key.pem
      --environment ENV [--server-name NAME] [--scope S] [--version N] [--key-id ID]
      [--purpose data|index] [--share-file FILE] [--statement TEXT] [--expect-generation N]
      [--threshold K] [--custodian NAME]...
    ACTION: status | acknowledge | collect-share | unseal | seal | kek-status | rotate | retire
      | approve-destroy | approve-destroy-dek | withdraw | withdraw-dek | reshare";

/// Parsed `--flag value` pairs (flags may repeat).
struct Args {
    pairs: Vec<(String, String)>,
    positional: Vec<String>,
}

impl Args {
    fn parse(args: &[String]) -> Result<Args, String> {
        let mut pairs = Vec::new();
        let mut positional = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if let Some(flag) = a.strip_prefix("--") {
                let v = it.next().ok_or_else(|| format!("--{flag} needs a value"))?;
                pairs.push((flag.to_owned(), v.clone()));
            } else {
                positional.push(a.clone());
            }
        }
        Ok(Args { pairs, positional })
    }

    fn all(&self, flag: &str) -> Vec<String> {
        self.pairs
            .iter()
            .filter(|(f, _)| f == flag)
            .map(|(_, v)| v.clone())
            .collect()
    }

    fn one(&self, flag: &str) -> Option<String> {
        self.all(flag).pop()
    }

    fn need(&self, flag: &str) -> Result<String, String> {
        self.one(flag)
            .ok_or_else(|| format!("--{flag} is required"))
    }

    fn check(&self, allowed: &[&str]) -> Result<(), String> {
        for (f, _) in &self.pairs {
            if !allowed.contains(&f.as_str()) {
                return Err(format!("unknown option --{f}"));
            }
        }
        Ok(())
    }
}

/// The `panseal-keyd` command line (the binary's `main`).
pub fn run() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = argv.split_first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let args = match Args::parse(rest) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("panseal-keyd: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = match cmd.as_str() {
        "gen-dev-certs" => gen_dev_certs(&args),
        "init" => init(&args),
        "serve" => serve(&args),
        "verify-audit" => return verify_audit(&args),
        "fingerprint" => fingerprint(&args),
        "custodian" => match args.positional.first() {
            Some(action) => custodian::run(action, &args),
            None => Err(format!("custodian needs an action: {}", custodian::ACTIONS)),
        },
        "help" | "--help" | "-h" => {
            println!("{USAGE}");
            Ok(())
        }
        other => Err(format!("unknown command {other:?}\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("panseal-keyd: {e}");
            ExitCode::from(2)
        }
    }
}

fn gen_dev_certs(args: &Args) -> Result<(), String> {
    args.check(&["out", "client", "host"])?;
    let out = PathBuf::from(args.need("out")?);
    certs::generate(&out, &args.all("host"), &args.all("client"))?;
    println!(
        "development certificates written to {} (not for production)",
        out.display()
    );
    Ok(())
}

fn fingerprint(args: &Args) -> Result<(), String> {
    let path = args.positional.first().ok_or("fingerprint CERT.pem")?;
    let der = CertificateDer::from_pem_file(path).map_err(|e| format!("{path}: {e}"))?;
    println!("{}", hex::encode(Sha256::digest(der.as_ref())));
    Ok(())
}

fn load_config(args: &Args) -> Result<Config, String> {
    Config::load(Path::new(&args.need("config")?)).map_err(|e| e.to_string())
}

fn init(args: &Args) -> Result<(), String> {
    args.check(&["config", "threshold", "custodian", "listen"])?;
    let mut cfg = load_config(args)?;
    if let Some(l) = args.one("listen") {
        cfg.listen = l
            .parse()
            .map_err(|_| format!("--listen {l:?} is not ip:port"))?;
    }
    let threshold: u8 = args
        .need("threshold")?
        .parse()
        .map_err(|_| "--threshold must be a number from 2 to 255")?;
    let custodians = args.all("custodian");
    api::validate_custodians(&cfg, threshold, &custodians)?;
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
    let acknowledgements = init_collect(&cfg, threshold, texts)?;
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
    let tls = TlsAcceptor::from(Arc::new(tls_config(cfg)?));
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

fn verify_audit(args: &Args) -> ExitCode {
    match verify_audit_inner(args) {
        Ok(msg) => {
            println!("{msg}");
            ExitCode::SUCCESS
        }
        Err((code, msg)) => {
            if code == 1 {
                println!("{msg}");
            } else {
                eprintln!("panseal-keyd: {msg}");
            }
            ExitCode::from(code)
        }
    }
}

/// `verify-audit`: with `--config`, also against the anchors (state and
/// `audit.anchor`) and the audit key the state names.
fn verify_audit_inner(args: &Args) -> Result<String, (u8, String)> {
    let usage = |e: String| (2u8, e);
    args.check(&["config", "log", "key", "anchor"])
        .map_err(usage)?;
    let (log, key_path, anchor_file, cfg) = if args.one("config").is_some() {
        let cfg = load_config(args).map_err(usage)?;
        (
            cfg.audit_path(),
            cfg.audit_key_path(),
            Some(cfg.audit_anchor_path()),
            Some(cfg),
        )
    } else {
        (
            PathBuf::from(args.need("log").map_err(usage)?),
            PathBuf::from(args.need("key").map_err(usage)?),
            args.one("anchor").map(PathBuf::from),
            None,
        )
    };
    let key = AuditKey::load_file(&key_path)
        .map_err(|e| (2, format!("audit key {}: {e}", key_path.display())))?;
    let mut anchor = ChainSummary::genesis();
    let mut named = String::new();
    if let Some(cfg) = &cfg {
        let paths = cfg.paths();
        if let Ok(bytes) = std::fs::read(&paths.state) {
            let snap = crate::state_file::decode_snapshot(&bytes, 0)
                .map_err(|e| (1, format!("state {}: {e}", paths.state.display())))?;
            let id = &snap.state.audit_key_id;
            if !id.is_empty() && id != &key.key_id() {
                return Err((
                    1,
                    format!(
                        "audit key {} is not the key this keyd's state names (replaced?): \
                         the log cannot be trusted",
                        key_path.display()
                    ),
                ));
            }
            if snap.state.audit.records > anchor.records {
                anchor = ChainSummary {
                    records: snap.state.audit.records,
                    head: snap.state.audit.head.clone(),
                };
                named = format!("the state {}", paths.state.display());
            }
        }
    }
    if let Some(a) = &anchor_file {
        match read_audit_anchor(a, &key) {
            Ok(s) if s.records >= anchor.records => {
                anchor = s;
                named = format!("the anchor {}", a.display());
            }
            Ok(_) => {}
            Err(AuditError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                if cfg.is_none() {
                    return Err((2, format!("anchor {}: {e}", a.display())));
                }
            }
            Err(e) => return Err((1, format!("anchor {}: {e}", a.display()))),
        }
    }
    match verify_audit_chain_anchored(&log, &key, &anchor) {
        Ok(s) => Ok(format!(
            "audit log {} verifies: {} records, head {}{}",
            log.display(),
            s.records,
            s.head,
            if anchor.records > 0 {
                format!("; reaches {} (record {})", named, anchor.records)
            } else {
                String::new()
            }
        )),
        Err(e @ AuditError::Tampered { .. }) => Err((
            1,
            format!(
                "audit log {}: {e}{}",
                log.display(),
                if anchor.records > 0 {
                    format!(" (anchored by {named}: {} records)", anchor.records)
                } else {
                    String::new()
                }
            ),
        )),
        Err(e) => Err((2, format!("{}: {e}", log.display()))),
    }
}

fn tls_config(cfg: &Config) -> Result<rustls::ServerConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = CertificateDer::pem_file_iter(&cfg.tls_cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("tls_cert {}: {e}", cfg.tls_cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&cfg.tls_key)
        .map_err(|e| format!("tls_key {}: {e}", cfg.tls_key.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&cfg.client_ca)
        .map_err(|e| format!("client_ca {}: {e}", cfg.client_ca.display()))?
    {
        let c = c.map_err(|e| format!("client_ca {}: {e}", cfg.client_ca.display()))?;
        roots.add(c).map_err(|e| format!("client_ca: {e}"))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    let verifier = if cfg.allow_bearer_tokens {
        verifier.allow_unauthenticated()
    } else {
        verifier
    };
    let verifier = verifier.build().map_err(|e| format!("client_ca: {e}"))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| format!("server certificate: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Opens the audit log for `serve`: the key must be the one the state
/// names, the log must reach both anchors, and the state must be at least
/// as new as every `state-commit` the log records.
fn open_audit(cfg: &Config, state: &StateStore) -> Result<(ChainedAuditLog, String), String> {
    let key_path = cfg.audit_key_path();
    let key = AuditKey::load_file(&key_path)
        .map_err(|e| format!("audit key {}: {e}; refusing to start", key_path.display()))?;
    let key_id = key.key_id();
    // Only a version 1 state (read only where no version 2 state ever
    // was: `StateStore::open`) does not name its audit key.
    let version1 = state.version() == seal::V1;
    let (mut anchor, generation) = {
        let s = state.read();
        if s.audit_key_id.is_empty() && !version1 {
            return Err(format!(
                "state {} names no audit key (a version 2 state always does: altered); \
                 refusing to start",
                cfg.paths().state.display()
            ));
        }
        if !version1 && s.audit_key_id != key_id {
            return Err(format!(
                "audit key {} is not the key this keyd's state names (replaced?); refusing to start",
                key_path.display()
            ));
        }
        (state.audit_anchor(), s.generation)
    };
    let anchor_path = cfg.audit_anchor_path();
    // Both are lower bounds on the same chain (the exported one is
    // rewritten once a second, the state's at every change): the log must
    // reach the newer.
    match read_audit_anchor(&anchor_path, &key) {
        Ok(a) if a.records >= anchor.records => anchor = a,
        Ok(_) => {}
        Err(AuditError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound && version1 => {}
        Err(e) => {
            return Err(format!(
                "audit anchor {}: {e}; refusing to start",
                anchor_path.display()
            ))
        }
    }
    let log_path = cfg.audit_path();
    let refuse = |e: AuditError| {
        format!(
            "audit log {}: {e}; refusing to start (the log reached record {} before)",
            log_path.display(),
            anchor.records
        )
    };
    let mut committed = 0u64;
    let mut commits = 0u64;
    let claim = state.anchor_claim();
    let mut vouched = false;
    match std::fs::read(&log_path) {
        Ok(bytes) => {
            panseal::keyd::server::verify_audit_bytes(&bytes, &key, &anchor, &mut |_, body| {
                if let Some((g, head)) = state_commit(body) {
                    committed = committed.max(g);
                    commits += 1;
                    if claim
                        .as_ref()
                        .is_some_and(|(cg, ch)| *cg == g && *ch == head)
                    {
                        vouched = true;
                    }
                }
            })
            .map_err(refuse)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("audit log {}: {e}", log_path.display())),
    }
    if vouched {
        state.vouch_anchor();
    }
    if version1 && commits > 0 {
        return Err(state::StateError::Version1AfterVersion2 {
            path: cfg.paths().state,
            trace: format!(
                "a state-commit record (generation {committed}) in the audit log {}",
                log_path.display()
            ),
        }
        .to_string());
    }
    if committed > generation {
        return Err(state::StateError::RolledBack {
            path: cfg.paths().state,
            state: generation,
            anchored: committed,
            witness: format!("the audit log {}", log_path.display()),
        }
        .to_string());
    }
    let log = ChainedAuditLog::open_anchored(&log_path, key, &anchor).map_err(refuse)?;
    log.set_sync_each_record(cfg.audit_fsync == config::FsyncPolicy::EveryRecord);
    Ok((log, key_id))
}

/// The generation and head of a `state-commit` audit record (body without
/// its MAC).
fn state_commit(body: &[u8]) -> Option<(u64, String)> {
    const NEEDLE: &[u8] = b"\"operation\":\"state-commit\"";
    if !body.windows(NEEDLE.len()).any(|w| w == NEEDLE) {
        return None;
    }
    let mut json = body.to_vec();
    json.push(b'}');
    let v: serde_json::Value = serde_json::from_slice(&json).ok()?;
    let event = v.get("event")?;
    Some((
        event.get("state_generation")?.as_u64()?,
        event.get("state_head")?.as_str()?.to_owned(),
    ))
}

fn serve(args: &Args) -> Result<(), String> {
    args.check(&["config", "listen"])?;
    let mut cfg = load_config(args)?;
    if let Some(l) = args.one("listen") {
        cfg.listen = l
            .parse()
            .map_err(|_| format!("--listen {l:?} is not ip:port"))?;
    }
    let state = StateStore::open(&cfg.paths()).map_err(|e| e.to_string())?;
    let (audit, audit_key_id) = open_audit(&cfg, &state)?;
    let audit = Arc::new(audit);
    let tls = TlsAcceptor::from(Arc::new(tls_config(&cfg)?));
    let listen = cfg.listen;
    let environments: Vec<String> = cfg.environments.iter().cloned().collect();
    let generation = state.read().generation;
    audit
        .append(&api::system_record(
            "start",
            format!("listening on {listen}, sealed, state generation {generation}"),
        ))
        .and_then(|_| audit.sync())
        .map_err(|e| e.to_string())?;
    let anchor_path = cfg.audit_anchor_path();
    let limit = Arc::new(tokio::sync::Semaphore::new(cfg.max_connections));
    let per_client_max = cfg.max_connections_per_client;
    let timeout = cfg.request_timeout;
    let per_client: Arc<std::sync::Mutex<HashMap<[u8; 32], usize>>> = Arc::default();
    let server = Arc::new(api::Server::new(cfg, state, audit.clone(), audit_key_id));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("panseal-keyd")
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let bound = listener.local_addr().map_err(|e| e.to_string())?;
        println!(
            "panseal-keyd listening on {bound} for {} (sealed, state generation {generation})",
            environments.join(", ")
        );
        let _ = std::io::stdout().flush();
        // Once a second: sync the log and export its anchor if it grew.
        let anchor_task = {
            let audit = audit.clone();
            let server = Arc::clone(&server);
            async move {
                let mut last = 0;
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let n = audit.summary().records;
                    // Not while the state is version 1: an audit anchor
                    // marks a data directory where version 2 ran.
                    if n != last && server.state_version() != seal::V1 {
                        let (audit, path) = (audit.clone(), anchor_path.clone());
                        let r =
                            tokio::task::spawn_blocking(move || audit.write_anchor(&path)).await;
                        match r {
                            Ok(Ok(s)) => last = s.records,
                            Ok(Err(e)) => eprintln!("panseal-keyd: audit anchor: {e}"),
                            Err(_) => {}
                        }
                    }
                }
            }
        };
        let accept = async {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("panseal-keyd: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // Over the connection limit: close at once.
                let Ok(permit) = limit.clone().try_acquire_owned() else {
                    drop(tcp);
                    continue;
                };
                let tls = tls.clone();
                let server = Arc::clone(&server);
                let per_client = per_client.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let _ = tcp.set_nodelay(true);
                    let stream = match tokio::time::timeout(timeout, tls.accept(tcp)).await {
                        Ok(Ok(s)) => s,
                        _ => return,
                    };
                    let cert = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| <[u8; 32]>::from(Sha256::digest(c.as_ref())));
                    // Per client: a certificate, or the peer address.
                    let client_key = cert
                        .unwrap_or_else(|| Sha256::digest(peer.ip().to_string().as_bytes()).into());
                    {
                        let mut m = per_client.lock().unwrap_or_else(|e| e.into_inner());
                        let n = m.entry(client_key).or_insert(0);
                        if *n >= per_client_max {
                            return;
                        }
                        *n += 1;
                    }
                    let svc = service_fn(move |req| {
                        let server = Arc::clone(&server);
                        async move { Ok::<_, Infallible>(server.handle(cert, peer, req).await) }
                    });
                    // Header and (in `handle`) body deadlines: a silent or
                    // trickling client cannot hold a connection for long.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(timeout)
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                    let mut m = per_client.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(n) = m.get_mut(&client_key) {
                        *n -= 1;
                        if *n == 0 {
                            m.remove(&client_key);
                        }
                    }
                });
            }
        };
        tokio::select! {
            () = accept => Ok(()),
            () = anchor_task => Ok(()),
            _ = tokio::signal::ctrl_c() => {
                let _ = audit.append(&api::system_record("stop", "stopping".into()));
                if server.state_version() != seal::V1 {
                    let _ = audit.write_anchor(server.config().audit_anchor_path());
                }
                println!("panseal-keyd: stopping");
                Ok(())
            }
        }
    })
}
