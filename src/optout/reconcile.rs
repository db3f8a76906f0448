//! Drift reconciliation: an opt-out stays honoured after it was applied. Other systems write the
//! same profiles in ACS (list imports, workflows, CRM syncs, people in the Campaign UI), and any
//! of them can set `ccpaOptOut` back. The reconciler re-reads, once per interval, every profile
//! whose latest resolved request was applied, and puts back what it finds changed: a new request
//! in the ledger (source INTERNAL, caller [`RECONCILER`]) naming the request it restores,
//! delivered like any other. A read that meets drift starts the same restore
//! ([`Delivery::restore`]).
//!
//! Every replica runs a reconciler; a profile is re-read under its lease (the one deliveries
//! take), and only when it is still due once the lease is held, so each profile is re-read by
//! one replica per interval.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use acs_profile_client::{CallError, Client, Failure};
use tokio_util::sync::CancellationToken;

use super::by_email::RESERVED_REQUEST_ID_SEPARATOR;
use super::delivery::Delivery;
use super::submit::{Apply, Submitted};
use crate::store::{Kind, Ledger, LedgerError, NewRequest, Record, Source, State};

/// The caller recorded on the reconciler's restores (and on those a read starts).
pub const RECONCILER: &str = "reconciler";

/// The longest pause between two re-reads the share can ask for.
const MAX_PERIOD: Duration = Duration::from_secs(3600);

/// How long after a failed re-read a profile is re-read again (at most an interval).
const RETRY_UNREADABLE: Duration = Duration::from_secs(300);

/// Who found a drift, in the log: the reconciler.
const FOUND_BY_RECONCILER: &str = "reconciler";
/// Who found a drift, in the log: a GetOptOut.
const FOUND_BY_READ: &str = "read";

/// How the reconciler works.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReconcileSettings {
    /// Every profile is re-read once per interval; zero turns the reconciler off.
    pub interval: Duration,
    /// The most profiles it re-reads per second: its share of the ACS request budget.
    pub max_rps: f64,
}

impl Default for ReconcileSettings {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(24 * 3600),
            max_rps: 10.0,
        }
    }
}

/// Which way a profile drifted from its latest applied request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The consumer opted out; ACS was found opted in: data the consumer refused to have sold
    /// could be sold. The severe direction.
    RevertedOptOut,
    /// The consumer opted (back) in; ACS was found opted out.
    RevertedOptIn,
}

impl Direction {
    /// Its name in logs and listings.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RevertedOptOut => "REVERTED_OPT_OUT",
            Self::RevertedOptIn => "REVERTED_OPT_IN",
        }
    }

    /// The direction of a restore that puts `opt_out` back.
    pub fn of_restore(opt_out: bool) -> Self {
        if opt_out {
            Self::RevertedOptOut
        } else {
            Self::RevertedOptIn
        }
    }
}

