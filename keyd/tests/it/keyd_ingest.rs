//! Write-only ingest inside a real `panseal-keyd` process (issue 11):
//! ingest key pairs in state version 4, `/v1/ingest/*`,
//! `/v1/generate-wrapped` and `/v1/admit`, played by the front end, the
//! admission job, the reveal and unwrap principals and their attackers.

use crate::keyd_harness;

use base64::Engine as _;
use keyd_harness::Keyd;
use panseal::keyd::server::protocol::{self as proto, AdmitItemErrorKind, WireAdmitResult};
use panseal::{
    Access, AdmitItem, AdmitItemError, AdmitRequest, Context, Environment, IngestOpenRequest,
    IngestSealed, IngestSealer, KeyId, KeyPurpose, KeyService, KeyServiceError, KeyState, Pan,
    RemoteKeyService, Scope, WrappedDek,
};
use panseal_keyd::state_file::{self as st, StateKeys};

fn scope(s: &str) -> Scope {
    Scope::new(s).unwrap()
}

fn access() -> Access {
    Access::new("job-7", "admission").unwrap()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The `n`-th of a run of distinct Luhn-valid 16-digit PANs.
fn pan_number(n: u32) -> String {
    let body = format!("411111{n:09}");
    let mut sum = 0;
    for (i, c) in body.chars().rev().enumerate() {
        let mut v = c.to_digit(10).unwrap();
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

/// A custodian creates the scope's ingest key; the front end (no
/// permission but listing) fetches it and builds its sealer.
async fn sealer_for(k: &Keyd, sc: &str) -> IngestSealer {
    k.client("root")
        .create_ingest_key(&scope(sc))
        .await
        .unwrap();
    active_sealer(k, sc).await
}

async fn active_sealer(k: &Keyd, sc: &str) -> IngestSealer {
    let keys = k
        .client("ingest-frontend")
        .ingest_keys(&scope(sc))
        .await
        .unwrap();
    let active = keys.iter().find(|i| i.state == KeyState::Active).unwrap();
    IngestSealer::from_info(active).unwrap()
}

/// A record of a DEK keyd generated and kept (only the wrap left it),
/// signed by the same `wrap` credential: what the admission job seals under.
async fn dek_record(ks: &RemoteKeyService, sc: &str) -> WrappedDek {
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
    let t = now();
    r.id = KeyId::random();
    r.scope = scope(sc);
    r.environment = Environment::new("test").unwrap();
    r.purpose = KeyPurpose::Data;
    r.version = 0;
    r.state = KeyState::Active;
    r.created_at = t;
    r.encrypt_until = t + 86_400;
    r.decrypt_until = t + 10 * 86_400;
    r.max_uses = 1 << 24;
    r.uses = 0;
    r.sequence = 0;
    r.tag = None;
    r.wrapped = ks.generate_wrapped(&r.key_request()).await.unwrap();
    r.tag = Some(ks.authenticate_record(None, &r).await.unwrap());
    r
}

fn items<'a>(rows: &'a [(IngestSealed, Context, String)]) -> Vec<AdmitItem<'a>> {
    rows.iter()
        .map(|(s, c, _)| AdmitItem {
            sealed: s,
            context: c,
        })
        .collect()
}

fn seal_rows(sealer: &IngestSealer, from: u32, n: u32) -> Vec<(IngestSealed, Context, String)> {
    (from..from + n)
        .map(|i| {
            let d = pan_number(i);
            let c = ctx(i);
            (sealer.seal(&Pan::parse(&d).unwrap(), &c).unwrap(), c, d)
        })
        .collect()
}

/// Every PAN's digits, and its last 12 (what a partial leak would show).
fn leaks(text: &str, pans: &[String]) -> usize {
    pans.iter()
        .filter(|p| text.contains(p.as_str()) || text.contains(&p[p.len() - 12..]))
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn ingest_keys_are_created_listed_retired_and_destroyed_by_custodians_only() {
    let k = Keyd::ready().await;
    let sc = scope("ing-life");
    let root = k.client("root");
    let fe = k.client("ingest-frontend");
    assert!(fe.ingest_keys(&sc).await.unwrap().is_empty());
    let v1 = root.create_ingest_key(&sc).await.unwrap();
    assert_eq!((v1.public_key.version(), v1.state), (1, KeyState::Active));
    assert_eq!(v1.public_key.scope(), &sc);
    // The front end sees the same public key.
    let listed = fe.ingest_keys(&sc).await.unwrap();
    assert_eq!(listed, vec![v1.clone()]);
    // A new version retires the active one.
    let v2 = root.create_ingest_key(&sc).await.unwrap();
    assert_eq!(v2.public_key.version(), 2);
    let listed = fe.ingest_keys(&sc).await.unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|i| (i.public_key.version(), i.state))
            .collect::<Vec<_>>(),
        vec![(2, KeyState::Active), (1, KeyState::DecryptOnly)]
    );
    assert_ne!(listed[0].public_key, listed[1].public_key);
    // Forward only: a retired key does not come back.
    assert!(root
        .set_ingest_key_state(&sc, 1, KeyState::Active)
        .await
        .is_err());
    root.set_ingest_key_state(&sc, 1, KeyState::Destroyed)
        .await
        .unwrap();
    assert_eq!(fe.ingest_keys(&sc).await.unwrap().len(), 1);
    assert!(matches!(
        root.set_ingest_key_state(&sc, 1, KeyState::DecryptOnly)
            .await,
        Err(KeyServiceError::UnknownIngestKey { version: 1, .. })
    ));
    // No other principal creates or changes a key: 0 of 5 tries succeed.
    let mut changed = 0;
    for who in ["ingest-frontend", "admitter", "opener", "reader", "app"] {
        let c = k.client(who);
        if c.create_ingest_key(&sc).await.is_ok() {
            changed += 1;
        }
        if c.set_ingest_key_state(&sc, 2, KeyState::Destroyed)
            .await
            .is_ok()
        {
            changed += 1;
        }
    }
    assert_eq!(changed, 0);
    // Another environment's principal does not even list them: its own
    // environment has none, and asking for "test" is refused.
    let prod = k.client("prodapp");
    assert!(prod.ingest_keys(&sc).await.unwrap().is_empty());
    let r = prod
        .raw_call(
            proto::INGEST_KEYS,
            &serde_json::json!({"environment": "test", "scope": "ing-life"}),
        )
        .await
        .unwrap();
    assert!(
        matches!(r, Err(KeyServiceError::Environment { .. })),
        "{r:?}"
    );
    // The custodian CLI.
    let (ok, out, err) = k.custodian_cli("alice", "ingest-create", &["--scope", "ing-cli"]);
    assert!(ok, "{err}");
    assert!(out.contains("PIK1/test/ing-cli/1/"), "{out}");
    let (ok, _, err) = k.custodian_cli("alice", "ingest-create", &["--scope", "ing-cli"]);
    assert!(ok, "{err}");
    let (ok, out, err) = k.custodian_cli(
        "alice",
        "ingest-retire",
        &["--scope", "ing-cli", "--version", "1"],
    );
    assert!(ok, "{err}");
    assert!(out.contains("decrypt-only"), "{out}");
    let (ok, out, err) = k.custodian_cli(
        "alice",
        "ingest-destroy",
        &["--scope", "ing-cli", "--version", "1"],
    );
    assert!(ok, "{err}");
    assert!(!out.contains("PIK1/test/ing-cli/1/"), "{out}");
    let (ok, out, _) = k.custodian_cli("alice", "ingest-list", &["--scope", "ing-cli"]);
    assert!(ok && out.contains("PIK1/test/ing-cli/2/"), "{out}");
    // Every change was audited; no private scalar anywhere in the log.
    let lines = k.audit_lines();
    assert!(lines
        .iter()
        .any(|l| l.contains("\"operation\":\"ingest-create\"")));
    assert!(lines
        .iter()
        .any(|l| l.contains("\"operation\":\"ingest-state\"")));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_of_500_is_admitted_and_the_reader_opens_the_same_pans_with_the_same_index() {
    // (A debug build's P-256 is slow: a long deadline for the one request.)
    let k = Keyd::ready_with("audit_fsync = \"periodic\"\n").await;
    let sc = "ing-500";
    let sealer = sealer_for(&k, sc).await;
    k.client("root").create_index_key(&scope(sc)).await.unwrap();
    let rows = seal_rows(&sealer, 0, 500);
    let admitter = k.client_with("admitter", |b| {
        b.request_timeout(std::time::Duration::from_secs(300))
    });
    let record = dek_record(&admitter, sc).await;
    let its = items(&rows);
    let out = admitter
        .admit(
            &AdmitRequest {
                record: &record,
                index_versions: &[1],
                items: &its,
            },
            &access(),
        )
        .await
        .unwrap();
    assert_eq!(out.len(), 500);
    let admitted: Vec<_> = out.into_iter().map(Result::unwrap).collect();
    // The reader (unwrap) opens every compact ciphertext to the same PAN;
    // the index equals /v1/index/hash of the PAN.
    let reader = k.client("reader");
    let dek = reader
        .unwrap(&record.key_request(), &record.wrapped, &access())
        .await
        .unwrap();
    let pans: Vec<Pan> = rows.iter().map(|r| Pan::parse(&r.2).unwrap()).collect();
    let refs: Vec<&Pan> = pans.iter().collect();
    let hashes = k
        .client("indexer")
        .blind_index(&scope(sc), &[1], &refs, &access())
        .await
        .unwrap();
    let mut same = 0;
    for (i, (a, (_, c, digits))) in admitted.iter().zip(&rows).enumerate() {
        assert_eq!(a.sealed.key_id(), record.id);
        let p = panseal::hazmat::open_with_dek(&dek, &a.sealed, c).unwrap();
        assert_eq!(a.index, vec![hashes[i]]);
        if p.expose_digits() == digits {
            same += 1;
        }
        // Bound to the same context: another row's context fails.
        assert!(panseal::hazmat::open_with_dek(&dek, &a.sealed, &ctx(10_000)).is_err());
    }
    assert_eq!(same, 500);
    // One audit record for the request, with counts, never a PAN.
    let lines: Vec<String> = k
        .audit_lines()
        .into_iter()
        .filter(|l| l.contains("\"operation\":\"admit\""))
        .collect();
    assert_eq!(lines.len(), 1);
    assert!(lines[0].contains("\"count\":500"), "{}", lines[0]);
    assert!(lines[0].contains("admitted 500, refused 0"), "{}", lines[0]);
    let log = std::fs::read_to_string(k.path("data/audit.log")).unwrap();
    assert_eq!(
        leaks(&log, &rows.iter().map(|r| r.2.clone()).collect::<Vec<_>>()),
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_items_get_typed_errors_and_the_others_are_still_admitted() {
    let k = Keyd::ready().await;
    let sc = "ing-bad";
    let root = k.client("root");
    // Versions 1 (to be destroyed), 2 (retired) and 3 (active).
    let s1 = sealer_for(&k, sc).await;
    let s2 = sealer_for(&k, sc).await;
    let s3 = sealer_for(&k, sc).await;
    // Another scope's key of the same version number as the active one.
    sealer_for(&k, "ing-bad-other").await;
    sealer_for(&k, "ing-bad-other").await;
    let other = sealer_for(&k, "ing-bad-other").await;
    let pan = |i| Pan::parse(&pan_number(i)).unwrap();
    let good = s3.seal(&pan(1), &ctx(1)).unwrap();
    let retired = s2.seal(&pan(2), &ctx(2)).unwrap();
    let destroyed = s1.seal(&pan(3), &ctx(3)).unwrap();
    let another_scope = other.seal(&pan(4), &ctx(4)).unwrap();
    let wrong_context = s3.seal(&pan(5), &ctx(5)).unwrap();
    let mut altered = s3.seal(&pan(6), &ctx(6)).unwrap().as_bytes().to_vec();
    altered[80] ^= 1;
    let truncated = s3.seal(&pan(7), &ctx(7)).unwrap().to_text()[..100].to_owned();
    let last_good = s3.seal(&pan(8), &ctx(8)).unwrap();
    root.set_ingest_key_state(&scope(sc), 1, KeyState::Destroyed)
        .await
        .unwrap();
    let admitter = k.client("admitter");
    let record = dek_record(&admitter, sc).await;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let item = |sealed: String, c: &Context| {
        serde_json::json!({"sealed": sealed, "context": {
            "table": c.table(), "column": c.column(), "row_key": b64(c.row_key())}})
    };
    let body = serde_json::json!({
        "record": b64(&record.to_bytes()),
        "index_versions": [],
        "items": [
            item(good.to_text(), &ctx(1)),
            item(retired.to_text(), &ctx(2)),
            item(destroyed.to_text(), &ctx(3)),
            item(another_scope.to_text(), &ctx(4)),
            item(wrong_context.to_text(), &ctx(99)),
            item(b64(&altered), &ctx(6)),
            item(truncated, &ctx(7)),
            item("garbage".into(), &ctx(9)),
            item(b64(last_good.as_bytes()), &ctx(8)),
        ],
    });
    let raw = admitter
        .raw_call(proto::ADMIT, &body)
        .await
        .unwrap()
        .unwrap();
    let a: proto::AdmitResponse = serde_json::from_slice(&raw).unwrap();
    let kinds: Vec<Option<(AdmitItemErrorKind, Option<u32>)>> = a
        .results
        .iter()
        .map(|r| match r {
            WireAdmitResult::Ok { .. } => None,
            WireAdmitResult::Error { error, version } => Some((*error, *version)),
        })
        .collect();
    use AdmitItemErrorKind as E;
    assert_eq!(
        kinds,
        vec![
            None,
            None, // a retired key still admits
            Some((E::UnknownIngestKey, Some(1))),
            Some((E::KeyMismatch, None)),
            Some((E::OpenFailed, None)),
            Some((E::OpenFailed, None)),
            Some((E::Malformed, None)),
            Some((E::Malformed, None)),
            None,
        ]
    );
    // The same through the typed client: AdmitItemError per item.
    let its = [
        AdmitItem {
            sealed: &good,
            context: &ctx(1),
        },
        AdmitItem {
            sealed: &destroyed,
            context: &ctx(3),
        },
        AdmitItem {
            sealed: &another_scope,
            context: &ctx(4),
        },
        AdmitItem {
            sealed: &wrong_context,
            context: &ctx(99),
        },
        AdmitItem {
            sealed: &IngestSealed::from_bytes(&altered).unwrap(),
            context: &ctx(6),
        },
    ];
    let out = admitter
        .admit(
            &AdmitRequest {
                record: &record,
                index_versions: &[],
                items: &its,
            },
            &access(),
        )
        .await
        .unwrap();
    assert!(out[0].is_ok());
    assert_eq!(
        out[1..]
            .iter()
            .map(|r| r.as_ref().unwrap_err().clone())
            .collect::<Vec<_>>(),
        vec![
            AdmitItemError::UnknownIngestKey(1),
            AdmitItemError::KeyMismatch,
            AdmitItemError::OpenFailed,
            AdmitItemError::OpenFailed,
        ]
    );
    // A batch over MAX_ADMIT_BATCH is refused by keyd as a whole.
    let many: Vec<_> = (0..panseal::MAX_ADMIT_BATCH + 1)
        .map(|_| item(good.to_text(), &ctx(1)))
        .collect();
    let r = admitter
        .raw_call(
            proto::ADMIT,
            &serde_json::json!({"record": b64(&record.to_bytes()), "items": many}),
        )
        .await
        .unwrap();
    assert!(r.is_err());
    // Garbage posted: a typed refusal, nothing admitted.
    let r = admitter
        .raw_call(
            proto::ADMIT,
            &serde_json::json!({"record": "!!", "items": 3}),
        )
        .await
        .unwrap();
    assert!(matches!(r, Err(KeyServiceError::Other(_))), "{r:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reveal_principal_with_quota_4_opens_exactly_4_distinct_ingest_ciphertexts() {
    let k = Keyd::ready().await;
    let sc = "ing-open";
    let sealer = sealer_for(&k, sc).await;
    let rows = seal_rows(&sealer, 0, 10);
    let opener = k.client("opener");
    let who = Access::new("clerk-9", "refund 77").unwrap();
    let mut opened = 0;
    let mut refused = 0;
    for (s, c, d) in &rows {
        match opener
            .open_ingest(
                &IngestOpenRequest {
                    scope: &scope(sc),
                    sealed: s,
                    context: c,
                },
                &who,
            )
            .await
        {
            Ok(o) => {
                assert_eq!(o.pan.expose_digits(), d);
                assert!(o.needs_reseal);
                opened += 1;
            }
            Err(KeyServiceError::QuotaExceeded(_)) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!((opened, refused), (4, 6));
    // Opening the same record again costs no new record slot.
    let again = opener
        .open_ingest(
            &IngestOpenRequest {
                scope: &scope(sc),
                sealed: &rows[0].0,
                context: &rows[0].1,
            },
            &who,
        )
        .await;
    assert!(again.is_ok());
    // Audited like a reveal: purpose and on-behalf-of, never the PAN.
    let lines: Vec<String> = k
        .audit_lines()
        .into_iter()
        .filter(|l| l.contains("\"operation\":\"ingest-open\""))
        .collect();
    assert_eq!(lines.len(), 11);
    assert!(lines
        .iter()
        .all(|l| l.contains("\"on_behalf_of\":\"clerk-9\"") && l.contains("refund 77")));
    let log = std::fs::read_to_string(k.path("data/audit.log")).unwrap();
    assert_eq!(
        leaks(&log, &rows.iter().map(|r| r.2.clone()).collect::<Vec<_>>()),
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn open_refuses_other_scopes_altered_bytes_other_contexts_and_destroyed_keys() {
    let k = Keyd::ready().await;
    let sc = "ing-open-bad";
    let s1 = sealer_for(&k, sc).await;
    let other = sealer_for(&k, "ing-open-other").await;
    let pan = Pan::parse(&pan_number(1)).unwrap();
    let reader = k.client("reader"); // unwrap also opens (audited)
    let open = |s: IngestSealed, c: Context, on: &'static str| {
        let reader = &reader;
        async move {
            reader
                .open_ingest(
                    &IngestOpenRequest {
                        scope: &scope(on),
                        sealed: &s,
                        context: &c,
                    },
                    &access(),
                )
                .await
        }
    };
    let a = s1.seal(&pan, &ctx(1)).unwrap();
    // Retire v1 by creating v2: still opens.
    let s2 = sealer_for(&k, sc).await;
    assert_eq!(
        open(a, ctx(1), sc).await.unwrap().pan.expose_digits(),
        pan.expose_digits()
    );
    // Another scope's ciphertext named under this scope, another context,
    // an altered byte: one opaque error.
    let b = other.seal(&pan, &ctx(1)).unwrap();
    assert!(matches!(
        open(b, ctx(1), sc).await,
        Err(KeyServiceError::OpenFailed) | Err(KeyServiceError::UnknownIngestKey { .. })
    ));
    assert!(matches!(
        open(a, ctx(2), sc).await,
        Err(KeyServiceError::OpenFailed)
    ));
    let mut bytes = s2.seal(&pan, &ctx(1)).unwrap().as_bytes().to_vec();
    bytes[90] ^= 0x40;
    assert!(matches!(
        open(IngestSealed::from_bytes(&bytes).unwrap(), ctx(1), sc).await,
        Err(KeyServiceError::OpenFailed)
    ));
    // Destroyed: UnknownIngestKey, with the version.
    k.client("root")
        .set_ingest_key_state(&scope(sc), 1, KeyState::Destroyed)
        .await
        .unwrap();
    assert!(matches!(
        open(a, ctx(1), sc).await,
        Err(KeyServiceError::UnknownIngestKey { version: 1, .. })
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn attackers_frontend_and_admitter_credentials_recover_0_pans() {
    let k = Keyd::ready().await;
    let sc = "ing-attack";
    let sealer = sealer_for(&k, sc).await;
    let rows = seal_rows(&sealer, 100, 20);
    let pans: Vec<String> = rows.iter().map(|r| r.2.clone()).collect();
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    // A DEK record to aim at (the admitter's own).
    let admitter = k.client("admitter");
    let record = dek_record(&admitter, sc).await;
    let mut recovered = 0usize;
    let mut opened = 0usize;
    let mut admitted = 0usize;
    for who in ["ingest-frontend", "admitter"] {
        let c = k.client(who);
        for (s, cx, _) in &rows {
            let ctxj = serde_json::json!({"table": cx.table(), "column": cx.column(),
                "row_key": b64(cx.row_key())});
            // Every path that answers a PAN or a key, raw (bypassing the
            // client's own checks), every byte scanned.
            let attempts = [
                (
                    proto::INGEST_OPEN,
                    serde_json::json!({"environment": "test", "scope": sc, "sealed": s.to_text(),
                        "context": ctxj, "on_behalf_of": "x", "purpose": "y"}),
                ),
                (
                    proto::REVEAL,
                    serde_json::json!({"record": b64(&record.to_bytes()), "sealed": b64(s.as_bytes()),
                        "context": ctxj, "on_behalf_of": "x", "purpose": "y"}),
                ),
                (
                    proto::UNWRAP,
                    serde_json::json!({"key": {"id": record.id.to_string(), "scope": sc,
                        "environment": "test", "purpose": "data"},
                        "wrapped": {"kek_id": record.wrapped.kek.id,
                            "kek_version": record.wrapped.kek.version,
                            "bytes": b64(&record.wrapped.bytes)},
                        "on_behalf_of": "x", "purpose": "y"}),
                ),
                (
                    proto::ADMIT,
                    serde_json::json!({"record": b64(&record.to_bytes()), "index_versions": [],
                        "items": [{"sealed": s.to_text(), "context": ctxj}]}),
                ),
            ];
            for (path, body) in attempts {
                let r = c.raw_call(path, &body).await.unwrap();
                let text = match &r {
                    Ok(b) => String::from_utf8_lossy(b).into_owned(),
                    Err(e) => e.to_string(),
                };
                recovered += leaks(&text, &pans);
                if r.is_ok() && path == proto::INGEST_OPEN {
                    opened += 1;
                }
                if r.is_ok() && path == proto::ADMIT && who == "ingest-frontend" {
                    admitted += 1;
                }
            }
        }
    }
    assert_eq!(recovered, 0, "PAN digits in an answer");
    assert_eq!(opened, 0, "records opened by front end or admitter");
    assert_eq!(admitted, 0, "items admitted by the front end");
    // The admitter's own admission answers no digits either: 20 admitted
    // items, 0 PANs in the answer bytes.
    let items: Vec<serde_json::Value> = rows
        .iter()
        .map(|(s, c, _)| {
            serde_json::json!({"sealed": s.to_text(), "context": {"table": c.table(),
                "column": c.column(), "row_key": b64(c.row_key())}})
        })
        .collect();
    let raw = admitter
        .raw_call(
            proto::ADMIT,
            &serde_json::json!({"record": b64(&record.to_bytes()), "items": items}),
        )
        .await
        .unwrap()
        .unwrap();
    let a: proto::AdmitResponse = serde_json::from_slice(&raw).unwrap();
    assert_eq!(
        a.results
            .iter()
            .filter(|r| matches!(r, WireAdmitResult::Ok { .. }))
            .count(),
        20
    );
    assert_eq!(leaks(&String::from_utf8_lossy(&raw), &pans), 0);
    // generate-wrapped answers only the wrap: no `dek` field.
    let raw = admitter
        .raw_call(
            proto::GENERATE_WRAPPED,
            &serde_json::json!({"key": {"id": KeyId::random().to_string(), "scope": sc,
                "environment": "test", "purpose": "data"}}),
        )
        .await
        .unwrap()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    assert!(v.get("dek").is_none() && v.get("wrapped").is_some(), "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn admit_refuses_edited_records_and_charges_its_quota_before_work() {
    let k = Keyd::ready().await;
    let sc = "ing-rec";
    let sealer = sealer_for(&k, sc).await;
    let rows = seal_rows(&sealer, 0, 12);
    let its = items(&rows);
    let admitter = k.client("admitter");
    let record = dek_record(&admitter, sc).await;
    let admit = |r: WrappedDek, n: usize, who: &'static str| {
        let k = &k;
        let its = &its;
        async move {
            k.client(who)
                .admit(
                    &AdmitRequest {
                        record: &r,
                        index_versions: &[],
                        items: &its[..n],
                    },
                    &access(),
                )
                .await
        }
    };
    // Edited lifecycle fields (the tag no longer verifies): refused whole.
    let mut refused = 0;
    for edit in 0..4 {
        let mut r = record.clone();
        match edit {
            0 => r.state = KeyState::DecryptOnly,
            1 => r.encrypt_until += 3_600,
            2 => r.decrypt_until += 86_400 * 365,
            _ => r.uses = 5,
        }
        match admit(r, 2, "admitter").await {
            Err(KeyServiceError::RecordTampered(_)) => refused += 1,
            other => panic!("edit {edit}: {other:?}"),
        }
    }
    assert_eq!(refused, 4);
    // Another scope's principal cannot aim at this scope; an index key
    // version that is not live refuses the whole request.
    assert!(matches!(
        k.client("admitter")
            .admit(
                &AdmitRequest {
                    record: &record,
                    index_versions: &[7],
                    items: &its[..1],
                },
                &access(),
            )
            .await,
        Err(KeyServiceError::UnknownIndexKey { version: 7, .. })
    ));
    // The genuine record admits.
    assert_eq!(admit(record.clone(), 2, "admitter").await.unwrap().len(), 2);
    // A principal with admit_quota 10 admits exactly 10 items an hour.
    let lim = k.client("admit-limited");
    let rec2 = dek_record(&lim, sc).await;
    let mut ok = 0;
    for _ in 0..6 {
        match admit(rec2.clone(), 2, "admit-limited").await {
            Ok(v) => ok += v.len(),
            Err(KeyServiceError::QuotaExceeded(_)) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(ok, 10);
}

/// What the test's master key is (rebuilt from two custodians' shares,
/// as only keyd does).
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

fn disk_state(k: &Keyd) -> (st::State, u8) {
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

#[tokio::test(flavor = "multi_thread")]
async fn a_version_3_data_directory_opens_and_migrates_to_version_4_once() {
    let mut k = Keyd::ready().await;
    let app = k.client("app");
    let req = panseal::KeyRequest {
        id: KeyId::random(),
        scope: scope("mig-4"),
        environment: Environment::new("test").unwrap(),
        purpose: KeyPurpose::Data,
    };
    let (dek, w) = app.generate(&req).await.unwrap();
    k.client("root")
        .create_index_key(&scope("mig-4"))
        .await
        .unwrap();
    k.kill();
    // Rewrite the state as version 3 (what a keyd before issue 11 wrote).
    let keys = StateKeys::derive(&master(&k));
    let (mut s, v) = disk_state(&k);
    assert_eq!(v, st::V4);
    assert!(s.ingest_keys.is_empty());
    s.generation += 1;
    let (bytes, mac) = st::encode_snapshot_as(st::V3, &s, &keys);
    std::fs::write(k.path("data/state.bin"), &bytes).unwrap();
    std::fs::write(k.path("data/state.journal"), b"").unwrap();
    std::fs::write(
        k.path("data/state.anchor"),
        st::Anchor::new(&keys, s.generation, &mac).encode(),
    )
    .unwrap();
    assert_eq!(st::decode_snapshot(&bytes, 0).unwrap().version, st::V3);
    k.start();
    k.unseal().await;
    let (_, v) = disk_state(&k);
    assert_eq!(v, st::V4);
    let count = |k: &Keyd| {
        k.audit_lines()
            .iter()
            .filter(|l| l.contains("state version 3 rewritten as version 4"))
            .count()
    };
    assert_eq!(count(&k), 1);
    // Old wraps and index keys still work; ingest keys can be made.
    let got = k.client("app").unwrap(&req, &w, &access()).await.unwrap();
    assert_eq!(
        panseal::hazmat::dek_bytes(&got),
        panseal::hazmat::dek_bytes(&dek)
    );
    assert_eq!(
        k.client("indexer")
            .index_keys(&scope("mig-4"))
            .await
            .unwrap()
            .len(),
        1
    );
    let sealer = sealer_for(&k, "mig-4").await;
    k.kill();
    k.start();
    k.unseal().await;
    assert_eq!(count(&k), 1, "migrated once");
    // The ingest key survived the restart (sealed in version 4).
    let s = sealer
        .seal(&Pan::parse(&pan_number(1)).unwrap(), &ctx(1))
        .unwrap();
    let o = k
        .client("reader")
        .open_ingest(
            &IngestOpenRequest {
                scope: &scope("mig-4"),
                sealed: &s,
                context: &ctx(1),
            },
            &access(),
        )
        .await
        .unwrap();
    assert_eq!(o.pan.expose_digits(), pan_number(1));
    // A journal change of version 4 after a version 3 snapshot is refused
    // at start (a v4 change spliced onto a restored v3 file).
    k.kill();
    let (s, _) = disk_state(&k);
    let (v3bytes, v3mac) = st::encode_snapshot_as(
        st::V3,
        &st::State {
            ingest_keys: Default::default(),
            ..s.clone()
        },
        &keys,
    );
    let h = st::JournalHeader {
        generation: s.generation + 1,
        prev: hex::encode(v3mac),
        audit: s.audit.clone(),
        changes: vec![st::Change::IngestScope {
            key: "test/mig-4".into(),
            value: s.ingest_keys["test/mig-4"].clone(),
        }],
    };
    let (line, jmac) = st::encode_journal_entry(&h, &keys);
    k.save(&["data/state.bin", "data/state.journal", "data/state.anchor"]);
    std::fs::write(k.path("data/state.bin"), &v3bytes).unwrap();
    std::fs::write(k.path("data/state.journal"), &line).unwrap();
    std::fs::write(
        k.path("data/state.anchor"),
        st::Anchor::new(&keys, s.generation + 1, &jmac).encode(),
    )
    .unwrap();
    let err = k.start_fails();
    assert!(err.contains("version 4 change"), "{err}");
    k.restore(&["data/state.bin", "data/state.journal", "data/state.anchor"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restored_state_without_a_destroyed_ingest_key_is_a_rollback() {
    // The existing anchor covers ingest keys: destroying a key moves the
    // generation; putting back the older state.bin (which still holds
    // the sealed scalar) is refused at start.
    let mut k = Keyd::ready().await;
    let sc = scope("ing-roll");
    k.client("root").create_ingest_key(&sc).await.unwrap();
    k.client("root").create_ingest_key(&sc).await.unwrap();
    k.kill();
    k.save(&["data/state.bin", "data/state.journal"]);
    k.start();
    k.unseal().await;
    k.client("root")
        .set_ingest_key_state(&sc, 1, KeyState::Destroyed)
        .await
        .unwrap();
    k.kill();
    // The destroyed scalar is gone from every file keyd keeps.
    let (s, _) = disk_state(&k);
    assert!(s.ingest_keys["test/ing-roll"].versions[0].sealed.is_none());
    k.restore(&["data/state.bin", "data/state.journal"]);
    let err = k.start_fails();
    assert!(err.contains("rolled back"), "{err}");
}

#[test]
fn keyd_state_v4_vectors_from_an_independent_implementation() {
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/vectors/keyd_state_v4.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let hx = |x: &serde_json::Value| hex::decode(x.as_str().unwrap()).unwrap();
    let master: [u8; 32] = hx(&v["master_key"]).try_into().unwrap();
    let keys = StateKeys::derive(&master);
    assert_eq!(
        hex::encode(&keys.ingest_seal[..]),
        v["subkeys"]["ingest_seal"].as_str().unwrap()
    );
    let snap = st::decode_snapshot(&hx(&v["state_bin"]), 0).unwrap();
    assert_eq!(snap.version, st::V4);
    snap.verify(&keys).unwrap();
    assert_eq!(hex::encode(snap.mac), v["snapshot_mac"].as_str().unwrap());
    // Each sealed scalar opens under its AAD and rebuilds the public key
    // the Python side computed (`cryptography`'s P-256).
    let rec = &snap.state.ingest_keys["test/m-1"];
    assert_eq!(rec.versions.len(), 2);
    let env = Environment::new("test").unwrap();
    let sc = scope("m-1");
    let mut rebuilt = 0;
    for k in &rec.versions {
        let p = &v["ingest_keys"]["pairs"][k.version.to_string()];
        let aad = st::ingest_key_aad("test", "m-1", k.version);
        assert_eq!(hex::encode(&aad), p["aad_hex"].as_str().unwrap());
        let scalar = st::open_secret(&keys.ingest_seal, &aad, k.sealed.as_ref().unwrap()).unwrap();
        assert_eq!(hex::encode(&scalar[..]), p["scalar"].as_str().unwrap());
        let pair =
            panseal::keyd::server::IngestPrivateKey::from_scalar(&env, &sc, k.version, &scalar)
                .unwrap();
        assert_eq!(
            hex::encode(pair.public_key().as_bytes()),
            p["point"].as_str().unwrap()
        );
        assert_eq!(pair.public_key().to_text(), k.public_key);
        assert_eq!(k.public_key, p["public_key"].as_str().unwrap());
        // The scalar sealed here opens the ciphertexts its public key seals.
        let pan = Pan::parse("4111111111111111").unwrap();
        let c = Context::new("cards", "pan", "row-1").unwrap();
        let sealed = IngestSealer::new(pair.public_key().clone())
            .seal(&pan, &c)
            .unwrap();
        assert_eq!(
            pair.open(&sealed, &c).unwrap().expose_digits(),
            pan.expose_digits()
        );
        rebuilt += 1;
    }
    assert_eq!(rebuilt, 2);
    assert_eq!(rec.versions[0].state, KeyState::DecryptOnly);
    // Journal: an ingest-scope change destroying version 1.
    let (entries, _) = st::parse_journal(v["state_journal"].as_str().unwrap().as_bytes()).unwrap();
    entries[0].verify(&keys).unwrap();
    assert!(entries[0].header.changes[0].is_v4());
    let mut s = snap.state.clone();
    for c in entries[0].header.changes.clone() {
        s.apply(c);
    }
    assert_eq!(
        s.ingest_keys["test/m-1"].versions[0].state,
        KeyState::Destroyed
    );
    assert!(s.ingest_keys["test/m-1"].versions[0].sealed.is_none());
    // Moved or re-labelled sealed scalars do not open: 4 of 4 refused.
    let v2 = rec.versions[1].sealed.clone().unwrap();
    let mut refused = 0;
    for (key, aad, sealed) in [
        (
            &keys.ingest_seal,
            st::ingest_key_aad("test", "m-1", 2),
            v["sealed_v2_for_m_2"].as_str().unwrap().to_owned(),
        ),
        (
            &keys.ingest_seal,
            st::ingest_key_aad("test", "m-1", 1),
            v2.clone(),
        ),
        (
            &keys.ingest_seal,
            st::ingest_key_aad("prod", "m-1", 2),
            v2.clone(),
        ),
        (
            &keys.ingest_seal,
            st::ingest_key_aad("test", "m-1", 2),
            v["sealed_v2_under_index_subkey"]
                .as_str()
                .unwrap()
                .to_owned(),
        ),
    ] {
        if st::open_secret(key, &aad, &sealed).is_err() {
            refused += 1;
        }
    }
    assert_eq!(refused, 4);
    // The version 3 file of the same generator reads, and written again
    // (the migration) it is version 4 with no ingest keys.
    let old = st::decode_snapshot(&hx(&v["v3_state_bin"]), 0).unwrap();
    assert_eq!(old.version, st::V3);
    old.verify(&keys).unwrap();
    let (bytes, _) = st::encode_snapshot(&old.state, &keys);
    let migrated = st::decode_snapshot(&bytes, 0).unwrap();
    assert_eq!(migrated.version, st::V4);
    migrated.verify(&keys).unwrap();
    assert_eq!(migrated.state, old.state);
    // Negative snapshots.
    let mut negatives = 0;
    for n in v["negative"].as_array().unwrap() {
        let outcome = match st::decode_snapshot(&hx(&n["state_bin"]), 0) {
            Err(st::FormatError::Corrupt(_)) => "corrupt",
            Err(st::FormatError::Unauthentic(_)) => "unauthentic",
            Ok(s) => match s.verify(&keys) {
                Ok(()) => "ok",
                Err(_) => "unauthentic",
            },
        };
        assert_eq!(outcome, n["expect"].as_str().unwrap(), "{}", n["name"]);
        negatives += 1;
    }
    assert_eq!(negatives, 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_client_splits_a_batch_over_max_admit_batch_into_requests_keyd_accepts() {
    let k = Keyd::ready_with("audit_fsync = \"periodic\"\n").await;
    let sc = "ing-split";
    let sealer = sealer_for(&k, sc).await;
    let n = panseal::MAX_ADMIT_BATCH as u32 + 6;
    let rows = seal_rows(&sealer, 0, n);
    let admitter = k.client_with("admitter", |b| {
        b.request_timeout(std::time::Duration::from_secs(300))
    });
    let record = dek_record(&admitter, sc).await;
    let before = admitter.requests_made();
    let its = items(&rows);
    let out = admitter
        .admit(
            &AdmitRequest {
                record: &record,
                index_versions: &[],
                items: &its,
            },
            &access(),
        )
        .await
        .unwrap();
    assert_eq!(out.iter().filter(|r| r.is_ok()).count(), n as usize);
    assert_eq!(admitter.requests_made() - before, 2);
    let lines: Vec<String> = k
        .audit_lines()
        .into_iter()
        .filter(|l| l.contains("\"operation\":\"admit\""))
        .collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[0].contains("\"count\":1024,"), "{}", lines[0]);
    assert!(lines[1].contains("\"count\":6,"), "{}", lines[1]);
}

/// The admission credential holds `wrap` too (it makes its admission
/// DEKs), and `wrap` may also `/v1/generate` a DEK in the clear or
/// `/v1/wrap` one it chose. An attacker with that credential signs a record
/// for such a known DEK and asks `/v1/admit` to seal every ingest row from
/// the dump under it: keyd must refuse, or the compact answers open with
/// the attacker's DEK. Counted: PANs the attacker reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admitter_cannot_admit_under_a_dek_it_knows() {
    let mut k = Keyd::ready().await;
    let sc = "ing-known-dek";
    let sealer = sealer_for(&k, sc).await;
    let rows = seal_rows(&sealer, 300, 20);
    let admitter = k.client("admitter");
    let checkout = k.client("checkout");
    let a = access();
    let mut recovered = 0usize;
    let mut refused = 0usize;
    // Three ways to hold a DEK keyd will accept a record for: the
    // admitter's own /v1/generate, its own /v1/wrap of a chosen key, and a
    // writer's (`checkout`) /v1/generate.
    for way in ["generate", "wrap", "writer"] {
        let mut r = dek_record(&admitter, sc).await;
        r.id = KeyId::random();
        r.tag = None;
        let dek = match way {
            "generate" => {
                let (dek, w) = admitter.generate(&r.key_request()).await.unwrap();
                r.wrapped = w;
                dek
            }
            "wrap" => {
                let dek = panseal::Dek::from_bytes_insecure([0x42; 32]);
                r.wrapped = admitter.wrap(&r.key_request(), &dek).await.unwrap();
                dek
            }
            _ => {
                let (dek, w) = checkout.generate(&r.key_request()).await.unwrap();
                r.wrapped = w;
                dek
            }
        };
        let signer: &RemoteKeyService = if way == "writer" {
            &checkout
        } else {
            &admitter
        };
        r.tag = Some(signer.authenticate_record(None, &r).await.unwrap());
        let out = admitter
            .admit(
                &AdmitRequest {
                    record: &r,
                    index_versions: &[],
                    items: &items(&rows),
                },
                &a,
            )
            .await;
        match out {
            Err(KeyServiceError::PermissionDenied(m)) => {
                assert!(m.contains("not an admission DEK"), "{m}");
                refused += 1;
            }
            Err(e) => panic!("{way}: unexpected {e:?}"),
            Ok(results) => {
                for (res, (_, cx, pan)) in results.iter().zip(&rows) {
                    if let Ok(o) = res {
                        if panseal::hazmat::open_with_dek(&dek, &o.sealed, cx)
                            .is_ok_and(|p| p.expose_digits() == pan)
                        {
                            recovered += 1;
                        }
                    }
                }
            }
        }
    }
    assert_eq!(
        (recovered, refused),
        (0, 3),
        "0 PANs read back; 3 of 3 known-DEK records refused"
    );
    // The admission DEK itself still admits.
    let record = dek_record(&admitter, sc).await;
    let results = admitter
        .admit(
            &AdmitRequest {
                record: &record,
                index_versions: &[],
                items: &items(&rows),
            },
            &a,
        )
        .await
        .unwrap();
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), rows.len());
    k.kill();
}
