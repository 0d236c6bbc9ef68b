//! `breach_drill` — fill PostgreSQL with cards through panseal, then play the
//! attacker of the 2021–22 breach: a `pg_dump` of every table (including the
//! wrapped DEKs), the application's configuration and the front end's
//! wrap-only key-service credential. Try every recovery path and report how
//! many PANs came out (must be 0); then show the right decrypt credential
//! opens everything.
//!
//! ```text
//! cargo run --features postgres --example breach_drill -- \
//!     --pg-url postgresql://postgres@127.0.0.1:5432/drill --cards 1000
//! ```
//!
//! The key service here is the in-process local one standing in for the
//! separate key service: the attacker is given no handle to it but the
//! wrap-only credential, exactly as a compromised front end would have.

use std::collections::HashSet;
use std::process::{Command, ExitCode};

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes128Gcm, Aes256Gcm, KeyInit, Nonce, Tag};
use base64::Engine as _;
use clap::Parser;
use hmac::{Hmac, Mac};
use panseal::{
    Access, Context, Environment, KeyService, KeyStore, LocalKeyService, MemoryAuditSink, Pan,
    Panseal, Permissions, PostgresKeyStore, SealedPan,
};
use sha2::{Digest, Sha256};

#[derive(Parser)]
#[command(about = "Dump the database and try to recover PANs, as the attacker would")]
struct Args {
    /// Database to fill and attack (it gets a `cards` table).
    #[arg(long)]
    pg_url: String,
    /// Number of cards.
    #[arg(long, default_value_t = 1000)]
    cards: usize,
    /// pg_dump binary.
    #[arg(long, default_value = "pg_dump")]
    pg_dump: String,
    /// Rows on which to brute-force the blind index over BIN + last four.
    #[arg(long, default_value_t = 3)]
    brute_force_rows: usize,
}

const BIN: &str = "411111";

