//! The command line: `clap` types and the dispatch to the commands.
//!
//! Exit codes: 0 success; 2 a usage error (clap's) or a command that
//! failed; `verify-audit` exits 1 when the log does not verify.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use panseal::KeyPurpose;

use crate::custodian::{Connection, Session, Step};
use crate::verify_audit::Source;

/// panseal's key service: holds the KEKs, blind-index and ingest keys;
/// mutual-TLS principals with policy and quotas; a master key split into
/// custodian shares (the server starts sealed); a hash-chained audit log.
#[derive(Parser)]
#[command(
    name = "panseal-keyd",
    version,
    arg_required_else_help = true,
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// DEVELOPMENT ONLY: certificates, a keyd.toml, a 2-of-3 master key
    /// (shares saved in DIR), unsealed and served on 127.0.0.1; prints the
    /// client settings and `ready ADDR`. Again on the same DIR: restarts.
    Dev {
        /// The folder of everything it writes (again: restart from it).
        #[arg(long, value_name = "DIR", default_value = "keyd-dev")]
        dir: PathBuf,
        /// Where to listen (127.0.0.1 or ::1; port 0 picks a free port,
        /// printed on the `ready` line and in the client configurations).
        #[arg(long, value_name = "IP:PORT", default_value = "127.0.0.1:8443")]
        listen: SocketAddr,
        /// The environment tag (default `dev`; only dev, test, local, demo,
        /// sandbox or dev-/test-/local- names: `prod` and the rest are refused).
        #[arg(long, value_name = "ENV")]
        environment: Option<String>,
    },
    /// Waits until keyd accepts connections (exit 0), at most --seconds
    /// (exit 2): at --address, or at the address in --file once it exists
    /// (`dev` writes DIR/ready once unsealed).
    #[command(group(clap::ArgGroup::new("target").required(true).args(["address", "file"])))]
    Wait {
        /// keyd's address (`init` collecting shares, or `serve`).
        #[arg(long, value_name = "HOST:PORT")]
        address: Option<String>,
        /// A file whose first line is the address (`dev`'s DIR/ready).
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
        /// How long to wait.
        #[arg(long, value_name = "N", default_value_t = 30)]
        seconds: u64,
    },
    /// Writes a development CA, a server certificate and client
    /// certificates (not for production: the CA key is written too).
    GenDevCerts {
        /// The folder to write into.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// A client certificate to issue (NAME.pem, NAME.key.pem,
        /// NAME.sha256); repeat for more.
        #[arg(long = "client", value_name = "NAME")]
        clients: Vec<String>,
        /// An extra DNS name or IP of the server certificate (besides
        /// localhost and 127.0.0.1); repeat for more.
        #[arg(long = "host", value_name = "NAME")]
        hosts: Vec<String>,
    },
    /// Creates the master key and splits it K-of-N; waits until every
    /// custodian has run `custodian collect-share`, then writes the state.
    Init {
        /// keyd's configuration (keyd.toml).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Shares needed to unseal (2 to the number of custodians).
        #[arg(long, value_name = "K")]
        threshold: u8,
        /// A principal with the custodian permission who gets a share;
        /// repeat for each.
        #[arg(long = "custodian", value_name = "NAME", required = true)]
        custodians: Vec<String>,
        /// Where to listen while shares are collected (overrides `listen`).
        #[arg(long, value_name = "IP:PORT")]
        listen: Option<SocketAddr>,
    },
    /// Serves the protocol over mutual TLS (sealed until unsealed).
    Serve {
        /// keyd's configuration (keyd.toml).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Where to listen (overrides `listen` in the configuration).
        #[arg(long, value_name = "IP:PORT")]
        listen: Option<SocketAddr>,
    },
    /// Verifies the audit log's hash chain (exit 1 if it does not verify).
    /// With --config also against the state's and the exported anchor.
    VerifyAudit {
        /// keyd's configuration: its log, audit key, anchor and state.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["log", "key", "anchor"])]
        config: Option<PathBuf>,
        /// An audit log (instead of --config).
        #[arg(long, value_name = "FILE", required_unless_present = "config")]
        log: Option<PathBuf>,
        /// The audit key file of --log.
        #[arg(long, value_name = "FILE", required_unless_present = "config")]
        key: Option<PathBuf>,
        /// An exported anchor (audit.anchor) the log must reach.
        #[arg(long, value_name = "FILE")]
        anchor: Option<PathBuf>,
    },
    /// Loads a keyd.toml as `serve` would (every field, principal, quota and
    /// certificate file) and prints its principals; exit 2 naming what is
    /// wrong. Reads no state and opens no port.
    CheckConfig {
        /// The configuration file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Prints the SHA-256 fingerprint of a certificate (for `cert_sha256`
    /// in keyd.toml).
    Fingerprint {
        /// A PEM certificate file.
        #[arg(value_name = "CERT.pem")]
        cert: PathBuf,
    },
    /// The custodians' client: acknowledge, collect a share, unseal, seal,
    /// and the KEK, blind-index and ingest key lifecycle.
    Custodian {
        #[command(subcommand)]
        action: Action,
    },
}

