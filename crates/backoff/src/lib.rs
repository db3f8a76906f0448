//! Back-off between attempts: the one way every retry loop of the gateway and its clients waits.
//! Doubling from a base up to a cap, with the jitter a [`Jitter`] names, so that attempts that
//! failed together are not made again together.
//!
//! A crate of its own, not a module of the gateway or of `acs-profile-client`: both use it, and
//! neither may depend on the other for it (`acs-profile-client` is the gateway's dependency,
//! and only with the gateway's `server` feature; the gateway's Rust client, which builds without
//! that feature, retries with it too). It depends on `rand` alone.
//!
//! A [`Backoff`] is checked when built ([`Backoff::new`]): a zero base, or a base above the cap,
//! is refused. Each schedule of the project is one of the named policies below, so that its
//! numbers are written once; a caller that needs other bounds (a test, a tuned deployment)
//! keeps a policy's jitter with [`Backoff::between`].

#![warn(missing_docs)]

use std::time::Duration;

/// How much of each wait is left to chance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// None: each wait is its ceiling. For a waiter alone of its kind, whose waits are
    /// reported (one token source per process) or watched (a command run by hand).
    None,
    /// Between half the ceiling and the ceiling: a retry is never made at once, and retries
    /// that failed together spread out. For work whose next attempt is scheduled (a ledger's).
    Half,
    /// Between zero and the ceiling ("full jitter"): the widest spread, for many callers
    /// retrying one server.
    Full,
}

/// Doubling waits from a base up to a cap, with jitter. Built by [`Backoff::new`], or one of
/// the named policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    jitter: Jitter,
}

/// Why settings make no back-off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidBackoff {
    /// A zero base would retry at once, every time, whatever the cap.
    #[error("the first back-off must be more than zero")]
    ZeroBase,
    /// The base is above the cap, which it would never reach.
    #[error("the first back-off must not be longer than the longest")]
    BaseAboveMax,
}

impl Backoff {
    /// The ACS client's retries within one call (`acs-profile-client`'s `CallSettings`): from
    /// 100 ms up to 2 s, full jitter, within the call's deadline.
    pub const ACS_CALL: Self = Self::policy(
        Duration::from_millis(100),
        Duration::from_secs(2),
        Jitter::Full,
    );

    /// The IMS token source after a failed token request: from 500 ms up to a minute, no
    /// jitter (one source per process, its waits logged as they are).
    pub const IMS_TOKEN: Self = Self::policy(
        Duration::from_millis(500),
        Duration::from_secs(60),
        Jitter::None,
    );

    /// The ledger's deliverer, between attempts of a recorded request: from 1 s up to
    /// 5 minutes, between half and all of each.
    pub const LEDGER_DELIVERY: Self = Self::policy(
        Duration::from_secs(1),
        Duration::from_secs(300),
        Jitter::Half,
    );

    /// The notifier, between attempts of one notification: from 1 s up to an hour, between
    /// half and all of each.
    pub const NOTIFICATION: Self = Self::policy(
        Duration::from_secs(1),
        Duration::from_secs(3600),
        Jitter::Half,
    );

    /// The gateway's Rust client (`ccpa_gateway::client::RetryPolicy`'s default): from 200 ms
    /// up to 5 s, full jitter (many services may call one gateway).
    pub const GATEWAY_CLIENT: Self = Self::policy(
        Duration::from_millis(200),
        Duration::from_secs(5),
        Jitter::Full,
    );

    /// The bulk command, before it resumes a broken stream: from 500 ms up to 2.5 s (the
    /// longest wait of its default 5 resumes), no jitter (one command, run by hand).
    pub const BULK_RESUME: Self = Self::policy(
        Duration::from_millis(500),
        Duration::from_millis(2500),
        Jitter::None,
    );

    /// Waits from `base`, doubling after each failure, up to `max`, with `jitter`. Refused
    /// when `base` is zero or longer than `max`.
    pub const fn new(
        base: Duration,
        max: Duration,
        jitter: Jitter,
    ) -> Result<Self, InvalidBackoff> {
        if base.is_zero() {
            return Err(InvalidBackoff::ZeroBase);
        }
        // `as_nanos`: comparing Durations with `>` is not yet allowed in a const fn.
        if base.as_nanos() > max.as_nanos() {
            return Err(InvalidBackoff::BaseAboveMax);
        }
        Ok(Self { base, max, jitter })
    }

