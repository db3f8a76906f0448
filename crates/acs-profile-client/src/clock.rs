//! Where time is read for rules (a token's refresh and expiry, the back-off after a failed token
//! request; in the gateway, leases, back-off, the overdue clock and retention): the system's
//! clock, unless a test holds it still or moves it.

use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// A source of the current instant, and of the time of day for rules kept in records.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Now, for measuring how long something has lasted.
    fn now(&self) -> Instant;

    /// Now, as a time of day: what records keep.
    fn wall(&self) -> SystemTime {
        SystemTime::now()
    }

    /// Whether [`Clock::wall`] is the system's time of day. Where it is, a store may keep time
    /// itself (PostgreSQL's clock, shared by every replica); where it is not (a test's clock),
    /// this clock's time is used instead, so that a test moving it moves everything.
    fn is_system_time(&self) -> bool {
        true
    }

    /// [`Clock::wall`] in ms since the Unix epoch (0 before it, `i64::MAX` past the end of
    /// `i64`).
    fn unix_ms(&self) -> i64 {
        unix_ms(self.wall())
    }
}

fn unix_ms(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The system's clock: tokio's for instants (real time, or tokio's paused time in a test that
/// pauses it), the system's for the time of day.
#[derive(Debug, Default, Clone, Copy)]
pub struct TokioClock;

impl Clock for TokioClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that moves only when told to, for tests: it starts at the instant it is made (and at
/// the time of day it is made, or one given) and stands still until [`ManualClock::advance`].
#[derive(Debug)]
pub struct ManualClock {
    start: Instant,
    wall_start: SystemTime,
    elapsed: Mutex<Duration>,
}

impl ManualClock {
    /// A clock standing at the current instant and time of day.
    pub fn new() -> Self {
        Self::at(SystemTime::now())
    }

    /// A clock standing at the current instant, and at `wall` as the time of day.
    pub fn at(wall: SystemTime) -> Self {
        Self {
            start: Instant::now(),
            wall_start: wall,
            elapsed: Mutex::new(Duration::ZERO),
        }
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let mut elapsed = self.elapsed.lock().unwrap_or_else(|e| e.into_inner());
        *elapsed = elapsed.saturating_add(by);
    }

    fn elapsed(&self) -> Duration {
        *self.elapsed.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.start.checked_add(self.elapsed()).unwrap_or(self.start)
    }

    fn wall(&self) -> SystemTime {
        self.wall_start
            .checked_add(self.elapsed())
            .unwrap_or(self.wall_start)
    }

    fn is_system_time(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_both_its_instant_and_its_time_of_day() {
        let clock = ManualClock::at(UNIX_EPOCH + Duration::from_secs(1_000));
        let (instant, ms) = (clock.now(), clock.unix_ms());
        assert_eq!(ms, 1_000_000);
        assert_eq!(clock.now(), instant, "it stands still");
        clock.advance(Duration::from_millis(1_500));
        assert_eq!(clock.now() - instant, Duration::from_millis(1_500));
        assert_eq!(clock.unix_ms(), 1_001_500);
        assert!(!clock.is_system_time());
    }

    #[test]
    fn the_system_clock_is_the_systems() {
        assert!(TokioClock.is_system_time());
        let (before, at) = (unix_ms(SystemTime::now()), TokioClock.unix_ms());
        assert!(at >= before);
    }
}
