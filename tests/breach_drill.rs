//! The breach drill against a real PostgreSQL: with a dump of every table,
//! the configuration and the wrap-only credential, the attacker recovers
//! nothing; the decrypt credential opens every card.
#![cfg(feature = "postgres")]

mod common;

use std::process::Command;

use common::pg::PgServer;

#[test]
fn breach_drill_recovers_nothing() {
    let pg = PgServer::start();
    let url = pg.create_db("drill");
    let drill = common::example_binary("breach_drill");
    let pg_dump = common::pg::pg_bin().join("pg_dump");
    let out = Command::new(&drill)
        .args([
            "--pg-url",
            &url,
            "--cards",
            "300",
            "--brute-force-rows",
            "2",
        ])
        .arg("--pg-dump")
        .arg(&pg_dump)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("attacker recovered 0 PANs"), "{stdout}");
    assert!(
        stdout.contains("[1] PANs in the clear in the dump: 0"),
        "{stdout}"
    );
    assert!(stdout.contains(": 0 opened a ciphertext"), "{stdout}");
    assert!(stdout.contains(": 0 matches"), "{stdout}");
    assert!(stdout.contains("wrap-only credential: 0 of"), "{stdout}");
    assert!(stdout.contains("opened 300 of 300 cards"), "{stdout}");
    // The dump really holds what the attacker needs to try: wrapped keys
    // and ciphertexts.
    let dump = pg.dump("drill");
    let text = String::from_utf8_lossy(&dump);
    assert!(text.contains("panseal_keys"));
    assert!(text.contains("P1"));
}
