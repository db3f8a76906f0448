//! Delivery of recorded requests to ACS: by the call itself when it can, within its deadline,
//! and by a background deliverer afterwards, with back-off, until ACS holds each request or it
//! fails for good. Every replica runs a deliverer; the profile leases make sure only one of them
//! applies a given profile's requests at a time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use acs_profile_client::{CallError, Client, Failure};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::business_days::business_days_before;
use crate::backoff::Backoff;
use crate::health::{GatewayHealth, UpstreamSignal, acs_unavailable};
use crate::store::{
    Claim, ExclusiveHold, FailureCode, Ledger, LedgerError, Outcome, Record, Settled,
};
use crate::telemetry::metrics as names;

/// How the deliverer works.
#[derive(Debug, Clone, Copy)]
pub struct DeliverySettings {
    /// How long a profile's lease lasts: longer than any attempt can take.
    pub lease: Duration,
    /// How often the deliverer looks for due requests.
    pub poll_interval: Duration,
    /// Bound on one background attempt (retries within it included).
    pub attempt_budget: Duration,
    /// Pending requests older than this many business days are reported overdue.
    pub overdue_after_business_days: u32,
    /// Records are pruned this long after the request was made.
    pub retention: Duration,
    /// Waits between attempts of a request.
    pub backoff: Backoff,
    /// How often overdue requests are looked for.
    pub clock_interval: Duration,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(60),
            poll_interval: Duration::from_secs(1),
            attempt_budget: Duration::from_secs(10),
            overdue_after_business_days: 5,
            retention: super::MIN_RETENTION,
            backoff: Backoff::LEDGER_DELIVERY,
            clock_interval: Duration::from_secs(60),
        }
    }
}

/// How long ACS may go unheard, while requests wait for it to answer again, before the
/// deliverer probes it: one cheap read, so that they are due within about this long (and a poll)
/// of ACS answering, with or without calls.
pub const PROBE_WHILE_WAITING: Duration = Duration::from_secs(2);

/// Whether ACS (or its gateway) answered that it did not handle the request: 429 Too Many
/// Requests or 503 Service Unavailable.
fn refused_unhandled(error: &CallError) -> bool {
    match error {
        CallError::Api(error) => matches!(
            Failure::classify(error),
            Failure::Transient { status } if matches!(status.as_u16(), 429 | 503)
        ),
        CallError::DeadlineExceeded { .. } | CallError::Throttled => false,
    }
}

/// What one attempt at applying a request did.
#[derive(Debug)]
pub(super) enum Attempt {
    /// ACS holds it.
    Applied,
    /// A newer request superseded it while the attempt ran; it was not (or no longer) the one to
    /// apply.
    Superseded,
    /// Not applied yet; the deliverer will try again.
    Pending,
    /// It cannot be applied: the profile does not exist (the record holds the basis).
    Failed,
}

/// The basis recorded when ACS has no such profile.
pub const PROFILE_NOT_FOUND: &str = "the profile does not exist in Adobe Campaign";

/// Delivers recorded requests to ACS.
pub struct Delivery {
    ledger: Ledger,
    /// For attempts made within a call, which someone is waiting for.
    acs: Client,
    /// For the deliverer's attempts: the same client in the background, so that they go after
    /// every call someone is waiting for, however long the backlog.
    background: Client,
    health: Arc<GatewayHealth>,
    settings: DeliverySettings,
    /// Whether a request was left backing off because ACS was unavailable, since ACS last
    /// answered: the deliverer then probes ACS when no call hears from it.
    waiting_for_acs: std::sync::atomic::AtomicBool,
    /// Work no caller waits for, which must still run to its end: a call's work once its
    /// caller has gone away, a restore a read started. Waited for when the gateway drains.
    detached: TaskTracker,
    /// On a SQLite ledger, the serving gateway's exclusive hold. It lives as long as the last
    /// task that can write (every one of them holds this `Delivery`): a second gateway must not
    /// take the file, and learn which profiles it records, while a write of this one may still
    /// land.
    _hold: Option<ExclusiveHold>,
}

impl Delivery {
    /// A deliverer for `ledger`'s requests.
    pub fn new(
        ledger: Ledger,
        acs: Client,
        health: Arc<GatewayHealth>,
        settings: DeliverySettings,
    ) -> Self {
        Self {
            ledger,
            background: acs.in_background(),
            acs,
            health,
            settings,
            waiting_for_acs: std::sync::atomic::AtomicBool::new(false),
            detached: TaskTracker::new(),
            _hold: None,
        }
    }

