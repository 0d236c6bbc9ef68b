//! `rotate_kek` against a real `panseal-keyd` and a real PostgreSQL: rotate
//! the scope's KEK, rewrap every stored record (DEKs never leave keyd),
//! retire and destroy the old version under dual control — and every card
//! still opens in a fresh process.

use crate::common;
use crate::keyd_harness;

use std::process::{Command, Output, Stdio};

use common::pg::PgServer;
use common::{example_binary, luhn_pan};
use keyd_harness::Keyd;
use panseal::config::ClientConfig;
use panseal::{Access, Context, KeyService, KeyState, KeyStore, Pan, Scope};

fn config(k: &Keyd, principal: &str, url: &str, dir: &std::path::Path) -> std::path::PathBuf {
    let certs = k.path("certs");
    let path = dir.join(format!("{principal}.json"));
    std::fs::write(
        &path,
        format!(
            r#"{{"environment":"test","scope":"merchant-1",
                "key_service":{{"type":"keyd","address":"{}","server_name":"localhost",
                  "ca_file":"{}","client_cert_file":"{}","client_key_file":"{}"}},
                "key_store":{{"type":"postgres","url":"{url}"}},
                "audit":{{"type":"jsonl","path":"{}"}},
                "policy":{{"max_uses":10}}}}"#,
            k.addr,
            certs.join("ca.pem").display(),
            certs.join(format!("{principal}.pem")).display(),
            certs.join(format!("{principal}.key.pem")).display(),
            dir.join("audit.jsonl").display(),
        ),
    )
    .unwrap();
    path
}

fn run(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(example_binary("rotate_kek"))
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_kek_rewraps_everything_and_old_versions_can_be_destroyed() {
    let k = Keyd::ready().await;
    let pg = PgServer::start();
    let url = pg.create_db("pay");
    let dir = tempfile::tempdir().unwrap();
    let app_cfg = config(&k, "app", &url, dir.path());
    let alice_cfg = config(&k, "alice", &url, dir.path());
    let app_config = ClientConfig::from_file(&app_cfg).unwrap();
    let app = app_config.builder().unwrap().build().await.unwrap();
    let pan = Pan::parse(&luhn_pan("4", 16, 9)).unwrap();
    let mut sealed = Vec::new();
    for i in 0..30 {
        let c = Context::new("cards", "pan", i.to_string()).unwrap();
        sealed.push((c.clone(), app.seal_pan(&pan, &c).await.unwrap()));
    }
    // Index keys live in keyd and only a custodian creates them (issue 10).
    k.client("alice")
        .create_index_key(&Scope::new("merchant-1").unwrap())
        .await
        .unwrap();
    let index = app.blind_index(&pan).await.unwrap();
    app.report_usage().await.unwrap();
    let store = panseal::PostgresKeyStore::connect(&url, 2).await.unwrap();
    let scope = Scope::new("merchant-1").unwrap();
    let versions = |recs: &Vec<panseal::WrappedDek>| {
        recs.iter()
            .map(|r| r.wrapped.kek.version)
            .collect::<std::collections::BTreeSet<_>>()
    };
    let records = store.list(Some(&scope)).await.unwrap();
    // 3 DEKs; the index key is inside keyd, not in the store.
    assert_eq!(records.len(), 3, "3 DEKs");
    assert_eq!(versions(&records), [1].into());

    let dry = run(&[
        "--config".as_ref(),
        app_cfg.as_os_str(),
        "--custodian-config".as_ref(),
        alice_cfg.as_os_str(),
        "--dry-run".as_ref(),
    ]);
    assert!(dry.status.success(), "{}", text(&dry));
    assert!(text(&dry).contains("dry run: nothing changed"));
    assert_eq!(
        versions(&store.list(Some(&scope)).await.unwrap()),
        [1].into()
    );

    // The application credential cannot rotate; the custodian's can.
    let refused = run(&[
        "--config".as_ref(),
        app_cfg.as_os_str(),
        "--custodian-config".as_ref(),
        app_cfg.as_os_str(),
        "--yes".as_ref(),
        "--quiet".as_ref(),
    ]);
    assert!(!refused.status.success());
    assert!(text(&refused).contains("permission"), "{}", text(&refused));

    let out = run(&[
        "--config".as_ref(),
        app_cfg.as_os_str(),
        "--custodian-config".as_ref(),
        alice_cfg.as_os_str(),
        "--yes".as_ref(),
        "--quiet".as_ref(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("rewrapped 3 record(s) to version 2"),
        "{}",
        text(&out)
    );
    assert_eq!(
        versions(&store.list(Some(&scope)).await.unwrap()),
        [2].into()
    );
    // Re-running changes nothing.
    let again = run(&[
        "--config".as_ref(),
        app_cfg.as_os_str(),
        "--no-rotate".as_ref(),
        "--yes".as_ref(),
        "--quiet".as_ref(),
    ]);
    assert!(again.status.success(), "{}", text(&again));
    assert!(
        text(&again).contains("rewrapped 0 record(s)"),
        "{}",
        text(&again)
    );

    // Old version: retired, then destroyed by two custodians.
    let alice = k.client("alice");
    alice.retire(&scope, 1).await.unwrap();
    alice.approve_destroy(&scope, 1).await.unwrap();
    let bob = k.client("bob");
    let destroyed = bob.approve_destroy(&scope, 1).await.unwrap();
    assert!(destroyed.destroyed);

    // A fresh process opens every card and computes the same index.
    let fresh = app_config.builder().unwrap().build().await.unwrap();
    let access = Access::new("verifier", "test").unwrap();
    for (c, s) in &sealed {
        assert_eq!(fresh.open_pan(s, c, &access).await.unwrap().pan, pan);
    }
    assert_eq!(fresh.blind_index(&pan).await.unwrap(), index);
    for r in store.list(Some(&scope)).await.unwrap() {
        assert_ne!(r.state, KeyState::Destroyed);
    }
}
