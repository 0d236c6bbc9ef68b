//! `fork()` through the C ABI: builds `tests/c/fork.c` with gcc (warnings
//! as errors, AddressSanitizer + UndefinedBehaviorSanitizer) against the
//! `cdylib` of this test run, runs it, and counts what an attacker holding
//! the ciphertexts looks for: nonces repeated under one DEK (two give away
//! the GHASH key, and the XOR of the plaintexts) and DEKs shared between
//! processes.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Command;

use panseal::{KeyId, SealedPan};

fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().to_path_buf();
    assert!(
        dir.join("libpanseal_ffi.so").exists(),
        "libpanseal_ffi.so not found beside {}",
        exe.display()
    );
    dir
}

fn read(path: PathBuf) -> Vec<SealedPan> {
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| SealedPan::from_text(l).expect("well-formed"))
        .collect()
}

#[test]
fn forked_children_never_reuse_a_nonce_or_the_parents_dek() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let lib = lib_dir();
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("fork");
    let status = Command::new("gcc")
        .args([
            "-std=c11",
            "-D_POSIX_C_SOURCE=200809L",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-g",
            "-fsanitize=address,undefined",
            "-fno-sanitize-recover=all",
            "-fno-omit-frame-pointer",
        ])
        .arg(format!("-I{}", root.join("include").display()))
        .arg(root.join("tests/c/fork.c"))
        .arg(format!("-L{}", lib.display()))
        .arg("-lpanseal_ffi")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-lpthread")
        .arg("-o")
        .arg(&bin)
        .status()
        .expect("gcc must be installed (scripts/setup.sh)");
    assert!(status.success(), "fork.c did not compile cleanly");
    let out = Command::new(&bin)
        .env("LD_LIBRARY_PATH", &lib)
        .current_dir(dir.path())
        .env("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0")
        .env("UBSAN_OPTIONS", "halt_on_error=1:print_stacktrace=1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fork failed:\n{stdout}\n{stderr}");
    assert!(
        !stderr.contains("ERROR: AddressSanitizer") && !stderr.contains("runtime error"),
        "{stderr}"
    );

    let mut parent = read(dir.path().join("fork-before.txt"));
    let parent_dek = parent[0].key_id();
    parent.extend(read(dir.path().join("fork-parent.txt")));
    let mut processes = vec![parent];
    for i in 0..4 {
        processes.push(read(dir.path().join(format!("fork-child-{i}.txt"))));
    }

    let mut seen: HashMap<(KeyId, [u8; 12]), usize> = HashMap::new();
    let mut total = 0;
    for s in processes.iter().flatten() {
        let nonce: [u8; 12] = s.as_bytes()[10..22].try_into().unwrap();
        *seen.entry((s.key_id(), nonce)).or_default() += 1;
        total += 1;
    }
    let repeats: usize = seen.values().map(|n| n - 1).sum();
    let under_parent_dek = processes[1..]
        .iter()
        .flatten()
        .filter(|s| s.key_id() == parent_dek)
        .count();
    let keys: Vec<HashSet<KeyId>> = processes
        .iter()
        .map(|p| p.iter().map(SealedPan::key_id).collect())
        .collect();
    let mut shared = 0;
    for (i, a) in keys.iter().enumerate() {
        for b in &keys[i + 1..] {
            shared += a.intersection(b).count();
        }
    }
    println!(
        "C ABI fork: {total} seals; {repeats} nonce repeats under one DEK; {under_parent_dek} \
         child seals under the parent's DEK; {shared} DEKs shared between processes"
    );
    assert_eq!(total, 5 * 2000 + 1);
    assert_eq!(repeats, 0, "nonce reuse across fork");
    assert_eq!(under_parent_dek, 0, "a child sealed under the parent's DEK");
    assert_eq!(shared, 0, "processes share a DEK");
}
