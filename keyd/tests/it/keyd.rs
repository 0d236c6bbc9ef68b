//! `panseal-keyd` as a real process on 127.0.0.1: the KeyService suite's
//! custodian cycle (two custodians, a KEK per scope), policy,
//! sealing, quotas, audit chain, crash safety, load, and the core API over
//! `RemoteKeyService`.

use crate::keyd_harness;
use crate::keyservice_conformance;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use keyd_harness::{Keyd, ACK};
use keyservice_conformance::Backend;
use panseal::hazmat::dek_bytes;
use panseal::keyd::ShareText;
use panseal::{
    Access, Context, Dek, Environment, Error, KeyId, KeyPurpose, KeyRequest, KeyService,
    KeyServiceError, KeyStore, MemoryAuditSink, MemoryKeyStore, Pan, Panseal, RemoteKeyService,
    Scope,
};

fn req(env: &str, scope: &str, purpose: KeyPurpose) -> KeyRequest {
    KeyRequest {
        id: KeyId::random(),
        scope: Scope::new(scope).unwrap(),
        environment: Environment::new(env).unwrap(),
        purpose,
    }
}

fn access() -> Access {
    Access::new("clerk-7", "refund").unwrap()
}

fn is_denied(r: Result<impl Sized, KeyServiceError>) -> bool {
    matches!(r, Err(KeyServiceError::PermissionDenied(_)))
}

/// The custodian side for the suite's custodian cycle: two custodians,
/// a KEK per scope.
struct KeydCustodians {
    first: RemoteKeyService,
    second: RemoteKeyService,
    scope: Scope,
}

#[async_trait]
impl Backend for KeydCustodians {
    fn name(&self) -> &str {
        "keyd-custodians"
    }
    async fn rotate_kek(&self, _ks: &dyn KeyService, scope: &Scope) -> u32 {
        self.first.rotate(scope).await.unwrap().active_version
    }
    async fn destroy_kek(&self, version: u32) {
        let a = self
            .first
            .approve_destroy(&self.scope, version)
            .await
            .unwrap();
        assert!(!a.destroyed, "one approval must not destroy");
        let b = self
            .second
            .approve_destroy(&self.scope, version)
            .await
            .unwrap();
        assert!(b.destroyed);
    }
    fn has_outage(&self) -> bool {
        false
    }
    async fn begin_outage(&self) {
        unreachable!("the custodian cycle has no outage step")
    }
    async fn end_outage(&self) {
        unreachable!("the custodian cycle has no outage step")
    }
}

#[tokio::test]
async fn keyd_conforms_to_the_key_service_suite() {
    let k = Keyd::ready().await;
    let app = k.client_with("app", |b| b.scope("conf-1"));
    let admin = KeydCustodians {
        first: k.client("alice"),
        second: k.client("bob"),
        scope: Scope::new("conf-1").unwrap(),
    };
    keyservice_conformance::custodian_cycle(&app, &admin, "test", "prod", "conf-1", "conf-2").await;
    // Connection reuse: far fewer TLS connections than requests.
    assert!(app.requests_made() > 20);
    assert!(
        app.connections_opened() <= 2,
        "{} connections for {} requests",
        app.connections_opened(),
        app.requests_made()
    );
}

