//! `breach_drill` — fill PostgreSQL with cards through panseal and a real
//! `panseal-keyd`, then play each attacker of DESIGN.md's table and print
//! how many PANs each one recovered:
//!
//! * **A. the database dump alone** (`pg_dump` of every table, wrapped DEKs
//!   included): PANs in the clear, every run of the dump as an AES or HMAC
//!   key, the blind index brute-forced over BIN + last four → 0;
//! * **B. the dump + the front end's credential** (`wrap` + `index`), using
//!   everything it permits: unwrap every DEK, reveal, the blind-index oracle
//!   in batches until keyd's index quota stops it, planting an index key →
//!   0 within the window, with the quota's HMACs per window printed next to
//!   the ~10^5 candidates one PAN needs;
//! * **C. the dump + a stolen `reveal` credential**: reveals until its record
//!   quota stops it → at most the quota, each one named in keyd's audit;
//! * **D. a database writer who edits key records**: reactivates, extends,
//!   resets, relabels and rolls back DEK rows → every edit detected, no seal
//!   under a compromised key.
//!
//! * **E. a write-only front end's whole memory + its configuration + the
//!   dump** (`ingest_frontend`, holding only the scope's HPKE public key):
//!   every readable byte of its process image (`/proc/PID/mem`) searched
//!   for the cards it sealed (ASCII, packed BCD), every 8-aligned 32-byte
//!   window of its writable memory tried as a P-256 private key (the
//!   ingest key, or any ephemeral key of the stored ciphertexts) → 0 PANs
//!   sealed before the dump; a control card typed into it at the time of
//!   the dump is found (the scan works).
//!
//! Then the settlement credential (`unwrap`) opens every card.
//!
//! ```text
//! cargo run --features postgres,keyd-client --example breach_drill -- \
//!     --pg-url postgresql://postgres@127.0.0.1:5432/drill --cards 1000 \
//!     --front-end fe.json --reveal refunds.json --bulk settlement.json \
//!     --custodian root.json --keyd-audit /var/lib/panseal-keyd/audit.log
//! ```
//!
//! Each `*.json` is a client configuration (README "Configuration") naming
//! the keyd credential of that role and the same PostgreSQL key store.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes128Gcm, Aes256Gcm, KeyInit, Nonce, Tag};
use base64::Engine as _;
use clap::Parser;
use hmac::{Hmac, Mac};
use panseal::config::ClientConfig;
use panseal::{
    Access, Context, Error, KeyId, KeyPurpose, KeyRequest, KeyService, KeyServiceError, KeyState,
    KeyStore, Pan, Panseal, PostgresKeyStore, Scope, SealedPan, WrappedDek,
};
use sha2::{Digest, Sha256};

#[derive(Parser)]
#[command(about = "Play each attacker against a panseal deployment and count the PANs recovered")]
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
    /// Client configuration of the front end (keyd `wrap` + `index`).
    #[arg(long)]
    front_end: PathBuf,
    /// Client configuration of a refund tool (keyd `reveal` only).
    #[arg(long)]
    reveal: PathBuf,
    /// Client configuration of the settlement job (keyd `unwrap`).
    #[arg(long)]
    bulk: PathBuf,
    /// Client configuration of a key custodian (keyd `custodian`).
    #[arg(long)]
    custodian: PathBuf,
    /// keyd's audit log, to count the records naming each reveal.
    #[arg(long)]
    keyd_audit: PathBuf,
    /// Longest the attacker spends on the blind-index oracle, in seconds.
    #[arg(long, default_value_t = 20)]
    oracle_seconds: u64,
    /// The `ingest_frontend` example binary: plays attacker E (a write-only
    /// front end's whole memory and configuration, plus the dump).
    #[arg(long)]
    ingest_frontend: Option<PathBuf>,
    /// Client configuration of the write-only front end's own keyd
    /// credential (it may list ingest public keys and nothing else).
    #[arg(long)]
    ingest_credential: Option<PathBuf>,
    /// Cards the write-only front end seals for attacker E.
    #[arg(long, default_value_t = 200)]
    ingest_cards: usize,
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

/// Every Luhn-valid 16-digit PAN with this BIN and last four, in order.
fn candidates(last4: &str) -> Vec<String> {
    let mut out = Vec::with_capacity(100_000);
    for middle in 0..1_000_000u32 {
        let mut digits: Vec<u8> = BIN.bytes().map(|b| b - b'0').collect();
        digits.extend(format!("{middle:06}").bytes().map(|b| b - b'0'));
        digits.extend(last4[..3].bytes().map(|b| b - b'0'));
        if luhn_complete(&digits) != last4.as_bytes()[3] - b'0' {
            continue;
        }
        out.push(
            digits
                .iter()
                .map(|d| char::from(b'0' + d))
                .chain(last4[3..].chars())
                .collect(),
        );
    }
    out
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("breach_drill: an attacker got more than the design allows");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("breach_drill: {e}");
            ExitCode::FAILURE
        }
    }
}