/// How a custodian reaches keyd and who they are.
#[derive(Args)]
struct Conn {
    /// keyd's address.
    #[arg(long, value_name = "HOST:PORT")]
    address: String,
    /// The name keyd's certificate is checked against (default: the host).
    #[arg(long, value_name = "NAME")]
    server_name: Option<String>,
    /// The CA certificate that signed keyd's certificate.
    #[arg(long, value_name = "CA.pem")]
    ca: PathBuf,
    /// The custodian's certificate.
    #[arg(long, value_name = "ME.pem")]
    cert: PathBuf,
    /// The custodian's private key.
    #[arg(long, value_name = "ME.key.pem")]
    key: PathBuf,
    /// The environment to act in.
    #[arg(long, value_name = "ENV")]
    environment: String,
}

/// A scope.
#[derive(Args)]
struct ScopeArg {
    /// The scope (key family).
    #[arg(long, value_name = "S")]
    scope: String,
}

/// A scope and a key version.
#[derive(Args)]
struct Versioned {
    /// The scope (key family).
    #[arg(long, value_name = "S")]
    scope: String,
    /// The key version.
    #[arg(long, value_name = "N")]
    version: u32,
}

/// A DEK.
#[derive(Args)]
struct Dek {
    /// The DEK's key id (hex).
    #[arg(long, value_name = "ID")]
    key_id: String,
    /// The DEK's scope.
    #[arg(long, value_name = "S")]
    scope: String,
    /// What the DEK is for.
    #[arg(long, value_enum, default_value_t = Purpose::Data)]
    purpose: Purpose,
}

/// `--purpose`.
#[derive(Clone, Copy, ValueEnum)]
enum Purpose {
    /// Seals PANs.
    Data,
    /// Keys a blind index.
    Index,
}