#[tokio::test]
async fn policy_matrix() {
    let k = Keyd::ready().await;
    let app = k.client("app");
    let d = req("test", "m-1", KeyPurpose::Data);
    let i = req("test", "m-1", KeyPurpose::Index);
    let (dek, wd) = app.generate(&d).await.unwrap();
    // Index keys are never generated for a caller (issue 10): the wrap an
    // attacker could present is one the data path made, relabelled.
    assert!(is_denied(app.generate(&i).await));
    let wi = wd.clone();

    // wrap: wrapper may, reader/indexer/rewrapper/custodian/auditor may not.
    let wrapper = k.client("wrapper");
    let fresh = Dek::generate();
    assert!(wrapper
        .wrap(&req("test", "m-1", KeyPurpose::Data), &fresh)
        .await
        .is_ok());
    let (own, own_w) = wrapper
        .generate(&req("test", "m-1", KeyPurpose::Data))
        .await
        .unwrap();
    for who in ["reader", "indexer", "rewrapper", "alice", "auditor"] {
        let c = k.client(who);
        assert!(
            is_denied(c.wrap(&req("test", "m-1", KeyPurpose::Data), &fresh).await),
            "{who} wrap"
        );
        assert!(
            is_denied(c.generate(&req("test", "m-1", KeyPurpose::Data)).await),
            "{who} generate"
        );
    }

    // A wrap-only credential never obtains a DEK it did not just create:
    // not the application's, not even its own from an earlier request.
    assert!(is_denied(wrapper.unwrap(&d, &wd, &access()).await));
    assert!(is_denied(wrapper.unwrap(&i, &wi, &access()).await));
    let own_req = KeyRequest { ..d.clone() };
    drop((own, own_w, own_req));
    assert!(is_denied(wrapper.rewrap(&d, &wd).await));

    // unwrap (data keys): reader may; indexer may not. index: the reverse.
    let reader = k.client("reader");
    let got = reader.unwrap(&d, &wd, &access()).await.unwrap();
    assert_eq!(dek_bytes(&got), dek_bytes(&dek));
    assert!(is_denied(reader.unwrap(&i, &wi, &access()).await));
    let indexer = k.client("indexer");
    // `index` no longer unwraps anything (keyed hashes are computed in keyd).
    assert!(is_denied(indexer.unwrap(&i, &wi, &access()).await));
    assert!(is_denied(indexer.unwrap(&d, &wd, &access()).await));

    // rewrap: rewrapper may (and gets no key), reader may not.
    let rewrapper = k.client("rewrapper");
    let rw = rewrapper.rewrap(&d, &wd).await.unwrap();
    assert_eq!(
        dek_bytes(&reader.unwrap(&d, &rw, &access()).await.unwrap()),
        dek_bytes(&dek)
    );
    assert!(is_denied(reader.rewrap(&d, &wd).await));

    // custodian: alice may rotate; app may not.
    let m1 = Scope::new("m-1").unwrap();
    assert_eq!(
        k.client("alice").rotate(&m1).await.unwrap().active_version,
        2
    );
    let rw = rewrapper.rewrap(&d, &wd).await.unwrap();
    assert_eq!(rw.kek.version, 2);
    assert!(is_denied(app.rotate(&m1).await));
    assert!(is_denied(app.approve_destroy(&m1, 1).await));
    assert!(is_denied(app.retire(&m1, 1).await));

    // audit-read: auditor may; app may not.
    assert!(!k
        .client("auditor")
        .audit_records(1, 5)
        .await
        .unwrap()
        .is_empty());
    assert!(is_denied(app.audit_records(1, 5).await));

    // Cross-scope: m1app may use m-1 only.
    let m1app = k.client("m1app");
    assert!(m1app.unwrap(&d, &wd, &access()).await.is_ok());
    let d2 = req("test", "m-2", KeyPurpose::Data);
    let (_, wd2) = app.generate(&d2).await.unwrap();
    assert!(is_denied(m1app.unwrap(&d2, &wd2, &access()).await));
    assert!(is_denied(m1app.generate(&d2).await));
    // A record moved to another scope fails even for a principal of both.
    let mut moved = d.clone();
    moved.scope = Scope::new("m-2").unwrap();
    assert_eq!(
        app.unwrap(&moved, &wd, &access()).await.unwrap_err(),
        KeyServiceError::UnwrapFailed
    );

    // Cross-environment: a prod key is refused to a test client and the
    // reverse, even with the same scope name.
    let prod = k.client("prodapp");
    let pd = req("prod", "m-1", KeyPurpose::Data);
    let (_, pw) = prod.generate(&pd).await.unwrap();
    let e = app.unwrap(&pd, &pw, &access()).await.unwrap_err();
    assert!(matches!(e, KeyServiceError::Environment { .. }), "{e:?}");
    let e = prod.unwrap(&d, &wd, &access()).await.unwrap_err();
    assert!(matches!(e, KeyServiceError::Environment { .. }), "{e:?}");
    // A test key relabelled as prod does not open under prod either.
    let mut relabelled = d.clone();
    relabelled.environment = Environment::new("prod").unwrap();
    assert!(prod.unwrap(&relabelled, &wd, &access()).await.is_err());

    // Dual control: destroy needs two different custodians.
    let alice = k.client("alice");
    let first = alice.approve_destroy(&m1, 1).await.unwrap();
    assert!(!first.destroyed);
    assert_eq!(first.approvals, vec!["alice".to_string()]);
    let again = alice.approve_destroy(&m1, 1).await.unwrap_err();
    assert!(matches!(again, KeyServiceError::Other(_)), "{again:?}");
    // Still unwraps: one custodian alone destroyed nothing.
    assert!(reader.unwrap(&d, &wd, &access()).await.is_ok());
    let second = k.client("bob").approve_destroy(&m1, 1).await.unwrap();
    assert!(second.destroyed);
    let e = reader.unwrap(&d, &wd, &access()).await.unwrap_err();
    assert!(matches!(e, KeyServiceError::KekDestroyed(_)), "{e:?}");
    // The rewrapped copy (under v2) survives.
    assert!(reader.unwrap(&d, &rw, &access()).await.is_ok());
    // The newest version cannot be destroyed.
    assert!(alice.approve_destroy(&m1, 2).await.is_err());

    // An unknown certificate (signed by another CA) gets nothing.
    let other = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(keyd_harness::keyd_bin())
        .args([
            "gen-dev-certs",
            "--out",
            other.path().to_str().unwrap(),
            "--client",
            "app",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let stranger = RemoteKeyService::builder()
        .address(&k.addr)
        .server_name("localhost")
        .ca_pem_file(k.path("certs/ca.pem"))
        .client_identity_pem_files(
            other.path().join("app.pem"),
            other.path().join("app.key.pem"),
        )
        .environment("test")
        .retries(0, Duration::from_millis(1))
        .build()
        .unwrap();
    assert!(stranger.unwrap(&d, &rw, &access()).await.is_err());

    // Every refusal above is in the audit log, attributed.
    let lines = k.audit_lines();
    assert!(lines.iter().any(|l| l.contains("\"principal\":\"wrapper\"")
        && l.contains("\"operation\":\"unwrap\"")
        && l.contains("permission-denied")));
    assert!(lines.iter().any(|l| l.contains("\"principal\":\"bob\"")
        && l.contains("kek-destroy-approve")
        && l.contains("\"outcome\":\"success\"")));
}

#[tokio::test]
async fn sealed_server_serves_nothing_until_k_distinct_acknowledged_shares() {
    let mut k = Keyd::init();
    k.start();
    let app = k.client("app");
    let d = req("test", "m-1", KeyPurpose::Data);
    assert_eq!(app.generate(&d).await.unwrap_err(), KeyServiceError::Sealed);
    assert!(!KeyServiceError::Sealed.is_retryable());
    assert!(matches!(app.kek_info().await, Err(KeyServiceError::Sealed)));
    let status = app.status().await.unwrap();
    assert!(status.sealed);
    assert_eq!(status.threshold, 2);

    let alice = k.client("alice");
    let bob = k.client("bob");
    let mallory = k.client("mallory");
    // No acknowledgement on record: share refused.
    let e = alice.unseal(k.share("alice")).await.unwrap_err();
    assert!(matches!(e, KeyServiceError::PermissionDenied(_)), "{e:?}");
    alice.acknowledge(ACK).await.unwrap();
    bob.acknowledge(ACK).await.unwrap();
    mallory.acknowledge(ACK).await.unwrap();
    // A custodian without a share, someone else's share, a damaged share,
    // and garbage: all refused without detail.
    assert!(mallory.unseal(k.share("alice")).await.is_err());
    let e = bob.unseal(k.share("alice")).await.unwrap_err();
    assert_eq!(e, KeyServiceError::Other("share refused".into()));
    let mut damaged = k.share("bob").expose_secret().to_owned();
    let pos = 20;
    let c = if &damaged[pos..=pos] == "a" { "b" } else { "a" };
    damaged.replace_range(pos..=pos, c);
    assert!(bob.unseal(ShareText::new(damaged)).await.is_err());
    assert!(bob
        .unseal(ShareText::new("pks1-00-00".into()))
        .await
        .is_err());
    // k-1 = 1 valid share: still sealed.
    let s = alice.unseal(k.share("alice")).await.unwrap();
    assert!(s.sealed);
    assert_eq!(s.submitted, vec!["alice".to_string()]);
    // The same custodian twice does not count.
    let e = alice.unseal(k.share("alice")).await.unwrap_err();
    assert!(matches!(e, KeyServiceError::Other(_)), "{e:?}");
    assert_eq!(app.generate(&d).await.unwrap_err(), KeyServiceError::Sealed);
    // The app cannot submit shares at all.
    assert!(is_denied(app.unseal(k.share("bob")).await));
    // k = 2 distinct shares: unsealed and serving.
    assert!(!bob.unseal(k.share("bob")).await.unwrap().sealed);
    let (dek, w) = app.generate(&d).await.unwrap();
    assert_eq!(
        dek_bytes(&app.unwrap(&d, &w, &access()).await.unwrap()),
        dek_bytes(&dek)
    );

    // Restart: sealed again (the master key is never on disk); alice and
    // carol (another pair) unseal, acknowledgements persisted.
    k.kill();
    k.start();
    let app = k.client("app");
    assert_eq!(
        app.unwrap(&d, &w, &access()).await.unwrap_err(),
        KeyServiceError::Sealed
    );
    k.client("alice").unseal(k.share("alice")).await.unwrap();
    let carol = k.client("carol");
    assert!(is_denied(carol.unseal(k.share("carol")).await));
    carol.acknowledge(ACK).await.unwrap();
    assert!(!carol.unseal(k.share("carol")).await.unwrap().sealed);
    assert_eq!(
        dek_bytes(&app.unwrap(&d, &w, &access()).await.unwrap()),
        dek_bytes(&dek)
    );
    // Sealing on demand forgets the keys.
    carol.seal().await.unwrap();
    assert_eq!(
        app.unwrap(&d, &w, &access()).await.unwrap_err(),
        KeyServiceError::Sealed
    );
    // No share or key material appears in the audit log.
    let log = k.audit_lines().join("\n");
    for c in ["alice", "bob", "carol"] {
        let share = k.share(c);
        assert!(!log.contains(&share.expose_secret()[5..40]));
    }
    assert!(log.contains("unseal-share"));
}

#[tokio::test]
async fn unwrap_quota_is_refused_and_audited() {
    let k = Keyd::ready().await;
    let limited = k.client("limited");
    // 6 unwrap requests and 3 distinct keys per hour.
    let mut keys = Vec::new();
    for _ in 0..4 {
        let r = req("test", "m-1", KeyPurpose::Data);
        let (_, w) = limited.generate(&r).await.unwrap();
        keys.push((r, w));
    }
    for (r, w) in &keys[..3] {
        limited.unwrap(r, w, &access()).await.unwrap();
    }
    // A fourth distinct key is refused...
    let e = limited
        .unwrap(&keys[3].0, &keys[3].1, &access())
        .await
        .unwrap_err();
    assert!(matches!(e, KeyServiceError::QuotaExceeded(_)), "{e:?}");
    assert!(e.to_string().contains("distinct keys"), "{e}");
    // ...while the same keys may be read again up to the request limit.
    for (r, w) in &keys[..3] {
        limited.unwrap(r, w, &access()).await.unwrap();
    }
    let e = limited
        .unwrap(&keys[0].0, &keys[0].1, &access())
        .await
        .unwrap_err();
    assert!(matches!(e, KeyServiceError::QuotaExceeded(_)), "{e:?}");
    assert!(e.to_string().contains("unwraps per"), "{e}");
    // Other principals are not affected.
    assert!(k
        .client("app")
        .unwrap(&keys[3].0, &keys[3].1, &access())
        .await
        .is_ok());
    // Refusals are audited with principal, key and on-behalf-of.
    let refused: Vec<_> = k
        .audit_lines()
        .into_iter()
        .filter(|l| l.contains("quota-exceeded"))
        .collect();
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(refused[0].contains("\"principal\":\"limited\""));
    assert!(refused[0].contains(&format!("\"key_id\":\"{}\"", keys[3].0.id)));
    assert!(refused[0].contains("\"on_behalf_of\":\"clerk-7\""));
}

#[tokio::test]
async fn audit_chain_tamper_is_detected_at_that_record() {
    let mut k = Keyd::ready().await;
    let app = k.client("app");
    for _ in 0..5 {
        let r = req("test", "m-1", KeyPurpose::Data);
        let (_, w) = app.generate(&r).await.unwrap();
        app.unwrap(&r, &w, &access()).await.unwrap();
    }
    k.kill();
    let (code, out) = k.verify_audit();
    assert_eq!(code, 0, "{out}");
    let lines = k.audit_lines();
    assert!(lines.len() > 12);
    let path = k.path("data/audit.log");
    let original = std::fs::read(&path).unwrap();
    let write = |l: &[String]| std::fs::write(&path, l.join("\n") + "\n").unwrap();

    // Edit record 8: the principal.
    let mut edited = lines.clone();
    edited[7] = edited[7].replacen("\"principal\":\"", "\"principal\":\"x", 1);
    write(&edited);
    let (code, out) = k.verify_audit();
    assert_eq!(code, 1);
    assert!(out.contains("at record 8"), "{out}");
    // The server refuses to start on a broken log.
    assert!(k.start_fails().contains("record 8"));

    // Delete record 6.
    let mut deleted = lines.clone();
    deleted.remove(5);
    write(&deleted);
    let (code, out) = k.verify_audit();
    assert_eq!(code, 1);
    assert!(out.contains("at record 6"), "{out}");

    // Swap records 4 and 9.
    let mut swapped = lines.clone();
    swapped.swap(3, 8);
    write(&swapped);
    let (code, out) = k.verify_audit();
    assert_eq!(code, 1);
    assert!(out.contains("at record 4"), "{out}");

    std::fs::write(&path, original).unwrap();
    assert_eq!(k.verify_audit().0, 0);
    k.start();
    k.unseal().await;
}

#[tokio::test]
async fn corrupted_state_is_refused_at_start() {
    let k = Keyd::init();
    let path = k.path("data/state.bin");
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    std::fs::write(&path, &bytes).unwrap();
    let err = k.start_fails();
    assert!(err.contains("corrupt"), "{err}");
    bytes.truncate(mid);
    std::fs::write(&path, &bytes).unwrap();
    assert!(k.start_fails().contains("corrupt"));
    std::fs::remove_file(&path).unwrap();
    assert!(k.start_fails().contains("init"));
}

#[tokio::test]
async fn kill_9_during_rotation_loses_no_acknowledged_change() {
    let mut k = Keyd::ready().await;
    let scope = Scope::new("crash-1").unwrap();
    let app = k.client("app");
    // Rotate in a loop while wrapping under each new version, and kill -9
    // the server in the middle.
    let acknowledged = Arc::new(AtomicU64::new(0));
    let wrapped = Arc::new(std::sync::Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let alice = k.client_with("alice", |b| b.retries(0, Duration::from_millis(1)));
    let app2 = k.client_with("app", |b| b.retries(0, Duration::from_millis(1)));
    let task = {
        let (ack, wrapped, stop, scope) = (
            acknowledged.clone(),
            wrapped.clone(),
            stop.clone(),
            scope.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                match alice.rotate(&scope).await {
                    Ok(s) => ack.store(u64::from(s.active_version), Ordering::SeqCst),
                    Err(_) => break,
                }
                let r = req("test", "crash-1", KeyPurpose::Data);
                match app2.generate(&r).await {
                    Ok((dek, w)) => wrapped.lock().unwrap().push((r, w, dek_bytes(&dek))),
                    Err(_) => break,
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    k.kill();
    stop.store(true, Ordering::SeqCst);
    task.await.unwrap();
    let acked = acknowledged.load(Ordering::SeqCst) as u32;
    assert!(
        acked >= 3,
        "rotation loop made too little progress: {acked}"
    );

    k.start();
    k.unseal().await;
    let status = k.client("alice").kek_status(&scope).await.unwrap();
    assert!(
        status.active_version >= acked,
        "acknowledged version {acked} lost (now {})",
        status.active_version
    );
    for v in 1..=acked {
        assert!(
            status.versions.iter().any(|x| x.version == v),
            "version {v} missing"
        );
    }
    let wrapped = std::mem::take(&mut *wrapped.lock().unwrap());
    assert!(!wrapped.is_empty());
    for (r, w, bytes) in wrapped.iter() {
        let got = app.unwrap(r, w, &access()).await.unwrap();
        assert_eq!(&dek_bytes(&got), bytes);
    }
    // And the audit chain survived the kill.
    k.kill();
    assert_eq!(k.verify_audit().0, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_for_a_bounded_time_lose_nothing() {
    let k = Keyd::ready().await;
    let setup = k.client("app");
    let mut keys = Vec::new();
    for _ in 0..8 {
        let r = req("test", "load-1", KeyPurpose::Data);
        let (dek, w) = setup.generate(&r).await.unwrap();
        keys.push((r, w, dek_bytes(&dek)));
    }
    let keys = Arc::new(keys);
    let before = k.audit_lines().len();
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut tasks = Vec::new();
    const CLIENTS: usize = 8;
    for c in 0..CLIENTS {
        let client = k.client("app");
        let keys = keys.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline && n < 20_000 {
                let (r, w, bytes) = &keys[(c + n as usize) % keys.len()];
                let got = client
                    .unwrap(r, w, &access())
                    .await
                    .expect("unwrap under load");
                assert_eq!(&dek_bytes(&got), bytes);
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert!(total > 100, "only {total} unwraps");
    // No lost requests: one audit record per request, every one a success.
    let lines = k.audit_lines();
    let new: Vec<_> = lines[before..]
        .iter()
        .filter(|l| l.contains("\"operation\":\"unwrap\""))
        .collect();
    assert_eq!(new.len() as u64, total);
    assert!(new.iter().all(|l| l.contains("\"outcome\":\"success\"")));
    eprintln!("load: {CLIENTS} clients, {total} unwraps in 3 s");
}

#[tokio::test]
async fn panseal_over_remote_key_service_seals_opens_and_survives_outages() {
    let mut k = Keyd::ready().await;
    let ks = k.client_with("app", |b| b.scope("merchant-9"));
    let store = MemoryKeyStore::new();
    let audit = Arc::new(MemoryAuditSink::new());
    let ps = Panseal::builder()
        .key_service(ks.clone())
        .key_store(store.clone())
        .audit_arc(audit.clone())
        .environment("test")
        .scope("merchant-9")
        .build()
        .await
        .unwrap();
    let pan = Pan::parse("4111 1111 1111 1111").unwrap();
    let ctx = Context::new("cards", "pan", "row-1").unwrap();
    let sealed = ps.seal_pan(&pan, &ctx).await.unwrap();
    assert_eq!(
        ps.open_pan(&sealed, &ctx, &access()).await.unwrap().pan,
        pan
    );

    // Steady state: opens and seals from the DEK cache make no call.
    let calls = ks.requests_made();
    for i in 0..50 {
        let c = Context::new("cards", "pan", format!("row-{i}").as_bytes()).unwrap();
        let s = ps.seal_pan(&pan, &c).await.unwrap();
        assert_eq!(ps.open_pan(&s, &c, &access()).await.unwrap().pan, pan);
    }
    assert_eq!(
        ks.requests_made(),
        calls,
        "steady-state seal/open called keyd"
    );

    // A second application instance (empty cache) opens via one unwrap.
    let ks2 = k.client_with("app", |b| b.scope("merchant-9"));
    let ps2 = Panseal::builder()
        .key_service(ks2.clone())
        .key_store(store.clone())
        .audit(MemoryAuditSink::new())
        .environment("test")
        .scope("merchant-9")
        .build()
        .await
        .unwrap();
    let before = ks2.requests_made();
    assert_eq!(
        ps2.open_pan(&sealed, &ctx, &access()).await.unwrap().pan,
        pan
    );
    // One unwrap, after keyd verified the DEK's record (issue 10); the
    // builder's kek-info and whoami may be counted here too.
    let made = ks2.requests_made() - before;
    assert!((2..=4).contains(&made), "{made} requests");
    let tail: Vec<String> = k.audit_lines().into_iter().rev().take(2).collect();
    assert!(tail[0].contains("\"operation\":\"unwrap\""), "{tail:?}");
    assert!(
        tail[1].contains("\"operation\":\"record-verify\""),
        "{tail:?}"
    );

    assert!(k
        .audit_lines()
        .iter()
        .any(|l| l.contains("\"operation\":\"unwrap\"")
            && l.contains("\"on_behalf_of\":\"clerk-7\"")));

    // keyd down: cached opens still work; an instance without the key gets
    // a clear, retryable error, and nothing is lost.
    k.kill();
    assert_eq!(
        ps.open_pan(&sealed, &ctx, &access()).await.unwrap().pan,
        pan
    );
    let ks3 = k.client_with("app", |b| b.scope("merchant-9"));
    let e = ks3.kek_info().await.unwrap_err();
    assert!(matches!(e, KeyServiceError::Unavailable(_)), "{e:?}");
    assert!(e.is_retryable());
    let direct = ks3
        .unwrap(
            &req("test", "merchant-9", KeyPurpose::Data),
            &panseal::WrappedKey {
                kek: panseal::KekRef {
                    id: "keyd/test/merchant-9".into(),
                    version: 1,
                },
                bytes: vec![0; 60],
            },
            &access(),
        )
        .await
        .unwrap_err();
    assert!(direct.is_retryable(), "{direct:?}");
    let records_before = store.list(None).await.unwrap().len();

    k.start();
    // Sealed after restart: a typed error, not a hang.
    let ps3 = Panseal::builder()
        .key_service(ks3.clone())
        .key_store(store.clone())
        .audit(MemoryAuditSink::new())
        .environment("test")
        .scope("merchant-9")
        .build()
        .await;
    assert!(
        matches!(ps3, Err(Error::KeyService(KeyServiceError::Sealed))),
        "{ps3:?}"
    );
    k.unseal().await;
    let ks4 = k.client_with("app", |b| b.scope("merchant-9"));
    let ps4 = Panseal::builder()
        .key_service(ks4)
        .key_store(store.clone())
        .audit(MemoryAuditSink::new())
        .environment("test")
        .scope("merchant-9")
        .build()
        .await
        .unwrap();
    assert_eq!(
        ps4.open_pan(&sealed, &ctx, &access()).await.unwrap().pan,
        pan
    );
    assert_eq!(store.list(None).await.unwrap().len(), records_before);

    // An encrypt-only front end seals through keyd but cannot open.
    let front = Panseal::builder()
        .key_service(k.client_with("wrapper", |b| b.scope("merchant-9")))
        .key_store(store.clone())
        .audit(MemoryAuditSink::new())
        .environment("test")
        .scope("merchant-9")
        .build()
        .await
        .unwrap();
    let s = front.seal_pan(&pan, &ctx).await.unwrap();
    let e = Panseal::builder()
        .key_service(k.client_with("wrapper", |b| b.scope("merchant-9")))
        .key_store(store.clone())
        .audit(MemoryAuditSink::new())
        .environment("test")
        .scope("merchant-9")
        .build()
        .await
        .unwrap()
        .open_pan(&s, &ctx, &access())
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::KeyService(KeyServiceError::PermissionDenied(_))),
        "{e:?}"
    );
    assert_eq!(ps4.open_pan(&s, &ctx, &access()).await.unwrap().pan, pan);
    // The audit log never holds the PAN.
    assert!(!k.audit_lines().join("\n").contains("4111111111111111"));
}

#[tokio::test]
async fn unreachable_server_is_a_retryable_unavailable_error() {
    // A port with nobody listening.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let k = Keyd::init();
    let c = RemoteKeyService::builder()
        .address(&format!("127.0.0.1:{port}"))
        .server_name("localhost")
        .ca_pem_file(k.path("certs/ca.pem"))
        .client_identity_pem_files(k.path("certs/app.pem"), k.path("certs/app.key.pem"))
        .environment("test")
        .retries(2, Duration::from_millis(10))
        .build()
        .unwrap();
    let t = Instant::now();
    let e = c
        .generate(&req("test", "m", KeyPurpose::Data))
        .await
        .unwrap_err();
    assert!(matches!(e, KeyServiceError::Unavailable(_)), "{e:?}");
    assert!(e.is_retryable());
    assert!(e.to_string().contains("cannot connect"), "{e}");
    // Two retries with 10 + 20 ms backoff, then give up.
    assert!(t.elapsed() >= Duration::from_millis(30));
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn custodians_use_the_command_line_tool() {
    let mut k = Keyd::init();
    k.start();
    // Unseal with the CLI: acknowledgement first, then the share file.
    let share_file = k.path("shares/alice.share");
    let share_file = share_file.to_str().unwrap();
    let (ok, _, err) = k.custodian_cli("alice", "unseal", &["--share-file", share_file]);
    assert!(!ok && err.contains("acknowledgement"), "{err}");
    for c in ["alice", "bob"] {
        let (ok, out, err) = k.custodian_cli(c, "acknowledge", &[]);
        assert!(ok, "{err}");
        assert!(out.contains("\"acknowledged\": true"), "{out}");
        let f = k.path(&format!("shares/{c}.share"));
        let (ok, out, err) = k.custodian_cli(c, "unseal", &["--share-file", f.to_str().unwrap()]);
        assert!(ok, "{err}");
        // The share never appears in the output.
        let share = k.share(c);
        assert!(!out.contains(&share.expose_secret()[5..30]));
    }
    let (ok, out, _) = k.custodian_cli("carol", "status", &[]);
    assert!(ok && out.contains("\"sealed\": false"), "{out}");
    // Rotate twice (the first creates the scope's KEK), retire and destroy
    // v1 under dual control.
    for v in [1, 2] {
        let (ok, out, err) = k.custodian_cli("alice", "rotate", &["--scope", "cli-1"]);
        assert!(ok, "{err}");
        assert!(out.contains(&format!("\"active_version\": {v}")), "{out}");
    }
    let (ok, out, _) = k.custodian_cli("bob", "kek-status", &["--scope", "cli-1"]);
    assert!(ok && out.contains("\"active_version\": 2"), "{out}");
    let (ok, _, err) = k.custodian_cli("bob", "retire", &["--scope", "cli-1", "--version", "2"]);
    assert!(!ok && err.contains("newest"), "{err}");
    let (ok, out, _) = k.custodian_cli("bob", "retire", &["--scope", "cli-1", "--version", "1"]);
    assert!(ok && out.contains("decrypt-only"), "{out}");
    let (ok, out, _) = k.custodian_cli(
        "alice",
        "approve-destroy",
        &["--scope", "cli-1", "--version", "1"],
    );
    assert!(ok && out.contains("\"destroyed\": false"), "{out}");
    let (ok, _, err) = k.custodian_cli(
        "alice",
        "approve-destroy",
        &["--scope", "cli-1", "--version", "1"],
    );
    assert!(!ok && err.contains("dual control"), "{err}");
    let (ok, out, _) = k.custodian_cli(
        "carol",
        "approve-destroy",
        &["--scope", "cli-1", "--version", "1"],
    );
    assert!(ok && out.contains("\"destroyed\": true"), "{out}");
    // An application credential cannot use the custodian actions.
    let (ok, _, err) = k.custodian_cli("app", "rotate", &["--scope", "cli-1"]);
    assert!(!ok && err.contains("permission denied"), "{err}");
    // Destruction survives a restart (durable state).
    k.kill();
    k.start();
    k.unseal().await;
    let s = k
        .client("alice")
        .kek_status(&Scope::new("cli-1").unwrap())
        .await
        .unwrap();
    assert_eq!(s.versions[0].state, panseal::KeyState::Destroyed);
    assert_eq!(
        s.versions[0].destroy_approvals,
        vec!["alice".to_string(), "carol".to_string()]
    );
    assert_eq!(s.active_version, 2);
}

#[tokio::test]
async fn bearer_tokens_work_only_when_enabled_and_match() {
    let token = "dev-secret-token";
    let hash = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(token.as_bytes()))
    };
    let mut k = Keyd::init_with(
        "allow_bearer_tokens = true\n",
        &format!(
            "\n[[principal]]\nname = \"dev\"\ntoken_sha256 = \"{hash}\"\nenvironment = \"test\"\n\
             scopes = [\"dev-1\"]\npermissions = [\"wrap\"]\n"
        ),
    );
    k.start();
    k.unseal().await;
    let with_token = |t: &str| {
        RemoteKeyService::builder()
            .address(&k.addr)
            .server_name("localhost")
            .ca_pem_file(k.path("certs/ca.pem"))
            .bearer_token(t)
            .environment("test")
            .build()
            .unwrap()
    };
    let dev = with_token(token);
    let r = req("test", "dev-1", KeyPurpose::Data);
    let (_, w) = dev.generate(&r).await.unwrap();
    assert!(is_denied(dev.unwrap(&r, &w, &access()).await));
    assert!(is_denied(
        dev.generate(&req("test", "other", KeyPurpose::Data)).await
    ));
    let wrong = with_token("not-the-token");
    assert!(is_denied(wrong.generate(&r).await));
    // Certificates keep working beside tokens.
    assert!(k.client("app").unwrap(&r, &w, &access()).await.is_ok());
    assert!(k
        .audit_lines()
        .iter()
        .any(|l| l.contains("\"principal\":\"dev\"") && l.contains("\"operation\":\"generate\"")));
}

#[tokio::test]
async fn a_token_principal_is_refused_in_the_configuration_unless_enabled() {
    let k = Keyd::init();
    let cfg = std::fs::read_to_string(k.path("keyd.toml")).unwrap()
        + "\n[[principal]]\nname = \"dev\"\ntoken_sha256 = \"00\"\nenvironment = \"test\"\n\
           scopes = [\"*\"]\npermissions = [\"wrap\"]\n";
    std::fs::write(k.path("keyd.toml"), cfg).unwrap();
    assert!(k.start_fails().contains("allow_bearer_tokens"));
}

#[tokio::test]
async fn a_silent_server_times_out_with_a_retryable_error() {
    // Accepts TCP connections (kernel backlog) but never speaks TLS.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let k = Keyd::init();
    let c = RemoteKeyService::builder()
        .address(&addr)
        .server_name("localhost")
        .ca_pem_file(k.path("certs/ca.pem"))
        .client_identity_pem_files(k.path("certs/app.pem"), k.path("certs/app.key.pem"))
        .environment("test")
        .connect_timeout(Duration::from_millis(200))
        .request_timeout(Duration::from_millis(500))
        .retries(1, Duration::from_millis(10))
        .build()
        .unwrap();
    let t = Instant::now();
    let e = c.kek_info().await.unwrap_err();
    assert!(matches!(e, KeyServiceError::Unavailable(_)), "{e:?}");
    assert!(e.is_retryable());
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    drop(silent);
}

// ---- item 9.3: state rollback ----------------------------------------------

const STATE_FILES: [&str; 3] = ["data/state.bin", "data/state.journal", "data/state.anchor"];

/// Counts unwraps of `d` that succeed through every start that keyd allows.
async fn unwraps_that_succeed(k: &Keyd, d: &KeyRequest, w: &panseal::WrappedKey) -> u32 {
    let r = k
        .client_with("app", |b| b.retries(0, Duration::from_millis(1)))
        .unwrap(d, w, &access())
        .await;
    u32::from(r.is_ok())
}

#[tokio::test]
async fn restoring_an_older_state_after_a_destroy_is_refused_and_the_version_never_unwraps() {
    let mut k = Keyd::ready().await;
    let scope = Scope::new("rb-1").unwrap();
    let app = k.client("app");
    let d = req("test", "rb-1", KeyPurpose::Data);
    let (_, w) = app.generate(&d).await.unwrap();
    k.client("alice").rotate(&scope).await.unwrap();
    // The attacker copies the state (and, with write access to the data
    // directory, its anchor) now.
    k.save(&STATE_FILES);
    k.save(&["data/audit.log", "data/audit.anchor"]);
    let a = k.client("alice").approve_destroy(&scope, 1).await.unwrap();
    assert!(!a.destroyed);
    let b = k.client("bob").approve_destroy(&scope, 1).await.unwrap();
    assert!(b.destroyed);
    let noted = k.client("alice").status().await.unwrap().state_generation;
    let mut succeeded = unwraps_that_succeed(&k, &d, &w).await;
    k.kill();

    // Old state.bin + journal only: the anchor is newer.
    k.swap(&STATE_FILES[..2]);
    let e = k.start_fails();
    assert!(
        e.contains("rolled back") && e.contains("state.anchor"),
        "{e}"
    );
    k.swap(&STATE_FILES[..2]);
    // Old state and old anchor: the audit log recorded the newer commits.
    k.swap(&STATE_FILES);
    let e = k.start_fails();
    assert!(e.contains("rolled back") && e.contains("audit log"), "{e}");
    // The whole data directory restored (state, anchor, log): keyd starts,
    // but custodians confirm the generation they noted and refuse.
    k.swap(&["data/audit.log", "data/audit.anchor"]);
    k.start();
    for c in ["alice", "bob"] {
        let cl = k.client(c);
        cl.acknowledge(ACK).await.unwrap();
        let e = cl
            .unseal_expecting(k.share(c), Some(noted))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("rolled back"), "{e}");
    }
    succeeded += unwraps_that_succeed(&k, &d, &w).await;
    k.kill();
    // The newest files back: the destroyed version stays destroyed.
    k.swap(&STATE_FILES);
    k.swap(&["data/audit.log", "data/audit.anchor"]);
    k.start();
    for c in ["alice", "bob"] {
        k.client(c)
            .unseal_expecting(k.share(c), Some(noted))
            .await
            .unwrap();
    }
    succeeded += unwraps_that_succeed(&k, &d, &w).await;
    assert_eq!(succeeded, 0, "a destroyed KEK version unwrapped");
    assert!(matches!(
        app.unwrap(&d, &w, &access()).await.unwrap_err(),
        KeyServiceError::KekDestroyed(_)
    ));
}

#[tokio::test]
async fn an_anchor_outside_the_data_directory_catches_a_restored_data_directory() {
    let mut k =
        Keyd::ready_with("anchor_dir = \"anchor\"\naudit_key_file = \"keys/audit.key\"\n").await;
    assert!(k.path("keys/audit.key").exists());
    assert!(!k.path("data/audit.key").exists());
    assert!(k.path("anchor/state.anchor").exists());
    let scope = Scope::new("rb-2").unwrap();
    let d = req("test", "rb-2", KeyPurpose::Data);
    let (_, w) = k.client("app").generate(&d).await.unwrap();
    k.client("alice").rotate(&scope).await.unwrap();
    k.kill();
    let data = ["data/state.bin", "data/state.journal", "data/audit.log"];
    k.save(&data);
    k.start();
    k.unseal().await;
    k.client("alice").approve_destroy(&scope, 1).await.unwrap();
    k.client("carol").acknowledge(ACK).await.unwrap();
    assert!(
        k.client("carol")
            .approve_destroy(&scope, 1)
            .await
            .unwrap()
            .destroyed
    );
    k.kill();
    // Everything in the data directory back to before the destroy.
    k.restore(&data);
    let e = k.start_fails();
    assert!(e.contains("rolled back"), "{e}");
    assert_eq!(unwraps_that_succeed(&k, &d, &w).await, 0);
}

#[tokio::test]
async fn a_second_keyd_on_the_same_data_directory_is_refused() {
    let mut k = Keyd::init();
    k.start();
    let e = k.start_fails();
    assert!(e.contains("another panseal-keyd"), "{e}");
    k.kill();
    k.start();
}

#[tokio::test]
async fn an_altered_journal_or_anchor_is_refused_at_unseal() {
    let mut k = Keyd::ready().await;
    k.client("alice")
        .rotate(&Scope::new("j-1").unwrap())
        .await
        .unwrap();
    k.kill();
    // Flip one hex digit inside the journal's last entry (not its MAC).
    let path = k.path("data/state.journal");
    let text = std::fs::read_to_string(&path).unwrap();
    let altered = text.replacen("\"created_by\":\"alice\"", "\"created_by\":\"mallo\"", 1);
    assert_ne!(altered, text);
    std::fs::write(&path, &altered).unwrap();
    k.start();
    let mut refused = 0;
    for c in ["alice", "bob"] {
        let cl = k.client(c);
        if cl.unseal(k.share(c)).await.is_err() {
            refused += 1;
        }
    }
    assert_eq!(refused, 1, "the second share must fail authentication");
    assert!(k.client("alice").status().await.unwrap().sealed);
}

#[tokio::test]
async fn a_forged_lower_anchor_is_refused_at_unseal_and_the_restored_state_never_serves() {
    let mut k = Keyd::ready().await;
    let scope = Scope::new("fa-1").unwrap();
    let d = req("test", "fa-1", KeyPurpose::Data);
    let (_, w) = k.client("app").generate(&d).await.unwrap();
    k.client("alice").rotate(&scope).await.unwrap();
    // The attacker copies the data directory (state, anchor, audit log).
    k.save(&STATE_FILES);
    k.save(&["data/audit.log", "data/audit.anchor"]);
    k.client("alice").approve_destroy(&scope, 1).await.unwrap();
    assert!(
        k.client("bob")
            .approve_destroy(&scope, 1)
            .await
            .unwrap()
            .destroyed
    );
    k.kill();
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(k.path("data/state.anchor.saved")).unwrap()).unwrap();
    let mut lower = saved.clone();
    lower["generation"] = (saved["generation"].as_u64().unwrap() - 1).into();
    let forged = [
        serde_json::json!({"v": 2, "generation": 0, "head": "00".repeat(32), "mac": "00"}),
        // Lower by one, the head and MAC of the real one: bad MAC.
        lower,
    ];
    let (mut refused, mut succeeded) = (0, 0);
    for a in forged {
        // Everything back to before the destroy; the (newer) anchor
        // replaced by a forged lower one.
        k.restore(&STATE_FILES);
        k.restore(&["data/audit.log", "data/audit.anchor"]);
        std::fs::write(k.path("data/state.anchor"), serde_json::to_vec(&a).unwrap()).unwrap();
        k.start();
        for c in ["alice", "bob"] {
            let cl = k.client(c);
            cl.acknowledge(ACK).await.unwrap();
            refused += u32::from(cl.unseal(k.share(c)).await.is_err());
        }
        succeeded += unwraps_that_succeed(&k, &d, &w).await;
        k.kill();
    }
    assert_eq!(succeeded, 0, "a destroyed KEK version unwrapped");
    assert_eq!(refused, 2, "the completing share must fail on the anchor");
}

#[tokio::test]
async fn an_acknowledgement_planted_in_the_data_directory_does_not_open_the_gate() {
    let mut k = Keyd::init();
    let planted: Vec<serde_json::Value> = ["alice", "bob"]
        .iter()
        .map(|c| serde_json::json!({"custodian": c, "statement_sha256": "00".repeat(32), "at": 1}))
        .collect();
    std::fs::write(
        k.path("data/acknowledgements.pending"),
        serde_json::to_vec(&planted).unwrap(),
    )
    .unwrap();
    k.start();
    let mut accepted = 0;
    for c in ["alice", "bob"] {
        accepted += u32::from(k.client(c).unseal(k.share(c)).await.is_ok());
    }
    assert_eq!(
        accepted, 0,
        "a share passed the gate on a planted acknowledgement"
    );
    assert!(k.client("alice").status().await.unwrap().sealed);
    // Acknowledged over mutual TLS, the same custodians unseal.
    k.unseal().await;
}

#[tokio::test]
async fn reshare_is_refused_while_sealed() {
    let k = Keyd::ready().await;
    k.client("alice").seal().await.unwrap();
    let new: Vec<String> = ["bob", "carol", "mallory"].map(String::from).to_vec();
    let (mut votes, mut handed_out) = (0, 0);
    for c in ["alice", "bob"] {
        match k.client(c).reshare(2, &new, k.share(c)).await {
            Ok(v) => {
                votes += 1;
                handed_out += v.awaiting_collection.len();
            }
            Err(e) => assert!(e.to_string().contains("sealed"), "{e}"),
        }
    }
    assert_eq!((votes, handed_out), (0, 0));
}

// ---- item 9.4: audit log cut, deleted, re-keyed -----------------------------

#[tokio::test]
async fn a_cut_deleted_or_rekeyed_audit_log_is_refused_at_start_and_by_verify() {
    let mut k = Keyd::ready().await;
    let app = k.client("app");
    for _ in 0..4 {
        let r = req("test", "au-1", KeyPurpose::Data);
        let (_, w) = app.generate(&r).await.unwrap();
        app.unwrap(&r, &w, &access()).await.unwrap();
    }
    // The exported anchor is rewritten once a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    k.kill();
    assert_eq!(k.verify_audit().0, 0);
    let log = k.path("data/audit.log");
    let key = k.path("data/audit.key");
    k.save(&["data/audit.log", "data/audit.key"]);
    let lines = k.audit_lines();

    // Cut the tail at a record boundary.
    std::fs::write(&log, lines[..lines.len() - 3].join("\n") + "\n").unwrap();
    let (code, out) = k.verify_audit();
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("log cut"), "{out}");
    assert!(k.start_fails().contains("log cut"));

    // Delete the file.
    std::fs::remove_file(&log).unwrap();
    let (code, out) = k.verify_audit();
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("missing"), "{out}");
    assert!(k.start_fails().contains("missing"));

    // Replace the key and write a fresh log under it.
    std::fs::remove_file(&key).unwrap();
    let new_key = panseal::AuditKey::create_file(&key).unwrap();
    let forged = panseal::ChainedAuditLog::open(&log, new_key).unwrap();
    for l in &lines {
        let _ = l;
        forged
            .append(&serde_json::json!({"operation": "status"}))
            .unwrap();
    }
    drop(forged);
    let (code, out) = k.verify_audit();
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("not the key"), "{out}");
    assert!(k.start_fails().contains("not the key"));

    // The originals verify and serve again.
    k.restore(&["data/audit.log", "data/audit.key"]);
    assert_eq!(k.verify_audit().0, 0);
    k.start();
    k.unseal().await;
}

// ---- item 9.5: dual control and split knowledge ----------------------------

#[tokio::test]
async fn destroying_a_dek_needs_two_custodians_and_keyd_then_never_unwraps_it() {
    let mut k = Keyd::ready().await;
    let app = k.client("app");
    let d = req("test", "dd-1", KeyPurpose::Data);
    let (_, w) = app.generate(&d).await.unwrap();
    let other = req("test", "dd-1", KeyPurpose::Data);
    let (_, ow) = app.generate(&other).await.unwrap();
    let (alice, bob, carol) = (k.client("alice"), k.client("bob"), k.client("carol"));
    carol.acknowledge(ACK).await.unwrap();
    // The application cannot approve at all.
    assert!(is_denied(app.approve_dek_destroy(&d).await));
    let a = alice.approve_dek_destroy(&d).await.unwrap();
    assert!(!a.destroyed && a.expires_at.is_some());
    assert!(
        alice.approve_dek_destroy(&d).await.is_err(),
        "same custodian twice"
    );
    assert!(
        app.unwrap(&d, &w, &access()).await.is_ok(),
        "one approval destroyed it"
    );
    // Withdrawn: bob's approval alone is again not enough.
    assert!(alice
        .withdraw_dek_destroy(&d)
        .await
        .unwrap()
        .approvals
        .is_empty());
    assert!(!bob.approve_dek_destroy(&d).await.unwrap().destroyed);
    let done = carol.approve_dek_destroy(&d).await.unwrap();
    assert!(done.destroyed);
    assert_eq!(done.approvals, vec!["bob".to_string(), "carol".to_string()]);
    // keyd refuses the key from now on, to every credential, across restarts.
    let mut succeeded = 0;
    for who in ["app", "reader", "root"] {
        succeeded += u32::from(k.client(who).unwrap(&d, &w, &access()).await.is_ok());
    }
    assert!(k.client("rewrapper").rewrap(&d, &w).await.is_err());
    k.kill();
    k.start();
    k.unseal().await;
    succeeded += unwraps_that_succeed(&k, &d, &w).await;
    assert_eq!(succeeded, 0);
    // Other keys of the scope are untouched.
    assert!(k.client("app").unwrap(&other, &ow, &access()).await.is_ok());
    let lines = k.audit_lines();
    assert!(lines.iter().any(|l| l.contains("dek-destroy-approve")
        && l.contains("\"principal\":\"carol\"")
        && l.contains(&d.id.to_string())));
}

#[tokio::test]
async fn destroy_approvals_expire_and_can_be_withdrawn() {
    let k = Keyd::ready_with("approval_ttl_seconds = 1\n").await;
    let scope = Scope::new("ex-1").unwrap();
    let alice = k.client("alice");
    alice.rotate(&scope).await.unwrap();
    alice.rotate(&scope).await.unwrap();
    assert!(!alice.approve_destroy(&scope, 1).await.unwrap().destroyed);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    // Alice's approval expired: Bob's is the only one.
    let b = k.client("bob").approve_destroy(&scope, 1).await.unwrap();
    assert!(!b.destroyed);
    assert_eq!(b.approvals, vec!["bob".to_string()]);
    assert!(k
        .client("bob")
        .withdraw_destroy(&scope, 1)
        .await
        .unwrap()
        .approvals
        .is_empty());
    assert!(k.client("bob").withdraw_destroy(&scope, 1).await.is_err());
    let s = alice.kek_status(&scope).await.unwrap();
    assert!(s.versions[0].destroy_approvals.is_empty());
    assert_eq!(s.versions[0].state, panseal::KeyState::DecryptOnly);
}

#[tokio::test]
async fn resharing_makes_old_shares_useless() {
    let mut k = Keyd::ready().await;
    let d = req("test", "rs-1", KeyPurpose::Data);
    let (dek, w) = k.client("app").generate(&d).await.unwrap();
    let new: Vec<String> = ["bob", "carol", "mallory"].map(String::from).to_vec();
    let alice = k.client("alice");
    let v = alice.reshare(2, &new, k.share("alice")).await.unwrap();
    assert!(v.awaiting_collection.is_empty());
    // A custodian without a current share cannot vote.
    assert!(k
        .client("mallory")
        .reshare(2, &new, k.share("alice"))
        .await
        .is_err());
    let v = k
        .client("bob")
        .reshare(2, &new, k.share("bob"))
        .await
        .unwrap();
    assert_eq!(v.awaiting_collection.len(), 3);
    // Only a named custodian collects, each their own share, once.
    assert!(alice.collect_share(None).await.is_err());
    let dir = k.path("new-shares");
    std::fs::create_dir_all(&dir).unwrap();
    for c in &new {
        let f = dir.join(format!("{c}.share"));
        let (ok, out, err) =
            k.custodian_cli(c, "collect-share", &["--share-file", f.to_str().unwrap()]);
        assert!(ok, "{err}");
        // The fingerprint keyd authenticated, to check against keyd.toml.
        let cert = k.path(&format!("certs/{c}.pem"));
        let fpr = keyd_harness::run(&["fingerprint", cert.to_str().unwrap()]);
        assert!(
            out.contains(&format!(
                "certificate SHA-256 {} as principal {c:?}",
                fpr.trim()
            )),
            "{out}"
        );
        let (ok, _, _) =
            k.custodian_cli(c, "collect-share", &["--share-file", f.to_str().unwrap()]);
        assert!(!ok);
    }
    k.kill();
    k.start();
    let new_share = |c: &str| {
        ShareText::new(
            std::fs::read_to_string(dir.join(format!("{c}.share")))
                .unwrap()
                .trim()
                .to_owned(),
        )
    };
    // The old shares no longer unseal: counted over every old holder.
    let mut old_accepted = 0;
    for c in ["alice", "bob", "carol"] {
        let cl = k.client(c);
        cl.acknowledge(ACK).await.unwrap();
        old_accepted += u32::from(cl.unseal(k.share(c)).await.is_ok());
    }
    assert_eq!(old_accepted, 0);
    for c in ["carol", "mallory"] {
        let cl = k.client(c);
        cl.acknowledge(ACK).await.unwrap();
        cl.unseal(new_share(c)).await.unwrap();
    }
    let got = k.client("app").unwrap(&d, &w, &access()).await.unwrap();
    assert_eq!(dek_bytes(&got), dek_bytes(&dek));
    assert!(k
        .audit_lines()
        .iter()
        .any(|l| l.contains("\"operation\":\"reshare\"")));
}

#[tokio::test]
async fn a_crash_between_a_reshares_state_and_its_anchor_still_unseals() {
    let mut k = Keyd::ready().await;
    let d = req("test", "rs-2", KeyPurpose::Data);
    let (dek, w) = k.client("app").generate(&d).await.unwrap();
    let new: Vec<String> = ["carol", "mallory"].map(String::from).to_vec();
    for c in ["alice", "bob"] {
        k.client(c).reshare(2, &new, k.share(c)).await.unwrap();
    }
    // The anchor under the old master key, as a crash after the new
    // state.bin and before its anchor leaves it.
    k.save(&["data/state.anchor"]);
    let dir = k.path("new-shares");
    std::fs::create_dir_all(&dir).unwrap();
    for c in &new {
        let f = dir.join(format!("{c}.share"));
        let (ok, _, err) =
            k.custodian_cli(c, "collect-share", &["--share-file", f.to_str().unwrap()]);
        assert!(ok, "{err}");
    }
    k.kill();
    k.restore(&["data/state.anchor"]);
    k.start();
    for c in &new {
        let cl = k.client(c);
        cl.acknowledge(ACK).await.unwrap();
        let text = std::fs::read_to_string(dir.join(format!("{c}.share"))).unwrap();
        cl.unseal(ShareText::new(text.trim().to_owned()))
            .await
            .unwrap();
    }
    let got = k.client("app").unwrap(&d, &w, &access()).await.unwrap();
    assert_eq!(dek_bytes(&got), dek_bytes(&dek));
}

// ---- item 9.6: resource limits ----------------------------------------------

#[tokio::test]
async fn scope_creation_follows_the_configured_patterns_and_cap() {
    let k = Keyd::ready_with("auto_create_scopes = [\"m-*\"]\nmax_scopes = 3\n").await;
    let wrapper = k.client("wrapper");
    let e = wrapper
        .generate(&req("test", "invented-1", KeyPurpose::Data))
        .await
        .unwrap_err();
    assert!(matches!(e, KeyServiceError::PermissionDenied(_)), "{e:?}");
    let mut created = 0;
    for i in 0..5 {
        if wrapper
            .generate(&req("test", &format!("m-{i}"), KeyPurpose::Data))
            .await
            .is_ok()
        {
            created += 1;
        }
    }
    assert_eq!(created, 3, "max_scopes");
    // A custodian creates any scope; then wrap works there.
    k.client("alice")
        .rotate(&Scope::new("invented-1").unwrap())
        .await
        .unwrap();
    assert!(wrapper
        .generate(&req("test", "invented-1", KeyPurpose::Data))
        .await
        .is_ok());
}

#[tokio::test]
async fn state_change_cost_does_not_grow_with_the_number_of_scopes() {
    let k = Keyd::ready().await;
    let alice = k.client("alice");
    let mut timings = Vec::new();
    for i in 0..300 {
        let t = Instant::now();
        alice
            .rotate(&Scope::new(&format!("sc-{i}")).unwrap())
            .await
            .unwrap();
        timings.push(t.elapsed());
    }
    // Medians: robust to the machine's other load.
    let median = |t: &[Duration]| {
        let mut t = t.to_vec();
        t.sort();
        t[t.len() / 2]
    };
    let first = median(&timings[..50]);
    let last = median(&timings[250..]);
    let ratio = last.as_secs_f64() / first.as_secs_f64();
    eprintln!("new scope's KEK, median: first 50 {first:?}, last 50 (after 250) {last:?}, ratio {ratio:.2}");
    assert!(
        ratio < 2.5,
        "state writes grow with scopes: ratio {ratio:.2}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_clients_are_served_while_a_bad_one_holds_and_trickles() {
    use tokio::io::AsyncWriteExt;
    let k = Keyd::ready_with("request_timeout_seconds = 2\nmax_connections_per_client = 8\n").await;
    let setup = k.client("app");
    let d = req("test", "ld-1", KeyPurpose::Data);
    let (dek, w) = setup.generate(&d).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // The bad client: 40 TCP connections that never finish a handshake,
    // and 12 TLS connections (its certificate; the cap is 8) trickling a
    // body, reopened as keyd closes them.
    let addr = k.addr.clone();
    let mut held = Vec::new();
    for _ in 0..40 {
        held.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    let tls = {
        let mut roots = rustls::RootCertStore::empty();
        let ca = std::fs::read(k.path("certs/ca.pem")).unwrap();
        for c in rustls_pki_types::pem::PemObject::pem_slice_iter(&ca) {
            roots.add(c.unwrap()).unwrap();
        }
        let cert: Vec<rustls_pki_types::CertificateDer<'static>> =
            rustls_pki_types::pem::PemObject::pem_file_iter(k.path("certs/wrapper.pem"))
                .unwrap()
                .map(|c| c.unwrap())
                .collect();
        let key =
            <rustls_pki_types::PrivateKeyDer as rustls_pki_types::pem::PemObject>::from_pem_file(
                k.path("certs/wrapper.key.pem"),
            )
            .unwrap();
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(cert, key)
        .unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
    };
    let closed_in = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tricklers = Vec::new();
    for _ in 0..12 {
        let (tls, addr, stop, closed_in) =
            (tls.clone(), addr.clone(), stop.clone(), closed_in.clone());
        tricklers.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let Ok(tcp) = tokio::net::TcpStream::connect(&addr).await else {
                    continue;
                };
                let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
                let Ok(mut s) = tls.connect(name, tcp).await else {
                    continue;
                };
                let opened = Instant::now();
                let head =
                    "POST /v1/wrap HTTP/1.1\r\nhost: localhost\r\ncontent-length: 100000\r\n\r\n";
                if s.write_all(head.as_bytes()).await.is_err() {
                    continue;
                }
                while !stop.load(Ordering::SeqCst) {
                    if s.write_all(b"{").await.is_err() || s.flush().await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    if opened.elapsed() > Duration::from_secs(8) {
                        break;
                    }
                }
                closed_in.lock().unwrap().push(opened.elapsed());
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Good clients for a bounded time.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (c, d, w) = (k.client("app"), d.clone(), w.clone());
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut failed, mut slowest) = (0u32, 0u32, Duration::ZERO);
            while Instant::now() < deadline && ok < 2000 {
                let t = Instant::now();
                match c.unwrap(&d, &w, &access()).await {
                    Ok(_) => ok += 1,
                    Err(e) => {
                        eprintln!("good client error: {e:?}");
                        failed += 1
                    }
                }
                slowest = slowest.max(t.elapsed());
            }
            (ok, failed, slowest)
        }));
    }
    let (mut ok, mut failed, mut slowest) = (0, 0, Duration::ZERO);
    for t in tasks {
        let (o, f, s) = t.await.unwrap();
        ok += o;
        failed += f;
        slowest = slowest.max(s);
    }
    stop.store(true, Ordering::SeqCst);
    for t in tricklers {
        let _ = t.await;
    }
    drop(held);
    let closed = closed_in.lock().unwrap().clone();
    eprintln!(
        "load: {ok} good unwraps, {failed} failed, slowest {slowest:?}; \
         trickling connections closed after {:?}",
        closed.iter().max()
    );
    assert_eq!(failed, 0);
    assert!(ok > 50, "only {ok} good unwraps");
    assert!(slowest < Duration::from_secs(2), "{slowest:?}");
    // keyd cut every trickling body at its deadline (2 s), not at 8 s.
    assert!(!closed.is_empty());
    assert!(
        closed.iter().all(|c| *c < Duration::from_secs(5)),
        "{closed:?}"
    );
    let got = setup.unwrap(&d, &w, &access()).await.unwrap();
    assert_eq!(dek_bytes(&got), dek_bytes(&dek));
}

