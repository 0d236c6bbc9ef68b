//! Seal, index, open and rotate in a few lines. (The local key service keeps
//! its KEK in this process: for development only.)
use panseal::{blocking, Access, Context, Environment, LocalKeyService, MemoryAuditSink};
use panseal::{MemoryKeyStore, Pan, Panseal};

fn main() -> Result<(), panseal::Error> {
    let panseal = blocking::Panseal::build(
        Panseal::builder()
            .key_service(LocalKeyService::new(Environment::new("dev")?))
            .key_store(MemoryKeyStore::new())
            .audit(MemoryAuditSink::new())
            .environment("dev")
            .scope("merchant-42"),
    )?;
    let pan = Pan::parse("4111 1111 1111 1111")?;
    let row = Context::new("cards", "pan", "card-1001")?;

    let sealed = panseal.seal_pan(&pan, &row)?; // store sealed.to_text() in VARCHAR(64)
    let index = panseal.blind_index(&pan)?; // store index.to_hex() for lookups
    println!("sealed {sealed}\nindex  {}\nshown  {pan}", index.to_hex());

    let who = Access::new("support-agent-7", "refund")?;
    let opened = panseal.open_pan(&sealed, &row, &who)?;
    assert_eq!(opened.pan, pan);

    let retired = panseal.rotate_dek()?; // new seals use a fresh DEK
    let again = panseal.open_pan(&sealed, &row, &who)?;
    println!(
        "retired {retired:?}; old ciphertext still opens, re-seal: {}",
        again.needs_reseal
    );
    let resealed = panseal.reseal(&sealed, &row, &who)?;
    assert_ne!(resealed.key_id(), sealed.key_id());
    Ok(())
}
