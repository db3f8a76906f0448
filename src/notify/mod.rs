//! Webhooks that tell third parties of a consumer's request (issue #26): the parts that do not
//! touch the ledger.
//!
//! - [`event`]: what they are told: a CloudEvents 1.0 event, holding no address or name.

pub mod event;
