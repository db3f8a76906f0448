//! Client-side throttling toward ACS. Adobe does not throttle the profile API; the contract caps
//! engine calls, so the caller must. Every HTTP request to ACS (each attempt of each call, reads
//! and writes alike) takes one admission.
//!
//! Two classes share the one budget: foreground calls (someone is waiting for the answer) and
//! background calls (work that can wait, such as a backlog being delivered). A background call
//! is admitted only while no foreground call is waiting, so a backlog of any size delays an
//! interactive call by at most the one request already admitted.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use governor::clock::Clock;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

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
    /// Foreground calls waiting for admission.
    foreground_waiting: AtomicUsize,
    /// Signalled when the last waiting foreground call is admitted or gives up.
    foreground_idle: Notify,
}

/// How long a background call sleeps past its rate slot, so that a foreground call waiting for
/// the same slot (woken at the same instant) takes it first.
const BACKGROUND_YIELD: std::time::Duration = std::time::Duration::from_millis(1);

impl Throttle {
    pub(crate) fn new(settings: ThrottleSettings) -> Self {
        Self {
            rate: RateLimiter::direct(
                Quota::per_second(settings.max_rps).allow_burst(NonZeroU32::MIN),
            ),
            in_flight: Arc::new(Semaphore::new(settings.max_in_flight.max(1))),
            waiting: AtomicUsize::new(0),
            max_queued: settings.max_queued,
            foreground_waiting: AtomicUsize::new(0),
            foreground_idle: Notify::new(),
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
        let _foreground = Foreground::join(self);
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

    /// Waits for a slot, as [`Throttle::admit`] does, but takes it only while no foreground
    /// call is waiting. It holds an in-flight slot only from the moment it takes its rate slot:
    /// holding one while it waits could keep a foreground call waiting for it.
    pub(crate) async fn admit_background(&self) -> Result<Admission, QueueFull> {
        let _queued = Queued::join(&self.waiting, self.max_queued)?;
        loop {
            self.foreground_gone().await;
            let permit = self
                .in_flight
                .clone()
                .acquire_owned()
                .await
                // The semaphore lives as long as the throttle and is never closed.
                .map_err(|_| QueueFull)?;
            if self.foreground_waiting.load(Ordering::Acquire) > 0 {
                continue;
            }
            match self.rate.check() {
                Ok(()) => return Ok(Admission { _in_flight: permit }),
                Err(not_until) => {
                    drop(permit);
                    let wait = not_until.wait_time_from(self.rate.clock().now());
                    tokio::time::sleep(wait + BACKGROUND_YIELD).await;
                }
            }
        }
    }

    /// Returns once no foreground call is waiting.
    async fn foreground_gone(&self) {
        loop {
            let idle = self.foreground_idle.notified();
            tokio::pin!(idle);
            // Registered before the count is read, so a wake-up between the two is not lost.
            idle.as_mut().enable();
            if self.foreground_waiting.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }
}

/// A foreground call waiting, counted so that background calls let it go first.
struct Foreground<'a>(&'a Throttle);

impl<'a> Foreground<'a> {
    fn join(throttle: &'a Throttle) -> Self {
        throttle.foreground_waiting.fetch_add(1, Ordering::AcqRel);
        Self(throttle)
    }
}

impl Drop for Foreground<'_> {
    fn drop(&mut self) {
        if self.0.foreground_waiting.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.foreground_idle.notify_waiters();
        }
    }
}

/// A place in the queue, given back when dropped (admitted or abandoned).
struct Queued<'a>(&'a AtomicUsize, crate::observe::ThrottleWait);

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
                Ok(_) => return Ok(Self(waiting, crate::observe::ThrottleWait::begin())),
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

    #[tokio::test]
    async fn a_foreground_call_goes_before_every_waiting_background_call() {
        // 20 per second: one slot every 50 ms.
        let throttle = Arc::new(Throttle::new(settings(20, 100, 100)));
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let background: Vec<_> = (0..5)
            .map(|n| {
                let (throttle, order) = (throttle.clone(), order.clone());
                tokio::spawn(async move {
                    let _admitted = throttle.admit_background().await.unwrap();
                    order.lock().unwrap().push(format!("background {n}"));
                })
            })
            .collect();
        // Let the first background call take a slot, and the others queue for the next ones.
        while order.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        let _admitted = throttle.admit().await.unwrap();
        order.lock().unwrap().push("foreground".to_owned());
        for task in background {
            task.await.unwrap();
        }
        let order = order.lock().unwrap();
        // The one admitted before it came, then the foreground call, then the rest.
        assert_eq!(order.len(), 6);
        assert_eq!(order[1], "foreground", "{order:?}");
        assert_eq!(throttle.foreground_waiting.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn background_calls_do_not_hold_the_in_flight_slots_a_foreground_call_waits_for() {
        // One in-flight slot, 10 per second: background calls queue for the rate.
        let throttle = Arc::new(Throttle::new(settings(10, 1, 100)));
        let background: Vec<_> = (0..4)
            .map(|_| {
                let throttle = throttle.clone();
                tokio::spawn(async move {
                    let _admitted = throttle.admit_background().await.unwrap();
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let admitted = tokio::time::timeout(Duration::from_millis(500), throttle.admit()).await;
        assert!(admitted.is_ok(), "the foreground call was kept waiting");
        drop(admitted);
        for task in background {
            task.await.unwrap();
        }
    }

    #[tokio::test]
    async fn background_calls_keep_to_the_rate() {
        let throttle = Throttle::new(settings(50, 100, 100));
        let started = Instant::now();
        for _ in 0..26 {
            let _admitted = throttle.admit_background().await.unwrap();
        }
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(480), "{elapsed:?}");
    }
}
