//! Backup and recovery, drilled with real `panseal-keyd` processes (README
//! "Backup and recovery"): a restore onto a new machine, a lost share and
//! its re-issue, and a backup from another keyd refused. (Restoring an
//! *older* backup after a destroy is refused as a rollback:
//! `keyd.rs::restoring_an_older_state_after_a_destroy_is_refused_and_the_version_never_unwraps`.)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use panseal::keyd::ShareText;
use panseal::{Access, Context, FileKeyStore, MemoryAuditSink, Pan, Panseal, SealedPan};

use crate::keyd_harness::{Keyd, ACK};

/// The layout the README recommends: the anchors and the audit key apart
/// from the data directory (each backed up on its own).
const SEPARATE: &str = "anchor_dir = \"anchor\"\naudit_key_file = \"audit-key/audit.key\"\n";

fn access() -> Access {
    Access::new("restore-drill", "recovery").unwrap()
}

fn pan(i: u32) -> Pan {
    let body = format!("541333{i:09}");
    let sum: u32 = body
        .chars()
        .rev()
        .enumerate()
        .map(|(k, c)| {
            let d = c.to_digit(10).unwrap();
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

/// The application: keyd's `app` principal and a FileKeyStore.
async fn app(k: &Keyd, store: &Path) -> Panseal {
    Panseal::builder()
        .key_service(k.client("app"))
        .key_store(FileKeyStore::open(store).unwrap())
        .audit(MemoryAuditSink::new())
        .environment("test")
        .scope("merchant-7")
        .build()
        .await
        .unwrap()
}

async fn seal(k: &Keyd, store: &Path, n: u32) -> Vec<SealedPan> {
    let ps = app(k, store).await;
    let mut out = Vec::new();
    for i in 0..n {
        out.push(ps.seal_pan(&pan(i), &ctx(i)).await.unwrap());
    }
    out
}

/// How many of `sealed` open to their PAN.
async fn opened(k: &Keyd, store: &Path, sealed: &[SealedPan]) -> usize {
    let ps = app(k, store).await;
    let mut n = 0;
    for (i, s) in sealed.iter().enumerate() {
        if let Ok(o) = ps.open_pan(s, &ctx(i as u32), &access()).await {
            assert_eq!(o.pan, pan(i as u32));
            n += 1;
        }
    }
    n
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let t = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), t).unwrap();
        }
    }
}

/// Every file under `dir` and its bytes (to show nothing changed).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut m = BTreeMap::new();
    fn walk(d: &Path, m: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                walk(&e.path(), m);
            } else {
                m.insert(e.path(), std::fs::read(e.path()).unwrap());
            }
        }
    }
    walk(dir, &mut m);
    m
}

