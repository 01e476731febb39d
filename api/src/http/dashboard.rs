//! The web dashboard: a few static files compiled into the binary and served at `/` and `/static/…`.
//!
//! Plain JavaScript over the GraphQL API and its subscriptions; the charting library (Chart.js 4.6.1) and the
//! `graphql-transport-ws` client (graphql-ws 6) are the npm packages' own minified browser builds, committed
//! under `api/static/vendor/` (refresh them with `npm pack` of the same packages; see the README there).
//! GraphiQL (4.1.2 with React 18.3.1 production builds, their licences beside them) is served the same way.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const ASSETS: &[Asset] = &[
    Asset { path: "app.js", content_type: "text/javascript; charset=utf-8", body: include_str!("../../static/app.js") },
    Asset { path: "style.css", content_type: "text/css; charset=utf-8", body: include_str!("../../static/style.css") },
    Asset {
        path: "vendor/chart.umd.min.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../static/vendor/chart.umd.min.js"),
    },
    Asset {
        path: "vendor/graphql-ws.min.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../static/vendor/graphql-ws.min.js"),
    },
    Asset { path: "graphiql.js", content_type: JS, body: include_str!("../../static/graphiql.js") },
    Asset {
        path: "vendor/graphiql/react.production.min.js",
        content_type: JS,
        body: include_str!("../../static/vendor/graphiql/react.production.min.js"),
    },
    Asset {
        path: "vendor/graphiql/react-dom.production.min.js",
        content_type: JS,
        body: include_str!("../../static/vendor/graphiql/react-dom.production.min.js"),
    },
    Asset {
        path: "vendor/graphiql/graphiql.min.js",
        content_type: JS,
        body: include_str!("../../static/vendor/graphiql/graphiql.min.js"),
    },
    Asset {
        path: "vendor/graphiql/graphiql.min.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("../../static/vendor/graphiql/graphiql.min.css"),
    },
];

const JS: &str = "text/javascript; charset=utf-8";
const INDEX: &str = include_str!("../../static/index.html");
/// GraphiQL, entirely from files compiled into the binary: it works offline (an air-gapped desk) and no
/// third-party script runs in the page where users paste bearer tokens.
const GRAPHIQL: &str = include_str!("../../static/graphiql.html");
/// Scripts and styles from this server only (fonts and icons inlined as data: URLs); never framed.
const GRAPHIQL_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; font-src 'self' data:; \
    img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The GraphiQL page (`GET /graphql`, when introspection is on).
pub fn graphiql() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, GRAPHIQL_CSP),
        ],
        GRAPHIQL,
    )
        .into_response()
}

pub async fn index() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], INDEX).into_response()
}

pub async fn asset(axum::extract::Path(path): axum::extract::Path<String>) -> Response {
    match ASSETS.iter().find(|asset| asset.path == path) {
        Some(asset) => ([(header::CONTENT_TYPE, asset.content_type), (header::CACHE_CONTROL, "no-cache")], asset.body)
            .into_response(),
        None => (StatusCode::NOT_FOUND, "not found").into_response(),
    }
}
