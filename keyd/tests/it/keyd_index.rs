//! Issue 10 against a real `panseal-keyd` process: blind-index keys that
//! never leave keyd, keyed hashes in batches, and key-store records that a
//! database writer cannot forge, reset or roll back. Each test plays the
//! attacker with what its foothold permits and asserts a number.

use crate::keyd_harness;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use keyd_harness::Keyd;
use panseal::keyd::server::protocol as proto;
use panseal::{
    Access, Dek, Environment, KeyId, KeyPurpose, KeyRequest, KeyService, KeyServiceError, KeyState,
    Pan, Scope, WrappedDek,
};
use panseal_keyd::state_file::{self as st, State, StateKeys};
use serde_json::json;
use sha2::Sha256;

fn scope(s: &str) -> Scope {
    Scope::new(s).unwrap()
}

fn access() -> Access {
    Access::new("user-1", "lookup").unwrap()
}

fn pans(n: usize) -> Vec<Pan> {
    // Luhn-valid 16-digit numbers: 4000 0000 0000 000c + check digit.
    (0..n)
        .map(|i| {
            let body = format!("4{:014}", i);
            let mut sum = 0;
            for (j, c) in body.bytes().rev().enumerate() {
                let mut d = u32::from(c - b'0');
                if j % 2 == 0 {
                    d *= 2;
                    if d > 9 {
                        d -= 9;
                    }
                }
                sum += d;
            }
            Pan::parse(&format!("{body}{}", (10 - sum % 10) % 10)).unwrap()
        })
        .collect()
}

/// The master key, rebuilt from two custodians' shares (the test holds
/// them; an attacker with one credential does not).
fn master(k: &Keyd) -> [u8; 32] {
    let share_bytes = |c: &str| {
        let t = k.share(c);
        let body = t.expose_secret().strip_prefix("pks1-").unwrap().to_owned();
        hex::decode(body.rsplit_once('-').unwrap().0).unwrap()
    };
    let shares: Vec<blahaj::Share> = ["alice", "bob"]
        .iter()
        .map(|c| blahaj::Share::try_from(share_bytes(c).as_slice()).unwrap())
        .collect();
    blahaj::Sharks(2)
        .recover(&shares)
        .unwrap()
        .try_into()
        .unwrap()
}

/// The live state as on disk (snapshot + journal).
fn disk_state(k: &Keyd) -> (State, u8) {
    let snap = st::decode_snapshot(&std::fs::read(k.path("data/state.bin")).unwrap(), 0).unwrap();
    let mut s = snap.state;
    if let Ok(j) = std::fs::read(k.path("data/state.journal")) {
        let (entries, _) = st::parse_journal(&j).unwrap();
        for e in entries {
            if e.header.generation > s.generation {
                s.generation = e.header.generation;
                for c in e.header.changes {
                    s.apply(c);
                }
            }
        }
    }
    (s, snap.version)
}

/// An index key read out of keyd's state with the master key (what only
/// keyd can do).
fn index_key(k: &Keyd, sc: &str, version: u32) -> [u8; 32] {
    let keys = StateKeys::derive(&master(k));
    let (s, _) = disk_state(k);
    let rec = &s.index_keys[&format!("test/{sc}")];
    let v = rec.versions.iter().find(|v| v.version == version).unwrap();
    *st::open_secret(
        &keys.index_seal,
        &st::index_key_aad("test", sc, version),
        v.sealed.as_ref().unwrap(),
    )
    .unwrap()
}

fn hmac_of(key: &[u8; 32], pan: &Pan) -> [u8; 32] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap();
    m.update(pan.expose_digits().as_bytes());
    m.finalize().into_bytes().into()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Occurrences of `key` in `body`: raw, hex, base64 (standard and URL-safe).
fn key_leaks(body: &[u8], key: &[u8; 32]) -> usize {
    let forms = [
        key.to_vec(),
        hex::encode(key).into_bytes(),
        hex::encode_upper(key).into_bytes(),
        base64::engine::general_purpose::STANDARD
            .encode(key)
            .into_bytes(),
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(key)
            .into_bytes(),
    ];
    forms.iter().filter(|f| contains(body, f)).count()
}

fn index_req(sc: &str) -> KeyRequest {
    KeyRequest {
        id: KeyId::random(),
        scope: scope(sc),
        environment: Environment::new("test").unwrap(),
        purpose: KeyPurpose::Index,
    }
}

