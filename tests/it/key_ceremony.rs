//! `key_ceremony` against a real `panseal-keyd`: init through the tool
//! (each custodian collects their own share; the operator never holds one),
//! a custodian without acknowledgement is refused, one share leaves keyd
//! sealed, a second custodian's share unseals it.

use crate::common;
use crate::keyd_harness;

use std::process::{Command, Output, Stdio};

use common::example_binary;
use keyd_harness::Keyd;

fn tool(args: &[&str]) -> Output {
    Command::new(example_binary("key_ceremony"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn config(k: &Keyd, who: &str) -> String {
    let certs = k.path("certs");
    let p = k.path(&format!("{who}.json"));
    std::fs::write(
        &p,
        format!(
            r#"{{"environment":"test","scope":"m",
                "key_service":{{"type":"keyd","address":"{}","server_name":"localhost",
                  "ca_file":"{}","client_cert_file":"{}","client_key_file":"{}"}},
                "key_store":{{"type":"memory"}}}}"#,
            k.addr,
            certs.join("ca.pem").display(),
            certs.join(format!("{who}.pem")).display(),
            certs.join(format!("{who}.key.pem")).display()
        ),
    )
    .unwrap();
    p.to_str().unwrap().to_owned()
}

#[test]
fn ceremony_init_acknowledge_and_unseal() {
    // The harness initialised a 2-of-3 server; re-initialise it through the
    // tool into a fresh share directory to exercise `init` too.
    let mut k = Keyd::init();
    let data = k.path("data");
    std::fs::remove_dir_all(&data).unwrap();
    let shares = k.path("ceremony-shares");
    std::fs::create_dir_all(&shares).unwrap();
    let cfg = k.config_str().to_owned();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    k.addr = format!("127.0.0.1:{port}");
    let refused = tool(&[
        "init",
        "--keyd-bin",
        keyd_harness::keyd_bin().to_str().unwrap(),
        "--keyd-config",
        &cfg,
        "--threshold",
        "1",
        "--custodian",
        "alice",
        "--custodian",
        "bob",
        "--yes",
    ]);
    assert!(
        !refused.status.success(),
        "a threshold of 1 is no dual control"
    );
    let init = Command::new(example_binary("key_ceremony"))
        .args([
            "init",
            "--keyd-bin",
            keyd_harness::keyd_bin().to_str().unwrap(),
            "--keyd-config",
            &cfg,
            "--threshold",
            "2",
            "--custodian",
            "alice",
            "--custodian",
            "bob",
            "--custodian",
            "carol",
            "--listen",
            &k.addr,
            "--yes",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Each custodian collects their own share, once; the operator's
    // machine holds none.
    for c in ["alice", "bob", "carol"] {
        let me = config(&k, c);
        let f = shares.join(format!("{c}.share"));
        let mut o = tool(&[
            "collect",
            "--config",
            &me,
            "--share-file",
            f.to_str().unwrap(),
        ]);
        for _ in 0..50 {
            if o.status.success() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
            o = tool(&[
                "collect",
                "--config",
                &me,
                "--share-file",
                f.to_str().unwrap(),
            ]);
        }
        assert!(o.status.success(), "{}", text(&o));
        let again = tool(&[
            "collect",
            "--config",
            &me,
            "--share-file",
            k.path("x").to_str().unwrap(),
        ]);
        assert!(!again.status.success(), "a share is handed out once");
    }
    let out = init.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains("pks1-"), "init printed a share");
    for c in ["alice", "bob", "carol"] {
        assert!(shares.join(format!("{c}.share")).exists());
    }
    k.start();
    let alice = config(&k, "alice");
    let bob = config(&k, "bob");
    let share = |c: &str| {
        shares
            .join(format!("{c}.share"))
            .to_str()
            .unwrap()
            .to_owned()
    };

    let st = tool(&["status", "--config", &alice]);
    assert!(text(&st).contains("keyd is sealed"), "{}", text(&st));
    // No acknowledgement on record: refused, and the statement is shown.
    let o = tool(&[
        "unseal",
        "--config",
        &alice,
        "--share-file",
        &share("alice"),
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("PCI DSS 3.7.8"), "{}", text(&o));
    let o = tool(&[
        "unseal",
        "--config",
        &alice,
        "--share-file",
        &share("alice"),
        "--acknowledge",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("1 of 2 submitted"), "{}", text(&o));
    assert!(text(&o).contains("still sealed"));
    // Bob submitting Alice's share is refused; his own unseals.
    let o = tool(&[
        "unseal",
        "--config",
        &bob,
        "--share-file",
        &share("alice"),
        "--acknowledge",
    ]);
    assert!(!o.status.success(), "{}", text(&o));
    let o = tool(&[
        "unseal",
        "--config",
        &bob,
        "--share-file",
        &share("bob"),
        "--acknowledge",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("UNSEALED"), "{}", text(&o));
    // No share text reached the output.
    let alice_share = std::fs::read_to_string(share("alice")).unwrap();
    assert!(!text(&o).contains(alice_share.trim()));
    k.kill();
}
