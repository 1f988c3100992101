//! The data plane outlives the agent's process: the program is attached through a pinned
//! link, a later agent adopts the pinned maps as they are and replaces the program in place
//! (BPF_LINK_UPDATE), and what it cannot adopt it removes and loads afresh.

use std::path::PathBuf;

use aya::programs::Xdp;
use lb_agent::{
    config::XdpModeSetting,
    dataplane::{
        loader::{remove_pins, Dataplane, Start},
        pinned::PinnedMaps,
        writer::{self, Writer},
        DataplaneError,
    },
};
use lb_common::{
    flow_flags, map, reason, xdp_mode, AgentMeta, Flow, FlowKey, LINK_PIN, MAP_LAYOUT_VERSION,
};
use lb_tests::{
    fixture::{self, Options, BACKENDS, CLIENT, CLIENT_MAC, LB_ADDR, LB_MAC, VIP, XDP_TX},
    netns::{self, Netns},
    packet::{self, Frame, TcpFlags},
};

/// Connections the tests' flow table holds (small: FLOWS is preallocated).
const MAX_FLOWS: u32 = 4096;

/// A namespace whose veth `d0` has the fixture's address, neighbours and routes, and a pin
/// directory of its own, whose pins (and link) are removed on drop.
struct Setup {
    pin: PathBuf,
    ifindex: u32,
    ns: Netns,
}

impl Setup {
    fn new(tag: &str) -> Option<Self> {
        if !netns::require_root(tag) {
            return None;
        }
        let ns = Netns::new(&format!("lbt-{tag}-{}", netns::unique_id()));
        let mut cmds = vec![format!(
            "ip link add d0 address {} type veth peer name d1 && ip link set d1 up && ip link set d0 up && \
             ip addr add {LB_ADDR}/24 dev d0 && sysctl -qw net.ipv4.conf.d0.forwarding=1 && \
             ip neigh replace {CLIENT} lladdr {} dev d0 nud permanent",
            packet::mac_str(&LB_MAC),
            packet::mac_str(&CLIENT_MAC)
        )];
        cmds.extend(BACKENDS.iter().map(|(a, m)| {
            format!(
                "ip neigh replace {a} lladdr {} dev d0 nud permanent",
                packet::mac_str(m)
            )
        }));
        ns.sh(&cmds.join(" && "));
        let ifindex = ns.ifindex("d0");
        // The test's own mount namespace is the host's: these pins are the ones it reads.
        let pin = PathBuf::from(format!("/sys/fs/bpf/{}", ns.name));
        Some(Self { pin, ifindex, ns })
    }

    fn load(&self, max_flows: u32, ifindex: u32) -> (Dataplane, Start) {
        Dataplane::load_or_adopt(&self.pin, max_flows, ifindex).expect("load_or_adopt")
    }

    fn attach(&self, dp: &mut Dataplane, setting: XdpModeSetting) -> Result<u32, DataplaneError> {
        let _in_ns = self.ns.enter();
        dp.attach("d0", setting, None)
    }

    fn maps(&self) -> PinnedMaps {
        PinnedMaps::open(&self.pin).expect("open the pins")
    }

    /// What a started agent writes: the maps for the fixture's VIP and AGENT_META.
    fn configure(&self, meta: AgentMeta) {
        let mut w = Writer::new(self.maps());
        let mut vips = writer::plan(
            &fixture::config(&self.pin, &Options::default()),
            LB_ADDR,
            &[],
        );
        w.install(&mut vips).expect("install");
        w.set_agent_meta(meta).expect("AGENT_META");
    }

    fn meta(&self, mode: u32) -> AgentMeta {
        AgentMeta {
            xdp_mode: mode,
            ifindex: self.ifindex,
            pid: std::process::id(),
            layout_version: MAP_LAYOUT_VERSION,
            started_unix: 1_790_000_000,
            mac: LB_MAC,
            _pad2: [0; 2],
            netns_cookie: 0,
        }
    }

    /// Runs `prog` on `frame` (BPF_PROG_TEST_RUN, inside the namespace for the FIB).
    fn run(&self, prog: &Xdp, frame: &[u8]) -> (u32, packet::Parsed) {
        let _in_ns = self.ns.enter();
        let (verdict, out) = packet::test_run(prog, frame, self.ifindex);
        (verdict, packet::parse(&out).expect("a TCP frame"))
    }

    /// The XDP program on `d0` as the kernel reports it: `ip` JSON's mode (1 native,
    /// 2 generic) and program id.
    fn xdp(&self) -> Option<(u64, u64)> {
        let out = self.ns.sh("ip -j -d link show dev d0");
        let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j output");
        let x = &v[0]["xdp"];
        Some((x["mode"].as_u64()?, x["prog"]["id"].as_u64()?))
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = remove_pins(&self.pin);
    }
}

