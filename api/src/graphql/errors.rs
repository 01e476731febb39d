//! GraphQL errors with a stable `extensions.code`. Business refusals say what was wrong; infrastructure
//! failures are logged with their cause and reach the client only as `INTERNAL`.

use async_graphql::{Error, ErrorExtensions};
use ledger::commands::CommandError;
use ledger::domain::values::ValueError;

/// Longest error message sent to a client, in bytes: a message never repeats a large input whole.
pub const ERROR_MESSAGE_LEN_MAX: usize = 300;

pub fn coded(code: &str, message: impl Into<String>) -> Error {
    Error::new(bounded(message.into())).extend_with(|_, e| e.set("code", code))
}

/// `message`, cut at a character boundary to at most [`ERROR_MESSAGE_LEN_MAX`] bytes.
pub fn bounded(mut message: String) -> String {
    if message.len() > ERROR_MESSAGE_LEN_MAX {
        let mut end = ERROR_MESSAGE_LEN_MAX - "…".len();
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push('…');
    }
    message
}

pub fn unauthenticated() -> Error {
    coded("UNAUTHENTICATED", "a valid bearer token is required")
}

pub fn forbidden() -> Error {
    coded("FORBIDDEN", "not allowed for this token")
}

/// An unknown portfolio, or one the caller may not see: the two answer alike, so ids cannot be probed.
pub fn portfolio_not_found() -> Error {
    coded("PORTFOLIO_NOT_FOUND", "no such portfolio")
}

/// An unknown order, or one the caller may not see (see [`portfolio_not_found`]).
pub fn order_not_found() -> Error {
    coded("ORDER_NOT_FOUND", "no such order")
}

/// `waitFor` ran out of time: the read model has not shown that position yet. Ask again (the write is
/// committed; only the view lags).
pub fn not_yet_visible() -> Error {
    coded("NOT_YET_VISIBLE", "the read model has not reached waitFor yet; the write is committed, ask again")
}

pub fn not_found(what: &str) -> Error {
    coded("NOT_FOUND", format!("no such {what}"))
}

pub fn invalid(message: impl Into<String>) -> Error {
    coded("INVALID_INPUT", message)
}

/// Logs an infrastructure error once, here, and answers generically.
pub fn internal(error: impl std::fmt::Display) -> Error {
    tracing::error!(%error, "internal error answering a request");
    coded("INTERNAL", "internal error")
}

pub fn value(error: ValueError) -> Error {
    invalid(error.to_string())
}

pub fn command(error: CommandError) -> Error {
    if error.is_business() {
        coded(error.code(), error.to_string())
    } else if matches!(error, CommandError::Contention { .. }) {
        coded("CONTENTION", "the target changed concurrently too often; retry")
    } else {
        internal(error)
    }
}

pub fn database(error: sqlx::Error) -> Error {
    internal(error)
}
