//! Authenticated key-store records (issue 10, item 3) against a real
//! PostgreSQL (tests/it/common/pg.rs), played as the attacker: a database
//! writer (SQL injection) edits, swaps and rolls back key-record rows; a
//! writer that also holds a front end's `wrap` credential asks the key
//! service to sign its edits. Every test asserts a number.
use crate::common;

use std::sync::Arc;

use common::pg::PgServer;
use panseal::{
    Access, Context, Environment, Error, KeyError, KeyId, KeyPurpose, KeyService, KeyState,
    KeyStore, LocalKeyService, MemoryAuditSink, Pan, Panseal, Permissions, Policy,
    PostgresKeyStore, WrappedDek,
};

const KEK: [u8; 32] = [0x42; 32];

fn env() -> Environment {
    Environment::new("test").unwrap()
}

fn ctx(row: &str) -> Context {
    Context::new("cards", "pan", row).unwrap()
}

fn access() -> Access {
    Access::new("auditor", "records-test").unwrap()
}

async fn panseal(ks: LocalKeyService, store: &PostgresKeyStore, policy: Policy) -> Panseal {
    Panseal::builder()
        .key_service(ks)
        .key_store(store.clone())
        .audit(MemoryAuditSink::new())
        .environment("test")
        .scope("m")
        .policy(policy)
        .build()
        .await
        .unwrap()
}

/// The database writer: replaces a record row's bytes (and the copied
/// state column) by SQL, as an injection would.
fn write_row(pg: &PgServer, db: &str, record: &WrappedDek) {
    pg.psql(
        db,
        &format!(
            "UPDATE panseal_keys SET record = '\\x{}', state = {} WHERE id = '\\x{}'",
            hex::encode(record.to_bytes()),
            record.state as u8,
            hex::encode(record.id.as_bytes())
        ),
    );
}

fn read_row(pg: &PgServer, db: &str, id: KeyId) -> WrappedDek {
    let out = pg.psql(
        db,
        &format!(
            "SELECT encode(record, 'hex') FROM panseal_keys WHERE id = '\\x{}'",
            hex::encode(id.as_bytes())
        ),
    );
    WrappedDek::from_bytes(&hex::decode(out.trim()).unwrap()).unwrap()
}

