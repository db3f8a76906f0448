//! The opt-out protocol, both halves, over the ledger's store (`crate::store`) and ACS: a
//! consumer's request is recorded durably first, then applied to ACS within its call or later by
//! the deliverer, until ACS holds it; a read answers protectively from ACS and the ledger
//! together, and puts back what other systems changed (drift).
//!
//! By job: `read` (the protective read, the drift restore it starts, the read-back), `submit` (a profile's request: recorded, then applied within the call or later),
//! `by_email` (a request by email, fanned out to its profiles), `creation` (a profile created with
//! an opt-out), `delivery` (attempts, and the deliverer), `reconcile` (what other systems changed
//! in ACS, put back), `failure` (what an upstream failure means for a request),
//! `business_days` (the legal clock), `retention` (how long records are kept), `changes` (the
//! ledger's changes, followed by watchers).

pub mod business_days;
mod by_email;
pub mod changes;
mod creation;
pub mod delivery;
mod failure;
pub mod read;
pub mod reconcile;
pub mod retention;
mod submit;

pub use by_email::{ByEmailFailure, EmailRequest, RESERVED_REQUEST_ID_SEPARATOR, SubmittedByEmail};
pub use creation::{Created, CreatedProfile, NewProfile};
pub use delivery::{Delivery, DeliverySettings};
pub use retention::MIN_RETENTION;
pub use submit::{Apply, Submitted};
