//! A local KMS-compatible endpoint for the tests: moto's server, started by
//! the test itself on 127.0.0.1 with a port the OS picks, and stopped when
//! the handle drops (or, should the test process die, when its stdin pipe
//! closes). A missing moto is a test failure, never a skip
//! (`scripts/setup.sh` installs `moto[server]` from
//! `tests/python/requirements.txt`).

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};

/// Dummy credentials: moto accepts any.
pub const ACCESS_KEY_ID: &str = "AKIAPANSEALTEST00000";
pub const SECRET_ACCESS_KEY: &str = "panseal-test-secret-not-a-real-key";
pub const REGION: &str = "eu-west-1";

const SERVER: &str = r#"
import sys
try:
    from moto.server import ThreadedMotoServer
except Exception as e:
    print("error moto is not installed (pip install 'moto[server]'): %s" % e, flush=True)
    sys.exit(3)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
host, port = server.get_host_and_port()
print("ready", port, flush=True)
sys.stdin.read()  # until the test closes the pipe or dies
server.stop()
"#;

pub struct Moto {
    child: Child,
    stdin: Option<ChildStdin>,
    pub port: u16,
}

impl Moto {
    /// Starts a fresh server (empty state).
    pub fn start() -> Moto {
        let mut child = Command::new("python3")
            .args(["-c", SERVER])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 is needed to run moto (scripts/setup.sh installs it)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = match line.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["ready", port] => port.parse().unwrap(),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("moto did not start: {line:?} (run `bash scripts/setup.sh`)");
            }
        };
        let stdin = child.stdin.take();
        Moto { child, stdin, port }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Freezes the server (`SIGSTOP`): connections are accepted by the
    /// kernel but never answered, like a KMS endpoint behind a dead link.
    pub fn stall(&self) {
        signal(self.pid(), "-STOP");
    }

    /// Lets a stalled server run again (`SIGCONT`); its state is intact.
    pub fn resume(&self) {
        signal(self.pid(), "-CONT");
    }
}

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {sig} {pid}");
}

impl Drop for Moto {
    fn drop(&mut self) {
        // A stalled server must run to see its stdin close.
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.flush();
        }
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A plain SDK client on the server, for the custodian's side of a test
/// (disabling, scheduling deletion, inspecting aliases and tags).
pub fn raw_client(endpoint: &str) -> aws_sdk_kms::Client {
    use aws_sdk_kms::config::{BehaviorVersion, Credentials, Region};
    use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let config = aws_sdk_kms::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new(
            ACCESS_KEY_ID,
            SECRET_ACCESS_KEY,
            None,
            None,
            "test",
        ))
        .http_client(http)
        .build();
    aws_sdk_kms::Client::from_conf(config)
}

/// The key id an alias points at.
pub async fn alias_target(client: &aws_sdk_kms::Client, alias: &str) -> String {
    client
        .describe_key()
        .key_id(alias)
        .send()
        .await
        .unwrap()
        .key_metadata()
        .unwrap()
        .key_id()
        .to_owned()
}
