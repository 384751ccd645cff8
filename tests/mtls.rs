//! A private HTTPS receiver that requires a client certificate: the relay reaches it only with
//! the configured CA bundle and client certificate (mutual TLS).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::routing::post;
use cfq_emulator::{ContentType, EmulatorOptions};
use common::{config, emulator, wait_until};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio_util::sync::CancellationToken;

struct Pki {
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    server_der: CertificateDer<'static>,
    server_key: PrivateKeyDer<'static>,
    client_pem: String,
    client_key_pem: String,
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "cfq-relay test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().unwrap();
    let server_params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    let server_cert = server_params.signed_by(&server_key, &issuer).unwrap();

    let client_key = KeyPair::generate().unwrap();
    let mut client_params = CertificateParams::new(vec!["relay.client".to_string()]).unwrap();
    client_params
        .distinguished_name
        .push(DnType::CommonName, "cfq-relay client");
    let client_cert = client_params.signed_by(&client_key, &issuer).unwrap();

    Pki {
        ca_pem: ca_cert.pem(),
        ca_der: ca_cert.der().clone(),
        server_der: server_cert.der().clone(),
        server_key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
        client_pem: client_cert.pem(),
        client_key_pem: client_key.serialize_pem(),
    }
}

/// An HTTPS receiver on 127.0.0.1:0 that requires a client certificate signed by the test CA.
async fn mtls_receiver(pki: &Pki, hits: Arc<AtomicUsize>) -> SocketAddr {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = RootCertStore::empty();
    roots.add(pki.ca_der.clone()).unwrap();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .unwrap();
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![pki.server_der.clone()], pki.server_key.clone_key())
        .unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let app = Router::new().route(
        "/hook",
        post(move || {
            let hits = hits.clone();
            async move {
                hits.fetch_add(1, Ordering::SeqCst);
                "ok"
            }
        }),
    );
    let handle = axum_server::Handle::new();
    let server = axum_server::bind_rustls(
        "127.0.0.1:0".parse().unwrap(),
        axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(tls)),
    )
    .handle(handle.clone());
    tokio::spawn(async move {
        let _ = server.serve(app.into_make_service()).await;
    });
    handle.listening().await.unwrap()
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[tokio::test]
async fn mutual_tls_with_a_private_ca() {
    let pki = pki();
    let dir = std::env::temp_dir().join(format!("cfq-relay-mtls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = write(&dir, "ca.pem", &pki.ca_pem);
    let cert = write(&dir, "client.pem", &pki.client_pem);
    let key = write(&dir, "client-key.pem", &pki.client_key_pem);

    let hits = Arc::new(AtomicUsize::new(0));
    let addr = mtls_receiver(&pki, hits.clone()).await;
    let url = format!("https://127.0.0.1:{}/hook", addr.port());

    let stop = CancellationToken::new();
    let (emu, api) = emulator(EmulatorOptions::default(), &stop).await;
    for q in ["with-cert", "no-cert", "no-ca"] {
        emu.publish(q, Some(ContentType::Text), b"over mtls", Duration::ZERO)
            .unwrap();
    }
    let with_cert =
        format!("ca_file = \"{ca}\"\nclient_cert_file = \"{cert}\"\nclient_key_file = \"{key}\"");
    let no_cert = format!("ca_file = \"{ca}\"");
    let cfg = config(
        &api,
        &[
            ("with-cert", &url, "", &with_cert),
            ("no-cert", &url, "", &no_cert),
            ("no-ca", &url, "", ""),
        ],
    );
    let relay_stop = CancellationToken::new();
    let relay = cfq_relay::start(cfg, relay_stop.clone()).await.unwrap();
    wait_until(
        Duration::from_secs(15),
        "mTLS delivery acked and the others retried",
        || {
            emu.stats("with-cert").acked == 1
                && emu.stats("no-cert").retried >= 1
                && emu.stats("no-ca").retried >= 1
        },
    )
    .await;
    relay_stop.cancel();
    relay.wait().await.unwrap();
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "only the relay with the client cert got through"
    );
    assert_eq!(
        emu.stats("no-cert").acked,
        0,
        "no client certificate: refused, retried"
    );
    assert_eq!(
        emu.stats("no-ca").acked,
        0,
        "unknown issuer: refused, retried"
    );
    std::fs::remove_dir_all(&dir).ok();
    stop.cancel();
}
