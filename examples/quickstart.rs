//! Seal, index, open and rotate in a few lines. (The local key service keeps
//! its KEK in this process: for development only.) The README's Quickstart
//! block is the part between the `readme:` markers (scripts/readme.py checks
//! that they are the same).

fn main() -> Result<(), panseal::Error> {
    // readme:begin quickstart
    use panseal::{blocking, Access, Context, Environment, LocalKeyService, MemoryAuditSink};
    use panseal::{MemoryKeyStore, Pan, Panseal};

    let panseal = blocking::Panseal::build(
        Panseal::builder()
            .key_service(LocalKeyService::new(Environment::new("dev")?)) // dev only
            .key_store(MemoryKeyStore::new())
            .audit(MemoryAuditSink::new())
            .environment("dev")
            .scope("merchant-42"),
    )?;
    let pan = Pan::parse("4111 1111 1111 1111")?; // Luhn, track-data refusal
    let row = Context::new("cards", "pan", "card-1001")?; // what the ciphertext is bound to

    let sealed = panseal.seal_pan(&pan, &row)?; // store sealed.to_text() (64 chars)
    let index = panseal.blind_index(&pan)?; // store index.to_hex() for lookup
    println!("{pan}"); // ************1111

    let opened = panseal.open_pan(&sealed, &row, &Access::new("agent-7", "refund")?)?;
    assert_eq!(opened.pan, pan);
    if opened.needs_reseal { /* DEK retired: panseal.reseal(...) when convenient */ }
    panseal.rotate_dek()?; // new seals use a fresh DEK
                           // readme:end quickstart

    println!("sealed {sealed}\nindex  {}", index.to_hex());
    // The old ciphertext still opens after the rotation, and asks to be
    // re-sealed under the new DEK.
    let who = Access::new("support-agent-7", "refund")?;
    let again = panseal.open_pan(&sealed, &row, &who)?;
    println!("after rotate_dek: re-seal {}", again.needs_reseal);
    assert!(again.needs_reseal);
    let resealed = panseal.reseal(&sealed, &row, &who)?;
    assert_ne!(resealed.key_id(), sealed.key_id());
    Ok(())
}
