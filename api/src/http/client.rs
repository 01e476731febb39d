//! The API's outgoing HTTP: one POST on a connection of its own, with a deadline for the whole exchange. Used by
//! the webhook deliverer and the OTLP trace export; hyper's own HTTP/1 client connection (hyper is axum's
//! already), so the deployed binary carries no HTTP client crate of its own.
//!
//! Plain `http://` only for now: an `https://` endpoint is refused with a clear error (put a TLS-originating
//! proxy or the collector beside the ledger).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use hyper::StatusCode;

/// Where a POST goes: a URL taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    /// `host[:port]` as the `Host` header gives it.
    pub authority: String,
    /// Path and query.
    pub path: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, String> {
        let uri: hyper::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err("https:// is not supported yet: use http:// (a TLS proxy beside the ledger)".into())
            }
            Some(other) => return Err(format!("{other}:// is not supported: use http://")),
            None => return Err(format!("{url}: give the scheme, e.g. http://host:port/path")),
        }
        let authority = uri.authority().ok_or_else(|| format!("{url}: no host"))?;
        Ok(Target {
            host: authority.host().trim_start_matches('[').trim_end_matches(']').to_string(),
            port: authority.port_u16().unwrap_or(80),
            authority: authority.to_string(),
            path: uri.path_and_query().map_or("/", |p| p.as_str()).to_string(),
        })
    }

    /// The addresses the host resolves to.
    pub async fn resolve(&self) -> Result<Vec<SocketAddr>, String> {
        let addresses: Vec<SocketAddr> = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("resolving {}: {e}", self.host))?
            .collect();
        if addresses.is_empty() {
            return Err(format!("{} resolves to no address", self.host));
        }
        Ok(addresses)
    }
}

/// POSTs `body` (JSON) with `headers` to `target` at `address` (one of its resolved addresses); the response's
/// status, or why there was none within `timeout`.
pub async fn post(
    target: &Target,
    address: SocketAddr,
    headers: &[(&str, String)],
    body: Bytes,
    timeout: Duration,
) -> Result<StatusCode, String> {
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(address).await.map_err(|e| format!("connecting: {e}"))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let mut request = hyper::Request::post(&target.path)
            .header(hyper::header::HOST, &target.authority)
            .header(hyper::header::CONTENT_TYPE, "application/json");
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let request = request.body(http_body_util::Full::new(body)).map_err(|e| e.to_string())?;
        let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
        Ok(response.status())
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(outcome) => outcome,
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_taken_apart() {
        let target = Target::parse("http://hooks.example:8080/in?x=1").unwrap();
        assert_eq!((target.host.as_str(), target.port), ("hooks.example", 8080));
        assert_eq!((target.authority.as_str(), target.path.as_str()), ("hooks.example:8080", "/in?x=1"));
        let target = Target::parse("http://[::1]/").unwrap();
        assert_eq!((target.host.as_str(), target.port, target.path.as_str()), ("::1", 80, "/"));
        assert!(Target::parse("https://hooks.example/").unwrap_err().contains("https"));
        assert!(Target::parse("hooks.example/in").is_err());
    }
}