// ---- the version 1 state still reads ----------------------------------------

/// Writes a version 1 `state.bin` (FORMAT.md, "keyd state, version 1") for
/// the master key rebuilt from two shares, holding one KEK for scope
/// `v1-1`; returns that KEK.
fn write_v1_state(k: &Keyd) -> ([u8; 32], serde_json::Value) {
    use aes_gcm::aead::AeadInPlace;
    use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
    let share_bytes = |c: &str| {
        let t = k.share(c);
        let body = t.expose_secret().strip_prefix("pks1-").unwrap().to_owned();
        hex::decode(body.rsplit_once('-').unwrap().0).unwrap()
    };
    let shares: Vec<blahaj::Share> = ["alice", "bob"]
        .iter()
        .map(|c| blahaj::Share::try_from(share_bytes(c).as_slice()).unwrap())
        .collect();
    let master = blahaj::Sharks(2).recover(&shares).unwrap();
    let cipher = Aes256Gcm::new(master.as_slice().into());
    let seal = |aad: &[u8], plain: &[u8]| {
        let nonce: [u8; 12] = rand::random();
        let mut buf = plain.to_vec();
        let tag = cipher
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), aad, &mut buf)
            .unwrap();
        hex::encode([&nonce[..], &buf, &tag[..]].concat())
    };
    let kek: [u8; 32] = rand::random();
    let mut aad = b"panseal-keyd-kek-v1".to_vec();
    for part in ["test", "v1-1"] {
        aad.extend_from_slice(&(part.len() as u16).to_be_bytes());
        aad.extend_from_slice(part.as_bytes());
    }
    aad.extend_from_slice(&1u32.to_be_bytes());
    let v2 = panseal_keyd::state_file::decode_snapshot(
        &std::fs::read(k.path("data/state.bin")).unwrap(),
        0,
    )
    .unwrap()
    .state;
    let v1 = serde_json::json!({
        "threshold": v2.threshold,
        "share_salt": v2.share_salt,
        "master_check": seal(b"check", b"panseal-keyd master key check v1"),
        "shares": v2.shares,
        "acknowledgements": [],
        "keks": [{
            "environment": "test", "scope": "v1-1", "version": 1,
            "state": panseal::KeyState::Active, "created_at": 1,
            "sealed": seal(&aad, &kek), "destroy_approvals": []
        }],
        "generation": 7
    });
    write_v1_file(k, &v1);
    // A data directory from before version 2: no journal, no anchors.
    let _ = std::fs::remove_file(k.path("data/state.journal"));
    std::fs::remove_file(k.path("data/state.anchor")).unwrap();
    std::fs::remove_file(k.path("data/audit.anchor")).unwrap();
    (kek, v1)
}

