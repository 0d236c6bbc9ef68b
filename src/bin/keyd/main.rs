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
//! panseal-keyd init --config FILE --threshold K --custodian NAME... --share-dir DIR
//! panseal-keyd serve --config FILE [--listen IP:PORT]
//! panseal-keyd verify-audit (--config FILE | --log FILE --key FILE)
//! panseal-keyd fingerprint CERT.pem
//! panseal-keyd custodian ACTION --address HOST:PORT --ca CA.pem --cert ME.pem
//!     --key ME.key.pem --environment ENV [--server-name NAME] [--scope S]
//!     [--version N] [--share-file FILE] [--statement TEXT]
//! ```

#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod api;
mod certs;
mod config;
mod custodian;
mod seal;
mod state;

use std::convert::Infallible;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use panseal::keyd::protocol::Permission;
use panseal::{verify_audit_chain, AuditError, AuditKey, ChainedAuditLog};
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::config::Config;
use crate::state::{CustodianShare, State, StateStore};

const USAGE: &str = "usage:
  panseal-keyd gen-dev-certs --out DIR [--client NAME]... [--host NAME]...
  panseal-keyd init --config FILE --threshold K --custodian NAME... --share-dir DIR
  panseal-keyd serve --config FILE [--listen IP:PORT]
  panseal-keyd verify-audit (--config FILE | --log FILE --key FILE)
  panseal-keyd fingerprint CERT.pem
  panseal-keyd custodian ACTION --address HOST:PORT --ca CA.pem --cert ME.pem --key ME.key.pem
      --environment ENV [--server-name NAME] [--scope S] [--version N]
      [--share-file FILE] [--statement TEXT]
    ACTION: status | acknowledge | unseal | seal | kek-status | rotate | retire | approve-destroy";

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

fn main() -> ExitCode {
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
    args.check(&["config", "threshold", "custodian", "share-dir"])?;
    let cfg = load_config(args)?;
    let threshold: u8 = args
        .need("threshold")?
        .parse()
        .map_err(|_| "--threshold must be a number from 2 to 255")?;
    let custodians = args.all("custodian");
    let share_dir = PathBuf::from(args.need("share-dir")?);
    let n = custodians.len();
    if threshold < 2 || usize::from(threshold) > n || n > 255 {
        return Err(format!(
            "need 2 <= threshold <= custodians <= 255 (split knowledge); got {threshold} of {n}"
        ));
    }
    for (i, c) in custodians.iter().enumerate() {
        let p = cfg
            .principal(c)
            .ok_or_else(|| format!("custodian {c:?} is not a principal in the configuration"))?;
        if !p.may(Permission::Custodian) {
            return Err(format!("principal {c:?} lacks the custodian permission"));
        }
        if custodians[..i].contains(c) {
            return Err(format!("custodian {c:?} named twice"));
        }
    }
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|e| format!("{}: {e}", cfg.data_dir.display()))?;
    std::fs::create_dir_all(&share_dir).map_err(|e| format!("{}: {e}", share_dir.display()))?;
    if cfg.state_path().exists() {
        return Err(format!(
            "{} exists: this server is initialised already",
            cfg.state_path().display()
        ));
    }
    let (master, key) = seal::MasterKey::generate();
    let shares = seal::split(&key, threshold, n as u8);
    drop(key);
    let salt = seal::new_salt();
    let state = State {
        threshold,
        share_salt: salt.clone(),
        master_check: master.check_value(),
        shares: custodians
            .iter()
            .zip(&shares)
            .map(|(c, (x, _, bytes))| CustodianShare {
                custodian: c.clone(),
                x: *x,
                check: seal::share_check(&salt, bytes),
            })
            .collect(),
        acknowledgements: Vec::new(),
        keks: Vec::new(),
        generation: 0,
    };
    for (c, (_, text, _)) in custodians.iter().zip(&shares) {
        let path = share_dir.join(format!("{c}.share"));
        let mut opts = OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.write_all(b"\n"))
            .and_then(|()| f.sync_all())
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let audit_key = AuditKey::create_file(cfg.audit_key_path()).map_err(|e| e.to_string())?;
    StateStore::create(&cfg.state_path(), &state).map_err(|e| e.to_string())?;
    let log = ChainedAuditLog::open(cfg.audit_path(), audit_key).map_err(|e| e.to_string())?;
    log.append(&api::system_record(
        "init",
        format!(
            "master key split {threshold}-of-{n} among {}",
            custodians.join(", ")
        ),
    ))
    .and_then(|_| log.sync())
    .map_err(|e| e.to_string())?;
    println!(
        "initialised {}: {threshold}-of-{n} shares written to {} (hand each to its custodian and delete them here)",
        cfg.data_dir.display(),
        share_dir.display()
    );
    Ok(())
}

