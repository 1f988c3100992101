//! The lab: a bridge in the root namespace and one namespace per host (client, LBs,
//! apiserver stubs), each joined to the bridge by a veth, addresses from 198.18.0.0/15.
//! The client can instead sit behind a chain of router namespaces with links of chosen MTUs
//! ([`Lab::with_routed_client`], for path MTU tests).
//! Everything it creates is removed when it is dropped, also when a test fails.

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use aya::programs::{Xdp, XdpMode};

use crate::netns::{self, Netns};

/// The VIP every lab serves.
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
/// The VIP's port.
pub const VIP_PORT: u16 = 6443;
/// The client's address.
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 50);
/// Port of the stubs' plain-HTTP admin listener (on each stub's loopback).
pub const STUB_ADMIN: &str = "127.0.0.1:9000";
/// A routed client's address (see [`Lab::with_routed_client`]), on the first link behind
/// the routers, 198.19.1.0/24.
pub const ROUTED_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 2);
/// The bridge address of the router that a routed client sits behind.
pub const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
/// Where routed clients live: every link behind the routers is a /24 in it.
pub const ROUTED_NET: &str = "198.19.0.0/16";

/// Address of LB number `i` (0-based).
pub fn lb_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 2 + i as u8)
}

/// Address of backend number `i` (0-based).
pub fn backend_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 11 + i as u8)
}

/// Name of backend number `i` (0-based): master01, master02...
pub fn backend_name(i: usize) -> String {
    format!("master{:02}", i + 1)
}

/// Where a test binary lives: `LB_<NAME>_BIN`, else next to the running executable.
pub fn bin(name: &str) -> PathBuf {
    let var = format!("LB_{}_BIN", name.trim_start_matches("lb-").to_uppercase());
    if let Ok(p) = std::env::var(&var) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not found (set {var} or build it: cargo build --workspace --bins)",
        p.display()
    );
    p
}

/// One host of the lab.
pub struct Host {
    pub ns: Netns,
    pub addr: Ipv4Addr,
    /// The veth end in the root namespace (a bridge port).
    pub port: String,
}