#[derive(Subcommand)]
enum Action {
    /// What keyd says about itself and this custodian (JSON).
    Status {
        #[command(flatten)]
        conn: Conn,
    },
    /// Records this custodian's acknowledgement of their duties.
    Acknowledge {
        #[command(flatten)]
        conn: Conn,
        /// The statement acknowledged (default: the PCI DSS 3.7.8 one).
        #[arg(long, value_name = "TEXT", allow_hyphen_values = true)]
        statement: Option<String>,
    },
    /// During `init`: collects this custodian's share into a new file
    /// (mode 0600); the share is never printed.
    CollectShare {
        #[command(flatten)]
        conn: Conn,
        /// The new file to write the share to.
        #[arg(long, value_name = "FILE")]
        share_file: PathBuf,
        /// Also acknowledge this statement.
        #[arg(long, value_name = "TEXT", allow_hyphen_values = true)]
        statement: Option<String>,
    },
    /// Submits this custodian's share; keyd unseals at the threshold.
    Unseal {
        #[command(flatten)]
        conn: Conn,
        /// The file holding the share.
        #[arg(long, value_name = "FILE")]
        share_file: PathBuf,
        /// Refuse unless keyd's state is at this generation.
        #[arg(long, value_name = "N")]
        expect_generation: Option<u64>,
    },
    /// keyd forgets its master key (sealed again).
    Seal {
        #[command(flatten)]
        conn: Conn,
    },
    /// The KEK versions of a scope and their states.
    KekStatus {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        scope: ScopeArg,
    },
    /// A new KEK version becomes the one that wraps.
    Rotate {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        scope: ScopeArg,
    },
    /// A KEK version becomes decrypt-only.
    Retire {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        key: Versioned,
    },
    /// This custodian approves destroying a KEK version (dual control).
    ApproveDestroy {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        key: Versioned,
    },
    /// This custodian approves destroying a DEK (dual control).
    ApproveDestroyDek {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        dek: Dek,
    },
    /// Takes back this custodian's approval to destroy a KEK version.
    Withdraw {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        key: Versioned,
    },
    /// Takes back this custodian's approval to destroy a DEK.
    WithdrawDek {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        dek: Dek,
    },
    /// A new K-of-N split of the master key among the named custodians.
    Reshare {
        #[command(flatten)]
        conn: Conn,
        /// Shares needed to unseal after the reshare.
        #[arg(long, value_name = "K")]
        threshold: u8,
        /// A custodian of the new split; repeat for each.
        #[arg(long = "custodian", value_name = "NAME", required = true)]
        custodians: Vec<String>,
        /// This custodian's current share.
        #[arg(long, value_name = "FILE")]
        share_file: PathBuf,
    },
    /// Creates the next blind-index key version of a scope.
    IndexCreate {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        scope: ScopeArg,
    },
    /// Lists a scope's blind-index key versions.
    IndexList {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        scope: ScopeArg,
    },
    /// A blind-index key version becomes decrypt-only.
    IndexRetire {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        key: Versioned,
    },
    /// Destroys a blind-index key version.
    IndexDestroy {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        key: Versioned,
    },
    /// Creates the next ingest (HPKE) key pair of a scope.
    IngestCreate {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        scope: ScopeArg,
    },
    /// Lists a scope's ingest key versions and public keys.
    IngestList {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        scope: ScopeArg,
    },
    /// An ingest key version becomes decrypt-only.
    IngestRetire {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        key: Versioned,
    },
    /// Destroys an ingest key version.
    IngestDestroy {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        key: Versioned,
    },
}

/// Parses the process arguments and runs the command.
pub(crate) fn run() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // Help and version go to stdout with 0; usage errors to
            // stderr with 2.
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    let result = match cli.command {
        Command::GenDevCerts {
            out,
            clients,
            hosts,
        } => crate::certs::generate(&out, &hosts, &clients).map(|()| {
            println!(
                "development certificates written to {} (not for production)",
                out.display()
            );
        }),
        Command::Init {
            config,
            threshold,
            custodians,
            listen,
        } => crate::init::run(&config, listen, threshold, &custodians),
        Command::Serve { config, listen } => crate::serve::run(&config, listen),
        Command::Dev {
            dir,
            listen,
            environment,
        } => crate::dev::run(&dir, listen, environment.as_deref()),
        Command::Wait {
            address,
            file,
            seconds,
        } => {
            crate::dev::wait(address.as_deref(), file.as_deref(), seconds).map(|m| println!("{m}"))
        }
        Command::VerifyAudit {
            config,
            log,
            key,
            anchor,
        } => {
            let source = match (config, log, key) {
                (Some(c), ..) => Source::Config(c),
                (None, Some(log), Some(key)) => Source::Files { log, key, anchor },
                // clap requires --log and --key without --config.
                _ => return ExitCode::from(2),
            };
            return match crate::verify_audit::run(&source) {
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
            };
        }
        Command::CheckConfig { config } => check_config(&config).map(|out| print!("{out}")),
        Command::Fingerprint { cert } => {
            crate::certs::fingerprint_file(&cert).map(|f| println!("{f}"))
        }
        Command::Custodian { action } => custodian(action).map(|out| println!("{out}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("panseal-keyd: {e}");
            ExitCode::from(2)
        }
    }
}

