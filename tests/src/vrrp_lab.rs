//! Lab helpers for VRRP tests: two LBs with agents (or keepalived) sharing the VIP.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::lab::{Lab, LoadgenRun, Proc, VIP};

/// Health settings VRRP labs use: fast enough that tracking reacts within a second.
pub const VRRP_HEALTH: &str = "interval = \"200ms\"\ntimeout = \"150ms\"";

/// Two LBs running lb-agent with VRRP (lb1 priority 110, lb2 100) in front of three stubs.
pub struct Pair {
    pub lab: Lab,
    pub configs: [PathBuf; 2],
    pub stubs: Vec<Proc>,
}

impl Pair {
    /// The `[vrrp]` keys of an LB: VRID 51, `priority`, adverts every `advert_ms`, `extra`.
    pub fn vrrp(priority: u8, advert_ms: u64, extra: &str) -> String {
        format!(
            "virtual_router_id = 51\npriority = {priority}\nadvert_interval = \"{advert_ms}ms\"\n{extra}"
        )
    }

    /// Builds the lab and starts both agents; lb1 is master when this returns. None when
    /// the test cannot run here.
    pub fn new(
        test: &str,
        advert_ms: u64,
        extra1: &str,
        extra2: &str,
    ) -> Option<(Pair, Proc, Proc)> {
        Self::with_backends(test, advert_ms, extra1, extra2, 3, 3)
    }

    /// Like `new`, with `hosts` backend hosts (all with stubs) of which the first
    /// `configured` are in the agents' configs.
    pub fn with_backends(
        test: &str,
        advert_ms: u64,
        extra1: &str,
        extra2: &str,
        hosts: usize,
        configured: usize,
    ) -> Option<(Pair, Proc, Proc)> {
        Self::build(
            test,
            advert_ms,
            [extra1, extra2],
            hosts,
            configured,
            "",
            |lab| lab.start_stubs(),
        )
    }

    /// Like `with_backends`, with `vip_extra` in the VIP's table (e.g. its mode), and
    /// `prepare` run on the lab before the agents start, returning its stubs.
    pub fn build(
        test: &str,
        advert_ms: u64,
        extra: [&str; 2],
        hosts: usize,
        configured: usize,
        vip_extra: &str,
        prepare: impl FnOnce(&Lab) -> Vec<Proc>,
    ) -> Option<(Pair, Proc, Proc)> {
        let lab = Lab::new(test, 2, hosts)?;
        let stubs = prepare(&lab);
        let c1 = lab.agent_config_vrrp_vip(
            0,
            vip_extra,
            VRRP_HEALTH,
            &Self::vrrp(110, advert_ms, extra[0]),
            configured,
        );
        let c2 = lab.agent_config_vrrp_vip(
            1,
            vip_extra,
            VRRP_HEALTH,
            &Self::vrrp(100, advert_ms, extra[1]),
            configured,
        );
        Some(Self::start(lab, [c1, c2], stubs))
    }

    /// Starts the agents of LBs 0 and 1 with `configs`; LB 0 is master when this returns.
    pub fn start(lab: Lab, configs: [PathBuf; 2], stubs: Vec<Proc>) -> (Pair, Proc, Proc) {
        let a1 = lab.start_agent(0, &configs[0]);
        let a2 = lab.start_agent(1, &configs[1]);
        let pair = Pair {
            lab,
            configs,
            stubs,
        };
        pair.wait_master(0, Duration::from_secs(5));
        (pair, a1, a2)
    }

    /// Waits until LB `i` is the only master and the only holder of the VIP.
    pub fn wait_master(&self, i: usize, timeout: Duration) {
        let other = 1 - i;
        let ok = poll_until(timeout, || {
            self.lab.vrrp_state(&self.configs[i]) == "master"
                && self.lab.has_vip(i)
                && !self.lab.has_vip(other)
                && matches!(
                    self.lab.vrrp_state(&self.configs[other]).as_str(),
                    "backup" | "fault" | ""
                )
        });
        assert!(
            ok.is_some(),
            "lb{} should be the only master: lb1 {:?} vip {}, lb2 {:?} vip {}\n--- lb1's agent:\n{}\n--- lb2's agent:\n{}",
            i + 1,
            self.lab.vrrp_status(&self.configs[0]),
            self.lab.has_vip(0),
            self.lab.vrrp_status(&self.configs[1]),
            self.lab.has_vip(1),
            self.lab.agent_log_tail(0, 30),
            self.lab.agent_log_tail(1, 30)
        );
    }

