//! Delivery of notifications to the recipients: every gateway runs a [`Notifier`], which keeps
//! the ledger's list of recipients in step with the recipients file and runs one worker per
//! recipient. A worker claims its recipient's due notifications under a lease (so one gateway
//! at a time attempts each), sends each signed event, and settles it: delivered on 2xx, retried
//! with back-off on what may pass, failed for good on any other answer or once retries have
//! lasted `--notify-give-up`. Workers share nothing but the ledger: a slow or failing recipient
//! delays no other, and no consumer's request (they are recorded without waiting for any).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use governor::{Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::event::{self, Notice};
use super::recipients::{Recipient, Recipients};
use super::sender::{Answer, Sender};
use super::signing;
use crate::access::watched::{RELOAD_INTERVAL, Watched};
use crate::backoff::Backoff;
use crate::optout::Delivery;
use crate::store::{Delivered, DueNotification, Ledger, RecipientEvents, Settle};
use crate::telemetry::metrics as names;

/// How the notifier works.
#[derive(Debug, Clone, Copy)]
pub struct NotifySettings {
    /// Retries end this long after the request was recorded (`--notify-give-up`).
    pub give_up: Duration,
    /// Bound on one attempt: connecting, sending, and the answer's head and body.
    pub timeout: Duration,
    /// How often an idle worker looks for due notifications.
    pub poll_interval: Duration,
    /// Waits between attempts of one notification.
    pub backoff: Backoff,
}

impl Default for NotifySettings {
    fn default() -> Self {
        Self {
            give_up: Duration::from_secs(72 * 3600),
            timeout: Duration::from_secs(10),
            poll_interval: Duration::from_millis(200),
            backoff: Backoff::NOTIFICATION,
        }
    }
}

/// Requests one recipient has in flight at most, from this gateway.
pub const IN_FLIGHT_PER_RECIPIENT: usize = 16;

/// Notifications of one recipient a gateway has claimed and not yet settled, at most: claimed
/// in batches (a claim is a write to the ledger), sent IN_FLIGHT_PER_RECIPIENT at a time.
const CLAIMED_PER_RECIPIENT: usize = 128;

/// The `outcome` label of [`names::NOTIFICATIONS_TOTAL`].
mod outcome {
    pub const DELIVERED: &str = "delivered";
    pub const RETRIED: &str = "retried";
    pub const FAILED: &str = "failed";
}

/// Which third parties are told of consumer requests, and how: `serve`'s settings.
#[derive(Clone, Default)]
pub struct Notifications {
    /// The recipients file, reloaded when it changes; none: no one is told.
    pub recipients: Option<Arc<Watched<Recipients>>>,
    /// How notifications are delivered.
    pub settings: NotifySettings,
}

/// Keeps the ledger's recipients in step with the file, and delivers to each.
pub struct Notifier {
    ledger: Ledger,
    recipients: Option<Arc<Watched<Recipients>>>,
    /// What `recipients` is without a file: no one.
    no_one: Arc<Recipients>,
    sender: Sender,
    settings: NotifySettings,
    /// Keeps a SQLite ledger's exclusive hold (which the deliverer holds) for as long as this
    /// can write to it.
    _delivery: Arc<Delivery>,
}

/// An attempt's answer, waiting to be recorded; its permit goes back once it is.
struct Answered {
    notification: DueNotification,
    answer: Answer,
    _permit: OwnedSemaphorePermit,
}

/// A recipient's worker, while it runs.
struct Worker {
    stop: CancellationToken,
    /// The `max_rps` it was started with: a change starts a new worker.
    max_rps: NonZeroU32,
}

impl Notifier {
    /// A notifier over the ledger of `delivery`.
    pub fn new(delivery: Arc<Delivery>, notifications: Notifications) -> Result<Self, String> {
        let sender = Sender::new(notifications.settings.timeout)?;
        Ok(Self {
            ledger: delivery.ledger().clone(),
            recipients: notifications.recipients,
            no_one: Arc::new(Recipients::default()),
            sender,
            settings: notifications.settings,
            _delivery: delivery,
        })
    }