#[tokio::test]
async fn a_wrap_and_index_credential_obtains_zero_bytes_of_the_index_key() {
    let k = Keyd::ready().await;
    let root = k.client("root");
    root.create_index_key(&scope("ix-1")).await.unwrap();
    let key = index_key(&k, "ix-1", 1);
    let fe = k.client("frontend");
    let ps = pans(3);
    let refs: Vec<&Pan> = ps.iter().collect();
    // The intended path works, and equals HMAC under the key in state.
    let hs = fe
        .blind_index(&scope("ix-1"), &[1], &refs, &access())
        .await
        .unwrap();
    assert_eq!(hs[0], hmac_of(&key, &ps[0]));

    // Every request the credential may send, raw (bypassing the client),
    // including the old unwrap path with every id/wrap it could guess.
    let wire_key = |purpose: &str| {
        json!({"id": KeyId::random().to_string(), "scope": "ix-1",
               "environment": "test", "purpose": purpose})
    };
    let fake_wrap = json!({"kek_id": "keyd/test/ix-1", "kek_version": 1,
        "bytes": base64::engine::general_purpose::STANDARD.encode([0u8; 60])});
    let requests: Vec<(&'static str, serde_json::Value)> = vec![
        (proto::STATUS, json!({})),
        (
            proto::KEK_INFO,
            json!({"environment": "test", "scope": "ix-1"}),
        ),
        (
            proto::INDEX_KEYS,
            json!({"environment": "test", "scope": "ix-1"}),
        ),
        (
            proto::INDEX_HASH,
            json!({"environment": "test", "scope": "ix-1", "versions": [1],
            "pans": [ps[0].expose_digits(), ps[1].expose_digits()]}),
        ),
        (proto::GENERATE, json!({"key": wire_key("index")})),
        (
            proto::WRAP,
            json!({"key": wire_key("index"),
            "dek": base64::engine::general_purpose::STANDARD.encode([7u8; 32])}),
        ),
        (
            proto::UNWRAP,
            json!({"key": wire_key("index"), "wrapped": fake_wrap.clone(),
            "on_behalf_of": "x", "purpose": "y"}),
        ),
        (
            proto::UNWRAP,
            json!({"key": wire_key("data"), "wrapped": fake_wrap.clone(),
            "on_behalf_of": "x", "purpose": "y"}),
        ),
        (
            proto::REWRAP,
            json!({"key": wire_key("index"), "wrapped": fake_wrap}),
        ),
        (
            proto::INDEX_CREATE,
            json!({"environment": "test", "scope": "ix-1"}),
        ),
        (
            proto::INDEX_STATE,
            json!({"environment": "test", "scope": "ix-1", "version": 1,
            "state": "decrypt-only"}),
        ),
        (proto::AUDIT, json!({"from": 1, "limit": 1000})),
        (proto::RECORD_VERIFY, json!({"record": ""})),
    ];
    let mut leaked = 0;
    let mut answered = 0;
    for (path, body) in &requests {
        let r = fe.raw_call(path, body).await.unwrap();
        answered += 1;
        leaked += match &r {
            Ok(b) => key_leaks(b, &key),
            Err(e) => key_leaks(e.to_string().as_bytes(), &key),
        };
        if [
            proto::GENERATE,
            proto::WRAP,
            proto::UNWRAP,
            proto::INDEX_CREATE,
        ]
        .contains(path)
        {
            assert!(r.is_err(), "{path} must be refused");
        }
    }
    assert_eq!(answered, requests.len());
    assert_eq!(leaked, 0, "index-key bytes in keyd's answers");
    // The audit log (what an auditor reads) holds neither key nor PAN.
    let log = std::fs::read(k.path("data/audit.log")).unwrap();
    assert_eq!(key_leaks(&log, &key), 0);
    assert!(!contains(&log, ps[0].expose_digits().as_bytes()));
    // Still the index key in state is unchanged (no request changed it).
    assert_eq!(index_key(&k, "ix-1", 1), key);
}

