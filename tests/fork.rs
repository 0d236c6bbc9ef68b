//! `fork()` after a seal, as a pre-fork server does (gunicorn, uWSGI,
//! PHP-FPM, Python `multiprocessing`): the parent seals once, forks, and
//! then parent and children seal thousands of PANs each. The attacker's
//! count is the number of repeated nonces (two are enough to recover the
//! GHASH key of a DEK); it must be 0, and no child may seal under the
//! parent's DEK (its use budget would be counted twice).
//!
//! A second scenario (with `hazmat-test-keys`, which `scripts/test.sh`
//! enables) plays a pre-fork worker that only seals: the parent has
//! unwrapped and cached several DEKs (with a short TTL) when it forks; the
//! child seals for longer than TTL + sweep interval and then counts the
//! unwrapped keys it still holds: stale cache entries and keys inherited
//! from the parent must both be 0.
//!
//! Runs as its own binary (`harness = false` in `Cargo.toml`): forking
//! inside libtest's thread pool would copy a process in the middle of other
//! tests.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult};
use panseal::{blocking, Context, Environment, LocalKeyService, MemoryAuditSink, MemoryKeyStore};
use panseal::{KeyId, Pan, Panseal, SealedPan};

const CHILDREN: usize = 4;
const SEALS: usize = 2_000;

fn seal_many(ps: &blocking::Panseal, n: usize) -> Vec<SealedPan> {
    let pan = Pan::parse("4111111111111111").expect("test PAN");
    (0..n)
        .map(|i| {
            let ctx = Context::new("cards", "pan", i.to_string()).expect("context");
            ps.seal_pan(&pan, &ctx).expect("seal")
        })
        .collect()
}

fn write_all(path: &Path, sealed: &[SealedPan]) {
    let mut bytes = Vec::with_capacity(sealed.len() * panseal::V1_LEN);
    for s in sealed {
        bytes.extend_from_slice(s.as_bytes());
    }
    std::fs::write(path, bytes).expect("write ciphertexts");
}

fn read_all(path: &Path) -> Vec<SealedPan> {
    let bytes = std::fs::read(path).expect("read ciphertexts");
    bytes
        .chunks(panseal::V1_LEN)
        .map(|c| SealedPan::from_bytes(c).expect("well-formed"))
        .collect()
}

/// The child's work; `on_new_thread` seals from a thread started after the
/// fork (its thread-local state is fresh, the process's is the parent's).
fn child(ps: &blocking::Panseal, out: &Path, on_new_thread: bool) {
    let sealed = if on_new_thread {
        let ps = ps.clone();
        std::thread::spawn(move || seal_many(&ps, SEALS))
            .join()
            .expect("sealing thread")
    } else {
        seal_many(ps, SEALS)
    };
    write_all(out, &sealed);
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ps = blocking::Panseal::build(
        Panseal::builder()
            .key_service(LocalKeyService::new(Environment::new("test").expect("env")))
            .key_store(MemoryKeyStore::new())
            .audit(MemoryAuditSink::new())
            .environment("test")
            .scope("merchant-1"),
    )
    .expect("build");
    // The parent seals once before forking: its DEK is active and its nonce
    // generator has buffered output.
    let mut parent = seal_many(&ps, 1);
    let parent_dek = parent[0].key_id();

    let mut pids = Vec::new();
    for i in 0..=CHILDREN {
        let out = dir.path().join(format!("child-{i}.bin"));
        // SAFETY: this binary runs no other thread at this point (no libtest
        // harness; the blocking runtime's worker is idle and not needed by the
        // child, which uses only the in-memory store and local key service).
        // The child runs Rust code that allocates (glibc's malloc is
        // fork-safe) and leaves with `exit`, running no destructor of the
        // parent's state.
        match unsafe { fork() }.expect("fork") {
            ForkResult::Child => {
                // A hung child must not hang the test.
                nix::unistd::alarm::set(120);
                let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    child(&ps, &out, i == CHILDREN)
                }))
                .is_ok();
                std::process::exit(if ok { 0 } else { 1 });
            }
            ForkResult::Parent { child } => pids.push((child, out)),
        }
    }
    parent.extend(seal_many(&ps, SEALS));

    let mut by_process: Vec<(String, Vec<SealedPan>)> = vec![("parent".into(), parent)];
    for (pid, out) in pids {
        match waitpid(pid, None).expect("waitpid") {
            WaitStatus::Exited(_, 0) => {}
            other => panic!("child {pid} failed: {other:?}"),
        }
        by_process.push((out.display().to_string(), read_all(&out)));
    }

    // Nonces repeated under one DEK, and in all (the DEK differs per
    // process after the fix, but a repeat anywhere is suspicious).
    let mut seen: HashMap<(KeyId, [u8; 12]), usize> = HashMap::new();
    let mut nonces: HashSet<[u8; 12]> = HashSet::new();
    let mut any_repeat = 0usize;
    let mut total = 0usize;
    for (_, sealed) in &by_process {
        for s in sealed {
            let nonce: [u8; 12] = s.as_bytes()[10..22].try_into().expect("12 bytes");
            *seen.entry((s.key_id(), nonce)).or_default() += 1;
            any_repeat += usize::from(!nonces.insert(nonce));
            total += 1;
        }
    }
    let same_key_repeats: usize = seen.values().map(|n| n - 1).sum();

    // DEKs per process: each child's must be its own.
    let keys: Vec<(String, HashSet<KeyId>)> = by_process
        .iter()
        .map(|(who, s)| (who.clone(), s.iter().map(SealedPan::key_id).collect()))
        .collect();
    let mut shared_keys = 0usize;
    for (i, (_, a)) in keys.iter().enumerate() {
        for (_, b) in keys.iter().skip(i + 1) {
            shared_keys += a.intersection(b).count();
        }
    }
    let children_under_parent_dek = by_process[1..]
        .iter()
        .flat_map(|(_, s)| s)
        .filter(|s| s.key_id() == parent_dek)
        .count();

    println!(
        "fork: {total} seals in 1 parent + {} children: {same_key_repeats} nonce repeats under one \
         DEK, {any_repeat} repeated nonces overall, {children_under_parent_dek} child seals under \
         the parent's DEK, {shared_keys} DEKs shared between processes",
        CHILDREN + 1
    );
    assert_eq!(total, (CHILDREN + 2) * SEALS + 1);
    assert_eq!(same_key_repeats, 0, "nonce reuse under one DEK after fork");
    assert_eq!(any_repeat, 0, "repeated nonces after fork");
    assert_eq!(
        children_under_parent_dek, 0,
        "a child sealed under the parent's DEK"
    );
    assert_eq!(shared_keys, 0, "processes share a DEK");

    #[cfg(feature = "hazmat-test-keys")]
    {
        sealing_child_drops_inherited_and_expired_keys(dir.path());
        println!("test result: ok. 2 passed; 0 failed");
    }
    #[cfg(not(feature = "hazmat-test-keys"))]
    println!("test result: ok. 1 passed; 0 failed");
}

