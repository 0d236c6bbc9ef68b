//! The JSON client configuration from Rust (issue 13, item 3): the README's
//! PKCS#11 and AWS KMS configurations (`ffi/tests/c/configs/key_services.jsonc`,
//! the same texts the C and Python tests load) opened with
//! [`ClientConfig::connect`] (async) and [`panseal::blocking::Panseal::from_config`]
//! (sync): 50 PANs sealed, 50 of 50 opened by a second client built from
//! the same configuration, 0 of 50 with another row.

use std::path::Path;

use panseal::config::ClientConfig;
use panseal::{Access, Context, Error, Pan};

/// The lines between `readme:begin name` and `readme:end name`.
fn readme_config(name: &str) -> String {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("ffi/tests/c/configs/key_services.jsonc"),
    )
    .unwrap();
    let begin = format!("// readme:begin {name}\n");
    let start = text.find(&begin).expect("begin marker") + begin.len();
    let end = text[start..]
        .find(&format!("// readme:end {name}"))
        .expect("end marker");
    text[start..start + end].to_owned()
}

fn substitute(text: &str, pairs: &[(&str, &str)]) -> String {
    let mut out = text.to_owned();
    for (from, to) in pairs {
        assert!(out.contains(from), "{from} not in the README configuration");
        out = out.replace(from, to);
    }
    out
}

/// The i-th test PAN, as `ffi/tests/c/test_backends.c` makes them.
fn pan(i: usize) -> Pan {
    let body = format!("400000{i:09}");
    let sum: u32 = body
        .bytes()
        .rev()
        .enumerate()
        .map(|(k, b)| {
            let d = u32::from(b - b'0');
            if k % 2 == 0 {
                let d = d * 2;
                if d > 9 {
                    d - 9
                } else {
                    d
                }
            } else {
                d
            }
        })
        .sum();
    Pan::parse(&format!("{body}{}", (10 - sum % 10) % 10)).unwrap()
}

fn row(i: usize) -> Context {
    Context::new("cards", "pan", format!("row-{i}").as_bytes()).unwrap()
}

fn access() -> Access {
    Access::new("rust-test", "config").unwrap()
}

const COUNT: usize = 50;

/// Opened PANs of `sealed` with rows shifted by `shift`.
fn count_opened(
    ps: &panseal::blocking::Panseal,
    sealed: &[panseal::SealedPan],
    shift: usize,
) -> usize {
    sealed
        .iter()
        .enumerate()
        .filter(|(i, s)| match ps.open_pan(s, &row(i + shift), &access()) {
            Ok(o) => o.pan == pan(*i),
            Err(Error::Decryption) => false,
            Err(e) => panic!("unexpected: {e}"),
        })
        .count()
}

#[cfg(all(feature = "pkcs11", feature = "hazmat-test-keys"))]
mod pkcs11 {
    use super::*;
    use crate::softhsm;
    use std::os::unix::fs::PermissionsExt as _;

    /// The README's configuration on the test token `main`, with its own
    /// KEK name; `pin_source` is `pin_file` or `pin_env`.
    fn config(dir: &Path, pin_source: &str) -> String {
        let hsm = softhsm::softhsm(&["main"]);
        let pin_file = dir.join("hsm-pin");
        std::fs::write(&pin_file, format!("{}\n", softhsm::PIN)).unwrap();
        std::fs::set_permissions(&pin_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let text = substitute(
            &readme_config("pkcs11-config"),
            &[
                (
                    "/usr/lib/softhsm/libsofthsm2.so",
                    &hsm.module.display().to_string(),
                ),
                ("\"token\": \"payments\"", "\"token\": \"main\""),
                ("\"kek\": \"cards\"", "\"kek\": \"config-json\""),
                (
                    "/var/lib/app/panseal-keys.pks",
                    &dir.join("keys.pks").display().to_string(),
                ),
                (
                    "/var/log/app/panseal-audit.jsonl",
                    &dir.join("audit.jsonl").display().to_string(),
                ),
            ],
        );
        if pin_source == "pin_file" {
            substitute(
                &text,
                &[("/run/secrets/hsm-pin", &pin_file.display().to_string())],
            )
        } else {
            substitute(
                &text,
                &[(
                    "\"pin_file\": \"/run/secrets/hsm-pin\"",
                    "\"pin_env\": \"PANSEAL_IT_CONFIG_PIN\"",
                )],
            )
        }
    }

    /// Async: `connect` logs in with the PIN from the file (trailing newline
    /// dropped) and seals; a second client, its PIN from the environment,
    /// opens 50 of 50 and none with another row. The sync `builder` points
    /// at `connect`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readme_pkcs11_configuration_from_rust() {
        let _serial = softhsm::SERIAL.lock().await;
        let dir = tempfile::tempdir().unwrap();
        let by_file = ClientConfig::from_json(&config(dir.path(), "pin_file")).unwrap();
        assert!(!format!("{by_file:?}").contains(softhsm::PIN));
        let e = match by_file.builder() {
            Ok(_) => panic!("a sync builder for pkcs11"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("ClientConfig::connect"), "{e}");
        let first = by_file.connect().await.unwrap().build().await.unwrap();
        let mut sealed = Vec::new();
        for i in 0..COUNT {
            sealed.push(first.seal_pan(&pan(i), &row(i)).await.unwrap());
        }
        let index = first.blind_index(&pan(0)).await.unwrap();
        assert_eq!(index, first.blind_index(&pan(0)).await.unwrap());
        drop(first);

        std::env::set_var("PANSEAL_IT_CONFIG_PIN", softhsm::PIN);
        let by_env = ClientConfig::from_json(&config(dir.path(), "pin_env")).unwrap();
        let second = by_env.connect().await.unwrap().build().await.unwrap();
        let (mut opened, mut moved) = (0, 0);
        for (i, s) in sealed.iter().enumerate() {
            if second.open_pan(s, &row(i), &access()).await.unwrap().pan == pan(i) {
                opened += 1;
            }
            match second.open_pan(s, &row(i + 1), &access()).await {
                Ok(_) => moved += 1,
                Err(Error::Decryption) => {}
                Err(e) => panic!("unexpected: {e}"),
            }
        }
        assert_eq!((opened, moved), (COUNT, 0));
        assert_eq!(index, second.blind_index(&pan(0)).await.unwrap());
        std::env::remove_var("PANSEAL_IT_CONFIG_PIN");
    }

    /// Sync: `blocking::Panseal::from_config` connects on its own runtime.
    #[test]
    fn readme_pkcs11_configuration_from_blocking_rust() {
        let _serial = softhsm::SERIAL.blocking_lock();
        let dir = tempfile::tempdir().unwrap();
        let c = ClientConfig::from_json(&config(dir.path(), "pin_file")).unwrap();
        let first = panseal::blocking::Panseal::from_config(&c).unwrap();
        let sealed: Vec<_> = (0..COUNT)
            .map(|i| first.seal_pan(&pan(i), &row(i)).unwrap())
            .collect();
        drop(first);
        let second = panseal::blocking::Panseal::from_config(&c).unwrap();
        assert_eq!(count_opened(&second, &sealed, 0), COUNT);
        assert_eq!(count_opened(&second, &sealed, 1), 0);
    }
}

#[cfg(all(feature = "aws-kms", feature = "hazmat-test-keys"))]
mod aws_kms {
    use super::*;
    use crate::moto;

