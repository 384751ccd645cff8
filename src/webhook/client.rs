//! Layer 2, the webhook transport: hyper-util's pooled HTTP/1.1 + HTTP/2 client over rustls,
//! driven with a URI parsed once per webhook, a deadline per request and a bounded read of the
//! answer.
//!
//! Why not reqwest here: per message it clones and re-parses the URL (its redirect layer does
//! so even with redirects off) and runs a tower stack around hyper's client; at tens of
//! thousands of messages a second that was a quarter of the relay's CPU. What reqwest gave the
//! webhook is kept: rustls with the platform verifier (plus `ca_file` roots), ALPN `h2` /
//! `http/1.1` (only `h2` with `http2_prior_knowledge`, which also speaks h2c), mTLS client
//! certificates, a 10 s connect timeout, TCP keepalive and nodelay, idle connections kept 60 s,
//! no redirects. A webhook that the proxy environment variables (`HTTPS_PROXY`, `NO_PROXY`, …)
//! send through a proxy keeps a reqwest client, which speaks to proxies.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::time::Instant;
use zeroize::Zeroizing;

use crate::config::{ConfigError, WebhookConfig};

/// How long a TCP (and TLS) connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an idle pooled connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

type Connector = HttpsConnector<HttpConnector>;

/// The connection pool every webhook without TLS settings of its own shares; cheap to clone.
#[derive(Clone)]
pub struct WebhookPool(Client<Connector, Full<Bytes>>);

impl WebhookPool {
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self(direct(&Settings::default())?))
    }
}

impl std::fmt::Debug for WebhookPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookPool").finish_non_exhaustive()
    }
}

/// The HTTP client of one webhook, bound to its URL (parsed once).
#[derive(Clone)]
pub struct WebhookClient {
    transport: Transport,
}

#[derive(Clone)]
enum Transport {
    /// hyper-util's client (400-odd bytes: boxed), straight to the receiver.
    Direct {
        client: Box<Client<Connector, Full<Bytes>>>,
        uri: Uri,
    },
    /// Through a proxy from the environment: reqwest, which speaks to proxies.
    Proxied {
        client: reqwest::Client,
        url: reqwest::Url,
    },
}

impl std::fmt::Debug for WebhookClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No URL: its query string may carry a credential.
        let kind = match self.transport {
            Transport::Direct { .. } => "direct",
            Transport::Proxied { .. } => "proxied",
        };
        f.debug_struct("WebhookClient")
            .field("transport", &kind)
            .finish_non_exhaustive()
    }
}

/// The TLS and protocol settings a client is built from.
#[derive(Default)]
struct Settings {
    /// Extra trusted roots (`ca_file`).
    roots: Vec<CertificateDer<'static>>,
    /// Client certificate chain and key (`client_cert_file` + `client_key_file`), as PEM
    /// (zeroed when dropped, as every secret).
    identity: Option<Zeroizing<Vec<u8>>>,
    http2_prior_knowledge: bool,
}

impl Settings {
    /// Read the files a webhook's TLS settings name.
    fn of(w: &WebhookConfig) -> anyhow::Result<Self> {
        Ok(Self::read(w, "webhook")?)
    }

    /// Read the files a webhook's TLS settings name; errors name the key under `at` (e.g.
    /// `consumers[0].webhook`). A `ca_file` without a single certificate is an error: ignoring
    /// it would leave the receiver's private CA untrusted without a word.
    fn read(w: &WebhookConfig, at: &str) -> Result<Self, ConfigError> {
        let invalid = |k: &str, m: String| ConfigError::invalid(format!("{at}.{k}"), m);
        let mut s = Settings {
            http2_prior_knowledge: w.http2_prior_knowledge,
            ..Settings::default()
        };
        if let Some(ca) = &w.ca_file {
            let pem = std::fs::read(ca).map_err(|e| {
                invalid(
                    "ca_file",
                    format!("cannot be read ({}): {}", ca.display(), e.kind()),
                )
            })?;
            s.roots = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<_, _>>()
                .ok()
                .filter(|roots: &Vec<_>| !roots.is_empty())
                .ok_or_else(|| {
                    invalid(
                        "ca_file",
                        format!("({}) is not a PEM bundle of certificates", ca.display()),
                    )
                })?;
        }
        if let Some(cert) = &w.client_cert_file {
            let mut pem = Zeroizing::new(std::fs::read(cert).map_err(|e| {
                invalid(
                    "client_cert_file",
                    format!("cannot be read ({}): {}", cert.display(), e.kind()),
                )
            })?);
            pem.push(b'\n');
            // The key is a secret: read as every secret is (`config::SecretSource`).
            let key = w.client_key_source(at).resolve()?;
            let key = key.ok_or_else(|| {
                invalid(
                    "client_cert_file",
                    "and `client_key_file` must be set together (mutual TLS)".into(),
                )
            })?;
            pem.extend_from_slice(key.expose().as_bytes());
            s.identity = Some(pem);
        }
        Ok(s)
    }