/// `verify-audit` must exit 0; the record count it reports.
fn audit_records(k: &Keyd) -> u64 {
    let (code, out) = k.verify_audit();
    assert_eq!(code, 0, "verify-audit: {out}");
    out.split(" verifies: ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("record count in {out:?}"))
}

fn share_file(path: &Path) -> ShareText {
    ShareText::new(std::fs::read_to_string(path).unwrap().trim().to_owned())
}

async fn unseal_with(k: &Keyd, shares: Vec<(&str, ShareText)>) {
    for (c, s) in shares {
        let cl = k.client(c);
        cl.acknowledge(ACK).await.unwrap();
        cl.unseal(s).await.unwrap();
    }
    assert!(!k.client("alice").status().await.unwrap().sealed);
}

/// The machine is lost: its data directory, anchor directory, audit key
/// and key store are restored from their backups onto a new machine
/// (another path); bob and carol (2 of 3, not the pair that unsealed
/// before) unseal it; 200 of 200 PANs open, and the audit chain goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_restored_onto_a_new_machine_unseals_with_k_of_n_and_opens_every_pan() {
    let mut k = Keyd::init_with(SEPARATE, "");
    k.start();
    k.unseal().await;
    let store = k.path("keys.pks");
    let sealed = seal(&k, &store, 200).await;
    assert_eq!(opened(&k, &store, &sealed).await, 200);
    k.stop();
    let before = audit_records(&k);

    // The backups, each kept apart (README "What to back up").
    let backup = tempfile::tempdir().unwrap();
    let b = |p: &str| backup.path().join(p);
    copy_dir(&k.path("data"), &b("data"));
    copy_dir(&k.path("anchor"), &b("anchor"));
    copy_dir(&k.path("audit-key"), &b("audit-key"));
    std::fs::copy(&store, b("keys.pks")).unwrap();
    std::fs::copy(k.path("keyd.toml"), b("keyd.toml")).unwrap();
    copy_dir(&k.path("certs"), &b("certs"));

    // The machine's copies destroyed: keyd cannot start there.
    for d in ["data", "anchor", "audit-key"] {
        std::fs::remove_dir_all(k.path(d)).unwrap();
    }
    std::fs::remove_file(&store).unwrap();
    let err = k.start_fails();
    assert!(
        err.contains("no state at") || err.contains("No such file"),
        "{err}"
    );

    // A new machine: another path, everything restored from the backups.
    let m2 = tempfile::tempdir().unwrap();
    for d in ["data", "anchor", "audit-key", "certs"] {
        copy_dir(&b(d), &m2.path().join(d));
    }
    for f in ["keys.pks", "keyd.toml"] {
        std::fs::copy(b(f), m2.path().join(f)).unwrap();
    }
    let mut r = Keyd::adopt(m2);
    r.start();
    assert!(r.client("alice").status().await.unwrap().sealed);
    unseal_with(
        &r,
        vec![("bob", k.share("bob")), ("carol", k.share("carol"))],
    )
    .await;
    let n = opened(&r, &r.path("keys.pks"), &sealed).await;
    println!(
        "restore drill: {n} of {} PANs opened after the restore",
        sealed.len()
    );
    assert_eq!(n, 200);
    // New PANs seal on the restored machine too.
    let more = seal(&r, &r.path("keys.pks"), 1).await;
    assert_eq!(opened(&r, &r.path("keys.pks"), &more).await, 1);
    r.stop();
    let after = audit_records(&r);
    println!("audit chain: {before} records before the restore, {after} after, verified");
    assert!(after > before, "{after} > {before}");
}

/// Carol's share is lost (an attacker kept a copy): alice and bob still
/// unseal and every PAN opens; alice and bob re-split the master key among
/// alice, bob and carol (threshold 2), carol collects a new share, and
/// alice + carol unseal. Carol's old share is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_share_changes_nothing_and_its_custodian_is_reissued_one() {
    let mut k = Keyd::init_with(SEPARATE, "");
    k.start();
    k.unseal().await;
    let store = k.path("keys.pks");
    let sealed = seal(&k, &store, 50).await;
    k.stop();

    // Carol loses her share; the attacker's copy of it.
    let stolen = k.share("carol");
    std::fs::remove_file(k.path("shares/carol.share")).unwrap();

    k.start();
    unseal_with(
        &k,
        vec![("alice", k.share("alice")), ("bob", k.share("bob"))],
    )
    .await;
    assert_eq!(opened(&k, &store, &sealed).await, 50);

    // Re-issue: alice and bob vote with their current shares.
    let args = [
        "--threshold",
        "2",
        "--custodian",
        "alice",
        "--custodian",
        "bob",
        "--custodian",
        "carol",
    ];
    let new_dir = k.path("new-shares");
    std::fs::create_dir_all(&new_dir).unwrap();
    for c in ["alice", "bob"] {
        let f = k.path(&format!("shares/{c}.share"));
        let mut a = vec!["--share-file", f.to_str().unwrap()];
        a.extend(args);
        let (ok, out, err) = k.custodian_cli(c, "reshare", &a);
        assert!(ok, "{c} reshare: {out}{err}");
    }
    for c in ["alice", "bob", "carol"] {
        let f = new_dir.join(format!("{c}.share"));
        let (ok, _, err) =
            k.custodian_cli(c, "collect-share", &["--share-file", f.to_str().unwrap()]);
        assert!(ok, "{c} collect-share: {err}");
    }
    k.stop();
    k.start();
    // The stolen old share is refused, as are alice's and bob's old ones.
    let mut old_accepted = 0;
    for (c, s) in [
        ("carol", stolen),
        ("alice", k.share("alice")),
        ("bob", k.share("bob")),
    ] {
        let cl = k.client(c);
        cl.acknowledge(ACK).await.unwrap();
        match cl.unseal(s).await {
            Ok(_) => old_accepted += 1,
            Err(e) => assert!(e.to_string().contains("share refused"), "{e}"),
        }
    }
    assert_eq!(old_accepted, 0, "old shares after the re-issue");
    unseal_with(
        &k,
        vec![
            ("alice", share_file(&new_dir.join("alice.share"))),
            ("carol", share_file(&new_dir.join("carol.share"))),
        ],
    )
    .await;
    assert_eq!(opened(&k, &store, &sealed).await, 50);
    k.stop();
    audit_records(&k);
}

