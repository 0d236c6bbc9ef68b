//! A real PostgreSQL server for tests: initdb in a temporary directory,
//! started on 127.0.0.1 at a free port (as the unprivileged `postgres` user
//! when the tests run as root, since PostgreSQL refuses to run as root), and
//! stopped when the handle drops. [`PgServer::start_tls`] starts one that
//! accepts TLS connections only (`hostssl`; plain TCP is rejected by
//! `pg_hba.conf`).

use std::path::PathBuf;
use std::process::Command;

pub struct PgServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    as_user: Option<&'static str>,
    /// The harness's own tools connect through the Unix socket (TLS
    /// servers may demand a client certificate on TCP).
    socket: bool,
}

pub fn pg_bin() -> PathBuf {
    let root = PathBuf::from("/usr/lib/postgresql");
    let mut versions: Vec<_> = std::fs::read_dir(&root)
        .unwrap_or_else(|_| panic!("PostgreSQL is not installed: run scripts/setup.sh"))
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("no PostgreSQL server binaries under /usr/lib/postgresql: run scripts/setup.sh")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The TLS side of a test server.
pub struct ServerTls {
    /// The server's certificate chain (PEM).
    pub cert_pem: String,
    /// Its private key (PEM); written owned by the server's user, mode 0600.
    pub key_pem: String,
    /// With a CA (PEM), clients authenticate with a certificate of it whose
    /// common name is the user (`cert` authentication) instead of `trust`.
    pub client_ca_pem: Option<String>,
}

impl PgServer {
    pub fn start() -> PgServer {
        Self::start_with(None)
    }

    /// A server that accepts TLS connections only: `ssl=on` with `tls`'s
    /// certificate, and `pg_hba.conf` rejecting plain TCP.
    pub fn start_tls(tls: &ServerTls) -> PgServer {
        Self::start_with(Some(tls))
    }

    fn start_with(tls: Option<&ServerTls>) -> PgServer {
        let bin = pg_bin();
        let dir = tempfile::Builder::new()
            .prefix("panseal-pg")
            .tempdir()
            .unwrap();
        let as_user = if is_root() { Some("postgres") } else { None };
        if let Some(user) = as_user {
            let status = Command::new("chown")
                .args(["-R", user])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(
                status.success(),
                "chown of the PostgreSQL test directory failed"
            );
        }
        let mut server = PgServer {
            dir,
            bin,
            port: 0,
            as_user,
            socket: tls.is_some(),
        };
        let data = server.dir.path().join("data");
        server.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        let tls_opts = match tls {
            None => String::new(),
            Some(tls) => server.configure_tls(&data, tls),
        };
        // A few attempts in case another process takes the port meanwhile.
        for _ in 0..5 {
            server.port = free_port();
            let opts = format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200{tls_opts}",
                server.port,
                server.dir.path().display()
            );
            let log = server.dir.path().join("log");
            if server.try_run(
                "pg_ctl",
                &[
                    "-D",
                    data.to_str().unwrap(),
                    "-o",
                    &opts,
                    "-l",
                    log.to_str().unwrap(),
                    "-w",
                    "start",
                ],
            ) {
                return server;
            }
        }
        panic!("PostgreSQL did not start");
    }

    /// Writes the certificate, key and `pg_hba.conf`; returns the server
    /// options that turn TLS on.
    fn configure_tls(&self, data: &std::path::Path, tls: &ServerTls) -> String {
        use std::os::unix::fs::PermissionsExt;
        let cert = self.dir.path().join("server.crt");
        let key = self.dir.path().join("server.key");
        std::fs::write(&cert, &tls.cert_pem).unwrap();
        std::fs::write(&key, &tls.key_pem).unwrap();
        // PostgreSQL refuses a key file that others can read.
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        if let Some(user) = self.as_user {
            let status = Command::new("chown")
                .arg(user)
                .args([&cert, &key])
                .status()
                .unwrap();
            assert!(status.success(), "chown of the server key failed");
        }
        let mut opts = format!(
            " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
            cert.display(),
            key.display()
        );
        let method = match &tls.client_ca_pem {
            None => "trust",
            Some(ca) => {
                let path = self.dir.path().join("client-ca.crt");
                std::fs::write(&path, ca).unwrap();
                opts += &format!(" -c ssl_ca_file={}", path.display());
                "cert"
            }
        };
        // The Unix socket stays open to the harness's own tools (psql,
        // pg_dump); TCP on 127.0.0.1 is TLS only.
        std::fs::write(
            data.join("pg_hba.conf"),
            format!(
                "local all all trust\n\
                 hostssl all all 127.0.0.1/32 {method}\n\
                 hostnossl all all 127.0.0.1/32 reject\n"
            ),
        )
        .unwrap();
        opts
    }

    fn command(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        match self.as_user {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(path);
                c
            }
            None => Command::new(path),
        }
    }

    fn try_run(&self, tool: &str, args: &[&str]) -> bool {
        self.command(tool)
            .args(args)
            .current_dir(self.dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let out = self
            .command(tool)
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{tool} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Where the harness's tools connect: 127.0.0.1, or the socket
    /// directory of a TLS server.
    fn tool_host(&self) -> String {
        if self.socket {
            self.dir.path().display().to_string()
        } else {
            "127.0.0.1".into()
        }
    }

    /// A URL for database `db` (created by [`PgServer::create_db`]).
    pub fn url(&self, db: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{db}", self.port)
    }

    pub fn create_db(&self, db: &str) -> String {
        self.run(
            "psql",
            &[
                "-h",
                &self.tool_host(),
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-q",
                "-c",
                &format!("CREATE DATABASE {db}"),
            ],
        );
        self.url(db)
    }

    /// Runs SQL through psql; returns its output (tuples only, unaligned).
    pub fn psql(&self, db: &str, sql: &str) -> String {
        use std::io::Write;
        let mut child = self
            .command("psql")
            .args([
                "-h",
                &self.tool_host(),
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .args([
                "-d",
                db,
                "-q",
                "-t",
                "-A",
                "-v",
                "ON_ERROR_STOP=1",
                "-f",
                "-",
            ])
            .current_dir(self.dir.path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(sql.as_bytes()).unwrap();
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "psql failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `pg_dump` of the whole database, as an attacker with the database
    /// would have it.
    pub fn dump(&self, db: &str) -> Vec<u8> {
        let out = self
            .command("pg_dump")
            .args([
                "-h",
                &self.tool_host(),
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                db,
            ])
            .current_dir(self.dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "pg_dump failed");
        out.stdout
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = self.try_run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap_or(""),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
        // The server's log outlives its directory: copied where
        // scripts/test.sh scans every output for secrets, and shown when
        // the test failed.
        let log = self.dir.path().join("log");
        if let Some(dir) = std::env::var_os("PANSEAL_TEST_LOG_DIR") {
            let dir = PathBuf::from(dir);
            let name = format!("postgresql-{}-{}.log", std::process::id(), self.port);
            let _ =
                std::fs::create_dir_all(&dir).and_then(|()| std::fs::copy(&log, dir.join(name)));
        }
        if std::thread::panicking() {
            if let Ok(text) = std::fs::read_to_string(&log) {
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(40)..];
                eprintln!(
                    "--- PostgreSQL log (last {} lines)\n{}",
                    tail.len(),
                    tail.join("\n")
                );
            }
        }
    }
}
