//! `panseal-keyd custodian ACTION`: the custodians' client (acknowledge,
//! collect a share, unseal, seal, KEK / blind-index / ingest key
//! lifecycle), a thin layer over `RemoteKeyService`. Shares are read from
//! and written to files and never printed. Each operation returns what the
//! command prints (pretty JSON of keyd's answer, or a sentence).

use std::future::Future;
use std::path::{Path, PathBuf};

use panseal::keyd::server::protocol::ShareText;
use panseal::{
    Environment, KeyId, KeyPurpose, KeyRequest, KeyService, KeyServiceError, KeyState,
    RemoteKeyService, Scope,
};
use zeroize::Zeroizing;

/// The statement recorded when `--statement` is not given.
pub(crate) const DEFAULT_STATEMENT: &str = "I acknowledge my responsibilities as a key custodian \
of panseal-keyd: I keep my unseal share secret and apart from the other shares, I never copy or \
disclose it, I use it only to unseal this service, and I report any suspected compromise at once \
(PCI DSS 3.7.8).";

/// How to reach keyd and who the custodian is.
pub(crate) struct Connection<'a> {
    /// `HOST:PORT` of keyd.
    pub(crate) address: &'a str,
    /// The name keyd's certificate is checked against, if not the host.
    pub(crate) server_name: Option<&'a str>,
    /// The CA that signed keyd's certificate.
    pub(crate) ca: &'a Path,
    /// The custodian's certificate.
    pub(crate) cert: &'a Path,
    /// The custodian's private key.
    pub(crate) key: &'a Path,
    /// The environment the custodian acts in.
    pub(crate) environment: &'a str,
}

/// Which lifecycle step of a blind-index or ingest key.
#[derive(Clone, Copy)]
pub(crate) enum Step {
    /// Create the next version.
    Create,
    /// List the versions (public parts only).
    List,
    /// Make a version decrypt-only.
    Retire,
    /// Destroy a version.
    Destroy,
}

/// A connected custodian client.
pub(crate) struct Session {
    client: RemoteKeyService,
    rt: tokio::runtime::Runtime,
    environment: String,
    cert: PathBuf,
}

fn err(e: KeyServiceError) -> String {
    e.to_string()
}

fn scope(s: &str) -> Result<Scope, String> {
    Scope::new(s).map_err(|e| e.to_string())
}

