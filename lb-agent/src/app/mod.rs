//! `lb-agent run`: install the signal handlers, check privileges, load and publish the data
//! plane, attach, start the supervised tasks, and serve until SIGTERM/SIGINT or until a task
//! fails. Either way the agent then gives up the VIP first (priority 0), keeps forwarding
//! for a moment while the backup takes over, and undoes the rest in reverse order; a failure
//! makes it exit non-zero so the service manager restarts it.
//!
//! `signals`: the handlers. `supervisor`: the named tasks and how they end. `keeper`: the task
//! that owns backend state and the maps. `service`: telling the service manager (systemd).

mod election;
mod handoff;
mod keeper;
mod reload;
pub mod service;
mod signals;
mod supervisor;

use std::{
    fs::{File, OpenOptions},
    net::Ipv4Addr,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, Context, Result};
use lb_common::AgentMeta;
use tokio::sync::{mpsc, watch};

use crate::{
    backends::Backends,
    config::{Config, Mode, XdpModeSetting},
    control::{self, Access, AgentInfo, Request},
    dataplane::{
        generic,
        loader::{Dataplane, Start},
        pinned::PinnedMaps,
        writer::Writer,
        DataplaneError,
    },
    discovery,
    health::{probe::LocalLink, probers::Probers},
    heartbeat::Heartbeat,
    host::{self, Sysctls},
    netlink::{self, Netlink},
    vrrp,
};
pub use handoff::Version;
pub use supervisor::{Exit, Supervisor};

/// Holds the agent's single-instance lock for its lifetime.
pub struct InstanceLock {
    _lock: nix::fcntl::Flock<File>,
    path: PathBuf,
}

impl InstanceLock {
    /// Takes `<control_socket>.lock`, or fails naming the agent that holds it.
    pub fn take(control_socket: &Path) -> Result<Self> {
        let mut path = control_socket.as_os_str().to_owned();
        path.push(".lock");
        let path = PathBuf::from(path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        // 0600: anyone who could open it could hold the lock and keep a restarted agent out.
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("opening lock file {}", path.display()))?;
        let lock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| {
                anyhow!(
                    "another lb-agent is running with control socket {} (lock {} is held: {e})",
                    control_socket.display(),
                    path.display()
                )
            })?;
        Ok(Self { _lock: lock, path })
    }
}

impl Drop for InstanceLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Logs what a reload did, or why it was refused.
fn log_reload(r: &Result<Vec<String>, String>) {
    match r {
        Ok(lines) => {
            crate::metrics::record_reload(true, unix_seconds(SystemTime::now()));
            for l in lines {
                tracing::info!(event = "config_reload", result = "ok", change = %l, "reload: {l}");
            }
        }
        Err(e) => {
            crate::metrics::record_reload(false, 0);
            tracing::error!(
            event = "config_reload",
            result = "refused",
            error = %e,
            "reload refused, the agent keeps its config: {e}"
            )
        }
    }
}

/// `t` in whole seconds since the Unix epoch (0 before it).
fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The interface the XDP program serves, as the agent found it at start.
struct Nic {
    iface: String,
    ifindex: u32,
    mac: [u8; 6],
    /// Why generic (skb) mode would corrupt checksums here (`generic::generic_hazard`).
    generic_hazard: Option<String>,
}

impl Nic {
    /// Reads `iface` and refuses what cannot work on it before anything is loaded, so a
    /// refusal leaves nothing behind.
    async fn read(nl: &Netlink, iface: &str, file: &str, xdp_mode: XdpModeSetting) -> Result<Self> {
        let link = nl
            .link_by_name(iface)
            .await
            .with_context(|| format!("{file}: agent.interface"))?;
        let mac = link
            .mac
            .ok_or_else(|| anyhow!("{file}: agent.interface: {iface} has no MAC address"))?;
        let links = nl.links().await.context("listing the links")?;
        let generic_hazard = generic::generic_hazard(&links, link.index);
        match (xdp_mode, &generic_hazard) {
            (XdpModeSetting::Generic, Some(h)) => {
                return Err(anyhow!(
                    "{file}: agent.xdp_mode: {}",
                    generic::refusal(iface, h)
                ))
            }
            (XdpModeSetting::Generic, None) => log::warn!(
                "agent.xdp_mode = \"generic\" on {iface}: generic (skb) mode is for testing and for NICs whose driver has no XDP support; it is much slower than native mode"
            ),
            _ => {}
        }
        Ok(Self {
            iface: iface.to_string(),
            ifindex: link.index,
            mac,
            generic_hazard,
        })
    }
}

