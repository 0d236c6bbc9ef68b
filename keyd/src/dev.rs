//! `panseal-keyd dev`: a development keyd in one command. In one folder it
//! makes development certificates, a `keyd.toml` (environment `dev`), a
//! 2-of-3 master key through the real `init` (the three custodians, played
//! in-process by the custodians' own client, collect their shares into the
//! folder), then serves on 127.0.0.1, unseals with two of the shares and
//! writes the client configurations to paste. Run again on the same folder,
//! it restarts and unseals with the saved shares.
//!
//! **Development only**: the shares, the CA key and the state sit together
//! in one folder, which defeats split knowledge (PCI DSS 3.6.1.2, 3.7.6).
//! A `prod` environment is refused. `panseal-keyd wait` is the readiness
//! check of scripts (no bare `sleep`).

use std::io::Write;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::custodian::{Connection, Session};

/// The front end's principal: seals (wrap) and asks for blind-index values.
pub(crate) const FRONT_END: &str = "checkout";
/// The back office's principal: seals and opens (unwrap), reveals one
/// record at a time, blind-index values.
pub(crate) const BACK_OFFICE: &str = "back-office";
/// The three custodians of the 2-of-3 master key.
pub(crate) const CUSTODIANS: [&str; 3] = ["alice", "bob", "carol"];
/// The scope the client configurations name.
pub(crate) const SCOPE: &str = "merchant-42";

const BANNER: &str = "\
################################################################################
##  panseal-keyd dev: DEVELOPMENT ONLY                                        ##
##  Every custodian share, the CA key and the state sit in ONE folder: anyone ##
##  who reads it holds every key. Never use it for real card data.            ##
################################################################################";

const SHARES_NOTE: &str = "DEVELOPMENT ONLY (written by `panseal-keyd dev`).

These three custodian shares sit together beside keyd's state so that a
development keyd can restart unattended. That defeats split knowledge: anyone
who reads this folder can unseal keyd and open every PAN sealed under it.

In production each custodian collects their own share on their own machine
(`panseal-keyd custodian collect-share`), keeps it apart from the others and
from keyd's backups, and submits it at every start (README, \"Running it\").
";

/// The environment tags `dev` serves: an allow-list, so that `prod`,
/// `production`, `live`, `prd`, `pci` or any other name a production
/// deployment might use is refused.
const DEV_ENVIRONMENTS: &[&str] = &["dev", "test", "local", "demo", "sandbox"];
const DEV_PREFIXES: &[&str] = &["dev-", "test-", "local-"];

/// Is this environment tag one `dev` refuses (anything not on the
/// development allow-list)?
fn is_production(environment: &str) -> bool {
    let e = environment.to_ascii_lowercase();
    !(DEV_ENVIRONMENTS.contains(&e.as_str()) || DEV_PREFIXES.iter().any(|p| e.starts_with(p)))
}

fn refuse_production(environment: &str, source: &str) -> Result<(), String> {
    if is_production(environment) {
        return Err(format!(
            "`panseal-keyd dev` is for development only: refusing environment {environment:?} \
             ({source}): it serves only {} or names starting with {}; run `panseal-keyd init` \
             and `serve` with custodians for anything else (README, \"Running it\")",
            DEV_ENVIRONMENTS.join(", "),
            DEV_PREFIXES.join(", ")
        ));
    }
    Ok(())
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{}: {e}", path.display())
}

/// Writes `contents` to `path` through a temporary file and a rename (a
/// reader never sees half a file).
fn write_atomic(path: &Path, contents: &str) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

fn dev_config(environment: &str) -> String {
    let mut cfg = format!(
        "# DEVELOPMENT ONLY: written by `panseal-keyd dev` (README, \"Try it\").\n\
         # Production: README \"Configuration\" and \"Running it\".\n\
         listen = \"127.0.0.1:8443\"\n\
         data_dir = \"data\"\n\
         environments = [{env}]\n\
         tls_cert = \"certs/server.pem\"\n\
         tls_key = \"certs/server.key.pem\"\n\
         client_ca = \"certs/ca.pem\"\n\
         auto_create_scopes = [\"*\"]\n\
         \n\
         [[principal]]                      # encrypt-only front end\n\
         name = \"{FRONT_END}\"\n\
         cert = \"certs/{FRONT_END}.pem\"\n\
         environment = {env}\n\
         scopes = [\"*\"]\n\
         permissions = [\"wrap\", \"index\"]\n\
         \n\
         [[principal]]                      # back office: seals, opens, reveals\n\
         name = \"{BACK_OFFICE}\"\n\
         cert = \"certs/{BACK_OFFICE}.pem\"\n\
         environment = {env}\n\
         scopes = [\"*\"]\n\
         permissions = [\"wrap\", \"unwrap\", \"index\", \"reveal\"]\n",
        env = json_str(environment)
    );
    for c in CUSTODIANS {
        cfg.push_str(&format!(
            "\n[[principal]]\nname = \"{c}\"\ncert = \"certs/{c}.pem\"\nenvironment = {env}\n\
             scopes = [\"*\"]\npermissions = [\"custodian\"]\n",
            env = json_str(environment)
        ));
    }
    cfg
}