    /// This policy's jitter between other bounds, checked as [`Backoff::new`] checks them.
    pub const fn between(self, base: Duration, max: Duration) -> Result<Self, InvalidBackoff> {
        Self::new(base, max, self.jitter)
    }

    /// A named policy. Only ever evaluated at compile time (each caller is a `const`), so that
    /// a policy with invalid settings does not build: the panic cannot happen at run time.
    const fn policy(base: Duration, max: Duration, jitter: Jitter) -> Self {
        match Self::new(base, max, jitter) {
            Ok(backoff) => backoff,
            Err(_) => panic!("a named back-off policy has invalid settings"),
        }
    }

    /// The wait after the first failure, at most.
    pub const fn base(&self) -> Duration {
        self.base
    }

    /// The longest wait.
    pub const fn max(&self) -> Duration {
        self.max
    }

    /// How much of each wait is left to chance.
    pub const fn jitter(&self) -> Jitter {
        self.jitter
    }

    /// The longest wait after `failures` failed attempts (1 for the first; 0 counts as 1):
    /// `base` doubled `failures - 1` times, at most `max`. Saturates rather than overflows.
    pub fn ceiling(&self, failures: u32) -> Duration {
        let mut ceiling = self.base;
        // At most about 95 doublings: the base is at least a nanosecond, and a Duration holds
        // under 2^95 of them, so the cap is reached long before `failures` runs out.
        for _ in 1..failures {
            if ceiling >= self.max {
                break;
            }
            ceiling = ceiling.saturating_mul(2);
        }
        ceiling.min(self.max)
    }

    /// The wait after `failures` failed attempts (1 for the first): [`Backoff::ceiling`], less
    /// the share the jitter leaves to chance.
    pub fn after(&self, failures: u32) -> Duration {
        let ceiling = self.ceiling(failures);
        let share = match self.jitter {
            Jitter::None => return ceiling,
            Jitter::Half => 0.5 + rand::random::<f64>() / 2.0,
            Jitter::Full => rand::random::<f64>(),
        };
        // The product is below the ceiling; should rounding push it past what a Duration holds
        // (a ceiling near Duration::MAX), the ceiling itself is the wait.
        Duration::try_from_secs_f64(ceiling.as_secs_f64() * share)
            .map_or(ceiling, |wait| wait.min(ceiling))
    }

