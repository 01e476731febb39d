//! The API's outgoing HTTP: one POST on a connection of its own, with a deadline for the whole exchange. Used by
//! the webhook deliverer and the OTLP trace export; hyper's own HTTP/1 client connection (hyper is axum's
//! already), and rustls (on ring, with the Mozilla root certificates, plus any given CA file) for `https://`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

/// Where a POST goes: a URL taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `https://`.
    pub tls: bool,
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
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            Some(other) => return Err(format!("{other}:// is not supported: use https:// or http://")),
            None => return Err(format!("{url}: give the scheme, e.g. https://host/path")),
        };
        let authority = uri.authority().ok_or_else(|| format!("{url}: no host"))?;
        Ok(Target {
            tls,
            host: authority.host().trim_start_matches('[').trim_end_matches(']').to_string(),
            port: authority.port_u16().unwrap_or(if tls { 443 } else { 80 }),
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

/// Posts JSON bodies, over TLS for `https://` targets.
#[derive(Clone)]
pub struct Client {
    tls: TlsConnector,
}

impl Client {
    /// A client trusting the Mozilla root certificates and, if given, the certificates of a PEM file (a private
    /// CA's).
    pub fn new(ca_file: Option<&Path>) -> Result<Client, String> {
        let mut roots = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        if let Some(path) = ca_file {
            let certificates = CertificateDer::pem_file_iter(path)
                .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("CA file {}: {e}", path.display()))?;
            if certificates.is_empty() {
                return Err(format!("CA file {}: no certificate in it", path.display()));
            }
            for certificate in certificates {
                roots.add(certificate).map_err(|e| format!("CA file {}: {e}", path.display()))?;
            }
        }
        // rustls deprecates its ring provider for lacking post-quantum key exchange (X25519MLKEM768, which its
        // aws-lc-rs provider has at the price of a C build of AWS-LC); classical ECDHE is what webhook receivers
        // negotiate today. Revisit when receivers offer the hybrid group.
        #[allow(deprecated)]
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Client { tls: TlsConnector::from(Arc::new(config)) })
    }

    /// POSTs `body` (JSON) with `headers` to `target` at the first of `addresses` (some of its resolved ones)
    /// that accepts a connection; the certificate is checked against the target's host. The response's status,
    /// or why there was none within `timeout`.
    pub async fn post(
        &self,
        target: &Target,
        addresses: &[SocketAddr],
        headers: &[(&str, String)],
        body: Bytes,
        timeout: Duration,
    ) -> Result<StatusCode, String> {
        let connect = async {
            let stream = tokio::net::TcpStream::connect(addresses).await.map_err(|e| format!("connecting: {e}"))?;
            if !target.tls {
                return exchange(stream, target, headers, body).await;
            }
            let name = ServerName::try_from(target.host.clone()).map_err(|e| format!("{}: {e}", target.host))?;
            let stream = self.tls.connect(name, stream).await.map_err(|e| format!("TLS: {e}"))?;
            exchange(stream, target, headers, body).await
        };
        match tokio::time::timeout(timeout, connect).await {
            Ok(outcome) => outcome,
            Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
        }
    }
}

async fn exchange<S>(stream: S, target: &Target, headers: &[(&str, String)], body: Bytes) -> Result<StatusCode, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_taken_apart() {
        let target = Target::parse("http://hooks.example:8080/in?x=1").unwrap();
        assert_eq!((target.tls, target.host.as_str(), target.port), (false, "hooks.example", 8080));
        assert_eq!((target.authority.as_str(), target.path.as_str()), ("hooks.example:8080", "/in?x=1"));
        let target = Target::parse("http://[::1]/").unwrap();
        assert_eq!((target.host.as_str(), target.port, target.path.as_str()), ("::1", 80, "/"));
        let target = Target::parse("https://hooks.example/in").unwrap();
        assert_eq!((target.tls, target.port), (true, 443));
        assert!(Target::parse("ftp://hooks.example/").is_err());
        assert!(Target::parse("hooks.example/in").is_err());
    }

    #[test]
    fn a_missing_or_empty_ca_file_is_an_error() {
        assert!(Client::new(None).is_ok());
        assert!(Client::new(Some(Path::new("/nonexistent/ca.pem"))).is_err());
        let empty = std::env::temp_dir().join(format!("ledger-empty-{}.pem", std::process::id()));
        std::fs::write(&empty, "").unwrap();
        assert!(Client::new(Some(&empty)).err().unwrap().contains("no certificate"));
        std::fs::remove_file(empty).unwrap();
    }
}
