//! The data plane outlives the agent: an agent killed with SIGKILL and started again (what
//! `Restart=on-failure` does) adopts the pinned program and maps, so the connections through
//! it live on.

use std::time::{Duration, Instant};

use lb_tests::lab::Lab;
use nix::sys::signal::Signal;

/// Long-lived connections that never failed a request nor reconnected.
fn survivors(report: &serde_json::Value) -> usize {
    report["connections"]
        .as_array()
        .map(|c| {
            c.iter()
                .filter(|c| c["requests_failed"] == 0 && c["reconnects"] == 0)
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn sigkill_then_run_within_a_second_adopts_the_flows() {
    let Some(lab) = Lab::new("restart_kill", 1, 3) else {
        return;
    };
    let footprint = lab.footprint();
    {
        let _stubs = lab.start_stubs();
        lab.add_vip(0);
        let config = lab.agent_config(0, "", "interval = \"200ms\"\ntimeout = \"150ms\"");
        let mut agent = lab.start_agent(0, &config);
        let before = lab.status(&config);
        let long = lab.spawn_long_lived("kill-long", 8);
        std::thread::sleep(Duration::from_secs(2));
        let flows_before = lab.status(&config)["flows"].as_u64().unwrap();

        let t0 = Instant::now();
        agent.signal(Signal::SIGKILL);
        agent.wait(Duration::from_secs(5)).expect("SIGKILL ends it");
        let link = lab.lbs[0].ns.sh("ip link show eth0");
        assert!(
            link.contains("xdp"),
            "the pinned program stays attached: {link}"
        );
        let mut agent = lab.start_agent(0, &config);
        let serving = t0.elapsed();
        let after = lab.status(&config);
        assert_ne!(after["agent"]["pid"], before["agent"]["pid"]);
        let log = agent.output();
        assert!(log.contains("adopting the data plane"), "{log}");
        for b in after["vips"][0]["backends"].as_array().unwrap() {
            assert_eq!(b["state"], "up", "health carried over: {after}");
        }

        let report = long.finish(Duration::from_secs(30));
        let kept = survivors(&report);
        println!(
            "SIGKILL + run: serving again after {} ms; {flows_before} flows before; {kept} of 30 long-lived connections survived ({} requests ok, {} failed)",
            serving.as_millis(),
            report["ok"],
            report["failed"]
        );
        assert_eq!(kept, 30, "every connection lives on: {report}");
        assert_eq!(report["failed"], 0, "{report}");

        let st = agent
            .terminate(Duration::from_secs(10))
            .expect("exits on SIGTERM");
        assert!(st.success(), "{st}\n{}", agent.output());
        assert!(!lab.pin_path(0).exists(), "an orderly stop removes the pins");
        let link = lab.lbs[0].ns.sh("ip link show eth0");
        assert!(!link.contains("xdp"), "and detaches: {link}");
    }
    drop(lab);
    let left = footprint.leftovers();
    assert!(left.is_empty(), "left behind: {left:?}");
}