    /// A client opening a new connection every 20 ms for `secs`, reporting the longest gap.
    pub fn gap_client(&self, name: &str, secs: u64) -> LoadgenRun {
        self.lab.spawn_loadgen(
            name,
            "/version",
            &[
                "--gap",
                "--new-connection",
                "--interval",
                "20ms",
                "--duration",
                &format!("{secs}s"),
                // Short, so the client's own timeout does not hide the real outage.
                "--timeout",
                "200ms",
            ],
        )
    }
}

impl Lab {
    /// An agent config for LB `i` with a `[vrrp]` section (`vrrp` holds its keys) appended.
    pub fn agent_config_vrrp(&self, i: usize, health: &str, vrrp: &str) -> PathBuf {
        self.agent_config_vrrp_n(i, health, vrrp, self.backends.len())
    }

    /// Like `agent_config_vrrp`, with only the first `n` backend hosts in the VIP.
    pub fn agent_config_vrrp_n(&self, i: usize, health: &str, vrrp: &str, n: usize) -> PathBuf {
        self.agent_config_vrrp_vip(i, "", health, vrrp, n)
    }

    /// Like `agent_config_vrrp_n`, with `vip_extra` in the VIP's table.
    pub fn agent_config_vrrp_vip(
        &self,
        i: usize,
        vip_extra: &str,
        health: &str,
        vrrp: &str,
        n: usize,
    ) -> PathBuf {
        let backends: Vec<_> = self.backends[..n]
            .iter()
            .enumerate()
            .map(|(b, h)| (crate::lab::backend_name(b), h.addr, crate::lab::VIP_PORT))
            .collect();
        let p = self.agent_config_backends(i, vip_extra, health, &backends);
        let mut t = std::fs::read_to_string(&p).expect("config");
        t.push_str(&format!("\n[vrrp]\n{vrrp}\n"));
        std::fs::write(&p, t).expect("write config");
        p
    }

    /// True when LB `i` holds the VIP on its interface.
    pub fn has_vip(&self, i: usize) -> bool {
        self.lbs[i]
            .ns
            .try_sh("ip -4 -o addr show dev eth0")
            .map(|s| s.contains(&format!("inet {VIP}/")))
            .unwrap_or(false)
    }

    /// The agent's VRRP state from `lb-agent status` ("" when it does not answer).
    pub fn vrrp_state(&self, config: &Path) -> String {
        self.vrrp_status(config)
            .map(|v| v["state"].as_str().unwrap_or("").to_string())
            .unwrap_or_default()
    }

    /// The agent's `vrrp` status object, when it answers.
    pub fn vrrp_status(&self, config: &Path) -> Option<serde_json::Value> {
        let out = std::process::Command::new(crate::lab::bin("lb-agent"))
            .args(["status", "--json", "--config"])
            .arg(config)
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        Some(v["vrrp"].clone())
    }

    /// Writes a keepalived config for LB `i` and starts keepalived (VRRP only) there.
    pub fn start_keepalived(&self, i: usize, conf: &str) -> Proc {
        let dir = self.dir.join(format!("keepalived-lb{}", i + 1));
        std::fs::create_dir_all(&dir).expect("keepalived dir");
        let path = dir.join("keepalived.conf");
        std::fs::write(&path, conf).expect("keepalived.conf");
        let p = |n: &str| dir.join(n).display().to_string();
        // A killed keepalived's children can linger as zombies here (nothing reaps them
        // promptly), and keepalived then refuses to start: "daemon is already running".
        for f in ["keepalived.pid", "vrrp.pid", "checkers.pid"] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        self.spawn(
            &self.lbs[i],
            &format!("keepalived-lb{}", i + 1),
            &[
                "keepalived",
                "--dont-fork",
                "--log-console",
                "--log-detail",
                "--vrrp",
                "--use-file",
                &path.display().to_string(),
                "--pid",
                &p("keepalived.pid"),
                "--vrrp_pid",
                &p("vrrp.pid"),
                "--checkers_pid",
                &p("checkers.pid"),
            ],
        )
    }