#[tokio::test]
async fn planting_an_index_key_through_wrap_or_generate_is_refused() {
    let k = Keyd::ready().await;
    let mut planted = 0;
    for who in ["frontend", "wrapper", "app", "root"] {
        let c = k.client(who);
        if c.generate(&index_req("ix-2")).await.is_ok() {
            planted += 1;
        }
        if c.wrap(&index_req("ix-2"), &Dek::generate()).await.is_ok() {
            planted += 1;
        }
    }
    assert_eq!(planted, 0);
    // And no index key exists for the scope: nothing a caller sent hashes.
    assert!(k
        .client("frontend")
        .index_keys(&scope("ix-2"))
        .await
        .unwrap()
        .is_empty());
    let e = k
        .client("frontend")
        .blind_index(&scope("ix-2"), &[1], &[&pans(1)[0]], &access())
        .await
        .unwrap_err();
    assert!(
        matches!(e, KeyServiceError::UnknownIndexKey { version: 1, .. }),
        "{e}"
    );
    // Creating one needs custodian.
    assert!(matches!(
        k.client("frontend").create_index_key(&scope("ix-2")).await,
        Err(KeyServiceError::PermissionDenied(_))
    ));
}

#[tokio::test]
async fn batches_are_pan_major_deterministic_and_rotation_keeps_old_values() {
    let k = Keyd::ready().await;
    let root = k.client("root");
    let sc = scope("ix-3");
    let v1 = root.create_index_key(&sc).await.unwrap();
    assert_eq!((v1.version, v1.state), (1, KeyState::Active));
    let fe = k.client("frontend");
    let ps = pans(5000);
    let refs: Vec<&Pan> = ps.iter().collect();
    let first = fe
        .blind_index(&sc, &[1], &refs[..10], &access())
        .await
        .unwrap();
    let again = fe
        .blind_index(&sc, &[1], &refs[..10], &access())
        .await
        .unwrap();
    assert_eq!(first, again, "deterministic");
    let k1 = index_key(&k, "ix-3", 1);
    let matching = (0..10)
        .filter(|&i| first[i] == hmac_of(&k1, &ps[i]))
        .count();
    assert_eq!(matching, 10);
    // Rotation: v2 active, v1 lookup-only; v1 values unchanged.
    let v2 = root.create_index_key(&sc).await.unwrap();
    assert_eq!(v2.version, 2);
    let list = fe.index_keys(&sc).await.unwrap();
    let states: Vec<(u32, KeyState)> = list.iter().map(|i| (i.version, i.state)).collect();
    assert_eq!(
        states,
        vec![(2, KeyState::Active), (1, KeyState::DecryptOnly)]
    );
    let k2 = index_key(&k, "ix-3", 2);
    // 5,000 PANs × 2 versions: more than one request, PAN-major.
    let both = fe
        .blind_index(&sc, &[2, 1], &refs, &access())
        .await
        .unwrap();
    assert_eq!(both.len(), 10_000);
    let wrong = (0..5000)
        .filter(|&i| both[2 * i] != hmac_of(&k2, &ps[i]) || both[2 * i + 1] != hmac_of(&k1, &ps[i]))
        .count();
    assert_eq!(wrong, 0);
    assert_eq!(
        &both[1..20].iter().step_by(2).copied().collect::<Vec<_>>()[..],
        &first[..10]
    );
    let same_across_versions = (0..5000)
        .filter(|&i| both[2 * i] == both[2 * i + 1])
        .count();
    assert_eq!(same_across_versions, 0, "versions are separate keys");
    // Destroying v1: no longer listed, no longer hashes, and gone from disk.
    root.set_index_key_state(&sc, 1, KeyState::Destroyed)
        .await
        .unwrap();
    assert_eq!(fe.index_keys(&sc).await.unwrap().len(), 1);
    let e = fe
        .blind_index(&sc, &[1], &refs[..1], &access())
        .await
        .unwrap_err();
    assert!(
        matches!(e, KeyServiceError::UnknownIndexKey { version: 1, .. }),
        "{e}"
    );
    let (s, _) = disk_state(&k);
    assert!(s.index_keys["test/ix-3"].versions[0].sealed.is_none());
    let journal = std::fs::read(k.path("data/state.journal")).unwrap_or_default();
    let sealed_lines = journal
        .split(|&b| b == b'\n')
        .filter(|l| contains(l, b"\"version\":1,\"state\":\"decrypt-only\""))
        .count();
    assert_eq!(sealed_lines, 0, "no journal line keeps the destroyed key");
    // A state never goes back to active.
    assert!(root
        .set_index_key_state(&sc, 2, KeyState::Active)
        .await
        .is_ok());
    assert!(root
        .set_index_key_state(&sc, 2, KeyState::DecryptOnly)
        .await
        .is_ok());
    assert!(root
        .set_index_key_state(&sc, 2, KeyState::Active)
        .await
        .is_err());
    // One audit record per hash request, with count and versions, no PAN.
    let hash_lines: Vec<String> = k
        .audit_lines()
        .into_iter()
        .filter(|l| l.contains("\"operation\":\"index-hash\""))
        .collect();
    // 2 of 10, 3 for 5,000 × 2 (2,048 PANs per request), 1 refused.
    assert_eq!(hash_lines.len(), 2 + 3 + 1);
    assert!(hash_lines.iter().any(|l| l.contains("\"count\":2048")));
    let pan_in_log = hash_lines
        .iter()
        .filter(|l| ps.iter().take(20).any(|p| l.contains(p.expose_digits())))
        .count();
    assert_eq!(pan_in_log, 0);
}

