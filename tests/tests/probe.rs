//! Health probes against the stub apiserver in a namespace: success, 503, a stub that
//! accepts TCP and never answers, a wrong CA, insecure_skip_verify, a refused port.

use std::{net::SocketAddr, path::Path, time::Duration};

use lb_agent::{
    config::{HealthConfig, HealthKind},
    health::{
        self,
        probe::{self, Failure, Outcome, Waiting},
    },
};
use lb_tests::lab::{backend_addr, Lab, VIP_PORT};

fn probe_from_client(lab: &Lab, addr: SocketAddr, cfg: &HealthConfig) -> Outcome {
    let tls = health::tls_config(cfg).expect("TLS config");
    let target = probe::Target::new(addr, cfg, tls);
    let _in = lab.client.ns.enter();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(probe::probe(&target))
}

fn cfg(ca: &Path) -> HealthConfig {
    HealthConfig {
        kind: HealthKind::Https,
        timeout: Duration::from_millis(300),
        ca_file: ca.to_path_buf(),
        ..Default::default()
    }
}

#[test]
fn probes_tell_ready_not_ready_hung_and_untrusted_apart() {
    let Some(lab) = Lab::new("probe", 0, 1) else {
        return;
    };
    let _stubs = lab.start_stubs();
    let pki = lab.dir.join("pki");
    let addr = SocketAddr::from((backend_addr(0), VIP_PORT));
    let good = cfg(&pki.join("ca.crt"));

    let o = probe_from_client(&lab, addr, &good);
    assert_eq!(o.result, Ok(()), "200 on /readyz is a success");
    assert!(o.latency < Duration::from_millis(300));

    let named = HealthConfig {
        server_name: Some("kubernetes".into()),
        ..good.clone()
    };
    assert_eq!(
        probe_from_client(&lab, addr, &named).result,
        Ok(()),
        "SNI/name kubernetes"
    );

    lab.stub_admin(0, "/mode?readyz=503");
    let o = probe_from_client(&lab, addr, &good);
    assert_eq!(
        o.result,
        Err(Failure::Status(503)),
        "503 fails with the status as reason"
    );
    assert!(o.result.unwrap_err().is_not_ready());
    lab.stub_admin(0, "/mode?readyz=200");

    lab.stub_admin(0, "/mode?accept=hang");
    let o = probe_from_client(&lab, addr, &good);
    assert_eq!(
        o.result,
        Err(Failure::TimeoutAfterConnect(Waiting::Handshake)),
        "accepts TCP, never answers: timeout after connect"
    );
    assert!(o.latency >= Duration::from_millis(300));
    lab.stub_admin(0, "/mode?accept=normal");

    let wrong_ca = cfg(&pki.join("other-ca.crt"));
    let o = probe_from_client(&lab, addr, &wrong_ca);
    assert!(
        matches!(o.result, Err(Failure::CertNotTrusted(ref m)) if m.contains("UnknownIssuer")),
        "wrong CA: TLS failure, got {:?}",
        o.result
    );

    let insecure = HealthConfig {
        insecure_skip_verify: true,
        ..wrong_ca.clone()
    };
    assert_eq!(
        probe_from_client(&lab, addr, &insecure).result,
        Ok(()),
        "insecure_skip_verify"
    );

    let closed = SocketAddr::from((backend_addr(0), VIP_PORT + 1));
    assert_eq!(
        probe_from_client(&lab, closed, &good).result,
        Err(Failure::Refused)
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
        stats["requests"]["/readyz"].as_u64().unwrap() >= 3,
        "{stats}"
    );
}
