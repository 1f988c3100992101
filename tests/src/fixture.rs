//! The data plane fixture: the XDP object loaded and configured inside a private network
//! namespace whose veth `d0` has an address and static neighbours, so the program's FIB
//! lookup succeeds exactly as it would on an LB host; frames are fed to it through
//! BPF_PROG_TEST_RUN. Used by the data plane tests and the microbenchmark.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    maps::{Array, Map, MapData},
    programs::{TestRun, TestRunOptions, Xdp},
};
use lb_agent::{
    config::{BackendConfig, Config},
    dataplane::{
        loader::Dataplane,
        pinned::PinnedMaps,
        writer::{self, VipPlan, Writer},
    },
};
use lb_common::{flow_flags, map, Flow, FlowKey, TrafficStats, IPPROTO_TCP};

use crate::{
    netns::{self, Netns},
    packet,
};

/// XDP_DROP as BPF_PROG_TEST_RUN returns it.
pub const XDP_DROP: u32 = 1;
/// XDP_PASS as BPF_PROG_TEST_RUN returns it.
pub const XDP_PASS: u32 = 2;
/// XDP_TX as BPF_PROG_TEST_RUN returns it.
pub const XDP_TX: u32 = 3;

/// The LB's address on `d0` (the default SNAT address).
pub const LB_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The fixture's VIP (port 6443).
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
/// The VIP's port.
pub const VIP_PORT: u16 = 6443;
/// The client's address.
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 50);
/// The client's MAC (a static neighbour on `d0`).
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x50];
/// MAC the fixture gives the VIP's address when a backend lives there (the microbenchmark).
pub const VIP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x64];
/// The default backends: address and MAC (static neighbours on `d0`).
pub const BACKENDS: [(Ipv4Addr, [u8; 6]); 3] = [
    (Ipv4Addr::new(198, 18, 0, 11), [0x02, 0, 0, 0, 0, 0x11]),
    (Ipv4Addr::new(198, 18, 0, 12), [0x02, 0, 0, 0, 0, 0x12]),
    (Ipv4Addr::new(198, 18, 0, 13), [0x02, 0, 0, 0, 0, 0x13]),
];
/// The MAC of `d0`.
pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// One backend of the fixture's VIP.
#[derive(Clone, Debug)]
pub struct BackendSpec {
    pub name: String,
    pub addr: Ipv4Addr,
    pub port: u16,
    /// Its MAC, installed as a static neighbour.
    pub mac: [u8; 6],
}

/// How the fixture configures its one VIP.
#[derive(Clone, Debug)]
pub struct Options {
    pub backends: Vec<BackendSpec>,
    pub snat_address: Ipv4Addr,
    pub snat_ports: (u16, u16),
    /// Connections the flow table holds (`None`: lb_common::MAX_FLOWS, the agent's default).
    pub max_flows: Option<u32>,
    /// The VIP's `mss_clamp` (`None`: not set).
    pub mss_clamp: Option<u16>,
    /// The VIP's `mode` ("nat", "dsr-l2", "dsr-ipip"); DSR modes have no SNAT settings.
    pub mode: &'static str,
    /// Addresses taken as this host's: a NAT VIP's backend there is local.
    pub local: Vec<Ipv4Addr>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            backends: BACKENDS
                .iter()
                .enumerate()
                .map(|(i, (a, m))| BackendSpec {
                    name: format!("master0{}", i + 1),
                    addr: *a,
                    port: VIP_PORT,
                    mac: *m,
                })
                .collect(),
            snat_address: LB_ADDR,
            snat_ports: (61000, 65535),
            max_flows: None,
            mss_clamp: None,
            mode: "nat",
            local: Vec::new(),
        }
    }
}