#[tokio::test]
async fn a_bad_pan_in_a_batch_is_named_by_position_and_nothing_is_computed() {
    let k = Keyd::ready().await;
    k.client("root")
        .create_index_key(&scope("ix-4"))
        .await
        .unwrap();
    let fe = k.client("frontend");
    let ps = pans(4);
    let secret_like = "4111111111111112"; // fails Luhn
    for (bad, why) in [
        (secret_like, "Luhn"),
        ("41111111111x1111", "digits"),
        ("4111", "8 to 19"),
    ] {
        let body = json!({"environment": "test", "scope": "ix-4", "versions": [1],
            "pans": [ps[0].expose_digits(), ps[1].expose_digits(), bad, ps[3].expose_digits()]});
        let r = fe.raw_call(proto::INDEX_HASH, &body).await.unwrap();
        let e = r.unwrap_err();
        let KeyServiceError::BatchItem { index, reason } = &e else {
            panic!("{e}")
        };
        assert_eq!(*index, 2);
        assert!(reason.contains(why), "{reason}");
        let msg = e.to_string();
        assert!(
            !msg.contains(bad) && !msg.contains(ps[0].expose_digits()),
            "{msg}"
        );
        let digits_run = msg
            .as_bytes()
            .windows(5)
            .filter(|w| w.iter().all(u8::is_ascii_digit))
            .count();
        assert_eq!(digits_run, 0, "no run of PAN digits in {msg}");
    }
    // Too large a batch is refused whole.
    let many: Vec<String> = pans(4097)
        .iter()
        .map(|p| p.expose_digits().to_owned())
        .collect();
    let body = json!({"environment": "test", "scope": "ix-4", "versions": [1], "pans": many});
    assert!(fe
        .raw_call(proto::INDEX_HASH, &body)
        .await
        .unwrap()
        .is_err());
    // Refused batches were audited (failure) with no hash computed: the
    // log has no success among them.
    let ok_hashes = k
        .audit_lines()
        .iter()
        .filter(|l| l.contains("\"operation\":\"index-hash\"") && l.contains("\"success\""))
        .count();
    assert_eq!(ok_hashes, 0);
}

#[tokio::test]
async fn keyd_killed_mid_batch_gives_unavailable_and_nothing_partial() {
    let mut k = Keyd::ready().await;
    k.client("root")
        .create_index_key(&scope("ix-5"))
        .await
        .unwrap();
    let fe = k.client_with("frontend", |b| {
        b.retries(0, std::time::Duration::from_millis(1))
    });
    let ps = pans(200_000);
    let task = tokio::spawn(async move {
        let refs: Vec<&Pan> = ps.iter().collect();
        fe.blind_index(&scope("ix-5"), &[1], &refs, &access()).await
    });
    // Let some requests of the batch succeed first.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let hashed_before_kill = k
        .audit_lines()
        .iter()
        .filter(|l| l.contains("\"operation\":\"index-hash\""))
        .count();
    k.kill();
    let r = task.await.unwrap();
    let partial = r.as_ref().map(|v| v.len()).unwrap_or(0);
    assert_eq!(partial, 0, "values returned from an interrupted batch");
    assert!(matches!(r, Err(KeyServiceError::Unavailable(_))), "{r:?}");
    eprintln!("requests answered before the kill: {hashed_before_kill}");
}

// ---- authenticated key-store records ---------------------------------------

fn record(sc: &str, now: u64) -> WrappedDek {
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/vectors/record_v1.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let bytes = hex::decode(v["records"][0]["record_hex"].as_str().unwrap()).unwrap();
    let mut r = WrappedDek::from_bytes(&bytes).unwrap();
    r.id = KeyId::random();
    r.scope = scope(sc);
    r.state = KeyState::Active;
    r.created_at = now;
    r.encrypt_until = now + 86_400;
    r.decrypt_until = now + 10 * 86_400;
    r.max_uses = 1 << 20;
    r.uses = 0;
    r.sequence = 0;
    r.tag = None;
    r
}

