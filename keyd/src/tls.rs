//! The server's TLS configuration (TLS 1.3, client certificates from the
//! configured CA), shared by `init` and `serve`.

use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::Config;

/// The rustls server configuration of `cfg`.
pub(crate) fn server_config(cfg: &Config) -> Result<rustls::ServerConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = CertificateDer::pem_file_iter(&cfg.tls_cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("tls_cert {}: {e}", cfg.tls_cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&cfg.tls_key)
        .map_err(|e| format!("tls_key {}: {e}", cfg.tls_key.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&cfg.client_ca)
        .map_err(|e| format!("client_ca {}: {e}", cfg.client_ca.display()))?
    {
        let c = c.map_err(|e| format!("client_ca {}: {e}", cfg.client_ca.display()))?;
        roots.add(c).map_err(|e| format!("client_ca: {e}"))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    let verifier = if cfg.allow_bearer_tokens {
        verifier.allow_unauthenticated()
    } else {
        verifier
    };
    let verifier = verifier.build().map_err(|e| format!("client_ca: {e}"))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| format!("server certificate: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