/// Writes `v` as a version 1 `state.bin` (its SHA-256 recomputed: anyone
/// can).
fn write_v1_file(k: &Keyd, v: &serde_json::Value) {
    use sha2::Digest;
    let mut file = b"PANSEALD\x01".to_vec();
    file.extend_from_slice(&serde_json::to_vec(v).unwrap());
    let sum = sha2::Sha256::digest(&file);
    file.extend_from_slice(&sum);
    std::fs::write(k.path("data/state.bin"), file).unwrap();
}

/// Starts keyd on whatever the attacker left; if it starts, the custodians
/// unseal (noting `expect`) and the app tries the destroyed version.
/// Returns keyd's refusal, or how many unwraps succeeded.
async fn forged_start_unwraps(
    k: &mut Keyd,
    expect: Option<u64>,
    d: &KeyRequest,
    w: &panseal::WrappedKey,
) -> Result<String, u32> {
    if let Err(e) = k.try_start() {
        return Ok(e);
    }
    for c in ["alice", "bob"] {
        let cl = k.client(c);
        let _ = cl.acknowledge(ACK).await;
        let _ = cl.unseal_expecting(k.share(c), expect).await;
    }
    let n = unwraps_that_succeed(k, d, w).await;
    k.kill();
    Err(n)
}

