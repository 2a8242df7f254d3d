//! rustls client configuration for the upstream link, with the ring provider given
//! explicitly (the build carries no other provider, so rustls cannot pick one).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use super::config::TlsConfig;

fn read_pem(field: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path)
        .map_err(|e| format!("upstream.{field}: cannot read {}: {e}", path.display()))
}

fn certs(field: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read_pem(field, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("upstream.{field}: {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "upstream.{field}: {} holds no PEM certificate",
            path.display()
        ));
    }
    Ok(certs)
}

/// Builds the client configuration; errors name the config field and the file.
pub fn client_config(tls: &TlsConfig) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    for cert in certs("tls.ca_file", &tls.ca_file)? {
        roots
            .add(cert)
            .map_err(|e| format!("upstream.tls.ca_file: {}: {e}", tls.ca_file.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("upstream.tls: {e}"))?
        .with_root_certificates(roots);
    let config = match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key)) => {
            let chain = certs("tls.client_cert", cert)?;
            let pem = read_pem("tls.client_key", key)?;
            let key_der = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
                pem::Error::NoItemsFound => format!(
                    "upstream.tls.client_key: {} holds no PEM private key",
                    key.display()
                ),
                e => format!("upstream.tls.client_key: {}: {e}", key.display()),
            })?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| format!("upstream.tls.client_key: {e}"))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_empty_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = client_config(&TlsConfig {
            ca_file: dir.path().join("nope.pem"),
            ..TlsConfig::default()
        })
        .expect_err("missing file");
        assert!(
            e.starts_with("upstream.tls.ca_file:") && e.contains("nope.pem"),
            "{e}"
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        let e = client_config(&TlsConfig {
            ca_file: empty,
            ..TlsConfig::default()
        })
        .expect_err("no certificate");
        assert!(e.contains("no PEM certificate"), "{e}");
    }

    /// A self-signed P-256 certificate and its PKCS#8 key (test material only), as CA
    /// and as client certificate: both parse, and a key file without a key is named.
    #[test]
    fn a_certificate_and_key_pair_loads() {
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/sync/testdata");
        let cert = data.join("client-cert.pem");
        let key = data.join("client-key.pem");
        let tls = TlsConfig {
            ca_file: cert.clone(),
            client_cert: Some(cert.clone()),
            client_key: Some(key),
        };
        client_config(&tls).expect("a valid pair loads");
        let e = client_config(&TlsConfig {
            client_key: Some(cert.clone()),
            ..tls
        })
        .expect_err("a certificate is not a key");
        assert!(
            e.starts_with("upstream.tls.client_key:") && e.contains("holds no PEM private key"),
            "{e}"
        );
    }
}
