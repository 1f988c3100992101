//! End to end: the agent under a service manager's notification socket (systemd's
//! `Type=notify`), played by a datagram socket of the test's own.
//!
//! READY=1 must mean "serving": the XDP program attached, the maps pinned, the control
//! socket answering. STOPPING=1 must come when shutdown begins, before anything is undone.
//! Both are shown by keeping the socket's queue full (as many datagrams as the kernel queues,
//! `net.unix.max_dgram_qlen`): the agent's send then blocks until the test reads, so what the
//! test sees meanwhile is the state at the moment of sending. An agent that sent READY=1
//! before attaching would sit in that send unattached and never answer status.
//!
//! The agent runs with what `packaging/systemd/lb-agent.service` gives it: the capabilities
//! of its `CapabilityBoundingSet=` and no new privileges.

use std::{
    io::ErrorKind,
    os::unix::net::UnixDatagram,
    path::Path,
    time::{Duration, Instant},
};

use lb_tests::{lab::Lab, systemd::setpriv_as_unit};

const FILLER: &[u8] = b"FILLER=1";

/// Queues datagrams on `path` until the kernel refuses more; returns how many.
fn fill(path: &Path) -> usize {
    let s = UnixDatagram::unbound().unwrap();
    s.connect(path).unwrap();
    s.set_nonblocking(true).unwrap();
    let mut n = 0;
    loop {
        match s.send(FILLER) {
            Ok(_) => n += 1,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return n,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
}

/// The next datagram on `sock` that is not ours, after exactly `fillers` of ours.
fn next_after(sock: &UnixDatagram, fillers: usize, what: &str) -> String {
    let mut buf = [0u8; 4096];
    for i in 0..fillers {
        let n = sock
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("filler {i}: {e}"));
        assert_eq!(
            &buf[..n],
            FILLER,
            "{what}: the agent sent {:?} while the queue was full (only its blocked send may follow the fillers)",
            String::from_utf8_lossy(&buf[..n])
        );
    }
    let n = sock
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("waiting for {what}: {e}"));
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn xdp_attached(lab: &Lab) -> bool {
    lab.lbs[0].ns.sh("ip link show eth0").contains("xdp")
}

#[test]
fn ready_only_once_serving_and_stopping_before_anything_is_undone() {
    let Some(lab) = Lab::new("e2e_notify", 1, 1) else {
        return;
    };
    let footprint = lab.footprint();
    {
        lab.certs();
        let config = lab.agent_config(0, "", "kind = \"none\"");
        let path = lab.dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let fillers = fill(&path);
        assert!(fillers > 0, "the queue takes some datagrams");

        // As the unit runs it: only its capabilities, no new privileges, NOTIFY_SOCKET set.
        let mut wrapper = setpriv_as_unit();
        wrapper.extend(["env".into(), format!("NOTIFY_SOCKET={}", path.display())]);
        let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
        let started = Instant::now();
        // Waits until `lb-agent status` finds the control socket answering; READY=1 cannot
        // have been delivered meanwhile.
        let mut agent = lab.start_agent_with(0, &config, &wrapper);
        println!(
            "agent serving {} ms after the start",
            started.elapsed().as_millis()
        );
        let caps =
            std::fs::read_to_string(format!("/proc/{}/status", agent.pid().unwrap())).unwrap();
        println!(
            "agent's capabilities: {}",
            caps.lines()
                .filter(|l| l.starts_with("Cap"))
                .collect::<Vec<_>>()
                .join("; ")
        );
        assert!(
            caps.contains("NoNewPrivs:\t1"),
            "NoNewPrivileges= applies: {caps}"
        );
        let status = lab.status(&config);
        assert_eq!(status["agent"]["running"], true, "{status}");
        assert_eq!(status["agent"]["xdp_mode"], "native", "{status}");
        assert!(xdp_attached(&lab), "XDP attached before READY=1");
        for m in lb_common::map::ALL {
            assert!(
                lab.pin_path(0).join(m).exists(),
                "{m} pinned before READY=1"
            );
        }

        let ready = next_after(&sock, fillers, "READY=1");
        assert_eq!(
            ready,
            "READY=1\nSTATUS=serving kube-apiserver on eth0 (XDP native mode)\n",
            "{}",
            agent.output()
        );
        assert!(agent.running(), "{}", agent.output());

        // Shutdown: STOPPING=1 is sent before the agent detaches or removes anything.
        let fillers = fill(&path);
        agent.signal(nix::sys::signal::Signal::SIGTERM);
        // Without VRRP, a shutdown that went on would be over well within this.
        std::thread::sleep(Duration::from_secs(1));
        assert!(
            agent.running(),
            "held in its STOPPING=1 send: {}",
            agent.output()
        );
        assert!(xdp_attached(&lab), "nothing undone before STOPPING=1");
        assert!(lab.pin_path(0).exists(), "nothing undone before STOPPING=1");
        let stopping = next_after(&sock, fillers, "STOPPING=1");
        assert_eq!(
            stopping,
            "STOPPING=1\nSTATUS=SIGTERM: giving up the VIP, detaching\n"
        );
        let st = agent
            .wait(Duration::from_secs(10))
            .expect("agent exits after SIGTERM");
        assert!(st.success(), "exit status {st}:\n{}", agent.output());
        assert!(!lab.pin_path(0).exists(), "pins removed at shutdown");
        assert!(!xdp_attached(&lab), "XDP detached at shutdown");
        sock.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 4096];
        match sock.recv(&mut buf) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            other => panic!(
                "nothing after STOPPING=1, got {:?}",
                other.map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
            ),
        }
        assert!(
            !agent.output().contains("telling the service manager"),
            "no notification failed: {}",
            agent.output()
        );
    }
    drop(lab);
    let left = footprint.leftovers();
    assert!(left.is_empty(), "left behind: {left:?}");
}
