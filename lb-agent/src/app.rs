//! `lb-agent run`: validate, load, publish, attach, serve until SIGTERM/SIGINT, then undo it
//! all in reverse order. A crash leaves pins and sysctls behind; the next start removes the
//! pins (the XDP link dies with the process).

use std::{
    fs::{File, OpenOptions},
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use lb_common::AgentMeta;
use tokio::{
    net::UnixListener,
    signal::unix::{signal, SignalKind},
    sync::{mpsc, watch},
};

use crate::{
    backends::Backends,
    config::{Config, HealthKind, TrackConfig},
    control::{self, AgentInfo, Request, Response},
    dataplane::{
        loader::Dataplane,
        pinned::PinnedMaps,
        writer::{self, Writer},
    },
    health::{self, probe::Target},
    host::{self, Sysctls},
    netlink, vrrp,
};

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
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening lock file {}", path.display()))?;
        let lock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| {
                anyhow::anyhow!(
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

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<()> {
    host::check_privileges("run")?;
    let iface = config.agent.interface.clone();
    let ifindex = host::ifindex(&iface)
        .with_context(|| format!("{}: agent.interface", config.path.display()))?;
    let default_snat = if config.vips.iter().any(|v| v.snat_address.is_none()) {
        host::primary_ipv4(&iface)?
    } else {
        std::net::Ipv4Addr::UNSPECIFIED
    };
    let mut tls = Vec::new();
    for (i, v) in config.vips.iter().enumerate() {
        tls.push(
            health::tls_config(&v.health)
                .map_err(|e| anyhow::anyhow!("{}: vip[{i}].health.{e}", config.path.display()))?,
        );
    }
    let pin_path = config.agent.pin_path.clone();
    let socket_path = config.agent.control_socket.clone();
    let _lock = InstanceLock::take(&socket_path)?;

    let mut dp = Dataplane::load(&pin_path).context("loading the data plane")?;
    let writer = Writer {
        maps: PinnedMaps::open(&pin_path).context("opening the pinned maps")?,
    };
    let plans = writer::plan(&config, default_snat);
    let mut backends = Backends::install(&config, writer, plans).context("writing the maps")?;

    let mut sysctls = Sysctls::default();
    sysctls.for_dataplane(&iface)?;
    let ranges: Vec<_> = config.vips.iter().map(|v| v.snat_ports).collect();
    sysctls.reserve_ports(&ranges)?;

    let started_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (mac, _) = netlink::link_info(&iface)
        .with_context(|| format!("{}: agent.interface", config.path.display()))?;
    let mut meta = AgentMeta {
        xdp_mode: lb_common::xdp_mode::NONE,
        ifindex,
        pid: std::process::id(),
        _pad: 0,
        started_unix,
        mac,
        _pad2: [0; 2],
    };
    // The MAC before the program runs: it must never act on frames for other hosts.
    backends.writer().set_agent_meta(meta)?;
    let mode = dp
        .attach(&iface, config.agent.xdp_mode)
        .context("attaching the XDP program")?;
    meta.xdp_mode = mode;
    backends.writer().set_agent_meta(meta)?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let _ = std::fs::remove_file(&socket_path);
    let listener = UnixListener::bind(&socket_path)
        .with_context(|| format!("control socket {}", socket_path.display()))?;
    let (call_tx, mut calls) = mpsc::channel::<control::Call>(64);
    tasks.push(tokio::spawn(control::serve(
        listener,
        call_tx,
        stop_rx.clone(),
    )));

    let (probe_tx, mut probes) = mpsc::channel(1024);
    for (v, vip) in config.vips.iter().enumerate() {
        log::info!(
            "serving VIP {} {}:{} with {} backends; probes: {:?} every {}",
            vip.name,
            vip.address,
            vip.port,
            vip.backends.len(),
            vip.health.kind,
            humantime::format_duration(vip.health.interval)
        );
        if vip.health.kind == HealthKind::None {
            continue;
        }
        for (b, be) in vip.backends.iter().enumerate() {
            let target = Target::new(
                SocketAddr::from((be.address, be.port)),
                &vip.health,
                tls[v].clone(),
            );
            tasks.push(tokio::spawn(health::run_prober(
                v,
                b,
                target,
                vip.health.interval,
                probe_tx.clone(),
                stop_rx.clone(),
            )));
        }
    }
    drop(probe_tx);
    log::info!(
        "XDP attached to {iface} in {} mode; maps pinned under {}",
        lb_common::xdp_mode::name(mode),
        pin_path.display()
    );
    // VRRP starts once the data plane is ready to serve the addresses it may take.
    let (penalty_tx, penalty_rx) = watch::channel(0u8);
    let (vrrp_stop_tx, vrrp_stop_rx) = watch::channel(false);
    let vrrp_status: vrrp::Shared = Default::default();
    let mut vrrp_task = None;
    if let Some(v) = &config.vrrp {
        let vifindex = host::ifindex(&v.interface)
            .with_context(|| format!("{}: vrrp.interface", config.path.display()))?;
        let primary = match v.unicast_src {
            Some(a) => a,
            None => host::primary_ipv4(&v.interface)?,
        };
        log::info!(
            "VRRP v{} VRID {} on {} from {primary}: priority {}, adverts every {}, {}",
            v.version,
            v.virtual_router_id,
            v.interface,
            v.priority,
            humantime::format_duration(v.advert_interval),
            if v.unicast_peers.is_empty() {
                "multicast".to_string()
            } else {
                format!("unicast to {:?}", v.unicast_peers)
            }
        );
        vrrp_task = Some(tokio::spawn(vrrp::run(
            v.clone(),
            vifindex,
            primary,
            vrrp_status.clone(),
            penalty_rx,
            vrrp_stop_rx,
        )));
    }
    let track = config.vrrp.as_ref().map(|v| v.track).unwrap_or_default();
    let mut dataplane_check = tokio::time::interval(std::time::Duration::from_secs(1));

    let info = AgentInfo {
        pid: std::process::id(),
        version: format!("lb-agent {}", env!("CARGO_PKG_VERSION")),
        config: config.path.display().to_string(),
        interface: iface.clone(),
        started_unix,
    };

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut dp_attached = true;
    let sig = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            Some(ev) = probes.recv() => {
                if let Err(e) = backends.on_probe(ev) {
                    log::error!("updating the data plane: {e}");
                }
                update_penalty(&penalty_tx, &track, &backends, dp_attached);
            }
            _ = dataplane_check.tick() => {
                let attached = matches!(netlink::xdp_prog_id(ifindex), Ok(Some(_)));
                if attached != dp_attached {
                    if attached {
                        log::info!("XDP program attached to {iface} again");
                    } else {
                        log::error!("the XDP program is no longer attached to {iface}");
                    }
                    dp_attached = attached;
                }
                update_penalty(&penalty_tx, &track, &backends, dp_attached);
            }
            Some((req, reply)) = calls.recv() => {
                let resp = match req {
                    Request::Status => Response {
                        ok: true,
                        agent: Some(info.clone()),
                        health: Some(backends.report()),
                        vrrp: config.vrrp.as_ref().map(|_| vrrp_status.lock().unwrap().clone()),
                        ..Default::default()
                    },
                    Request::Drain { vip, backend } => drain_answer(backends.set_drain(&vip, &backend, true)),
                    Request::Undrain { vip, backend } => drain_answer(backends.set_drain(&vip, &backend, false)),
                };
                let _ = reply.send(resp);
            }
        }
    };
    log::info!("{sig}: shutting down");

    // Reverse order of start. VRRP first: resign (priority 0) so the backup takes over
    // within its skew time, while this data plane still forwards what reaches it.
    if let Some(task) = vrrp_task {
        let _ = vrrp_stop_tx.send(true);
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => log::error!("VRRP: {e}"),
            Err(e) => log::error!("VRRP task: {e}"),
        }
        if let Some(v) = &config.vrrp {
            let grace = (v.advert_interval * 2).clamp(
                std::time::Duration::from_millis(50),
                std::time::Duration::from_secs(1),
            );
            tokio::time::sleep(grace).await;
        }
    }
    // Then stop probes and answering, detach, drop maps and pins, restore sysctls.
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    let _ = std::fs::remove_file(&socket_path);
    dp.detach();
    drop(backends);
    drop(dp);
    sysctls.restore();
    log::info!(
        "detached from {iface}, pins under {} removed",
        pin_path.display()
    );
    Ok(())
}

/// Recomputes how much tracking lowers the VRRP priority.
fn update_penalty(
    tx: &watch::Sender<u8>,
    track: &TrackConfig,
    backends: &Backends,
    attached: bool,
) {
    let mut p: u16 = 0;
    if backends.some_vip_without_healthy_backend() {
        p += track.no_healthy_backend as u16;
    }
    if !attached {
        p += track.dataplane_down as u16;
    }
    let p = p.min(254) as u8;
    tx.send_if_modified(|old| {
        let changed = *old != p;
        *old = p;
        changed
    });
}

fn drain_answer(r: Result<String, String>) -> Response {
    match r {
        Ok(m) => Response {
            ok: true,
            message: Some(m),
            ..Default::default()
        },
        Err(e) => Response::error(e),
    }
}
