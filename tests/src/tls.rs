//! TLS helpers shared by lb-stub and lb-loadgen: test PKI generation and rustls configs.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

/// ALPN protocol both tools offer; peers that do not negotiate ALPN are still accepted.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// The ring provider, passed explicitly so feature unification elsewhere cannot make the
/// process-default provider ambiguous.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads every certificate from a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", path.display()))?;
    anyhow::ensure!(!certs.is_empty(), "no certificate in {}", path.display());
    Ok(certs)
}

/// Loads the first private key (PKCS#8, PKCS#1 or SEC1) from a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).with_context(|| format!("reading key {}", path.display()))
}

/// Server config for HTTP/1.1 over TLS from PEM cert chain and key files.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .context("building TLS server config")?;
    cfg.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Ok(Arc::new(cfg))
}

/// Client config verifying against the CA in `ca`, or accepting any server certificate when `None`.
pub fn client_config(ca: Option<&Path>) -> Result<Arc<ClientConfig>> {
    let builder =
        ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let mut cfg = match ca {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in load_certs(path)? {
                roots
                    .add(cert)
                    .with_context(|| format!("adding CA from {}", path.display()))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
            .with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Ok(Arc::new(cfg))
}

/// Skips chain and name checks but still checks handshake signatures, so a broken server
/// key is still noticed under `--insecure`.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// PEM-encoded output of [`generate_pki`].
pub struct Pki {
    /// CA certificate.
    pub ca_cert: String,
    /// CA private key.
    pub ca_key: String,
    /// Server certificate signed by the CA.
    pub server_cert: String,
    /// Server private key.
    pub server_key: String,
    /// Certificate of a second, unrelated CA (a "wrong CA" for negative tests).
    pub other_ca_cert: String,
    /// A client certificate signed by the CA, as kubelet has one (CN `system:node:lb-test`,
    /// O `system:nodes`).
    pub client_cert: String,
    /// Its private key.
    pub client_key: String,
}

fn ca_params(common_name: &str) -> Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

/// Builds a CA and a server certificate whose SANs are `sans` plus `kubernetes` and `localhost`;
/// each SAN that parses as an IP address becomes an IP SAN, anything else a DNS SAN.
pub fn generate_pki(sans: &[String]) -> Result<Pki> {
    let ca_key = KeyPair::generate()?;
    let ca = ca_params("lb-stub test CA")?.self_signed(&ca_key)?;

    let other_key = KeyPair::generate()?;
    let other = ca_params("lb-stub unrelated CA")?.self_signed(&other_key)?;

    let mut params = leaf_params(
        &[(DnType::CommonName, "kube-apiserver")],
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let mut names: Vec<String> = sans.to_vec();
    for default in ["kubernetes", "localhost"] {
        if !names.iter().any(|n| n == default) {
            names.push(default.to_string());
        }
    }
    for name in &names {
        params.subject_alt_names.push(match name.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                name.clone()
                    .try_into()
                    .with_context(|| format!("invalid DNS SAN {name:?}"))?,
            ),
        });
    }
    let server_key = KeyPair::generate()?;
    let server = params.signed_by(&server_key, &ca, &ca_key)?;

    // A kubelet's identity: the Node authorizer's user and group.
    let params = leaf_params(
        &[
            (DnType::CommonName, "system:node:lb-test"),
            (DnType::OrganizationName, "system:nodes"),
        ],
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    let client_key = KeyPair::generate()?;
    let client = params.signed_by(&client_key, &ca, &ca_key)?;

    Ok(Pki {
        ca_cert: ca.pem(),
        ca_key: ca_key.serialize_pem(),
        server_cert: server.pem(),
        server_key: server_key.serialize_pem(),
        other_ca_cert: other.pem(),
        client_cert: client.pem(),
        client_key: client_key.serialize_pem(),
    })
}

/// An end-entity certificate's parameters: the subject `dn` and one extended key usage.
fn leaf_params(dn: &[(DnType, &str)], usage: ExtendedKeyUsagePurpose) -> Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut name = DistinguishedName::new();
    for (t, v) in dn {
        name.push(t.clone(), *v);
    }
    params.distinguished_name = name;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// Writes `ca.crt`, `ca.key`, `server.crt`, `server.key`, `other-ca.crt`, `client.crt` and
/// `client.key` into `dir`, overwriting existing files.
pub fn write_pki(dir: &Path, sans: &[String]) -> Result<()> {
    let pki = generate_pki(sans)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (file, pem) in [
        ("ca.crt", &pki.ca_cert),
        ("ca.key", &pki.ca_key),
        ("server.crt", &pki.server_cert),
        ("server.key", &pki.server_key),
        ("other-ca.crt", &pki.other_ca_cert),
        ("client.crt", &pki.client_cert),
        ("client.key", &pki.client_key),
    ] {
        let path = dir.join(file);
        std::fs::write(&path, pem).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_pki_loads_into_configs() {
        let dir = std::env::temp_dir().join(format!("lb-tests-pki-{}", std::process::id()));
        write_pki(&dir, &["10.0.0.1".into(), "api.example".into()]).unwrap();
        server_config(&dir.join("server.crt"), &dir.join("server.key")).unwrap();
        client_config(Some(&dir.join("ca.crt"))).unwrap();
        client_config(Some(&dir.join("other-ca.crt"))).unwrap();
        client_config(None).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
