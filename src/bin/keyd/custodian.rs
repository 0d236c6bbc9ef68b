//! `panseal-keyd custodian ACTION`: the custodians' command-line client
//! (acknowledge, unseal, seal, KEK lifecycle), a thin layer over
//! `RemoteKeyService`. Shares are read from a file and never printed.

use std::path::PathBuf;

use panseal::keyd::protocol::ShareText;
use panseal::{KeyServiceError, RemoteKeyService, Scope};
use zeroize::Zeroizing;

use crate::Args;

/// The statement recorded when `--statement` is not given.
pub(crate) const DEFAULT_STATEMENT: &str = "I acknowledge my responsibilities as a key custodian \
of panseal-keyd: I keep my unseal share secret and apart from the other shares, I never copy or \
disclose it, I use it only to unseal this service, and I report any suspected compromise at once \
(PCI DSS 3.7.8).";

pub(crate) const ACTIONS: &str =
    "status | acknowledge | unseal | seal | kek-status | rotate | retire | approve-destroy";

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
                let path = args.need("share-file")?;
                let text = Zeroizing::new(
                    std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?,
                );
                let share = ShareText::new(text.trim().to_owned());
                json(&client.unseal(share).await.map_err(err)?)
            }
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
            other => return Err(format!("unknown custodian action {other:?}: {ACTIONS}")),
        })
    })?;
    println!("{out}");
    Ok(())
}

/// Pretty JSON of an answer.
fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}
