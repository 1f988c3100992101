//! `lb-agent run`: install the signal handlers, check privileges, load and publish the data
//! plane, attach, start the supervised tasks, and serve until SIGTERM/SIGINT or until a task
//! fails. Either way the agent then gives up the VIP first (priority 0), keeps forwarding
//! for a moment while the backup takes over, and undoes the rest in reverse order; a failure
//! makes it exit non-zero so the service manager restarts it.
//!
//! `signals`: the handlers. `supervisor`: the named tasks and how they end. `keeper`: the task
//! that owns backend state and the maps. `service`: telling the service manager (systemd).

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
    config::{Config, XdpModeSetting},
    control::{self, Access, AgentInfo, Request},
    dataplane::{
        generic,
        loader::{Dataplane, Start},
        pinned::PinnedMaps,
        writer::Writer,
        DataplaneError,
    },
    health::probers::Probers,
    heartbeat::Heartbeat,
    host::{self, Sysctls},
    netlink::{self, Netlink},
    vrrp::{self, VrrpThread},
};
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

/// What VRRP runs with, kept for the shutdown.
struct VrrpRun {
    thread: VrrpThread,
    cfg: crate::config::VrrpConfig,
    ifindex: u32,
    primary: Ipv4Addr,
    status: vrrp::Shared,
}

/// The VRRP thread's heartbeat may be this old before it counts as wedged (at least).
const VRRP_STALE_MIN: Duration = Duration::from_secs(2);

/// Fails when the VRRP thread's heartbeat is older than `stale`.
async fn watch_vrrp(
    alive: Heartbeat,
    stale: Duration,
    mut stop: watch::Receiver<bool>,
) -> Result<(), String> {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            _ = tick.tick() => {
                if alive.age() > stale {
                    return Err(format!(
                        "the VRRP thread has made no progress for {:.1}s",
                        alive.age().as_secs_f64()
                    ));
                }
            }
        }
    }
}

/// Logs what a reload did, or why it was refused.
fn log_reload(r: &Result<Vec<String>, String>) {
    match r {
        Ok(lines) => {
            for l in lines {
                log::info!("reload: {l}");
            }
        }
        Err(e) => log::error!("reload refused, the agent keeps its config: {e}"),
    }
}

