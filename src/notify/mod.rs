//! Webhooks that tell third parties of a consumer's request (issue #26): who is told, what, how
//! it is signed and sent, and the deliverer that sends each notification the ledger holds until
//! the recipient has it.
//!
//! - [`recipients`]: who is told (`--recipients`, a TOML file), and the secrets each is signed
//!   with.
//! - [`event`]: what they are told: a CloudEvents 1.0 event, holding no address or name.
//! - [`signing`]: how they can trust it: Standard Webhooks signatures, and their verification.
//! - [`sender`]: one POST of one notification, and what its answer means for a retry.
//! - [`receiver`]: a receiver that verifies and prints deliveries (`webhook-receiver`), for
//!   teams writing their own and for tests.
//! - [`deliverer`]: the loop every gateway runs: claims due notifications under a lease, sends,
//!   settles, with back-off, per recipient.

pub mod deliverer;
pub mod event;
pub mod receiver;
pub mod recipients;
pub mod sender;
pub mod signing;

pub use deliverer::{IN_FLIGHT_PER_RECIPIENT, Notifications, Notifier, NotifySettings};