fn syn(sport: u16) -> Frame {
    Frame::tcp(CLIENT_MAC, LB_MAC, CLIENT, sport, VIP, 6443, TcpFlags::SYN)
}

/// A connection the program never saw, written into FLOWS as the program would have.
fn made_up_flow() -> (FlowKey, Flow) {
    let key = FlowKey::tcp(
        u32::from_be_bytes([198, 19, 0, 7]).to_be(),
        u32::from(VIP).to_be(),
        41000u16.to_be(),
        6443u16.to_be(),
    );
    let flow = Flow {
        src_addr: u32::from(LB_ADDR).to_be(),
        dst_addr: u32::from(BACKENDS[1].0).to_be(),
        src_port: 62000u16.to_be(),
        dst_port: 6443u16.to_be(),
        backend: 1,
        flags: flow_flags::ESTABLISHED,
        last_seen_ns: 12345,
        ..Default::default()
    };
    (key, flow)
}

/// Every pinned map's contents that the tests fill, map by map.
fn snapshot(m: &PinnedMaps) -> Vec<(&'static str, String)> {
    let sorted = |mut v: Vec<(FlowKey, Flow)>| {
        v.sort_by_key(|(k, _)| (k.src_addr, k.dst_addr, k.src_port, k.dst_port));
        format!("{v:?}")
    };
    let per_cpu = |v: aya::maps::PerCpuValues<lb_common::TrafficStats>| {
        format!("{:?}", v.iter().collect::<Vec<_>>())
    };
    let maglev = m.maglev_read(0, 2 * 65537).unwrap();
    vec![
        (
            map::FLOWS,
            sorted(m.flows.iter().map(|e| e.unwrap()).collect()),
        ),
        (
            map::HALF_OPEN,
            sorted(m.half_open.iter().map(|e| e.unwrap()).collect()),
        ),
        (
            map::VIPS,
            format!(
                "{:?}",
                m.vips.iter().map(|e| e.unwrap()).collect::<Vec<_>>()
            ),
        ),
        (
            map::BACKENDS,
            format!(
                "{:?}",
                (0..3u32)
                    .map(|i| m.backends.get(&i, 0).unwrap())
                    .collect::<Vec<_>>()
            ),
        ),
        (
            map::SNAT_CURSOR,
            format!(
                "{:?}",
                (0..3u32)
                    .map(|i| m.snat_cursor.get(&i, 0).unwrap())
                    .collect::<Vec<_>>()
            ),
        ),
        (
            map::STATS_REASON,
            format!(
                "{:?}",
                // Not PASS_NOT_IPV4: the attached program counts the IPv6 chatter on d0.
                (0..reason::COUNT)
                    .filter(|&r| r != reason::PASS_NOT_IPV4)
                    .map(|r| m.stats_reason.get(&r, 0).unwrap().iter().sum::<u64>())
                    .collect::<Vec<_>>()
            ),
        ),
        (map::STATS_VIP, per_cpu(m.stats_vip.get(&0, 0).unwrap())),
        (
            map::STATS_BACKEND,
            per_cpu(m.stats_backend.get(&0, 0).unwrap()),
        ),
        (
            map::ADDR_FILTER,
            format!(
                "{:?}",
                (0..lb_common::ADDR_FILTER_SIZE)
                    .filter(|i| m.addr_filter.get(i, 0).unwrap() != 0)
                    .collect::<Vec<_>>()
            ),
        ),
        // A digest: the two halves are 131074 slots.
        (
            map::MAGLEV,
            format!(
                "{} slots, sum {}, first {:?}",
                maglev.len(),
                maglev.iter().map(|&b| b as u64).sum::<u64>(),
                &maglev[..8]
            ),
        ),
        (
            map::VIP_META,
            format!("{:?}", m.vip_meta.get(&0, 0).unwrap()),
        ),
        (
            map::BACKEND_META,
            format!("{:?}", m.backend_meta.get(&0, 0).unwrap()),
        ),
        (
            map::AGENT_META,
            format!("{:?}", m.agent_meta.get(&0, 0).unwrap()),
        ),
    ]
}