#[tokio::test]
async fn a_version_1_backup_with_a_forged_generation_is_refused_and_destroyed_keks_stay_destroyed()
{
    use aes_gcm::{Aes256Gcm, KeyInit};
    let mut k = Keyd::init();
    let (kek, v1) = write_v1_state(&k);
    let d = req("test", "v1-1", KeyPurpose::Data);
    let dek: [u8; 32] = rand::random();
    let kek_ref = panseal::KekRef {
        id: "keyd/test/v1-1".into(),
        version: 1,
    };
    let bytes = panseal::keyd::server::wrap_key(&Aes256Gcm::new((&kek).into()), &kek_ref, &d, &dek);
    let w = panseal::WrappedKey {
        kek: kek_ref,
        bytes,
    };
    k.start();
    k.unseal().await;
    assert_eq!(unwraps_that_succeed(&k, &d, &w).await, 1);
    // Migrated; now the version 1 KEK is destroyed.
    let scope = Scope::new("v1-1").unwrap();
    k.client("alice").rotate(&scope).await.unwrap();
    k.client("alice").approve_destroy(&scope, 1).await.unwrap();
    assert!(
        k.client("bob")
            .approve_destroy(&scope, 1)
            .await
            .unwrap()
            .destroyed
    );
    let noted = k.client("alice").status().await.unwrap().state_generation;
    assert_eq!(unwraps_that_succeed(&k, &d, &w).await, 0);
    k.kill();
    // Each attempt starts from this directory.
    let all = [
        "data/state.bin",
        "data/state.journal",
        "data/state.anchor",
        "data/audit.log",
        "data/audit.anchor",
    ];
    k.save(&all);
    let mut succeeded = 0;
    let forge = |k: &Keyd, generation: u64| {
        let mut v = v1.clone();
        v["generation"] = generation.into();
        write_v1_file(k, &v);
    };
    // 1. The pre-upgrade backup, its generation above the anchor's and
    //    every state-commit's.
    k.restore(&all);
    forge(&k, noted + 1000);
    match forged_start_unwraps(&mut k, None, &d, &w).await {
        Ok(e) => assert!(e.contains("rolled back"), "{e}"),
        Err(n) => succeeded += n,
    }
    // 2. At the generation the custodians noted, the anchor deleted
    //    (anchor_dir = data_dir): even --expect-generation would pass.
    k.restore(&all);
    forge(&k, noted);
    std::fs::remove_file(k.path("data/state.anchor")).unwrap();
    std::fs::remove_file(k.path("data/state.journal")).unwrap();
    match forged_start_unwraps(&mut k, Some(noted), &d, &w).await {
        Ok(e) => assert!(e.contains("rolled back"), "{e}"),
        Err(n) => succeeded += n,
    }
    // 3. The audit anchor deleted too: the log's state-commit records
    //    remain.
    k.restore(&all);
    forge(&k, noted);
    for f in ["state.anchor", "audit.anchor", "state.journal"] {
        std::fs::remove_file(k.path(&format!("data/{f}"))).unwrap();
    }
    match forged_start_unwraps(&mut k, Some(noted), &d, &w).await {
        Ok(e) => assert!(e.contains("rolled back"), "{e}"),
        Err(n) => succeeded += n,
    }
    assert_eq!(succeeded, 0, "a destroyed KEK version came back");
}

