//! Per-record reveal inside a real `panseal-keyd` process: a stolen reveal
//! credential reads at most its record quota per window, each record named
//! in keyd's audit, and no DEK and no PAN leaks.

use crate::keyd_harness;

use std::sync::Arc;

use keyd_harness::Keyd;
use panseal::{
    Access, Context, Error, KeyService, KeyServiceError, KeyState, KeyStore, MemoryAuditSink,
    MemoryKeyStore, Pan, Panseal, RemoteKeyService, RevealRequest, SealedPan, WrappedDek,
};

fn access() -> Access {
    Access::new("clerk-7", "refund 123").unwrap()
}

/// The `n`-th of a run of distinct Luhn-valid 16-digit PANs.
fn pan_number(n: u32) -> String {
    let body = format!("411111{n:09}");
    let digits: Vec<u32> = body.chars().map(|c| c.to_digit(10).unwrap()).collect();
    // Luhn check digit for a 15-digit body.
    let mut sum = 0;
    for (i, d) in digits.iter().rev().enumerate() {
        let mut v = *d;
        if i % 2 == 0 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    format!("{body}{}", (10 - sum % 10) % 10)
}

fn ctx(i: u32) -> Context {
    Context::new("cards", "pan", format!("row-{i}")).unwrap()
}

/// A writer (the `app` credential) seals `n` PANs; the table dump and the
/// key store are what an attacker with a database dump holds.
async fn dump(k: &Keyd, n: u32) -> (MemoryKeyStore, Vec<(SealedPan, Context, String)>) {
    let store = MemoryKeyStore::new();
    let writer = Panseal::builder()
        .key_service(k.client_with("app", |b| b.scope("merchant-1")))
        .key_store(store.clone())
        .audit(MemoryAuditSink::new())
        .environment("test")
        .scope("merchant-1")
        .build()
        .await
        .unwrap();
    let mut rows = Vec::new();
    for i in 0..n {
        let digits = pan_number(i);
        let c = ctx(i);
        let s = writer
            .seal_pan(&Pan::parse(&digits).unwrap(), &c)
            .await
            .unwrap();
        rows.push((s, c, digits));
    }
    (store, rows)
}

async fn record_of(store: &MemoryKeyStore, sealed: &SealedPan) -> WrappedDek {
    store.fetch(sealed.key_id()).await.unwrap().unwrap()
}

async fn reveal(
    ks: &RemoteKeyService,
    record: &WrappedDek,
    sealed: &SealedPan,
    context: &Context,
) -> Result<panseal::Opened, KeyServiceError> {
    ks.reveal(
        &RevealRequest {
            record,
            sealed,
            context,
        },
        &access(),
    )
    .await
}

fn reveal_lines(k: &Keyd) -> Vec<String> {
    k.audit_lines()
        .into_iter()
        .filter(|l| l.contains("\"operation\":\"reveal\""))
        .collect()
}

fn success(lines: &[String]) -> usize {
    lines
        .iter()
        .filter(|l| l.contains("\"outcome\":\"success\""))
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn stolen_reveal_credential_with_a_dump_of_5000_reveals_exactly_its_quota() {
    let k = Keyd::ready_with("audit_fsync = \"periodic\"\n").await;
    let (store, rows) = dump(&k, 5000).await;
    // The attacker: the admin screen's `reveal` credential (default quota)
    // and the dump. They try every row.
    let stolen = k.client("revealer");
    let mut recovered = Vec::new();
    let mut refused_quota = 0;
    for (sealed, c, digits) in &rows {
        let record = record_of(&store, sealed).await;
        match reveal(&stolen, &record, sealed, c).await {
            Ok(o) => {
                assert_eq!(o.pan.expose_digits(), digits);
                recovered.push(c.row_key().to_vec());
            }
            Err(KeyServiceError::QuotaExceeded(m)) => {
                assert!(m.contains("distinct records"), "{m}");
                refused_quota += 1;
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(recovered.len(), 100, "PANs recovered = the default quota");
    assert_eq!(refused_quota, 4900);
    // A refusal is typed and retryable (after the window).
    let (s, c, _) = &rows[4999];
    let e = reveal(&stolen, &record_of(&store, s).await, s, c)
        .await
        .unwrap_err();
    assert!(matches!(e, KeyServiceError::QuotaExceeded(_)));
    assert!(e.is_retryable());

    // keyd's audit names every revealed record, and holds no PAN.
    let lines = reveal_lines(&k);
    assert_eq!(success(&lines), 100, "one success record per reveal");
    for row in &recovered {
        let name = format!("\"row_key\":\"{}\"", String::from_utf8_lossy(row));
        assert_eq!(
            lines
                .iter()
                .filter(|l| l.contains("\"outcome\":\"success\"") && l.contains(&name))
                .count(),
            1,
            "{name}"
        );
        assert!(lines
            .iter()
            .any(|l| l.contains("\"principal\":\"revealer\"")
                && l.contains("\"on_behalf_of\":\"clerk-7\"")
                && l.contains("\"purpose\":\"refund 123\"")
                && l.contains("\"table\":\"cards\"")));
    }
    let audit = std::fs::read_to_string(k.path("data/audit.log")).unwrap();
    let quota = std::fs::read_to_string(k.path("data/quota.state")).unwrap();
    let leaked = rows
        .iter()
        .filter(|(_, _, d)| audit.contains(d.as_str()) || quota.contains(d.as_str()))
        .count();
    assert_eq!(leaked, 0, "PANs in keyd's audit log or quota file");

    // kill -9 and a restart give the stolen credential no new record.
    let mut k = k;
    k.kill();
    k.start();
    k.unseal().await;
    let stolen = k.client("revealer");
    let mut new_after_restart = 0;
    for (sealed, c, _) in &rows[..300] {
        let record = record_of(&store, sealed).await;
        if reveal(&stolen, &record, sealed, c).await.is_ok()
            && !recovered.contains(&c.row_key().to_vec())
        {
            new_after_restart += 1;
        }
    }
    assert_eq!(new_after_restart, 0, "new records revealed after kill -9");
}

#[tokio::test(flavor = "multi_thread")]
async fn re_revealing_a_record_costs_a_request_not_a_record_slot() {
    let k = Keyd::ready().await;
    let (store, rows) = dump(&k, 5).await;
    let clerk = k.client("clerk"); // 3 distinct records, 5 requests per hour
    let rec = record_of(&store, &rows[0].0).await;
    let r = |i: usize| {
        let (s, c, _) = &rows[i];
        (*s, c.clone())
    };
    let mut ok = 0;
    for i in [0, 0, 1, 2] {
        let (s, c) = r(i);
        reveal(&clerk, &rec, &s, &c).await.unwrap();
        ok += 1;
    }
    assert_eq!(ok, 4, "4 requests, 3 distinct records: all within quota");
    let (s, c) = r(3);
    let e = reveal(&clerk, &rec, &s, &c).await.unwrap_err();
    assert!(
        matches!(&e, KeyServiceError::QuotaExceeded(m) if m.contains("3 distinct records")),
        "{e}"
    );
    // A record already revealed still opens: the 5th request.
    let (s, c) = r(1);
    reveal(&clerk, &rec, &s, &c).await.unwrap();
    let e = reveal(&clerk, &rec, &s, &c).await.unwrap_err();
    assert!(
        matches!(&e, KeyServiceError::QuotaExceeded(m) if m.contains("5 reveal requests")),
        "{e}"
    );
    assert_eq!(success(&reveal_lines(&k)), 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_restart_and_unseal_do_not_reset_the_counters() {
    let mut k = Keyd::ready().await;
    let (store, rows) = dump(&k, 6).await;
    let rec = record_of(&store, &rows[0].0).await;
    let clerk = k.client("clerk");
    for (s, c, _) in &rows[..3] {
        reveal(&clerk, &rec, s, c).await.unwrap();
    }
    // The attacker restarts keyd hoping for a fresh window.
    k.kill();
    k.start();
    k.unseal().await;
    let clerk = k.client("clerk");
    let mut revealed_after = 0;
    for (s, c, _) in &rows[3..] {
        if reveal(&clerk, &rec, s, c).await.is_ok() {
            revealed_after += 1;
        }
    }
    assert_eq!(revealed_after, 0, "new records revealed after a restart");
    // The records already revealed are remembered too (request 4 of 5).
    reveal(&clerk, &rec, &rows[0].0, &rows[0].1).await.unwrap();

    // Editing the quota file (lowering the count) is detected: fail closed.
    k.kill();
    let path = k.path("data/quota.state");
    let text = std::fs::read_to_string(&path).unwrap();
    // Lower every count to 0 (the MAC line is left as it was).
    let mut edited = String::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find("\"requests\":") {
        let (head, tail) = rest.split_at(i + "\"requests\":".len());
        edited.push_str(head);
        edited.push('0');
        rest = tail.trim_start_matches(|c: char| c.is_ascii_digit());
    }
    edited.push_str(rest);
    assert_ne!(text, edited);
    std::fs::write(&path, edited).unwrap();
    k.start();
    k.unseal().await;
    let clerk = k.client("clerk");
    let mut after_edit = 0;
    for (s, c, _) in &rows {
        if reveal(&clerk, &rec, s, c).await.is_ok() {
            after_edit += 1;
        }
    }
    assert_eq!(after_edit, 0, "reveals after editing quota.state");
    let revealer = k.client("revealer");
    let e = reveal(&revealer, &rec, &rows[5].0, &rows[5].1)
        .await
        .unwrap_err();
    assert!(matches!(e, KeyServiceError::QuotaExceeded(_)), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_context_or_altered_ciphertext_is_open_failed_and_names_no_pan() {
    let k = Keyd::ready().await;
    let (store, rows) = dump(&k, 2).await;
    let (s, c, digits) = &rows[0];
    let rec = record_of(&store, s).await;
    let ks = k.client("revealer");
    // Another row's context.
    let e = reveal(&ks, &rec, s, &rows[1].1).await.unwrap_err();
    assert!(matches!(e, KeyServiceError::OpenFailed), "{e}");
    // One flipped ciphertext bit.
    let mut bytes = s.as_bytes().to_vec();
    let n = bytes.len();
    bytes[n - 20] ^= 1;
    let altered = SealedPan::from_bytes(&bytes).unwrap();
    let e2 = reveal(&ks, &rec, &altered, c).await.unwrap_err();
    assert!(matches!(e2, KeyServiceError::OpenFailed), "{e2}");
    let text = format!("{e} {e:?} {e2} {e2:?}");
    assert!(!text.contains(digits.as_str()) && !text.contains(&digits[6..12]));
    // Through the library: the opaque decryption error.
    let ps = reader(&k, &store).await;
    assert!(matches!(
        ps.open_pan(s, &rows[1].1, &access()).await,
        Err(Error::Decryption)
    ));
    let audit = std::fs::read_to_string(k.path("data/audit.log")).unwrap();
    assert!(!audit.contains(digits.as_str()));
    assert_eq!(
        reveal_lines(&k)
            .iter()
            .filter(|l| l.contains("\"error\":\"open-failed\""))
            .count(),
        3
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn reveal_needs_the_reveal_permission_and_reveal_is_not_unwrap() {
    let k = Keyd::ready().await;
    let (store, rows) = dump(&k, 1).await;
    let (s, c, _) = &rows[0];
    let rec = record_of(&store, s).await;
    let mut opened = 0;
    for who in ["app", "reader", "wrapper", "indexer", "root"] {
        match reveal(&k.client(who), &rec, s, c).await {
            Ok(_) => opened += 1,
            Err(KeyServiceError::PermissionDenied(m)) => assert!(m.contains("reveal"), "{m}"),
            Err(e) => panic!("{who}: {e}"),
        }
    }
    assert_eq!(opened, 0, "PANs revealed without the reveal permission");
    // The reveal credential cannot take the DEK out.
    let e = k
        .client("revealer")
        .unwrap(&rec.key_request(), &rec.wrapped, &access())
        .await
        .unwrap_err();
    assert!(matches!(e, KeyServiceError::PermissionDenied(_)), "{e}");
    // whoami answers the library's permissions.
    let p = k.client("revealer").permissions().await.unwrap();
    assert!(p.reveal && !p.unwrap && !p.wrap && !p.index);
    let p = k.client("app").permissions().await.unwrap();
    assert!(!p.reveal && p.unwrap && p.wrap);
}

async fn reader(k: &Keyd, store: &MemoryKeyStore) -> Panseal {
    Panseal::builder()
        .key_service(k.client_with("revealer", |b| b.scope("merchant-1")))
        .key_store(store.clone())
        .audit(MemoryAuditSink::new())
        .environment("test")
        .scope("merchant-1")
        .build()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn open_pan_with_an_unwrap_less_credential_goes_through_reveal() {
    let k = Keyd::ready().await;
    let (store, rows) = dump(&k, 10).await;
    let audit = Arc::new(MemoryAuditSink::new());
    let ps = Panseal::builder()
        .key_service(k.client_with("revealer", |b| b.scope("merchant-1")))
        .key_store(store.clone())
        .audit_arc(audit.clone())
        .environment("test")
        .scope("merchant-1")
        .build()
        .await
        .unwrap();
    for (s, c, digits) in &rows {
        let o = ps.open_pan(s, c, &access()).await.unwrap();
        assert_eq!(o.pan.expose_digits(), digits);
        assert!(!o.needs_reseal);
    }
    // No DEK entered this process; the library audited each open; keyd
    // audited each reveal.
    assert_eq!(ps.held_keys_for_test().0.len(), 0, "DEKs held in process");
    let events = audit.events();
    assert_eq!(
        events
            .iter()
            .filter(|e| e.operation == panseal::Operation::Open
                && e.outcome == panseal::Outcome::Success)
            .count(),
        10
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| e.operation == panseal::Operation::Unwrap)
            .count(),
        0
    );
    assert_eq!(success(&reveal_lines(&k)), 10);

    // The blocking facade works the same.
    let (s, c, digits) = rows[0].clone();
    let store2 = store.clone();
    let ksb = k.client_with("revealer", |b| b.scope("merchant-1"));
    let got = tokio::task::spawn_blocking(move || {
        let b = panseal::blocking::Panseal::build(
            Panseal::builder()
                .key_service(ksb)
                .key_store(store2)
                .audit(MemoryAuditSink::new())
                .environment("test")
                .scope("merchant-1"),
        )
        .unwrap();
        b.open_pan(&s, &c, &access())
            .unwrap()
            .pan
            .expose_digits()
            .to_owned()
    })
    .await
    .unwrap();
    assert_eq!(got, digits);

    // A record edited in the database (marked compromised, dates moved):
    // refused as tampered before anything opens.
    let mut rec = record_of(&store, &rows[1].0).await;
    rec.state = KeyState::Compromised;
    let e = reveal(&k.client("revealer"), &rec, &rows[1].0, &rows[1].1)
        .await
        .unwrap_err();
    assert!(matches!(&e, KeyServiceError::RecordTampered(_)), "{e}");
    let mut rec = record_of(&store, &rows[1].0).await;
    (rec.created_at, rec.encrypt_until, rec.decrypt_until) = (1, 1, 2);
    let e = reveal(&k.client("revealer"), &rec, &rows[1].0, &rows[1].1)
        .await
        .unwrap_err();
    assert!(matches!(&e, KeyServiceError::RecordTampered(_)), "{e}");
    // Compromised by a custodian (a signed successor): keyd refuses to
    // reveal under it, with the signed record and with the older one.
    let stored = record_of(&store, &rows[1].0).await;
    let mut next = stored.clone();
    next.sequence += 1;
    next.tag = None;
    next.state = KeyState::Compromised;
    next.tag = Some(
        k.client("root")
            .authenticate_record(Some(&stored), &next)
            .await
            .unwrap(),
    );
    let e = reveal(&k.client("revealer"), &next, &rows[1].0, &rows[1].1)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, KeyServiceError::PermissionDenied(m) if m.contains("compromised")),
        "{e}"
    );
    let e = reveal(&k.client("revealer"), &stored, &rows[1].0, &rows[1].1)
        .await
        .unwrap_err();
    assert!(matches!(&e, KeyServiceError::RecordStale(_)), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn keyd_down_is_unavailable() {
    let mut k = Keyd::ready().await;
    let (store, rows) = dump(&k, 1).await;
    let ps = reader(&k, &store).await;
    let (s, c, _) = &rows[0];
    let rec = record_of(&store, s).await;
    let ks = k.client("revealer");
    k.kill();
    let e = reveal(&ks, &rec, s, c).await.unwrap_err();
    assert!(matches!(e, KeyServiceError::Unavailable(_)), "{e}");
    assert!(e.is_retryable());
    match ps.open_pan(s, c, &access()).await {
        Err(Error::KeyService(KeyServiceError::Unavailable(_))) => {}
        other => panic!("{:?}", other.map(|o| o.needs_reseal)),
    }
}

/// The path the C ABI and Python take (`ClientConfig` JSON → builder →
/// blocking facade): a `reveal`-only keyd credential in a configuration
/// opens without any change to the FFI.
#[tokio::test(flavor = "multi_thread")]
async fn configuration_based_client_of_the_c_abi_opens_via_reveal() {
    let k = Keyd::ready().await;
    let store_path = k.path("keys.pks");
    let store = panseal::FileKeyStore::open(&store_path).unwrap();
    let writer = Panseal::builder()
        .key_service(k.client_with("app", |b| b.scope("merchant-1")))
        .key_store(store)
        .audit(MemoryAuditSink::new())
        .environment("test")
        .scope("merchant-1")
        .build()
        .await
        .unwrap();
    let digits = pan_number(42);
    let c = ctx(42);
    let sealed = writer
        .seal_pan(&Pan::parse(&digits).unwrap(), &c)
        .await
        .unwrap();
    drop(writer);
    let certs = k.path("certs");
    let config = serde_json::json!({
        "environment": "test",
        "scope": "merchant-1",
        "key_service": {
            "type": "keyd",
            "address": k.addr,
            "server_name": "localhost",
            "ca_file": certs.join("ca.pem"),
            "client_cert_file": certs.join("revealer.pem"),
            "client_key_file": certs.join("revealer.key.pem"),
        },
        "key_store": {"type": "file", "path": store_path},
        "audit": {"type": "memory"},
    })
    .to_string();
    let text = sealed.to_text();
    let got = tokio::task::spawn_blocking(move || {
        let builder = panseal::config::ClientConfig::from_json(&config)
            .unwrap()
            .builder()
            .unwrap();
        let client = panseal::blocking::Panseal::build(builder).unwrap();
        let s = SealedPan::from_text(&text).unwrap();
        let o = client.open_pan(&s, &ctx(42), &access()).unwrap();
        let wrong = client.open_pan(&s, &ctx(43), &access());
        (o.pan.expose_digits().to_owned(), wrong.is_err())
    })
    .await
    .unwrap();
    assert_eq!(got, (digits, true));
    assert_eq!(
        success(&reveal_lines(&k)),
        1,
        "one reveal in keyd's audit, one open-failed"
    );
}

/// The `unwrap` quota (requests and distinct keys per window) is kept in
/// the same durable file: a restart does not reset it either.
#[tokio::test(flavor = "multi_thread")]
async fn unwrap_quota_survives_kill_9_too() {
    let mut k = Keyd::ready().await;
    let limited = k.client("limited"); // 6 unwraps, 3 distinct keys per hour
    let mut keys = Vec::new();
    for _ in 0..5 {
        let r = panseal::KeyRequest {
            id: panseal::KeyId::random(),
            scope: panseal::Scope::new("m-q").unwrap(),
            environment: panseal::Environment::new("test").unwrap(),
            purpose: panseal::KeyPurpose::Data,
        };
        let (_, w) = limited.generate(&r).await.unwrap();
        keys.push((r, w));
    }
    for (r, w) in &keys[..3] {
        limited.unwrap(r, w, &access()).await.unwrap();
    }
    k.kill();
    k.start();
    k.unseal().await;
    let limited = k.client("limited");
    let mut new_keys_after_restart = 0;
    for (r, w) in &keys[3..] {
        match limited.unwrap(r, w, &access()).await {
            Ok(_) => new_keys_after_restart += 1,
            Err(e) => assert!(e.to_string().contains("distinct keys"), "{e}"),
        }
    }
    assert_eq!(
        new_keys_after_restart, 0,
        "distinct keys unwrapped after kill -9"
    );
    // Keys already counted still unwrap (requests 4..6 of 6), then none.
    let mut ok = 0;
    for _ in 0..4 {
        if limited
            .unwrap(&keys[0].0, &keys[0].1, &access())
            .await
            .is_ok()
        {
            ok += 1;
        }
    }
    assert_eq!(ok, 3);
}