impl Delivery {
    /// Records a restore of `latest`, a profile's applied request that ACS was found not to
    /// hold, for the deliverer to apply like any other request; logs and returns it.
    ///
    /// The restore is ordered right after the request it restores (its `received_at` one
    /// millisecond after that request's [`Record::ordered_at`]): it re-asserts that consumer's wish, so a request the consumer made
    /// later (even one recorded after the restore) still overtakes it, and one made earlier does
    /// not.
    pub async fn restore(&self, latest: &Record, found_by: &str) -> Result<Record, LedgerError> {
        // The consumer's request, even when the latest applied one is itself a restore.
        let restores = latest
            .restores_request_id
            .clone()
            .unwrap_or_else(|| latest.request_id.clone());
        let request = NewRequest {
            // The separator is refused in callers' ids: no caller's id can collide with it.
            request_id: format!(
                "{RECONCILER}{RESERVED_REQUEST_ID_SEPARATOR}{}",
                uuid::Uuid::now_v7()
            ),
            kind: Kind::SetOptOut,
            pkey: latest.pkey.clone(),
            opt_out: latest.opt_out,
            source: Source::Internal,
            received_at: Some(latest.ordered_at().saturating_add(1)),
            caller: RECONCILER.to_owned(),
            first_attempt_window_ms: 0,
            parent_request_id: None,
            fingerprint: None,
            restores_request_id: Some(restores),
            email_sha256: None,
        };
        let record = match self.submit(&request, Apply::Later).await? {
            Submitted::Applied(record)
            | Submitted::Pending(record)
            | Submitted::Superseded(record)
            | Submitted::Failed(record)
            | Submitted::Replay(record) => record,
            Submitted::Conflict => {
                return Err(LedgerError::Corrupt(
                    "a restore's fresh request id was taken".into(),
                ));
            }
        };
        if record.state == State::Superseded {
            // A newer request of the consumer's overtook it: nothing to put back.
            return Ok(record);
        }
        let direction = Direction::of_restore(record.opt_out);
        metrics::counter!(
            crate::telemetry::metrics::DRIFT_TOTAL,
            "direction" => direction.as_str(),
        )
        .increment(1);
        let restores_request_id = record.restores_request_id.as_deref().unwrap_or_default();
        match direction {
            Direction::RevertedOptOut => tracing::error!(
                direction = direction.as_str(),
                restores_request_id,
                request_id = record.request_id,
                found_by,
                "an applied opt-out was reverted in Adobe Campaign by another system; it is \
                 being restored"
            ),
            Direction::RevertedOptIn => tracing::warn!(
                direction = direction.as_str(),
                restores_request_id,
                request_id = record.request_id,
                found_by,
                "an applied opt-in was reverted in Adobe Campaign by another system; it is being \
                 restored"
            ),
        }
        Ok(record)
    }
}

impl Delivery {
    /// Starts [`Delivery::restore_drift`] as detached work and returns at once: a read answers
    /// protectively without waiting, and the restore runs to its end (its lease given back)
    /// whatever becomes of the read's call, its deadline included.
    pub fn start_restore(self: &Arc<Self>, seen: Record) {
        let delivery = Arc::clone(self);
        self.detach(async move {
            if let Err(e) = delivery.restore_drift(&seen).await {
                // The reconciler finds the drift again on its next round.
                tracing::error!(error = %e, "the restore of a reverted opt-out could not be recorded");
            }
        });
    }

    /// For a read that found ACS opted in although `seen`, the profile's latest request, is an
    /// applied opt-out: records its restore, unless the profile is being applied or re-read
    /// (its lease is held; that work sees the drift itself) or `seen` is no longer its latest.
    pub async fn restore_drift(&self, seen: &Record) -> Result<Option<Record>, LedgerError> {
        let Some(pkey) = seen.pkey.as_deref() else {
            return Ok(None);
        };
        let claim = self.new_claim();
        if !self.ledger().claim(pkey, &claim).await? {
            return Ok(None);
        }
        let restored = match self.ledger().latest_in_store(pkey).await {
            Ok(Some(latest))
                if latest.request_id == seen.request_id && latest.state == State::Applied =>
            {
                self.restore(&latest, FOUND_BY_READ).await.map(Some)
            }
            Ok(_) => Ok(None),
            Err(e) => Err(e),
        };
        self.ledger().release(pkey, &claim).await?;
        restored
    }
}

/// What re-reading one profile found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconciled {
    /// ACS holds the latest applied request.
    Held,
    /// ACS did not: a restore was recorded.
    Restored,
    /// Not re-read: another replica has it, it is not due, or a request is pending.
    Skipped,
    /// ACS could not be asked; it is tried again later.
    Unreadable,
}

/// Re-reads applied profiles and restores what drifted.
pub struct Reconciler {
    delivery: Arc<Delivery>,
    /// The background client: after every call someone is waiting for.
    acs: Client,
    settings: ReconcileSettings,
    /// The least time between two re-reads, in ms of the ledger's clock: its share of the ACS
    /// budget. Paced on the ledger's clock like the spread over the interval, so that one clock
    /// (which tests control) rules both.
    share_gap_ms: i64,
    /// Whether it warned that its share cannot cover every profile in one interval.
    short: AtomicBool,
}

