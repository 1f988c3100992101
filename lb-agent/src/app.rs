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
    config::{Config, HealthKind},
    control::{self, AgentInfo, Request, Response},
    dataplane::{
        loader::Dataplane,
        pinned::PinnedMaps,
        writer::{self, Writer},
    },
    health::{self, probe::Target},
    host::{self, Sysctls},
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

    let mode = dp
        .attach(&iface, config.agent.xdp_mode)
        .context("attaching the XDP program")?;
    let started_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    backends.writer().set_agent_meta(AgentMeta {
        xdp_mode: mode,
        ifindex,
        pid: std::process::id(),
        _pad: 0,
        started_unix,
    })?;

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
    let info = AgentInfo {
        pid: std::process::id(),
        version: format!("lb-agent {}", env!("CARGO_PKG_VERSION")),
        config: config.path.display().to_string(),
        interface: iface.clone(),
        started_unix,
    };

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let sig = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            Some(ev) = probes.recv() => {
                if let Err(e) = backends.on_probe(ev) {
                    log::error!("updating the data plane: {e}");
                }
            }
            Some((req, reply)) = calls.recv() => {
                let resp = match req {
                    Request::Status => Response {
                        ok: true,
                        agent: Some(info.clone()),
                        health: Some(backends.report()),
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

    // Reverse order of start: stop probes and answering, detach, drop maps and pins,
    // restore sysctls.
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
