//! Health checks: `probe` (one probe), `tracker` (rise/fall), `policy` (panic mode),
//! `tls_watch` (reloading rotated certificates), and here the TLS client config and the
//! prober loop that runs one probe per backend per interval.

pub mod policy;
pub mod probe;
pub mod probers;
pub mod tls_watch;
pub mod tracker;
pub mod vip_path;

use std::{path::Path, sync::Arc, time::Duration};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::sync::{mpsc, watch};

use crate::config::{HealthConfig, HealthKind};
use probe::{Outcome, Target};

/// A TLS setting that cannot be used; `field` is the config field under `[vip.health]`.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct TlsError {
    pub field: &'static str,
    pub message: String,
}

fn read_certs(field: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError {
            field,
            message: format!("{}: {e}", path.display()),
        })?;
    if certs.is_empty() {
        return Err(TlsError {
            field,
            message: format!("{}: no PEM certificate in it", path.display()),
        });
    }
    Ok(certs)
}

/// A client certificate chain and its key, presented in TLS handshakes.
pub type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// The rustls client config for a VIP's https probes (None for other kinds).
pub fn tls_config(cfg: &HealthConfig) -> Result<Option<Arc<ClientConfig>>, TlsError> {
    if cfg.kind != HealthKind::Https {
        return Ok(None);
    }
    let identity = match (&cfg.client_cert, &cfg.client_key) {
        (Some(cert), Some(key)) => {
            let certs = read_certs("client_cert", cert)?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError {
                field: "client_key",
                message: format!("{}: {e}", key.display()),
            })?;
            Some((certs, key))
        }
        _ => None,
    };
    client_config(cfg, identity).map(Some)
}

/// A rustls client config that verifies servers as `cfg` says (`ca_file`, or
/// `insecure_skip_verify`), whatever its probe kind, and presents `identity` when given:
/// the probes' own (`client_cert`) or another (discovery's, from a kubeconfig).
pub fn client_config(
    cfg: &HealthConfig,
    identity: Option<Identity>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError {
            field: "kind",
            message: e.to_string(),
        })?;
    let builder = if cfg.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
    } else {
        let mut roots = RootCertStore::empty();
        for c in read_certs("ca_file", &cfg.ca_file)? {
            roots.add(c).map_err(|e| TlsError {
                field: "ca_file",
                message: format!("{}: {e}", cfg.ca_file.display()),
            })?;
        }
        builder.with_root_certificates(roots)
    };
    let mut config = match identity {
        Some((certs, key)) => builder
            .with_client_auth_cert(certs, key)
            .map_err(|e| TlsError {
                field: "client_key",
                message: e.to_string(),
            })?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Session resumption (on by default) keeps repeated probes cheap for the agent.
    Ok(Arc::new(config))
}

/// `insecure_skip_verify = true`: any certificate, any signature.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// One probe's result, addressed to the backend it is about.
#[derive(Debug, Clone)]
pub struct ProbeEvent {
    /// The backend's index in BACKENDS.
    pub backend: u32,
    /// Which prober sent it: a result from a prober a reload has since replaced is stale.
    pub prober: u64,
    pub outcome: Outcome,
}

/// Probes `target`, and when that passes and the target is a DSR backend, the VIP path:
/// both must pass for the backend to count as up.
async fn probe_with_vip_path(target: &probe::Target) -> probe::Outcome {
    let outcome = probe::probe(target).await;
    let (Ok(()), Some(check)) = (&outcome.result, &target.vip_path) else {
        return outcome;
    };
    let std::net::IpAddr::V4(backend) = target.addr.ip() else {
        return outcome;
    };
    let fail = |f: probe::Failure| probe::Outcome {
        result: Err(f),
        latency: outcome.latency,
    };
    let l = &check.local;
    // Looked up each time: the probe just reached the backend, so its neighbour entry (or
    // its gateway's) is fresh.
    let mac = match vip_path::next_hop_mac(l.ifindex, &l.ifname, check.mode, backend).await {
        Ok(m) => m,
        Err(e) => return fail(probe::Failure::VipPathLocal(e.to_string())),
    };
    let p = vip_path::VipPath {
        ifname: l.ifname.clone(),
        ifindex: l.ifindex,
        lb_mac: l.mac,
        lb_addr: l.addr,
        mode: check.mode,
        vip: check.vip,
        port: check.port,
        backend,
        next_hop_mac: mac,
        ipip_source: l.addr,
        timeout: target.timeout,
    };
    match vip_path::probe(&p).await {
        Ok(_) => outcome,
        Err(e @ vip_path::VipPathError::Io { .. }) => {
            fail(probe::Failure::VipPathLocal(e.to_string()))
        }
        Err(e) => fail(probe::Failure::NoVipPath(e.to_string())),
    }
}

/// Probes `target` now and then every `interval` until `shutdown` turns true; each probe
/// uses the target's latest TLS config (`Target::with_tls_updates`).
pub async fn run_prober(
    backend: u32,
    prober: u64,
    target: Target,
    interval: Duration,
    tx: mpsc::Sender<ProbeEvent>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    // A slow probe delays the next one rather than bunching them up.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {}
        }
        let outcome = tokio::select! {
            _ = shutdown.changed() => return,
            o = probe_with_vip_path(&target) => o,
        };
        if tx
            .send(ProbeEvent {
                backend,
                prober,
                outcome,
            })
            .await
            .is_err()
        {
            return;
        }
    }
}