impl Reconciler {
    /// A reconciler for `delivery`'s ledger, reading ACS through `acs` (in the background).
    pub fn new(delivery: Arc<Delivery>, acs: &Client, settings: ReconcileSettings) -> Self {
        // One re-read per period: a share of a few requests per second is a fraction of one.
        // Within a millisecond (the ledger clock's tick) and an hour: a share too small or too
        // large for a period is the nearest bound, never a faster rate than asked. Its ACS
        // calls also pass the client's own limit (--acs-max-rps).
        let period = Duration::try_from_secs_f64(1.0 / settings.max_rps)
            .unwrap_or(MAX_PERIOD)
            .clamp(Duration::from_millis(1), MAX_PERIOD);
        let share_gap_ms = i64::try_from(period.as_micros().div_ceil(1000)).unwrap_or(i64::MAX);
        Self {
            delivery,
            acs: acs.in_background(),
            settings,
            share_gap_ms,
            short: AtomicBool::new(false),
        }
    }

    fn ledger(&self) -> &Ledger {
        self.delivery.ledger()
    }

    fn interval_ms(&self) -> i64 {
        i64::try_from(self.settings.interval.as_millis()).unwrap_or(i64::MAX)
    }

    /// Runs until `stop`: re-reads due profiles, spread evenly over the interval (on the
    /// ledger's clock), never faster than its share of the ACS budget, and only while no
    /// delivery is due.
    pub async fn run(self, stop: CancellationToken) {
        if self.settings.interval.is_zero() {
            return;
        }
        let poll = self.delivery.settings().poll_interval;
        let mut next_at = i64::MIN;
        loop {
            match self.round(next_at).await {
                Ok(Some(next)) => next_at = next,
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "the reconciler could not read the ledger"),
            }
            // Until the next re-read is allowed, or a poll interval when nothing is due.
            let pause = match u64::try_from(next_at.saturating_sub(self.ledger().now_ms())) {
                Ok(wait_ms) if wait_ms > 0 => poll.min(Duration::from_millis(wait_ms)),
                _ => poll,
            };
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Re-reads due profiles from `next_at` on (the ledger's clock), while no delivery is due;
    /// returns when the next may be re-read, if it re-read one: the interval spread over every
    /// watched profile, and never sooner than the share allows.
    async fn round(&self, mut next_at: i64) -> Result<Option<i64>, LedgerError> {
        let ledger = self.ledger();
        let mut reread = false;
        // Counted once a round, not once a re-read: a count of every watched profile.
        let watched = ledger.reconciled_profiles().await?.max(1);
        let coverable = self.settings.max_rps * self.settings.interval.as_secs_f64();
        if watched as f64 > coverable && !self.short.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                watched,
                max_rps = self.settings.max_rps,
                "more profiles are watched than the reconciler's share re-reads in one interval: \
                 each is re-read less often (raise --reconcile-share or --reconcile-interval)"
            );
        }
        loop {
            let now = ledger.now_ms();
            // Pending deliveries first.
            if now < next_at || !ledger.due_profiles(now, 1).await?.is_empty() {
                break;
            }
            let due = ledger
                .due_for_reconcile(now.saturating_sub(self.interval_ms()), 1)
                .await?;
            let Some(pkey) = due.into_iter().next() else {
                break;
            };
            self.reconcile(&pkey).await?;
            reread = true;
            next_at = now.saturating_add((self.interval_ms() / watched).max(self.share_gap_ms));
        }
        Ok(reread.then_some(next_at))
    }

    /// Re-reads one profile under its lease, and restores it if ACS drifted from its latest
    /// applied request.
    pub async fn reconcile(&self, pkey: &str) -> Result<Reconciled, LedgerError> {
        let ledger = self.ledger();
        let claim = self.delivery.new_claim();
        if !ledger.claim(pkey, &claim).await? {
            return Ok(Reconciled::Skipped);
        }
        let reconciled = self.reconcile_held(pkey).await;
        ledger.release(pkey, &claim).await?;
        reconciled
    }

