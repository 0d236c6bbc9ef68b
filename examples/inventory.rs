//! `inventory` — the key inventory (PCI DSS 3.6.1.1): every DEK and index
//! key with algorithm, strength, dates, state, scope, use counts and how
//! many stored fields still reference it, as a table or as JSON.
//!
//! ```text
//! cargo run --features postgres --example inventory -- --config panseal.json \
//!     [--register sealed-text:cards.pan] [--register index:cards.pan_index:pan_index_version] [--json]
//!     [--upgrade-records]
//! ```
//!
//! `--upgrade-records` (a custodian's configuration) first has the key
//! service sign every version-1 (unsigned) key record as it stands, the
//! documented upgrade step to record version 2 (`FORMAT.md` §9.1).

#[path = "common/tool.rs"]
#[allow(dead_code)]
mod tool;

use std::process::ExitCode;

use clap::Parser;
use panseal::RegisteredColumn;

#[derive(Parser)]
#[command(about = "Print the key inventory with reference counts")]
struct Args {
    /// Client configuration (JSON) naming the PostgreSQL key store.
    #[arg(long)]
    config: std::path::PathBuf,
    /// Register a column first: `sealed-text:TABLE.COLUMN`,
    /// `sealed-binary:TABLE.COLUMN` or `index:TABLE.COLUMN:VERSION_COLUMN`.
    #[arg(long)]
    register: Vec<String>,
    /// JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Sign every version-1 key record first (needs a custodian
    /// credential in the configuration's key service).
    #[arg(long)]
    upgrade_records: bool,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("inventory: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse_register(s: &str) -> Result<RegisteredColumn, Box<dyn std::error::Error>> {
    let (kind, rest) = s.split_once(':').ok_or("expected KIND:TABLE.COLUMN")?;
    let mut parts = rest.split(':');
    let (table, column) = parts
        .next()
        .and_then(|tc| tc.split_once('.'))
        .ok_or("expected TABLE.COLUMN")?;
    let (table, column) = (table.to_owned(), column.to_owned());
    Ok(match kind {
        "sealed-text" => RegisteredColumn::SealedText { table, column },
        "sealed-binary" => RegisteredColumn::SealedBinary { table, column },
        "index" => RegisteredColumn::BlindIndex {
            table,
            column,
            version_column: parts
                .next()
                .ok_or("index needs :VERSION_COLUMN")?
                .to_owned(),
        },
        _ => return Err(format!("unknown column kind {kind}").into()),
    })
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let (config, store) = tool::load(&args.config)?;
    if args.upgrade_records {
        let panseal = config.connect().await?.build().await?;
        let n = panseal.upgrade_records().await?;
        eprintln!("signed {n} version-1 key record(s); records are now version 2");
    }
    for r in &args.register {
        store.register_column(parse_register(r)?).await?;
    }
    let inv = store.inventory().await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&inv)?);
        return Ok(());
    }
    println!(
        "counted columns: {}",
        if inv.columns.is_empty() {
            "none registered".into()
        } else {
            inv.columns.join(", ")
        }
    );
    println!(
        "{:<16} {:<5} {:>3} {:<13} {:<14} {:<12} {:>4} {:<10} {:<10} {:<10} {:>12} {:>10}",
        "key id",
        "kind",
        "ver",
        "scope",
        "state",
        "algorithm",
        "bits",
        "created",
        "enc-until",
        "dec-until",
        "uses",
        "refs"
    );
    for k in &inv.keys {
        println!(
            "{:<16} {:<5} {:>3} {:<13} {:<14} {:<12} {:>4} {:<10} {:<10} {:<10} {:>12} {:>10}",
            k.id.to_string(),
            match k.purpose {
                panseal::KeyPurpose::Data => "DEK",
                _ => "index",
            },
            k.version,
            k.scope,
            format!("{:?}", k.state),
            k.algorithm,
            k.strength_bits,
            tool::date(k.created_at),
            tool::date(k.encrypt_until),
            tool::date(k.decrypt_until),
            k.uses,
            k.references
        );
    }
    Ok(())
}