    /// Whether a webhook needs a client of its own rather than the shared one.
    fn is_default(&self) -> bool {
        self.roots.is_empty() && self.identity.is_none() && !self.http2_prior_knowledge
    }
}

/// Check the TLS files of webhook `w` (its key is `at`, e.g. `consumers[0].webhook`) as its
/// client will use them, so that `check-config` and the start report a missing or unusable one
/// as a configuration error naming the key (exit 2), not as a failure of the start.
pub fn check_tls_files(w: &WebhookConfig, at: &str) -> Result<(), ConfigError> {
    if w.ca_file.is_none() && w.client_cert_file.is_none() {
        return Ok(());
    }
    let s = Settings::read(w, at)?;
    let roots_only = Settings {
        roots: s.roots.clone(),
        ..Settings::default()
    };
    tls_config(&roots_only).map_err(|e| {
        ConfigError::invalid(format!("{at}.ca_file"), format!("cannot be used: {e:#}"))
    })?;
    if s.identity.is_some() {
        // Generic, as `bad_identity`: the message must never echo a part of the key.
        tls_config(&s).map_err(|_| {
            ConfigError::invalid(
                format!("{at}.client_cert_file"),
                "and `client_key_file` are not a PEM certificate and its private key",
            )
        })?;
    }
    Ok(())
}

/// The error for a certificate and key that cannot be used; generic, so that it can never
/// echo a part of the key.
fn bad_identity() -> anyhow::Error {
    anyhow::anyhow!("webhook.client_cert_file / client_key_file are not a PEM certificate and key")
}

/// rustls settings as reqwest made them: the process's default crypto provider (else
/// aws-lc-rs), every TLS version, the platform verifier with the extra roots, the client
/// certificate. The ALPN list is hyper-rustls's to set, from the HTTP versions enabled.
fn tls_config(s: &Settings) -> anyhow::Result<rustls::ClientConfig> {
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
    let verifier = if s.roots.is_empty() {
        rustls_platform_verifier::Verifier::new(provider.clone())
    } else {
        rustls_platform_verifier::Verifier::new_with_extra_roots(s.roots.clone(), provider.clone())
    }
    .context("loading the platform's TLS roots")?;
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(rustls::ALL_VERSIONS)
        .context("TLS versions")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    Ok(match &s.identity {
        None => builder.with_no_client_auth(),
        Some(pem) => {
            let certs = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| bad_identity())?;
            let key = PrivateKeyDer::from_pem_slice(pem).map_err(|_| bad_identity())?;
            if certs.is_empty() {
                return Err(bad_identity());
            }
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|_| bad_identity())?
        }
    })
}

/// The direct client: TCP settings as reqwest's defaults, the pool as the relay had it.
fn direct(s: &Settings) -> anyhow::Result<Client<Connector, Full<Bytes>>> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    http.set_keepalive(Some(Duration::from_secs(15)));
    http.set_keepalive_interval(Some(Duration::from_secs(15)));
    http.set_keepalive_retries(Some(3));
    #[cfg(target_os = "linux")]
    http.set_tcp_user_timeout(Some(Duration::from_secs(30)));
    // ALPN offers `h2` and `http/1.1`, or only `h2` with prior knowledge (as reqwest did).
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls_config(s)?)
        .https_or_http();
    let connector = if s.http2_prior_knowledge {
        connector.enable_http2().wrap_connector(http)
    } else {
        connector.enable_http1().enable_http2().wrap_connector(http)
    };
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_max_idle_per_host(usize::MAX)
        .http2_only(s.http2_prior_knowledge);
    Ok(builder.build(connector))
}

/// The reqwest client for a proxied webhook, with the same TLS settings.
fn proxied(s: &Settings) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(CONNECT_TIMEOUT)
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .tcp_nodelay(true);
    if s.http2_prior_knowledge {
        builder = builder.http2_prior_knowledge();
    }
    for root in &s.roots {
        builder = builder
            .add_root_certificate(reqwest::Certificate::from_der(root).context("webhook.ca_file")?);
    }
    if let Some(pem) = &s.identity {
        builder = builder.identity(reqwest::Identity::from_pem(pem).map_err(|_| bad_identity())?);
    }
    builder.build().context("building the webhook HTTP client")
}

