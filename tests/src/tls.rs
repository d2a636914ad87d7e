//! A throwaway certificate authority for HTTPS fakes: `fixtures/tls/` holds its certificate and
//! a certificate for `localhost` and `127.0.0.1` it signed (valid until 2126), with the key.
//! Test material only: the key is public.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The authority's certificate (PEM), for the daemon's `SSL_CERT_FILE`.
pub const CA_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/tls/ca.pem");

const CERT: &[u8] = include_bytes!("../fixtures/tls/localhost.pem");
const KEY: &[u8] = include_bytes!("../fixtures/tls/localhost.key");

/// Server settings for [`crate::FakeOptions::tls`] offering `protocols` through ALPN, in order
/// of preference (`b"h2"`, `b"http/1.1"`).
pub fn server_config(protocols: &[&[u8]]) -> Arc<rustls::ServerConfig> {
    let cert = CertificateDer::from_pem_slice(CERT).expect("fixtures/tls/localhost.pem");
    let key = PrivateKeyDer::from_pem_slice(KEY).expect("fixtures/tls/localhost.key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .expect("the fixture's key matches its certificate");
    config.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}