#[tokio::test]
async fn a_version_1_state_still_reads_and_is_migrated_at_first_unseal() {
    use aes_gcm::{Aes256Gcm, KeyInit};
    let mut k = Keyd::init();
    let (kek, _) = write_v1_state(&k);
    // A DEK wrapped by the version 1 KEK, as a v1 keyd answered it.
    let d = req("test", "v1-1", KeyPurpose::Data);
    let dek: [u8; 32] = rand::random();
    let kek_ref = panseal::KekRef {
        id: "keyd/test/v1-1".into(),
        version: 1,
    };
    let bytes = panseal::keyd::server::wrap_key(&Aes256Gcm::new((&kek).into()), &kek_ref, &d, &dek);
    let w = panseal::WrappedKey {
        kek: kek_ref,
        bytes,
    };
    // A restart before the first unseal: still version 1, and nothing
    // written meanwhile marks the directory as version 2.
    k.start();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    k.kill();
    assert!(!k.path("data/audit.anchor").exists());
    k.start();
    k.unseal().await;
    let got = k.client("app").unwrap(&d, &w, &access()).await.unwrap();
    assert_eq!(dek_bytes(&got), dek);
    // Migrated: the current version (4 since issue 11) on disk,
    // generation kept growing, anchor written.
    let on_disk = std::fs::read(k.path("data/state.bin")).unwrap();
    assert_eq!(on_disk[8], 4);
    assert!(k.path("data/state.anchor").exists());
    assert!(k.client("alice").status().await.unwrap().state_generation > 7);
    // And it serves after a restart, under the new format.
    k.kill();
    k.start();
    k.unseal().await;
    let got = k.client("app").unwrap(&d, &w, &access()).await.unwrap();
    assert_eq!(dek_bytes(&got), dek);
    assert!(k.audit_lines().iter().any(|l| l.contains("state-migrate")));
    // A version 1 file put back after the migration is a rollback.
    k.kill();
    write_v1_state(&k);
    let e = k.start_fails();
    assert!(e.contains("rolled back"), "{e}");
}