/// The folder's paths.
struct Layout {
    dir: PathBuf,
    config: PathBuf,
    certs: PathBuf,
    shares: PathBuf,
    ready: PathBuf,
}

impl Layout {
    fn new(dir: &Path) -> Result<Layout, String> {
        let existed = dir.exists();
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        #[cfg(unix)]
        {
            // Shares and keys inside: owner only. A folder it makes is
            // 0700; an existing one open to group or others (`--dir .`, a
            // shared folder) is refused rather than silently changed.
            use std::os::unix::fs::PermissionsExt;
            if !existed {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(io(dir))?;
            }
            let mode = std::fs::metadata(dir)
                .map_err(io(dir))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(format!(
                    "{} is open to group or others (mode {:03o}): the development shares \
                     would be readable; use a new folder, or `chmod 700` it",
                    dir.display(),
                    mode & 0o777
                ));
            }
        }
        let dir = std::fs::canonicalize(dir).map_err(io(dir))?;
        Ok(Layout {
            config: dir.join("keyd.toml"),
            certs: dir.join("certs"),
            shares: dir.join("shares"),
            ready: dir.join("ready"),
            dir,
        })
    }

    fn share(&self, custodian: &str) -> PathBuf {
        self.shares.join(format!("{custodian}.share"))
    }

    fn session(&self, address: &str, who: &str, environment: &str) -> Result<Session, String> {
        Session::connect(&Connection {
            address,
            server_name: Some("localhost"),
            ca: &self.certs.join("ca.pem"),
            cert: &self.certs.join(format!("{who}.pem")),
            key: &self.certs.join(format!("{who}.key.pem")),
            environment,
        })
    }

    /// The JSON client configuration (`ClientConfig`) of `principal`.
    fn client_json(&self, principal: &str, address: SocketAddr, environment: &str) -> String {
        let p = |s: &Path| json_str(&s.display().to_string());
        format!(
            "{{\n  \"environment\": {env},\n  \"scope\": \"{SCOPE}\",\n  \"key_service\": {{\n    \
             \"type\": \"keyd\",\n    \"address\": \"{address}\",\n    \
             \"server_name\": \"localhost\",\n    \"ca_file\": {ca},\n    \
             \"client_cert_file\": {cert},\n    \"client_key_file\": {key}\n  }},\n  \
             \"key_store\": {{ \"type\": \"file\", \"path\": {store} }},\n  \
             \"audit\": {{ \"type\": \"jsonl\", \"path\": {audit} }}\n}}\n",
            env = json_str(environment),
            ca = p(&self.certs.join("ca.pem")),
            cert = p(&self.certs.join(format!("{principal}.pem"))),
            key = p(&self.certs.join(format!("{principal}.key.pem"))),
            store = p(&self.dir.join("keys.pks")),
            audit = p(&self.dir.join(format!("{principal}-audit.jsonl"))),
        )
    }
}