use hyper_util::client::proxy::matcher::Matcher;

/// The answer to one POST: its head, the first `limit` bytes of its body, and why the body
/// ended early if it did.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    /// At most `limit` bytes; a longer answer is cut (and the connection not reused).
    pub body: Vec<u8>,
    /// Set when the body broke off (error or deadline) before its end or the limit.
    pub broken: Option<String>,
}

/// Why a POST got no answer.
#[derive(Debug)]
pub enum SendFailure {
    /// No answer head before the deadline (or the connect timed out).
    Timeout(String),
    /// The connection could not be opened (refused, DNS, TLS handshake).
    Connect(String),
    /// The connection broke while the request was sent or the answer awaited.
    Transport(String),
}

impl WebhookClient {
    /// The client for the webhook `w` at `url`: the shared pool unless the webhook has its own
    /// CA bundle or client certificate, speaks cleartext HTTP/2, or goes through a proxy.
    pub fn new(pool: &WebhookPool, w: &WebhookConfig, url: &reqwest::Url) -> anyhow::Result<Self> {
        // The proxy environment variables, read as reqwest reads them.
        Self::with_proxies(pool, w, url, &Matcher::from_system())
    }

    fn with_proxies(
        pool: &WebhookPool,
        w: &WebhookConfig,
        url: &reqwest::Url,
        proxies: &Matcher,
    ) -> anyhow::Result<Self> {
        // The URL crate's form is ASCII (IDNA host, percent-encoded path): a valid URI.
        let uri = Uri::try_from(url.as_str()).context("webhook.url is not a valid URI")?;
        let settings = Settings::of(w)?;
        let transport = if proxies.intercept(&uri).is_some() {
            Transport::Proxied {
                client: proxied(&settings)?,
                url: url.clone(),
            }
        } else if settings.is_default() {
            Transport::Direct {
                client: Box::new(pool.0.clone()),
                uri,
            }
        } else {
            Transport::Direct {
                client: Box::new(direct(&settings)?),
                uri,
            }
        };
        Ok(Self { transport })
    }

    /// POST `body` with `headers`; the answer head and the first `limit` bytes of its body must
    /// arrive before `deadline`. Never follows a redirect.
    pub async fn post(
        &self,
        headers: HeaderMap,
        body: Bytes,
        deadline: Instant,
        limit: usize,
    ) -> Result<Reply, SendFailure> {
        match &self.transport {
            Transport::Direct { client, uri } => {
                let mut request = Request::new(Full::new(body));
                *request.method_mut() = Method::POST;
                *request.uri_mut() = uri.clone();
                *request.headers_mut() = headers;
                let response =
                    match tokio::time::timeout_at(deadline, client.request(request)).await {
                        Err(_) => return Err(timed_out()),
                        Ok(Err(e)) => return Err(classify(&e, e.is_connect())),
                        Ok(Ok(r)) => r,
                    };
                Ok(read_reply(response, deadline, limit).await)
            }
            Transport::Proxied { client, url } => {
                let mut request = reqwest::Request::new(reqwest::Method::POST, url.clone());
                *request.headers_mut() = headers;
                *request.body_mut() = Some(body.into());
                let response =
                    match tokio::time::timeout_at(deadline, client.execute(request)).await {
                        Err(_) => return Err(timed_out()),
                        Ok(Err(e)) => {
                            let e = e.without_url();
                            return Err(if e.is_timeout() {
                                SendFailure::Timeout(crate::cloudflare::error_chain(&e))
                            } else {
                                classify(&e, e.is_connect())
                            });
                        }
                        Ok(Ok(r)) => http::Response::from(r),
                    };
                Ok(read_reply(response, deadline, limit).await)
            }
        }
    }
}

fn timed_out() -> SendFailure {
    SendFailure::Timeout("no answer within webhook.timeout".to_owned())
}

/// A connect that timed out counts as a timeout (as reqwest counted it); otherwise a failed
/// connect (TLS included) or a broken exchange.
fn classify(e: &(dyn std::error::Error + 'static), connect: bool) -> SendFailure {
    let detail = crate::cloudflare::error_chain(e);
    let mut source = Some(e);
    while let Some(s) = source {
        if s.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return SendFailure::Timeout(detail);
        }
        source = s.source();
    }
    if connect {
        SendFailure::Connect(detail)
    } else {
        SendFailure::Transport(detail)
    }
}