fn verify_audit(args: &Args) -> ExitCode {
    let paths = || -> Result<(PathBuf, PathBuf), String> {
        args.check(&["config", "log", "key"])?;
        if args.one("config").is_some() {
            let cfg = load_config(args)?;
            Ok((cfg.audit_path(), cfg.audit_key_path()))
        } else {
            Ok((
                PathBuf::from(args.need("log")?),
                PathBuf::from(args.need("key")?),
            ))
        }
    };
    let (log, key) = match paths() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("panseal-keyd: {e}");
            return ExitCode::from(2);
        }
    };
    let key = match AuditKey::load_file(&key) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("panseal-keyd: audit key {}: {e}", key.display());
            return ExitCode::from(2);
        }
    };
    match verify_audit_chain(&log, &key) {
        Ok(s) => {
            println!(
                "audit log {} verifies: {} records, head {}",
                log.display(),
                s.records,
                s.head
            );
            ExitCode::SUCCESS
        }
        Err(e @ AuditError::Tampered { .. }) => {
            println!("audit log {}: {e}", log.display());
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("panseal-keyd: {}: {e}", log.display());
            ExitCode::from(2)
        }
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

fn serve(args: &Args) -> Result<(), String> {
    args.check(&["config", "listen"])?;
    let mut cfg = load_config(args)?;
    if let Some(l) = args.one("listen") {
        cfg.listen = l
            .parse()
            .map_err(|_| format!("--listen {l:?} is not ip:port"))?;
    }
    let state = StateStore::open(&cfg.state_path()).map_err(|e| e.to_string())?;
    let audit_key = AuditKey::load_file(cfg.audit_key_path())
        .map_err(|e| format!("audit key {}: {e}", cfg.audit_key_path().display()))?;
    let audit = ChainedAuditLog::open(cfg.audit_path(), audit_key).map_err(|e| {
        format!(
            "audit log {}: {e}; refusing to start",
            cfg.audit_path().display()
        )
    })?;
    let tls = TlsAcceptor::from(Arc::new(tls_config(&cfg)?));
    let listen = cfg.listen;
    let environments: Vec<String> = cfg.environments.iter().cloned().collect();
    audit
        .append(&api::system_record(
            "start",
            format!("listening on {listen}, sealed"),
        ))
        .map_err(|e| e.to_string())?;
    let server = Arc::new(api::Server::new(cfg, state, audit));
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
            "panseal-keyd listening on {bound} for {} (sealed)",
            environments.join(", ")
        );
        let _ = std::io::stdout().flush();
        let accept =
            async {
                loop {
                    let (tcp, peer) = match listener.accept().await {
                        Ok(c) => c,
                        Err(e) => {
                            eprintln!("panseal-keyd: accept: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let tls = tls.clone();
                    let server = Arc::clone(&server);
                    tokio::spawn(async move {
                        let _ = tcp.set_nodelay(true);
                        let stream =
                            match tokio::time::timeout(Duration::from_secs(10), tls.accept(tcp))
                                .await
                            {
                                Ok(Ok(s)) => s,
                                _ => return,
                            };
                        let cert = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .map(|c| <[u8; 32]>::from(Sha256::digest(c.as_ref())));
                        let svc = service_fn(move |req| {
                            let server = Arc::clone(&server);
                            async move { Ok::<_, Infallible>(server.handle(cert, peer, req).await) }
                        });
                        // The timer enables hyper's header-read timeout
                        // (30 s): a silent client cannot hold a task forever.
                        let _ = hyper::server::conn::http1::Builder::new()
                            .timer(hyper_util::rt::TokioTimer::new())
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            };
        tokio::select! {
            () = accept => Ok(()),
            _ = tokio::signal::ctrl_c() => {
                println!("panseal-keyd: stopping");
                Ok(())
            }
        }
    })
}