    async fn reconcile_held(&self, pkey: &str) -> Result<Reconciled, LedgerError> {
        let ledger = self.ledger();
        let now = ledger.now_ms();
        // Another replica may have re-read it since it was listed.
        match ledger.checked_at(pkey).await? {
            Some(checked_at) if checked_at < now.saturating_sub(self.interval_ms()) => {}
            _ => return Ok(Reconciled::Skipped),
        }
        let latest = match ledger.latest_in_store(pkey).await? {
            Some(latest) if latest.state == State::Applied => latest,
            // Pending: the deliverer applies it, and it is watched once applied.
            Some(latest) if latest.state == State::Pending => {
                ledger.mark_checked(pkey, now).await?;
                return Ok(Reconciled::Skipped);
            }
            _ => {
                ledger.unwatch(pkey).await?;
                return Ok(Reconciled::Skipped);
            }
        };
        let deadline = std::time::Instant::now() + self.delivery.settings().attempt_budget;
        let held = self
            .acs
            .read_profile(pkey, Some(deadline))
            .await
            .map(|profile| profile.and_then(|p| p.ccpa_opt_out));
        match held {
            Ok(Some(held)) if held == latest.opt_out => {
                ledger.mark_checked(pkey, now).await?;
                Ok(Reconciled::Held)
            }
            Ok(Some(_)) if latest.opt_out => {
                self.delivery.restore(&latest, FOUND_BY_RECONCILER).await?;
                ledger.mark_checked(pkey, now).await?;
                Ok(Reconciled::Restored)
            }
            Ok(Some(_)) => {
                // ACS holds an opt-out the latest applied request (an opt-in) does not: set by
                // another channel, perhaps the consumer's own. Writing "may sell" over it is
                // never the gateway's to do; it is reported, and reads answer it as held.
                metrics::counter!(
                    crate::telemetry::metrics::DRIFT_TOTAL,
                    "direction" => Direction::RevertedOptIn.as_str(),
                )
                .increment(1);
                tracing::warn!(
                    direction = Direction::RevertedOptIn.as_str(),
                    request_id = latest.request_id,
                    "Adobe Campaign holds an opt-out over an applied opt-in; left as it is (an \
                     opt-out is never undone by the gateway)"
                );
                ledger.mark_checked(pkey, now).await?;
                Ok(Reconciled::Held)
            }
            Ok(None) => {
                tracing::warn!(
                    "Adobe Campaign answered a profile without its opt-out; the reconciler tries \
                     it again later"
                );
                self.retry_later(pkey, now).await?;
                Ok(Reconciled::Unreadable)
            }
            Err(CallError::Api(error))
                if matches!(Failure::classify(&error), Failure::NotFound) =>
            {
                tracing::warn!(
                    request_id = latest.request_id,
                    "a profile with an applied request is no longer in Adobe Campaign; it is no \
                     longer reconciled"
                );
                ledger.unwatch(pkey).await?;
                Ok(Reconciled::Skipped)
            }
            Err(error) => {
                tracing::warn!(
                    error = %error.reason(),
                    "the reconciler could not read a profile from Adobe Campaign; it is tried \
                     again later"
                );
                self.retry_later(pkey, now).await?;
                Ok(Reconciled::Unreadable)
            }
        }
    }

    /// A profile that could not be re-read is due again [`RETRY_UNREADABLE`] from now (or an
    /// interval, if shorter), behind every profile due before it: one that ACS cannot answer
    /// does not hold up the others, nor is it asked for over and over.
    async fn retry_later(&self, pkey: &str, now: i64) -> Result<(), LedgerError> {
        let interval = self.interval_ms();
        let retry = i64::try_from(RETRY_UNREADABLE.as_millis())
            .unwrap_or(i64::MAX)
            .min(interval);
        self.ledger()
            .mark_checked(pkey, now.saturating_sub(interval).saturating_add(retry))
            .await
    }
}
