//! Shared plumbing of the custodian tools: configuration, confirmation.

use std::io::{BufRead, Write};

use panseal::config::{ClientConfig, KeyStoreConfig};
use panseal::PostgresKeyStore;

/// The configuration and the PostgreSQL store it names.
pub fn load(
    path: &std::path::Path,
) -> Result<(ClientConfig, PostgresKeyStore), Box<dyn std::error::Error>> {
    let config = ClientConfig::from_file(path)?;
    let KeyStoreConfig::Postgres { url, .. } = &config.key_store else {
        return Err("the configuration must name a PostgreSQL key store".into());
    };
    let store = PostgresKeyStore::new(url, 4)?;
    Ok((config, store))
}

/// Asks for "yes" on standard input unless `yes` is set.
pub fn confirm(yes: bool, what: &str) -> Result<(), Box<dyn std::error::Error>> {
    if yes {
        return Ok(());
    }
    print!("{what} — type 'yes' to proceed: ");
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    if line.trim() == "yes" {
        Ok(())
    } else {
        Err("not confirmed; nothing changed".into())
    }
}

/// Unix seconds as an ISO-8601 date (UTC).
pub fn date(unix: u64) -> String {
    if unix >= 253_402_300_799 {
        return "never".into();
    }
    let days = unix / 86_400;
    // Civil-from-days (Howard Hinnant).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    format!("{:04}-{:02}-{:02}", if m <= 2 { y + 1 } else { y }, m, d)
}
