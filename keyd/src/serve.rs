//! `panseal-keyd serve`: opens the state and the audit log (refusing a
//! rolled-back state or a log that does not reach its anchors) and serves
//! the protocol over mutual TLS, sealed until custodians unseal it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use panseal::{read_audit_anchor, AuditError, AuditKey, ChainedAuditLog};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::config::{self, Config};
use crate::state::{self, StateStore};
use crate::{api, seal, tls};

/// Serves until interrupted (`listen` overrides the configured address).
pub(crate) fn run(config: &Path, listen: Option<SocketAddr>) -> Result<(), String> {
    run_with(config, listen, None)
}

/// As [`run`], calling `on_listening` once the server accepts connections.
pub(crate) fn run_with(
    config: &Path,
    listen: Option<SocketAddr>,
    on_listening: Option<crate::init::OnListening>,
) -> Result<(), String> {
    let mut cfg = Config::load(config).map_err(|e| e.to_string())?;
    if let Some(l) = listen {
        cfg.listen = l;
    }
    let state =
        StateStore::open_with(&cfg.paths(), |s| same_keyd(&cfg, s)).map_err(|e| e.to_string())?;
    let (audit, audit_key_id) = open_audit(&cfg, &state)?;
    let audit = Arc::new(audit);
    let tls = TlsAcceptor::from(Arc::new(tls::server_config(&cfg)?));
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
        if let Some(f) = on_listening {
            f(bound);
        }
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
            () = shutdown_signal() => {
                let _ = audit.append(&api::system_record("stop", "stopping".into()));
                if server.state_version() != seal::V1 {
                    let _ = audit.write_anchor(server.config().audit_anchor_path());
                }
                // Not println!: a closed stdout must not turn a clean stop
                // into a panic.
                let _ = writeln!(std::io::stdout(), "panseal-keyd: stopping");
                Ok(())
            }
        }
    })
}

/// Refuses another keyd's state, audit key or anchors in this keyd's
/// place: the state names its audit key by id, and the exported audit
/// anchor is MACed under that key. (A missing or unreadable key or anchor
/// is left to `open_audit`, which names it.)
fn same_keyd(cfg: &Config, s: &crate::state_file::State) -> Result<(), state::StateError> {
    if s.audit_key_id.is_empty() {
        return Ok(()); // version 1: names no audit key
    }
    let key_path = cfg.audit_key_path();
    let Ok(key) = AuditKey::load_file(&key_path) else {
        return Ok(());
    };
    let key_id = key.key_id();
    let state_path = cfg.paths().state;
    if s.audit_key_id != key_id {
        return Err(state::StateError::OtherKeyd(format!(
            "the state {} names audit key {}, but the audit key file {} holds {} (not the key \
             this keyd's state names: the data directory and the audit key come from \
             different keyds, or the key was replaced)",
            state_path.display(),
            s.audit_key_id,
            key_path.display(),
            key_id
        )));
    }
    let anchor = cfg.audit_anchor_path();
    match read_audit_anchor(&anchor, &key) {
        Ok(_) | Err(AuditError::Io(_)) => Ok(()),
        Err(_) => Err(state::StateError::OtherKeyd(format!(
            "the audit anchor {} does not verify under audit key {} (the key the state {} \
             names): the anchor directory comes from another keyd (or was altered)",
            anchor.display(),
            key_id,
            state_path.display()
        ))),
    }
}

/// Ctrl-C (SIGINT) or, on Unix, SIGTERM: `serve` stops cleanly (a "stop"
/// audit record and the anchor exported).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
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