    /// The README's AWS KMS configuration against a fresh moto, credentials
    /// from the environment (the standard chain): seal 50 with one client,
    /// open 50 of 50 with a second, 0 of 50 with another row.
    #[test]
    fn readme_aws_kms_configuration_from_blocking_rust() {
        let server = moto::Moto::start();
        let dir = tempfile::tempdir().unwrap();
        // The standard chain's environment credentials (this binary's other
        // AWS tests pass theirs explicitly).
        std::env::set_var("AWS_ACCESS_KEY_ID", moto::ACCESS_KEY_ID);
        std::env::set_var("AWS_SECRET_ACCESS_KEY", moto::SECRET_ACCESS_KEY);
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
        let text = substitute(
            &readme_config("aws-kms-config"),
            &[
                ("http://127.0.0.1:5000", &server.endpoint()),
                (
                    "/var/lib/app/panseal-keys.pks",
                    &dir.path().join("keys.pks").display().to_string(),
                ),
                (
                    "/var/log/app/panseal-audit.jsonl",
                    &dir.path().join("audit.jsonl").display().to_string(),
                ),
            ],
        );
        let c = ClientConfig::from_json(&text).unwrap();
        let first = panseal::blocking::Panseal::from_config(&c).unwrap();
        let sealed: Vec<_> = (0..COUNT)
            .map(|i| first.seal_pan(&pan(i), &row(i)).unwrap())
            .collect();
        drop(first);
        let second = panseal::blocking::Panseal::from_config(&c).unwrap();
        assert_eq!(count_opened(&second, &sealed, 0), COUNT);
        assert_eq!(count_opened(&second, &sealed, 1), 0);
    }
}

#[cfg(all(feature = "keyd-client", feature = "hazmat-test-keys"))]
mod keyd {
    use super::*;
    use crate::keyd_harness::Keyd;

    /// The README's keyd configuration against a real `panseal-keyd`
    /// (principal `app`): 50 sealed, 50 of 50 opened by a second client,
    /// 0 of 50 with another row.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readme_keyd_configuration_from_rust() {
        let k = Keyd::ready().await;
        let dir = tempfile::tempdir().unwrap();
        let certs = k.path("certs");
        let path = |p: &str| certs.join(p).display().to_string();
        let text = substitute(
            &readme_config("keyd-config"),
            &[
                ("\"environment\": \"prod\"", "\"environment\": \"test\""),
                ("keyd.internal:7443", &k.addr),
                (
                    "\"server_name\": \"keyd.internal\"",
                    "\"server_name\": \"localhost\"",
                ),
                ("/etc/panseal/ca.pem", &path("ca.pem")),
                ("/etc/panseal/app.pem", &path("app.pem")),
                ("/etc/panseal/app.key.pem", &path("app.key.pem")),
                (
                    "/var/lib/app/panseal-keys.pks",
                    &dir.path().join("keys.pks").display().to_string(),
                ),
                (
                    "/var/log/app/panseal-audit.jsonl",
                    &dir.path().join("audit.jsonl").display().to_string(),
                ),
            ],
        );
        let c = ClientConfig::from_json(&text).unwrap();
        let first = c.connect().await.unwrap().build().await.unwrap();
        let mut sealed = Vec::new();
        for i in 0..COUNT {
            sealed.push(first.seal_pan(&pan(i), &row(i)).await.unwrap());
        }
        drop(first);
        let second = c.builder().unwrap().build().await.unwrap();
        let (mut opened, mut moved) = (0, 0);
        for (i, s) in sealed.iter().enumerate() {
            if second.open_pan(s, &row(i), &access()).await.unwrap().pan == pan(i) {
                opened += 1;
            }
            if second.open_pan(s, &row(i + 1), &access()).await.is_ok() {
                moved += 1;
            }
        }
        assert_eq!((opened, moved), (COUNT, 0));
    }
}