    /// The same deliverer, keeping `hold` for as long as it lives (see the field).
    pub fn holding(mut self, hold: ExclusiveHold) -> Self {
        self._hold = Some(hold);
        self
    }

    /// Runs `work` to its end in a task of its own, in the current span, whether or not anyone
    /// waits for its outcome.
    pub fn detach<F>(&self, work: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.detached
            .spawn(tracing::Instrument::in_current_span(work))
    }

    /// Waits for every detached task, those started meanwhile included: for a drain.
    pub async fn detached_work_done(&self) {
        self.detached.close();
        self.detached.wait().await;
    }

    /// The ledger.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Its settings.
    pub fn settings(&self) -> &DeliverySettings {
        &self.settings
    }

    /// The client for attempts made within a call.
    pub(super) fn acs(&self) -> &Client {
        &self.acs
    }

    /// What ACS's answers say about the gateway's credentials goes here.
    pub(super) fn health(&self) -> &GatewayHealth {
        &self.health
    }

    /// How long a call has to apply a request it recorded before the deliverer may take over.
    pub fn first_attempt_window_ms(&self) -> i64 {
        i64::try_from(self.settings.attempt_budget.as_millis()).unwrap_or(i64::MAX)
    }

    /// The deadline of work the deliverer cannot finish for a call (a creation, a request by
    /// email): within half a lease, since such a request still pending after a whole lease is
    /// taken as abandoned by a stopped gateway and FAILED (`Ledger::fail_abandoned`).
    pub(super) fn within_lease(&self, deadline: Option<Instant>) -> Instant {
        let bound = Instant::now() + self.settings.lease / 2;
        deadline.map_or(bound, |d| d.min(bound))
    }

    /// A claim on a profile for one attempt.
    pub fn new_claim(&self) -> Claim {
        self.ledger.new_claim(self.settings.lease)
    }

    /// Applies a pending request of a profile whose lease `claim` holds, within `deadline`,
    /// records the outcome and gives the lease back. `answered`: the caller is answered with
    /// this outcome (an attempt within a call); otherwise it is the deliverer's, made in the
    /// background.
    pub(super) async fn apply(
        &self,
        record: &Record,
        claim: &Claim,
        deadline: Instant,
        answered: bool,
    ) -> Result<Attempt, LedgerError> {
        let Some(pkey) = record.pkey.as_deref() else {
            return Err(LedgerError::Corrupt(
                "a profile's request without a key".into(),
            ));
        };
        let acs = if answered {
            &self.acs
        } else {
            &self.background
        };
        // The attempt ends (its request abandoned) a margin before the lease can lapse, so that
        // no other claim can send a newer PATCH for the profile while this one may still be on
        // its way; and nothing is sent once that point has passed.
        let now = Instant::now();
        let deadline = deadline.min(now + claim.time_to_fence());
        if claim.generation().is_none() || now >= deadline {
            let next_attempt_at = self.ledger.now_ms();
            self.ledger
                .settle(
                    &record.request_id,
                    Outcome::Retry {
                        error: "not sent: no time was left before the attempt's deadline or \
                                the end of the profile's lease",
                        next_attempt_at,
                        attempted: false,
                        acs_unavailable: false,
                    },
                    answered,
                    Some((pkey, claim)),
                )
                .await?;
            return Ok(Attempt::Pending);
        }
        let result = acs
            .set_ccpa_opt_out(pkey, record.opt_out, Some(deadline))
            .await;
        self.health.observe(UpstreamSignal::of(&result)).await;
        let release = Some((pkey, claim));
        match result {
            Ok(_) => {
                let settled = self
                    .ledger
                    .settle(
                        &record.request_id,
                        Outcome::Applied { pkey: None },
                        answered,
                        release,
                    )
                    .await?;
                if settled == Settled::Recorded {
                    self.honored(record);
                }
                Ok(match settled {
                    Settled::Recorded => Attempt::Applied,
                    Settled::NotPending => Attempt::Superseded,
                    // Sent outside the lease (it cannot be, given the fence above; checked all
                    // the same): the lease's holder applies the profile's newest request.
                    Settled::LeaseLost => Attempt::Pending,
                })
            }
            Err(CallError::Api(error))
                if matches!(
                    Failure::classify(&error),
                    Failure::NotFound | Failure::UnparsableKey
                ) =>
            {
                let settled = self
                    .ledger
                    .settle(
                        &record.request_id,
                        Outcome::Failed {
                            reason: PROFILE_NOT_FOUND,
                            code: FailureCode::ProfileNotFound,
                        },
                        answered,
                        release,
                    )
                    .await?;
                Ok(match settled {
                    Settled::Recorded => Attempt::Failed,
                    Settled::NotPending => Attempt::Superseded,
                    Settled::LeaseLost => Attempt::Pending,
                })
            }
            Err(error) => {
                // Anything else may pass (ACS down, our credentials, a deadline): the request
                // stays pending and is tried again; the clock reports it if it lasts.
                let attempted = error.may_have_reached_acs();
                let next_attempt_at = self
                    .ledger
                    .now_ms()
                    // The first failure is attempt 0's: it waits about the base.
                    .saturating_add(self.settings.backoff.after_ms(record.attempts));
                // A PATCH that was sent may still be on its way through ACS (a timeout, a reset,
                // a 502 or 504 from its gateway): the lease is kept until it expires, so that no
                // newer request for the profile is sent before this one has surely landed or
                // died, and none can be overtaken at ACS by an older one. A 429 or 503 says the
                // request was not handled (RFC 9110 15.6.4, RFC 6585 4): nothing of it can land
                // later, and the lease goes back, so that it is tried again as soon as it is due.
                let may_still_land = attempted && !refused_unhandled(&error);
                let release = if may_still_land { None } else { release };
                let acs_unavailable = acs_unavailable(&error);
                if acs_unavailable {
                    self.waiting_for_acs
                        .store(true, std::sync::atomic::Ordering::Release);
                }
                self.ledger
                    .settle(
                        &record.request_id,
                        Outcome::Retry {
                            error: &error.reason(),
                            next_attempt_at,
                            attempted,
                            acs_unavailable,
                        },
                        answered,
                        release,
                    )
                    .await?;
                Ok(Attempt::Pending)
            }
        }
    }

