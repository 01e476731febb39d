//! The global log (auditors and admins), dead letters (admins), and the query limits (with the parse cache).

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use async_graphql::connection::{Connection, ConnectionNameType, Edge, EdgeNameType, EmptyFields};
use async_graphql::extensions::{Extension, ExtensionContext, ExtensionFactory, NextParseQuery};
use async_graphql::parser::types::{ExecutableDocument, Selection, SelectionSet};
use async_graphql::{Context, Object, OutputType, Result, ServerError, ServerResult, Variables};
use ledger::log::LogReader;
use lru::LruCache;

use super::errors::{database, forbidden, invalid};
use ledger::queries::operations::{dead_letters, DeadLetterRow as DeadLetter};

use super::scalars::LogPosition;
use super::types::Event;
use super::{page_size, principal, state};

/// The global log's connection type is `LogConnection` (`EventConnection` is an aggregate's history, whose
/// cursor is a sequence number rather than a log position).
pub struct LogConnectionName;

impl ConnectionNameType for LogConnectionName {
    fn type_name<T: OutputType>() -> String {
        "LogConnection".into()
    }
}

pub struct LogEdgeName;

impl EdgeNameType for LogEdgeName {
    fn type_name<T: OutputType>() -> String {
        "LogEdge".into()
    }
}

pub type LogConnection = Connection<LogPosition, Event, EmptyFields, EmptyFields, LogConnectionName, LogEdgeName>;

#[derive(Default)]
pub struct LogQuery;

#[Object]
impl LogQuery {
    /// The global log in commit order; the cursor is the log position. Auditors and admins only.
    #[graphql(complexity = "super::page_size(first) * child_complexity")]
    async fn log(&self, ctx: &Context<'_>, first: Option<i32>, after: Option<LogPosition>) -> Result<LogConnection> {
        if !principal(ctx)?.can_read_log() {
            return Err(forbidden());
        }
        let limit = page_size(first);
        let start = after.map_or(ledger::log::LogPosition::START, |p| p.0);
        let mut reader = LogReader::new(state(ctx).pool.clone(), start).with_batch_size(limit + 1);
        let events = reader.read_batch().await.map_err(database)?;
        let mut connection = LogConnection::new(after.is_some(), events.len() > limit);
        connection.edges.extend(
            events
                .iter()
                .take(limit)
                .map(|e| Edge::with_additional_fields(LogPosition(e.position), Event::from(e), EmptyFields)),
        );
        Ok(connection)
    }

    /// Messages the projection workers could not process, newest first (`open: true`: only those neither
    /// replayed nor discarded). Admins only; `replayDeadLetter` and `discardDeadLetter` resolve them.
    #[graphql(complexity = "super::page_size(first) * child_complexity")]
    async fn dead_letters(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = false)] open: bool,
        first: Option<i32>,
        after: Option<String>,
    ) -> Result<Connection<String, DeadLetter>> {
        if !principal(ctx)?.is_admin() {
            return Err(forbidden());
        }
        let limit = page_size(first);
        let before: Option<i64> = after.as_deref().map(|a| a.parse().map_err(|_| invalid("bad cursor"))).transpose()?;
        let rows = dead_letters(&state(ctx).pool, open, before, limit as i64 + 1).await.map_err(database)?;
        let mut connection = Connection::new(after.is_some(), rows.len() > limit);
        connection.edges.extend(rows.into_iter().take(limit).map(|row| Edge::new(row.id.to_string(), row)));
        Ok(connection)
    }
}

/// Parses each distinct query text once and refuses operations with more than N aliases (aliases multiply
/// work without making a query deeper) or more than one field waiting for a log position (`waitFor`: each
/// would hold the request and the database).
///
/// Clients send the same few operations over and over with different variables; parsing was the largest
/// single cost of a small mutation. A document depends on the query text alone (variables are bound later),
/// so documents that passed the checks are kept in a bounded LRU keyed by the text and cloned per request.
/// Texts longer than [`PARSE_CACHE_TEXT_MAX`] are parsed every time, so the cache holds at most
/// [`PARSE_CACHE_ENTRIES`] × that many bytes of query text plus their documents.
pub struct QueryLimits {
    aliases_max: usize,
    parsed: Arc<Mutex<LruCache<String, ExecutableDocument>>>,
}