struct Row {
    id: i64,
    sealed: SealedPan,
    index: Vec<u8>,
    last4: String,
}

fn ctx(id: i64) -> Context {
    Context::new("cards", "pan_sealed", id.to_string()).expect("valid context")
}

async fn run(args: Args) -> Result<bool, Box<dyn std::error::Error>> {
    let fe_cfg = ClientConfig::from_file(&args.front_end)?;
    let scope = Scope::new(&fe_cfg.scope)?;
    let custodian = ClientConfig::from_file(&args.custodian)?.keyd_client()?;
    if custodian.index_keys(&scope).await?.is_empty() {
        let info = custodian.create_index_key(&scope).await?;
        println!(
            "custodian created index key v{} of scope {scope} inside keyd",
            info.version
        );
    }
    let front_end = fe_cfg.builder()?.build().await?;
    let store = PostgresKeyStore::connect(&args.pg_url, 2).await?;
    let db = store.pool().get().await?;
    db.batch_execute(
        "DROP TABLE IF EXISTS cards;
         CREATE TABLE cards (id bigint PRIMARY KEY, pan_sealed varchar(64) NOT NULL,
                             pan_index char(64) NOT NULL, pan_index_version int NOT NULL,
                             pan_masked varchar(19) NOT NULL)",
    )
    .await?;
    let mut pans = Vec::with_capacity(args.cards);
    let all: Vec<Pan> = (0..args.cards)
        .map(|i| Pan::parse(&card(i)))
        .collect::<Result<_, _>>()?;
    let indexes = front_end.blind_index_batch(&all).await?;
    for (i, pan) in all.iter().enumerate() {
        let sealed = front_end.seal_pan(pan, &ctx(i as i64)).await?;
        let index = &indexes[i];
        db.execute(
            "INSERT INTO cards VALUES ($1, $2, $3, $4, $5)",
            &[
                &(i as i64),
                &sealed.to_text(),
                &index.to_hex(),
                &(index.version() as i32),
                &pan.masked(),
            ],
        )
        .await?;
        pans.push(pan.expose_digits().to_owned());
    }
    front_end.report_usage().await?;
    println!(
        "filled {} cards through the front end (keyd wrap + index; BIN {BIN}, last four shown)",
        args.cards
    );
    let truth: HashSet<&str> = pans.iter().map(String::as_str).collect();
    let rows: Vec<Row> = db
        .query(
            "SELECT id, pan_sealed, pan_index, pan_masked FROM cards ORDER BY id",
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            let masked: String = r.get(3);
            Row {
                id: r.get(0),
                sealed: SealedPan::from_text(r.get::<_, &str>(1)).expect("stored ciphertext"),
                index: hex::decode(r.get::<_, &str>(2)).expect("stored index"),
                last4: masked[masked.len() - 4..].to_owned(),
            }
        })
        .collect();
    let mut ok = true;

    // ================= A. the database dump alone ======================
    println!("A. the database dump alone");
    let dump = Command::new(&args.pg_dump)
        .arg(&args.pg_url)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", args.pg_dump))?;
    if !dump.status.success() {
        return Err(format!("pg_dump failed: {}", String::from_utf8_lossy(&dump.stderr)).into());
    }
    let dump = dump.stdout;
    println!("  pg_dump of every table: {} bytes", dump.len());
    let mut recovered_a: HashSet<String> = HashSet::new();
    let text = String::from_utf8_lossy(&dump);
    let mut digits_run = String::new();
    for c in text.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_digit() {
            digits_run.push(c);
            continue;
        }
        if (12..=19).contains(&digits_run.len()) && truth.contains(digits_run.as_str()) {
            recovered_a.insert(digits_run.clone());
        }
        digits_run.clear();
    }
    println!(
        "  [A1] PANs in the clear in the dump: {}",
        recovered_a.len()
    );
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
    let samples = &rows[..rows.len().min(3)];
    let (mut tried, mut key_hits, mut hmac_hits) = (0u64, 0u64, 0u64);
    for blob in &blobs {
        for w in blob.windows(32) {
            tried += 1;
            if try_key::<Aes256Gcm>(w, samples) {
                key_hits += 1;
            }
            // Grant the attacker the true PAN: if any run were the index
            // key, its HMAC would match the stored value.
            let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(w)?;
            mac.update(pans[samples[0].id as usize].as_bytes());
            if mac.finalize().into_bytes().as_slice() == samples[0].index.as_slice() {
                hmac_hits += 1;
            }
        }
        for w in blob.windows(16) {
            tried += 1;
            if try_key::<Aes128Gcm>(w, samples) {
                key_hits += 1;
            }
        }
    }
    println!("  [A2] {tried} candidate AES keys from the dump: {key_hits} opened a ciphertext");
    let cands0 = candidates(&samples[0].last4);
    let unkeyed = cands0
        .iter()
        .filter(|c| Sha256::digest(c.as_bytes()).as_slice() == samples[0].index.as_slice())
        .count();
    println!(
        "  [A3] blind index: {} BIN+last-four candidates hashed unkeyed, every dump run tried \
         as HMAC key: {} matches",
        cands0.len(),
        unkeyed as u64 + hmac_hits
    );
    let a_total = recovered_a.len() + key_hits as usize + unkeyed + hmac_hits as usize;
    println!("  attacker A recovered {a_total} PANs");
    ok &= a_total == 0;

    // ========== B. the dump + the front end's credential ================
    println!("B. the dump + the front end's credential (wrap + index), everything it permits");
    let fe_ks = fe_cfg.keyd_client()?;
    let attacker = Access::new("attacker", "exfiltration")?;
    let records = store.list(None).await?;
    let data_records: Vec<&WrappedDek> = records
        .iter()
        .filter(|r| r.purpose == KeyPurpose::Data)
        .collect();
    let mut unwrapped = 0;
    for r in &data_records {
        if fe_ks
            .unwrap(&r.key_request(), &r.wrapped, &attacker)
            .await
            .is_ok()
        {
            unwrapped += 1;
        }
    }
    println!(
        "  [B1] unwrap every DEK: {unwrapped} of {} unwrapped",
        data_records.len()
    );
    let mut revealed_b = 0;
    for row in rows.iter().take(20) {
        if let Some(rec) = data_records.iter().find(|r| r.id == row.sealed.key_id()) {
            let req = panseal::RevealRequest {
                record: rec,
                sealed: &row.sealed,
                context: &ctx(row.id),
            };
            if fe_ks.reveal(&req, &attacker).await.is_ok() {
                revealed_b += 1;
            }
        }
    }
    println!("  [B2] reveal 20 records: {revealed_b} revealed");
    // Plant an index key: create one through the wrap credential, and put
    // a row of our own in the key table.
    let plant_req = KeyRequest {
        id: KeyId::random(),
        scope: scope.clone(),
        environment: front_end.environment().clone(),
        purpose: KeyPurpose::Index,
    };
    let planted_by_service = fe_ks.generate(&plant_req).await.is_ok();
    let before = front_end.blind_index(&Pan::parse(&pans[1])?).await?;
    if let Some(mut forged) = data_records.first().map(|r| (*r).clone()) {
        forged.id = plant_req.id;
        forged.purpose = KeyPurpose::Index;
        forged.version = 99;
        let _ = db
            .execute(
                "INSERT INTO panseal_keys (id, scope, purpose, state, kek_id, kek_version, record)
                 VALUES ($1, $2, 2, 1, $3, $4, $5)",
                &[
                    &forged.id.as_bytes().as_slice(),
                    &scope.as_str(),
                    &forged.wrapped.kek.id,
                    &i64::from(forged.wrapped.kek.version),
                    &forged.to_bytes(),
                ],
            )
            .await;
    }
    let fresh_front_end = fe_cfg.builder()?.build().await?;
    let after = fresh_front_end.blind_index(&Pan::parse(&pans[1])?).await?;
    println!(
        "  [B3] plant an index key: through keyd {}; a row in the key table changed the index \
         values: {}",
        if planted_by_service {
            "CREATED"
        } else {
            "refused"
        },
        if before == after { "no" } else { "YES" }
    );
    // The oracle: hash the BIN + last-four candidates of row 0 in batches
    // until the index quota (or the time budget) stops the attacker.
    let target = &rows[0];
    let cands = candidates(&target.last4);
    let true_pos = cands
        .iter()
        .position(|c| c == &pans[target.id as usize])
        .expect("the true PAN is a candidate");
    let active = fe_ks
        .index_keys(&scope)
        .await?
        .into_iter()
        .find(|k| k.state == KeyState::Active)
        .ok_or("no active index key")?;
    let deadline = Instant::now() + Duration::from_secs(args.oracle_seconds);
    // Batches of 1,000; when the quota refuses one, the attacker halves the
    // batch to take every last HMAC the window still allows.
    let (mut granted, mut recovered_b, mut quota_hit) = (0usize, 0usize, false);
    let (mut next, mut size) = (0usize, 1000usize);
    while next < cands.len() && Instant::now() < deadline {
        let chunk = &cands[next..(next + size).min(cands.len())];
        let batch: Vec<Pan> = chunk
            .iter()
            .map(|c| Pan::parse(c))
            .collect::<Result<_, _>>()?;
        let refs: Vec<&Pan> = batch.iter().collect();
        match fe_ks
            .blind_index(&scope, &[active.version], &refs, &attacker)
            .await
        {
            Ok(values) => {
                granted += values.len();
                next += chunk.len();
                recovered_b += values
                    .iter()
                    .filter(|v| v.as_slice() == target.index.as_slice())
                    .count();
            }
            Err(KeyServiceError::QuotaExceeded(_)) if size > 1 => size /= 2,
            Err(KeyServiceError::QuotaExceeded(_)) => {
                quota_hit = true;
                break;
            }
            Err(e) => return Err(e.into()),
        }
    }
    println!(
        "  [B4] blind-index oracle: keyd granted {granted} HMACs this window{}; one PAN has {} \
         candidates (this one is #{}); PANs recovered: {recovered_b}",
        if quota_hit {
            " (then the index quota refused)"
        } else {
            " (time budget spent)"
        },
        cands.len(),
        true_pos + 1
    );
    if granted > 0 {
        println!(
            "       at that rate this PAN needs {} windows; the average PAN {}",
            (true_pos + 1).div_ceil(granted),
            cands.len().div_ceil(2 * granted)
        );
    }
    let held = front_end_index_keys(&front_end);
    println!("  [B5] index keys in the front end's memory: {held}");
    let b_total = unwrapped + revealed_b + recovered_b + usize::from(planted_by_service);
    println!("  attacker B recovered {b_total} PANs");
    ok &= b_total == 0 && before == after && held == 0;

    // ============== C. the dump + a stolen reveal credential =============
    println!("C. the dump + a stolen reveal credential");
    let reveal_tool = ClientConfig::from_file(&args.reveal)?
        .builder()?
        .build()
        .await?;
    let audit_before = std::fs::read_to_string(&args.keyd_audit)?.lines().count();
    let mut revealed: Vec<i64> = Vec::new();
    let mut refused_by_quota = false;
    for row in &rows {
        match reveal_tool
            .open_pan(&row.sealed, &ctx(row.id), &attacker)
            .await
        {
            Ok(opened) => {
                if opened.pan.expose_digits() == pans[row.id as usize] {
                    revealed.push(row.id);
                }
            }
            Err(Error::KeyService(KeyServiceError::QuotaExceeded(_))) => {
                refused_by_quota = true;
                break;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let audit = std::fs::read_to_string(&args.keyd_audit)?;
    let new_lines: Vec<&str> = audit.lines().skip(audit_before).collect();
    let named = revealed
        .iter()
        .filter(|id| {
            new_lines.iter().any(|l| {
                let l = l.replace("\\\"", "\"").replace(": ", ":");
                l.contains("\"operation\":\"reveal\"")
                    && l.contains("\"outcome\":\"success\"")
                    && l.contains(&format!("\"row_key\":\"{id}\""))
                    && l.contains("\"on_behalf_of\":\"attacker\"")
            })
        })
        .count();
    let pan_in_audit = truth.iter().filter(|p| audit.contains(*p)).count();
    println!(
        "  [C1] reveal every row: {} PANs revealed, then {}",
        revealed.len(),
        if refused_by_quota {
            "the record quota refused"
        } else {
            "no refusal (NO QUOTA)"
        }
    );
    println!(
        "  [C2] keyd audit names {named} of {} revealed records (principal, on-behalf-of, \
         purpose, context); PANs in keyd's audit log: {pan_in_audit}",
        revealed.len()
    );
    println!(
        "  attacker C recovered {} PANs (its record quota per window)",
        revealed.len()
    );
    ok &= refused_by_quota && named == revealed.len() && pan_in_audit == 0;

    // ========== D. a database writer who edits key records ===============
    println!("D. a database writer who edits key records");
    let bulk = ClientConfig::from_file(&args.bulk)?
        .builder()?
        .build()
        .await?;
    let settle = Access::new("settlement-job", "settlement")?;
    let victim = store
        .fetch(rows[0].sealed.key_id())
        .await?
        .ok_or("the DEK record of row 0")?;
    let original: Vec<u8> = victim.to_bytes();
    let mut edits: Vec<(&str, WrappedDek)> = Vec::new();
    {
        let mut e = victim.clone();
        e.encrypt_until += 10 * 365 * 86_400;
        e.decrypt_until += 10 * 365 * 86_400;
        edits.push(("extend encrypt/decrypt period", e));
        let mut e = victim.clone();
        e.uses = 0;
        edits.push(("reset use count", e));
        let mut e = victim.clone();
        e.max_uses = u64::MAX;
        edits.push(("raise use budget", e));
        let mut e = victim.clone();
        e.version = 7;
        edits.push(("relabel version", e));
        let mut e = victim.clone();
        e.purpose = KeyPurpose::Index;
        edits.push(("relabel purpose", e));
    }
    let mut detected = 0;
    let total_edits = edits.len() + 2;
    for (what, edited) in &edits {
        write_record(&db, edited).await?;
        // What the next reader gets from the store: the service's verdict
        // on it, and whether a fresh settlement process still opens.
        let read_back = store.fetch(victim.id).await?.ok_or("edited record")?;
        let refused = fe_ks.verify_record(&read_back).await.is_err();
        let caught = refused && bulk_cannot_use(&args.bulk, &rows[0], &settle).await;
        println!(
            "  [D] {what}: {}",
            if caught { "detected" } else { "ACCEPTED" }
        );
        detected += usize::from(caught);
        db.execute(
            "UPDATE panseal_keys SET record = $2 WHERE id = $1",
            &[&victim.id.as_bytes().as_slice(), &original],
        )
        .await?;
    }
    // Reactivation and rollback: a custodian marks a front-end instance's
    // active DEK compromised (a second instance, so the cards above stay
    // under a healthy key); the writer puts the earlier (validly signed)
    // active row back, and the instance keeps sealing.
    let cust_ps = ClientConfig::from_file(&args.custodian)?
        .builder()?
        .build()
        .await?;
    let probe = fresh_front_end
        .seal_pan(&Pan::parse(&pans[2])?, &ctx(1_000_000))
        .await?;
    let active_id = probe.key_id();
    fresh_front_end.report_usage().await?;
    let before_compromise = store.fetch(active_id).await?.ok_or("active DEK record")?;
    cust_ps
        .set_key_state(active_id, KeyState::Compromised)
        .await?;
    let compromised = store.fetch(active_id).await?.ok_or("active DEK record")?;
    let mut reactivated = compromised.clone();
    reactivated.state = KeyState::Active;
    for (what, row) in [
        ("reactivate a compromised DEK", &reactivated),
        ("roll back to the earlier signed row", &before_compromise),
    ] {
        write_record(&db, row).await?;
        let verdict = fe_ks.verify_record(row).await;
        // The front end re-checks its active DEK at least every recheck
        // interval (the drill's configuration sets it short).
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let mut under_compromised = 0;
        for i in 0..50 {
            let s = fresh_front_end
                .seal_pan(&Pan::parse(&pans[3])?, &ctx(2_000_000 + i))
                .await;
            if s.is_ok_and(|s| s.key_id() == active_id) {
                under_compromised += 1;
            }
        }
        let caught = verdict.is_err() && under_compromised == 0;
        println!(
            "  [D] {what}: {} ({under_compromised} of 50 new seals under the compromised DEK)",
            if caught { "detected" } else { "ACCEPTED" }
        );
        detected += usize::from(caught);
        write_record(&db, &compromised).await?;
    }
    println!("  attacker D: {detected} of {total_edits} edits detected");
    ok &= detected == total_edits;

    // ====== E. a write-only front end's memory + configuration + dump ======
    if let Some(frontend_bin) = &args.ingest_frontend {
        ok &= attacker_e(
            &args,
            frontend_bin,
            &scope,
            &custodian,
            &fe_ks,
            &db,
            &bulk,
            &settle,
        )
        .await?;
    }

    // ================ the right credential opens everything ================
    let mut opened = 0;
    for row in &rows {
        let pan = bulk.open_pan(&row.sealed, &ctx(row.id), &settle).await?.pan;
        if pan.expose_digits() == pans[row.id as usize] {
            opened += 1;
        }
    }
    println!(
        "settlement with the unwrap credential opened {opened} of {} cards",
        rows.len()
    );
    ok &= opened == rows.len();
    Ok(ok)
}

/// How many index keys the front end holds in the clear (0 since the keyed
/// hash moved into the key service).
fn front_end_index_keys(front_end: &Panseal) -> usize {
    #[cfg(feature = "hazmat-test-keys")]
    {
        front_end.held_keys_for_test().1
    }
    #[cfg(not(feature = "hazmat-test-keys"))]
    {
        let _ = front_end;
        0
    }
}

/// The database writer's edit: the record blob and the state column.
async fn write_record(
    db: &deadpool_postgres::Object,
    r: &WrappedDek,
) -> Result<(), Box<dyn std::error::Error>> {
    db.execute(
        "UPDATE panseal_keys SET record = $2, state = $3 WHERE id = $1",
        &[
            &r.id.as_bytes().as_slice(),
            &r.to_bytes(),
            &i16::from(r.state as u8),
        ],
    )
    .await?;
    Ok(())
}

/// Whether a fresh settlement process (empty key cache) refuses to open
/// `row` after its DEK's record was edited: it must never use an edited
/// record.
async fn bulk_cannot_use(bulk_config: &std::path::Path, row: &Row, access: &Access) -> bool {
    let Ok(cfg) = ClientConfig::from_file(bulk_config) else {
        return false;
    };
    let Ok(builder) = cfg.builder() else {
        return false;
    };
    let Ok(fresh) = builder.build().await else {
        return false;
    };
    fresh
        .open_pan(&row.sealed, &ctx(row.id), access)
        .await
        .is_err()
}

/// Whether `key` (as a key of cipher `C`) opens any sample ciphertext.
fn try_key<C>(key: &[u8], samples: &[Row]) -> bool
where
    C: KeyInit
        + AeadInPlace<NonceSize = aes_gcm::aead::consts::U12, TagSize = aes_gcm::aead::consts::U16>,
{
    let Ok(cipher) = C::new_from_slice(key) else {
        return false;
    };
    samples.iter().any(|row| {
        let b = row.sealed.as_bytes();
        let mut aad = b[..10].to_vec();
        aad.extend_from_slice(ctx(row.id).encoded());
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

/// Attacker E: everything in a write-only front end's memory and its
/// configuration, plus the database dump. Returns whether it recovered no
/// card sealed before the dump (and the back office still opens them all).
#[allow(clippy::too_many_arguments)]
async fn attacker_e(
    args: &Args,
    frontend_bin: &std::path::Path,
    scope: &Scope,
    custodian: &panseal::RemoteKeyService,
    fe_ks: &panseal::RemoteKeyService,
    db: &deadpool_postgres::Object,
    bulk: &Panseal,
    settle: &Access,
) -> Result<bool, Box<dyn std::error::Error>> {
    use std::io::{BufRead, BufReader, Write};
    println!("E. a write-only front end's whole memory + its configuration + the dump");
    if custodian.ingest_keys(scope).await?.is_empty() {
        let info = custodian.create_ingest_key(scope).await?;
        println!(
            "  custodian created ingest key v{} of scope {scope} inside keyd",
            info.public_key.version()
        );
    }
    // The front end is configured with the public key it fetched (any
    // credential may list it) and pinned: its whole configuration.
    let keys = fe_ks.ingest_keys(scope).await?;
    let active = keys
        .iter()
        .find(|k| k.state == KeyState::Active)
        .ok_or("no active ingest key")?;
    let public_key = active.public_key.clone();
    let config_dir = args
        .front_end
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    let config_path = config_dir.join("ingest-frontend.pub");
    std::fs::write(&config_path, public_key.to_text())?;
    let mut child = Command::new(frontend_bin)
        .arg("--public-key-file")
        .arg(&config_path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", frontend_bin.display()))?;
    let pid = child.id();
    let mut to_fe = child.stdin.take().ok_or("front end stdin")?;
    let mut from_fe = BufReader::new(child.stdout.take().ok_or("front end stdout")?);
    db.batch_execute(
        "DROP TABLE IF EXISTS orders;
         CREATE TABLE orders (id varchar(32) PRIMARY KEY, card varchar(140) NOT NULL)",
    )
    .await?;
    let pans: Vec<String> = (0..args.ingest_cards).map(|i| card(500_000 + i)).collect();
    let mut stored = Vec::with_capacity(pans.len());
    for (i, pan) in pans.iter().enumerate() {
        writeln!(to_fe, "o{i} {pan}")?;
        to_fe.flush()?;
        let mut answer = String::new();
        from_fe.read_line(&mut answer)?;
        let (order, text) = answer
            .trim_end()
            .split_once(' ')
            .ok_or("front end answer")?;
        let sealed = panseal::IngestSealed::from_text(text)
            .map_err(|e| format!("front end answered no ciphertext for {order}: {e}"))?;
        db.execute(
            "INSERT INTO orders VALUES ($1, $2)",
            &[&order, &sealed.to_text()],
        )
        .await?;
        stored.push((order.to_owned(), sealed));
    }
    println!(
        "  the front end sealed {} cards with the public key alone ({} characters each)",
        stored.len(),
        panseal::INGEST_TEXT_LEN
    );
    writeln!(to_fe, "PAUSE")?;
    to_fe.flush()?;
    let mut paused = String::new();
    from_fe.read_line(&mut paused)?;
    if paused.trim_end() != "PAUSED" {
        return Err("front end did not pause".into());
    }
    let image = read_process_memory(pid)?;
    let readable: usize = image.iter().map(|r| r.bytes.len()).sum();
    let writable: usize = image
        .iter()
        .filter(|r| r.writable)
        .map(|r| r.bytes.len())
        .sum();
    println!(
        "  [E0] read the front end's process image: {} regions, {readable} bytes \
         ({writable} writable)",
        image.len()
    );
    let truth: HashSet<&str> = pans.iter().map(String::as_str).collect();
    let ascii =
        image
            .iter()
            .map(|r| digit_runs(&r.bytes, &truth))
            .fold(HashSet::new(), |mut acc, s| {
                acc.extend(s);
                acc
            });
    println!(
        "  [E1] cards sealed before the dump found in its memory as ASCII digits: {}",
        ascii.len()
    );
    let packed: std::collections::HashMap<[u8; 10], &str> =
        pans.iter().map(|p| (bcd(p), p.as_str())).collect();
    let mut bcd_found: HashSet<String> = HashSet::new();
    for r in image.iter().filter(|r| r.writable) {
        for w in r.bytes.windows(10) {
            if w[0] != 0 {
                if let Some(p) = <[u8; 10]>::try_from(w).ok().and_then(|k| packed.get(&k)) {
                    bcd_found.insert((*p).to_owned());
                }
            }
        }
    }
    println!(
        "  [E2] cards found in its writable memory packed as BCD: {}",
        bcd_found.len()
    );
    // Every 8-aligned 32-byte window as a P-256 scalar: the ingest private
    // key would open every card; an ephemeral key, the one card it sealed.
    let mut targets: HashSet<Vec<u8>> = stored
        .iter()
        .map(|(_, s)| s.as_bytes()[10..75].to_vec())
        .collect();
    targets.insert(public_key.as_bytes().to_vec());
    let env = public_key.environment().clone();
    let started = Instant::now();
    let writable_regions: Vec<&[u8]> = image
        .iter()
        .filter(|r| r.writable)
        .map(|r| r.bytes.as_slice())
        .collect();
    let (tried, scalar_hits) = scalar_scan(&writable_regions, &targets, &env, scope);
    println!(
        "  [E3] {tried} distinct 32-byte windows of its writable memory tried as P-256 private \
         keys, big- and little-endian ({} s): {scalar_hits} matched the ingest key or an \
         ephemeral key",
        started.elapsed().as_secs()
    );
    // Controls for E2 and E3: the same scanners find a planted private key
    // (both byte orders) and a planted packed card in a synthetic region.
    let planted = panseal::hazmat::IngestPrivateKey::generate(&env, scope, 1);
    let mut region = vec![0x5Au8; 4096];
    region[1024..1056].copy_from_slice(&planted.to_scalar()[..]);
    let mut le = *planted.to_scalar();
    le.reverse();
    region[2048..2080].copy_from_slice(&le);
    region[3001..3011].copy_from_slice(&bcd(&pans[0]));
    let planted_targets: HashSet<Vec<u8>> = [planted.public_key().as_bytes().to_vec()]
        .into_iter()
        .collect();
    let (_, planted_hits) = scalar_scan(&[region.as_slice()], &planted_targets, &env, scope);
    let planted_bcd = region
        .windows(10)
        .filter(|w| <[u8; 10]>::try_from(*w).is_ok_and(|k| packed.contains_key(&k)))
        .count();
    println!(
        "  [E3c] control: planted private keys found {planted_hits} of 2, planted packed card \
         found {planted_bcd} of 1"
    );
    let config = std::fs::read(&config_path)?;
    let in_config = digit_runs(&config, &truth).len();
    println!("  [E4] cards in its configuration (the public key): {in_config}");
    let dump = Command::new(&args.pg_dump).arg(&args.pg_url).output()?;
    let in_dump = digit_runs(&dump.stdout, &truth).len();
    println!("  [E5] cards in the clear in the dump (orders table included): {in_dump}");
    // The front end's own credential, used for everything it may ask.
    let mut by_credential = 0usize;
    if let Some(cred) = &args.ingest_credential {
        let ks = ClientConfig::from_file(cred)?.keyd_client()?;
        let attacker = Access::new("attacker", "exfiltration")?;
        let contexts: Vec<Context> = stored
            .iter()
            .map(|(o, _)| Context::new("orders", "card", o.as_str()))
            .collect::<Result<_, _>>()?;
        let mut opened_by_fe = 0usize;
        for ((_, sealed), ctx) in stored.iter().zip(&contexts).take(50) {
            let req = panseal::IngestOpenRequest {
                scope,
                sealed,
                context: ctx,
            };
            if ks.open_ingest(&req, &attacker).await.is_ok() {
                opened_by_fe += 1;
            }
        }
        // Admission would need a DEK record; the front end asks for one.
        let request = KeyRequest {
            id: KeyId::random(),
            scope: scope.clone(),
            environment: env.clone(),
            purpose: KeyPurpose::Data,
        };
        let got_dek = ks.generate_wrapped(&request).await.is_ok() as usize;
        let unwrapped = ks.generate(&request).await.is_ok() as usize;
        println!(
            "  [E7] the front end's own credential: {opened_by_fe} of 50 ingest ciphertexts \
             opened through keyd, {got_dek} admission DEKs made, {unwrapped} plaintext DEKs"
        );
        by_credential = opened_by_fe + unwrapped;
    }
    // Distinct cards: a card found both as digits and packed counts once.
    let mut cards_found: HashSet<String> = ascii.clone();
    cards_found.extend(bcd_found.iter().cloned());
    let e_total = cards_found.len()
        + if scalar_hits > 0 { stored.len() } else { 0 }
        + in_config
        + in_dump
        + by_credential;
    println!("  attacker E recovered {e_total} PANs sealed before the dump");
    // Control: a card being typed at the moment of the dump (half a line
    // read) is in memory, and the same scan finds it: cards typed after a
    // compromise are the front end's to lose, by design.
    let control = card(900_000);
    write!(to_fe, "ctl {control}")?;
    to_fe.flush()?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let control_image = read_process_memory(pid)?;
    let control_truth: HashSet<&str> = [control.as_str()].into_iter().collect();
    let control_found = control_image
        .iter()
        .any(|r| !digit_runs(&r.bytes, &control_truth).is_empty());
    println!(
        "  [E6] control: a card being typed at the dump found by the same scan: {}",
        if control_found { "yes" } else { "no" }
    );
    writeln!(to_fe)?;
    drop(to_fe);
    let _ = child.wait();
    // The back office opens every stored card through keyd.
    let mut opened = 0;
    for (i, (order, sealed)) in stored.iter().enumerate() {
        let ctx = Context::new("orders", "card", order.as_str())?;
        let got = bulk.open_pan(sealed, &ctx, settle).await?;
        if got.pan.expose_digits() == pans[i] && got.needs_reseal {
            opened += 1;
        }
    }
    println!(
        "  the back office (unwrap credential, through keyd) opened {opened} of {} ingest \
         ciphertexts",
        stored.len()
    );
    Ok(e_total == 0
        && control_found
        && planted_hits == 2
        && planted_bcd == 1
        && opened == stored.len())
}

struct Region {
    writable: bool,
    bytes: Vec<u8>,
}

/// Every readable mapping of process `pid` (`/proc/PID/maps` + `/proc/PID/mem`).
fn read_process_memory(pid: u32) -> Result<Vec<Region>, Box<dyn std::error::Error>> {
    use std::io::{Read, Seek, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem"))?;
    let mut out = Vec::new();
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        let name = line.split_whitespace().nth(5).unwrap_or("");
        if !perms.starts_with('r') || name == "[vvar]" || name == "[vsyscall]" {
            continue;
        }
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (a, b) = (u64::from_str_radix(a, 16)?, u64::from_str_radix(b, 16)?);
        let mut bytes = vec![0u8; (b - a) as usize];
        if mem.seek(SeekFrom::Start(a)).is_err() || mem.read_exact(&mut bytes).is_err() {
            continue;
        }
        out.push(Region {
            writable: perms.as_bytes().get(1) == Some(&b'w'),
            bytes,
        });
    }
    Ok(out)
}

/// The cards of `truth` that appear in `bytes` as a run of ASCII digits
/// (spaces and dashes between digits allowed, as typed).
fn digit_runs(bytes: &[u8], truth: &HashSet<&str>) -> HashSet<String> {
    let mut found = HashSet::new();
    let mut run = String::new();
    for &b in bytes.iter().chain(std::iter::once(&b'.')) {
        if b.is_ascii_digit() {
            run.push(char::from(b));
            if run.len() > 19 {
                run.remove(0);
            }
            for len in 12..=run.len() {
                let tail = &run[run.len() - len..];
                if truth.contains(tail) {
                    found.insert(tail.to_owned());
                }
            }
            continue;
        }
        if b == b' ' || b == b'-' {
            continue;
        }
        run.clear();
    }
    found
}

/// A card packed as the ciphertexts pack it (BCD, 0xF padding).
fn bcd(pan: &str) -> [u8; 10] {
    let mut out = [0xFFu8; 10];
    for (byte, pair) in out.iter_mut().zip(pan.as_bytes().chunks(2)) {
        let hi = pair[0] - b'0';
        let lo = pair.get(1).map_or(0x0F, |d| d - b'0');
        *byte = (hi << 4) | lo;
    }
    out
}

/// Every distinct 8-aligned 32-byte window of `regions`, read as a P-256
/// scalar big-endian and little-endian (p256 keeps scalars as
/// little-endian limbs), against `targets` (public keys): (tried, hits).
fn scalar_scan(
    regions: &[&[u8]],
    targets: &HashSet<Vec<u8>>,
    env: &panseal::Environment,
    scope: &Scope,
) -> (u64, u64) {
    let (mut tried, mut hits) = (0u64, 0u64);
    let mut seen = HashSet::new();
    for bytes in regions {
        for w in bytes.chunks_exact(8).collect::<Vec<_>>().windows(4) {
            let mut cand = [0u8; 32];
            for (i, part) in w.iter().enumerate() {
                cand[i * 8..i * 8 + 8].copy_from_slice(part);
            }
            if cand.iter().filter(|&&b| b == 0).count() > 8 || !seen.insert(cand) {
                continue;
            }
            let mut rev = cand;
            rev.reverse();
            for c in [cand, rev] {
                tried += 1;
                if let Ok(k) = panseal::hazmat::IngestPrivateKey::from_scalar(env, scope, 1, &c) {
                    if targets.contains(k.public_key().as_bytes().as_slice()) {
                        hits += 1;
                    }
                }
            }
        }
    }
    (tried, hits)
}