/// `panseal-keyd dev --dir DIR [--listen IP:PORT] [--environment ENV]`.
pub(crate) fn run(dir: &Path, listen: SocketAddr, environment: Option<&str>) -> Result<(), String> {
    if let Some(e) = environment {
        refuse_production(e, "--environment")?;
    }
    if !listen.ip().is_loopback() {
        return Err(format!(
            "`panseal-keyd dev` listens on 127.0.0.1 or ::1 only, not {listen} (development only)"
        ));
    }
    println!("{BANNER}");
    let l = Layout::new(dir)?;
    // Another `dev` serving this folder keeps it (and its ready file).
    let lock = l.dir.join("data").join("keyd.lock");
    if lock.exists() {
        drop(crate::state::DirLock::take(&lock).map_err(|_| {
            format!(
                "a panseal-keyd already serves {} (`dev` runs once per folder)",
                l.dir.display()
            )
        })?);
    }
    // A ready file left by a killed run must not announce this one.
    match std::fs::remove_file(&l.ready) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: {e}", l.ready.display())),
    }
    let environment = if l.config.exists() {
        let cfg = Config::load(&l.config).map_err(|e| e.to_string())?;
        for e in &cfg.environments {
            refuse_production(e, &format!("in {}", l.config.display()))?;
        }
        let Some(env) = cfg.environments.iter().next().cloned() else {
            return Err(format!("{}: no environment", l.config.display()));
        };
        if let Some(e) = environment {
            if !cfg.environments.contains(e) {
                return Err(format!(
                    "{} was made for environment {env:?}, not {e:?}: use another --dir",
                    l.dir.display()
                ));
            }
        }
        println!("restarting the development keyd in {}", l.dir.display());
        env
    } else {
        let env = environment.unwrap_or("dev").to_owned();
        if l.certs.exists() {
            return Err(format!(
                "{} exists but {} does not (an interrupted `dev`?): remove {} and run again",
                l.certs.display(),
                l.config.display(),
                l.dir.display()
            ));
        }
        let mut clients: Vec<String> = vec![FRONT_END.into(), BACK_OFFICE.into()];
        clients.extend(CUSTODIANS.iter().map(|c| (*c).to_owned()));
        crate::certs::generate(&l.certs, &[], &clients)?;
        write_atomic(&l.config, &dev_config(&env))?;
        println!(
            "wrote development certificates in {} and {}",
            l.certs.display(),
            l.config.display()
        );
        env
    };
    if !Config::load(&l.config)
        .map_err(|e| e.to_string())?
        .paths()
        .state
        .exists()
    {
        init(&l, &environment)?;
    }
    serve(l, listen, environment)
}

/// The real `init` (2-of-3), each custodian collecting their share with the
/// custodians' client into `shares/NAME.share` (mode 0600).
fn init(l: &Layout, environment: &str) -> Result<(), String> {
    std::fs::create_dir_all(&l.shares).map_err(io(&l.shares))?;
    for c in CUSTODIANS {
        // Left by an interrupted init: its master key was never written.
        match std::fs::remove_file(l.share(c)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", l.share(c).display())),
        }
    }
    write_atomic(&l.shares.join("DEV-ONLY.txt"), SHARES_NOTE)?;
    let shares: Vec<(String, PathBuf)> = CUSTODIANS
        .iter()
        .map(|c| ((*c).to_owned(), l.share(c)))
        .collect();
    let (certs, env) = (l.certs.clone(), environment.to_owned());
    let collect: crate::init::OnListening = Box::new(move |addr: SocketAddr| {
        std::thread::spawn(move || {
            let l = Layout {
                dir: PathBuf::new(),
                config: PathBuf::new(),
                certs,
                shares: PathBuf::new(),
                ready: PathBuf::new(),
            };
            for (c, file) in &shares {
                let r = l
                    .session(&addr.to_string(), c, &env)
                    .and_then(|s| s.collect_share(file, Some(crate::custodian::DEFAULT_STATEMENT)));
                if let Err(e) = r {
                    eprintln!("panseal-keyd: dev: custodian {c} could not collect a share: {e}");
                    std::process::exit(2);
                }
            }
        });
    });
    let custodians: Vec<String> = CUSTODIANS.iter().map(|c| (*c).to_owned()).collect();
    let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
    crate::init::run_with(&l.config, Some(any_port), 2, &custodians, Some(collect))?;
    println!(
        "custodians alice, bob and carol collected their shares into {} (DEVELOPMENT ONLY)",
        l.shares.display()
    );
    Ok(())
}

/// Serves; once listening, alice and bob acknowledge and unseal, the client
/// configurations are written and `ready` is announced.
fn serve(l: Layout, listen: SocketAddr, environment: String) -> Result<(), String> {
    let config = l.config.clone();
    let ready = l.ready.clone();
    let started = Instant::now();
    let announce: crate::init::OnListening = Box::new(move |addr: SocketAddr| {
        std::thread::spawn(move || {
            if let Err(e) = unseal_and_announce(&l, addr, &environment, started) {
                eprintln!("panseal-keyd: dev: {e}");
                std::process::exit(2);
            }
        });
    });
    let r = crate::serve::run_with(&config, Some(listen), Some(announce));
    let _ = std::fs::remove_file(&ready);
    r
}

