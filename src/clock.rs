//! The one clock every time rule reads: leases, back-off, the overdue clock, retention, token
//! expiry. It is defined in the ACS client crate, whose token refresh reads it too; tests drive
//! a [`ManualClock`] instead of sleeping.

pub use acs_profile_client::{Clock, ManualClock, TokioClock};