    /// Takes LB `i`'s link down and SIGKILLs `proc` and every other process of LB `i`
    /// (keepalived's VRRP child among them): the node is gone. The link goes first: when
    /// keepalived's parent dies its VRRP child gets SIGTERM (PR_SET_PDEATHSIG) and would
    /// resign with a priority 0 advert, which a dead host never sends.
    pub fn kill_node(&self, i: usize, proc: &mut Proc) {
        self.lbs[i].ns.sh("ip link set eth0 down");
        let _ = std::process::Command::new("sh")
            .args([
                "-c",
                &format!("ip netns pids {} | xargs -r kill -9", self.lbs[i].ns.name),
            ])
            .status();
        proc.signal(nix::sys::signal::Signal::SIGKILL);
        let _ = proc.wait(Duration::from_secs(5));
    }

    /// Brings LB `i`'s link back (after `kill_node`) and clears what the dead node left.
    pub fn revive_node(&self, i: usize) {
        self.lbs[i].ns.sh("ip link set eth0 up");
        let _ = self.lbs[i]
            .ns
            .try_sh(&format!("ip addr del {VIP}/32 dev eth0"));
    }
}

/// Waits until `f` holds (polling every 10 ms); returns when, or None after `timeout`.
pub fn poll_until(timeout: Duration, mut f: impl FnMut() -> bool) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return Some(Instant::now());
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// keepalived.conf for one VRRP instance on eth0 holding the lab's VIP.
pub fn keepalived_conf(
    version: u8,
    state: &str,
    priority: u8,
    advert: &str,
    auth_pass: Option<&str>,
) -> String {
    let auth = auth_pass
        .map(|p| {
            format!(
                "    authentication {{\n        auth_type PASS\n        auth_pass {p}\n    }}\n"
            )
        })
        .unwrap_or_default();
    format!(
        "global_defs {{\n    vrrp_version {version}\n    script_user root\n    enable_script_security\n    vrrp_garp_master_delay 0\n}}\n\
         vrrp_instance VI_1 {{\n    state {state}\n    interface eth0\n    virtual_router_id 51\n    priority {priority}\n    \
         advert_int {advert}\n{auth}    virtual_ipaddress {{\n        {VIP}/32\n    }}\n}}\n"
    )
}

/// Gratuitous ARPs for `addr` seen in namespace `ns` during `window`, as (time since the
/// start, sender MAC) pairs.
pub fn capture_garps(
    ns: &crate::netns::Netns,
    addr: std::net::Ipv4Addr,
    window: Duration,
) -> Vec<(Duration, [u8; 6])> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let _in = ns.enter();
    // SAFETY: socket(2); ownership passes to OwnedFd at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            (libc::ETH_P_ARP as u16).to_be() as i32,
        )
    };
    assert!(
        fd >= 0,
        "packet socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 50_000,
    };
    // SAFETY: valid fd and option buffer.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    let start = Instant::now();
    let mut seen = Vec::new();
    let mut buf = [0u8; 128];
    while start.elapsed() < window {
        // SAFETY: buf is valid for its length.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
            )
        };
        if n < 42 {
            continue;
        }
        let (sender_ip, target_ip) = (&buf[28..32], &buf[38..42]);
        if sender_ip == addr.octets() && target_ip == addr.octets() {
            let mut mac = [0u8; 6];
            mac.copy_from_slice(&buf[22..28]);
            seen.push((start.elapsed(), mac));
        }
    }
    seen
}

impl Lab {
    /// The MAC of LB `i`'s eth0 (the lab sets it from the address).
    pub fn lb_mac(&self, i: usize) -> [u8; 6] {
        let o = self.lbs[i].addr.octets();
        [0x02, 0x00, 0xc6, 0x12, o[2], o[3]]
    }

    /// The MAC the client's neighbour table has for the VIP, if any.
    pub fn client_vip_mac(&self) -> Option<String> {
        let out = self
            .client
            .ns
            .try_sh(&format!("ip neigh show {VIP} dev eth0"))
            .ok()?;
        let mut it = out.split_whitespace();
        while let Some(w) = it.next() {
            if w == "lladdr" {
                return it.next().map(str::to_string);
            }
        }
        None
    }
}

/// `aa:bb:...` for a MAC.
pub fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
