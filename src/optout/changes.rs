//! The change feed's protocol: the ledger's changes after a cursor, then live ones as they are
//! recorded, read from the store a page at a time as the watcher takes them.
//!
//! A watcher's stream holds at most one page ([`PAGE`] changes): a slow watcher is read on from
//! the store when it takes more, never buffered. When it has seen every change, the store is
//! asked again every [`FOLLOW_INTERVAL`]; changes recorded by any replica sharing the ledger are
//! in the store, so every watcher sees them, whichever replica it is connected to.

use std::collections::VecDeque;
use std::time::Duration;

use futures::Stream;
use tokio_util::sync::CancellationToken;

use crate::store::{Change, ChangePosition, ChangesAfter, Ledger, LedgerError};

/// Changes read from the store at once for one watcher.
pub const PAGE: u32 = 256;

/// How often a watcher that has seen every change asks the store again: how late, at most, a
/// live change reaches it.
pub const FOLLOW_INTERVAL: Duration = Duration::from_millis(200);

/// Why a feed ended.
#[derive(Debug, thiserror::Error)]
pub enum FeedEnded {
    /// Retention has pruned changes after the cursor.
    #[error("retention has pruned the ledger's changes after this cursor")]
    CursorExpired,
    /// The gateway is shutting down.
    #[error("the gateway is shutting down")]
    ShuttingDown,
    /// The ledger failed.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

struct Follow {
    ledger: Ledger,
    after: Option<ChangePosition>,
    include_opt_ins: bool,
    page: VecDeque<Change>,
    end: CancellationToken,
    ended: bool,
}

/// The changes of `ledger` after `after` (from the oldest retained without one), opt-ins only
/// with `include_opt_ins`, then live ones, until `end` is cancelled (then [`FeedEnded::ShuttingDown`])
/// or an error ends it.
pub fn follow(
    ledger: Ledger,
    after: Option<ChangePosition>,
    include_opt_ins: bool,
    end: CancellationToken,
) -> impl Stream<Item = Result<Change, FeedEnded>> + Send + 'static {
    let state = Follow {
        ledger,
        after,
        include_opt_ins,
        page: VecDeque::new(),
        end,
        ended: false,
    };
    futures::stream::unfold(state, |mut feed| async move {
        if feed.ended {
            return None;
        }
        loop {
            if let Some(change) = feed.page.pop_front() {
                feed.after = Some(change.at);
                return Some((Ok(change), feed));
            }
            if feed.end.is_cancelled() {
                feed.ended = true;
                return Some((Err(FeedEnded::ShuttingDown), feed));
            }
            match feed
                .ledger
                .changes_after(feed.after, feed.include_opt_ins, PAGE)
                .await
            {
                Ok(ChangesAfter::Changes(changes)) if changes.is_empty() => {
                    tokio::select! {
                        () = feed.end.cancelled() => {}
                        () = tokio::time::sleep(FOLLOW_INTERVAL) => {}
                    }
                }
                Ok(ChangesAfter::Changes(changes)) => feed.page = changes.into(),
                Ok(ChangesAfter::Expired) => {
                    feed.ended = true;
                    return Some((Err(FeedEnded::CursorExpired), feed));
                }
                Err(error) => {
                    feed.ended = true;
                    return Some((Err(error.into()), feed));
                }
            }
        }
    })
}
