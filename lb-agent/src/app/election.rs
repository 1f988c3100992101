//! VRRP as the agent runs it: started once the data plane serves (or at once, resuming as
//! master after `lb-agent restart`), supervised, and at the end either resigned (a stop) or
//! abandoned as it is (a hand-over to the next agent).

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{anyhow, Context, Result};
use tokio::sync::watch;

use super::Supervisor;
use crate::{
    config::VrrpConfig,
    heartbeat::Heartbeat,
    netlink::Netlink,
    vrrp::{self, VrrpThread},
};

/// The VRRP thread's heartbeat may be this old before it counts as wedged (at least).
const VRRP_STALE_MIN: Duration = Duration::from_secs(2);

/// A running VRRP instance, kept for the shutdown.
pub struct Election {
    thread: VrrpThread,
    cfg: VrrpConfig,
    ifindex: u32,
    primary: Ipv4Addr,
    status: vrrp::Shared,
    /// The config as reloads change it.
    pub settings: watch::Sender<VrrpConfig>,
}

/// What ties the instance to the rest of the agent (see `vrrp::Links`).
pub struct Ties {
    pub status: vrrp::Shared,
    pub penalty: watch::Receiver<u8>,
    pub vrrp_alive: Heartbeat,
    pub keeper_alive: Heartbeat,
}

impl Election {
    /// Starts the instance `v` describes (`file` names the config in errors); `resume`
    /// makes it master at once (see `VrrpThread::spawn`).
    pub async fn start(
        v: &VrrpConfig,
        nl: &Netlink,
        file: &str,
        ties: Ties,
        resume: bool,
    ) -> Result<Self> {
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
        // The heartbeat was made at the agent's start, which may be seconds ago (loading
        // the data plane): the watchdog must count from now.
        ties.vrrp_alive.beat();
        let (settings, settings_rx) = watch::channel(v.clone());
        let thread = VrrpThread::spawn(
            v.clone(),
            vlink.index,
            primary,
            vrrp::Links {
                status: ties.status.clone(),
                penalty: ties.penalty,
                vrrp_alive: ties.vrrp_alive,
                keeper_alive: ties.keeper_alive,
                settings: settings_rx,
            },
            resume,
        )
        .await?;
        Ok(Self {
            thread,
            cfg: v.clone(),
            ifindex: vlink.index,
            primary,
            status: ties.status,
            settings,
        })
    }

    /// Puts the thread under `sup`: its end is a failure, and so is its heartbeat
    /// (`alive`) going stale while it has not ended (a deadlock, a call that never returns:
    /// its addresses would expire and nobody would notice).
    pub fn supervise(
        &mut self,
        sup: &mut Supervisor,
        alive: Heartbeat,
        stop: watch::Receiver<bool>,
    ) {
        let done = self.thread.take_done().expect("fresh thread");
        sup.spawn("vrrp", async move {
            match done.await {
                Ok(r) => r,
                Err(_) => Err("the VRRP thread vanished".into()),
            }
        });
        let stale = (self.cfg.advert_interval * 5).max(VRRP_STALE_MIN);
        sup.spawn("vrrp watchdog", watch_vrrp(alive, stale, stop));
    }

    /// True when the instance is master now.
    pub fn is_master(&self) -> bool {
        vrrp::lock(&self.status).state == "master"
    }

    /// Resigns (priority 0) so the backup takes over within its skew time, then waits a
    /// grace period while this data plane still forwards what reaches it. `failed`: the
    /// thread itself died (the supervisor resigns for it with sockets of its own).
    pub async fn resign(mut self, failed: bool, nl: &Netlink) {
        if failed {
            self.thread.join(Duration::from_secs(1)).await;
        } else {
            self.thread.stop();
            self.thread.join(Duration::from_secs(4)).await;
        }
        // Only an orderly end resigned; any other end leaves it to us.
        if !self.thread.resigned() {
            vrrp::resign_after_failure(&self.cfg, self.ifindex, self.primary, &self.status, nl)
                .await;
        }
        let grace =
            (self.cfg.advert_interval * 2).clamp(Duration::from_millis(50), Duration::from_secs(1));
        tokio::time::sleep(grace).await;
    }

    /// Ends the instance as it is, without resigning: the next agent resumes it.
    pub async fn abandon(mut self) {
        self.thread.abandon();
        self.thread.join(Duration::from_secs(2)).await;
    }
}

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
