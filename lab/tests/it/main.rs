//! The lab's binary, run as users run it, against the real PostgreSQL and broker. The helpers are the API
//! tests' own.

mod suites;
#[allow(dead_code)]
#[path = "../../../api/tests/it/support.rs"]
mod support;
