//! `panseal-keyd dev` as a newcomer runs it: the real binary in a temporary
//! folder, a client built from the `client.json` it prints, a restart on the
//! same folder, the refusal of `prod`, and the front end's credential as an
//! attacker would use it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use panseal::config::ClientConfig;
use panseal::{Access, Context, Pan, Panseal, SealedPan};

use crate::keyd_harness::keyd_bin;

/// A running `panseal-keyd dev`; SIGKILLed on drop if still running.
struct Dev {
    child: Child,
    /// The back office's configuration (`client.json`).
    client_json: PathBuf,
    /// The front end's configuration (`checkout.json`).
    checkout_json: PathBuf,
    /// The address on the `ready` line.
    addr: String,
}

impl Dev {
    /// Starts `dev --dir DIR --listen 127.0.0.1:0` and reads its stdout up
    /// to the `ready ADDR` line.
    fn start(dir: &Path) -> Dev {
        let mut child = Command::new(keyd_bin())
            .args(["dev", "--dir", dir.to_str().unwrap()])
            .args(["--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(120);
        let (mut client_json, mut checkout_json) = (None, None);
        loop {
            let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            else {
                let _ = child.kill();
                let _ = child.wait();
                panic!("dev did not print `ready` within 120 s");
            };
            if let Some(p) = line.split("(seals and opens): ").nth(1) {
                client_json = Some(PathBuf::from(p.trim()));
            }
            if let Some(p) = line.split("(seals only): ").nth(1) {
                checkout_json = Some(PathBuf::from(p.trim()));
            }
            if let Some(addr) = line.strip_prefix("ready ") {
                // Keep draining its stdout.
                std::thread::spawn(move || for _ in rx {});
                return Dev {
                    child,
                    client_json: client_json.expect("client.json printed"),
                    checkout_json: checkout_json.expect("checkout.json printed"),
                    addr: addr.trim().to_owned(),
                };
            }
        }
    }

    /// SIGTERM, as a user's `kill` or a service manager does: exits 0.
    fn stop(mut self) {
        let pid = self.child.id().to_string();
        let st = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(st.success());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "dev stopped by SIGTERM: {status:?}");
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn panseal_from(json: &Path) -> Panseal {
    ClientConfig::from_file(json)
        .unwrap()
        .builder()
        .unwrap()
        .build()
        .await
        .unwrap()
}

fn access() -> Access {
    Access::new("dev-test", "refund").unwrap()
}

fn pan(i: u32) -> Pan {
    // Luhn-valid 16-digit test PANs.
    let body = format!("411111{i:09}");
    let digits: Vec<u32> = body.chars().map(|c| c.to_digit(10).unwrap()).collect();
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(k, &d)| {
            if k % 2 == 0 {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                d
            }
        })
        .sum();
    Pan::parse(&format!("{body}{}", (10 - sum % 10) % 10)).unwrap()
}

fn ctx(i: u32) -> Context {
    Context::new("cards", "pan", format!("row-{i}")).unwrap()
}

/// From `dev` to a PAN sealed through it with the printed `client.json`;
/// the front end's credential opens nothing; a restart on the same folder
/// (SIGTERM, then `dev` again) re-unseals and opens what was sealed before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_serves_the_printed_client_json_and_restarts_on_the_same_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("keyd-dev");
    let t0 = Instant::now();
    let dev = Dev::start(&dir);
    let ready = t0.elapsed();
    let ps = panseal_from(&dev.client_json).await;
    let first = ps.seal_pan(&pan(0), &ctx(0)).await.unwrap();
    let to_first_seal = t0.elapsed();
    println!(
        "panseal-keyd dev: ready after {} ms, first PAN sealed through it after {} ms \
         (certificates, keyd.toml, 2-of-3 init, unseal, client)",
        ready.as_millis(),
        to_first_seal.as_millis()
    );
    assert!(dev.client_json.starts_with(dir.canonicalize().unwrap()));
    // The readiness checks of scripts answer at once now.
    for how in [
        ["--address", dev.addr.as_str()],
        ["--file", dir.join("ready").to_str().unwrap()],
    ] {
        let out = Command::new(keyd_bin())
            .arg("wait")
            .args(how)
            .args(["--seconds", "5"])
            .output()
            .unwrap();
        assert!(out.status.success(), "wait {how:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("ready {}", dev.addr)
        );
    }
    assert_eq!(
        std::fs::read_to_string(dir.join("ready")).unwrap().trim(),
        dev.addr
    );
    let mut sealed: Vec<SealedPan> = vec![first];
    for i in 1..20 {
        sealed.push(ps.seal_pan(&pan(i), &ctx(i)).await.unwrap());
    }
    for (i, s) in sealed.iter().enumerate() {
        let opened = ps.open_pan(s, &ctx(i as u32), &access()).await.unwrap();
        assert_eq!(opened.pan, pan(i as u32));
    }
    // The shares the dev folder keeps for restarts: owner only.
    #[cfg(unix)]
    for c in ["alice", "bob", "carol"] {
        use std::os::unix::fs::PermissionsExt;
        let m = std::fs::metadata(dir.join(format!("shares/{c}.share")))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(m & 0o777, 0o600, "{c}.share");
    }
    assert!(dir.join("shares/DEV-ONLY.txt").exists());

    // Attacker view: the front end's certificate and configuration, the
    // key store and every sealed PAN. It seals, and opens nothing.
    let front = panseal_from(&dev.checkout_json).await;
    front.seal_pan(&pan(100), &ctx(100)).await.unwrap();
    let mut opened_by_front_end = 0;
    for (i, s) in sealed.iter().enumerate() {
        match front.open_pan(s, &ctx(i as u32), &access()).await {
            Ok(_) => opened_by_front_end += 1,
            Err(e) => assert!(
                matches!(
                    e,
                    panseal::Error::KeyService(panseal::KeyServiceError::PermissionDenied(_))
                ),
                "refused by keyd as not permitted: {e:?}"
            ),
        }
    }
    println!(
        "front end credential: {opened_by_front_end} of {} PANs opened",
        sealed.len()
    );
    assert_eq!(opened_by_front_end, 0);
    drop((ps, front));
    // A second `dev` on the same folder is refused and leaves the first's
    // ready file alone.
    let out = Command::new(keyd_bin())
        .args(["dev", "--dir", dir.to_str().unwrap()])
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already serves"), "{err}");
    assert!(dir.join("ready").exists());

    dev.stop();
    assert!(!dir.join("ready").exists(), "ready removed at stop");
    let t1 = Instant::now();
    let dev = Dev::start(&dir);
    println!(
        "panseal-keyd dev: restarted (re-unsealed) in {} ms",
        t1.elapsed().as_millis()
    );
    let ps = panseal_from(&dev.client_json).await;
    for (i, s) in sealed.iter().enumerate() {
        let opened = ps.open_pan(s, &ctx(i as u32), &access()).await.unwrap();
        assert_eq!(opened.pan, pan(i as u32));
    }
    drop(ps);
    dev.stop();
}

/// `--environment prod` (and a folder whose keyd.toml serves `prod`) is
/// refused with exit code 2 and "development only"; nothing is written.
#[test]
fn dev_refuses_production() {
    let tmp = tempfile::tempdir().unwrap();
    for env in ["prod", "production"] {
        let dir = tmp.path().join(format!("d-{env}"));
        let out = Command::new(keyd_bin())
            .args(["dev", "--dir", dir.to_str().unwrap(), "--environment", env])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{env}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("development only"), "{err}");
        assert!(!dir.exists(), "nothing written for {env}");
    }
    // A folder made by `dev`, whose keyd.toml is then edited to serve prod.
    let dir = tmp.path().join("keyd-dev");
    Dev::start(&dir).stop();
    let cfg = dir.join("keyd.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace(
            "environments = [\"dev\"]",
            "environments = [\"dev\", \"prod\"]",
        ),
    )
    .unwrap();
    let out = Command::new(keyd_bin())
        .args(["dev", "--dir", dir.to_str().unwrap()])
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("development only") && err.contains("\"prod\""),
        "{err}"
    );
}

/// `panseal-keyd wait`: exit 2 with a reason when nothing listens in time.
#[test]
fn wait_gives_up_with_a_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let out = Command::new(keyd_bin())
        .args(["wait", "--seconds", "1", "--file"])
        .arg(tmp.path().join("ready"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(t0.elapsed() < Duration::from_secs(10));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not ready after 1 s"), "{err}");
}
