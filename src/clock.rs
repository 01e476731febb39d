//! Where time comes from. Commands carry the time they were issued; the outer layers (API, process manager,
//! executor) take it from a [`Clock`] so that tests can fix it and nothing deep inside reads the wall clock.

use chrono::{DateTime, Utc};

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}