impl Session {
    /// Builds the client (mutual TLS to `c.address`).
    ///
    /// # Errors
    /// Unreadable certificates or keys, a bad address.
    pub(crate) fn connect(c: &Connection<'_>) -> Result<Session, String> {
        let mut b = RemoteKeyService::builder()
            .address(c.address)
            .ca_pem_file(c.ca.to_owned())
            .client_identity_pem_files(c.cert.to_owned(), c.key.to_owned())
            .environment(c.environment);
        if let Some(n) = c.server_name {
            b = b.server_name(n);
        }
        let client = b.build().map_err(|e| e.to_string())?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Session {
            client,
            rt,
            environment: c.environment.to_owned(),
            cert: c.cert.to_owned(),
        })
    }

    fn answer<T: serde::Serialize>(
        &self,
        f: impl Future<Output = Result<T, KeyServiceError>>,
    ) -> Result<String, String> {
        Ok(json(&self.rt.block_on(f).map_err(err)?))
    }

    /// `status`: what keyd says about itself and this custodian.
    pub(crate) fn status(&self) -> Result<String, String> {
        self.answer(self.client.status())
    }

    /// `acknowledge`: records the custodian's statement (or the default).
    pub(crate) fn acknowledge(&self, statement: Option<&str>) -> Result<String, String> {
        self.answer(
            self.client
                .acknowledge(statement.unwrap_or(DEFAULT_STATEMENT)),
        )
    }

    /// `unseal`: submits the share in `share_file`.
    pub(crate) fn unseal(
        &self,
        share_file: &Path,
        expect_generation: Option<u64>,
    ) -> Result<String, String> {
        let share = read_share(share_file)?;
        self.answer(self.client.unseal_expecting(share, expect_generation))
    }

    /// `collect-share` (during `init`): writes this custodian's share to a
    /// new file only this user can read; never printed.
    pub(crate) fn collect_share(
        &self,
        share_file: &Path,
        statement: Option<&str>,
    ) -> Result<String, String> {
        // Who keyd takes this certificate for: a custodian checks this
        // fingerprint against their entry in keyd.toml (README
        // "Custodians").
        let fingerprint = crate::certs::fingerprint_file(&self.cert)?;
        let (known_as, r) = self.rt.block_on(async {
            let known_as = self.client.status().await.map_err(err)?.principal;
            let r = self.client.collect_share(statement).await.map_err(err)?;
            Ok::<_, String>((known_as, r))
        })?;
        write_share(share_file, r.share.expose_secret())?;
        Ok(format!(
            "keyd authenticated certificate SHA-256 {fingerprint} as principal \
             {known_as:?}: check that keyd.toml gives this principal exactly this \
             certificate (`panseal-keyd fingerprint`)\n\
             share written to {} (keep it secret, apart from the other shares); \
             still to collect: {}",
            share_file.display(),
            if r.awaiting_collection.is_empty() {
                "nobody".to_owned()
            } else {
                r.awaiting_collection.join(", ")
            }
        ))
    }

    /// `reshare`: a new `threshold`-of-`custodians` split of the master key.
    pub(crate) fn reshare(
        &self,
        threshold: u8,
        custodians: &[String],
        share_file: &Path,
    ) -> Result<String, String> {
        let share = read_share(share_file)?;
        self.answer(self.client.reshare(threshold, custodians, share))
    }

    /// `seal`: keyd forgets its master key.
    pub(crate) fn seal(&self) -> Result<String, String> {
        self.answer(self.client.seal())
    }

    /// `kek-status`.
    pub(crate) fn kek_status(&self, s: &str) -> Result<String, String> {
        self.answer(self.client.kek_status(&scope(s)?))
    }

    /// `rotate`: a new KEK version becomes active.
    pub(crate) fn rotate(&self, s: &str) -> Result<String, String> {
        self.answer(self.client.rotate(&scope(s)?))
    }

    /// `retire`: a KEK version becomes decrypt-only.
    pub(crate) fn retire(&self, s: &str, version: u32) -> Result<String, String> {
        self.answer(self.client.retire(&scope(s)?, version))
    }

    /// `approve-destroy`: this custodian's approval to destroy a KEK version.
    pub(crate) fn approve_destroy(&self, s: &str, version: u32) -> Result<String, String> {
        self.answer(self.client.approve_destroy(&scope(s)?, version))
    }

    /// `withdraw`: takes back an approval to destroy a KEK version.
    pub(crate) fn withdraw(&self, s: &str, version: u32) -> Result<String, String> {
        self.answer(self.client.withdraw_destroy(&scope(s)?, version))
    }

    fn dek(&self, key_id: &str, s: &str, purpose: KeyPurpose) -> Result<KeyRequest, String> {
        Ok(KeyRequest {
            id: KeyId::from_hex(key_id).map_err(|e| e.to_string())?,
            scope: scope(s)?,
            environment: Environment::new(&self.environment).map_err(|e| e.to_string())?,
            purpose,
        })
    }

    /// `approve-destroy-dek`: this custodian's approval to destroy a DEK.
    pub(crate) fn approve_destroy_dek(
        &self,
        key_id: &str,
        s: &str,
        purpose: KeyPurpose,
    ) -> Result<String, String> {
        let dek = self.dek(key_id, s, purpose)?;
        self.answer(self.client.approve_dek_destroy(&dek))
    }

    /// `withdraw-dek`: takes back an approval to destroy a DEK.
    pub(crate) fn withdraw_dek(
        &self,
        key_id: &str,
        s: &str,
        purpose: KeyPurpose,
    ) -> Result<String, String> {
        let dek = self.dek(key_id, s, purpose)?;
        self.answer(self.client.withdraw_dek_destroy(&dek))
    }

    /// `index-*`: blind-index keys are created and kept inside keyd; only
    /// their version, state and date are ever shown.
    pub(crate) fn index(&self, step: Step, s: &str, version: u32) -> Result<String, String> {
        let s = scope(s)?;
        match step {
            Step::Create => self.answer(self.client.create_index_key(&s)),
            Step::List => self.answer(self.client.index_keys(&s)),
            Step::Retire | Step::Destroy => {
                self.rt
                    .block_on(self.client.set_index_key_state(&s, version, state(step)))
                    .map_err(err)?;
                self.answer(self.client.index_keys(&s))
            }
        }
    }

    /// `ingest-*`: ingest (HPKE) key pairs; the private scalar stays
    /// inside keyd; the public key, version, state and date are shown.
    pub(crate) fn ingest(&self, step: Step, s: &str, version: u32) -> Result<String, String> {
        let s = scope(s)?;
        match step {
            Step::Create => self.answer(self.client.create_ingest_key(&s)),
            Step::List => self.answer(self.client.ingest_keys(&s)),
            Step::Retire | Step::Destroy => {
                self.rt
                    .block_on(self.client.set_ingest_key_state(&s, version, state(step)))
                    .map_err(err)?;
                self.answer(self.client.ingest_keys(&s))
            }
        }
    }
}

fn state(step: Step) -> KeyState {
    match step {
        Step::Retire => KeyState::DecryptOnly,
        _ => KeyState::Destroyed,
    }
}

fn read_share(path: &Path) -> Result<ShareText, String> {
    let text = Zeroizing::new(
        std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?,
    );
    Ok(ShareText::new(text.trim().to_owned()))
}

fn write_share(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.write_all(b"\n"))
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Pretty JSON of an answer.
fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}
