//! POSTs to the business system, for the before_send hook and the webhooks: `http://` through
//! reqwest, `https://` through rustls (the ring provider, the one NATS's TLS uses) with the
//! system's root certificates plus those of `hook_ca_file`, over one HTTP/1.1 connection per
//! call.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::TlsConnector;

/// Sends POSTs, with a timeout for the whole call.
#[derive(Clone)]
pub struct Poster {
    http: reqwest::Client,
    tls: TlsConnector,
    timeout: Duration,
}

impl Poster {
    /// A poster whose calls take at most `timeout`, trusting the system's roots and those in
    /// `ca_file` (PEM) if given.
    pub fn new(timeout: Duration, ca_file: Option<&Path>) -> Result<Poster, String> {
        let http = reqwest::Client::builder().timeout(timeout).build().map_err(|e| e.to_string())?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_native_certs::load_native_certs().certs {
            // A system certificate rustls cannot read is not one it could use either.
            let _ = roots.add(cert);
        }
        if let Some(file) = ca_file {
            let certs = CertificateDer::pem_file_iter(file).map_err(|e| format!("{}: {e}", file.display()))?;
            for cert in certs {
                let cert = cert.map_err(|e| format!("{}: {e}", file.display()))?;
                roots.add(cert).map_err(|e| format!("{}: {e}", file.display()))?;
            }
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Poster { http, tls: TlsConnector::from(Arc::new(config)), timeout })
    }

    /// POSTs `body` (JSON) with `headers` to `url`; answers the status and the body.
    pub async fn post(&self, url: &str, headers: &[(&str, String)], body: Vec<u8>) -> Result<(u16, Bytes), String> {
        if url.starts_with("https://") {
            return tokio::time::timeout(self.timeout, self.post_tls(url, headers, body))
                .await
                .map_err(|_| "no answer in time".to_string())?;
        }
        let mut request = self.http.post(url).header("content-type", "application/json");
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let response = request.body(body).send().await.map_err(|e| format!("no answer: {e}"))?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await.map_err(|e| format!("unreadable answer: {e}"))?;
        Ok((status, bytes))
    }

    async fn post_tls(&self, url: &str, headers: &[(&str, String)], body: Vec<u8>) -> Result<(u16, Bytes), String> {
        let uri: hyper::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
        let host = uri.host().ok_or_else(|| format!("{url}: no host"))?.trim_matches(['[', ']']).to_string();
        let port = uri.port_u16().unwrap_or(443);
        let tcp =
            tokio::net::TcpStream::connect((host.as_str(), port)).await.map_err(|e| format!("no connection: {e}"))?;
        let name = ServerName::try_from(host.clone()).map_err(|e| format!("{host}: {e}"))?;
        let tls = self.tls.connect(name, tcp).await.map_err(|e| format!("TLS: {e}"))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(|e| format!("HTTP: {e}"))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let authority = uri.authority().map(|a| a.to_string()).unwrap_or(host);
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let mut request = hyper::Request::post(path)
            .header(hyper::header::HOST, authority)
            .header(hyper::header::CONTENT_TYPE, "application/json");
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let request = request.body(Full::new(Bytes::from(body))).map_err(|e| e.to_string())?;
        let response = sender.send_request(request).await.map_err(|e| format!("no answer: {e}"))?;
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.map_err(|e| format!("unreadable answer: {e}"))?.to_bytes();
        Ok((status, bytes))
    }
}
