//! Back-off between attempts, the one way every retry loop of the gateway and its client
//! waits: doubling from a base, capped, with jitter, so that attempts that failed together are
//! not made again together.

use std::time::Duration;

/// Doubling waits from `base` up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The ceiling of the wait after the first failure.
    pub base: Duration,
    /// The highest ceiling.
    pub max: Duration,
}

impl Backoff {
    /// The wait after `failures` failed attempts (1 for the first): between half its ceiling and
    /// the ceiling (`base` doubled `failures - 1` times, at most `max`), so that a retry is never
    /// made at once, and retries that failed together spread out.
    pub fn after(&self, failures: u32) -> Duration {
        let exponent = failures.saturating_sub(1).min(30);
        let ceiling = self
            .base
            .saturating_mul(2u32.saturating_pow(exponent))
            .min(self.max);
        ceiling.mul_f64(0.5 + rand::random::<f64>() / 2.0)
    }

    /// [`Backoff::after`] in whole milliseconds, for a ledger's instants.
    pub fn after_ms(&self, failures: u32) -> i64 {
        i64::try_from(self.after(failures).as_millis()).unwrap_or(i64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_the_base_up_to_the_cap_within_the_upper_half() {
        let backoff = Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(60),
        };
        for (failures, ceiling) in [(1, 1), (2, 2), (3, 4), (7, 60), (u32::MAX, 60)] {
            let wait = backoff.after(failures);
            let ceiling = Duration::from_secs(ceiling);
            assert!(
                wait >= ceiling / 2 && wait <= ceiling,
                "{failures}: {wait:?}"
            );
        }
    }
}