    /// The recipients in force.
    fn recipients(&self) -> Arc<Recipients> {
        self.recipients
            .as_ref()
            .map_or_else(|| self.no_one.clone(), |watched| watched.current())
    }

    /// Runs until `stop`: writes each version of the recipients file into the ledger (once it
    /// is there, requests recorded are notified to its recipients), and keeps one worker per
    /// recipient. On `stop`, the workers give back what they claimed and did not attempt.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut synced: Option<Arc<Recipients>> = None;
        let mut workers: HashMap<String, Worker> = HashMap::new();
        let mut tasks = JoinSet::new();
        loop {
            let current = self.recipients();
            if synced.as_ref().is_none_or(|s| !Arc::ptr_eq(s, &current)) {
                let events: Vec<RecipientEvents> = current
                    .list
                    .iter()
                    .map(|r| RecipientEvents {
                        id: r.id.clone(),
                        opt_out: r.opt_out,
                        opt_in: r.opt_in,
                    })
                    .collect();
                match self.ledger.set_recipients(&events).await {
                    Ok(()) => {
                        tracing::info!(recipients = events.len(), "notification recipients set");
                        synced = Some(current.clone());
                    }
                    // Tried again at the next look; requests are notified to the recipients the
                    // ledger knew meanwhile.
                    Err(e) => {
                        tracing::error!(error = %e, "the recipients could not be written to the ledger")
                    }
                }
                workers.retain(|id, worker| {
                    let kept = current
                        .list
                        .iter()
                        .any(|r| &r.id == id && r.max_rps == worker.max_rps);
                    if !kept {
                        worker.stop.cancel();
                    }
                    kept
                });
                for recipient in &current.list {
                    if workers.contains_key(&recipient.id) {
                        continue;
                    }
                    // Every outcome's series exists from the start, at 0: a first failure is
                    // then an increase that rules and dashboards see.
                    for label in [outcome::DELIVERED, outcome::RETRIED, outcome::FAILED] {
                        metrics::counter!(
                            names::NOTIFICATIONS_TOTAL,
                            "recipient" => recipient.id.clone(),
                            "outcome" => label,
                        )
                        .increment(0);
                    }
                    let worker_stop = stop.child_token();
                    workers.insert(
                        recipient.id.clone(),
                        Worker {
                            stop: worker_stop.clone(),
                            max_rps: recipient.max_rps,
                        },
                    );
                    tasks.spawn(self.clone().serve(
                        recipient.id.clone(),
                        recipient.max_rps,
                        worker_stop,
                    ));
                }
            }
            while tasks.try_join_next().is_some() {}
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(RELOAD_INTERVAL) => {}
            }
        }
        while tasks.join_next().await.is_some() {}
    }

    /// One recipient's worker: claims what is due as requests in flight finish, sends each at
    /// the recipient's rate, and records the answers that have come in together (one commit for
    /// all of them), until `stop` or the recipient leaves the file.
    async fn serve(self: Arc<Self>, id: String, max_rps: NonZeroU32, stop: CancellationToken) {
        // Unique to this worker: a settle counts only under its own lease.
        let holder = format!("{}/{id}", uuid::Uuid::new_v4());
        let limiter = Arc::new(RateLimiter::direct(Quota::per_second(max_rps)));
        // A permit is held from the claim until the answer is recorded: at most this many
        // notifications are claimed and not yet settled.
        let permits = Arc::new(Semaphore::new(CLAIMED_PER_RECIPIENT));
        // And one from the send until its answer: at most this many requests in flight.
        let sending = Arc::new(Semaphore::new(IN_FLIGHT_PER_RECIPIENT));
        let (answered, mut answers) = mpsc::unbounded_channel::<Answered>();
        let settler = tokio::spawn({
            let this = self.clone();
            let holder = holder.clone();
            async move {
                while let Some(first) = answers.recv().await {
                    let mut batch = vec![first];
                    while let Ok(next) = answers.try_recv() {
                        batch.push(next);
                    }
                    this.settle(&holder, batch).await;
                }
            }
        });
        let mut attempts = JoinSet::new();
        loop {
            while attempts.try_join_next().is_some() {}
            // While answers are still to come, wait for half the window to be free, so that one
            // claim (a write to the ledger) takes many notifications; idle, take what is due.
            let busy = CLAIMED_PER_RECIPIENT - permits.available_permits();
            let wanted = if busy == 0 {
                1
            } else {
                CLAIMED_PER_RECIPIENT / 2
            };
            let mut taken = tokio::select! {
                () = stop.cancelled() => break,
                // The window is at least `wanted`: the semaphore is never closed.
                permit = permits.clone().acquire_many_owned(u32::try_from(wanted).unwrap_or(1)) => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            while let Ok(more) = permits.clone().try_acquire_owned() {
                taken.merge(more);
            }
            let count = taken.num_permits();
            // Long enough for the rate's wait before the last of them, and every round of
            // attempts before it (at IN_FLIGHT_PER_RECIPIENT at once), twice.
            let rounds = u32::try_from(count.div_ceil(IN_FLIGHT_PER_RECIPIENT)).unwrap_or(u32::MAX);
            let rate_wait = Duration::from_secs(
                u64::try_from(count).unwrap_or(u64::MAX) / u64::from(max_rps.get()) + 1,
            );
            let lease = rate_wait
                .saturating_add(self.settings.timeout.saturating_mul(rounds))
                .saturating_mul(2);
            let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
            let limit = i64::try_from(count).unwrap_or(1);
            let due = match self
                .ledger
                .claim_notifications(&id, &holder, lease_ms, limit)
                .await
            {
                Ok(due) => due,
                Err(e) => {
                    tracing::error!(error = %e, recipient = id, "notifications could not be claimed");
                    Vec::new()
                }
            };
            if due.is_empty() {
                drop(taken);
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(self.settings.poll_interval) => {}
                }
                continue;
            }
            for notification in due {
                // One of the `count` taken, each for one notification (more than are due go
                // back when `taken` drops).
                let Some(permit) = taken.split(1) else {
                    break;
                };
                let this = self.clone();
                let limiter = limiter.clone();
                let sending = sending.clone();
                let answered = answered.clone();
                attempts.spawn(async move {
                    let Ok(_in_flight) = sending.acquire().await else {
                        return;
                    };
                    limiter.until_ready().await;
                    let recipients = this.recipients();
                    // Taken out of the file since the claim: its lease lapses, and it waits.
                    let Some(recipient) = recipients.get(&notification.recipient) else {
                        return;
                    };
                    let answer = this.send(recipient, &notification).await;
                    let _ = answered.send(Answered {
                        notification,
                        answer,
                        _permit: permit,
                    });
                });
            }
        }
        // Attempts cut short may have reached the recipient: they are sent again (a receiver
        // drops duplicates by `webhook-id`). The answers already in are recorded first.
        attempts.abort_all();
        while attempts.join_next().await.is_some() {}
        drop(answered);
        let _ = settler.await;
        if let Err(e) = self.ledger.release_notifications(&holder).await {
            tracing::warn!(error = %e, recipient = id, "claimed notifications are left to their lease");
        }
    }

    /// Records what the answers in `batch` mean, in one unit of work.
    async fn settle(&self, holder: &str, batch: Vec<Answered>) {
        let now = self.ledger.now_ms();
        let give_up_ms = i64::try_from(self.settings.give_up.as_millis()).unwrap_or(i64::MAX);
        let mut settles = Vec::with_capacity(batch.len());
        let mut logged = Vec::with_capacity(batch.len());
        for Answered {
            notification,
            answer,
            ..
        } in &batch
        {
            let (outcome, label) = self.outcome(notification, answer, now, give_up_ms);
            metrics::counter!(
                names::NOTIFICATIONS_TOTAL,
                "recipient" => notification.recipient.clone(),
                "outcome" => label,
            )
            .increment(1);
            logged.push((notification, label, answer.failure_class()));
            settles.push(Settle {
                created_at: notification.created_at,
                request_id: notification.request_id.clone(),
                recipient: notification.recipient.clone(),
                outcome,
            });
        }
        match self.ledger.settle_notifications(holder, settles).await {
            Ok(settled) => {
                for ((notification, label, failure_class), settled) in
                    logged.into_iter().zip(settled)
                {
                    if settled {
                        tracing::info!(
                            request_id = notification.request_id,
                            recipient = notification.recipient,
                            outcome = label,
                            failure_class,
                            attempts = notification.attempts + 1,
                            "notified a recipient"
                        );
                    } else {
                        tracing::warn!(
                            request_id = notification.request_id,
                            recipient = notification.recipient,
                            "a notification's lease lapsed during its attempt; the gateway \
                             holding it now decides"
                        );
                    }
                }
            }
            Err(e) => tracing::error!(
                error = %e,
                answers = batch.len(),
                "answers of notifications could not be recorded; they are tried again when \
                 their leases lapse"
            ),
        }
    }

    /// What `answer` means for `notification`, now: the outcome to record, and its label.
    fn outcome(
        &self,
        notification: &DueNotification,
        answer: &Answer,
        now: i64,
        give_up_ms: i64,
    ) -> (Delivered, &'static str) {
        let given_up = now.saturating_sub(notification.created_at) >= give_up_ms;
        match answer {
            Answer::Delivered { .. } => (Delivered::Yes, outcome::DELIVERED),
            Answer::Retry { class, .. } if given_up => (
                Delivered::Failed {
                    class: class.clone(),
                    reason: format!(
                        "still not delivered after --notify-give-up ({}): retries ended",
                        humantime::format_duration(self.settings.give_up)
                    ),
                },
                outcome::FAILED,
            ),
            Answer::Retry { class, retry_after } => {
                let backoff = self.settings.backoff.after_ms(notification.attempts);
                let asked = retry_after.map_or(0, |after| {
                    i64::try_from(after.as_millis()).unwrap_or(i64::MAX)
                });
                (
                    Delivered::Retry {
                        class: class.clone(),
                        next_attempt_at: now.saturating_add(backoff.max(asked)),
                    },
                    outcome::RETRIED,
                )
            }
            Answer::Rejected { class } => (
                Delivered::Failed {
                    class: class.clone(),
                    reason: format!("the recipient answered {class}, which is not retried"),
                },
                outcome::FAILED,
            ),
        }
    }

    /// The signed event, sent.
    async fn send(&self, recipient: &Recipient, notification: &DueNotification) -> Answer {
        let notice = Notice {
            request_id: notification.request_id.clone(),
            recipient: notification.recipient.clone(),
            pkey: notification.pkey.clone(),
            opt_out: notification.opt_out,
            source: notification.source.as_str(),
            received_at_ms: notification.received_at,
            email_sha256: notification.email_sha256.clone(),
        };
        let body = event::body(&notice, notification.created_at);
        let id = event::event_id(&notification.request_id, &notification.recipient);
        // The receiver checks the signing time against its own clock: the real one, whatever
        // the ledger's.
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| {
                i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
            });
        let signature = signing::signature_header(&recipient.secrets, &id, timestamp, &body);
        self.sender
            .send(&recipient.url, &id, timestamp, &signature, body)
            .await
    }

    /// Sets each recipient's pending and oldest-age gauges from the ledger (before each scrape).
    pub async fn observe_pending(&self) {
        let now = self.ledger.now_ms();
        match self.ledger.notification_backlog().await {
            Ok(backlog) => {
                let recipients = self.recipients();
                // Those in the file, and any other with notifications still pending (one
                // taken out of the file).
                let ids: std::collections::BTreeSet<&str> = recipients
                    .list
                    .iter()
                    .map(|r| r.id.as_str())
                    .chain(backlog.iter().map(|b| b.recipient.as_str()))
                    .collect();
                for id in ids {
                    let entry = backlog.iter().find(|b| b.recipient == id);
                    let pending = entry.map_or(0, |b| b.pending);
                    let age_ms = entry
                        .and_then(|b| b.oldest_created_at)
                        .map_or(0, |oldest| now.saturating_sub(oldest).max(0));
                    metrics::gauge!(names::NOTIFICATIONS_PENDING, "recipient" => id.to_owned())
                        .set(pending as f64);
                    metrics::gauge!(
                        names::NOTIFICATIONS_OLDEST_PENDING_AGE_SECONDS,
                        "recipient" => id.to_owned()
                    )
                    .set(age_ms as f64 / 1000.0);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "the notification gauges could not read the ledger")
            }
        }
    }
}
