//! Reads of the read models for the API and the operations commands. The GraphQL layer maps these rows to its
//! types; what a read model holds and how it is queried stays here, next to the projections that write it.

pub mod portfolios;
