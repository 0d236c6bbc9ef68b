//! Seals and opens a PAN through `panseal-keyd dev` with the client
//! configuration it wrote (README, "Try it: `panseal-keyd dev`"):
//!
//! ```text
//! target/debug/examples/keyd_dev keyd-dev/client.json
//! ```
use panseal::config::ClientConfig;
use panseal::{blocking, Access, Context, Pan};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "keyd-dev/client.json".to_owned());
    // readme:begin keyd-dev
    let config = ClientConfig::from_file(&path)?; // written by `panseal-keyd dev`
    let panseal = blocking::Panseal::build(config.builder()?)?;
    let pan = Pan::parse("4111 1111 1111 1111")?;
    let row = Context::new("cards", "pan", "card-1001")?;
    let sealed = panseal.seal_pan(&pan, &row)?; // the DEK is wrapped by keyd
    let opened = panseal.open_pan(&sealed, &row, &Access::new("clerk-7", "refund")?)?;
    assert_eq!(opened.pan, pan);
    println!("sealed through keyd: {sealed}\nopened: {}", opened.pan);
    // readme:end keyd-dev
    Ok(())
}
