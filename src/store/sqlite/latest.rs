//! Each profile's latest request, in memory (issue #25, point 4): what a read of a recorded
//! profile needs, without a query. On a SQLite file held by this gateway, the writer thread is
//! the only writer, so it knows every change: after each commit, and before it answers the
//! batch's callers, it forgets the profiles the batch touched. A read that finds its profile
//! here answers from memory; one that does not reads the store on a reader connection and
//! leaves what it read here, unless the writer touched that profile meanwhile.
//!
//! Why a read cannot leave a stale entry: it takes a ticket (its shard's generation) before
//! reading the store, and fills only if the generation is unchanged when it does; the writer
//! bumps the generation as it forgets, after the commit, under the same lock. A read that began
//! before a commit finds the generation moved and leaves nothing. Between a commit and the
//! writer forgetting, a read may still answer what was latest before the commit: no caller has
//! been told of that commit yet, so no one can see the answer go backwards.
//!
//! Bounded: [`SHARDS`] × [`PER_SHARD`] profiles at most; a full shard forgets one entry to make
//! room. Trusted only while this process holds the file exclusively (like the known-profiles
//! filter); otherwise every read asks the store.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use super::super::Record;

/// Shards, each behind its own lock, so that readers and the writer rarely wait for each other.
const SHARDS: usize = 64;

/// Profiles per shard, at most: 65,536 in all, about 30 MB at the most (a record is a few hundred
/// bytes with its strings). A profile read again after it was dropped is read from the store.
const PER_SHARD: usize = 1_024;

/// What the writer's batch touched, for the profiles to forget after its commit.
#[derive(Debug)]
pub(in crate::store) enum Touches {
    /// No record (a lease, the reconciler's schedule, a read done as a write).
    Nothing,
    /// The records of this profile.
    Profile(String),
    /// The record with this request id, whatever its profile (a settle, which may give a
    /// creation its key): resolved to the profile within the unit's transaction.
    Request(String),
    /// Records of any profile (retention, a back-off lifted, abandoned requests failed).
    Everything,
}

pub(in crate::store) struct LatestRequests {
    trusted: AtomicBool,
    /// Whether this process holds the file exclusively: trust is given only while it does, and
    /// both change under this lock, so that a trust given by a write queued before the hold
    /// ended cannot outlive it.
    held: Mutex<bool>,
    hasher: std::collections::hash_map::RandomState,
    shards: Vec<Mutex<Shard>>,
}

#[derive(Default)]
struct Shard {
    /// Bumped each time the writer forgets a profile of this shard.
    generation: u64,
    /// `None`: the profile has no record a read answers from.
    entries: HashMap<String, Option<Record>>,
}

/// Leave to fill a profile's entry with what a read found, if nothing changed meanwhile.
#[derive(Debug)]
pub(in crate::store) struct Ticket {
    shard: usize,
    generation: u64,
}

impl LatestRequests {
    pub(in crate::store) fn new() -> Self {
        Self {
            trusted: AtomicBool::new(false),
            held: Mutex::new(false),
            hasher: std::collections::hash_map::RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
        }
    }

    fn shard(&self, index: usize) -> std::sync::MutexGuard<'_, Shard> {
        // A panic under the lock leaves at worst entries that are forgotten or refilled: every
        // operation here leaves a shard consistent before anything can panic.
        self.shards[index % SHARDS]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn shard_of(&self, pkey: &str) -> usize {
        // The remainder is below SHARDS, so it fits.
        (self.hasher.hash_one(pkey) % SHARDS as u64) as usize
    }

    fn held_lock(&self) -> std::sync::MutexGuard<'_, bool> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// This process took the file's exclusive hold, or gave it up: then nothing here is trusted
    /// any more, and everything is forgotten.
    pub(in crate::store) fn held(&self, held: bool) {
        let mut lock = self.held_lock();
        *lock = held;
        if !held {
            self.distrust();
        }
    }

    /// Trusts the entries from now on (this process is the file's only writer, and every write
    /// from now on forgets what it touches), if it still holds the file.
    pub(in crate::store) fn trust(&self) {
        let lock = self.held_lock();
        if *lock {
            self.trusted.store(true, Ordering::SeqCst);
        }
    }

    /// Trusts nothing any more, and forgets everything (the hold ended, or the writer stopped).
    pub(in crate::store) fn distrust(&self) {
        self.trusted.store(false, Ordering::SeqCst);
        self.forget_everything();
    }

    /// The profile's latest request, if known here (`Ok`); otherwise a ticket to fill it with
    /// what the store answers (`Err(None)` when nothing here is trusted).
    pub(in crate::store) fn get(&self, pkey: &str) -> Result<Option<Record>, Option<Ticket>> {
        if !self.trusted.load(Ordering::SeqCst) {
            return Err(None);
        }
        let index = self.shard_of(pkey);
        let shard = self.shard(index);
        match shard.entries.get(pkey) {
            Some(latest) => Ok(latest.clone()),
            None => Err(Some(Ticket {
                shard: index,
                generation: shard.generation,
            })),
        }
    }

