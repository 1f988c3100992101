//! End to end, following the control plane: lb-agent in socket mode (in the client's
//! namespace, hooks on a cgroup of the test's, no interface) with `[vip.discovery]
//! kubernetes = true`. Its config seeds two of the three stub apiservers; the stubs'
//! `kubernetes` EndpointSlice lists all three and answers only a client certificate from the
//! lab's CA, which the agent has from a kubelet-like kubeconfig. The third becomes a
//! backend; one dropped from the slice is removed; an empty slice changes nothing.

use std::{
    net::Ipv4Addr,
    process::Command,
    time::{Duration, Instant},
};

use lb_tests::{
    lab::{agent_cli, assert_spread, backend_name, bin, wait_for, Lab, VIP_PORT},
    socket_lab::{self, loadgen},
    vrrp_lab::VRRP_HEALTH,
};

/// The VIP's backends in a `status --json` report: (name, address:port, state).
fn backends(status: &serde_json::Value) -> Vec<(String, String, String)> {
    status["vips"][0]["backends"]
        .as_array()
        .unwrap_or_else(|| panic!("no backends in {status}"))
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap_or("").to_string(),
                format!("{}:{}", b["address"].as_str().unwrap_or(""), b["port"]),
                b["state"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// The backends that take new connections, by name.
fn up(status: &serde_json::Value) -> Vec<String> {
    backends(status)
        .into_iter()
        .filter(|(_, _, s)| s == "up")
        .map(|(n, _, _)| n)
        .collect()
}

#[test]
fn discovery_follows_the_kubernetes_endpointslice() {
    let Some(lab) = Lab::new("e2e_discovery", 1, 3) else {
        return;
    };
    let pki = lab.dir.join("pki");
    // The EndpointSlice API wants a client certificate from the lab's CA; /readyz does not.
    let _stubs = lab.start_stubs_with(&["--api-client-ca", pki.join("ca.crt").to_str().unwrap()]);
    let addr = |i: usize| lab.backends[i].addr;
    lab.set_endpointslice(&[addr(0), addr(1), addr(2)]);
    let anonymous = lab.backends[0].ns.try_sh(&format!(
        "curl -s -o /dev/null -w '%{{http_code}}' --cacert {} 'https://{}:{VIP_PORT}{}'",
        pki.join("ca.crt").display(),
        addr(0),
        lb_tests::endpointslice::PATH
    ));
    assert_eq!(
        anonymous.map(|s| s.trim().to_string()),
        Ok("401".to_string()),
        "the slice is not for anybody"
    );

    // kubelet.conf as kubeadm writes it: the certificate and key in one rotated file,
    // named relative to the kubeconfig here.
    let client = format!(
        "{}{}",
        std::fs::read_to_string(pki.join("client.crt")).unwrap(),
        std::fs::read_to_string(pki.join("client.key")).unwrap()
    );
    std::fs::write(lab.dir.join("kubelet-client-current.pem"), client).unwrap();
    let kubeconfig = lab.dir.join("kubelet.conf");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- cluster:\n    server: https://127.0.0.1:6443\n  name: default-cluster\n\
         contexts:\n- context:\n    cluster: default-cluster\n    user: default-auth\n  name: default-context\n\
         current-context: default-context\nusers:\n- name: default-auth\n  user:\n\
         \x20   client-certificate: kubelet-client-current.pem\n    client-key: kubelet-client-current.pem\n",
    )
    .unwrap();

    let cgroup = socket_lab::cgroup(&lab, "discovery");
    let seed: Vec<_> = (0..2)
        .map(|i| (backend_name(i), addr(i), VIP_PORT))
        .collect();
    let config = socket_lab::config(
        &lab,
        &cgroup,
        &format!(
            "[vip.discovery]\nkubernetes = true\nkubeconfig = \"{}\"",
            kubeconfig.display()
        ),
        VRRP_HEALTH,
        &seed,
    );
    agent_cli("check-config", &config);

    // Within a few seconds the third apiserver is a backend, named after its address, up.
    let t0 = Instant::now();
    let mut agent =
        socket_lab::start_agent(&lab, &config, Duration::from_secs(20), |s| up(s).len() == 3);
    let joined = t0.elapsed();
    eprintln!("the third apiserver took new connections {joined:?} after the agent started");
    assert!(joined < Duration::from_secs(10), "{joined:?}");
    let s = lab.status(&config);
    let third = addr(2).to_string();
    assert_eq!(
        backends(&s),
        [
            (
                backend_name(0),
                format!("{}:{VIP_PORT}", addr(0)),
                "up".into()
            ),
            (
                backend_name(1),
                format!("{}:{VIP_PORT}", addr(1)),
                "up".into()
            ),
            (third.clone(), format!("{third}:{VIP_PORT}"), "up".into()),
        ]
    );
    let d = &s["vips"][0]["discovery"];
    assert_eq!(d["source"], "endpointslice", "{s}");
    assert!(
        d["state"]
            .as_str()
            .unwrap()
            .starts_with("watching via 198.18.0.1"),
        "{d}"
    );
    let text = Command::new(bin("lb-agent"))
        .args(["status", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("  backends: discovered from the kubernetes EndpointSlice (rv 2, at "),
        "{text}"
    );

    // Connections spread over the three.
    let report = loadgen(&lab, Some(&cgroup), 300);
    assert_eq!(report["ok"], 300, "{report}");
    assert_spread(&report, 300, 3);

    // A reload of the file keeps what was discovered rather than going back to the seed.
    agent_cli("reload", &config);
    assert_eq!(up(&lab.status(&config)).len(), 3, "after a reload");

    // `lb-agent restart` hands what was found to the new agent: no step back to the seed.
    agent_cli("restart", &config);
    wait_for(Duration::from_secs(20), "the restarted agent", || {
        lab.try_status(&config)
            .is_ok_and(|s| s["agent"]["restarted_by"].is_string())
    });
    let s = lab.status(&config);
    assert_eq!(up(&s).len(), 3, "after a restart: {s}");
    assert_eq!(s["vips"][0]["discovery"]["source"], "endpointslice", "{s}");
    assert!(
        agent
            .output()
            .contains("serving the 3 apiservers the previous agent found"),
        "{}",
        agent.output()
    );

    // The slice drops master02: it is removed, and new connections avoid it.
    let t1 = Instant::now();
    lab.set_endpointslice(&[addr(0), addr(2)]);
    wait_for(Duration::from_secs(5), "master02 to leave", || {
        !up(&lab.status(&config)).contains(&backend_name(1))
    });
    let left = t1.elapsed();
    eprintln!("master02 took no new connections {left:?} after the slice dropped it");
    let report = loadgen(&lab, Some(&cgroup), 60);
    assert_eq!(report["ok"], 60, "{report}");
    assert!(report["backends"][backend_name(1)].is_null(), "{report}");
    // Socket mode keeps no flows: the removed backend goes at the next reconcile.
    wait_for(Duration::from_secs(10), "master02 to be gone", || {
        backends(&lab.status(&config))
            .iter()
            .all(|(n, _, _)| *n != backend_name(1))
    });

    // The slice goes empty: nothing changes, and status says why.
    let before = backends(&lab.status(&config));
    lab.set_endpointslice(&[] as &[Ipv4Addr]);
    wait_for(Duration::from_secs(5), "the empty slice to be seen", || {
        lab.status(&config)["vips"][0]["discovery"]["held"]
            .as_str()
            .is_some_and(|h| h.contains("no ready IPv4 apiserver"))
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(backends(&lab.status(&config)), before);
    let report = loadgen(&lab, Some(&cgroup), 60);
    assert_eq!(report["ok"], 60, "{report}");
    assert!(report["backends"][backend_name(1)].is_null(), "{report}");

    // One line per change in the log, each once.
    let log = agent.output();
    assert_eq!(
        log.matches(&format!("backend {third} added ({third}:{VIP_PORT}"))
            .count(),
        1,
        "{log}"
    );
    assert_eq!(
        log.matches("backend master02 removed (198.18.0.12:6443)")
            .count(),
        1,
        "{log}"
    );
    assert_eq!(
        log.matches("lists no ready IPv4 apiserver").count(),
        1,
        "{log}"
    );

    agent.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        agent.wait(Duration::from_secs(15)).is_some(),
        "the agent stops"
    );
}
