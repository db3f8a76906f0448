//! The read half of the protocol: what ACS holds about a profile's opt-out, made protective by the
//! ledger, and what ACS holds after a change was applied (the read-back).
//!
//! A pending opt-out reads as opted out, even while ACS is unreachable; a pending opt-in changes
//! nothing until ACS holds it; an applied opt-out that ACS no longer holds (drift) reads as opted
//! out, and its restore starts as work of its own. Each profile's answer carries the consumer's
//! latest request. By email: every profile of the address.

use std::sync::Arc;
use std::time::Instant;

use acs_profile_client::{CallError, types};
use futures::{StreamExt, stream};

use super::delivery::Delivery;
use super::submit::Submitted;
use crate::health::UpstreamSignal;
use crate::store::{LedgerError, Record, State};
use crate::upstream::UpstreamError;

/// Profiles of one email address worked at once: a few, so that one address with many profiles
/// does not take the whole throttle toward ACS from every other caller.
pub const EMAIL_PROFILE_CONCURRENCY: usize = 4;

/// What ACS holds about one profile's opt-out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// Whether the profile is opted out of sale.
    pub opt_out: bool,
    /// When the opt-out last changed, as ACS wrote it (`2020-07-31 11:19:00.304Z`); empty or
    /// absent when it never did.
    pub last_modified: Option<String>,
}

impl Held {
    /// What `profile` holds; a profile without its opt-out broke ACS's contract.
    pub fn of(profile: &types::Profile) -> Result<Self, UpstreamError> {
        Ok(Self {
            // Never default a missing flag to false: that would read as "may sell".
            opt_out: profile
                .ccpa_opt_out
                .ok_or(UpstreamError::MissingField("ccpaOptOut"))?,
            last_modified: profile.ccpa_opt_out_last_modified.clone(),
        })
    }
}

/// One profile's answer to a read.
#[derive(Debug, Clone)]
pub struct Reading {
    /// The profile's key.
    pub pkey: String,
    /// The protective answer: opted out of sale.
    pub opt_out: bool,
    /// When ACS last changed it, as ACS wrote it (absent when ACS could not be read).
    pub last_modified: Option<String>,
    /// A request for the profile is recorded and not yet held by ACS.
    pub change_pending: bool,
    /// ACS no longer holds the profile's applied opt-out; its restore has started.
    pub drift_detected: bool,
    /// The consumer's latest request for the profile (never a restore).
    pub latest_request: Option<Record>,
}

/// Which profiles a read is about.
#[derive(Debug, Clone, Copy)]
pub enum ReadTarget<'a> {
    /// One profile, by its key.
    Key(&'a str),
    /// Every profile with this address, at most `max_profiles` of them.
    Email {
        /// The address.
        email: &'a str,
        /// More profiles than this are refused.
        max_profiles: usize,
    },
}

/// Why a read has no answer.
#[derive(Debug)]
pub enum ReadFailure {
    /// ACS failed, and the ledger holds nothing that answers for it.
    Upstream(UpstreamError),
    /// The ledger could not be read.
    Ledger(LedgerError),
    /// No profile has the address.
    EmailNotFound,
    /// More profiles have the address than the read may reach (`max_profiles`).
    TooManyProfiles(usize),
}

impl From<UpstreamError> for ReadFailure {
    fn from(error: UpstreamError) -> Self {
        Self::Upstream(error)
    }
}

impl From<LedgerError> for ReadFailure {
    fn from(error: LedgerError) -> Self {
        Self::Ledger(error)
    }
}

/// What the ledger holds for one profile being read. It is held while the read waits for ACS,
/// as thousands of reads may at once: its records are boxed, so that each waiting read holds two
/// pointers, not two records (576 bytes).
struct Recorded {
    /// Its newest request not overtaken, restores included: what ACS holds, or is about to.
    latest: Option<Box<Record>>,
    /// The consumer's latest request: `latest`, or the request it restores.
    consumers: Option<Box<Record>>,
}

/// What submitting one profile's request came to, once ACS was read back.
#[derive(Debug)]
pub enum Submission {
    /// Recorded now; where it stands.
    Delivered(Delivered),
    /// Its id was recorded before, for the same request.
    Replay(Record),
    /// Its id was recorded before, for a different request.
    Conflict,
}

/// Where one profile's record stands after the call's attempt.
#[derive(Debug)]
pub struct Delivered {
    /// The record as the call left it.
    pub record: Record,
    /// Its state (FAILED carries its basis in the record).
    pub state: State,
    /// What ACS holds, read back after an APPLIED change (when the read-back worked).
    pub held: Option<Held>,
}

impl Delivered {
    /// The opt-out the profile has now: what ACS holds, else what was asked.
    pub fn opt_out(&self) -> bool {
        self.held
            .as_ref()
            .map_or(self.record.opt_out, |h| h.opt_out)
    }
}

impl Delivery {
    /// Passes a call's outcome by the health tracker on its way back.
    pub(super) async fn noted<T>(&self, result: Result<T, CallError>) -> Result<T, UpstreamError> {
        self.health().observe(UpstreamSignal::of(&result)).await;
        result.map_err(UpstreamError::from)
    }

    /// The profile as ACS holds it now.
    pub async fn read_profile(
        &self,
        pkey: &str,
        deadline: Option<Instant>,
    ) -> Result<types::Profile, UpstreamError> {
        self.noted(self.acs().read_profile(pkey, deadline).await)
            .await?
            .ok_or(UpstreamError::EmptyCollection)
    }

    /// The profile's opt-out as ACS holds it now.
    pub async fn read_held(
        &self,
        pkey: &str,
        deadline: Option<Instant>,
    ) -> Result<Held, UpstreamError> {
        Held::of(&self.read_profile(pkey, deadline).await?)
    }

