//! `panseal-keyd custodian ACTION`: the custodians' command-line client
//! (acknowledge, unseal, seal, KEK lifecycle), a thin layer over
//! `RemoteKeyService`. Shares are read from a file and never printed.

use std::path::PathBuf;

use panseal::keyd::server::protocol::ShareText;
use panseal::{
    Environment, KeyId, KeyPurpose, KeyRequest, KeyService, KeyServiceError, KeyState,
    RemoteKeyService, Scope,
};
use zeroize::Zeroizing;

use crate::Args;

/// The statement recorded when `--statement` is not given.
pub(crate) const DEFAULT_STATEMENT: &str = "I acknowledge my responsibilities as a key custodian \
of panseal-keyd: I keep my unseal share secret and apart from the other shares, I never copy or \
disclose it, I use it only to unseal this service, and I report any suspected compromise at once \
(PCI DSS 3.7.8).";

pub(crate) const ACTIONS: &str = "status | acknowledge | collect-share | unseal | seal | \
kek-status | rotate | retire | approve-destroy | approve-destroy-dek | withdraw | withdraw-dek | reshare | \
index-create | index-list | index-retire | index-destroy | \
ingest-create | ingest-list | ingest-retire | ingest-destroy";

pub(crate) fn run(action: &str, args: &Args) -> Result<(), String> {
    args.check(&[
        "address",
        "server-name",
        "ca",
        "cert",
        "key",
        "environment",
        "scope",
        "version",
        "share-file",
        "statement",
        "expect-generation",
        "key-id",
        "purpose",
        "threshold",
        "custodian",
    ])?;
    let mut b = RemoteKeyService::builder()
        .address(&args.need("address")?)
        .ca_pem_file(PathBuf::from(args.need("ca")?))
        .client_identity_pem_files(
            PathBuf::from(args.need("cert")?),
            PathBuf::from(args.need("key")?),
        )
        .environment(&args.need("environment")?);
    if let Some(n) = args.one("server-name") {
        b = b.server_name(&n);
    }
    let client = b.build().map_err(|e| e.to_string())?;
    let scope =
        || -> Result<Scope, String> { Scope::new(&args.need("scope")?).map_err(|e| e.to_string()) };
    let version = || -> Result<u32, String> {
        args.need("version")?
            .parse()
            .map_err(|_| "--version must be a number".to_owned())
    };
    let dek = || -> Result<KeyRequest, String> {
        let id = KeyId::from_hex(&args.need("key-id")?).map_err(|e| e.to_string())?;
        let purpose = match args.one("purpose").as_deref() {
            None | Some("data") => KeyPurpose::Data,
            Some("index") => KeyPurpose::Index,
            Some(o) => return Err(format!("--purpose {o:?}: data or index")),
        };
        Ok(KeyRequest {
            id,
            scope: scope()?,
            environment: Environment::new(&args.need("environment")?).map_err(|e| e.to_string())?,
            purpose,
        })
    };
    let read_share = || -> Result<ShareText, String> {
        let path = args.need("share-file")?;
        let text =
            Zeroizing::new(std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?);
        Ok(ShareText::new(text.trim().to_owned()))
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let err = |e: KeyServiceError| e.to_string();
    let out = rt.block_on(async {
        Ok::<String, String>(match action {
            "status" => json(&client.status().await.map_err(err)?),
            "acknowledge" => {
                let statement = args
                    .one("statement")
                    .unwrap_or_else(|| DEFAULT_STATEMENT.to_owned());
                json(&client.acknowledge(&statement).await.map_err(err)?)
            }
            "unseal" => {
                let expected = match args.one("expect-generation") {
                    Some(g) => Some(
                        g.parse::<u64>()
                            .map_err(|_| "--expect-generation must be a number".to_owned())?,
                    ),
                    None => None,
                };
                json(
                    &client
                        .unseal_expecting(read_share()?, expected)
                        .await
                        .map_err(err)?,
                )
            }
            "collect-share" => {
                // Written to a new file only this user can read; never printed.
                let path = args.need("share-file")?;
                // With --statement, the acknowledgement is recorded too.
                let statement = args.one("statement");
                // Who keyd takes this certificate for: a custodian checks
                // this fingerprint against their entry in keyd.toml
                // (README "Custodians").
                let fingerprint = cert_fingerprint(&args.need("cert")?)?;
                let known_as = client.status().await.map_err(err)?.principal;
                let r = client
                    .collect_share(statement.as_deref())
                    .await
                    .map_err(err)?;
                write_share(&path, r.share.expose_secret())?;
                format!(
                    "keyd authenticated certificate SHA-256 {fingerprint} as principal \
                     {known_as:?}: check that keyd.toml gives this principal exactly this \
                     certificate (`panseal-keyd fingerprint`)\n\
                     share written to {path} (keep it secret, apart from the other shares); \
                     still to collect: {}",
                    if r.awaiting_collection.is_empty() {
                        "nobody".to_owned()
                    } else {
                        r.awaiting_collection.join(", ")
                    }
                )
            }
            "reshare" => {
                let threshold: u8 = args
                    .need("threshold")?
                    .parse()
                    .map_err(|_| "--threshold must be a number".to_owned())?;
                json(
                    &client
                        .reshare(threshold, &args.all("custodian"), read_share()?)
                        .await
                        .map_err(err)?,
                )
            }
            "approve-destroy-dek" => json(&client.approve_dek_destroy(&dek()?).await.map_err(err)?),
            "withdraw" => json(
                &client
                    .withdraw_destroy(&scope()?, version()?)
                    .await
                    .map_err(err)?,
            ),
            "withdraw-dek" => json(&client.withdraw_dek_destroy(&dek()?).await.map_err(err)?),
            "seal" => json(&client.seal().await.map_err(err)?),
            "kek-status" => json(&client.kek_status(&scope()?).await.map_err(err)?),
            "rotate" => json(&client.rotate(&scope()?).await.map_err(err)?),
            "retire" => json(&client.retire(&scope()?, version()?).await.map_err(err)?),
            "approve-destroy" => json(
                &client
                    .approve_destroy(&scope()?, version()?)
                    .await
                    .map_err(err)?,
            ),
            // Blind-index keys: created and kept inside keyd; only their
            // version, state and date are ever shown.
            "index-create" => json(&client.create_index_key(&scope()?).await.map_err(err)?),
            "index-list" => json(&client.index_keys(&scope()?).await.map_err(err)?),
            "index-retire" | "index-destroy" => {
                let to = if action == "index-retire" {
                    KeyState::DecryptOnly
                } else {
                    KeyState::Destroyed
                };
                let s = scope()?;
                client
                    .set_index_key_state(&s, version()?, to)
                    .await
                    .map_err(err)?;
                json(&client.index_keys(&s).await.map_err(err)?)
            }
            // Ingest (HPKE) key pairs: the private scalar stays inside
            // keyd; the public key, version, state and date are shown.
            "ingest-create" => json(&client.create_ingest_key(&scope()?).await.map_err(err)?),
            "ingest-list" => json(&client.ingest_keys(&scope()?).await.map_err(err)?),
            "ingest-retire" | "ingest-destroy" => {
                let to = if action == "ingest-retire" {
                    KeyState::DecryptOnly
                } else {
                    KeyState::Destroyed
                };
                let s = scope()?;
                client
                    .set_ingest_key_state(&s, version()?, to)
                    .await
                    .map_err(err)?;
                json(&client.ingest_keys(&s).await.map_err(err)?)
            }
            other => return Err(format!("unknown custodian action {other:?}: {ACTIONS}")),
        })
    })?;
    println!("{out}");
    Ok(())
}

/// SHA-256 of the first certificate in a PEM file, hex (as `panseal-keyd
/// fingerprint` prints it).
fn cert_fingerprint(path: &str) -> Result<String, String> {
    use rustls_pki_types::pem::PemObject;
    use sha2::Digest;
    let der = rustls_pki_types::CertificateDer::from_pem_file(path)
        .map_err(|e| format!("{path}: {e}"))?;
    Ok(hex::encode(sha2::Sha256::digest(der.as_ref())))
}

fn write_share(path: &str, text: &str) -> Result<(), String> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path).map_err(|e| format!("{path}: {e}"))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.write_all(b"\n"))
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("{path}: {e}"))
}

/// Pretty JSON of an answer.
fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}