/// Distinct query texts whose documents are kept.
pub const PARSE_CACHE_ENTRIES: usize = 256;
/// Longest query text whose document is kept (bytes).
pub const PARSE_CACHE_TEXT_MAX: usize = 4_096;

impl QueryLimits {
    pub fn new(aliases_max: usize) -> Self {
        let entries = NonZeroUsize::new(PARSE_CACHE_ENTRIES).expect("PARSE_CACHE_ENTRIES is not zero");
        Self { aliases_max, parsed: Arc::new(Mutex::new(LruCache::new(entries))) }
    }
}

impl ExtensionFactory for QueryLimits {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(QueryLimitsExtension { aliases_max: self.aliases_max, parsed: self.parsed.clone() })
    }
}

struct QueryLimitsExtension {
    aliases_max: usize,
    parsed: Arc<Mutex<LruCache<String, ExecutableDocument>>>,
}

impl QueryLimitsExtension {
    fn cached(&self, query: &str) -> Option<ExecutableDocument> {
        self.parsed.lock().unwrap_or_else(|p| p.into_inner()).get(query).cloned()
    }

    fn check(&self, document: &ExecutableDocument) -> ServerResult<()> {
        let aliases: usize =
            document.operations.iter().map(|(_, op)| count_aliases(&op.node.selection_set.node)).sum::<usize>()
                + document.fragments.values().map(|f| count_aliases(&f.node.selection_set.node)).sum::<usize>();
        if aliases > self.aliases_max {
            let error = super::errors::coded(
                "QUERY_TOO_MANY_ALIASES",
                format!("the query uses {aliases} aliases; at most {} are allowed", self.aliases_max),
            );
            return Err(ServerError::new(error.message.clone(), None).extend_with_error(&error));
        }
        let waits: usize =
            document.operations.iter().map(|(_, op)| count_waits(&op.node.selection_set.node, document, 0)).sum();
        if waits > super::WAIT_FOR_PER_REQUEST_MAX {
            let error = super::errors::coded(
                "QUERY_TOO_MANY_WAITS",
                format!("the query waits {waits} times (waitFor); at most one wait per request"),
            );
            return Err(ServerError::new(error.message.clone(), None).extend_with_error(&error));
        }
        Ok(())
    }
}

fn count_aliases(set: &SelectionSet) -> usize {
    set.items
        .iter()
        .map(|item| match &item.node {
            Selection::Field(field) => {
                usize::from(field.node.alias.is_some()) + count_aliases(&field.node.selection_set.node)
            }
            Selection::InlineFragment(fragment) => count_aliases(&fragment.node.selection_set.node),
            Selection::FragmentSpread(_) => 0,
        })
        .sum()
}

#[async_trait::async_trait]
impl Extension for QueryLimitsExtension {
    async fn parse_query(
        &self,
        ctx: &ExtensionContext<'_>,
        query: &str,
        variables: &Variables,
        next: NextParseQuery<'_>,
    ) -> ServerResult<ExecutableDocument> {
        if let Some(document) = self.cached(query) {
            return Ok(document); // passed the checks when it was kept
        }
        let document = next.run(ctx, query, variables).await?;
        self.check(&document)?;
        if query.len() <= PARSE_CACHE_TEXT_MAX {
            self.parsed.lock().unwrap_or_else(|p| p.into_inner()).put(query.to_owned(), document.clone());
        }
        Ok(document)
    }
}

