//! Health probes against the stub apiserver in a namespace, each failure sorted into its
//! class: unreachable (refused, connect timeout, no route), not ready (503, a stub that
//! accepts TCP and never answers, /readyz answered too late) and LB side (a wrong CA,
//! 401/403, a rejected client certificate). Every packet stays in the lab's namespaces.

use std::{future::Future, net::SocketAddr, path::Path, time::Duration};

use lb_agent::{
    config::{HealthConfig, HealthKind},
    health::{
        self,
        probe::{self, Failure, FailureClass, Outcome, Waiting},
    },
};
use lb_tests::lab::{backend_addr, backend_name, wait_for, Lab, VIP_PORT};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};

/// The probes' timeout: short, and far from every delay the stub is told to add.
const TIMEOUT: Duration = Duration::from_millis(300);

/// Runs `f` on a fresh runtime in the client's namespace.
fn in_client<T>(lab: &Lab, f: impl Future<Output = T>) -> T {
    let _in = lab.client.ns.enter();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn probe_from_client(lab: &Lab, addr: SocketAddr, cfg: &HealthConfig) -> Outcome {
    let tls = health::tls_config(cfg).expect("TLS config");
    let target = probe::Target::new(addr, cfg, tls);
    in_client(lab, probe::probe(&target))
}

/// The failure of `o` (which must have failed) and its class; shown with --nocapture.
fn failed(o: &Outcome) -> (Failure, FailureClass) {
    let f = o.result.clone().expect_err("the probe should fail");
    let class = f.class();
    eprintln!("probe failed after {:?}: {f} ({})", o.latency, class.word());
    (f, class)
}

fn cfg(ca: &Path) -> HealthConfig {
    HealthConfig {
        kind: HealthKind::Https,
        timeout: TIMEOUT,
        ca_file: ca.to_path_buf(),
        ..Default::default()
    }
}

#[test]
fn probes_sort_failures_into_unreachable_not_ready_and_lb_side() {
    let Some(lab) = Lab::new("probe", 0, 1) else {
        return;
    };
    let _stubs = lab.start_stubs();
    let pki = lab.dir.join("pki");
    let addr = SocketAddr::from((backend_addr(0), VIP_PORT));
    let good = cfg(&pki.join("ca.crt"));

    let o = probe_from_client(&lab, addr, &good);
    assert_eq!(o.result, Ok(()), "200 on /readyz is a success");
    assert!(o.latency < TIMEOUT);

    let named = HealthConfig {
        server_name: Some("kubernetes".into()),
        ..good.clone()
    };
    assert_eq!(
        probe_from_client(&lab, addr, &named).result,
        Ok(()),
        "SNI/name kubernetes"
    );

    // Not ready: the apiserver answers, but should get no new connections.
    lab.stub_admin(0, "/mode?readyz=503");
    let o = probe_from_client(&lab, addr, &good);
    assert_eq!(
        failed(&o),
        (Failure::Status(503), FailureClass::NotReady),
        "503 fails with the status as reason"
    );
    lab.stub_admin(0, "/mode?readyz=200");

    lab.stub_admin(0, "/mode?readyz_delay_ms=1500");
    let o = probe_from_client(&lab, addr, &good);
    assert_eq!(
        failed(&o),
        (
            Failure::TimeoutAfterConnect(Waiting::Answer("/readyz".into())),
            FailureClass::NotReady
        ),
        "an overloaded apiserver answering /readyz late is not ready, not unreachable"
    );
    assert_eq!(
        o.result.unwrap_err().to_string(),
        "timeout after connect (no answer to GET /readyz)"
    );
    assert!(o.latency >= TIMEOUT && o.latency < Duration::from_millis(1500));
    lab.stub_admin(0, "/mode?readyz_delay_ms=0");

    lab.stub_admin(0, "/mode?accept=hang");
    let o = probe_from_client(&lab, addr, &good);
    assert_eq!(
        failed(&o),
        (
            Failure::TimeoutAfterConnect(Waiting::Handshake),
            FailureClass::NotReady
        ),
        "accepts TCP, never answers: timeout after connect"
    );
    assert!(o.latency >= TIMEOUT);
    lab.stub_admin(0, "/mode?accept=normal");

    // LB side: the apiserver is probably fine, our CA or credentials are not.
    let wrong_ca = cfg(&pki.join("other-ca.crt"));
    let o = probe_from_client(&lab, addr, &wrong_ca);
    assert_eq!(
        failed(&o),
        (
            Failure::CertNotTrusted("UnknownIssuer".into()),
            FailureClass::LbSide
        ),
        "wrong CA"
    );
    for status in [401, 403] {
        lab.stub_admin(0, &format!("/mode?readyz={status}"));
        let o = probe_from_client(&lab, addr, &good);
        assert_eq!(failed(&o), (Failure::Status(status), FailureClass::LbSide));
    }
    lab.stub_admin(0, "/mode?readyz=200");

    let insecure = HealthConfig {
        insecure_skip_verify: true,
        ..wrong_ca.clone()
    };
    assert_eq!(
        probe_from_client(&lab, addr, &insecure).result,
        Ok(()),
        "insecure_skip_verify"
    );

    // A new CA published to a running target is used by its next probe.
    let (tx, rx) = tokio::sync::watch::channel(health::tls_config(&wrong_ca).unwrap());
    let target = probe::Target::new(addr, &good, None).with_tls_updates(rx);
    let (before, after) = in_client(&lab, async {
        let before = probe::probe(&target).await;
        tx.send_replace(health::tls_config(&good).unwrap());
        (before, probe::probe(&target).await)
    });
    assert_eq!(failed(&before).1, FailureClass::LbSide);
    assert_eq!(after.result, Ok(()), "the reloaded CA is used");

    // Unreachable: nobody is there.
    let closed = SocketAddr::from((backend_addr(0), VIP_PORT + 1));
    assert_eq!(
        failed(&probe_from_client(&lab, closed, &good)),
        (Failure::Refused, FailureClass::Unreachable)
    );

    // SYNs dropped on the backend host: the connect never finishes.
    let silent_port = VIP_PORT + 2;
    lab.backends[0].ns.sh(&format!(
        "nft add table inet lbprobe && \
         nft add chain inet lbprobe input '{{ type filter hook input priority 0; }}' && \
         nft add rule inet lbprobe input tcp dport {silent_port} 'tcp flags & (syn | ack) == syn' drop"
    ));
    let silent = SocketAddr::from((backend_addr(0), silent_port));
    let o = probe_from_client(&lab, silent, &good);
    assert_eq!(
        failed(&o),
        (Failure::ConnectTimeout, FailureClass::Unreachable)
    );
    assert_eq!(o.result.unwrap_err().to_string(), "connect timeout");

    // A lab address with no host behind it: ARP gets no answer, the connect times out.
    let gone = SocketAddr::from(([198, 18, 0, 97], VIP_PORT));
    assert_eq!(
        failed(&probe_from_client(&lab, gone, &good)),
        (Failure::ConnectTimeout, FailureClass::Unreachable)
    );

    // No route: the kernel fails the connect at once.
    lab.client.ns.sh("ip route add blackhole 198.18.0.99");
    let o = probe_from_client(&lab, SocketAddr::from(([198, 18, 0, 99], VIP_PORT)), &good);
    assert_eq!(
        failed(&o),
        (
            Failure::Connect("blackhole route".into()),
            FailureClass::Unreachable
        )
    );
    assert!(o.latency < TIMEOUT, "fails fast: {:?}", o.latency);
    lab.client.ns.sh("ip route add unreachable 198.18.0.98");
    let o = probe_from_client(&lab, SocketAddr::from(([198, 18, 0, 98], VIP_PORT)), &good);
    assert_eq!(
        failed(&o),
        (
            Failure::Connect("No route to host (os error 113)".into()),
            FailureClass::Unreachable
        )
    );

    let tcp = HealthConfig {
        kind: HealthKind::Tcp,
        ..good.clone()
    };
    assert_eq!(
        probe_from_client(&lab, addr, &tcp).result,
        Ok(()),
        "tcp probe"
    );

    let stats = lab.stub_stats(0);
    assert!(
        stats["requests"]["/readyz"].as_u64().unwrap() >= 6,
        "{stats}"
    );
}

/// A CA and a client certificate it signed, written as PEM files into `dir`.
fn client_pki(
    dir: &Path,
    name: &str,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let dn = |cn: &str| {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        dn
    };
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name = dn(&format!("{name} client CA"));
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca.self_signed(&ca_key).unwrap();
    let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf.distinguished_name = dn("system:lb-agent");
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &ca, &ca_key).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let paths = (
        dir.join(format!("{name}-ca.crt")),
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

#[test]
fn a_rejected_client_certificate_is_lb_side() {
    let Some(lab) = Lab::new("probe-mtls", 0, 1) else {
        return;
    };
    let pki = lab.certs();
    let (client_ca, cert, key) = client_pki(&lab.dir.join("client"), "agent");
    let (_, rogue_cert, rogue_key) = client_pki(&lab.dir.join("client"), "rogue");
    let addr = SocketAddr::from((backend_addr(0), VIP_PORT));
    let stub = lb_tests::lab::bin("lb-stub");
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let _stub = lab.spawn(
        &lab.backends[0],
        &backend_name(0),
        &[
            &path(&stub),
            "serve",
            "--listen",
            &addr.to_string(),
            "--name",
            &backend_name(0),
            "--cert",
            &path(&pki.join("server.crt")),
            "--key",
            &path(&pki.join("server.key")),
            "--client-ca",
            &path(&client_ca),
        ],
    );
    let with = |cert: &Path, key: &Path| HealthConfig {
        client_cert: Some(cert.to_path_buf()),
        client_key: Some(key.to_path_buf()),
        ..cfg(&pki.join("ca.crt"))
    };
    let good = with(&cert, &key);
    wait_for(Duration::from_secs(10), "the mTLS stub", || {
        probe_from_client(&lab, addr, &good).result != Err(Failure::Refused)
    });
    assert_eq!(probe_from_client(&lab, addr, &good).result, Ok(()));

    // TLS 1.3: the client's handshake is over before the server checks the certificate,
    // so the rejection arrives as an alert on the first read; it must still be LB side.
    let o = probe_from_client(&lab, addr, &with(&rogue_cert, &rogue_key));
    let (f, class) = failed(&o);
    assert!(
        matches!(f, Failure::ClientCertRejected(_)) && class == FailureClass::LbSide,
        "a certificate from another CA: {f:?}"
    );
    let o = probe_from_client(&lab, addr, &cfg(&pki.join("ca.crt")));
    let (f, class) = failed(&o);
    assert!(
        matches!(f, Failure::ClientCertRejected(_)) && class == FailureClass::LbSide,
        "no client certificate: {f:?}"
    );
}
