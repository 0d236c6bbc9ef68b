//! `ingest_frontend` — a write-only front end: it holds a scope's ingest
//! public key and nothing else (no key service, no credential, no key
//! store), reads `order-id PAN` lines on standard input and answers
//! `order-id ciphertext` lines (the 134-character ingest text form, bound to
//! the context `orders` / `card` / order id).
//!
//! ```text
//! cargo run --example ingest_frontend -- --public-key-file ingest.pub
//! ```
//!
//! `ingest.pub` holds the public key's text form (`PIK1/…`), as printed by
//! `panseal-keyd custodian ingest-list` or fetched from keyd
//! (`KeyService::ingest_keys`). A line `PAUSE` makes it answer `PAUSED` and
//! go on reading: the breach drill reads its whole memory at that point.
//!
//! Standard input is read straight from the file descriptor into a buffer
//! that is wiped after every line (`std::io::stdin()` keeps its own 8 KiB
//! buffer, which would keep the last cards typed in memory).

use std::fs::File;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use panseal::{Context, IngestPublicKey, IngestSealer, Pan};
use zeroize::Zeroizing;

#[derive(Parser)]
#[command(about = "A write-only front end: seals PANs with an ingest public key")]
struct Args {
    /// File holding the ingest public key's text form.
    #[arg(long)]
    public_key_file: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let text = match std::fs::read_to_string(&args.public_key_file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("ingest_frontend: {}: {e}", args.public_key_file.display());
            return ExitCode::FAILURE;
        }
    };
    let sealer = match IngestPublicKey::from_text(&text) {
        Ok(key) => IngestSealer::new(key),
        Err(e) => {
            eprintln!("ingest_frontend: public key: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The same pipe as standard input, without std's buffer.
    let mut input = match File::open("/dev/stdin") {
        Ok(f) => f,
        Err(e) => {
            eprintln!("ingest_frontend: /dev/stdin: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout().lock();
    let mut line = Zeroizing::new(Vec::<u8>::with_capacity(256));
    let mut byte = Zeroizing::new([0u8; 1]);
    loop {
        line.clear();
        // One byte per read: nothing beyond the current line is ever read
        // into this process.
        loop {
            match input.read(&mut byte[..]) {
                Ok(0) => return ExitCode::SUCCESS,
                Ok(_) if byte[0] == b'\n' => break,
                Ok(_) if line.len() < 255 => line.push(byte[0]),
                Ok(_) => {}
                Err(e) => {
                    eprintln!("ingest_frontend: stdin: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        byte[0] = 0;
        if line.as_slice() == b"PAUSE" {
            let _ = writeln!(out, "PAUSED");
            let _ = out.flush();
            continue;
        }
        let answer = seal_line(&sealer, &line);
        line.iter_mut().for_each(|b| *b = 0);
        scrub_stack();
        let _ = writeln!(out, "{answer}");
        let _ = out.flush();
    }
}

/// `order-id PAN` → `order-id ciphertext`, or `order-id ERROR reason`
/// (never the PAN).
fn seal_line(sealer: &IngestSealer, line: &[u8]) -> String {
    let Ok(line) = std::str::from_utf8(line) else {
        return "- ERROR not UTF-8".into();
    };
    let Some((order, pan)) = line.split_once(' ') else {
        return "- ERROR expected `order-id PAN`".into();
    };
    let ctx = match Context::new("orders", "card", order) {
        Ok(c) => c,
        Err(e) => return format!("- ERROR context: {e}"),
    };
    let pan = match Pan::parse(pan) {
        Ok(p) => p,
        Err(e) => return format!("{order} ERROR {e}"),
    };
    match sealer.seal(&pan, &ctx) {
        Ok(s) => format!("{order} {}", s.to_text()),
        Err(e) => format!("{order} ERROR {e}"),
    }
}

/// Overwrites the stack below this frame: moves of a `Pan`, the packed PAN
/// and HPKE's ephemeral secrets leave copies in stack slots that a later
/// call may not reuse; a memory dump would find the last card there.
#[inline(never)]
fn scrub_stack() {
    use zeroize::Zeroize;
    let mut area = [0xA5u8; 64 * 1024];
    area.zeroize();
    std::hint::black_box(&area);
}