/// The agent's config for the fixture. The backend list is set after validation, so the
/// microbenchmark can go past what the config file accepts (1000 backends in one VIP).
pub fn config(pin: &Path, o: &Options) -> Config {
    let mss_clamp = o
        .mss_clamp
        .map(|m| format!("mss_clamp = {m}\n"))
        .unwrap_or_default();
    let forwarding = if o.mode == "nat" {
        format!(
            "snat_address = \"{}\"\nsnat_ports = \"{}-{}\"\n",
            o.snat_address, o.snat_ports.0, o.snat_ports.1
        )
    } else {
        format!("mode = \"{}\"\n", o.mode)
    };
    let text = format!(
        "[agent]\ninterface = \"d0\"\npin_path = \"{}\"\ncontrol_socket = \"/nonexistent\"\n\n\
         [[vip]]\nname = \"kube-apiserver\"\naddress = \"{VIP}\"\nport = {VIP_PORT}\n\
         {forwarding}maglev_table_size = 65537\n{mss_clamp}\n\
         [[vip.backend]]\nname = \"placeholder\"\naddress = \"{}\"\n",
        pin.display(),
        BACKENDS[0].0,
    );
    let mut c = Config::parse(Path::new("fixture.toml"), &text).expect("fixture config");
    c.vips[0].backends = o
        .backends
        .iter()
        .map(|b| BackendConfig {
            name: b.name.clone(),
            address: b.addr,
            port: b.port,
            weight: 100,
        })
        .collect();
    c
}

/// The program loaded and configured inside a namespace of its own.
pub struct Fixture {
    pub ns: Netns,
    dp: Dataplane,
    pub writer: Writer,
    pub vips: Vec<VipPlan>,
    pub ifindex: u32,
    pub options: Options,
    pin: PathBuf,
}

impl Fixture {
    /// The data plane tests' fixture (three backends); None when the test cannot run here
    /// (not root, outside CI).
    pub fn new(tag: &str) -> Option<Self> {
        Self::with(tag, Options::default())
    }

    /// A fixture configured by `o`; None when it cannot run here (not root, outside CI).
    pub fn with(tag: &str, o: Options) -> Option<Self> {
        if !netns::require_root(tag) {
            return None;
        }
        let ns = Netns::new(&format!("lbt-{tag}-{}", netns::unique_id()));
        ns.sh(&format!(
            "ip link add d0 address {} type veth peer name d1 && ip link set d1 up && ip link set d0 up && \
             ip addr add {LB_ADDR}/24 dev d0 && \
             sysctl -qw net.ipv4.conf.d0.forwarding=1 && \
             ip neigh replace {CLIENT} lladdr {} dev d0 nud permanent",
            packet::mac_str(&LB_MAC),
            packet::mac_str(&CLIENT_MAC)
        ));
        let mut neigh: Vec<(Ipv4Addr, [u8; 6])> =
            o.backends.iter().map(|b| (b.addr, b.mac)).collect();
        neigh.sort();
        neigh.dedup_by_key(|n| n.0);
        let cmds: Vec<String> = neigh
            .iter()
            .map(|(a, m)| {
                format!(
                    "ip neigh replace {a} lladdr {} dev d0 nud permanent",
                    packet::mac_str(m)
                )
            })
            .collect();
        for chunk in cmds.chunks(200) {
            ns.sh(&chunk.join(" && "));
        }
        let ifindex = ns.ifindex("d0");
        let pin = PathBuf::from(format!("/sys/fs/bpf/{}", ns.name));
        let dp = Dataplane::load_with(&pin, o.max_flows.unwrap_or(lb_common::MAX_FLOWS))
            .expect("load the XDP object");
        let mut writer = Writer::new(PinnedMaps::open(&pin).expect("open pins"));
        let mut vips = writer::plan(&config(&pin, &o), LB_ADDR, &o.local);
        writer.install(&mut vips).expect("install");
        Some(Self {
            ns,
            dp,
            writer,
            vips,
            ifindex,
            options: o,
            pin,
        })
    }

    /// The LB program.
    pub fn program(&self) -> &Xdp {
        self.dp.program()
    }

    /// Instructions the verifier processed per loaded program.
    pub fn verified_instructions(&self) -> Vec<(String, u32)> {
        self.dp.verified_instructions()
    }

    /// Where the maps are pinned.
    pub fn pin_path(&self) -> &Path {
        &self.pin
    }

    /// Runs the program on `frame`; returns the verdict and the frame as it left.
    pub fn run(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        let _in_ns = self.ns.enter();
        packet::test_run(self.program(), frame, self.ifindex)
    }

