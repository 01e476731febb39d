//! The web dashboard: a few static files compiled into the binary and served at `/` and `/static/…`.
//!
//! Plain JavaScript over the GraphQL API and its subscriptions; the charting library (Chart.js 4.6.1) and the
//! `graphql-transport-ws` client (graphql-ws 6) are the npm packages' own minified browser builds, committed
//! under `api/static/vendor/` (refresh them with `npm pack` of the same packages; see the README there).

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const ASSETS: &[Asset] = &[
    Asset { path: "app.js", content_type: "text/javascript; charset=utf-8", body: include_str!("../static/app.js") },
    Asset { path: "style.css", content_type: "text/css; charset=utf-8", body: include_str!("../static/style.css") },
    Asset {
        path: "vendor/chart.umd.min.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../static/vendor/chart.umd.min.js"),
    },
    Asset {
        path: "vendor/graphql-ws.min.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../static/vendor/graphql-ws.min.js"),
    },
];

const INDEX: &str = include_str!("../static/index.html");

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
