//! A SoftHSM2 set up by the tests themselves: a temporary token directory,
//! a `SOFTHSM2_CONF` pointing at it, and tokens initialized with
//! `softhsm2-util`. A missing SoftHSM2 is a test failure, never a skip
//! (`scripts/setup.sh` installs the Debian package `softhsm2`).

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub const PIN: &str = "panseal-user-pin-0815";
pub const SO_PIN: &str = "panseal-so-pin-4711";

pub struct SoftHsm {
    _dir: tempfile::TempDir,
    pub conf: PathBuf,
    pub module: PathBuf,
    /// Token label → its directory under the token directory.
    pub token_dirs: HashMap<String, PathBuf>,
}

static HSM: OnceLock<SoftHsm> = OnceLock::new();

/// Every token the modules of the `it` test binary use. SoftHSM2 is set up
/// once per process, by whichever test comes first, so it creates all of
/// them (plus any other label the first caller asks for).
pub const TOKENS: &[&str] = &["main", "pins", "ingest", "conformance", "reindex"];

/// PKCS#11 tests run one at a time across the whole test binary: SoftHSM2
/// 2.6 fails `C_GenerateKey` of token objects now and then while other
/// sessions of the process log in and out, the module is initialized and
/// finalized process-wide, and the conformance suite's outage step stalls
/// the module.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The module: `PANSEAL_PKCS11_MODULE` if set, else where Debian and the
/// upstream build install it.
pub fn module_path() -> PathBuf {
    if let Some(p) = std::env::var_os("PANSEAL_PKCS11_MODULE") {
        return PathBuf::from(p);
    }
    for p in [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/local/lib/softhsm/libsofthsm2.so",
    ] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!(
        "SoftHSM2 is not installed (no libsofthsm2.so found): run `bash scripts/setup.sh` \
         (Debian package softhsm2) or set PANSEAL_PKCS11_MODULE"
    );
}

/// Initializes (once per test process) a SoftHSM2 with one token per label
/// in [`TOKENS`] and `labels`, all with [`PIN`]. Must run before the module
/// is loaded.
pub fn softhsm(labels: &[&str]) -> &'static SoftHsm {
    let hsm = HSM.get_or_init(|| {
        let mut labels_all: Vec<&str> = TOKENS.to_vec();
        for label in labels {
            if !labels_all.contains(label) {
                labels_all.push(label);
            }
        }
        let labels = &labels_all;
        let module = module_path();
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).unwrap();
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap();
        // Before any thread loads the module (it reads the variable at
        // C_Initialize); every test in the binary goes through here first.
        std::env::set_var("SOFTHSM2_CONF", &conf);
        let mut token_dirs = HashMap::new();
        for label in labels {
            let before: Vec<PathBuf> = list(&tokens);
            let out = Command::new("softhsm2-util")
                .env("SOFTHSM2_CONF", &conf)
                .args(["--init-token", "--free", "--label", label])
                .args(["--pin", PIN, "--so-pin", SO_PIN])
                .output()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot run softhsm2-util ({e}): run `bash scripts/setup.sh` \
                         (Debian package softhsm2)"
                    )
                });
            assert!(
                out.status.success(),
                "softhsm2-util --init-token failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let new: Vec<PathBuf> = list(&tokens)
                .into_iter()
                .filter(|p| !before.contains(p))
                .collect();
            assert_eq!(new.len(), 1, "one new token directory per token");
            token_dirs.insert(label.to_string(), new[0].clone());
        }
        SoftHsm {
            _dir: dir,
            conf,
            module,
            token_dirs,
        }
    });
    for label in labels {
        assert!(
            hsm.token_dirs.contains_key(*label),
            "token {label} was not set up: add it to softhsm::TOKENS"
        );
    }
    hsm
}

fn list(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect()
}