/// Asserts that every map holds what it held in `before`.
fn assert_kept(m: &PinnedMaps, before: &[(&'static str, String)], when: &str) {
    for ((name, was), (_, now)) in before.iter().zip(snapshot(m)) {
        assert_eq!(&now, was, "{when}: {name} changed");
    }
}

#[test]
fn a_left_data_plane_keeps_forwarding_and_is_adopted_with_its_maps() {
    let Some(s) = Setup::new("adopt") else {
        return;
    };
    let (mut dp, start) = s.load(MAX_FLOWS, s.ifindex);
    assert_eq!(start, Start::Fresh);
    s.configure(s.meta(xdp_mode::NONE));
    let mode = s.attach(&mut dp, XdpModeSetting::Native).expect("attach");
    assert_eq!(mode, xdp_mode::NATIVE);
    let meta = s.meta(mode);
    s.maps().agent_meta.set(0, meta, 0).unwrap();
    let (link_id, old_prog) = dp.link_ids().expect("attached through a link");
    assert_eq!(
        s.xdp(),
        Some((1, old_prog as u64)),
        "native, the LB program"
    );
    assert!(s.pin.join(LINK_PIN).exists());

    // State the old program made (a half-open connection) and state written for it.
    let (v, fwd) = s.run(dp.program(), &syn(40000).bytes());
    assert_eq!(v, XDP_TX);
    let (key, flow) = made_up_flow();
    s.maps().flows.insert(key, flow, 0).unwrap();
    let before = snapshot(&s.maps());
    assert_eq!(s.maps().half_open.keys().count(), 2);

    // The agent goes (an exec'd upgrade, or SIGKILL: the same for the kernel).
    dp.leave();
    assert_eq!(
        s.xdp(),
        Some((1, old_prog as u64)),
        "still attached after the agent left"
    );
    assert!(s.pin.join(map::FLOWS).exists() && s.pin.join(LINK_PIN).exists());

    let (mut dp, start) = s.load(MAX_FLOWS, s.ifindex);
    let Start::Adopted(a) = start else {
        panic!("not adopted: {start:?}");
    };
    assert_eq!(
        (a.link_id, a.prog_id, a.mode, a.meta),
        (link_id, old_prog, xdp_mode::NATIVE, meta)
    );
    assert_eq!(dp.mode, xdp_mode::NATIVE);
    assert_eq!(
        s.xdp(),
        Some((1, old_prog as u64)),
        "loading disturbs nothing"
    );
    assert_kept(&s.maps(), &before, "adopted");
    assert_eq!(s.maps().flows.get(&key, 0).unwrap(), flow);

    let mode = s.attach(&mut dp, XdpModeSetting::Auto).expect("attach");
    assert_eq!(mode, xdp_mode::NATIVE);
    let new_prog = dp.program().info().unwrap().id();
    assert_ne!(new_prog, old_prog);
    assert_eq!(
        dp.link_ids(),
        Some((link_id, new_prog)),
        "same link, new program"
    );
    assert_eq!(s.xdp(), Some((1, new_prog as u64)));
    assert_eq!(
        snapshot(&s.maps()),
        before,
        "replacing the program kept them"
    );

    // The new program goes on with the old one's connection: same backend, same SNAT port.
    let (v, again) = s.run(dp.program(), &syn(40000).bytes());
    assert_eq!(v, XDP_TX);
    assert_eq!((again.dst, again.sport), (fwd.dst, fwd.sport));
    assert_eq!(s.maps().half_open.keys().count(), 2);

    // The orderly stop: detached, every pin gone, the link's too.
    drop(dp);
    assert_eq!(s.xdp(), None, "detached");
    assert!(!s.pin.exists(), "pins and directory removed");
}

/// How one agent leaves the data plane and the next one loads it, for a case that cannot be
/// adopted.
struct Unadoptable {
    what: &'static str,
    /// AGENT_META as the leaving agent wrote it.
    meta: fn(&Setup) -> AgentMeta,
    /// What happens to the pins after it left.
    tamper: fn(&Setup),
    /// The next agent's max_flows and interface.
    max_flows: u32,
    ifindex: fn(&Setup) -> u32,
    /// Words the reason must contain.
    why: &'static str,
}

#[test]
fn what_cannot_be_adopted_is_replaced_and_says_why() {
    let Some(s) = Setup::new("adoptno") else {
        return;
    };
    let (key, flow) = made_up_flow();
    let native = |s: &Setup| s.meta(xdp_mode::NATIVE);
    let same = |s: &Setup| s.ifindex;
    let untouched = |_: &Setup| {};
    let cases = [
        Unadoptable {
            what: "newer layout",
            meta: |s| AgentMeta {
                layout_version: MAP_LAYOUT_VERSION + 1,
                ..s.meta(xdp_mode::NATIVE)
            },
            tamper: untouched,
            max_flows: MAX_FLOWS,
            ifindex: same,
            why: "the pinned maps have layout version",
        },
        Unadoptable {
            what: "max_flows changed",
            meta: native,
            tamper: untouched,
            max_flows: MAX_FLOWS * 2,
            ifindex: same,
            why: "max_flows",
        },
        Unadoptable {
            what: "other interface",
            meta: native,
            tamper: untouched,
            max_flows: MAX_FLOWS,
            // lo: index 1 in every namespace.
            ifindex: |_| 1,
            why: "interface index",
        },
        Unadoptable {
            what: "mode never recorded",
            meta: |s| s.meta(xdp_mode::NONE),
            tamper: untouched,
            max_flows: MAX_FLOWS,
            ifindex: same,
            why: "not attached",
        },
        Unadoptable {
            what: "a map changed without a layout version bump",
            meta: native,
            // SNAT_CURSOR's pin now names an array of 12-byte values (BACKENDS).
            tamper: |s| {
                let p = s.pin.join(map::SNAT_CURSOR);
                std::fs::remove_file(&p).unwrap();
                let backends = aya::maps::MapData::from_pin(s.pin.join(map::BACKENDS)).unwrap();
                backends.pin(&p).unwrap();
            },
            max_flows: MAX_FLOWS,
            ifindex: same,
            why: "map SNAT_CURSOR: value size is 12 pinned, 8",
        },
        Unadoptable {
            what: "no link",
            meta: native,
            tamper: |s| std::fs::remove_file(s.pin.join(LINK_PIN)).unwrap(),
            max_flows: MAX_FLOWS,
            ifindex: same,
            why: "no link pinned",
        },
    ];
    for c in cases {
        let what = c.what;
        let (mut dp, start) = s.load(MAX_FLOWS, s.ifindex);
        assert_eq!(start, Start::Fresh, "{what}");
        s.configure((c.meta)(&s));
        s.attach(&mut dp, XdpModeSetting::Native).expect("attach");
        s.maps().flows.insert(key, flow, 0).unwrap();
        dp.leave();
        (c.tamper)(&s);

        let (mut dp, start) = s.load(c.max_flows, (c.ifindex)(&s));
        match &start {
            Start::Replaced { why, pins_removed } => {
                assert!(why.contains(c.why), "{what}: {why}");
                assert!(*pins_removed >= map::ALL.len(), "{what}: {pins_removed}");
                println!("{what}: replaced: {why}");
            }
            other => panic!("{what}: {other:?}"),
        }
        assert_eq!(s.xdp(), None, "{what}: the old program was detached");
        assert!(
            s.maps().flows.get(&key, 0).is_err(),
            "{what}: FLOWS is a new map"
        );
        // Nothing is left attached in the way: a fresh attach works.
        s.configure(s.meta(xdp_mode::NONE));
        s.attach(&mut dp, XdpModeSetting::Native)
            .unwrap_or_else(|e| panic!("{what}: attach: {e}"));
        drop(dp);
        assert_eq!(s.xdp(), None);
    }

    // The interface went away with the agent: the link is pinned but attached to nothing.
    let (mut dp, _) = s.load(MAX_FLOWS, s.ifindex);
    s.configure(s.meta(xdp_mode::NONE));
    let mode = s.attach(&mut dp, XdpModeSetting::Native).expect("attach");
    s.maps().agent_meta.set(0, s.meta(mode), 0).unwrap();
    dp.leave();
    s.ns.sh("ip link del d0");
    let (_dp, start) = s.load(MAX_FLOWS, s.ifindex);
    match start {
        Start::Replaced { why, .. } => assert!(why.contains("attached to no interface"), "{why}"),
        other => panic!("interface gone: {other:?}"),
    }
}

#[test]
fn an_adopted_link_in_another_mode_is_attached_anew() {
    let Some(s) = Setup::new("adoptmode") else {
        return;
    };
    let (mut dp, _) = s.load(MAX_FLOWS, s.ifindex);
    s.configure(s.meta(xdp_mode::NONE));
    let mode = s.attach(&mut dp, XdpModeSetting::Native).expect("attach");
    s.maps().agent_meta.set(0, s.meta(mode), 0).unwrap();
    let (link_id, _) = dp.link_ids().unwrap();
    dp.leave();

    let (mut dp, start) = s.load(MAX_FLOWS, s.ifindex);
    assert!(matches!(start, Start::Adopted(_)), "{start:?}");
    // Attaching elsewhere than the adopted link's interface is a caller's mistake.
    let err = {
        let _in_ns = s.ns.enter();
        dp.attach("d1", XdpModeSetting::Native, None)
            .expect_err("another interface")
    };
    assert!(
        matches!(err, DataplaneError::AdoptedElsewhere { .. }),
        "{err}"
    );
    assert_eq!(s.xdp().map(|x| x.0), Some(1), "the adopted link untouched");

    let mode = s.attach(&mut dp, XdpModeSetting::Generic).expect("attach");
    assert_eq!(mode, xdp_mode::GENERIC);
    let (new_link, prog) = dp.link_ids().unwrap();
    assert_ne!(new_link, link_id, "a new link");
    assert_eq!(s.xdp(), Some((2, prog as u64)), "generic mode");
    assert!(s.pin.join(LINK_PIN).exists());
    drop(dp);
    assert_eq!(s.xdp(), None);
    assert!(!s.pin.exists());
}