/// `check-config`: the configuration as keyd reads it, one line per
/// principal.
fn check_config(path: &std::path::Path) -> Result<String, String> {
    use std::fmt::Write as _;
    let config = crate::config::Config::load(path).map_err(|e| e.to_string())?;
    let mut out = format!(
        "{}: valid; listen {}, environments {}, {} principals\n",
        path.display(),
        config.listen,
        config
            .environments
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join(", "),
        config.principals.len()
    );
    for p in &config.principals {
        let scopes = match &p.scopes {
            crate::config::Scopes::All => "*".to_owned(),
            crate::config::Scopes::Only(s) => s.iter().cloned().collect::<Vec<_>>().join(", "),
        };
        let permissions: Vec<&str> = p.permissions.iter().map(|p| p.as_str()).collect();
        let _ = writeln!(
            out,
            "  {}: environment {}, scopes {scopes}, permissions {}",
            p.name,
            p.environment.as_str(),
            if permissions.is_empty() {
                "(none)".to_owned()
            } else {
                permissions.join(", ")
            }
        );
    }
    Ok(out)
}

fn connect(c: &Conn) -> Result<Session, String> {
    Session::connect(&Connection {
        address: &c.address,
        server_name: c.server_name.as_deref(),
        ca: &c.ca,
        cert: &c.cert,
        key: &c.key,
        environment: &c.environment,
    })
}

fn purpose(p: Purpose) -> KeyPurpose {
    match p {
        Purpose::Data => KeyPurpose::Data,
        Purpose::Index => KeyPurpose::Index,
    }
}

/// Runs one custodian action; `Ok` is what to print.
fn custodian(action: Action) -> Result<String, String> {
    use Action as A;
    match action {
        A::Status { conn } => connect(&conn)?.status(),
        A::Acknowledge { conn, statement } => connect(&conn)?.acknowledge(statement.as_deref()),
        A::CollectShare {
            conn,
            share_file,
            statement,
        } => connect(&conn)?.collect_share(&share_file, statement.as_deref()),
        A::Unseal {
            conn,
            share_file,
            expect_generation,
        } => connect(&conn)?.unseal(&share_file, expect_generation),
        A::Seal { conn } => connect(&conn)?.seal(),
        A::KekStatus { conn, scope } => connect(&conn)?.kek_status(&scope.scope),
        A::Rotate { conn, scope } => connect(&conn)?.rotate(&scope.scope),
        A::Retire { conn, key } => connect(&conn)?.retire(&key.scope, key.version),
        A::ApproveDestroy { conn, key } => connect(&conn)?.approve_destroy(&key.scope, key.version),
        A::ApproveDestroyDek { conn, dek } => {
            connect(&conn)?.approve_destroy_dek(&dek.key_id, &dek.scope, purpose(dek.purpose))
        }
        A::Withdraw { conn, key } => connect(&conn)?.withdraw(&key.scope, key.version),
        A::WithdrawDek { conn, dek } => {
            connect(&conn)?.withdraw_dek(&dek.key_id, &dek.scope, purpose(dek.purpose))
        }
        A::Reshare {
            conn,
            threshold,
            custodians,
            share_file,
        } => connect(&conn)?.reshare(threshold, &custodians, &share_file),
        A::IndexCreate { conn, scope } => connect(&conn)?.index(Step::Create, &scope.scope, 0),
        A::IndexList { conn, scope } => connect(&conn)?.index(Step::List, &scope.scope, 0),
        A::IndexRetire { conn, key } => {
            connect(&conn)?.index(Step::Retire, &key.scope, key.version)
        }
        A::IndexDestroy { conn, key } => {
            connect(&conn)?.index(Step::Destroy, &key.scope, key.version)
        }
        A::IngestCreate { conn, scope } => connect(&conn)?.ingest(Step::Create, &scope.scope, 0),
        A::IngestList { conn, scope } => connect(&conn)?.ingest(Step::List, &scope.scope, 0),
        A::IngestRetire { conn, key } => {
            connect(&conn)?.ingest(Step::Retire, &key.scope, key.version)
        }
        A::IngestDestroy { conn, key } => {
            connect(&conn)?.ingest(Step::Destroy, &key.scope, key.version)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// clap's own consistency checks of every subcommand.
    #[test]
    fn command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
