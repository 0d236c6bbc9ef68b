//! Starts real `panseal-keyd` processes on 127.0.0.1 (random free port,
//! temporary folder) for the tests and benchmark; killed on drop.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use panseal::keyd::ShareText;
use panseal::RemoteKeyService;

/// The `panseal-keyd` binary of this build: `PANSEAL_KEYD_BIN`, else the
/// one beside the test binary's folder (`target/<profile>/panseal-keyd`,
/// built by `cargo test --workspace` or `cargo build -p panseal-keyd`).
pub fn keyd_bin() -> &'static Path {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("PANSEAL_KEYD_BIN") {
            return PathBuf::from(p);
        }
        // panseal-keyd's own tests and benches.
        if let Some(p) = option_env!("CARGO_BIN_EXE_panseal-keyd") {
            return PathBuf::from(p);
        }
        let exe = std::env::current_exe().expect("current_exe");
        // target/<profile>/deps/<test> or target/<profile>/examples/<x>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>");
        let bin = profile_dir.join("panseal-keyd");
        assert!(
            bin.exists(),
            "{} not found: build it first with `cargo build -p panseal-keyd` \
             (scripts/test.sh does), or set PANSEAL_KEYD_BIN",
            bin.display()
        );
        bin
    })
}

/// Principals of the test configuration: (name, environment, scopes,
/// permissions, quota).
const PRINCIPALS: &[(&str, &str, &str, &str, &str)] = &[
    (
        "app",
        "test",
        r#"["*"]"#,
        r#"["wrap", "unwrap", "index", "rewrap"]"#,
        "",
    ),
    ("wrapper", "test", r#"["*"]"#, r#"["wrap"]"#, ""),
    ("reader", "test", r#"["*"]"#, r#"["unwrap"]"#, ""),
    ("indexer", "test", r#"["*"]"#, r#"["index"]"#, ""),
    // An encrypt-only front end after issue 10: wrap + keyed hashes.
    (
        "frontend",
        "test",
        r#"["*"]"#,
        r#"["wrap", "index"]"#,
        "index_quota = { window_seconds = 60, hashes = 100000000 }",
    ),
    ("rewrapper", "test", r#"["*"]"#, r#"["rewrap"]"#, ""),
    ("auditor", "test", r#"["*"]"#, r#"["audit-read"]"#, ""),
    ("m1app", "test", r#"["m-1"]"#, r#"["wrap", "unwrap"]"#, ""),
    ("prodapp", "prod", r#"["*"]"#, r#"["wrap", "unwrap"]"#, ""),
    (
        "limited",
        "test",
        r#"["*"]"#,
        r#"["wrap", "unwrap"]"#,
        "quota = { window_seconds = 3600, unwrap_requests = 6, distinct_keys = 3 }",
    ),
    (
        "root",
        "test",
        r#"["*"]"#,
        r#"["wrap", "unwrap", "index", "rewrap", "admit", "custodian"]"#,
        "",
    ),
    ("alice", "test", r#"["*"]"#, r#"["custodian"]"#, ""),
    ("bob", "test", r#"["*"]"#, r#"["custodian"]"#, ""),
    ("carol", "test", r#"["*"]"#, r#"["custodian"]"#, ""),
    ("mallory", "test", r#"["*"]"#, r#"["custodian"]"#, ""),
    // Reveal only, under the default reveal quota (100 records / 1,000
    // requests per hour).
    ("revealer", "test", r#"["*"]"#, r#"["reveal"]"#, ""),
    (
        "clerk",
        "test",
        r#"["*"]"#,
        r#"["reveal"]"#,
        "reveal_quota = { window_seconds = 3600, distinct_records = 3, requests = 5 }",
    ),
    // benches/reveal.rs: a quota the benchmark does not reach.
    (
        "bench-reveal",
        "test",
        r#"["*"]"#,
        r#"["reveal"]"#,
        "reveal_quota = { window_seconds = 3600, distinct_records = 100000, requests = 100000000 }",
    ),
    // tests/breach_drill.rs: the drill's front end, refund tool and
    // settlement job (quotas as its assertions expect).
    (
        "checkout",
        "test",
        r#"["*"]"#,
        r#"["wrap", "index"]"#,
        "index_quota = { window_seconds = 3600, hashes = 3000 }",
    ),
    (
        "refunds",
        "test",
        r#"["*"]"#,
        r#"["reveal"]"#,
        "reveal_quota = { window_seconds = 3600, distinct_records = 25, requests = 1000 }",
    ),
    ("settlement", "test", r#"["*"]"#, r#"["unwrap"]"#, ""),
    // Issue 11 (write-only ingest): the admission job (admit + wrap: it
    // makes the DEKs it seals under with /v1/generate-wrapped), a front end
    // that only fetches ingest public keys, and a reveal credential with a
    // small record quota.
    (
        "admitter",
        "test",
        r#"["*"]"#,
        r#"["admit", "wrap"]"#,
        "admit_quota = { window_seconds = 3600, items = 100000000 }",
    ),
    ("ingest-frontend", "test", r#"["*"]"#, r#"[]"#, ""),
    (
        "opener",
        "test",
        r#"["*"]"#,
        r#"["reveal"]"#,
        "reveal_quota = { window_seconds = 3600, distinct_records = 4, requests = 100 }",
    ),
    (
        "admit-limited",
        "test",
        r#"["*"]"#,
        r#"["admit", "wrap"]"#,
        "admit_quota = { window_seconds = 3600, items = 10 }",
    ),
];

pub const CUSTODIANS: [&str; 3] = ["alice", "bob", "carol"];
pub const ACK: &str = "I acknowledge my responsibilities as a key custodian (PCI DSS 3.7.8).";

pub struct Keyd {
    pub dir: tempfile::TempDir,
    pub addr: String,
    config: String,
    child: Option<Child>,
}

pub fn run(args: &[&str]) -> String {
    let out = Command::new(keyd_bin())
        .args(args)
        .output()
        .expect("run panseal-keyd");
    assert!(
        out.status.success(),
        "panseal-keyd {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Keyd {
    /// A new, initialised (2-of-3) server folder; not started.
    pub fn init() -> Keyd {
        Keyd::init_with("", "")
    }

    /// As [`Keyd::init`], with extra top-level settings and principals
    /// appended to the configuration.
    pub fn init_with(extra_settings: &str, extra_principals: &str) -> Keyd {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        let mut args = vec!["gen-dev-certs", "--out", certs.to_str().unwrap()];
        for (name, ..) in PRINCIPALS {
            args.extend(["--client", name]);
        }
        run(&args);
        let mut cfg = String::from(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\nenvironments = [\"test\", \"prod\"]\n\
             tls_cert = \"certs/server.pem\"\ntls_key = \"certs/server.key.pem\"\n\
             client_ca = \"certs/ca.pem\"\n",
        );
        if !extra_settings.contains("auto_create_scopes") {
            // The suite's scopes are invented per test; production names
            // patterns (README "Scopes and their KEKs").
            cfg.push_str("auto_create_scopes = [\"*\"]\n");
        }
        cfg.push_str(extra_settings);
        for (name, env, scopes, perms, quota) in PRINCIPALS {
            cfg.push_str(&format!(
                "\n[[principal]]\nname = \"{name}\"\ncert = \"certs/{name}.pem\"\n\
                 environment = \"{env}\"\nscopes = {scopes}\npermissions = {perms}\n{quota}\n"
            ));
        }
        cfg.push_str(extra_principals);
        std::fs::write(dir.path().join("keyd.toml"), cfg).unwrap();
        let config = dir.path().join("keyd.toml").to_str().unwrap().to_owned();
        let k = Keyd {
            dir,
            addr: String::new(),
            config,
            child: None,
        };
        k.run_init(2, &CUSTODIANS, &k.path("shares"));
        k
    }

    /// `panseal-keyd init` as a process; each custodian collects their own
    /// share with `custodian collect-share` into `share_dir/NAME.share`
    /// (standing in for each custodian's own machine).
    pub fn run_init(&self, threshold: u8, custodians: &[&str], share_dir: &Path) {
        std::fs::create_dir_all(share_dir).unwrap();
        let t = threshold.to_string();
        let mut args = vec![
            "init",
            "--config",
            self.config_str(),
            "--threshold",
            &t,
            "--listen",
            "127.0.0.1:0",
        ];
        for c in custodians {
            args.extend(["--custodian", c]);
        }
        let mut child = Command::new(keyd_bin())
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        out.read_line(&mut line).unwrap();
        let Some(addr) = line
            .split_whitespace()
            .nth(3)
            .map(|a| a.trim_end_matches(':').to_owned())
        else {
            let o = child.wait_with_output().unwrap();
            panic!(
                "init did not start: {line:?} {}",
                String::from_utf8_lossy(&o.stderr)
            )
        };
        for c in custodians {
            let f = share_dir.join(format!("{c}.share"));
            let (ok, _, err) = self.custodian_cli_at(
                &addr,
                c,
                "collect-share",
                &["--share-file", f.to_str().unwrap()],
            );
            assert!(ok, "{c} collect-share: {err}");
        }
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
        let status = child.wait().unwrap();
        assert!(status.success(), "init failed: {rest}");
    }

    /// Initialised, started and unsealed.
    pub async fn ready() -> Keyd {
        let mut k = Keyd::init();
        k.start();
        k.unseal().await;
        k
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn config_str(&self) -> &str {
        &self.config
    }

    /// Starts the server (sealed) and waits for its address: a random free
    /// port the first time, the same port on restarts.
    pub fn start(&mut self) {
        assert!(self.child.is_none());
        let listen = if self.addr.is_empty() {
            "127.0.0.1:0".to_owned()
        } else {
            self.addr.clone()
        };
        let mut child = Command::new(keyd_bin())
            .args(["serve", "--config", self.config_str(), "--listen", &listen])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .split_whitespace()
            .nth(3)
            .unwrap_or_else(|| panic!("keyd did not start: {line:?}"));
        self.addr = addr.to_owned();
        self.child = Some(child);
    }

    /// Starts the server if it will: `Err(stderr)` when it refuses (an
    /// attacker's test must not hang when the old code lets it start).
    pub fn try_start(&mut self) -> Result<(), String> {
        assert!(self.child.is_none());
        let listen = if self.addr.is_empty() {
            "127.0.0.1:0".to_owned()
        } else {
            self.addr.clone()
        };
        let mut child = Command::new(keyd_bin())
            .args(["serve", "--config", self.config_str(), "--listen", &listen])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let mut err = child.stderr.take().unwrap();
        match line.split_whitespace().nth(3) {
            Some(addr) => {
                self.addr = addr.to_owned();
                self.child = Some(child);
                // Keep draining its stderr.
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut err, &mut std::io::stderr());
                });
                Ok(())
            }
            None => {
                let mut text = String::new();
                let _ = std::io::Read::read_to_string(&mut err, &mut text);
                let _ = child.wait();
                Err(text)
            }
        }
    }

    /// Starts the server expecting it to refuse; returns its stderr.
    pub fn start_fails(&self) -> String {
        let out = Command::new(keyd_bin())
            .args(["serve", "--config", self.config_str()])
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "keyd started but should have refused"
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// A server folder made elsewhere (a restored backup on a new
    /// machine): `keyd.toml` and `certs/` in `dir`; not started.
    pub fn adopt(dir: tempfile::TempDir) -> Keyd {
        let config = dir.path().join("keyd.toml").to_str().unwrap().to_owned();
        Keyd {
            dir,
            addr: String::new(),
            config,
            child: None,
        }
    }

    /// SIGTERM, as an operator stops keyd: waits for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = c.id().to_string();
            let st = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
            assert!(st.success());
            let status = c.wait().unwrap();
            assert!(status.success(), "keyd stopped by SIGTERM: {status:?}");
        }
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn client(&self, principal: &str) -> RemoteKeyService {
        self.client_with(principal, |b| b)
    }

    pub fn client_with(
        &self,
        principal: &str,
        f: impl FnOnce(panseal::RemoteKeyServiceBuilder) -> panseal::RemoteKeyServiceBuilder,
    ) -> RemoteKeyService {
        let certs = self.path("certs");
        let env = PRINCIPALS
            .iter()
            .find(|p| p.0 == principal)
            .map(|p| p.1)
            .unwrap_or("test");
        let b = RemoteKeyService::builder()
            .address(&self.addr)
            .server_name("localhost")
            .ca_pem_file(certs.join("ca.pem"))
            .client_identity_pem_files(
                certs.join(format!("{principal}.pem")),
                certs.join(format!("{principal}.key.pem")),
            )
            .environment(env)
            .retries(2, Duration::from_millis(20));
        f(b).build().unwrap()
    }

    pub fn share(&self, custodian: &str) -> ShareText {
        ShareText::new(
            std::fs::read_to_string(self.path(&format!("shares/{custodian}.share")))
                .unwrap()
                .trim()
                .to_owned(),
        )
    }

    /// A ready server with extra settings.
    pub async fn ready_with(extra_settings: &str) -> Keyd {
        let mut k = Keyd::init_with(extra_settings, "");
        k.start();
        k.unseal().await;
        k
    }

    /// Copies files (relative to the folder) to `NAME.saved` beside them.
    pub fn save(&self, files: &[&str]) {
        for f in files {
            let p = self.path(f);
            if p.exists() {
                std::fs::copy(&p, self.path(&format!("{f}.saved"))).unwrap();
            } else {
                let _ = std::fs::remove_file(self.path(&format!("{f}.saved")));
            }
        }
    }

    /// Puts back what [`Keyd::save`] copied (an attacker restoring a
    /// backup, or an older snapshot); files not saved are removed.
    pub fn restore(&self, files: &[&str]) {
        for f in files {
            let saved = self.path(&format!("{f}.saved"));
            if saved.exists() {
                std::fs::copy(&saved, self.path(f)).unwrap();
            } else {
                let _ = std::fs::remove_file(self.path(f));
            }
        }
    }

    /// Swaps `f` and `f.saved`.
    pub fn swap(&self, files: &[&str]) {
        for f in files {
            let a = self.path(f);
            let b = self.path(&format!("{f}.saved"));
            let t = self.path(&format!("{f}.swap"));
            std::fs::rename(&a, &t).unwrap();
            std::fs::rename(&b, &a).unwrap();
            std::fs::rename(&t, &b).unwrap();
        }
    }

    /// Acknowledgements and two custodians' shares.
    pub async fn unseal(&self) {
        for c in &CUSTODIANS[..2] {
            let cl = self.client(c);
            cl.acknowledge(ACK).await.unwrap();
            cl.unseal(self.share(c)).await.unwrap();
        }
        assert!(!self.client("alice").status().await.unwrap().sealed);
    }

    pub fn audit_lines(&self) -> Vec<String> {
        std::fs::read_to_string(self.path("data/audit.log"))
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// `panseal-keyd custodian ACTION` as `who`: (success, stdout, stderr).
    pub fn custodian_cli(&self, who: &str, action: &str, extra: &[&str]) -> (bool, String, String) {
        self.custodian_cli_at(&self.addr, who, action, extra)
    }

    /// As [`Keyd::custodian_cli`], against `addr`.
    pub fn custodian_cli_at(
        &self,
        addr: &str,
        who: &str,
        action: &str,
        extra: &[&str],
    ) -> (bool, String, String) {
        let certs = self.path("certs");
        let cert = certs.join(format!("{who}.pem"));
        let key = certs.join(format!("{who}.key.pem"));
        let ca = certs.join("ca.pem");
        let mut args = vec![
            "custodian",
            action,
            "--address",
            addr,
            "--server-name",
            "localhost",
            "--ca",
            ca.to_str().unwrap(),
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "--environment",
            "test",
        ];
        args.extend_from_slice(extra);
        let out = Command::new(keyd_bin()).args(&args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `panseal-keyd verify-audit`: (exit code, stdout).
    pub fn verify_audit(&self) -> (i32, String) {
        let out = Command::new(keyd_bin())
            .args(["verify-audit", "--config", self.config_str()])
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }
}

impl Drop for Keyd {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn exists(p: &Path) -> bool {
    p.exists()
}