/// The parent caches DEKs in several scopes plus index keys (TTL 400 ms),
/// forks; the child only seals, for TTL + sweep interval + margin, then
/// writes the ids of the keys it holds and its count of stale cache entries.
#[cfg(feature = "hazmat-test-keys")]
fn sealing_child_drops_inherited_and_expired_keys(dir: &Path) {
    use std::time::{Duration, Instant};
    const TTL: Duration = Duration::from_millis(400);
    // `sweep_interval(TTL)` is TTL / 4.
    const SWEEP: Duration = Duration::from_millis(100);

    let ps = blocking::Panseal::build(
        Panseal::builder()
            .key_service(LocalKeyService::new(Environment::new("test").expect("env")))
            .key_store(MemoryKeyStore::new())
            .audit(MemoryAuditSink::new())
            .policy(panseal::Policy::default().cache_ttl(TTL))
            .environment("test")
            .scope("merchant-1"),
    )
    .expect("build");
    let pan = Pan::parse("4111111111111111").expect("test PAN");
    for scope in ["merchant-1", "merchant-2", "merchant-3", "merchant-4"] {
        let h = ps.with_scope(scope).expect("scope");
        let ctx = Context::new("cards", "pan", "0").expect("context");
        h.seal_pan(&pan, &ctx).expect("seal");
        h.blind_index(&pan).expect("index");
    }
    let (inherited, _) = ps.as_async().held_keys_for_test();
    // Four active DEKs; index keys stay in the key service (issue 10).
    assert!(inherited.len() >= 4, "parent holds {}", inherited.len());

    // One child seals in a scope where the parent had an active DEK (its
    // first seal notices the fork), one in a scope new to it (only the
    // overdue sweep on its seal path notices).
    for (i, scope) in ["merchant-1", "merchant-new"].into_iter().enumerate() {
        let out = dir.join(format!("sealer-{i}.txt"));
        // SAFETY: as in `main` (the sweeper thread only sleeps or sweeps).
        match unsafe { fork() }.expect("fork") {
            ForkResult::Child => {
                nix::unistd::alarm::set(60);
                let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let h = ps.with_scope(scope).expect("scope");
                    let start = Instant::now();
                    let mut n = 0u64;
                    while start.elapsed() < TTL + SWEEP + Duration::from_millis(300) {
                        let ctx = Context::new("cards", "pan", n.to_string()).expect("context");
                        h.seal_pan(&pan, &ctx).expect("seal");
                        n += 1;
                    }
                    let (held, stale) = ps.as_async().held_keys_for_test();
                    let ids: Vec<String> = held.iter().map(|id| hex(id.as_bytes())).collect();
                    std::fs::write(&out, format!("{stale} {n}\n{}", ids.join("\n")))
                        .expect("report");
                }))
                .is_ok();
                std::process::exit(if ok { 0 } else { 1 });
            }
            ForkResult::Parent { child } => match waitpid(child, None).expect("waitpid") {
                WaitStatus::Exited(_, 0) => {}
                other => panic!("sealing child failed: {other:?}"),
            },
        }
        let report = std::fs::read_to_string(&out).expect("child report");
        let mut lines = report.lines();
        let mut first = lines.next().expect("counts").split(' ');
        let stale: usize = first.next().and_then(|s| s.parse().ok()).expect("stale");
        let seals: u64 = first.next().and_then(|s| s.parse().ok()).expect("seals");
        let held: HashSet<String> = lines.map(str::to_owned).collect();
        let still_inherited = inherited
            .iter()
            .filter(|id| held.contains(&hex(id.as_bytes())))
            .count();
        println!(
            "fork (worker sealing in {scope}): parent held {} unwrapped keys at fork; child \
             sealed {seals} times over TTL + sweep + 300 ms; child holds {} keys: {stale} stale \
             cache entries, {still_inherited} inherited from the parent",
            inherited.len(),
            held.len()
        );
        assert_eq!(stale, 0, "stale cache entries in a sealing child");
        assert_eq!(still_inherited, 0, "parent's keys kept by a sealing child");
    }
}

#[cfg(feature = "hazmat-test-keys")]
fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
