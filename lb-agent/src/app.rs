//! `lb-agent run`: validate, load, publish, attach, serve until SIGTERM/SIGINT, then undo it
//! all in reverse order. A crash leaves pins and sysctls behind; the next start removes the
//! pins (the XDP link dies with the process).

use std::{
    fs::{File, OpenOptions},
    path::{Path, PathBuf},
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use lb_common::AgentMeta;
use tokio::{
    net::UnixListener,
    signal::unix::{signal, SignalKind},
    sync::{watch, Mutex},
};

use crate::{
    config::Config,
    control::{self, AgentInfo},
    dataplane::{
        loader::Dataplane,
        pinned::PinnedMaps,
        writer::{self, Writer},
    },
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
    let pin_path = config.agent.pin_path.clone();
    let socket_path = config.agent.control_socket.clone();
    let _lock = InstanceLock::take(&socket_path)?;

    let mut dp = Dataplane::load(&pin_path).context("loading the data plane")?;
    let mut writer = Writer {
        maps: PinnedMaps::open(&pin_path).context("opening the pinned maps")?,
    };
    let mut vips = writer::plan(&config, default_snat);
    writer.install(&mut vips).context("writing the maps")?;

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
    writer.set_agent_meta(AgentMeta {
        xdp_mode: mode,
        ifindex,
        pid: std::process::id(),
        _pad: 0,
        started_unix,
    })?;

    let _ = std::fs::remove_file(&socket_path);
    let listener = UnixListener::bind(&socket_path)
        .with_context(|| format!("control socket {}", socket_path.display()))?;
    let info = Arc::new(Mutex::new(AgentInfo {
        pid: std::process::id(),
        version: format!("lb-agent {}", env!("CARGO_PKG_VERSION")),
        config: config.path.display().to_string(),
        interface: iface.clone(),
        started_unix,
    }));
    let (stop_tx, stop_rx) = watch::channel(false);
    let control_task = tokio::spawn(control::serve(listener, info, stop_rx));

    for v in &vips {
        log::info!(
            "serving VIP {} {}:{} with {} backends",
            v.name,
            std::net::Ipv4Addr::from(u32::from_be(v.key.addr)),
            u16::from_be(v.key.port),
            v.backends.len()
        );
    }
    log::info!(
        "XDP attached to {iface} in {} mode; maps pinned under {}",
        lb_common::xdp_mode::name(mode),
        pin_path.display()
    );

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let sig = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    log::info!("{sig}: shutting down");

    // Reverse order of start: stop answering, detach, drop maps and pins, restore sysctls.
    let _ = stop_tx.send(true);
    let _ = control_task.await;
    let _ = std::fs::remove_file(&socket_path);
    dp.detach();
    drop(writer);
    drop(dp);
    sysctls.restore();
    log::info!(
        "detached from {iface}, pins under {} removed",
        pin_path.display()
    );
    Ok(())
}
