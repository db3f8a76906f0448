//! The load driver: a number of concurrent workers calling one operation for a while, with every
//! latency recorded, overall and by method.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{Value, json};

/// Which of the gateway's methods a call is or, on the direct path, stands for: there a
/// `SetOptOut` is the write and its read-back (`set_ccpa_opt_out`, then `read_profile`, as the
/// gateway does), a `GetOptOut` the read alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Method {
    GetOptOut,
    SetOptOut,
}

impl Method {
    /// The method's name, as the gateway's API spells it: a key of the report's `by_method`.
    pub fn name(self) -> &'static str {
        match self {
            Self::GetOptOut => "GetOptOut",
            Self::SetOptOut => "SetOptOut",
        }
    }
}

/// What one run of load measured.
#[derive(Debug, Clone)]
pub struct LoadResult {
    /// How long the measured run lasted.
    pub elapsed: Duration,
    /// Calls that succeeded.
    pub ok: u64,
    /// Failed calls by gRPC code (or error kind, for direct calls).
    pub errors: BTreeMap<String, u64>,
    /// Latency of every call, failed ones included, in microseconds.
    pub latency_us: Histogram<u64>,
    /// The same by method, for the methods called: each histogram's count is the method's calls.
    pub by_method: BTreeMap<Method, Histogram<u64>>,
}

impl LoadResult {
    /// Calls per second, failed ones included.
    pub fn throughput(&self) -> f64 {
        self.calls() as f64 / self.elapsed.as_secs_f64()
    }

    /// Every call made.
    pub fn calls(&self) -> u64 {
        self.ok + self.errors.values().sum::<u64>()
    }

    /// A latency quantile in milliseconds.
    pub fn quantile_ms(&self, quantile: f64) -> f64 {
        self.latency_us.value_at_quantile(quantile) as f64 / 1000.0
    }

    /// The figures, as JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "calls": self.calls(),
            "ok": self.ok,
            "errors": self.errors,
            "throughput_per_s": round(self.throughput(), 1),
            "p50_ms": round(self.quantile_ms(0.5), 3),
            "p90_ms": round(self.quantile_ms(0.9), 3),
            "p99_ms": round(self.quantile_ms(0.99), 3),
            "max_ms": round(self.latency_us.max() as f64 / 1000.0, 3),
            "by_method": self.by_method_json(),
        })
    }

    /// `{"GetOptOut": {calls, p50_ms, p99_ms}, "SetOptOut": {...}}`, for the methods called
    /// (a scenario without SetOptOuts has no `SetOptOut`); failed calls are counted and timed.
    fn by_method_json(&self) -> Value {
        let ms = |latency: &Histogram<u64>, quantile: f64| {
            round(latency.value_at_quantile(quantile) as f64 / 1000.0, 3)
        };
        self.by_method
            .iter()
            .filter(|(_, latency)| !latency.is_empty())
            .map(|(method, latency)| {
                let figures = json!({
                    "calls": latency.len(),
                    "p50_ms": ms(latency, 0.5),
                    "p99_ms": ms(latency, 0.99),
                });
                (method.name().to_owned(), figures)
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    }
}

/// Rounds for display.
pub fn round(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

fn histogram() -> Histogram<u64> {
    // One microsecond to ten minutes at three significant digits: far more than a call can take.
    match Histogram::new_with_bounds(1, 600_000_000, 3) {
        Ok(histogram) => histogram,
        Err(e) => unreachable!("constant bounds are valid: {e}"),
    }
}

/// Runs `concurrency` workers for `duration`. Worker `w` makes its `n`-th call as
/// `operation(w, n)`, which names the call's method and gives the call; a call that fails names
/// its error kind.
pub async fn drive<F, Fut>(concurrency: usize, duration: Duration, operation: F) -> LoadResult
where
    F: Fn(usize, u64) -> (Method, Fut) + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let operation = Arc::new(operation);
    let started = Instant::now();
    let end = started + duration;
    let workers: Vec<_> = (0..concurrency)
        .map(|worker| {
            let operation = operation.clone();
            tokio::spawn(async move {
                // One histogram per method called; the overall one is their sum.
                let mut latency: BTreeMap<Method, Histogram<u64>> = BTreeMap::new();
                let mut ok = 0u64;
                let mut errors: BTreeMap<String, u64> = BTreeMap::new();
                let mut n = 0u64;
                while Instant::now() < end {
                    let call_started = Instant::now();
                    let (method, call) = operation(worker, n);
                    let outcome = call.await;
                    let took =
                        u64::try_from(call_started.elapsed().as_micros()).unwrap_or(u64::MAX);
                    latency
                        .entry(method)
                        .or_insert_with(histogram)
                        .saturating_record(took.max(1));
                    match outcome {
                        Ok(()) => ok += 1,
                        Err(kind) => *errors.entry(kind).or_default() += 1,
                    }
                    n += 1;
                }
                (latency, ok, errors)
            })
        })
        .collect();

    let mut result = LoadResult {
        elapsed: Duration::ZERO,
        ok: 0,
        errors: BTreeMap::new(),
        latency_us: histogram(),
        by_method: BTreeMap::new(),
    };
    for worker in workers {
        match worker.await {
            Ok((latency, ok, errors)) => {
                for (method, latency) in latency {
                    // Same bounds everywhere: adding cannot fail.
                    let _ = result.latency_us.add(&latency);
                    let _ = result
                        .by_method
                        .entry(method)
                        .or_insert_with(histogram)
                        .add(latency);
                }
                result.ok += ok;
                for (kind, count) in errors {
                    *result.errors.entry(kind).or_default() += count;
                }
            }
            Err(_) => *result.errors.entry("worker panicked".into()).or_default() += 1,
        }
    }
    // The last calls end after `end`: the run lasted until they did.
    result.elapsed = started.elapsed();
    result
}