    /// The protective answer for each profile of `target` (see the module's rules).
    pub async fn read(
        self: &Arc<Self>,
        target: ReadTarget<'_>,
        deadline: Option<Instant>,
    ) -> Result<Vec<Reading>, ReadFailure> {
        let (email, max_profiles) = match target {
            ReadTarget::Key(pkey) => {
                let recorded = self.recorded(pkey).await?;
                let held = self.read_held(pkey, deadline).await;
                return Ok(vec![self.protective(pkey, held, recorded)?]);
            }
            ReadTarget::Email {
                email,
                max_profiles,
            } => (email, max_profiles),
        };
        let found = self
            .noted(self.acs().profiles_by_email(email, deadline).await)
            .await?;
        if found.is_empty() {
            return Err(ReadFailure::EmailNotFound);
        }
        if found.len() > max_profiles {
            return Err(ReadFailure::TooManyProfiles(max_profiles));
        }
        // By index: a closure over `&Profile` would be higher-ranked, which the `Send` bound of
        // the service's futures cannot see through.
        stream::iter(0..found.len())
            .map(|n| self.found_profile(&found[n]))
            .buffered(EMAIL_PROFILE_CONCURRENCY)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect()
    }

    /// The answer for a profile found by email (ACS has answered it already).
    async fn found_profile(
        self: &Arc<Self>,
        profile: &types::Profile,
    ) -> Result<Reading, ReadFailure> {
        let pkey = profile
            .p_key
            .clone()
            .ok_or(UpstreamError::MissingField("PKey"))?;
        let held = Held::of(profile);
        let recorded = self.recorded(&pkey).await?;
        self.protective(&pkey, held, recorded)
    }

    /// What the ledger holds for a profile: its newest request not overtaken (restores
    /// included), and the consumer's latest request (the one a restore restores).
    async fn recorded(&self, pkey: &str) -> Result<Recorded, LedgerError> {
        let latest = self.ledger().latest(pkey).await?.map(Box::new);
        let consumers = match latest
            .as_ref()
            .and_then(|latest| latest.restores_request_id.as_deref())
        {
            Some(restored) => self.ledger().get(restored).await?.map(Box::new),
            None => latest.clone(),
        };
        Ok(Recorded { latest, consumers })
    }

    /// A profile's answer: what ACS holds (`held`), made protective by the ledger. A pending
    /// opt-out reads as opted out, even while ACS cannot answer; an applied opt-out that ACS no
    /// longer holds is drift: it reads as opted out, and its restore starts at once.
    fn protective(
        self: &Arc<Self>,
        pkey: &str,
        held: Result<Held, UpstreamError>,
        recorded: Recorded,
    ) -> Result<Reading, ReadFailure> {
        let Recorded { latest, consumers } = recorded;
        let pending = latest
            .as_ref()
            .filter(|latest| latest.state == State::Pending)
            .map(|latest| latest.opt_out);
        let applied_opt_out = latest
            .as_ref()
            .filter(|latest| latest.state == State::Applied && latest.opt_out);
        let mut drift_detected = false;
        let (opt_out, last_modified) = match (held, pending) {
            (Ok(held), Some(true)) => (true, held.last_modified),
            (Ok(held), _) if !held.opt_out && applied_opt_out.is_some() => {
                drift_detected = true;
                if let Some(seen) = applied_opt_out {
                    // The answer does not wait on the restore's fate (the reconciler retries),
                    // and the restore does not depend on the call's.
                    self.start_restore(Record::clone(seen));
                }
                (true, held.last_modified)
            }
            (Ok(held), _) => (held.opt_out, held.last_modified),
            // ACS cannot say, but the ledger can: this consumer asked not to be sold (a pending
            // opt-out, or an applied one that is the profile's latest request).
            (Err(error), pending)
                if !error.is_not_found()
                    && (pending == Some(true)
                        || (pending.is_none() && applied_opt_out.is_some())) =>
            {
                (true, None)
            }
            (Err(error), _) => return Err(ReadFailure::Upstream(error)),
        };
        Ok(Reading {
            pkey: pkey.to_owned(),
            opt_out,
            last_modified,
            change_pending: pending.is_some(),
            drift_detected,
            latest_request: consumers.map(|consumers| *consumers),
        })
    }

    /// Where a submitted request stands, for the answer; once ACS holds it, with what ACS holds
    /// read back.
    pub async fn read_back(&self, submitted: Submitted, deadline: Option<Instant>) -> Submission {
        let (record, state) = match submitted {
            Submitted::Conflict => return Submission::Conflict,
            Submitted::Replay(record) => return Submission::Replay(record),
            Submitted::Applied(record) => (record, State::Applied),
            Submitted::Pending(record) => (record, State::Pending),
            Submitted::Superseded(record) => (record, State::Superseded),
            Submitted::Failed(record) => (record, State::Failed),
        };
        let mut held = None;
        if state == State::Applied
            && let Some(pkey) = record.pkey.as_deref()
        {
            // ACS answers a PATCH with `{PKey, href}` only. Reading the profile back costs a
            // second call, but it lets the answer say what ACS holds (and when it changed)
            // rather than echo what was asked. If the read fails, the change is still applied.
            match self.read_held(pkey, deadline).await {
                Ok(read) => {
                    if read.opt_out != record.opt_out {
                        tracing::warn!("the opt-out read back differs from the one just set");
                    }
                    held = Some(read);
                }
                Err(error) => tracing::warn!(
                    error = error.reason(),
                    "applied, but the read-back failed; answering the value set"
                ),
            }
        }
        Submission::Delivered(Delivered {
            record,
            state,
            held,
        })
    }
}