#[test]
fn keyd_state_v2_vectors_from_an_independent_implementation() {
    use panseal_keyd::state_file::{decode_snapshot, parse_journal, Anchor, StateKeys};
    let path = format!(
        "{}/../tests/vectors/keyd_state_v2.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let hex_of = |k: &str| hex::decode(v[k].as_str().unwrap()).unwrap();
    let master: [u8; 32] = hex_of("master_key").try_into().unwrap();
    let keys = StateKeys::derive(&master);
    for (name, got) in [
        ("state_mac", &keys.state_mac),
        ("anchor_mac", &keys.anchor_mac),
        ("kek_seal", &keys.kek_seal),
        ("check", &keys.check),
    ] {
        assert_eq!(
            hex::encode(&got[..]),
            v["subkeys"][name].as_str().unwrap(),
            "{name}"
        );
    }
    let snap = decode_snapshot(&hex_of("state_bin"), 0).unwrap();
    snap.verify(&keys).unwrap();
    assert_eq!(hex::encode(snap.mac), v["snapshot_mac"].as_str().unwrap());
    assert_eq!(snap.state.generation, 5);
    assert_eq!(snap.state.scopes["test/m-1"].versions[0].version, 1);
    assert!(snap.verify(&StateKeys::derive(&[0; 32])).is_err());
    let (entries, _) = parse_journal(v["state_journal"].as_str().unwrap().as_bytes()).unwrap();
    entries[0].verify(&keys).unwrap();
    assert_eq!(entries[0].header.prev, hex::encode(snap.mac));
    assert_eq!(entries[0].header.generation, 6);
    assert_eq!(
        hex::encode(entries[0].mac),
        v["journal_mac"].as_str().unwrap()
    );
    let anchor = Anchor::parse(v["state_anchor"].as_str().unwrap().as_bytes()).unwrap();
    anchor.verify(&keys).unwrap();
    assert_eq!(anchor.head, hex::encode(entries[0].mac));
    let audit_key = panseal::AuditKey::from_bytes_insecure(hex_of("audit_key").try_into().unwrap());
    assert_eq!(audit_key.key_id(), v["audit_key_id"].as_str().unwrap());
    assert_eq!(snap.state.audit_key_id, audit_key.key_id());
    let a = panseal::keyd::server::parse_audit_anchor(
        v["audit_anchor"].as_str().unwrap().as_bytes(),
        &audit_key,
    )
    .unwrap();
    assert_eq!(a.records, 3);
}