/// Fields with a `waitFor` argument, fragments expanded (each spread counts again: it would wait again).
fn count_waits(set: &SelectionSet, document: &ExecutableDocument, depth: usize) -> usize {
    if depth > super::QUERY_DEPTH_MAX {
        return 0; // deeper than any query is allowed to be: refused by the depth limit anyway
    }
    set.items
        .iter()
        .map(|item| match &item.node {
            Selection::Field(field) => {
                let waits = field
                    .node
                    .arguments
                    .iter()
                    .any(|(name, value)| name.node.as_str() == "waitFor" && value.node.to_string() != "null");
                usize::from(waits) + count_waits(&field.node.selection_set.node, document, depth + 1)
            }
            Selection::InlineFragment(fragment) => count_waits(&fragment.node.selection_set.node, document, depth + 1),
            Selection::FragmentSpread(spread) => document
                .fragments
                .get(&spread.node.fragment_name.node)
                .map_or(0, |fragment| count_waits(&fragment.node.selection_set.node, document, depth + 1)),
        })
        .sum()
}

trait ExtendWith {
    fn extend_with_error(self, error: &async_graphql::Error) -> Self;
}

impl ExtendWith for ServerError {
    fn extend_with_error(mut self, error: &async_graphql::Error) -> Self {
        self.extensions = error.extensions.clone();
        self
    }
}

#[cfg(test)]
mod tests {
    use async_graphql::{EmptyMutation, EmptySubscription, Request, Schema};

    use super::*;

    struct Echo;

    #[Object]
    impl Echo {
        async fn echo(&self, x: i32) -> i32 {
            x
        }
    }

    fn schema(limits: QueryLimits) -> Schema<Echo, EmptyMutation, EmptySubscription> {
        Schema::build(Echo, EmptyMutation, EmptySubscription).extension(limits).finish()
    }

    async fn echo(
        schema: &Schema<Echo, EmptyMutation, EmptySubscription>,
        query: &str,
        x: i32,
    ) -> async_graphql::Response {
        let variables = Variables::from_json(serde_json::json!({ "x": x }));
        schema.execute(Request::new(query).variables(variables)).await
    }

    #[tokio::test]
    async fn a_query_text_is_parsed_once_and_each_request_binds_its_own_variables() {
        let limits = QueryLimits::new(2);
        let parsed = limits.parsed.clone();
        let schema = schema(limits);
        let query = "query Echo($x: Int!) { echo(x: $x) }";
        for x in [1, 2, 3] {
            let response = echo(&schema, query, x).await;
            assert!(response.errors.is_empty(), "{:?}", response.errors);
            assert_eq!(response.data.into_json().unwrap(), serde_json::json!({ "echo": x }));
        }
        assert_eq!(parsed.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_refused_query_is_not_kept_and_is_refused_every_time() {
        let limits = QueryLimits::new(2);
        let parsed = limits.parsed.clone();
        let schema = schema(limits);
        let query = "query Echo($x: Int!) { a: echo(x: $x) b: echo(x: $x) c: echo(x: $x) }";
        for _ in 0..2 {
            let response = echo(&schema, query, 1).await;
            let code = response.errors[0].extensions.as_ref().and_then(|e| e.get("code")).cloned();
            assert_eq!(code, Some(async_graphql::Value::from("QUERY_TOO_MANY_ALIASES")));
        }
        assert_eq!(parsed.lock().unwrap().len(), 0);
    }

    #[tokio::test]
    async fn long_texts_and_syntax_errors_are_not_kept() {
        let limits = QueryLimits::new(2);
        let parsed = limits.parsed.clone();
        let schema = schema(limits);
        let long = format!("query Echo($x: Int!) {{ echo(x: $x) }} #{}", "-".repeat(PARSE_CACHE_TEXT_MAX));
        assert!(echo(&schema, &long, 1).await.errors.is_empty());
        assert!(!echo(&schema, "query { echo(", 1).await.errors.is_empty());
        assert_eq!(parsed.lock().unwrap().len(), 0);
    }

    #[tokio::test]
    async fn the_cache_holds_at_most_its_bound() {
        let limits = QueryLimits::new(2);
        let parsed = limits.parsed.clone();
        let schema = schema(limits);
        for i in 0..PARSE_CACHE_ENTRIES + 10 {
            let query = format!("query Echo{i}($x: Int!) {{ echo(x: $x) }}");
            assert!(echo(&schema, &query, 1).await.errors.is_empty());
        }
        assert_eq!(parsed.lock().unwrap().len(), PARSE_CACHE_ENTRIES);
    }
}
