//! Builds the C programs under `tests/c/` with gcc (`-Wall -Wextra -Werror`,
//! AddressSanitizer + UndefinedBehaviorSanitizer) against the `cdylib` this
//! test run built, and runs them.
#![cfg(feature = "ffi")]

use std::path::PathBuf;
use std::process::Command;

/// The directory holding the `libpanseal.so` built for this test run.
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().to_path_buf();
    assert!(
        dir.join("libpanseal.so").exists(),
        "libpanseal.so not found beside {}",
        exe.display()
    );
    dir
}

#[test]
fn c_programs_pass_under_sanitizers() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let lib = lib_dir();
    let out_dir = tempfile::tempdir().unwrap();
    for (name, marker) in [
        ("test_panseal", "C ABI tests passed"),
        ("example", "store in VARCHAR(64): P1"),
    ] {
        let src = root.join("tests/c").join(format!("{name}.c"));
        let bin = out_dir.path().join(name);
        let status = Command::new("gcc")
            .args([
                "-std=c11",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-g",
                "-fsanitize=address,undefined",
                "-fno-sanitize-recover=all",
                "-fno-omit-frame-pointer",
            ])
            .arg(format!("-I{}", root.join("include").display()))
            .arg(&src)
            .arg(format!("-L{}", lib.display()))
            .arg("-lpanseal")
            .arg(format!("-Wl,-rpath,{}", lib.display()))
            .arg("-lpthread")
            .arg("-o")
            .arg(&bin)
            .status()
            .expect("gcc must be installed (scripts/setup.sh)");
        assert!(status.success(), "{name}.c did not compile cleanly");
        // cargo sets LD_LIBRARY_PATH for tests (target/debug first), which
        // outranks the rpath: point it at the library built for this run.
        let out = Command::new(&bin)
            .env("LD_LIBRARY_PATH", &lib)
            .current_dir(out_dir.path())
            .env("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0")
            .env("UBSAN_OPTIONS", "halt_on_error=1:print_stacktrace=1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name} failed:\n{stdout}\n{stderr}");
        assert!(stdout.contains(marker), "{stdout}");
        assert!(
            !stderr.contains("ERROR: AddressSanitizer") && !stderr.contains("runtime error"),
            "{stderr}"
        );
    }
}

#[test]
fn committed_header_matches_the_code() {
    // CI regenerates the header with cbindgen and diffs it (scripts/test.sh);
    // here, at least every exported function is declared.
    let header = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("include/panseal.h"),
    )
    .unwrap();
    for f in [
        "panseal_version",
        "panseal_last_error",
        "panseal_client_new",
        "panseal_client_new_from_file",
        "panseal_client_close",
        "panseal_client_free",
        "panseal_seal",
        "panseal_seal_binary",
        "panseal_open",
        "panseal_blind_index",
        "panseal_mask",
        "panseal_rotate_dek",
    ] {
        assert!(
            header.contains(&format!("{f}(")),
            "{f} missing from include/panseal.h"
        );
    }
}