/// Read the head and at most `limit` bytes of the body, before `deadline`; the rest is left
/// unread (so a huge or endless answer costs nothing).
async fn read_reply<B>(response: http::Response<B>, deadline: Instant, limit: usize) -> Reply
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let (head, mut body) = response.into_parts();
    let mut bytes = Vec::new();
    let mut broken = None;
    while bytes.len() < limit {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                broken = Some("the answer did not end within webhook.timeout".to_owned());
                break;
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                broken = Some(crate::cloudflare::error_chain(&e));
                break;
            }
            Ok(Some(Ok(frame))) => {
                if let Ok(chunk) = frame.into_data() {
                    let room = limit - bytes.len();
                    bytes.extend_from_slice(&chunk[..chunk.len().min(room)]);
                }
            }
        }
    }
    Reply {
        status: head.status.as_u16(),
        headers: head.headers,
        body: bytes,
        broken,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A receiver on 127.0.0.1 that records each request's HTTP version and answers `answer`
    /// bytes (h1 and h2c, as the relay's own receiver).
    async fn receiver(answer: usize) -> (String, Arc<Mutex<Vec<http::Version>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |req: axum::extract::Request| {
                let log = log.clone();
                async move {
                    log.lock().unwrap().push(req.version());
                    vec![b'x'; answer]
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://{addr}/hook"), seen)
    }

    fn webhook(url: &str, http2_prior_knowledge: bool) -> (WebhookConfig, reqwest::Url) {
        let w = WebhookConfig {
            url: crate::config::RedactedUrl::new(url),
            http2_prior_knowledge,
            ..WebhookConfig::default()
        };
        (w, reqwest::Url::parse(url).unwrap())
    }

    async fn post(client: &WebhookClient, limit: usize) -> Result<Reply, SendFailure> {
        let deadline = Instant::now() + Duration::from_secs(10);
        client
            .post(HeaderMap::new(), Bytes::from_static(b"{}"), deadline, limit)
            .await
    }

    #[tokio::test]
    async fn http1_by_default_h2c_with_prior_knowledge() {
        let (url, seen) = receiver(2).await;
        let pool = WebhookPool::new().unwrap();
        for h2 in [false, true] {
            let (w, u) = webhook(&url, h2);
            let client =
                WebhookClient::with_proxies(&pool, &w, &u, &Matcher::builder().build()).unwrap();
            let reply = post(&client, 1024).await.unwrap();
            assert_eq!((reply.status, reply.body.as_slice()), (200, &b"xx"[..]));
        }
        assert_eq!(
            *seen.lock().unwrap(),
            [http::Version::HTTP_11, http::Version::HTTP_2]
        );
    }

    #[tokio::test]
    async fn the_answer_is_read_up_to_the_limit() {
        let (url, _) = receiver(300 * 1024).await;
        let (w, u) = webhook(&url, false);
        let client = WebhookClient::new(&WebhookPool::new().unwrap(), &w, &u).unwrap();
        let reply = post(&client, 64 * 1024).await.unwrap();
        assert_eq!(reply.body.len(), 64 * 1024);
        assert!(reply.broken.is_none());
    }

    #[tokio::test]
    async fn no_answer_in_time_is_a_timeout_and_a_closed_port_a_connect_failure() {
        // Accepts and never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", silent.local_addr().unwrap());
        let (w, u) = webhook(&url, false);
        let client = WebhookClient::new(&WebhookPool::new().unwrap(), &w, &u).unwrap();
        let deadline = Instant::now() + Duration::from_millis(200);
        let r = client
            .post(HeaderMap::new(), Bytes::new(), deadline, 1024)
            .await;
        assert!(matches!(r, Err(SendFailure::Timeout(_))), "{r:?}");
        drop(silent);
        let r = post(&client, 1024).await;
        assert!(matches!(r, Err(SendFailure::Connect(_))), "{r:?}");
    }

    #[test]
    fn a_proxy_from_the_environment_gets_the_proxy_capable_client() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let pool = WebhookPool::new().unwrap();
        let proxies = Matcher::builder()
            .https("http://proxy.internal:3128")
            .no("localhost")
            .build();
        let kind = |url: &str| {
            let (w, u) = webhook(url, false);
            let c = WebhookClient::with_proxies(&pool, &w, &u, &proxies).unwrap();
            format!("{c:?}")
        };
        assert!(kind("https://hooks.example/in").contains("proxied"));
        assert!(kind("https://localhost/in").contains("direct"));
        assert!(kind("http://hooks.example/in").contains("direct"));
    }
}