/// [`record`] holding a key `ks` (a keyd client) just generated for its
/// id: what a writer's new record looks like.
async fn fresh(ks: &panseal::RemoteKeyService, sc: &str) -> WrappedDek {
    let mut r = record(sc, now());
    r.wrapped = ks.generate(&r.key_request()).await.unwrap().1;
    r
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Signs `next` as the successor of `prev` and returns it with its tag.
async fn sign(
    ks: &panseal::RemoteKeyService,
    prev: Option<&WrappedDek>,
    mut next: WrappedDek,
) -> Result<WrappedDek, KeyServiceError> {
    let tag = ks.authenticate_record(prev, &next).await?;
    next.tag = Some(tag);
    Ok(next)
}

fn successor(r: &WrappedDek) -> WrappedDek {
    let mut n = r.clone();
    n.sequence += 1;
    n.tag = None;
    n
}

#[tokio::test]
async fn a_database_writer_with_a_wrap_credential_forges_no_record() {
    let mut k = Keyd::ready().await;
    let w = k.client("wrapper");
    let custodian = k.client("root");
    // The writer's own new record, then a legitimate use-count report.
    let r0 = sign(&w, None, fresh(&w, "rec-1").await).await.unwrap();
    w.verify_record(&r0).await.unwrap();
    let mut n = successor(&r0);
    n.uses = 5000;
    let r1 = sign(&w, Some(&r0), n).await.unwrap();
    // A custodian marks it compromised.
    let mut n = successor(&r1);
    n.state = KeyState::Compromised;
    let r2 = sign(&custodian, Some(&r1), n).await.unwrap();

    let mut attempts = 0;
    let mut accepted = 0;
    // 1. Sign-time forgeries with the wrap credential.
    let mut forged: Vec<WrappedDek> = Vec::new();
    let mut f = successor(&r2);
    f.state = KeyState::Active; // reactivate
    forged.push(f);
    let mut f = successor(&r2);
    f.encrypt_until += 86_400 * 365; // extend
    forged.push(f);
    let mut f = successor(&r2);
    f.uses = 0; // reset the use count
    forged.push(f);
    let mut f = successor(&r2);
    f.version = 7; // relabel version
    forged.push(f);
    let mut f = successor(&r2);
    f.purpose = KeyPurpose::Index; // relabel purpose
    forged.push(f);
    let mut f = successor(&r2);
    f.max_uses += 1;
    forged.push(f);
    for f in &forged {
        attempts += 1;
        if w.authenticate_record(Some(&r2), f).await.is_ok() {
            accepted += 1;
        }
    }
    // 2. A rollback: the older, once-valid row as `previous`, and as a
    // fresh record under the same id.
    let mut f = successor(&r0);
    f.uses = 6000;
    for (prev, next) in [(Some(&r0), f), (None, record("rec-1", now()))] {
        attempts += 1;
        let mut next = next;
        next.id = r0.id;
        if w.authenticate_record(prev, &next).await.is_ok() {
            accepted += 1;
        }
    }
    // 3. Offline edits of the stored row (tag kept): detected at verify.
    let edits: [fn(&mut WrappedDek); 9] = [
        |r| r.state = KeyState::Active,
        |r| r.encrypt_until += 1,
        |r| r.decrypt_until += 1,
        |r| r.uses = 0,
        |r| r.max_uses += 1,
        |r| r.version += 1,
        |r| r.purpose = KeyPurpose::Index,
        |r| r.sequence += 1,
        |r| r.tag = None,
    ];
    for e in &edits {
        attempts += 1;
        let mut r = r2.clone();
        e(&mut r);
        match w.verify_record(&r).await {
            Ok(()) => accepted += 1,
            // A stripped tag is a downgrade of a registered record: stale.
            Err(KeyServiceError::RecordTampered(_) | KeyServiceError::RecordStale(_)) => {}
            Err(other) => panic!("{other}"),
        }
    }
    // 4. Rolled-back rows, each once valid: stale.
    for old in [&r0, &r1] {
        attempts += 1;
        match w.verify_record(old).await {
            Ok(()) => accepted += 1,
            Err(KeyServiceError::RecordStale(_)) => {}
            Err(other) => panic!("{other}"),
        }
    }
    assert_eq!(attempts, 6 + 2 + 9 + 2);
    assert_eq!(accepted, 0, "forged records accepted");
    w.verify_record(&r2).await.unwrap();

    // The registry survives kill -9 and restart.
    k.kill();
    k.start();
    k.unseal().await;
    let w = k.client("wrapper");
    w.verify_record(&r2).await.unwrap();
    let mut stale_after_restart = 0;
    for old in [&r0, &r1] {
        if matches!(
            w.verify_record(old).await,
            Err(KeyServiceError::RecordStale(_))
        ) {
            stale_after_restart += 1;
        }
    }
    assert_eq!(stale_after_restart, 2);
    // The custodian can still move it forward (destroyed, wrap emptied).
    let mut n = successor(&r2);
    n.state = KeyState::Destroyed;
    n.wrapped.bytes.clear();
    let r3 = sign(&k.client("root"), Some(&r2), n).await.unwrap();
    w.verify_record(&r3).await.unwrap();
}

#[tokio::test]
async fn record_caps_bound_new_records() {
    let k = Keyd::ready_with(
        "\n[[record_cap]]\nscopes = [\"capped-*\"]\nmax_uses = 1000\n\
         max_encrypt_period_seconds = 3600\nmax_decrypt_period_seconds = 7200\n",
    )
    .await;
    let w = k.client("wrapper");
    let mut refused = 0;
    for f in [
        |r: &mut WrappedDek| r.max_uses = 1001,
        |r: &mut WrappedDek| r.max_uses = 1000,
        |r: &mut WrappedDek| r.max_uses = 10,
    ] {
        let mut r = fresh(&w, "capped-1").await;
        f(&mut r);
        r.encrypt_until = r.created_at + 3600;
        r.decrypt_until = r.created_at + 7200;
        if matches!(
            w.authenticate_record(None, &r).await,
            Err(KeyServiceError::RecordTransition(_))
        ) {
            refused += 1;
        }
    }
    assert_eq!(refused, 1);
    let mut r = fresh(&w, "capped-1").await;
    r.max_uses = 10;
    r.encrypt_until = r.created_at + 3601;
    r.decrypt_until = r.created_at + 7200;
    assert!(matches!(
        w.authenticate_record(None, &r).await,
        Err(KeyServiceError::RecordTransition(_))
    ));
    // Other scopes are not capped.
    w.authenticate_record(None, &fresh(&w, "free-1").await)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_version_2_data_directory_opens_and_migrates_to_version_3() {
    use sha2::Digest;
    let mut k = Keyd::ready().await;
    let app = k.client("app");
    let d = KeyRequest {
        purpose: KeyPurpose::Data,
        ..index_req("mig-1")
    };
    let (dek, w) = app.generate(&d).await.unwrap();
    k.kill();
    // Rewrite the state as version 2 (what a keyd before issue 10 wrote):
    // no version 3 fields, v2 MAC label, empty journal, matching anchor.
    let keys = StateKeys::derive(&master(&k));
    let (mut s, v) = disk_state(&k);
    assert_eq!(v, st::V4);
    s.generation += 1;
    let mut body = serde_json::to_value(&s).unwrap();
    for f in ["index_keys", "record_keys", "registry", "ingest_keys"] {
        body.as_object_mut().unwrap().remove(f);
    }
    let mut out = b"PANSEALD\x02".to_vec();
    out.extend_from_slice(&serde_json::to_vec(&body).unwrap());
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&keys.state_mac[..]).unwrap();
    m.update(b"panseal-keyd-state-v2\n");
    m.update(&out);
    let mac: [u8; 32] = m.finalize().into_bytes().into();
    out.extend_from_slice(&mac);
    let digest = Sha256::digest(&out);
    out.extend_from_slice(&digest);
    std::fs::write(k.path("data/state.bin"), &out).unwrap();
    std::fs::write(k.path("data/state.journal"), b"").unwrap();
    std::fs::write(
        k.path("data/state.anchor"),
        st::Anchor::new(&keys, s.generation, &mac).encode(),
    )
    .unwrap();
    assert_eq!(
        st::decode_snapshot(&out, 0).unwrap().version,
        st::V2,
        "written as version 2"
    );
    k.start();
    k.unseal().await;
    // Migrated: version 4 on disk (issue 11), audited, old wraps still open, new
    // features work.
    let (_, v) = disk_state(&k);
    assert_eq!(v, st::V4);
    let migrations = k
        .audit_lines()
        .iter()
        .filter(|l| l.contains("state version 2 rewritten as version 4"))
        .count();
    assert_eq!(migrations, 1);
    let got = k.client("app").unwrap(&d, &w, &access()).await.unwrap();
    assert_eq!(
        panseal::hazmat::dek_bytes(&got),
        panseal::hazmat::dek_bytes(&dek)
    );
    k.client("root")
        .create_index_key(&scope("mig-1"))
        .await
        .unwrap();
    // A restart reads version 4 and does not migrate again.
    k.kill();
    k.start();
    k.unseal().await;
    let migrations = k
        .audit_lines()
        .iter()
        .filter(|l| l.contains("state version 2 rewritten as version 4"))
        .count();
    assert_eq!(migrations, 1);
    assert_eq!(
        k.client("frontend")
            .index_keys(&scope("mig-1"))
            .await
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn keyd_state_v3_vectors_from_an_independent_implementation() {
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/vectors/keyd_state_v3.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let hx = |x: &serde_json::Value| hex::decode(x.as_str().unwrap()).unwrap();
    let master: [u8; 32] = hx(&v["master_key"]).try_into().unwrap();
    let keys = StateKeys::derive(&master);
    assert_eq!(
        hex::encode(&keys.index_seal[..]),
        v["subkeys"]["index_seal"].as_str().unwrap()
    );
    assert_eq!(
        hex::encode(&keys.record_seal[..]),
        v["subkeys"]["record_seal"].as_str().unwrap()
    );
    // Snapshot and journal: positive.
    let snap = st::decode_snapshot(&hx(&v["state_bin"]), 0).unwrap();
    assert_eq!(snap.version, st::V3);
    snap.verify(&keys).unwrap();
    assert_eq!(hex::encode(snap.mac), v["snapshot_mac"].as_str().unwrap());
    let (entries, _) = st::parse_journal(v["state_journal"].as_str().unwrap().as_bytes()).unwrap();
    entries[0].verify(&keys).unwrap();
    assert!(entries[0].header.changes[0].is_v3());
    let mut s = snap.state.clone();
    for c in entries[0].header.changes.clone() {
        s.apply(c);
    }
    assert_eq!(s.registry["test/m-1/0102030405060708"].sequence, 4);
    // Sealed keys open to the vector's plaintext; moved ones do not.
    let ik = &v["index_key"];
    let sealed = snap.state.index_keys["test/m-1"].versions[0]
        .sealed
        .clone()
        .unwrap();
    assert_eq!(sealed, ik["sealed"].as_str().unwrap());
    let key = st::open_secret(
        &keys.index_seal,
        &st::index_key_aad("test", "m-1", 1),
        &sealed,
    )
    .unwrap();
    assert_eq!(hex::encode(&key[..]), ik["key"].as_str().unwrap());
    let mut refused = 0;
    for (aad, sealed) in [
        (
            st::index_key_aad("test", "m-1", 1),
            ik["sealed_for_m_2"].as_str().unwrap(),
        ),
        (st::index_key_aad("test", "m-1", 2), sealed.as_str()),
        (st::index_key_aad("prod", "m-1", 1), sealed.as_str()),
    ] {
        if st::open_secret(&keys.index_seal, &aad, sealed).is_err() {
            refused += 1;
        }
    }
    assert_eq!(refused, 3);
    let rk = st::open_secret(
        &keys.record_seal,
        &st::record_key_aad("test"),
        &snap.state.record_keys["test"].sealed,
    )
    .unwrap();
    assert_eq!(
        hex::encode(&rk[..]),
        v["record_key"]["key"].as_str().unwrap()
    );
    // Keyed hash: standard HMAC-SHA-256 of the ASCII digits.
    let pan = Pan::parse(v["blind_index"]["pan"].as_str().unwrap()).unwrap();
    assert_eq!(
        hex::encode(hmac_of(&key, &pan)),
        v["blind_index"]["hmac"].as_str().unwrap()
    );
    // Record tag over signed_bytes, and an edited record fails it.
    let r = WrappedDek::from_bytes(&hx(&v["record"]["record_hex"])).unwrap();
    assert_eq!(r.sequence, 3);
    assert_eq!(
        hex::encode(r.signed_bytes()),
        v["record"]["signed_bytes_hex"].as_str().unwrap()
    );
    let tag_ok = |r: &WrappedDek| {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&rk[..]).unwrap();
        m.update(&r.signed_bytes());
        m.verify_slice(&r.tag.unwrap().0).is_ok()
    };
    assert!(tag_ok(&r));
    assert_eq!(
        hex::encode(r.tag.unwrap().0),
        snap.state.registry["test/m-1/0102030405060708"].tag
    );
    let edited = WrappedDek::from_bytes(&hx(&v["record"]["edited_uses_0_hex"])).unwrap();
    assert!(!tag_ok(&edited));
    // Negative snapshots.
    let mut negatives = 0;
    for n in v["negative"].as_array().unwrap() {
        let bytes = hx(&n["state_bin"]);
        let outcome = match st::decode_snapshot(&bytes, 0) {
            Err(st::FormatError::Corrupt(_)) => "corrupt",
            Err(st::FormatError::Unauthentic(_)) => "unauthentic",
            Ok(s) => match s.verify(&keys) {
                Err(_) => "unauthentic",
                Ok(()) => "accepted",
            },
        };
        assert_eq!(outcome, n["expect"].as_str().unwrap(), "{}", n["name"]);
        negatives += 1;
    }
    assert_eq!(negatives, 3);
}

/// The review of issue 10, as an attacker with a `wrap` credential and the
/// key table: (1) a signature keyd makes but nobody stores (a crash, a lost
/// answer, an attacker throwing it away) locks no key; (2) a stripped tag
/// does not turn a registered record back into an unauthenticated version-1
/// one; (3) an old record cannot be passed off as a new one; (4) a
/// compromise or destruction keyd signed binds at once, stored or not.
#[tokio::test]
async fn unstored_signatures_stripped_tags_and_old_records_gain_an_attacker_nothing() {
    let k = Keyd::ready().await;
    let w = k.client("wrapper");
    let root = k.client("root");
    let app = k.client("app");
    let r0 = sign(&w, None, fresh(&w, "rev-1").await).await.unwrap();
    w.verify_record(&r0).await.unwrap();
    // (1) 20 successors signed and thrown away: the stored record still
    // verifies and still serves as `previous`.
    for i in 0..20 {
        let mut n = successor(&r0);
        n.uses = i + 1;
        sign(&w, Some(&r0), n).await.unwrap();
    }
    w.verify_record(&r0).await.unwrap();
    let mut n = successor(&r0);
    n.uses = 100;
    let r1 = sign(&w, Some(&r0), n).await.unwrap();
    // Stored and read back (verified): from now on r0 is a rollback.
    w.verify_record(&r1).await.unwrap();
    assert!(matches!(
        w.verify_record(&r0).await,
        Err(KeyServiceError::RecordStale(_))
    ));
    // (2) Stripped tag, with and without further edits: stale.
    let mut refused = 0;
    for edit in [
        (|_r: &mut WrappedDek| {}) as fn(&mut WrappedDek),
        |r| r.decrypt_until += 365 * 86_400,
        |r| r.uses = 0,
    ] {
        let mut s = r1.clone();
        s.tag = None;
        edit(&mut s);
        if matches!(
            w.verify_record(&s).await,
            Err(KeyServiceError::RecordStale(_))
        ) {
            refused += 1;
        }
    }
    assert_eq!(refused, 3, "stripped-tag records accepted");
    // (3) A record keyd did not just wrap, presented as new: refused.
    let mut passed_off = 0;
    for _ in 0..3 {
        let mut old = record("rev-1", now());
        old.wrapped = r1.wrapped.clone();
        old.id = KeyId::random();
        if w.authenticate_record(None, &old).await.is_ok() {
            passed_off += 1;
        }
    }
    assert_eq!(passed_off, 0, "old records signed as new");
    // (4) A custodian's compromise, signed but never stored: the stored
    // active record is refused at once; a destruction stops unwraps too.
    let mut c = successor(&r1);
    c.state = KeyState::Compromised;
    let c = sign(&root, Some(&r1), c).await.unwrap();
    assert!(matches!(
        w.verify_record(&r1).await,
        Err(KeyServiceError::RecordStale(_))
    ));
    app.unwrap(&r1.key_request(), &r1.wrapped, &access())
        .await
        .unwrap();
    let mut d = successor(&c);
    d.state = KeyState::Destroyed;
    d.wrapped.bytes.clear();
    sign(&root, Some(&c), d).await.unwrap();
    assert!(app
        .unwrap(&r1.key_request(), &r1.wrapped, &access())
        .await
        .is_err());
}