    /// Leaves what a read found in the store, unless the writer forgot anything of the shard
    /// since the ticket was taken.
    pub(in crate::store) fn fill(&self, ticket: Ticket, pkey: &str, latest: &Option<Record>) {
        let mut shard = self.shard(ticket.shard);
        if shard.generation != ticket.generation || !self.trusted.load(Ordering::SeqCst) {
            return;
        }
        if shard.entries.len() >= PER_SHARD
            && !shard.entries.contains_key(pkey)
            && let Some(evicted) = shard.entries.keys().next().cloned()
        {
            shard.entries.remove(&evicted);
        }
        shard.entries.insert(pkey.to_owned(), latest.clone());
    }

    /// After a commit (or a failed one), before its callers are answered: forgets `pkeys`.
    pub(in crate::store) fn forget(&self, pkeys: &[String]) {
        for pkey in pkeys {
            let mut shard = self.shard(self.shard_of(pkey));
            shard.generation = shard.generation.wrapping_add(1);
            shard.entries.remove(pkey);
        }
    }

    /// Forgets every profile.
    pub(in crate::store) fn forget_everything(&self) {
        for index in 0..SHARDS {
            let mut shard = self.shard(index);
            shard.generation = shard.generation.wrapping_add(1);
            shard.entries.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Kind, Source, State};

    fn record(request_id: &str, pkey: &str) -> Record {
        Record {
            request_id: request_id.into(),
            kind: Kind::SetOptOut,
            pkey: Some(pkey.into()),
            opt_out: true,
            source: Source::Internal,
            received_at: 1,
            received_at_given: false,
            recorded_at: 1,
            caller: "test".into(),
            state: State::Applied,
            answered_at: Some(1),
            resolved_at: Some(1),
            attempts: 1,
            next_attempt_at: 1,
            last_error: None,
            failure_reason: None,
            failure_code: None,
            superseded_by: None,
            parent_request_id: None,
            fingerprint: None,
            restores_request_id: None,
        }
    }

    fn ticket(latest: &LatestRequests, pkey: &str) -> Ticket {
        match latest.get(pkey) {
            Err(Some(ticket)) => ticket,
            other => panic!("expected a ticket, got {other:?}"),
        }
    }

    #[test]
    fn nothing_is_answered_from_memory_until_trusted_nor_after() {
        let latest = LatestRequests::new();
        assert!(matches!(latest.get("p"), Err(None)));
        latest.held(true);
        latest.trust();
        let t = ticket(&latest, "p");
        latest.fill(t, "p", &Some(record("r1", "p")));
        assert_eq!(latest.get("p").unwrap().unwrap().request_id, "r1");
        latest.held(false);
        assert!(matches!(latest.get("p"), Err(None)));
        latest.held(true);
        latest.trust();
        assert!(
            matches!(latest.get("p"), Err(Some(_))),
            "forgotten when distrusted"
        );
        // A trust given by a write that ran after the hold ended is not given.
        latest.held(false);
        latest.trust();
        assert!(matches!(latest.get("p"), Err(None)));
    }

    #[test]
    fn a_read_that_began_before_the_writer_forgot_its_profile_leaves_nothing() {
        let latest = LatestRequests::new();
        latest.held(true);
        latest.trust();
        // A read takes its ticket, reads the store (the old latest)...
        let before = ticket(&latest, "p");
        // ...while the writer commits a new request for the profile and forgets it.
        latest.forget(&["p".to_owned()]);
        latest.fill(before, "p", &Some(record("old", "p")));
        assert!(matches!(latest.get("p"), Err(Some(_))), "no stale entry");
        // A read after the commit fills it.
        let after = ticket(&latest, "p");
        latest.fill(after, "p", &Some(record("new", "p")));
        assert_eq!(latest.get("p").unwrap().unwrap().request_id, "new");
        latest.forget_everything();
        assert!(matches!(latest.get("p"), Err(Some(_))));
    }

    #[test]
    fn memory_stays_bounded_whatever_the_number_of_profiles() {
        let latest = LatestRequests::new();
        latest.held(true);
        latest.trust();
        for i in 0..(SHARDS * PER_SHARD * 2) {
            let pkey = format!("p{i}");
            let t = ticket(&latest, &pkey);
            latest.fill(t, &pkey, &None);
        }
        let held: usize = (0..SHARDS).map(|i| latest.shard(i).entries.len()).sum();
        assert!(held <= SHARDS * PER_SHARD, "{held}");
        assert!(held > SHARDS * PER_SHARD / 2, "{held}");
    }
}