/// A process started in the lab; killed when dropped.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    /// Sends SIGTERM and waits up to `timeout` for the exit.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.wait(timeout)
    }

    /// Sends `sig` to the process.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(c) = &self.child {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig);
        }
    }

    /// Waits up to `timeout` for the exit.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                self.child = None;
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Its process id while it runs (the command itself: `ip netns exec` and nsenter exec it).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Its output so far.
    pub fn output(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The lab. Field order is drop order: processes the caller holds go first (they are
/// dropped before the lab), then namespaces, then the bridge and the XDP_PASS programs.
pub struct Lab {
    pub id: String,
    /// The client: on the bridge, or behind `routers` (see [`Lab::with_routed_client`]);
    /// in the latter case its `port` is empty (it has no veth end in the root namespace).
    pub client: Host,
    pub lbs: Vec<Host>,
    pub backends: Vec<Host>,
    /// Routers between a routed client and the bridge, the client's first hop first; the
    /// last one is on the bridge at [`ROUTER`]. `addr` is each router's address on the
    /// link towards the bridge; `port` is empty but for the last.
    pub routers: Vec<Host>,
    /// Scratch directory: configs, certificates, logs.
    pub dir: PathBuf,
    /// The VIP's port in agent configs and the load generator's URL (VIP_PORT unless a
    /// test sets another); the backends listen on VIP_PORT whatever it is.
    pub vip_port: u16,
    bridge: String,
    _pass: Option<aya::Ebpf>,
}

fn sh(cmd: &str) {
    let out = Command::new("sh").args(["-c", cmd]).output().expect("sh");
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Lab {
    /// Builds a lab with `lbs` load balancers and `backends` apiserver hosts; None when the
    /// test cannot run here (not root, outside CI).
    pub fn new(test: &str, lbs: usize, backends: usize) -> Option<Self> {
        Self::build(test, lbs, backends, None)
    }

    /// A lab of `nodes` control-plane nodes, each an LB host (`lbs[i]`, with XDP_PASS on its
    /// bridge port) and an apiserver host at once: `backends[i]` is the same namespace and
    /// address, so backend helpers (stubs, configs) address the nodes.
    pub fn colocated(test: &str, nodes: usize) -> Option<Self> {
        let mut lab = Self::build(test, nodes, 0, None)?;
        lab.backends = lab
            .lbs
            .iter()
            .map(|h| Host {
                ns: Netns::borrowed(&h.ns.name),
                addr: h.addr,
                port: String::new(),
            })
            .collect();
        Some(lab)
    }

    /// Like [`Lab::new`], with the client behind a chain of routers instead of on the
    /// bridge. `link_mtus` gives the MTU of each link from the client outward, one router
    /// per link; the last router joins the bridge (MTU 1500) at [`ROUTER`]:
    ///
    /// ```text
    /// &[1280]:       client =1280= r1 -- bridge
    /// &[1500, 1280]: client =1500= r1 =1280= r2 -- bridge
    /// ```
    ///
    /// Link `i` (0-based) is 198.19.`i+1`.0/24: the end nearer the client has .2, the other
    /// .1, so the client is [`ROUTED_CLIENT`] with its default route via 198.19.1.1. The LBs
    /// and backends route [`ROUTED_NET`] via [`ROUTER`]. The routers forward like real ones:
    /// ip_forward on, PMTU discovery and ICMP rate limits at the kernel's defaults (so a
    /// too-big packet with DF set is dropped and answered with ICMP fragmentation needed),
    /// and no offloads (no GRO merging what the wire carried as separate packets, no
    /// partial checksums).
    ///
    /// With one link the client's own interface has the small MTU, so its SYN's MSS already
    /// tells the server; with the small link further out (`&[1500, 1280]`) only PMTU
    /// discovery can find it.
    pub fn with_routed_client(
        test: &str,
        lbs: usize,
        backends: usize,
        link_mtus: &[u32],
    ) -> Option<Self> {
        assert!(
            (1..=8).contains(&link_mtus.len()),
            "one to eight links between the client and the bridge"
        );
        Self::build(test, lbs, backends, Some(link_mtus))
    }

    fn build(test: &str, lbs: usize, backends: usize, routed: Option<&[u32]>) -> Option<Self> {
        if !netns::require_root(test) {
            return None;
        }
        let id = netns::unique_id();
        let bridge = format!("lb{id}br");
        let dir = std::env::temp_dir().join(format!("lb-lab-{id}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("lab dir");
        sh(&format!(
            "ip link add {bridge} type bridge && ip link set {bridge} up"
        ));
        let mut lab = Lab {
            client: Host {
                ns: Netns::new(&format!("lb-{id}-client")),
                addr: if routed.is_some() {
                    ROUTED_CLIENT
                } else {
                    CLIENT
                },
                port: if routed.is_some() {
                    String::new()
                } else {
                    format!("lb{id}c")
                },
            },
            lbs: Vec::new(),
            backends: Vec::new(),
            routers: Vec::new(),
            dir,
            vip_port: VIP_PORT,
            bridge,
            _pass: None,
            id: id.clone(),
        };
        if routed.is_none() {
            lab.join(
                &lab.client.ns.name.clone(),
                &lab.client.port.clone(),
                CLIENT,
            );
        }
        for i in 0..lbs {
            let h = Host {
                ns: Netns::new(&format!("lb-{id}-lb{}", i + 1)),
                addr: lb_addr(i),
                port: format!("lb{id}l{}", i + 1),
            };
            lab.join(&h.ns.name, &h.port, h.addr);
            lab.lbs.push(h);
        }
        for i in 0..backends {
            let h = Host {
                ns: Netns::new(&format!("lb-{id}-be{}", i + 1)),
                addr: backend_addr(i),
                port: format!("lb{id}b{}", i + 1),
            };
            lab.join(&h.ns.name, &h.port, h.addr);
            lab.backends.push(h);
        }
        if let Some(mtus) = routed {
            lab.route_client(mtus);
        }
        lab.attach_pass();
        Some(lab)
    }

    /// The routers and links of [`Lab::with_routed_client`]; the client namespace exists.
    fn route_client(&mut self, mtus: &[u32]) {
        let id = self.id.clone();
        let n = mtus.len();
        for r in 1..=n {
            let last = r == n;
            let ns = Netns::new(&format!("lb-{id}-r{r}"));
            // Its address on the link towards the bridge (link r, or the bridge itself).
            let (addr, port) = if last {
                (ROUTER, format!("lb{id}r"))
            } else {
                (Ipv4Addr::new(198, 19, r as u8 + 1, 2), String::new())
            };
            self.routers.push(Host { ns, addr, port });
        }
        // Link i joins node i (the client for i = 0, else router i) to router i + 1:
        // eth0 is always the interface towards the bridge, eth1 a router's towards the client.
        for (i, &mtu) in mtus.iter().enumerate() {
            let near = if i == 0 {
                &self.client.ns.name
            } else {
                &self.routers[i - 1].ns.name
            };
            let far = &self.routers[i].ns.name;
            let net = i + 1;
            sh(&format!(
                "ip -n {far} link add eth1 mtu {mtu} type veth peer name eth0 mtu {mtu} netns {near} && \
                 ip -n {far} link set eth1 address 02:00:c6:13:{net:02x}:01 && \
                 ip -n {near} link set eth0 address 02:00:c6:13:{net:02x}:02 && \
                 ip -n {far} addr add 198.19.{net}.1/24 dev eth1 && \
                 ip -n {near} addr add 198.19.{net}.2/24 dev eth0 && \
                 ip -n {far} link set eth1 up && ip -n {near} link set eth0 up && \
                 ip -n {near} route add default via 198.19.{net}.1"
            ));
        }
        let last = self.routers.last().expect("a router");
        self.join(&last.ns.name.clone(), &last.port.clone(), ROUTER);
        for (r, h) in self.routers.iter().enumerate() {
            // Every router but the first reaches the links nearer the client through its
            // neighbour on that side (the .2 end of link r).
            if r > 0 {
                h.ns.sh(&format!("ip route add {ROUTED_NET} via 198.19.{}.2", r + 1));
            }
            h.ns.sh("sysctl -qw net.ipv4.ip_forward=1 && \
                 ethtool -K eth0 tx off gro off gso off tso off >/dev/null && \
                 ethtool -K eth1 tx off gro off gso off tso off >/dev/null");
        }
        // The client's frames cross the XDP hairpin: complete checksums (see `join`).
        self.client.ns.sh("ethtool -K eth0 tx off >/dev/null");
        for h in self.lbs.iter().chain(&self.backends) {
            h.ns.sh(&format!("ip route add {ROUTED_NET} via {ROUTER}"));
        }
    }

    /// Joins namespace `ns` to the bridge by a veth: `port` in the root namespace, eth0 inside.
    fn join(&self, ns: &str, port: &str, addr: Ipv4Addr) {
        let o = addr.octets();
        sh(&format!(
            "ip link add {port} type veth peer name eth0 netns {ns} && \
             ip link set {port} master {br} up && \
             ip -n {ns} link set eth0 address 02:00:c6:12:{:02x}:{:02x} && \
             ip -n {ns} addr add {addr}/24 dev eth0 && ip -n {ns} link set eth0 up",
            o[2],
            o[3],
            br = self.bridge
        ));
        // A partial checksum survives the XDP hairpin and the receiver drops the segment;
        // real NICs hand XDP complete checksums.
        sh(&format!(
            "ip netns exec {ns} ethtool -K eth0 tx off >/dev/null"
        ));
    }

    /// XDP_TX out of a veth reaches the peer only if the peer runs XDP too: a trivial
    /// XDP_PASS program on each LB's bridge port.
    fn attach_pass(&mut self) {
        if self.lbs.is_empty() {
            return;
        }
        let mut ebpf = aya::Ebpf::load(lb_agent::dataplane::OBJECT).expect("load XDP object");
        let prog: &mut Xdp = ebpf
            .program_mut(lb_common::PROG_PASS)
            .expect("pass program")
            .try_into()
            .expect("xdp");
        prog.load().expect("load XDP_PASS");
        for h in &self.lbs {
            prog.attach(&h.port, XdpMode::Driver)
                .expect("attach XDP_PASS to the LB's bridge port");
        }
        self._pass = Some(ebpf);
    }

    /// Starts `args` inside `host`'s namespaces (network, and a private mount of /sys).
    pub fn spawn(&self, host: &Host, name: &str, args: &[&str]) -> Proc {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &host.ns.name]).args(args);
        self.start(c, name)
    }

    /// Starts `args` in `host`'s network namespace only, sharing the root mount namespace so
    /// pins under /sys/fs/bpf are the ones the test sees (ip netns exec remounts /sys).
    pub fn spawn_net_only(&self, host: &Host, name: &str, args: &[&str]) -> Proc {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", host.ns.path().display()))
            .args(args);
        self.start(c, name)
    }

    fn start(&self, mut c: Command, name: &str) -> Proc {
        let log = self.dir.join(format!("{name}.log"));
        let f = fs::File::create(&log).expect("log file");
        c.stdin(Stdio::null())
            .stdout(f.try_clone().expect("log"))
            .stderr(f);
        let child = c.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Proc {
            name: name.to_string(),
            child: Some(child),
            log,
        }
    }

    /// Runs `args` in `host` to completion and returns stdout (panics on failure).
    pub fn exec(&self, host: &Host, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &host.ns.name])
            .args(args)
            .output()
            .expect("ip netns exec");
        assert!(
            out.status.success(),
            "{args:?} in {}: {}",
            host.ns.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Generates the stubs' CA and server certificate (SANs: VIP and backends).
    pub fn certs(&self) -> PathBuf {
        let d = self.dir.join("pki");
        let mut c = Command::new(bin("lb-stub"));
        c.args(["gen-certs", "--dir"]).arg(&d);
        c.args(["--san", &VIP.to_string()]);
        for h in &self.backends {
            c.args(["--san", &h.addr.to_string()]);
        }
        assert!(c.status().expect("lb-stub gen-certs").success());
        d
    }

    /// Starts one stub apiserver per backend host and waits until each answers.
    pub fn start_stubs(&self) -> Vec<Proc> {
        self.certs();
        (0..self.backends.len())
            .map(|i| self.start_stub(i))
            .collect()
    }

    /// Starts (or restarts) the stub on backend `i` and waits until it answers.
    pub fn start_stub(&self, i: usize) -> Proc {
        self.start_stub_on(i, self.backends[i].addr)
    }

    /// Starts one stub per backend listening on every address (0.0.0.0): DSR delivers
    /// packets addressed to the VIP, which the backend holds too.
    pub fn start_stubs_any(&self) -> Vec<Proc> {
        self.certs();
        (0..self.backends.len())
            .map(|i| self.start_stub_on(i, Ipv4Addr::UNSPECIFIED))
            .collect()
    }

    /// Starts the stub on backend `i` listening on `addr`:VIP_PORT; waits until it answers.
    pub fn start_stub_on(&self, i: usize, addr: Ipv4Addr) -> Proc {
        self.start_stub_with(i, addr, &[])
    }

    /// Starts one stub per backend (on its own address) with `extra` arguments, e.g.
    /// `--api-client-ca`; waits until each answers.
    pub fn start_stubs_with(&self, extra: &[&str]) -> Vec<Proc> {
        self.certs();
        (0..self.backends.len())
            .map(|i| self.start_stub_with(i, self.backends[i].addr, extra))
            .collect()
    }

    /// Like `start_stub_on`, with `extra` arguments to `lb-stub serve`.
    pub fn start_stub_with(&self, i: usize, addr: Ipv4Addr, extra: &[&str]) -> Proc {
        let pki = self.dir.join("pki");
        let cert = pki.join("server.crt");
        let key = pki.join("server.key");
        let stub = bin("lb-stub");
        let h = &self.backends[i];
        let listen = format!("{addr}:{VIP_PORT}");
        let name = backend_name(i);
        let mut args = vec![
            stub.to_str().unwrap(),
            "serve",
            "--listen",
            &listen,
            "--name",
            &name,
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "--admin-listen",
            STUB_ADMIN,
        ];
        args.extend_from_slice(extra);
        let p = self.spawn(h, &name, &args);
        wait_for(
            Duration::from_secs(10),
            &format!("stub {}", backend_name(i)),
            || self.try_stub_stats(i).is_some(),
        );
        p
    }

    /// Calls the stub's admin endpoint `path` (e.g. "/mode?readyz=503").
    pub fn stub_admin(&self, i: usize, path: &str) -> String {
        self.backends[i].ns.sh(&format!(
            "curl -sf --max-time 2 'http://{STUB_ADMIN}{path}'"
        ))
    }

    /// Makes every stub's `kubernetes` EndpointSlice list `addrs` (at VIP_PORT), as one
    /// cluster's apiservers all would; a watch event each.
    pub fn set_endpointslice(&self, addrs: &[Ipv4Addr]) {
        let list: Vec<String> = addrs.iter().map(Ipv4Addr::to_string).collect();
        for i in 0..self.backends.len() {
            self.stub_admin(
                i,
                &format!(
                    "/endpointslice?addresses={}&port={VIP_PORT}",
                    list.join(",")
                ),
            );
        }
    }

    fn try_stub_stats(&self, i: usize) -> Option<serde_json::Value> {
        let out = self.backends[i]
            .ns
            .try_sh(&format!("curl -sf --max-time 2 http://{STUB_ADMIN}/stats"))
            .ok()?;
        serde_json::from_str(&out).ok()
    }

    /// The stub's counters (its admin /stats).
    pub fn stub_stats(&self, i: usize) -> serde_json::Value {
        self.try_stub_stats(i)
            .unwrap_or_else(|| panic!("stub {} does not answer /stats", backend_name(i)))
    }

    /// Where LB `i`'s agent pins its maps.
    pub fn pin_path(&self, i: usize) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/lb-{}-lb{}", self.id, i + 1))
    }

    /// Writes an agent config for LB `i`: `vip_extra` goes into the VIP's table and
    /// `health` into its `[vip.health]` (which already names the lab's CA).
    pub fn agent_config(&self, i: usize, vip_extra: &str, health: &str) -> PathBuf {
        let backends: Vec<(String, Ipv4Addr, u16)> = self
            .backends
            .iter()
            .enumerate()
            .map(|(b, h)| (backend_name(b), h.addr, VIP_PORT))
            .collect();
        self.agent_config_backends(i, vip_extra, health, &backends)
    }

    /// Like `agent_config`, with the VIP's backends given as (name, address, port).
    pub fn agent_config_backends(
        &self,
        i: usize,
        vip_extra: &str,
        health: &str,
        backends: &[(String, Ipv4Addr, u16)],
    ) -> PathBuf {
        let mut t = format!(
            "[agent]\ninterface = \"eth0\"\nxdp_mode = \"native\"\npin_path = \"{}\"\n\
             control_socket = \"{}\"\n\n[[vip]]\nname = \"kube-apiserver\"\naddress = \"{VIP}\"\n\
             port = {}\n{vip_extra}\n\n[vip.health]\nca_file = \"{}\"\n{health}\n",
            self.pin_path(i).display(),
            self.dir.join(format!("lb{}.sock", i + 1)).display(),
            self.vip_port,
            self.dir.join("pki/ca.crt").display()
        );
        for (name, addr, port) in backends {
            t.push_str(&format!(
                "\n[[vip.backend]]\nname = \"{name}\"\naddress = \"{addr}\"\n"
            ));
            if *port != self.vip_port {
                t.push_str(&format!("port = {port}\n"));
            }
        }
        let p = self.dir.join(format!("lb{}.toml", i + 1));
        fs::write(&p, t).expect("write config");
        p
    }

    /// `lb-agent backend-setup --mode MODE --vip VIP` (and `extra`, e.g. `--undo`) on
    /// backend `i`, with a state file of the lab's; its output, or why it failed.
    pub fn backend_setup(&self, i: usize, mode: &str, extra: &[&str]) -> Result<String, String> {
        let state = self.dir.join(format!("backend-setup-{i}.json"));
        let mut cmd = format!(
            "{} backend-setup --mode {mode} --vip {VIP} --state {}",
            bin("lb-agent").display(),
            state.display()
        );
        for e in extra {
            cmd.push(' ');
            cmd.push_str(e);
        }
        self.backends[i].ns.try_sh(&cmd)
    }

    /// Places the VIP on LB `i` by hand (VRRP does it later).
    pub fn add_vip(&self, i: usize) {
        self.lbs[i].ns.sh(&format!("ip addr add {VIP}/32 dev eth0"));
    }

    /// The last `n` lines of the log of the agent started on LB `i`, for failure messages.
    pub fn agent_log_tail(&self, i: usize, n: usize) -> String {
        let log =
            fs::read_to_string(self.dir.join(format!("agent-lb{}.log", i + 1))).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Starts lb-agent on LB `i` and waits until its status answers.
    pub fn start_agent(&self, i: usize, config: &Path) -> Proc {
        self.start_agent_with(i, config, &[])
    }

    /// Like `start_agent`, with `wrapper` (e.g. a setpriv command line) in front of it.
    pub fn start_agent_with(&self, i: usize, config: &Path, wrapper: &[&str]) -> Proc {
        let p = self.spawn_agent(i, config, wrapper);
        self.wait_agent(p, config)
    }

    /// Like `start_agent`, running the lb-agent binary at `exe` (a copy a test upgrades).
    pub fn start_agent_exe(&self, i: usize, config: &Path, exe: &Path) -> Proc {
        let p = self.spawn_net_only(
            &self.lbs[i],
            &format!("agent-lb{}", i + 1),
            &[
                exe.to_str().unwrap(),
                "run",
                "--config",
                config.to_str().unwrap(),
            ],
        );
        self.wait_agent(p, config)
    }

    /// Waits until the agent `p` (using `config`) answers status.
    fn wait_agent(&self, p: Proc, config: &Path) -> Proc {
        self.wait_agent_until(p, config, Duration::from_secs(30), |_| true)
    }

    /// Waits up to `timeout` until the agent `p` (using `config`) answers status and the
    /// answer satisfies `ready`.
    pub fn wait_agent_until(
        &self,
        mut p: Proc,
        config: &Path,
        timeout: Duration,
        ready: impl Fn(&serde_json::Value) -> bool,
    ) -> Proc {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(s) = self.try_status(config) {
                if s["agent"]["running"] == true && ready(&s) {
                    return p;
                }
            }
            assert!(p.running(), "lb-agent exited early:\n{}", p.output());
            assert!(
                Instant::now() < deadline,
                "lb-agent did not come up:\n{}",
                p.output()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Polls `lb-agent status` for `config` until the agent runs and every backend of its
    /// first VIP is up; the reason and the agent's output when `agent` exits first or
    /// `timeout` passes.
    pub fn wait_backends_up(
        &self,
        agent: &mut Proc,
        config: &Path,
        timeout: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let (running, up, all) = match self.try_status(config) {
                Ok(s) => {
                    let b = s["vips"][0]["backends"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default();
                    let up = b.iter().filter(|b| b["state"] == "up").count();
                    (s["agent"]["running"] == true, up, b.len())
                }
                Err(_) => (false, 0, 0),
            };
            if running && all > 0 && up == all {
                return Ok(());
            }
            if !agent.running() || Instant::now() > deadline {
                return Err(format!(
                    "lb-agent {}, {up} of {all} backends up (waited at most {timeout:?}):\n{}",
                    if agent.running() { "running" } else { "exited" },
                    agent.output()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts lb-agent on LB `i` (behind `wrapper`) without waiting for it.
    pub fn spawn_agent(&self, i: usize, config: &Path, wrapper: &[&str]) -> Proc {
        let agent = bin("lb-agent");
        let mut args: Vec<&str> = wrapper.to_vec();
        args.extend([
            agent.to_str().unwrap(),
            "run",
            "--config",
            config.to_str().unwrap(),
        ]);
        self.spawn_net_only(&self.lbs[i], &format!("agent-lb{}", i + 1), &args)
    }

    /// `lb-agent status --json` for the agent using `config`, or why it did not answer.
    pub fn try_status(&self, config: &Path) -> Result<serde_json::Value, String> {
        let out = Command::new(bin("lb-agent"))
            .args(["status", "--json", "--config"])
            .arg(config)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
    }

    /// `lb-agent status --json` for the agent using `config`.
    pub fn status(&self, config: &Path) -> serde_json::Value {
        self.try_status(config)
            .unwrap_or_else(|e| panic!("lb-agent status: {e}"))
    }

    /// Starts lb-loadgen in the client namespace in the background; `LoadgenRun::finish`
    /// returns its report.
    pub fn spawn_loadgen(&self, name: &str, path: &str, args: &[&str]) -> LoadgenRun {
        let ca = self.dir.join("pki/ca.crt");
        let url = format!("https://{VIP}:{}{path}", self.vip_port);
        let out = self.dir.join(format!("{name}.json"));
        let f = fs::File::create(&out).expect("loadgen output");
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.client.ns.name])
            .arg(bin("lb-loadgen"))
            .args(["--url", &url, "--ca"])
            .arg(&ca)
            .args(args)
            .stdin(Stdio::null())
            .stdout(f)
            .stderr(Stdio::null());
        let child = c.spawn().expect("spawn lb-loadgen");
        LoadgenRun {
            proc: Proc {
                name: name.to_string(),
                child: Some(child),
                log: out.clone(),
            },
            out,
        }
    }

    /// 30 long-lived connections through the VIP, a request on each every 100 ms, for `secs`
    /// (watches stand-in: they must survive what is done to the backends meanwhile).
    pub fn spawn_long_lived(&self, name: &str, secs: u64) -> LoadgenRun {
        self.spawn_long_lived_with(name, secs, "2s")
    }

    /// Like `spawn_long_lived`, each request given `timeout` (lb-loadgen's default: 2s).
    pub fn spawn_long_lived_with(&self, name: &str, secs: u64, timeout: &str) -> LoadgenRun {
        self.spawn_loadgen(
            name,
            "/version",
            &[
                "--connections",
                "30",
                "--interval",
                "100ms",
                "--duration",
                &format!("{secs}s"),
                "--timeout",
                timeout,
            ],
        )
    }

    /// A client opening a new connection every 10 ms for `secs`, reporting the longest gap
    /// (a 500 ms timeout, so a stall shows as one).
    pub fn spawn_new_connections(&self, name: &str, secs: u64) -> LoadgenRun {
        self.spawn_loadgen(
            name,
            "/version",
            &[
                "--gap",
                "--new-connection",
                "--interval",
                "10ms",
                "--duration",
                &format!("{secs}s"),
                "--timeout",
                "500ms",
            ],
        )
    }

    /// Runs lb-loadgen in the client namespace against the VIP; returns its JSON report.
    pub fn loadgen(&self, path: &str, args: &[&str]) -> serde_json::Value {
        let ca = self.dir.join("pki/ca.crt");
        let url = format!("https://{VIP}:{}{path}", self.vip_port);
        let lg = bin("lb-loadgen");
        let mut all = vec![
            lg.to_str().unwrap(),
            "--url",
            &url,
            "--ca",
            ca.to_str().unwrap(),
        ];
        all.extend_from_slice(args);
        let out = self.exec(&self.client, &all);
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("loadgen output {out:?}: {e}"))
    }

    /// Names this lab gave to things that must be gone after it is dropped.
    pub fn footprint(&self) -> Footprint {
        Footprint {
            id: self.id.clone(),
            bridge: self.bridge.clone(),
            pins: (0..self.lbs.len()).map(|i| self.pin_path(i)).collect(),
            cgroups: lb_agent::host::root_cgroup(),
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Namespace deletion frees veths asynchronously: delete our ends now, so nothing
        // of the lab outlives it.
        for h in std::iter::once(&self.client)
            .chain(&self.lbs)
            .chain(&self.backends)
            .chain(&self.routers)
            .filter(|h| !h.port.is_empty())
        {
            let _ = Command::new("ip").args(["link", "del", &h.port]).status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
        for i in 0..self.lbs.len() {
            let _ = lb_agent::dataplane::loader::remove_pins(&self.pin_path(i));
        }
        if std::env::var_os("LB_KEEP_LAB_DIR").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// A load generator running in the background.
pub struct LoadgenRun {
    proc: Proc,
    out: PathBuf,
}

impl LoadgenRun {
    /// Waits for the end (at most `timeout`) and returns the report.
    pub fn finish(mut self, timeout: Duration) -> serde_json::Value {
        let st = self
            .proc
            .wait(timeout)
            .expect("lb-loadgen finished in time");
        assert!(st.success(), "lb-loadgen failed: {st}");
        let out = fs::read_to_string(&self.out).expect("loadgen output");
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("loadgen output {out:?}: {e}"))
    }
}

/// What a dropped lab must have removed.
pub struct Footprint {
    id: String,
    bridge: String,
    pins: Vec<PathBuf>,
    /// The cgroup v2 root, where a lab's cgroups (`lb-<id>-...`) live.
    cgroups: PathBuf,
}

impl Footprint {
    /// Everything of the lab that still exists (empty when cleanup worked).
    pub fn leftovers(&self) -> Vec<String> {
        let mut left: Vec<String> = netns::list()
            .into_iter()
            .filter(|n| n.starts_with(&format!("lb-{}-", self.id)))
            .collect();
        let links = Command::new("ip").args(["-o", "link", "show"]).output();
        if let Ok(o) = links {
            for l in String::from_utf8_lossy(&o.stdout).lines() {
                let name = l.split(": ").nth(1).unwrap_or("");
                let name = name.split('@').next().unwrap_or("");
                if name.starts_with(&format!("lb{}", self.id)) || name == self.bridge {
                    left.push(format!("link {name}"));
                }
            }
        }
        for p in &self.pins {
            if p.exists() {
                left.push(format!("pin {}", p.display()));
            }
        }
        if let Ok(dir) = fs::read_dir(&self.cgroups) {
            for e in dir.flatten() {
                if e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("lb-{}-", self.id))
                {
                    left.push(format!("cgroup {}", e.path().display()));
                }
            }
        }
        left
    }
}

/// Polls `f` until it is true or `timeout` passes (then panics naming `what`).
/// How many of the `n` requests in lb-loadgen's `report` each of the first `backends`
/// backends served, each asserted to be 20%..46% of them: three backends' even share, with
/// Maglev's spread over a few hundred connections.
pub fn assert_spread(report: &serde_json::Value, n: u64, backends: usize) -> Vec<u64> {
    (0..backends)
        .map(|i| {
            let name = backend_name(i);
            let served = report["backends"][&name].as_u64().unwrap_or(0);
            assert!(
                (n / 5..=n * 46 / 100).contains(&served),
                "{name} served {served} of {n} (20%..46% expected): {report}"
            );
            served
        })
        .collect()
}

/// Runs `lb-agent CMD --config CONFIG` to completion; its stdout. Panics with what it said
/// when it fails.
pub fn agent_cli(cmd: &str, config: &Path) -> String {
    let out = Command::new(bin("lb-agent"))
        .args([cmd, "--config"])
        .arg(config)
        .output()
        .expect("lb-agent");
    assert!(
        out.status.success(),
        "lb-agent {cmd}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn wait_for(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// lb-agent as nobody: uid and gid 65534, no supplementary groups, no capabilities.
pub fn agent_as_nobody() -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
    ])
    .arg(bin("lb-agent"));
    c
}

/// The backend named `name` of the first VIP in a `status --json` report.
pub fn backend_status<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["vips"][0]["backends"]
        .as_array()
        .unwrap_or_else(|| panic!("no backends in {status}"))
        .iter()
        .find(|b| b["name"] == name)
        .unwrap_or_else(|| panic!("{name} in {status}"))
}