/// `t` in whole seconds since the Unix epoch (0 before it).
fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
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
            realtime: config.vrrp.as_ref().is_some_and(|v| v.rt_priority > 0),
            group: config.agent.control_socket_group.is_some(),
        },
    )?;
    let nl = Netlink::connect().context("opening rtnetlink")?;
    let iface = config.agent.interface.clone();
    let link = nl
        .link_by_name(&iface)
        .await
        .with_context(|| format!("{file}: agent.interface"))?;
    let ifindex = link.index;
    let mac = link
        .mac
        .ok_or_else(|| anyhow!("{file}: agent.interface: {iface} has no MAC address"))?;
    // Before anything is loaded: a refusal leaves nothing behind.
    let links = nl.links().await.context("listing the links")?;
    let generic_hazard = generic::generic_hazard(&links, ifindex);
    match (config.agent.xdp_mode, &generic_hazard) {
        (XdpModeSetting::Generic, Some(h)) => {
            return Err(anyhow!(
                "{file}: agent.xdp_mode: {}",
                generic::refusal(&iface, h)
            ))
        }
        (XdpModeSetting::Generic, None) => log::warn!(
            "agent.xdp_mode = \"generic\" on {iface}: generic (skb) mode is for testing and for NICs whose driver has no XDP support; it is much slower than native mode"
        ),
        _ => {}
    }
    // Also when every VIP names its SNAT address: a reload may add one that does not.
    let default_snat = nl
        .primary_ipv4(ifindex)
        .await?
        .unwrap_or(Ipv4Addr::UNSPECIFIED);
    if let Some(i) = config.vips.iter().position(|v| v.snat_address.is_none()) {
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

    let (mut dp, start) = Dataplane::load_or_adopt(&pin_path, config.agent.max_flows, ifindex)
        .context("loading the data plane")?;
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
                Backends::adopt(&config, writer, default_snat).context("taking over the maps")?;
            for n in notes {
                log::info!("adoption: {n}");
            }
            b
        } else {
            Backends::install(&config, writer, default_snat).context("writing the maps")?
        };
        let mut sysctls = Sysctls::default();
        sysctls.for_dataplane(&iface)?;
        let ranges: Vec<_> = config.vips.iter().map(|v| v.snat_ports).collect();
        sysctls.reserve_ports(&ranges)?;

        let meta = AgentMeta {
            // An adopted link keeps its mode: a crash before attach must leave it adoptable.
            xdp_mode: adopted.unwrap_or(lb_common::xdp_mode::NONE),
            ifindex,
            pid: std::process::id(),
            layout_version: lb_common::MAP_LAYOUT_VERSION,
            started_unix,
            mac,
            _pad2: [0; 2],
        };
        // The MAC before the program runs: it must never act on frames for other hosts.
        backends.writer().set_agent_meta(meta)?;
        // Tagged frames leave by XDP only towards VLANs the program knows of. Subscribed before
        // the first read, so a VLAN device added in between is not missed; the keeper follows.
        let link_events = netlink::link_events().context("subscribing to link events")?;
        let vlans = nl.vlans(ifindex).await?;
        for change in backends
            .writer()
            .set_vlans(&keeper::vlan_devs(ifindex, &vlans))?
        {
            log::info!("VLAN devices on {iface}: {change}");
        }
        let mode = dp
            .attach(&iface, config.agent.xdp_mode, generic_hazard.as_deref())
            .map_err(|e| match e {
                DataplaneError::GenericRefused { .. } | DataplaneError::NoFallback { .. } => {
                    anyhow!("{file}: {e}")
                }
                e => anyhow::Error::new(e).context("attaching the XDP program"),
            })?;
        Ok::<_, anyhow::Error>((backends, sysctls, meta, link_events, mode))
    }
    .await;
    let (mut backends, sysctls, mut meta, link_events, mode) = match prepared {
        Ok(p) => p,
        Err(e) => {
            if adopted.is_some() {
                dp.leave();
                log::error!("left the adopted data plane forwarding as it was");
            }
            return Err(e);
        }
    };
    meta.xdp_mode = mode;
    backends.writer().set_agent_meta(meta)?;
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
        keeper: call_tx,
    };
    let stop = stop_rx.clone();
    sup.spawn("control socket", async move {
        control::serve(listener, routes, access, stop).await;
        Ok(())
    });

    let (probe_tx, probes) = mpsc::channel(1024);
    for vip in &config.vips {
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

    let (penalty_tx, penalty_rx) = watch::channel(0u8);
    let vrrp_status: vrrp::Shared = Default::default();
    let keeper_alive = Heartbeat::default();
    let vrrp_alive = Heartbeat::default();
    let (order_tx, orders) = mpsc::channel::<keeper::Order>(64);
    let keeper = keeper::Keeper {
        backends,
        probers: Probers::new(probe_tx),
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
            ..Default::default()
        },
        vrrp: config.vrrp.as_ref().map(|_| vrrp_status.clone()),
        nl: nl.clone(),
        ifindex,
        iface: iface.clone(),
        link_events: Some(link_events),
        reconcile_every: config.agent.reconcile_interval,
        alive: keeper_alive.clone(),
    };
    let stop = stop_rx.clone();
    sup.spawn("keeper", keeper.run(probes, calls, orders, stop));

    // VRRP starts once the data plane is ready to serve the addresses it may take.
    let mut vrrp_run = None;
    let mut vrrp_settings = None;
    if let Some(v) = &config.vrrp {
        let vlink = nl
            .link_by_name(&v.interface)
            .await
            .with_context(|| format!("{file}: vrrp.interface"))?;
        let primary = match v.unicast_src {
            Some(a) => a,
            None => nl.primary_ipv4(vlink.index).await?.ok_or_else(|| {
                anyhow!(
                    "{file}: vrrp.unicast_src: not set, and {} has no IPv4 address to send adverts from",
                    v.interface
                )
            })?,
        };
        log::info!(
            "VRRP v{} VRID {} ({}) on {} from {primary}: priority {}, adverts every {}, {}{}",
            v.version,
            v.virtual_router_id,
            v.name,
            v.interface,
            v.priority,
            humantime::format_duration(v.advert_interval),
            if v.unicast_peers.is_empty() {
                "multicast".to_string()
            } else {
                format!("unicast to {:?}", v.unicast_peers)
            },
            if v.rt_priority > 0 {
                format!(", SCHED_RR priority {}", v.rt_priority)
            } else {
                String::new()
            }
        );
        let mut thread = VrrpThread::spawn(
            v.clone(),
            vlink.index,
            primary,
            vrrp::Links {
                status: vrrp_status.clone(),
                penalty: penalty_rx,
                vrrp_alive: vrrp_alive.clone(),
                keeper_alive: keeper_alive.clone(),
                settings: {
                    let (tx, rx) = watch::channel(v.clone());
                    vrrp_settings = Some(tx);
                    rx
                },
            },
        )
        .await?;
        let done = thread.take_done().expect("fresh thread");
        sup.spawn("vrrp", async move {
            match done.await {
                Ok(r) => r,
                Err(_) => Err("the VRRP thread vanished".into()),
            }
        });
        // A VRRP thread that stops making progress without ending (a deadlock, a call that
        // never returns) is a failure too: its addresses expire, and nobody would notice.
        let stale = (v.advert_interval * 5).max(VRRP_STALE_MIN);
        let stop = stop_rx.clone();
        sup.spawn("vrrp watchdog", watch_vrrp(vrrp_alive, stale, stop));
        vrrp_run = Some(VrrpRun {
            thread,
            cfg: v.clone(),
            ifindex: vlink.index,
            primary,
            status: vrrp_status.clone(),
        });
    }

    let mut serving = reload::Serving {
        config,
        sysctls,
        keeper: order_tx,
        vrrp: vrrp_settings,
        default_snat,
    };
    let vips: Vec<&str> = serving
        .config
        .vips
        .iter()
        .map(|v| v.name.as_str())
        .collect();
    service::ready(&format!(
        "serving {} on {iface} (XDP {} mode)",
        vips.join(", "),
        lb_common::xdp_mode::name(mode)
    ));
    let failure = loop {
        tokio::select! {
            asked = signals.next() => match asked {
                signals::Asked::Stop(sig) => {
                    service::stopping(&format!("{sig}: giving up the VIP, detaching"));
                    log::info!("{sig}: shutting down");
                    break None;
                }
                signals::Asked::Reload => {
                    log::info!("SIGHUP: reloading {}", serving.path().display());
                    service::reloading();
                    log_reload(&serving.reload(None).await);
                    service::ready(&format!("serving; reloaded {}", serving.path().display()));
                }
            },
            exit = sup.next_exit() => {
                let exit = exit.unwrap_or(Exit { name: "all".into(), how: "ended".into() });
                service::stopping(&format!("{exit}: giving up the VIP, detaching, exiting non-zero"));
                log::error!(
                    "{exit}: giving up the VIP, detaching and exiting non-zero so the service manager restarts lb-agent"
                );
                break Some(exit);
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
                _ => {
                    let _ = reply.send(control::Response::error("not the agent's to answer"));
                }
            },
        }
    };
    let reload::Serving { mut sysctls, .. } = serving;

    // VRRP first: resign (priority 0) so the backup takes over within its skew time, while
    // this data plane still forwards what reaches it.
    if let Some(mut v) = vrrp_run {
        let vrrp_failed = failure.as_ref().is_some_and(|f| f.name == "vrrp");
        if vrrp_failed {
            v.thread.join(Duration::from_secs(1)).await;
        } else {
            v.thread.stop();
            v.thread.join(Duration::from_secs(4)).await;
        }
        // Only an orderly end resigned; any other end leaves it to us.
        if !v.thread.resigned() {
            vrrp::resign_after_failure(&v.cfg, v.ifindex, v.primary, &v.status, &nl).await;
        }
        let grace =
            (v.cfg.advert_interval * 2).clamp(Duration::from_millis(50), Duration::from_secs(1));
        tokio::time::sleep(grace).await;
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
        "detached from {iface}, pins under {} removed",
        pin_path.display()
    );
    match failure {
        None => Ok(()),
        Some(e) => Err(anyhow!("{e}")),
    }
}
