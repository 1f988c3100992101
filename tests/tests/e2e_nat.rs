//! End to end: a client, one LB running lb-agent (NAT mode, native XDP on a veth) and three
//! stub apiservers on a bridge. 1000 HTTPS requests through the VIP, each on a new
//! connection; the spread, the agent's counters and the cleanup are checked.

use std::time::Duration;

use lb_tests::lab::{assert_spread, backend_name, Lab};
use sha2::{Digest, Sha256};

#[test]
fn thousand_requests_through_the_vip_each_on_a_new_connection() {
    let Some(lab) = Lab::new("e2e_nat", 1, 3) else {
        return;
    };
    let footprint = lab.footprint();
    {
        let _stubs = lab.start_stubs();
        lab.add_vip(0);
        // No probes here: the stubs' connection counts must be the client's alone.
        let config = lab.agent_config(0, "", "kind = \"none\"");
        let mut agent = lab.start_agent(0, &config);

        let report = lab.loadgen("/version", &["--count", "1000", "--concurrency", "4"]);
        assert_eq!(report["ok"], 1000, "all requests succeed: {report}");
        assert_eq!(report["failed"], 0, "{report}");

        let status = lab.status(&config);
        let vip = &status["vips"][0];
        assert_eq!(vip["name"], "kube-apiserver");
        assert_eq!(vip["address"], "198.18.0.100");
        assert_eq!(vip["port"], 6443);
        assert_eq!(status["agent"]["xdp_mode"], "native");
        // Which agent runs which config over which map layout.
        assert_eq!(status["agent"]["version"], lb_agent::VERSION);
        assert_eq!(
            status["agent"]["map_layout_version"],
            lb_common::MAP_LAYOUT_VERSION
        );
        assert_eq!(
            status["agent"]["expected_map_layout_version"],
            lb_common::MAP_LAYOUT_VERSION
        );
        let config_path = std::path::absolute(&config).unwrap();
        assert_eq!(status["config"]["path"], config_path.to_str().unwrap());
        let bytes = std::fs::read(&config).unwrap();
        let sha256: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(status["config"]["sha256"], sha256, "{status}");
        let loaded_at = status["config"]["loaded_at"].as_str().unwrap();
        let loaded = humantime::parse_rfc3339(loaded_at).expect("loaded_at is RFC 3339");
        assert!(loaded <= std::time::SystemTime::now(), "{loaded_at}");
        let mut total_new = 0;
        for (i, served) in assert_spread(&report, 1000, 3).into_iter().enumerate() {
            let name = backend_name(i);
            let stub = lab.stub_stats(i);
            let stub_version = stub["requests"]["/version"].as_u64().unwrap_or(0);
            assert_eq!(
                stub_version, served,
                "{name}: the stub counted what the client saw"
            );
            let b = vip["backends"]
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["name"] == name.as_str())
                .unwrap_or_else(|| panic!("{name} in status: {status}"));
            assert_eq!(b["state"], "up");
            assert_eq!(b["address"], lab.backends[i].addr.to_string());
            assert_eq!(
                b["new_flows"].as_u64().unwrap(),
                stub["connections"].as_u64().unwrap(),
                "{name}: lb's new flows equal the connections the stub accepted"
            );
            assert!(
                b["packets"].as_u64().unwrap() >= 5 * served,
                "{name} packets"
            );
            assert!(b["bytes"].as_u64().unwrap() > 0);
            total_new += b["new_flows"].as_u64().unwrap();
        }
        assert_eq!(total_new, 1000, "one new flow per connection");
        assert_eq!(vip["new_flows"], 1000);
        assert!(status["counters"]["tx"].as_u64().unwrap() > 0);

        // SIGTERM: detach and remove the pins.
        let st = agent
            .terminate(Duration::from_secs(10))
            .expect("agent exits on SIGTERM");
        assert!(st.success(), "agent exit status {st}:\n{}", agent.output());
        assert!(!lab.pin_path(0).exists(), "pins removed at shutdown");
        let link = lab.lbs[0].ns.sh("ip link show eth0");
        assert!(!link.contains("xdp"), "XDP detached at shutdown: {link}");
    }
    drop(lab);
    let left = footprint.leftovers();
    assert!(left.is_empty(), "left behind: {left:?}");
}