fn unseal_and_announce(
    l: &Layout,
    addr: SocketAddr,
    environment: &str,
    started: Instant,
) -> Result<(), String> {
    let address = addr.to_string();
    for c in &CUSTODIANS[..2] {
        let s = l.session(&address, c, environment)?;
        s.acknowledge(None)?;
        s.unseal(&l.share(c), None)
            .map_err(|e| format!("custodian {c} could not unseal: {e}"))?;
    }
    let client = l.dir.join("client.json");
    let front = l.dir.join("checkout.json");
    write_atomic(&client, &l.client_json(BACK_OFFICE, addr, environment))?;
    write_atomic(&front, &l.client_json(FRONT_END, addr, environment))?;
    let cert = |n: &str| l.certs.join(n).display().to_string();
    println!(
        "unsealed by alice and bob (2 of 3) in {} ms; serving on {addr}\n\
         \n\
         client settings to paste (DEVELOPMENT ONLY):\n\
         \x20 back office (seals and opens): {client}\n\
         \x20 front end (seals only):        {front}\n\
         \x20 JSON (C ABI, Python `panseal.Client.from_file`, Rust `ClientConfig::from_file`)\n\
         \x20 Rust:\n\
         \x20   let key_service = panseal::RemoteKeyService::builder()\n\
         \x20       .address(\"{addr}\")\n\
         \x20       .server_name(\"localhost\")\n\
         \x20       .ca_pem_file({ca:?})\n\
         \x20       .client_identity_pem_files({bo:?}, {bo_key:?})\n\
         \x20       .environment({environment:?})\n\
         \x20       .scope(\"{SCOPE}\")\n\
         \x20       .build()?;\n\
         stop with Ctrl-C (or SIGTERM); `panseal-keyd dev --dir {dir}` again restarts it",
        started.elapsed().as_millis(),
        client = client.display(),
        front = front.display(),
        ca = cert("ca.pem"),
        bo = cert(&format!("{BACK_OFFICE}.pem")),
        bo_key = cert(&format!("{BACK_OFFICE}.key.pem")),
        dir = l.dir.display(),
    );
    write_atomic(&l.ready, &format!("{addr}\n"))?;
    println!("ready {addr}");
    let _ = std::io::stdout().flush();
    Ok(())
}

/// `panseal-keyd wait`: until something accepts TCP connections at
/// `address`, or at the address on the first line of `file` once it exists
/// (`dev` writes `DIR/ready` once unsealed); at most `seconds`.
pub(crate) fn wait(
    address: Option<&str>,
    file: Option<&Path>,
    seconds: u64,
) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut last = String::from("nothing tried yet");
    loop {
        let target = match (address, file) {
            (Some(a), _) => Some(a.to_owned()),
            (None, Some(f)) => match std::fs::read_to_string(f) {
                Ok(t) => t.lines().next().map(|l| l.trim().to_owned()),
                Err(e) => {
                    last = format!("{}: {e}", f.display());
                    None
                }
            },
            (None, None) => return Err("give --address or --file".into()),
        };
        if let Some(t) = target {
            match t.to_socket_addrs() {
                Ok(addrs) => {
                    for a in addrs {
                        match TcpStream::connect_timeout(&a, Duration::from_secs(1)) {
                            Ok(_) => return Ok(format!("ready {a}")),
                            Err(e) => last = format!("{a}: {e}"),
                        }
                    }
                }
                Err(e) => last = format!("{t:?}: {e}"),
            }
        }
        if Instant::now() >= deadline {
            return Err(format!("not ready after {seconds} s ({last})"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn production_names_are_refused() {
        for e in [
            "prod",
            "PROD",
            "production",
            "prod-eu",
            "live",
            "prd",
            "pci",
            "staging",
            "eu-1",
        ] {
            let m = refuse_production(e, "--environment").unwrap_err();
            assert!(m.contains("development only"), "{m}");
        }
        for e in [
            "dev",
            "test",
            "local",
            "demo",
            "sandbox",
            "dev-alice",
            "TEST-2",
        ] {
            refuse_production(e, "--environment").unwrap();
        }
    }

    #[test]
    fn an_existing_folder_open_to_others_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = Layout::new(d.path()).err().unwrap();
        assert!(e.contains("open to group or others (mode 755)"), "{e}");
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(Layout::new(d.path()).is_ok());
    }

    #[test]
    fn the_dev_configuration_parses() {
        let d = tempfile::tempdir().unwrap();
        let l = Layout::new(&d.path().join("keyd-dev")).unwrap();
        let mut clients: Vec<String> = vec![FRONT_END.into(), BACK_OFFICE.into()];
        clients.extend(CUSTODIANS.iter().map(|c| (*c).to_owned()));
        crate::certs::generate(&l.certs, &[], &clients).unwrap();
        std::fs::write(&l.config, dev_config("dev")).unwrap();
        let cfg = Config::load(&l.config).unwrap();
        assert_eq!(cfg.environments.len(), 1);
        let addr = SocketAddr::from(([127, 0, 0, 1], 8443));
        let json: serde_json::Value =
            serde_json::from_str(&l.client_json(BACK_OFFICE, addr, "dev")).unwrap();
        assert_eq!(json["key_service"]["type"], "keyd");
        assert_eq!(json["key_service"]["address"], "127.0.0.1:8443");
    }
}