fn is_refusal(e: &Error) -> bool {
    matches!(
        e,
        Error::Key(KeyError::RecordTampered(_) | KeyError::RecordStale(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_edits_of_key_records_are_detected_and_never_sealed_with() {
    let pg = PgServer::start();
    let url = pg.create_db("edits");
    let store = PostgresKeyStore::connect(&url, 2).await.unwrap();
    let ks = LocalKeyService::new(env());
    let ps = panseal(ks.clone(), &store, Policy::default().max_uses(1000)).await;
    let pan = Pan::parse("4111111111111111").unwrap();

    // Three DEKs: one retired, one compromised, one active (this writer's).
    let s_retired = ps.seal_pan(&pan, &ctx("r")).await.unwrap();
    ps.rotate_dek().await.unwrap();
    let s_comp = ps.seal_pan(&pan, &ctx("c")).await.unwrap();
    ps.rotate_dek().await.unwrap();
    ps.set_key_state(s_comp.key_id(), KeyState::Compromised)
        .await
        .unwrap();
    let s_active = ps.seal_pan(&pan, &ctx("a")).await.unwrap();
    ps.report_usage().await.unwrap();
    let (retired, comp, active) = (s_retired.key_id(), s_comp.key_id(), s_active.key_id());
    let rows: Vec<(KeyId, WrappedDek, &panseal::SealedPan, &str)> = vec![
        (retired, read_row(&pg, "edits", retired), &s_retired, "r"),
        (comp, read_row(&pg, "edits", comp), &s_comp, "c"),
        (active, read_row(&pg, "edits", active), &s_active, "a"),
    ];
    assert!(rows.iter().all(|(_, r, _, _)| r.tag.is_some()));
    let other_wrap = rows[0].1.wrapped.clone();

    type Edit = (&'static str, usize, Box<dyn Fn(&mut WrappedDek)>);
    let edits: Vec<Edit> = vec![
        (
            "compromised -> active",
            1,
            Box::new(|r| r.state = KeyState::Active),
        ),
        (
            "retired -> active",
            0,
            Box::new(|r| r.state = KeyState::Active),
        ),
        (
            "encrypt_until extended",
            2,
            Box::new(|r| r.encrypt_until += 86_400 * 365),
        ),
        (
            "decrypt_until extended",
            0,
            Box::new(|r| r.decrypt_until += 86_400 * 365),
        ),
        ("uses reset", 2, Box::new(|r| r.uses = 0)),
        ("max_uses raised", 2, Box::new(|r| r.max_uses *= 2)),
        ("version relabel", 2, Box::new(|r| r.version = 9)),
        (
            "purpose relabel",
            2,
            Box::new(|r| r.purpose = KeyPurpose::Index),
        ),
        (
            "wrapped key swapped from another record",
            2,
            Box::new(move |r| r.wrapped = other_wrap.clone()),
        ),
        ("sequence bumped", 1, Box::new(|r| r.sequence += 5)),
    ];
    let mut detected = 0;
    let mut accepted = Vec::new();
    for (what, which, edit) in &edits {
        let (_, original, sealed, row) = &rows[*which];
        let mut forged = original.clone();
        edit(&mut forged);
        write_row(&pg, "edits", &forged);
        // A fresh reader (no cache) opens under the edited record.
        let reader = panseal(ks.clone(), &store, Policy::default()).await;
        match reader.open_pan(sealed, &ctx(row), &access()).await {
            Err(e) if is_refusal(&e) => detected += 1,
            other => accepted.push(format!("{what}: {other:?}")),
        }
        write_row(&pg, "edits", original);
    }
    assert_eq!(accepted, Vec::<String>::new(), "forged records accepted");
    assert_eq!(detected, edits.len());

    // Rollback: an older, once-valid row of the active DEK is restored
    // after the writer reported more uses.
    let old = read_row(&pg, "edits", active);
    for i in 0..5 {
        ps.seal_pan(&pan, &ctx(&format!("x{i}"))).await.unwrap();
    }
    ps.report_usage().await.unwrap();
    let newer = read_row(&pg, "edits", active);
    assert_eq!(newer.sequence, old.sequence + 1);
    write_row(&pg, "edits", &old);
    let reader = panseal(ks.clone(), &store, Policy::default()).await;
    let err = reader
        .open_pan(&s_active, &ctx("a"), &access())
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Key(KeyError::RecordStale(id)) if id == active),
        "{err:?}"
    );
    // The writer's next re-check sees the rolled-back record: it abandons
    // the DEK (audited) and seals under a fresh one.
    assert!(is_refusal(&ps.report_usage().await.unwrap_err()));
    let mut under_bad = 0;
    for i in 0..50 {
        let s = ps.seal_pan(&pan, &ctx(&format!("y{i}"))).await.unwrap();
        if [retired, comp, active].contains(&s.key_id()) {
            under_bad += 1;
        }
    }
    assert_eq!(
        under_bad, 0,
        "seals under a refused, retired or compromised key"
    );

    // Reactivated retired and compromised rows: instances never adopt
    // another instance's DEK, and a fresh writer makes its own.
    for (id, original, _, _) in &rows[..2] {
        let mut forged = original.clone();
        forged.state = KeyState::Active;
        write_row(&pg, "edits", &forged);
        let _ = id;
    }
    let fresh = panseal(ks.clone(), &store, Policy::default()).await;
    let mut under_reactivated = 0;
    for i in 0..20 {
        let s = fresh.seal_pan(&pan, &ctx(&format!("z{i}"))).await.unwrap();
        if s.key_id() == retired || s.key_id() == comp {
            under_reactivated += 1;
        }
    }
    assert_eq!(under_reactivated, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrap_credential_cannot_get_record_edits_signed() {
    let pg = PgServer::start();
    let url = pg.create_db("sign");
    let store = PostgresKeyStore::connect(&url, 2).await.unwrap();
    let ks = LocalKeyService::new(env());
    let front = ks.restricted(Permissions::wrap_only());
    let ps = panseal(front.clone(), &store, Policy::default()).await;
    let pan = Pan::parse("4111111111111111").unwrap();
    let s1 = ps.seal_pan(&pan, &ctx("1")).await.unwrap();
    ps.rotate_dek().await.unwrap();
    let s2 = ps.seal_pan(&pan, &ctx("2")).await.unwrap();
    ps.report_usage().await.unwrap();
    let retired = store.fetch(s1.key_id()).await.unwrap().unwrap();
    let active = store.fetch(s2.key_id()).await.unwrap().unwrap();
    assert_eq!(retired.state, KeyState::DecryptOnly);
    assert!(active.uses >= 1);

    let succ = |r: &WrappedDek, f: &dyn Fn(&mut WrappedDek)| {
        let mut n = r.clone();
        f(&mut n);
        n.sequence = r.sequence + 1;
        n.tag = None;
        n
    };
    let wrap_of_retired = retired.wrapped.clone();
    let mut edited_previous = retired.clone();
    edited_previous.state = KeyState::Active;
    let attempts: Vec<(Option<&WrappedDek>, WrappedDek)> = vec![
        (
            Some(&retired),
            succ(&retired, &|r| r.state = KeyState::Active),
        ),
        (Some(&active), succ(&active, &|r| r.encrypt_until += 1)),
        (Some(&active), succ(&active, &|r| r.decrypt_until += 1)),
        (Some(&active), succ(&active, &|r| r.uses = 0)),
        (Some(&active), succ(&active, &|r| r.max_uses += 1)),
        (Some(&active), succ(&active, &|r| r.version = 2)),
        (
            Some(&active),
            succ(&active, &|r| r.purpose = KeyPurpose::Index),
        ),
        (
            Some(&active),
            succ(&active, &|r| r.state = KeyState::Compromised),
        ),
        (
            Some(&active),
            succ(&active, &|r| r.state = KeyState::Destroyed),
        ),
        (
            Some(&active),
            succ(&active, &|r| r.wrapped = wrap_of_retired.clone()),
        ),
        (Some(&active), {
            let mut n = succ(&active, &|_| {});
            n.sequence += 3;
            n
        }),
        // A "new" record for an existing id: the retired DEK reborn active.
        (None, {
            let mut n = retired.clone();
            n.state = KeyState::Active;
            n.sequence = 0;
            n.tag = None;
            n.created_at = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            n.encrypt_until = n.created_at + 3600;
            n.uses = 0;
            n
        }),
        // A successor of an edited (unsigned-for) previous record.
        (Some(&edited_previous), {
            let mut p = retired.clone();
            p.state = KeyState::Active;
            succ(&p, &|r| r.uses += 1)
        }),
    ];
    let mut refused = 0;
    let mut signed = Vec::new();
    for (i, (previous, next)) in attempts.iter().enumerate() {
        match front.authenticate_record(*previous, next).await {
            Err(_) => refused += 1,
            Ok(_) => signed.push(i),
        }
    }
    assert_eq!(signed, Vec::<usize>::new(), "edits the service signed");
    assert_eq!(refused, attempts.len());
    // The allowed changes still sign: a use-count report and retiring.
    let ok = succ(&active, &|r| r.uses += 3);
    assert!(front.authenticate_record(Some(&active), &ok).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_1_records_open_and_the_upgrade_signs_them() {
    let pg = PgServer::start();
    let url = pg.create_db("upgrade");
    let store = PostgresKeyStore::connect(&url, 2).await.unwrap();
    let pan = Pan::parse("5555555555554444").unwrap();
    // A library before issue 10 wrote version-1 records: make some (same
    // KEK), then strip them to version 1 as that library stored them.
    let old_ks = LocalKeyService::from_kek_bytes_insecure(env(), KEK);
    let old = panseal(old_ks, &store, Policy::default().max_uses(2)).await;
    let mut sealed = Vec::new();
    for i in 0..6 {
        let c = ctx(&i.to_string());
        sealed.push((old.seal_pan(&pan, &c).await.unwrap(), c));
    }
    old.report_usage().await.unwrap();
    drop(old);
    let records = store.list(None).await.unwrap();
    assert_eq!(records.len(), 3);
    for r in &records {
        let mut v1 = r.clone();
        v1.tag = None;
        v1.sequence = 0;
        assert_eq!(v1.to_bytes()[0], 1, "version-1 encoding");
        write_row(&pg, "upgrade", &v1);
    }
    // Today's library (a new process: same KEK and record key) opens them.
    let ks = LocalKeyService::from_kek_bytes_insecure(env(), KEK);
    let ps = panseal(ks.clone(), &store, Policy::default()).await;
    let mut opened = 0;
    for (s, c) in &sealed {
        if ps.open_pan(s, c, &access()).await.unwrap().pan == pan {
            opened += 1;
        }
    }
    assert_eq!(opened, 6);
    // ...and never seals with them.
    let s = ps.seal_pan(&pan, &ctx("new")).await.unwrap();
    assert!(records.iter().all(|r| r.id != s.key_id()));

    // A policy that refuses unsigned records refuses them until upgraded.
    let strict = panseal(
        ks.clone(),
        &store,
        Policy::default().require_signed_records(true),
    )
    .await;
    let err = strict
        .open_pan(&sealed[0].0, &sealed[0].1, &access())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Key(KeyError::Untagged(_))), "{err:?}");

    // The upgrade needs a custodian; a front end's credential is refused.
    let front = panseal(
        ks.restricted(Permissions::wrap_only()),
        &store,
        Policy::default(),
    )
    .await;
    assert!(front.upgrade_records().await.is_err());
    assert_eq!(ps.upgrade_records().await.unwrap(), 3);
    assert_eq!(ps.upgrade_records().await.unwrap(), 0, "repeatable");
    let after = store.list(None).await.unwrap();
    assert!(after.iter().all(|r| r.tag.is_some()));
    let strict = panseal(
        ks.clone(),
        &store,
        Policy::default().require_signed_records(true),
    )
    .await;
    let mut opened = 0;
    for (s, c) in &sealed {
        if strict.open_pan(s, c, &access()).await.unwrap().pan == pan {
            opened += 1;
        }
    }
    assert_eq!(opened, 6);
    // Stripping the tag again (a downgrade) is refused by the service
    // that signed it.
    let r = after.iter().find(|r| r.id == sealed[0].0.key_id()).unwrap();
    let mut stripped = r.clone();
    stripped.tag = None;
    stripped.state = KeyState::Active;
    write_row(&pg, "upgrade", &stripped);
    let reader = panseal(ks.clone(), &store, Policy::default()).await;
    let err = reader
        .open_pan(&sealed[0].0, &sealed[0].1, &access())
        .await
        .unwrap_err();
    assert!(is_refusal(&err), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_swap_conflicts_and_a_killed_signer_lose_no_use_count() {
    let pg = PgServer::start();
    let url = pg.create_db("cas");
    let store = PostgresKeyStore::connect(&url, 4).await.unwrap();
    let ks = LocalKeyService::new(env());
    let ps = panseal(ks.clone(), &store, Policy::default()).await;
    let pan = Pan::parse("4111111111111111").unwrap();
    let first = ps.seal_pan(&pan, &ctx("0")).await.unwrap();
    let id = first.key_id();
    // A killed process: the service signed a successor that was never
    // written. The stored record stays valid and reports continue.
    let stored = store.fetch(id).await.unwrap().unwrap();
    let mut lost = stored.clone();
    lost.uses += 1_000;
    lost.sequence += 1;
    lost.tag = None;
    ks.authenticate_record(Some(&stored), &lost).await.unwrap();
    // Reports race with a custodian rewrapping the same record over and
    // over (every rewrap is a competing compare-and-swap).
    ks.rotate_kek().await.unwrap();
    let store2 = store.clone();
    let ks2 = ks.clone();
    let rewrapper = tokio::spawn(async move {
        let mut n = 0;
        for _ in 0..20 {
            ks2.rotate_kek().await.unwrap();
            panseal::rewrap_record(&ks2, &store2, id).await.unwrap();
            n += 1;
        }
        n
    });
    let mut seals = 1u64;
    let ps = Arc::new(ps);
    for round in 0..40 {
        for i in 0..5 {
            let s = ps
                .seal_pan(&pan, &ctx(&format!("{round}-{i}")))
                .await
                .unwrap();
            assert_eq!(s.key_id(), id);
            seals += 1;
        }
        ps.report_usage().await.unwrap();
    }
    assert_eq!(rewrapper.await.unwrap(), 20);
    let r = store.fetch(id).await.unwrap().unwrap();
    assert_eq!(r.uses, seals, "use count lost or invented");
    ks.verify_record(&r).await.unwrap();
    // Everything still opens after the rewraps.
    let reader = panseal(ks.clone(), &store, Policy::default()).await;
    assert_eq!(
        reader
            .open_pan(&first, &ctx("0"), &access())
            .await
            .unwrap()
            .pan,
        pan
    );
}
