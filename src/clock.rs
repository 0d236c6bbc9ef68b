//! Cheap clocks for the seal/open hot paths.
//!
//! On Linux these read `CLOCK_REALTIME_COARSE` / `CLOCK_MONOTONIC_COARSE`
//! (one vDSO read, no TSC read: a few nanoseconds instead of ~25), with the
//! kernel tick as resolution (1–4 ms). That is ample for key deadlines
//! measured in seconds and days and for audit timestamps; elsewhere they
//! fall back to the precise clocks.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Nanoseconds since the Unix epoch, to within one kernel tick.
pub(crate) fn unix_nanos() -> u64 {
    #[cfg(target_os = "linux")]
    {
        if let Ok(ts) = nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME_COARSE) {
            return to_nanos(ts.tv_sec(), ts.tv_nsec());
        }
    }
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Monotonic nanoseconds from an arbitrary origin fixed for the process, to
/// within one kernel tick.
pub(crate) fn mono_nanos() -> u64 {
    #[cfg(target_os = "linux")]
    {
        if let Ok(ts) = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE) {
            return to_nanos(ts.tv_sec(), ts.tv_nsec());
        }
    }
    use std::sync::OnceLock;
    static ORIGIN: OnceLock<std::time::Instant> = OnceLock::new();
    let origin = ORIGIN.get_or_init(std::time::Instant::now);
    u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(target_os = "linux")]
#[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
fn to_nanos(sec: i64, nsec: i64) -> u64 {
    let sec = u64::try_from(sec).unwrap_or(0);
    let nsec = u64::try_from(nsec).unwrap_or(0);
    sec.saturating_mul(1_000_000_000).saturating_add(nsec)
}

/// A `SystemTime` from Unix nanoseconds.
pub(crate) fn system_time(unix_nanos: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(unix_nanos)
}

pub(crate) const NANOS_PER_SEC: u64 = 1_000_000_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coarse_clocks_agree_with_precise() {
        let precise = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        let coarse = unix_nanos();
        assert!(
            precise.abs_diff(coarse) < 50_000_000,
            "{precise} vs {coarse}"
        );
        let a = mono_nanos();
        std::thread::sleep(Duration::from_millis(20));
        let b = mono_nanos();
        assert!(b > a);
    }
}