    /// The wait, in whole milliseconds for a ledger's instants, after an attempt failed that
    /// `earlier` failed attempts came before (a ledger's count, 0 for the first attempt; a
    /// negative count is taken as none).
    pub fn after_ms(&self, earlier: i64) -> i64 {
        let failures = u32::try_from(earlier.max(0))
            .unwrap_or(u32::MAX)
            .saturating_add(1);
        i64::try_from(self.after(failures).as_millis()).unwrap_or(i64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn settings_are_checked_when_built() {
        assert_eq!(
            Backoff::new(Duration::ZERO, MS, Jitter::Full),
            Err(InvalidBackoff::ZeroBase)
        );
        assert_eq!(
            Backoff::new(MS * 2, MS, Jitter::Full),
            Err(InvalidBackoff::BaseAboveMax)
        );
        assert_eq!(
            Backoff::LEDGER_DELIVERY.between(MS * 10, MS),
            Err(InvalidBackoff::BaseAboveMax)
        );
        let equal = Backoff::new(MS, MS, Jitter::None).unwrap();
        assert_eq!((equal.base(), equal.max()), (MS, MS));
        let extreme = Backoff::new(Duration::MAX, Duration::MAX, Jitter::Half).unwrap();
        assert_eq!(extreme.max(), Duration::MAX);
    }

    #[test]
    fn between_keeps_the_policy_s_jitter() {
        let tuned = Backoff::LEDGER_DELIVERY
            .between(MS * 100, MS * 300)
            .unwrap();
        assert_eq!(tuned.jitter(), Jitter::Half);
        assert_eq!((tuned.base(), tuned.max()), (MS * 100, MS * 300));
    }

    #[test]
    fn the_ceiling_doubles_from_the_base_up_to_the_cap() {
        let backoff = Backoff::new(
            Duration::from_secs(1),
            Duration::from_secs(60),
            Jitter::None,
        )
        .unwrap();
        for (failures, seconds) in [
            (0, 1),
            (1, 1),
            (2, 2),
            (3, 4),
            (6, 32),
            (7, 60),
            (u32::MAX, 60),
        ] {
            assert_eq!(
                backoff.ceiling(failures),
                Duration::from_secs(seconds),
                "{failures}"
            );
            // Without jitter, the wait is the ceiling.
            assert_eq!(
                backoff.after(failures),
                Duration::from_secs(seconds),
                "{failures}"
            );
        }
    }

    #[test]
    fn half_jitter_waits_within_the_upper_half() {
        let backoff = Backoff::new(
            Duration::from_secs(1),
            Duration::from_secs(60),
            Jitter::Half,
        )
        .unwrap();
        for (failures, seconds) in [(1, 1), (2, 2), (3, 4), (7, 60), (u32::MAX, 60)] {
            let ceiling = Duration::from_secs(seconds);
            for _ in 0..100 {
                let wait = backoff.after(failures);
                assert!(
                    wait >= ceiling / 2 && wait <= ceiling,
                    "{failures}: {wait:?}"
                );
            }
        }
    }

    #[test]
    fn full_jitter_reaches_near_zero_under_a_growing_cap() {
        let backoff = Backoff::new(MS * 100, MS * 350, Jitter::Full).unwrap();
        for (failures, cap) in [(1, 100), (2, 200), (3, 350), (10, 350)] {
            let waits: Vec<Duration> = (0..200).map(|_| backoff.after(failures)).collect();
            assert!(waits.iter().all(|wait| *wait <= MS * cap));
            assert!(waits.iter().any(|wait| *wait < MS * cap / 4), "{failures}");
        }
    }

    #[test]
    fn extreme_settings_and_counts_cannot_overflow() {
        for jitter in [Jitter::None, Jitter::Half, Jitter::Full] {
            let backoff = Backoff::new(Duration::MAX, Duration::MAX, jitter).unwrap();
            for failures in [0, 1, 2, 64, u32::MAX] {
                assert!(backoff.after(failures) <= Duration::MAX);
            }
            for earlier in [i64::MIN, -1, 0, 1, 64, i64::MAX] {
                assert!(backoff.after_ms(earlier) >= 0);
            }
        }
        let tiny = Backoff::new(Duration::from_nanos(1), Duration::MAX, Jitter::None).unwrap();
        assert_eq!(tiny.ceiling(u32::MAX), Duration::MAX);
        assert_eq!(tiny.ceiling(33), Duration::from_nanos(1 << 32));
    }

    #[test]
    fn after_ms_counts_the_earlier_attempts() {
        let backoff = Backoff::new(
            Duration::from_secs(1),
            Duration::from_secs(60),
            Jitter::None,
        )
        .unwrap();
        // The first attempt failing waits the base; a negative count is none.
        assert_eq!(backoff.after_ms(0), 1000);
        assert_eq!(backoff.after_ms(-5), 1000);
        assert_eq!(backoff.after_ms(2), 4000);
        assert_eq!(backoff.after_ms(i64::MAX), 60_000);
    }

    #[test]
    fn the_named_policies_keep_their_numbers() {
        for (policy, base, max, jitter) in [
            (Backoff::ACS_CALL, MS * 100, MS * 2000, Jitter::Full),
            (Backoff::IMS_TOKEN, MS * 500, MS * 60_000, Jitter::None),
            (
                Backoff::LEDGER_DELIVERY,
                MS * 1000,
                MS * 300_000,
                Jitter::Half,
            ),
            (
                Backoff::NOTIFICATION,
                MS * 1000,
                MS * 3_600_000,
                Jitter::Half,
            ),
            (Backoff::GATEWAY_CLIENT, MS * 200, MS * 5000, Jitter::Full),
            (Backoff::BULK_RESUME, MS * 500, MS * 2500, Jitter::None),
        ] {
            assert_eq!(
                (policy.base(), policy.max(), policy.jitter()),
                (base, max, jitter)
            );
        }
    }
}