    /// Runs `prog` (the LB program or another one) `repeat` times on one buffer holding
    /// `frame`; returns the last verdict and the kernel's mean time per run. The kernel keeps
    /// the program's rewrites between runs: each run sees what the previous one left.
    pub fn run_repeat(&self, prog: &Xdp, frame: &[u8], repeat: u32) -> (u32, Duration) {
        let _in_ns = self.ns.enter();
        let ctx = packet::xdp_md(frame.len() as u32, self.ifindex);
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ctx_in: Some(&ctx),
                repeat,
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        (r.return_value, r.duration)
    }

    /// Packets counted under reason `r`, all CPUs.
    pub fn reason(&self, r: u32) -> u64 {
        self.writer
            .maps
            .stats_reason
            .get(&r, 0)
            .unwrap()
            .iter()
            .sum()
    }

    /// The reasons counted so far, as `name=count` pairs: for failure messages.
    pub fn counters(&self) -> String {
        (0..lb_common::reason::COUNT)
            .filter(|&r| self.reason(r) != 0)
            .map(|r| {
                format!(
                    "{}={}",
                    lb_common::reason::NAMES[r as usize],
                    self.reason(r)
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The VIP's traffic counters summed over CPUs.
    pub fn vip_stats(&self) -> TrafficStats {
        let v = self.writer.maps.stats_vip.get(&0, 0).expect("STATS_VIP");
        v.iter().fold(TrafficStats::default(), |a, s| TrafficStats {
            packets: a.packets + s.packets,
            bytes: a.bytes + s.bytes,
            new_flows: a.new_flows + s.new_flows,
            reply_packets: a.reply_packets + s.reply_packets,
            reply_bytes: a.reply_bytes + s.reply_bytes,
        })
    }

    /// Index (into the default BACKENDS) of the backend at `a`.
    pub fn backend_by_addr(&self, a: Ipv4Addr) -> usize {
        BACKENDS
            .iter()
            .position(|(b, _)| *b == a)
            .expect("a backend")
    }

    /// The per-backend SNAT port rings (SNAT_CURSOR), opened from its pin.
    pub fn snat_cursors(&self) -> Array<MapData, u64> {
        let data = MapData::from_pin(self.pin.join(map::SNAT_CURSOR)).expect("SNAT_CURSOR pin");
        Map::from_map_data(data)
            .expect("SNAT_CURSOR")
            .try_into()
            .expect("SNAT_CURSOR is an array of u64")
    }

    /// Inserts `n` established connections of made-up clients (198.19.0.0/16) into FLOWS,
    /// both directions, as the program would have: they never match the fixture's own
    /// packets.
    pub fn prefill_flows(&mut self, n: u32) {
        for i in 0..n {
            let client = u32::from(Ipv4Addr::new(198, 19, 0, 0)) + i / 60_000;
            let cport = (1024 + i % 60_000) as u16;
            let key = FlowKey {
                src_addr: client.to_be(),
                dst_addr: u32::from(VIP).to_be(),
                src_port: cport.to_be(),
                dst_port: VIP_PORT.to_be(),
                proto: IPPROTO_TCP,
                _pad: [0; 3],
            };
            // Made-up backends (198.19.128.0/17), so no reply key of the fixture's own flows
            // is taken.
            let backend = u32::from(Ipv4Addr::new(198, 19, 128, 0)) + i / 60_000;
            let fwd = Flow {
                src_addr: u32::from(LB_ADDR).to_be(),
                dst_addr: backend.to_be(),
                src_port: cport.to_be(),
                dst_port: VIP_PORT.to_be(),
                flags: flow_flags::ESTABLISHED,
                ..Default::default()
            };
            let rev = Flow {
                src_addr: key.dst_addr,
                dst_addr: key.src_addr,
                src_port: key.dst_port,
                dst_port: key.src_port,
                flags: flow_flags::ESTABLISHED | flow_flags::REPLY,
                ..Default::default()
            };
            self.writer
                .maps
                .flows
                .insert(key, fwd, 0)
                .expect("prefill FLOWS");
            self.writer
                .maps
                .flows
                .insert(fwd.peer_key(), rev, 0)
                .expect("prefill FLOWS");
        }
    }
}