/// The SNAT port ranges to keep out of the kernel's ephemeral ports: NAT VIPs' only.
pub(crate) fn snat_ranges(config: &Config) -> Vec<(u16, u16)> {
    config
        .vips
        .iter()
        .filter(|v| v.mode.uses_snat())
        .map(|v| v.snat_ports)
        .collect()
}

/// Runs the agent until SIGTERM or SIGINT (Ok) or until a supervised task ends (Err).
pub async fn run(config: Config) -> Result<()> {
    // Before anything changes on the host: a signal from here on is handled, never fatal.
    let mut signals = signals::Signals::install().context("installing signal handlers")?;
    let file = config.path.display().to_string();
    let source = config.source.as_ref();
    host::check_privileges(
        "run",
        host::Needs {
            vrrp: config.vrrp.is_some(),
            dsr: config.vips.iter().any(|v| v.mode.is_dsr()),
            realtime: config.vrrp.as_ref().is_some_and(|v| v.rt_priority > 0),
            group: config.agent.control_socket_group.is_some(),
        },
    )?;
    let nl = Netlink::connect().context("opening rtnetlink")?;
    // No interface: every VIP is in socket mode, and no XDP program is attached anywhere.
    let nic = match &config.agent.interface {
        Some(iface) => Some(Nic::read(&nl, iface, &file, config.agent.xdp_mode).await?),
        None => None,
    };
    let ifindex = nic.as_ref().map_or(0, |n| n.ifindex);
    // Socket mode alone keeps no flows: the flow tables shrink to their least (about 100 MiB
    // of kernel memory saved on every node at the default max_flows).
    let max_flows = if nic.is_some() {
        config.agent.max_flows
    } else {
        crate::config::MIN_MAX_FLOWS
    };
    let iface = nic.as_ref().map_or(String::new(), |n| n.iface.clone());
    // Also when every VIP names its SNAT address: a reload may add one that does not.
    let default_snat = match &nic {
        Some(n) => nl
            .primary_ipv4(n.ifindex)
            .await?
            .unwrap_or(Ipv4Addr::UNSPECIFIED),
        None => Ipv4Addr::UNSPECIFIED,
    };
    if let Some(i) = config
        .vips
        .iter()
        .position(|v| v.mode != Mode::Socket && v.snat_address.is_none())
    {
        if default_snat.is_unspecified() {
            return Err(anyhow!(
                "{file}: vip[{i}].snat_address: not set, and interface {iface} has no IPv4 address to use instead"
            ));
        }
    }
    // The probes' TLS files, before anything changes on the host (check-config did too,
    // but they may have changed since).
    for (i, v) in config.vips.iter().enumerate() {
        crate::health::tls_config(&v.health).map_err(|e| anyhow!("{file}: vip[{i}].health.{e}"))?;
    }
    let group = config
        .agent
        .control_socket_group
        .as_deref()
        .map(control::group_id)
        .transpose()
        .with_context(|| file.clone())?;
    let pin_path = config.agent.pin_path.clone();
    let socket_path = config.agent.control_socket.clone();
    let _lock = InstanceLock::take(&socket_path)?;
    // After `lb-agent restart`, this process ran the previous agent: what it handed over.
    let handed = handoff::Handoff::take(&socket_path);
    if let Some(h) = &handed {
        log::info!(
            "continuing after lb-agent restart (version {}){}",
            crate::VERSION,
            if h.vrrp_master {
                ": resuming as VRRP master"
            } else {
                ""
            }
        );
    }
    // The apiservers the previous agent had found, for the VIPs that still follow them.
    let (applied, discovered) = {
        let found: std::collections::BTreeMap<String, discovery::Found> = handed
            .as_ref()
            .map(|h| h.discovered.clone())
            .unwrap_or_default()
            .into_iter()
            .filter(|(vip, _)| {
                config
                    .vips
                    .iter()
                    .any(|v| &v.name == vip && v.discovery.is_some())
            })
            .collect();
        let applied = discovery::effective(&config, &found);
        match crate::config::check_backends(&applied) {
            Ok(()) => (applied, found),
            Err(e) => {
                log::warn!("the apiservers the previous agent found do not fit this config ({e}): serving the configured backends until discovery lists them again");
                (config.clone(), Default::default())
            }
        }
    };
    let (penalty_tx, penalty_rx) = watch::channel(0u8);
    let vrrp_status: vrrp::Shared = Default::default();
    let keeper_alive = Heartbeat::default();
    let vrrp_alive = Heartbeat::default();
    let mut ties = Some(election::Ties {
        status: vrrp_status.clone(),
        penalty: penalty_rx,
        vrrp_alive: vrrp_alive.clone(),
        keeper_alive: keeper_alive.clone(),
    });
    let mut election = None;
    // A master that re-executed itself (or crashed a moment ago: its addresses' lifetime
    // is still running) goes on sending adverts at once, while the data plane it left
    // forwards: the peer must not take over while this agent loads. Only when that data
    // plane can be adopted: otherwise replacing it would blackhole the VIP meanwhile.
    if let Some(v) = &config.vrrp {
        let resume = match &handed {
            Some(h) => h.vrrp_master,
            None => match nl.link_by_name(&v.interface).await {
                Ok(l) => vrrp::left_by_a_master(v, l.index, &nl)
                    .await
                    .unwrap_or(false),
                Err(_) => false,
            },
        };
        let adoptable = || Dataplane::can_adopt(&pin_path, max_flows, ifindex);
        match (resume, if resume { adoptable() } else { Ok(()) }) {
            (true, Ok(())) => {
                if handed.is_none() {
                    log::warn!(
                        "the virtual addresses are still on {} with their lifetime running: an agent of this host was master until a moment ago and did not resign; resuming as master at once",
                        v.interface
                    );
                }
                let t = ties.take().expect("unused");
                election = Some(election::Election::start(v, &nl, &file, t, true).await?);
            }
            (true, Err(why)) => log::warn!(
                "not resuming as VRRP master: the data plane left here cannot be adopted ({why})"
            ),
            (false, _) => {}
        }
    }
    let (mut dp, start) = match Dataplane::load_or_adopt(&pin_path, max_flows, ifindex) {
        Ok(x) => x,
        Err(e) => {
            if let Some(e) = election.take() {
                e.resign(false, &nl).await;
            }
            return Err(anyhow::Error::new(e).context("loading the data plane"));
        }
    };
    // A resumed VRRP instance watches the keeper's heartbeat, and the keeper is not
    // running yet: loading was the long part of the start.
    keeper_alive.beat();
    let adopted = match &start {
        Start::Fresh => None,
        Start::Adopted(a) => {
            log::info!(
                "adopting the data plane an earlier agent left (pid {}, started {}): its program keeps forwarding and every flow is kept",
                a.meta.pid,
                humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(a.meta.started_unix))
            );
            Some(a.mode)
        }
        Start::Replaced { why, pins_removed } => {
            log::warn!(
                "an earlier agent's data plane under {} cannot be adopted ({why}): removed its {pins_removed} pins and loaded afresh; connections through this host are reset",
                pin_path.display()
            );
            None
        }
    };
    let started_unix = unix_seconds(SystemTime::now());
    let netns_cookie = match host::netns_cookie() {
        Ok(c) => c,
        Err(e) => {
            if config.vips.iter().any(|v| v.mode == Mode::Socket) {
                log::warn!(
                    "reading this network namespace's cookie (SO_NETNS_COOKIE, Linux 5.14): {e}; the socket-mode hooks serve every namespace"
                );
            }
            0
        }
    };
    // Until the program is attached (or the adopted one replaced), a failure must leave an
    // adopted data plane forwarding, as it was, rather than tear it down.
    let prepared = async {
        if let Some(g) = group {
            dp.share_with_group(g)
                .context("agent.control_socket_group: giving the group read access to the pins")?;
        }
        let writer = Writer::new(PinnedMaps::open(&pin_path).context("opening the pinned maps")?);
        let mut backends = if adopted.is_some() {
            let (b, notes) =
                Backends::adopt(&applied, writer, default_snat).context("taking over the maps")?;
            for n in notes {
                log::info!("adoption: {n}");
            }
            b
        } else {
            Backends::install(&applied, writer, default_snat).context("writing the maps")?
        };
        let mut sysctls = Sysctls::inherit(
            handed
                .as_ref()
                .map(|h| h.sysctls.clone())
                .unwrap_or_default(),
        );
        if nic.is_some() {
            sysctls.for_dataplane(&iface)?;
        }
        sysctls.reserve_ports(&snat_ranges(&config))?;

        let meta = AgentMeta {
            // An adopted link keeps its mode: a crash before attach must leave it adoptable.
            xdp_mode: adopted.unwrap_or(lb_common::xdp_mode::NONE),
            ifindex,
            pid: std::process::id(),
            layout_version: lb_common::MAP_LAYOUT_VERSION,
            started_unix,
            mac: nic.as_ref().map_or([0; 6], |n| n.mac),
            _pad2: [0; 2],
            netns_cookie,
        };
        // The MAC before the program runs: it must never act on frames for other hosts.
        backends.writer().set_agent_meta(meta)?;
        // Tagged frames leave by XDP only towards VLANs the program knows of. Subscribed before
        // the first read, so a VLAN device added in between is not missed; the keeper follows.
        let link_events = match &nic {
            Some(_) => Some(netlink::link_events().context("subscribing to link events")?),
            None => None,
        };
        let mode = match &nic {
            Some(n) => {
                let vlans = nl.vlans(ifindex).await?;
                for change in backends
                    .writer()
                    .set_vlans(&keeper::vlan_devs(ifindex, &vlans))?
                {
                    log::info!("VLAN devices on {iface}: {change}");
                }
                dp.attach(&iface, config.agent.xdp_mode, n.generic_hazard.as_deref())
                    .map_err(|e| match e {
                        DataplaneError::GenericRefused { .. }
                        | DataplaneError::NoFallback { .. } => {
                            anyhow!("{file}: {e}")
                        }
                        e => anyhow::Error::new(e).context("attaching the XDP program"),
                    })?
            }
            None => lb_common::xdp_mode::NONE,
        };
        if config.vips.iter().any(|v| v.mode == Mode::Socket) {
            let cgroup = config
                .agent
                .cgroup
                .clone()
                .unwrap_or_else(crate::host::root_cgroup);
            dp.attach_sock_hooks(&cgroup).with_context(|| {
                format!(
                    "{file}: agent.cgroup: attaching the socket-mode hooks to {}",
                    cgroup.display()
                )
            })?;
            log::info!(
                "socket-mode hooks (connect4, getpeername4) on cgroup {}",
                cgroup.display()
            );
        }
        Ok::<_, anyhow::Error>((backends, sysctls, meta, link_events, mode))
    }
    .await;
    let (mut backends, sysctls, mut meta, link_events, mode) = match prepared {
        Ok(p) => p,
        Err(e) => {
            if let Some(e) = election.take() {
                e.resign(false, &nl).await;
            }
            if adopted.is_some() {
                dp.leave();
                log::error!("left the adopted data plane forwarding as it was");
            }
            return Err(e);
        }
    };
    meta.xdp_mode = mode;
    backends.writer().set_agent_meta(meta)?;
    if nic.is_some() {
        log::info!(
            "XDP {} {iface} in {} mode; maps pinned under {}",
            if adopted.is_some() {
                "program replaced in place on"
            } else {
                "attached to"
            },
            lb_common::xdp_mode::name(mode),
            pin_path.display()
        );
    } else {
        log::info!(
            "no XDP (every VIP is in socket mode); maps pinned under {}",
            pin_path.display()
        );
    }

    let listener = control::bind(&socket_path, group)?;
    let access = Access {
        agent_uid: nix::unistd::geteuid().as_raw(),
        group,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut sup = Supervisor::default();
    let (call_tx, calls) = mpsc::channel::<control::Call>(64);
    // Reloads are the main loop's: it owns the config, the sysctls and VRRP's settings.
    let (agent_call_tx, mut agent_calls) = mpsc::channel::<control::Call>(8);
    let routes = control::Routes {
        agent: agent_call_tx,
        keeper: call_tx.clone(),
    };
    let stop = stop_rx.clone();
    sup.spawn("control socket", async move {
        control::serve(listener, routes, access, stop).await;
        Ok(())
    });

    // The data plane's rare events. Diagnostics only: a failure here is logged, and the
    // agent goes on serving.
    let mut stop = stop_rx.clone();
    let events_pin = pin_path.clone();
    sup.spawn("data-plane events", async move {
        let r = match crate::dataplane::events::open(&events_pin) {
            Ok(ring) => crate::dataplane::events::follow(ring, stop.clone()).await,
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = r {
            log::warn!("data-plane events are not logged: {e}");
            let _ = stop.wait_for(|s| *s).await;
        }
        Ok(())
    });

    if let Some(m) = &config.metrics {
        let listener = crate::metrics::bind(m.listen)
            .await
            .with_context(|| format!("{file}: metrics.listen: binding {}", m.listen))?;
        crate::metrics::set_loaded(source.map_or(started_unix, |s| unix_seconds(s.loaded)));
        let src = crate::metrics::Source {
            pin_path: pin_path.clone(),
            control_socket: socket_path.clone(),
            keeper: call_tx.clone(),
        };
        let stop = stop_rx.clone();
        log::info!(
            "metrics on http://{}/metrics (and /healthz, /readyz)",
            m.listen
        );
        sup.spawn("metrics", async move {
            crate::metrics::serve(listener, src, stop).await;
            Ok(())
        });
    }

    let (probe_tx, probes) = mpsc::channel(1024);
    for vip in &applied.vips {
        log::info!(
            "serving VIP {} {}:{} with {} backends; probes: {:?} every {}",
            vip.name,
            vip.address,
            vip.port,
            vip.backends.len(),
            vip.health.kind,
            humantime::format_duration(vip.health.interval)
        );
    }

    let (order_tx, orders) = mpsc::channel::<keeper::Order>(64);
    // Discovery: the keeper says which backends are up, the followers ask them for the
    // apiservers, and the main loop serves what they find (`reload::Serving::discovered`).
    let (reachable_tx, reachable_rx) = watch::channel(discovery::Reachable::new());
    let discovery_status = discovery::Shared::default();
    for (vip, f) in &discovered {
        log::info!(
            "VIP {vip}: serving the {} apiservers the previous agent found (EndpointSlice rv {})",
            f.backends.len(),
            f.resource_version
        );
        discovery::set_status(&discovery_status, vip, |s| {
            s.source = "endpointslice".into();
            s.resource_version = Some(f.resource_version.clone());
            s.updated_unix = Some(f.at_unix);
            s.listed = f.backends.iter().map(|a| a.to_string()).collect();
        });
    }
    let (follow_tx, follow_rx) = watch::channel(discovery::follows(&config));
    let (found_tx, mut found_rx) = mpsc::channel::<discovery::Found>(64);
    sup.spawn(
        "discovery",
        discovery::run(
            follow_rx,
            reachable_rx,
            found_tx,
            discovery_status.clone(),
            stop_rx.clone(),
        ),
    );
    let keeper = keeper::Keeper {
        backends,
        probers: Probers::new(
            probe_tx,
            nic.as_ref()
                .filter(|_| !default_snat.is_unspecified())
                .map(|n| LocalLink {
                    ifname: n.iface.clone(),
                    ifindex: n.ifindex,
                    mac: n.mac,
                    addr: default_snat,
                }),
        ),
        track: config.vrrp.as_ref().map(|v| v.track).unwrap_or_default(),
        penalty: penalty_tx,
        info: AgentInfo {
            pid: std::process::id(),
            version: crate::VERSION.to_string(),
            config: source.map_or(file.clone(), |s| s.path.display().to_string()),
            config_sha256: source.map(|s| s.sha256.clone()).unwrap_or_default(),
            config_loaded_unix: source.map_or(0, |s| unix_seconds(s.loaded)),
            interface: iface.clone(),
            started_unix,
            restarted_by: handed.as_ref().map(|h| h.token.clone()),
            ..Default::default()
        },
        vrrp: config.vrrp.as_ref().map(|_| vrrp_status.clone()),
        nl: nl.clone(),
        ifindex,
        iface: iface.clone(),
        link_events,
        reconcile_every: config.agent.reconcile_interval,
        alive: keeper_alive.clone(),
        reachable: reachable_tx,
        discovery: discovery_status.clone(),
    };
    let stop = stop_rx.clone();
    sup.spawn("keeper", keeper.run(probes, calls, orders, stop));

    // VRRP starts once the data plane is ready to serve the addresses it may take.
    if election.is_none() {
        if let Some(v) = &config.vrrp {
            let t = ties.take().expect("unused");
            election = Some(election::Election::start(v, &nl, &file, t, false).await?);
        }
    }
    if let Some(e) = election.as_mut() {
        e.supervise(&mut sup, vrrp_alive.clone(), stop_rx.clone());
    }

    let mut serving = reload::Serving {
        applied,
        config,
        discovered,
        follow: follow_tx,
        discovery: discovery_status,
        sysctls,
        keeper: order_tx,
        vrrp: election.as_ref().map(|e| e.settings.clone()),
        default_snat,
    };
    let vips: Vec<&str> = serving
        .config
        .vips
        .iter()
        .map(|v| v.name.as_str())
        .collect();
    service::ready(&match &nic {
        Some(_) => format!(
            "serving {} on {iface} (XDP {} mode)",
            vips.join(", "),
            lb_common::xdp_mode::name(mode)
        ),
        None => format!("serving {} (socket mode, no XDP)", vips.join(", ")),
    });
    let ending = loop {
        tokio::select! {
            asked = signals.next() => match asked {
                signals::Asked::Stop(sig) => {
                    service::stopping(&format!("{sig}: giving up the VIP, detaching"));
                    log::info!("{sig}: shutting down");
                    break Ending::Stop;
                }
                signals::Asked::Reload => {
                    log::info!("SIGHUP: reloading {}", serving.path().display());
                    service::reloading();
                    log_reload(&serving.reload(None).await);
                    service::ready(&format!("serving; reloaded {}", serving.path().display()));
                }
            },
            Some(found) = found_rx.recv() => serving.discovered(found).await,
            exit = sup.next_exit() => {
                let exit = exit.unwrap_or(Exit { name: "all".into(), how: "ended".into() });
                service::stopping(&format!("{exit}: giving up the VIP, detaching, exiting non-zero"));
                log::error!(
                    "{exit}: giving up the VIP, detaching and exiting non-zero so the service manager restarts lb-agent"
                );
                break Ending::Failed(exit);
            }
            Some((req, peer, reply)) = agent_calls.recv() => match req {
                Request::Reload { config } => {
                    log::info!("reload asked by {peer}");
                    let path = config.map(PathBuf::from);
                    let r = match &path {
                        Some(p) if !peer.may_read(p) => Err(format!(
                            "{}: {peer} may not read this file, so the agent will not either",
                            p.display()
                        )),
                        _ => {
                            service::reloading();
                            let r = serving.reload(path).await;
                            service::ready(&format!(
                                "serving; reloaded {}",
                                serving.path().display()
                            ));
                            r
                        }
                    };
                    log_reload(&r);
                    let _ = reply.send(match r {
                        Ok(lines) => control::Response::done(lines.join("\n")),
                        Err(e) => control::Response::error(e),
                    });
                }
                Request::Restart { config } => {
                    log::info!("restart asked by {peer}");
                    let path = config.map(PathBuf::from);
                    match path {
                        Some(p) if !peer.may_read(&p) => {
                            let _ = reply.send(control::Response::error(format!(
                                "{}: {peer} may not read this file, so the agent will not either",
                                p.display()
                            )));
                        }
                        path => match restart_plan(&serving, path).await {
                            Err(e) => {
                                log::error!("restart refused, the agent keeps running: {e}");
                                let _ = reply.send(control::Response::error(e));
                            }
                            Ok(plan) => {
                                let _ = reply.send(control::Response {
                                    ok: true,
                                    message: Some(plan.lines.join("\n")),
                                    token: Some(plan.token.clone()),
                                    ..Default::default()
                                });
                                break Ending::Restart(plan);
                            }
                        },
                    }
                }
                _ => {
                    let _ = reply.send(control::Response::error("not the agent's to answer"));
                }
            },
        }
    };
    let reload::Serving {
        mut sysctls,
        discovered,
        ..
    } = serving;
    if let Ending::Restart(plan) = &ending {
        if plan.way == handoff::Way::Keep {
            // Everything stays as it is for the successor: the program forwards, VRRP is
            // abandoned as master (its addresses live on for a second), nothing is undone.
            service::reloading();
            // The answer is on its way to the client: let it out before this process goes.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let master = election.as_ref().is_some_and(|e| e.is_master());
            if let Some(e) = election {
                e.abandon().await;
            }
            let _ = stop_tx.send(true);
            let stuck = sup.finish(Duration::from_secs(2)).await;
            if !stuck.is_empty() {
                log::warn!("tasks that did not stop in time: {}", stuck.join(", "));
            }
            let h = handoff::Handoff::new(plan.token.clone(), master, sysctls.hand_over())
                .with_discovered(discovered);
            h.write(&socket_path)
                .with_context(|| format!("writing {}", handoff::file(&socket_path).display()))?;
            dp.leave();
            log::info!(
                "restart: executing {} run --config {}",
                plan.exe.display(),
                plan.config.display()
            );
            let e = handoff::exec(&plan.exe, &plan.config);
            // The data plane is left pinned and forwarding: the service manager's restart
            // adopts it.
            return Err(anyhow!(
                "restart: executing {}: {e}; exiting so the service manager starts the agent again",
                plan.exe.display()
            ));
        }
    }
    let failure = match &ending {
        Ending::Failed(exit) => Some(exit.clone()),
        _ => None,
    };

    // VRRP first: resign (priority 0) so the backup takes over within its skew time, while
    // this data plane still forwards what reaches it.
    if let Some(e) = election {
        e.resign(failure.as_ref().is_some_and(|f| f.name == "vrrp"), &nl)
            .await;
    }
    // Then stop probes and answering, detach, drop maps and pins, restore sysctls.
    let _ = stop_tx.send(true);
    let stuck = sup.finish(Duration::from_secs(2)).await;
    if !stuck.is_empty() {
        log::warn!("tasks that did not stop in time: {}", stuck.join(", "));
    }
    let _ = std::fs::remove_file(&socket_path);
    dp.detach();
    drop(dp);
    sysctls.restore();
    log::info!(
        "detached{}, pins under {} removed",
        nic.as_ref()
            .map_or(String::new(), |n| format!(" from {}", n.iface)),
        pin_path.display()
    );
    if let Ending::Restart(plan) = ending {
        // The safe path: the VIP went to the peer, the data plane is gone; the new binary
        // starts afresh in this process.
        let h = handoff::Handoff::new(plan.token.clone(), false, Vec::new())
            .with_discovered(discovered);
        h.write(&socket_path)
            .with_context(|| format!("writing {}", handoff::file(&socket_path).display()))?;
        log::info!(
            "restart: executing {} run --config {} (a fresh start)",
            plan.exe.display(),
            plan.config.display()
        );
        let e = handoff::exec(&plan.exe, &plan.config);
        return Err(anyhow!("restart: executing {}: {e}", plan.exe.display()));
    }
    match failure {
        None => Ok(()),
        Some(e) => Err(anyhow!("{e}")),
    }
}

/// How the agent's main loop ended.
enum Ending {
    /// SIGTERM or SIGINT.
    Stop,
    /// A supervised task ended.
    Failed(Exit),
    /// `lb-agent restart`.
    Restart(RestartPlan),
}

/// A restart the agent agreed to.
struct RestartPlan {
    token: String,
    exe: PathBuf,
    config: PathBuf,
    way: handoff::Way,
    /// What the client is told, one line each.
    lines: Vec<String>,
}

/// Checks a restart into the binary on disk with config `path` (or the agent's own file):
/// the binary answers and the config passes `check-config`; says whether the successor can
/// keep everything or must start afresh.
async fn restart_plan(
    serving: &reload::Serving,
    path: Option<PathBuf>,
) -> Result<RestartPlan, String> {
    let config = path.unwrap_or_else(|| serving.path().to_path_buf());
    let exe = handoff::binary_on_disk().map_err(|e| format!("/proc/self/exe: {e}"))?;
    let next = handoff::Version::of(&exe)?;
    let new = crate::host::load_checked(&config)
        .await
        .map_err(|e| e.to_string())?;
    let way = handoff::way(&next, &serving.config, &new);
    let now = handoff::Version::ours();
    let mut lines = vec![format!(
        "restarting lb-agent {} -> {} ({}), config {}",
        now.version,
        next.version,
        exe.display(),
        config.display()
    )];
    match &way {
        handoff::Way::Keep => lines.push(
            "the data plane, its flows and counters, backend health and drains, and VRRP mastership carry over".into(),
        ),
        handoff::Way::Afresh(why) => lines.push(format!(
            "{why}: the data plane cannot carry over; this agent gives up the VIP (the peer LB takes over) and removes it, and the new one starts afresh: connections through this LB are reset"
        )),
    }
    let token = format!(
        "{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    Ok(RestartPlan {
        token,
        exe,
        config,
        way,
        lines,
    })
}
