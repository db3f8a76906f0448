//! Client-side throttling toward ACS. Adobe does not throttle the profile API; the contract caps
//! engine calls, so the caller must. Every HTTP request to ACS (each attempt of each call, reads
//! and writes alike) takes one admission.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Limits on the calls made to ACS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleSettings {
    /// Requests started per second, at most. Spread evenly (a burst of one), so that no
    /// one-second window holds more than this, give or take one.
    pub max_rps: NonZeroU32,
    /// Requests in progress at once, at most.
    pub max_in_flight: usize,
    /// Calls waiting for admission, at most; past this a call fails at once
    /// ([`crate::CallError::Throttled`]) instead of waiting.
    pub max_queued: usize,
}

impl Default for ThrottleSettings {
    fn default() -> Self {
        Self {
            max_rps: NonZeroU32::new(100).unwrap_or(NonZeroU32::MIN),
            max_in_flight: 64,
            max_queued: 10_000,
        }
    }
}

/// The queue was full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QueueFull;

/// Admission to make one request. Hold it until the answer has been read.
pub(crate) struct Admission {
    _in_flight: OwnedSemaphorePermit,
}

pub(crate) struct Throttle {
    rate: DefaultDirectRateLimiter,
    in_flight: Arc<Semaphore>,
    waiting: AtomicUsize,
    max_queued: usize,
}

impl Throttle {
    pub(crate) fn new(settings: ThrottleSettings) -> Self {
        Self {
            rate: RateLimiter::direct(
                Quota::per_second(settings.max_rps).allow_burst(NonZeroU32::MIN),
            ),
            in_flight: Arc::new(Semaphore::new(settings.max_in_flight.max(1))),
            waiting: AtomicUsize::new(0),
            max_queued: settings.max_queued,
        }
    }

    /// Waits for a slot under both limits. The in-flight slot is taken first and the rate slot
    /// last, so the request starts right after its rate slot: waiting on one limit cannot bank
    /// rate slots and then release them in a burst. Dropping the future (the caller's deadline)
    /// leaves the queue.
    pub(crate) async fn admit(&self) -> Result<Admission, QueueFull> {
        let permit = match self.in_flight.clone().try_acquire_owned().ok() {
            Some(permit) if self.rate.check().is_ok() => {
                return Ok(Admission { _in_flight: permit });
            }
            early => early,
        };

        let _queued = Queued::join(&self.waiting, self.max_queued)?;
        let permit = match permit {
            Some(permit) => permit,
            None => self
                .in_flight
                .clone()
                .acquire_owned()
                .await
                // The semaphore lives as long as the throttle and is never closed.
                .map_err(|_| QueueFull)?,
        };
        self.rate.until_ready().await;
        Ok(Admission { _in_flight: permit })
    }
}

/// A place in the queue, given back when dropped (admitted or abandoned).
struct Queued<'a>(&'a AtomicUsize);

impl<'a> Queued<'a> {
    fn join(waiting: &'a AtomicUsize, max_queued: usize) -> Result<Self, QueueFull> {
        let mut current = waiting.load(Ordering::Relaxed);
        loop {
            if current >= max_queued {
                return Err(QueueFull);
            }
            match waiting.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(Self(waiting)),
                Err(actual) => current = actual,
            }
        }
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn settings(max_rps: u32, max_in_flight: usize, max_queued: usize) -> ThrottleSettings {
        ThrottleSettings {
            max_rps: NonZeroU32::new(max_rps).unwrap(),
            max_in_flight,
            max_queued,
        }
    }

    #[tokio::test]
    async fn the_queue_is_bounded_and_refuses_at_once() {
        let throttle = Arc::new(Throttle::new(settings(1000, 1, 2)));
        let held = throttle.admit().await.unwrap();
        let waiting: Vec<_> = (0..2)
            .map(|_| {
                let throttle = throttle.clone();
                tokio::spawn(async move { throttle.admit().await.map(|_| ()) })
            })
            .collect();
        while throttle.waiting.load(Ordering::SeqCst) < 2 {
            tokio::task::yield_now().await;
        }
        let started = Instant::now();
        assert_eq!(throttle.admit().await.err(), Some(QueueFull));
        assert!(started.elapsed() < Duration::from_millis(50));
        drop(held);
        for task in waiting {
            assert_eq!(task.await.unwrap(), Ok(()));
        }
        assert_eq!(throttle.waiting.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn requests_are_spread_to_the_rate() {
        let throttle = Throttle::new(settings(50, 100, 100));
        let started = Instant::now();
        for _ in 0..26 {
            let _admitted = throttle.admit().await.unwrap();
        }
        // 26 requests at 50 per second, no burst: the last starts 0.5 s after the first.
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(480), "{elapsed:?}");
    }
}
