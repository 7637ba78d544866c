//! TLS for the API listener (rustls with the `ring` provider): the certificate chain and the
//! private key are read from PEM files at start; TLS 1.2 and 1.3, HTTP/1.1.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::{self, ServerConfig};

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("tls: {path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the certificate and key.
    #[error("tls: the certificate and key do not make a server configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// Builds the acceptor from a PEM certificate chain and a PEM private key.
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let file_error = |path: &Path, reason: String| TlsError::File {
        path: path.to_path_buf(),
        reason,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| file_error(cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(file_error(cert, "holds no certificate".into()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        file_error(
            key,
            format!("holds no usable private key (PKCS#8, PKCS#1 or SEC1): {e}"),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_or_wrong_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        let err = acceptor(&cert, &key).err().expect("refused").to_string();
        assert!(err.contains("cert.pem"), "{err}");
        let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        std::fs::write(&cert, generated.cert.pem()).unwrap();
        std::fs::write(&key, "not a key").unwrap();
        let err = acceptor(&cert, &key).err().expect("refused").to_string();
        assert!(
            err.contains("key.pem") && err.contains("private key"),
            "{err}"
        );
        std::fs::write(&key, generated.key_pair.serialize_pem()).unwrap();
        assert!(acceptor(&cert, &key).is_ok());
        let other = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        std::fs::write(&key, other.key_pair.serialize_pem()).unwrap();
        let err = acceptor(&cert, &key).err().expect("refused").to_string();
        assert!(
            err.contains("do not make"),
            "a key of another certificate: {err}"
        );
    }
}
