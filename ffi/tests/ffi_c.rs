//! Builds the C programs under `tests/c/` with gcc (`-Wall -Wextra -Werror`,
//! AddressSanitizer + UndefinedBehaviorSanitizer) against the `cdylib` this
//! test run built, and runs them. `test_ingest.c` (the write-only ingest
//! ABI) needs `hazmat-test-keys` too: the key pair is generated here and the
//! C program's ciphertexts are opened here with the private key.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The directory holding the `libpanseal_ffi.so` built for this test run.
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

/// Compiles `tests/c/<name>.c` against the library of this test run, with
/// the sanitizers, into `out_dir`.
fn build_c(name: &str, out_dir: &Path) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let lib = lib_dir();
    let src = root.join("tests/c").join(format!("{name}.c"));
    let bin = out_dir.join(name);
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
        .arg("-lpanseal_ffi")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-lpthread")
        .arg("-o")
        .arg(&bin)
        .status()
        .expect("gcc must be installed (scripts/setup.sh)");
    assert!(status.success(), "{name}.c did not compile cleanly");
    bin
}

/// Runs a program built by [`build_c`] with `envs`; asserts it succeeded
/// without a sanitizer report and printed `marker`; returns its stdout.
fn run_c(bin: &Path, envs: &[(&str, &str)], marker: &str) -> String {
    let lib = lib_dir();
    // cargo sets LD_LIBRARY_PATH for tests (target/debug first), which
    // outranks the rpath: point it at the library built for this run.
    let out = Command::new(bin)
        .env("LD_LIBRARY_PATH", &lib)
        .current_dir(bin.parent().unwrap())
        .env("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0")
        .env("UBSAN_OPTIONS", "halt_on_error=1:print_stacktrace=1")
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let name = bin.display();
    assert!(out.status.success(), "{name} failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains(marker), "{stdout}");
    assert!(
        !stderr.contains("ERROR: AddressSanitizer") && !stderr.contains("runtime error"),
        "{stderr}"
    );
    stdout
}

#[test]
fn c_programs_pass_under_sanitizers() {
    let out_dir = tempfile::tempdir().unwrap();
    for (name, marker) in [
        ("test_panseal", "C ABI tests passed"),
        ("example", "store in VARCHAR(64): P1"),
    ] {
        let bin = build_c(name, out_dir.path());
        run_c(&bin, &[], marker);
    }
}

/// The PANs `tests/c/test_ingest.c` seals, in its order (`PANS[]`).
const INGEST_PANS: [&str; 16] = [
    "4111111111111111",
    "5555555555554444",
    "378282246310005",
    "371449635398431",
    "6011111111111117",
    "3056930009020004",
    "36227206271667",
    "4222222222222",
    "6200000000000005",
    "5200828282828210",
    "4000056655665556",
    "6011000990139424",
    "4000000000000000006",
    "500000000009",
    "4111 1111 1111 1111",
    "5555-5555-5555-4444",
];

/// A C front end holding only the public key seals; the private key,
/// generated here and never given to the C program, opens every one of its
/// ciphertexts (text and binary, 16 PANs of 12..19 digits, 100 more from 4
/// threads sharing one handle), bound to its row; an attacker's key pair
/// opens none, and a front end that pins the fingerprint seals nothing to
/// a substituted key.
#[test]
fn c_front_end_seals_what_only_the_private_key_opens() {
    use base64::Engine as _;
    use panseal::hazmat::IngestPrivateKey;
    use panseal::{Context, Environment, Error, IngestSealed, KeyError, Pan, Scope};

    let env = Environment::new("test").unwrap();
    let scope = Scope::new("merchant-1").unwrap();
    let key = IngestPrivateKey::generate(&env, &scope, 7);
    let attacker = IngestPrivateKey::generate(&env, &scope, 7);
    let public = key.public_key().to_text();
    let fingerprint = key.public_key().fingerprint();
    // The same key text with y's lowest bit flipped: not on the curve.
    let mut point = *key.public_key().as_bytes();
    point[64] ^= 1;
    let off_curve = format!(
        "PIK1/test/merchant-1/7/{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(point)
    );
    assert!(matches!(
        panseal::IngestPublicKey::from_text(&off_curve),
        Err(Error::Format(panseal::FormatError::PublicKey))
    ));

    let out_dir = tempfile::tempdir().unwrap();
    let bin = build_c("test_ingest", out_dir.path());
    let stdout = run_c(
        &bin,
        &[
            ("PANSEAL_INGEST_PUBLIC_KEY", &public),
            ("PANSEAL_INGEST_FINGERPRINT", &fingerprint),
            ("PANSEAL_INGEST_OTHER_KEY", &attacker.public_key().to_text()),
            ("PANSEAL_INGEST_OFF_CURVE_KEY", &off_curve),
        ],
        "C ingest ABI tests passed",
    );

    let mut sealed = Vec::new();
    let mut attacker_lines = 0;
    for line in stdout.lines() {
        let mut parts = line.split(' ');
        let (Some(kind), Some(i), Some(value)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let Ok(i) = i.parse::<usize>() else {
            continue;
        };
        match kind {
            "text" => sealed.push((i, IngestSealed::from_text(value).unwrap())),
            "binary" => sealed.push((
                i,
                IngestSealed::from_bytes(&hex::decode(value).unwrap()).unwrap(),
            )),
            "attacker" => attacker_lines += 1,
            _ => {}
        }
    }
    assert_eq!(sealed.len(), 16 + 100 + 16, "text + threaded text + binary");
    let distinct: std::collections::HashSet<_> = sealed.iter().map(|(_, s)| *s).collect();
    assert_eq!(distinct.len(), sealed.len());
    let row = |i: usize| Context::new("cards", "pan", format!("row-{i}").as_bytes()).unwrap();

    let (mut opened, mut attacker_opened, mut moved_opened) = (0, 0, 0);
    for (i, s) in &sealed {
        let expected = Pan::parse(INGEST_PANS[i % INGEST_PANS.len()]).unwrap();
        let pan = key.open(s, &row(*i)).expect("the private key opens it");
        if pan == expected {
            opened += 1;
        }
        match attacker.open(s, &row(*i)) {
            Ok(_) => attacker_opened += 1,
            Err(Error::Key(KeyError::IngestKeyMismatch)) => {}
            Err(e) => panic!("unexpected error: {e}"),
        }
        match key.open(s, &row(i + 1)) {
            Ok(_) => moved_opened += 1,
            Err(Error::Decryption) => {}
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(opened, 132, "every ciphertext opens to the PAN sealed");
    assert_eq!(attacker_opened, 0, "another key pair opens nothing");
    assert_eq!(
        moved_opened, 0,
        "a ciphertext moved to another row opens nothing"
    );
    assert_eq!(attacker_lines, 0, "nothing sealed to a substituted key");
    assert!(stdout.contains("opened without the private key: 0 of 32"));
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
        "panseal_ingest_sealer_new",
        "panseal_ingest_sealer_new_pinned",
        "panseal_ingest_sealer_fingerprint",
        "panseal_ingest_sealer_free",
        "panseal_ingest_seal",
        "panseal_ingest_seal_binary",
    ] {
        assert!(
            header.contains(&format!("{f}(")),
            "{f} missing from include/panseal.h"
        );
    }
}

#[cfg(feature = "pkcs11")]
#[path = "../../tests/it/softhsm.rs"]
mod softhsm;

#[cfg(feature = "aws-kms")]
#[path = "../../tests/it/moto.rs"]
mod moto;

#[cfg(feature = "postgres")]
#[allow(dead_code)]
#[path = "../../tests/it/common/pg.rs"]
mod pg;

/// The text between `readme:begin name` and `readme:end name` in
/// `tests/c/configs/key_services.jsonc`: the configuration the README shows.
#[cfg(any(feature = "pkcs11", feature = "aws-kms", feature = "postgres"))]
fn readme_config(name: &str) -> String {
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/c/configs/key_services.jsonc"),
    )
    .unwrap();
    let begin = format!("// readme:begin {name}\n");
    let start = text.find(&begin).expect("begin marker") + begin.len();
    let end = text[start..]
        .find(&format!("// readme:end {name}"))
        .expect("end marker");
    text[start..start + end].to_owned()
}

/// `text` with each `(from, to)` replaced; every `from` must occur.
#[cfg(any(feature = "pkcs11", feature = "aws-kms", feature = "postgres"))]
fn substitute(text: &str, pairs: &[(&str, &str)]) -> String {
    let mut out = text.to_owned();
    for (from, to) in pairs {
        assert!(out.contains(from), "{from} not in the README configuration");
        out = out.replace(from, to);
    }
    out
}

/// Runs the C backend test in `mode` with `envs` and returns stdout and
/// stderr together, for the assertions and the leak check.
#[cfg(any(feature = "pkcs11", feature = "aws-kms", feature = "postgres"))]
fn run_backend(bin: &Path, mode: &str, envs: &[(&str, &str)]) -> String {
    let lib = lib_dir();
    let out = Command::new(bin)
        .arg(mode)
        .env("LD_LIBRARY_PATH", &lib)
        .current_dir(bin.parent().unwrap())
        .env("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0")
        .env("UBSAN_OPTIONS", "halt_on_error=1:print_stacktrace=1")
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "test_backends {mode} failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains(&format!("C backend tests passed ({mode})")),
        "{stdout}"
    );
    assert!(
        !stderr.contains("ERROR: AddressSanitizer") && !stderr.contains("runtime error"),
        "{stderr}"
    );
    format!("{stdout}{stderr}")
}

/// Seal from one C process, open from a second one with a client built
/// from the same configuration (the KEK lives in the backend, so the data
/// survives the process), refuse a moved ciphertext; the figures are
/// asserted, and the secret (`secret`) appears in no output.
#[cfg(any(feature = "pkcs11", feature = "aws-kms", feature = "postgres"))]
fn seal_in_one_process_open_in_another(
    config: &str,
    envs: &[(&str, &str)],
    secret: &str,
    dir: &Path,
) -> String {
    let config_path = dir.join("panseal.json");
    std::fs::write(&config_path, config).unwrap();
    let sealed_path = dir.join("sealed.txt");
    let mut envs = envs.to_vec();
    let config_s = config_path.display().to_string();
    let sealed_s = sealed_path.display().to_string();
    envs.push(("PANSEAL_BACKEND_CONFIG", &config_s));
    envs.push(("PANSEAL_BACKEND_SEALED", &sealed_s));
    let bin = build_c("test_backends", dir);
    let first = run_backend(&bin, "seal", &envs);
    for figure in [
        "sealed: 50 of 50",
        "opened by the sealing client: 50 of 50",
        "opened with another row: 0 of 50",
        "opened after rotate_dek: 2 of 2",
    ] {
        assert!(first.contains(figure), "{figure} missing:\n{first}");
    }
    let sealed = std::fs::read_to_string(&sealed_path).unwrap();
    assert_eq!(sealed.lines().count(), 50);
    let second = run_backend(&bin, "open", &envs);
    assert!(
        second.contains("opened by a new process: 50 of 50"),
        "{second}"
    );
    assert!(
        second.contains("opened by a new process with another row: 0 of 50"),
        "{second}"
    );
    let all = format!("{first}{second}{sealed}");
    assert!(!all.contains(secret), "the secret leaked into the output");
    all
}

/// Issue 13, item 3: a C program on a PKCS#11 token (SoftHSM2, token
/// initialised here) configured with the README's JSON (PIN from a file):
/// 50 PANs sealed, 50 of 50 opened by a second process, 0 of 50 with
/// another row; blind index; rotate_dek. Then the configurations that must
/// fail: inline PIN, unknown backend, missing module, unset pin_env,
/// inline AWS secret — each PANSEAL_CONFIG_ERROR, no PIN in any message.
#[cfg(feature = "pkcs11")]
#[test]
fn c_on_pkcs11_softhsm() {
    use std::os::unix::fs::PermissionsExt as _;
    let _serial = softhsm::SERIAL.blocking_lock();
    let hsm = softhsm::softhsm(&["payments"]);
    let dir = tempfile::tempdir().unwrap();
    let pin_file = dir.path().join("hsm-pin");
    std::fs::write(&pin_file, format!("{}\n", softhsm::PIN)).unwrap();
    std::fs::set_permissions(&pin_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let module = hsm.module.display().to_string();
    let pin_path = pin_file.display().to_string();
    let store = dir.path().join("keys.pks").display().to_string();
    let audit = dir.path().join("audit.jsonl").display().to_string();
    let config = substitute(
        &readme_config("pkcs11-config"),
        &[
            ("/usr/lib/softhsm/libsofthsm2.so", &module),
            ("/run/secrets/hsm-pin", &pin_path),
            ("/var/lib/app/panseal-keys.pks", &store),
            ("/var/log/app/panseal-audit.jsonl", &audit),
        ],
    );
    let conf = hsm.conf.display().to_string();
    let envs = [("SOFTHSM2_CONF", conf.as_str())];
    let out = seal_in_one_process_open_in_another(&config, &envs, softhsm::PIN, dir.path());
    assert!(out.contains("blind index: version 1"), "{out}");

    let bin = dir.path().join("test_backends");
    let bad = run_backend(
        &bin,
        "bad",
        &[
            ("SOFTHSM2_CONF", conf.as_str()),
            ("PANSEAL_BAD_PIN", softhsm::PIN),
            ("PANSEAL_BAD_MODULE", &module),
        ],
    );
    assert_eq!(
        bad.matches("as expected").count(),
        6,
        "every bad configuration refused with PANSEAL_CONFIG_ERROR:\n{bad}"
    );
    assert!(!bad.contains(softhsm::PIN));
}

/// Issue 13, item 3: the same from C on AWS KMS (a moto server started
/// here), credentials from the environment (the standard chain).
#[cfg(feature = "aws-kms")]
#[test]
fn c_on_aws_kms_moto() {
    let server = moto::Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let endpoint = server.endpoint();
    let store = dir.path().join("keys.pks").display().to_string();
    let audit = dir.path().join("audit.jsonl").display().to_string();
    let config = substitute(
        &readme_config("aws-kms-config"),
        &[
            ("http://127.0.0.1:5000", &endpoint),
            ("/var/lib/app/panseal-keys.pks", &store),
            ("/var/log/app/panseal-audit.jsonl", &audit),
        ],
    );
    assert!(!config.contains(moto::SECRET_ACCESS_KEY));
    let home = dir.path().display().to_string();
    let envs = [
        ("AWS_ACCESS_KEY_ID", moto::ACCESS_KEY_ID),
        ("AWS_SECRET_ACCESS_KEY", moto::SECRET_ACCESS_KEY),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        // No shared config or credentials file of the user's.
        ("HOME", home.as_str()),
    ];
    let out =
        seal_in_one_process_open_in_another(&config, &envs, moto::SECRET_ACCESS_KEY, dir.path());
    assert!(out.contains("blind index: version 1"), "{out}");
}

/// Issue 13, items 3 and 4 from C: the README's PKCS#11 configuration with
/// its key store replaced by the README's PostgreSQL-over-TLS one
/// (`sslmode=verify-full`, the test server's CA): 50 sealed from one C
/// process, 50 of 50 opened by a second, 0 of 50 moved; the wrapped keys
/// are rows of the TLS-only server. A man in the middle (a certificate of
/// another CA) is refused: 0 of 50 open through it.
#[cfg(all(feature = "pkcs11", feature = "postgres"))]
#[test]
fn c_on_pkcs11_with_postgres_over_tls() {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    use std::os::unix::fs::PermissionsExt as _;

    fn ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        (cert.pem(), Issuer::new(p, key))
    }
    fn server_tls(issuer: &Issuer<'static, KeyPair>) -> pg::ServerTls {
        let mut p =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        p.distinguished_name
            .push(DnType::CommonName, "postgres test server");
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, issuer).unwrap();
        pg::ServerTls {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            client_ca_pem: None,
        }
    }

    let _serial = softhsm::SERIAL.blocking_lock();
    let hsm = softhsm::softhsm(&["payments"]);
    let dir = tempfile::tempdir().unwrap();
    let (ca_pem, issuer) = ca("panseal test database CA");
    let ca_file = dir.path().join("pg-ca.pem");
    std::fs::write(&ca_file, &ca_pem).unwrap();
    let server = pg::PgServer::start_tls(&server_tls(&issuer));
    server.create_db("payments");

    let pin_file = dir.path().join("hsm-pin");
    std::fs::write(&pin_file, format!("{}\n", softhsm::PIN)).unwrap();
    std::fs::set_permissions(&pin_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let module = hsm.module.display().to_string();
    let pin_path = pin_file.display().to_string();
    let audit = dir.path().join("audit.jsonl").display().to_string();
    let readme_store = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/it/postgres_tls.rs"),
    )
    .unwrap();
    let begin = readme_store.find("// readme:begin pg-tls-json\n").unwrap();
    let end = readme_store.find("// readme:end pg-tls-json").unwrap();
    let store_json = readme_store[begin + "// readme:begin pg-tls-json\n".len()..end].trim();
    let store_for = |ca: &str| {
        substitute(
            store_json,
            &[
                (
                    "app@db.internal:5432",
                    &format!("postgres@127.0.0.1:{}", server.port),
                ),
                ("/etc/ssl/pg-ca.pem", ca),
            ],
        )
    };
    let config_for = |store: &str| {
        substitute(
            &readme_config("pkcs11-config"),
            &[
                ("/usr/lib/softhsm/libsofthsm2.so", &module),
                ("/run/secrets/hsm-pin", &pin_path),
                (
                    "{ \"type\": \"file\", \"path\": \"/var/lib/app/panseal-keys.pks\" }",
                    store,
                ),
                ("/var/log/app/panseal-audit.jsonl", &audit),
            ],
        )
    };
    let config = config_for(&store_for(&ca_file.display().to_string()));
    assert!(config.contains("sslmode=verify-full"), "{config}");
    let conf = hsm.conf.display().to_string();
    let envs = [("SOFTHSM2_CONF", conf.as_str())];
    seal_in_one_process_open_in_another(&config, &envs, softhsm::PIN, dir.path());
    let rows = server.psql("payments", "SELECT count(*) FROM panseal_keys");
    assert!(
        rows.trim().parse::<u64>().unwrap() >= 1,
        "no key record in the database: {rows}"
    );

    // The man in the middle: the same server, but the client is told to
    // trust another CA (as if the server's certificate came from an
    // attacker's CA): refused, nothing written.
    let (other_pem, _other) = ca("attacker CA");
    let other_file = dir.path().join("other-ca.pem");
    std::fs::write(&other_file, other_pem).unwrap();
    let mitm_dir = dir.path().join("mitm");
    std::fs::create_dir(&mitm_dir).unwrap();
    let mitm = config_for(&store_for(&other_file.display().to_string()));
    std::fs::write(mitm_dir.join("panseal.json"), &mitm).unwrap();
    let bin = dir.path().join("test_backends");
    let lib = lib_dir();
    let out = Command::new(&bin)
        .arg("open")
        .env("LD_LIBRARY_PATH", &lib)
        .env("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0")
        .env("SOFTHSM2_CONF", &conf)
        .env("PANSEAL_BACKEND_CONFIG", mitm_dir.join("panseal.json"))
        .env("PANSEAL_BACKEND_SEALED", dir.path().join("sealed.txt"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "opened through a man in the middle:\n{text}"
    );
    // Every open needs the DEK's record from the database: none is read
    // through the unverified connection (the server logs "unknown ca").
    assert!(text.contains("opened by a new process: 0 of 50"), "{text}");
}