/// Another keyd's backup restored into this keyd's place is refused with
/// "belongs to another keyd", and nothing on disk changes: its data
/// directory beside this keyd's anchors and audit key; its data directory
/// and audit key beside this keyd's anchors; and this keyd's shares
/// against the other keyd's state ("share refused", still sealed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_from_another_keyd_is_refused_and_changes_nothing() {
    let mut a = Keyd::init_with(SEPARATE, "");
    let mut other = Keyd::init_with(SEPARATE, "");
    // Both ran and changed state (generations above 0).
    for k in [&mut a, &mut other] {
        k.start();
        k.unseal().await;
        seal(k, &k.path("keys.pks"), 3).await;
        k.stop();
    }
    let a_data = tempfile::tempdir().unwrap();
    copy_dir(&a.path("data"), a_data.path());
    let a_key = tempfile::tempdir().unwrap();
    copy_dir(&a.path("audit-key"), a_key.path());

    // 1. The other keyd's data directory, this keyd's anchors and key.
    std::fs::remove_dir_all(a.path("data")).unwrap();
    copy_dir(&other.path("data"), &a.path("data"));
    let before = snapshot(a.dir.path());
    let err = a.start_fails();
    assert!(err.contains("belongs to another keyd"), "{err}");
    assert!(err.contains("audit key"), "{err}");
    assert_eq!(snapshot(a.dir.path()), before, "nothing changed on disk");

    // 2. The other keyd's data directory *and* audit key, this keyd's
    //    anchors.
    std::fs::remove_dir_all(a.path("audit-key")).unwrap();
    copy_dir(&other.path("audit-key"), &a.path("audit-key"));
    let before = snapshot(a.dir.path());
    let err = a.start_fails();
    assert!(err.contains("belongs to another keyd"), "{err}");
    assert!(err.contains("anchor"), "{err}");
    assert_eq!(snapshot(a.dir.path()), before, "nothing changed on disk");

    // This keyd's own backups put back: it starts and opens again.
    std::fs::remove_dir_all(a.path("data")).unwrap();
    std::fs::remove_dir_all(a.path("audit-key")).unwrap();
    copy_dir(a_data.path(), &a.path("data"));
    copy_dir(a_key.path(), &a.path("audit-key"));
    a.start();
    unseal_with(
        &a,
        vec![("alice", a.share("alice")), ("bob", a.share("bob"))],
    )
    .await;
    a.stop();

    // 3. This keyd's shares against the other keyd's state.
    other.start();
    let state = other.path("data");
    let before = snapshot(&state);
    let mut accepted = 0;
    for c in ["alice", "bob", "carol"] {
        let cl = other.client(c);
        cl.acknowledge(ACK).await.unwrap();
        match cl.unseal(a.share(c)).await {
            Ok(_) => accepted += 1,
            Err(e) => assert!(e.to_string().contains("share refused"), "{e}"),
        }
    }
    assert_eq!(accepted, 0);
    assert!(other.client("alice").status().await.unwrap().sealed);
    other.stop();
    let after = snapshot(&state);
    // Only the audit log (and its anchor) grew: the refusals are audited.
    let changed: Vec<_> = after
        .iter()
        .filter(|(p, b)| before.get(*p) != Some(*b))
        .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(
        changed
            .iter()
            .all(|f| f == "audit.log" || f == "quota.state"),
        "{changed:?}"
    );
}
