//! The breach drill against a real PostgreSQL and a real `panseal-keyd`:
//! each attacker of DESIGN.md's table, with the numbers it got.
//!
//! * A — the dump alone: 0 PANs;
//! * B — the dump + the front end's credential (wrap + index), every oracle
//!   included: 0 PANs within the window; keyd's index quota stops the
//!   blind-index brute force after `INDEX_QUOTA` HMACs, against ~10^5
//!   candidates one PAN needs;
//! * C — the dump + a stolen reveal credential: exactly `REVEAL_QUOTA` PANs,
//!   each named in keyd's audit;
//! * D — a database writer editing key records: every edit detected, no
//!   seal under a compromised DEK;
//! * E — a write-only front end's whole process image (`/proc/PID/mem`) and
//!   configuration, plus the dump: 0 of the cards it sealed before the
//!   dump; a control card being typed at the dump is found by the same scan.
use crate::common;
use crate::keyd_harness;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::pg::PgServer;

/// Distinct records the stolen reveal credential may open per window
/// (principal `refunds` in keyd/tests/keyd_harness).
const REVEAL_QUOTA: u64 = 25;
/// HMACs the front end may ask for per window (principal `checkout`).
const INDEX_QUOTA: u64 = 3_000;
/// Cards the write-only front end seals for attacker E.
const INGEST_CARDS: u64 = 200;
/// Cards the drill stores: one HMAC each, plus two for the planting check,
/// come out of the front end's window before the attacker's turn.
const CARDS: u64 = 300;

fn client_config(
    k: &keyd_harness::Keyd,
    principal: &str,
    url: &str,
    audit: Option<&Path>,
) -> PathBuf {
    let certs = k.path("certs");
    let p = k.path(&format!("{principal}.json"));
    let audit = audit
        .map(|a| format!(r#","audit":{{"type":"jsonl","path":"{}"}}"#, a.display()))
        .unwrap_or_default();
    std::fs::write(
        &p,
        format!(
            r#"{{"environment":"test","scope":"merchant-1",
                "key_service":{{"type":"keyd","address":"{}","server_name":"localhost",
                  "ca_file":"{}","client_cert_file":"{}","client_key_file":"{}"}},
                "key_store":{{"type":"postgres","url":"{url}"}}{audit},
                "policy":{{"recheck_interval_secs":1}}}}"#,
            k.addr,
            certs.join("ca.pem").display(),
            certs.join(format!("{principal}.pem")).display(),
            certs.join(format!("{principal}.key.pem")).display(),
        ),
    )
    .unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_attacker_recovers_what_the_design_allows_and_no_more() {
    let pg = PgServer::start();
    let url = pg.create_db("drill");
    let k = keyd_harness::Keyd::ready().await;
    let audit = k.dir.path().join("app-audit.jsonl");
    let fe = client_config(&k, "checkout", &url, None);
    let refunds = client_config(&k, "refunds", &url, Some(&audit));
    let settle = client_config(&k, "settlement", &url, Some(&audit));
    let root = client_config(&k, "root", &url, Some(&audit));
    let drill = common::example_binary("breach_drill");
    let pg_dump = common::pg::pg_bin().join("pg_dump");
    let out = Command::new(&drill)
        .args([
            "--pg-url",
            &url,
            "--cards",
            &CARDS.to_string(),
            "--oracle-seconds",
            "60",
        ])
        .arg("--pg-dump")
        .arg(&pg_dump)
        .arg("--front-end")
        .arg(&fe)
        .arg("--reveal")
        .arg(&refunds)
        .arg("--bulk")
        .arg(&settle)
        .arg("--custodian")
        .arg(&root)
        .arg("--keyd-audit")
        .arg(k.path("data/audit.log"))
        .arg("--ingest-credential")
        .arg(client_config(&k, "ingest-frontend", &url, None))
        .arg("--ingest-frontend")
        .arg(common::example_binary("ingest_frontend"))
        .args(["--ingest-cards", &INGEST_CARDS.to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // A: the dump alone.
    assert!(
        stdout.contains("[A1] PANs in the clear in the dump: 0"),
        "{stdout}"
    );
    assert!(stdout.contains(": 0 opened a ciphertext"), "{stdout}");
    assert!(stdout.contains("tried as HMAC key: 0 matches"), "{stdout}");
    assert!(stdout.contains("attacker A recovered 0 PANs"), "{stdout}");
    // B: the front end's credential, every oracle.
    assert!(stdout.contains("[B1] unwrap every DEK: 0 of"), "{stdout}");
    assert!(
        stdout.contains("[B2] reveal 20 records: 0 revealed"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "keyd granted {} HMACs this window (then the index quota refused)",
            INDEX_QUOTA - CARDS - 2
        )),
        "{stdout}"
    );
    assert!(stdout.contains("PANs recovered: 0"), "{stdout}");
    assert!(stdout.contains("through keyd refused"), "{stdout}");
    assert!(stdout.contains("changed the index values: no"), "{stdout}");
    assert!(
        stdout.contains("[B5] index keys in the front end's memory: 0"),
        "{stdout}"
    );
    assert!(stdout.contains("attacker B recovered 0 PANs"), "{stdout}");
    // C: a stolen reveal credential gets exactly its quota, each audited.
    assert!(
        stdout.contains(&format!(
            "[C1] reveal every row: {REVEAL_QUOTA} PANs revealed, then the record quota refused"
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "keyd audit names {REVEAL_QUOTA} of {REVEAL_QUOTA} revealed records"
        )),
        "{stdout}"
    );
    assert!(stdout.contains("PANs in keyd's audit log: 0"), "{stdout}");
    // D: every key-record edit detected; no seal under a compromised DEK.
    assert!(!stdout.contains("ACCEPTED"), "{stdout}");
    assert!(
        stdout.contains("attacker D: 7 of 7 edits detected"),
        "{stdout}"
    );
    assert!(
        stdout.contains("0 of 50 new seals under the compromised DEK"),
        "{stdout}"
    );
    assert!(stdout.contains("opened 300 of 300 cards"), "{stdout}");
    // E: a write-only front end's memory, configuration and the dump.
    for line in [
        "[E1] cards sealed before the dump found in its memory as ASCII digits: 0",
        "[E2] cards found in its writable memory packed as BCD: 0",
        ": 0 matched the ingest key or an ephemeral key",
        "[E4] cards in its configuration (the public key): 0",
        "[E3c] control: planted private keys found 2 of 2, planted packed card found 1 of 1",
        "[E5] cards in the clear in the dump (orders table included): 0",
        "attacker E recovered 0 PANs sealed before the dump",
        "[E7] the front end's own credential: 0 of 50 ingest ciphertexts opened through keyd, \
         0 admission DEKs made, 0 plaintext DEKs",
        "[E6] control: a card being typed at the dump found by the same scan: yes",
    ] {
        assert!(stdout.contains(line), "missing {line:?}\n{stdout}");
    }
    assert!(
        stdout.contains(&format!(
            "opened {INGEST_CARDS} of {INGEST_CARDS} ingest ciphertexts"
        )),
        "{stdout}"
    );
}