    /// Delivers the newest pending request of one profile, if no one else is.
    async fn deliver_profile(&self, pkey: &str) -> Result<(), LedgerError> {
        let claim = self.new_claim();
        if !self.ledger.claim(pkey, &claim).await? {
            return Ok(());
        }
        let next = match self.ledger.next_to_apply(pkey).await {
            Ok(next) => next,
            Err(e) => {
                self.ledger.release(pkey, &claim).await?;
                return Err(e);
            }
        };
        match next {
            Some(record) if record.next_attempt_at <= self.ledger.now_ms() => {
                let deadline = Instant::now() + self.settings.attempt_budget;
                let attempt = self.apply(&record, &claim, deadline, false).await?;
                tracing::info!(
                    request_id = record.request_id,
                    outcome = ?attempt,
                    attempts = record.attempts + 1,
                    "delivered a recorded opt-out request"
                );
            }
            _ => self.ledger.release(pkey, &claim).await?,
        }
        Ok(())
    }

    /// Runs the deliverer until `stop`: delivers due requests, reports overdue ones, prunes
    /// records past their retention.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut last_clock_check: Option<Instant> = None;
        let mut last_prune: Option<Instant> = None;
        let mut recoveries = self.health.recoveries();
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(self.settings.poll_interval) => {}
            }
            // Requests wait for ACS to answer again, and no call hears from it: ask it.
            if self
                .waiting_for_acs
                .load(std::sync::atomic::Ordering::Acquire)
                && self.health.acs_failing_unheard_for(PROBE_WHILE_WAITING)
            {
                self.health
                    .probe(&self.background, self.settings.attempt_budget)
                    .await;
            }
            // At most once a poll, however often ACS flaps.
            if recoveries.has_changed().unwrap_or(false) {
                recoveries.mark_unchanged();
                self.waiting_for_acs
                    .store(false, std::sync::atomic::Ordering::Release);
                match self.ledger.retry_now_that_acs_answers().await {
                    Ok(0) => {}
                    Ok(due) => tracing::info!(
                        due,
                        "requests backing off from an outage of Adobe Campaign are due now"
                    ),
                    Err(e) => tracing::error!(error = %e, "the ledger could not be updated"),
                }
            }
            if let Err(e) = self.deliver_due().await {
                tracing::error!(error = %e, "the deliverer could not read the ledger");
            }
            if last_clock_check.is_none_or(|t| t.elapsed() >= self.settings.clock_interval) {
                last_clock_check = Some(Instant::now());
                if let Err(e) = self.check_clock().await {
                    tracing::error!(error = %e, "the overdue check could not read the ledger");
                }
            }
            if last_prune.is_none_or(|t| t.elapsed() >= Duration::from_secs(3600)) {
                last_prune = Some(Instant::now());
                self.prune().await;
            }
        }
    }

    async fn deliver_due(&self) -> Result<(), LedgerError> {
        let lease_ms = i64::try_from(self.settings.lease.as_millis()).unwrap_or(i64::MAX);
        let abandoned = self.ledger.fail_abandoned(lease_ms).await?;
        if abandoned > 0 {
            tracing::warn!(
                abandoned,
                "requests interrupted by a stop, which cannot be completed later, are FAILED"
            );
        }
        let due = self.ledger.due_profiles(self.ledger.now_ms(), 256).await?;
        futures::stream::iter(due)
            .for_each_concurrent(16, |pkey| async move {
                if let Err(e) = self.deliver_profile(&pkey).await {
                    tracing::error!(error = %e, "delivering a recorded request failed");
                }
            })
            .await;
        Ok(())
    }

    /// Reports pending requests older than the threshold: a warning, and the
    /// `ccpa.v1.OptOutDelivery` health entry.
    pub async fn check_clock(&self) -> Result<usize, LedgerError> {
        let now = self.ledger.now_ms();
        let cutoff = business_days_before(now, self.settings.overdue_after_business_days);
        // A count and the oldest only: a backlog of any size is watched in constant memory.
        let overdue = self.ledger.overdue_summary(cutoff).await?;
        // Third parties must be told of an opt-out before the business complies (11 CCR
        // 7026(f)(2)): a notification pending as long is as late.
        let notifications = self.ledger.overdue_notifications(cutoff).await?;
        if notifications > 0 {
            tracing::warn!(
                overdue = notifications,
                threshold_business_days = self.settings.overdue_after_business_days,
                "notifications of opt-out requests are still not delivered to third parties"
            );
        }
        if let Some((count, oldest)) = &overdue {
            let days = now.saturating_sub(oldest.received_at) as f64 / 86_400_000.0;
            tracing::warn!(
                overdue = count,
                threshold_business_days = self.settings.overdue_after_business_days,
                oldest_request_id = oldest.request_id,
                oldest_age_days = days,
                "opt-out requests are still not held by Adobe Campaign (legal limit: 15 business days)"
            );
        }
        self.health
            .set_delivery_overdue(overdue.is_some() || notifications > 0)
            .await;
        let count = overdue
            .map_or(0, |(count, _)| count)
            .saturating_add(notifications);
        Ok(usize::try_from(count).unwrap_or(usize::MAX))
    }

    /// ACS holds `record` now: `ccpa_opt_out_time_to_honor_seconds` measures how long the
    /// consumer waited, from `received_at`. Opt-outs only (the law's clock runs for them), and
    /// not restores after drift, whose `received_at` is the consumer's original request (drift
    /// is counted by `ccpa_opt_out_drift_total`).
    pub(super) fn honored(&self, record: &Record) {
        if !record.opt_out || record.restores_request_id.is_some() {
            return;
        }
        let waited_ms = self.ledger.now_ms().saturating_sub(record.received_at);
        metrics::histogram!(names::TIME_TO_HONOR_SECONDS).record(waited_ms.max(0) as f64 / 1000.0);
    }

    /// Sets the pending, oldest-age and overdue gauges from the ledger (before each scrape).
    pub async fn observe_pending(&self) {
        let now = self.ledger.now_ms();
        let cutoff = business_days_before(now, self.settings.overdue_after_business_days);
        let summary = match self.ledger.pending_summary(cutoff).await {
            Ok(summary) => self
                .ledger
                .overdue_notifications(cutoff)
                .await
                .map(|notifications| (summary, notifications)),
            Err(e) => Err(e),
        };
        match summary {
            Ok((summary, overdue_notifications)) => {
                let age_ms = summary
                    .oldest_received_at
                    .map_or(0, |oldest| now.saturating_sub(oldest).max(0));
                metrics::gauge!(names::LEDGER_PENDING).set(summary.pending as f64);
                metrics::gauge!(names::LEDGER_OLDEST_PENDING_AGE_SECONDS)
                    .set(age_ms as f64 / 1000.0);
                metrics::gauge!(names::LEDGER_OVERDUE)
                    .set(summary.overdue.saturating_add(overdue_notifications) as f64);
            }
            // The gauges keep their last values; the scrape still answers.
            Err(e) => tracing::error!(error = %e, "the pending gauges could not read the ledger"),
        }
    }

    async fn prune(&self) {
        match self.ledger.prune(self.settings.retention).await {
            Ok(0) => {}
            Ok(pruned) => tracing::info!(pruned, "records past their retention deleted"),
            Err(e) => tracing::error!(error = %e, "pruning the ledger failed"),
        }
    }
}