fn luhn_complete(prefix: &[u8]) -> u8 {
    let mut sum = 0u32;
    for (i, &d) in prefix.iter().rev().enumerate() {
        let mut v = u32::from(d);
        if i % 2 == 0 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    ((10 - sum % 10) % 10) as u8
}

fn card(i: usize) -> String {
    let mut digits: Vec<u8> = BIN.bytes().map(|b| b - b'0').collect();
    let mut x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    while digits.len() < 15 {
        x ^= x >> 29;
        x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        digits.push((x % 10) as u8);
    }
    let check = luhn_complete(&digits);
    digits.push(check);
    digits.iter().map(|d| char::from(b'0' + d)).collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(0) => ExitCode::SUCCESS,
        Ok(n) => {
            eprintln!("breach_drill: {n} PAN(s) RECOVERED — the defence failed");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("breach_drill: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<usize, Box<dyn std::error::Error>> {
    // ---- the payment system --------------------------------------------
    let key_service = LocalKeyService::new(Environment::new("prod")?);
    let store = PostgresKeyStore::connect(&args.pg_url, 4).await?;
    let front_end = Panseal::builder()
        .key_service(key_service.restricted(Permissions::wrap_only()))
        .key_store(store.clone())
        .environment("prod")
        .scope("merchant-1")
        .build()
        .await?;
    let db = store.pool().get().await?;
    db.batch_execute(
        "DROP TABLE IF EXISTS cards;
         CREATE TABLE cards (id bigint PRIMARY KEY, pan_sealed varchar(64) NOT NULL,
                             pan_index char(64) NOT NULL, pan_masked varchar(19) NOT NULL)",
    )
    .await?;
    let mut pans = Vec::with_capacity(args.cards);
    for i in 0..args.cards {
        let digits = card(i);
        let pan = Pan::parse(&digits)?;
        let ctx = Context::new("cards", "pan_sealed", i.to_string())?;
        let sealed = front_end.seal_pan(&pan, &ctx).await?;
        let index = front_end.blind_index(&pan).await?;
        db.execute(
            "INSERT INTO cards VALUES ($1, $2, $3, $4)",
            &[
                &(i as i64),
                &sealed.to_text(),
                &index.to_hex(),
                &pan.masked(),
            ],
        )
        .await?;
        pans.push(digits);
    }
    println!(
        "filled {} cards through the wrap-only front end (BIN {BIN}, last four shown)",
        args.cards
    );

    // ---- the attacker: the whole database, the config, a wrap-only key --
    let dump = Command::new(&args.pg_dump)
        .arg(&args.pg_url)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", args.pg_dump))?;
    if !dump.status.success() {
        return Err(format!("pg_dump failed: {}", String::from_utf8_lossy(&dump.stderr)).into());
    }
    let dump = dump.stdout;
    println!("attacker: pg_dump of every table, {} bytes", dump.len());
    let truth: HashSet<&str> = pans.iter().map(String::as_str).collect();
    let mut recovered: HashSet<String> = HashSet::new();

    // 1. Card numbers in the clear anywhere in the dump.
    let text = String::from_utf8_lossy(&dump);
    let mut run = String::new();
    for c in text.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_digit() {
            run.push(c);
            continue;
        }
        if (12..=19).contains(&run.len()) && truth.contains(run.as_str()) {
            recovered.insert(run.clone());
        }
        run.clear();
    }
    println!("  [1] PANs in the clear in the dump: {}", recovered.len());

    // 2. Every 16- and 32-byte run of the dump, raw and after decoding its
    //    hex (bytea) and base64url (ciphertext) strings, as an AES key.
    let mut blobs: Vec<Vec<u8>> = vec![dump.clone()];
    for token in
        text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '\\'))
    {
        let t = token.trim_start_matches("\\\\x").trim_start_matches("\\x");
        if t.len() >= 32 && t.len() % 2 == 0 {
            if let Ok(b) = hex::decode(t) {
                blobs.push(b);
            }
        }
        let body = t.strip_prefix("P1").unwrap_or(t);
        if body.len() >= 22 {
            if let Ok(b) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(body) {
                blobs.push(b);
            }
        }
    }
    let rows = db
        .query(
            "SELECT id, pan_sealed, pan_index FROM cards ORDER BY id LIMIT 3",
            &[],
        )
        .await?;
    let samples: Vec<(i64, SealedPan, String)> = rows
        .iter()
        .map(|r| {
            let sealed =
                SealedPan::from_text(r.get::<_, &str>(1)).expect("stored ciphertext parses");
            (r.get(0), sealed, r.get::<_, String>(2))
        })
        .collect();
    let mut tried = 0u64;
    let mut key_hits = 0u64;
    for blob in &blobs {
        for w in blob.windows(32) {
            tried += 1;
            if try_key::<Aes256Gcm>(w, &samples) {
                key_hits += 1;
            }
        }
        for w in blob.windows(16) {
            tried += 1;
            if try_key::<Aes128Gcm>(w, &samples) {
                key_hits += 1;
            }
        }
    }
    println!("  [2] {tried} candidate AES keys from the dump: {key_hits} opened a ciphertext");

    // 3. The blind index: unkeyed hashes over every BIN + last-four
    //    candidate, and every 32-byte run of the dump as the HMAC key.
    let mut index_hits = 0u64;
    let mut candidates = 0u64;
    for (id, _, index) in samples.iter().take(args.brute_force_rows) {
        let last4 = &pans[*id as usize][12..];
        let target = hex::decode(index)?;
        for middle in 0..1_000_000u32 {
            let mut digits: Vec<u8> = BIN.bytes().map(|b| b - b'0').collect();
            digits.extend(format!("{middle:06}").bytes().map(|b| b - b'0'));
            digits.extend(last4[..3].bytes().map(|b| b - b'0'));
            if luhn_complete(&digits) != last4.as_bytes()[3] - b'0' {
                continue;
            }
            candidates += 1;
            let pan: String = digits
                .iter()
                .map(|d| char::from(b'0' + d))
                .chain(last4[3..].chars())
                .collect();
            if Sha256::digest(pan.as_bytes()).as_slice() == target.as_slice() {
                index_hits += 1;
                recovered.insert(pan);
            }
        }
        // Grant the attacker the true PAN: if any run of the dump were the
        // index key, its HMAC would match.
        let true_pan = &pans[*id as usize];
        for blob in &blobs {
            for w in blob.windows(32) {
                let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(w)?;
                mac.update(true_pan.as_bytes());
                if mac.finalize().into_bytes().as_slice() == target.as_slice() {
                    index_hits += 1;
                    recovered.insert(true_pan.clone());
                }
            }
        }
    }
    println!(
        "  [3] blind index: {candidates} BIN+last-four candidates hashed, \
         every dump run tried as HMAC key: {index_hits} matches"
    );

    // 4. The front end's wrap-only credential against every wrapped DEK.
    let wrap_only = key_service.restricted(Permissions::wrap_only());
    let records = store.list(None).await?;
    let attacker = Access::new("attacker", "exfiltration")?;
    let mut unwrapped = 0;
    for r in &records {
        if r.purpose != panseal::KeyPurpose::Data {
            continue;
        }
        if wrap_only
            .unwrap(&r.key_request(), &r.wrapped, &attacker)
            .await
            .is_ok()
        {
            unwrapped += 1;
        }
    }
    println!(
        "  [4] wrap-only credential: {unwrapped} of {} wrapped DEKs unwrapped",
        records
            .iter()
            .filter(|r| r.purpose == panseal::KeyPurpose::Data)
            .count()
    );
    // The same credential through the library, on a fresh process.
    let front_end2 = Panseal::builder()
        .key_service(wrap_only)
        .key_store(store.clone())
        .audit(MemoryAuditSink::new())
        .environment("prod")
        .scope("merchant-1")
        .build()
        .await?;
    let opened_by_attacker = {
        let (id, sealed, _) = &samples[0];
        let ctx = Context::new("cards", "pan_sealed", id.to_string())?;
        front_end2.open_pan(sealed, &ctx, &attacker).await.is_ok()
    };
    println!(
        "      open through the library with it: {}",
        if opened_by_attacker {
            "OPENED"
        } else {
            "refused"
        }
    );
    if opened_by_attacker {
        recovered.insert(pans[samples[0].0 as usize].clone());
    }
    let total = recovered.len() + key_hits as usize + unwrapped;
    println!("attacker recovered {} PANs", recovered.len());

    // ---- the right credential opens everything ------------------------
    let back_office = Panseal::builder()
        .key_service(key_service.restricted(Permissions::application()))
        .key_store(store.clone())
        .audit(MemoryAuditSink::new())
        .environment("prod")
        .scope("merchant-1")
        .build()
        .await?;
    let access = Access::new("back-office", "settlement")?;
    let rows = db
        .query("SELECT id, pan_sealed FROM cards ORDER BY id", &[])
        .await?;
    let mut opened = 0;
    for r in &rows {
        let id: i64 = r.get(0);
        let sealed = SealedPan::from_text(r.get::<_, &str>(1))?;
        let ctx = Context::new("cards", "pan_sealed", id.to_string())?;
        let pan = back_office.open_pan(&sealed, &ctx, &access).await?.pan;
        if pan.expose_digits() == pans[id as usize] {
            opened += 1;
        }
    }
    println!(
        "back office with the decrypt credential opened {opened} of {} cards",
        rows.len()
    );
    if opened != rows.len() {
        return Err("the right credential failed to open every card".into());
    }
    Ok(total)
}

/// Whether `key` (as a key of cipher `C`) opens any sample ciphertext.
fn try_key<C>(key: &[u8], samples: &[(i64, SealedPan, String)]) -> bool
where
    C: KeyInit
        + AeadInPlace<NonceSize = aes_gcm::aead::consts::U12, TagSize = aes_gcm::aead::consts::U16>,
{
    let Ok(cipher) = C::new_from_slice(key) else {
        return false;
    };
    samples.iter().any(|(id, s, _)| {
        let b = s.as_bytes();
        let mut aad = b[..10].to_vec();
        aad.extend_from_slice(
            Context::new("cards", "pan_sealed", id.to_string())
                .expect("ctx")
                .encoded(),
        );
        let mut buf = b[22..32].to_vec();
        cipher
            .decrypt_in_place_detached(
                Nonce::from_slice(&b[10..22]),
                &aad,
                &mut buf,
                Tag::from_slice(&b[32..48]),
            )
            .is_ok()
    })
}
