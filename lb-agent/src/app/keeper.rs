//! The keeper: the one task that owns the backends' state and the map writer. It applies
//! probe results and operator commands, retries map writes that failed, reconciles the maps
//! with what the agent intends, watches that the XDP program stays attached, answers status,
//! and tells VRRP how much tracking lowers the priority.

use std::time::Duration;

use tokio::{
    sync::{mpsc, watch},
    time::{sleep_until, Instant, MissedTickBehavior},
};

use crate::{
    backends::Backends,
    config::TrackConfig,
    control::{AgentInfo, Call, Request, Response},
    health::ProbeEvent,
    heartbeat::Heartbeat,
    netlink::Netlink,
    vrrp,
};

/// First retry of a failed map write; doubled on each failure up to the reconcile interval.
const RETRY_FIRST: Duration = Duration::from_millis(100);
/// How often the keeper checks that the XDP program is still attached.
const WATCHDOG_EVERY: Duration = Duration::from_secs(1);

/// Everything the keeper owns.
pub struct Keeper {
    pub backends: Backends,
    pub track: TrackConfig,
    pub penalty: watch::Sender<u8>,
    pub info: AgentInfo,
    pub vrrp: Option<vrrp::Shared>,
    pub nl: Netlink,
    pub ifindex: u32,
    pub iface: String,
    pub reconcile_every: Duration,
    /// Beaten on every turn of the loop; VRRP resigns when it goes stale.
    pub alive: Heartbeat,
}

impl Keeper {
    /// Runs until `stop` turns true.
    pub async fn run(
        mut self,
        mut probes: mpsc::Receiver<ProbeEvent>,
        mut calls: mpsc::Receiver<Call>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), String> {
        let mut reconcile =
            tokio::time::interval_at(Instant::now() + self.reconcile_every, self.reconcile_every);
        reconcile.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut watchdog = tokio::time::interval(WATCHDOG_EVERY);
        watchdog.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut retry_at: Option<Instant> = None;
        let mut backoff = RETRY_FIRST;
        let mut attached = true;
        self.update_penalty(attached);
        loop {
            self.alive.beat();
            fail::fail_point!("keeper-loop", |_| Err(
                "injected failure (failpoint keeper-loop)".into()
            ));
            tokio::select! {
                _ = stop.changed() => return Ok(()),
                Some(ev) = probes.recv() => {
                    self.backends.on_probe(ev);
                    self.update_penalty(attached);
                }
                Some((req, peer, reply)) = calls.recv() => {
                    let resp = match req {
                        Request::Status => Response {
                            ok: true,
                            agent: Some(self.agent_info()),
                            health: Some(self.backends.report()),
                            vrrp: self.vrrp.as_ref().map(|v| vrrp::lock(v).clone()),
                            ..Default::default()
                        },
                        Request::Drain { vip, backend } => answer(self.backends.set_drain(&vip, &backend, true, &peer)),
                        Request::Undrain { vip, backend } => answer(self.backends.set_drain(&vip, &backend, false, &peer)),
                        Request::Failpoint { .. } => Response::error("handled by the control socket"),
                    };
                    self.update_penalty(attached);
                    let _ = reply.send(resp);
                }
                _ = reconcile.tick() => self.reconcile(false, &mut retry_at, &mut backoff),
                _ = sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => {
                    retry_at = None;
                    // After a failed write, look at everything.
                    self.reconcile(true, &mut retry_at, &mut backoff);
                }
                _ = watchdog.tick() => {
                    match self.nl.link(self.ifindex).await {
                        Ok(l) => {
                            let now = l.xdp_prog_id.is_some();
                            if now != attached {
                                if now {
                                    log::info!("XDP program attached to {} again", self.iface);
                                } else {
                                    log::error!("the XDP program is no longer attached to {}", self.iface);
                                }
                                attached = now;
                            }
                        }
                        Err(e) => log::warn!("watchdog: reading {}: {e}", self.iface),
                    }
                    self.update_penalty(attached);
                }
            }
            // A write that failed just now is retried soon, not at the next periodic pass.
            if self.backends.take_write_failed() && retry_at.is_none() {
                retry_at = Some(Instant::now() + backoff);
            }
        }
    }

    /// Compares the maps with the plan and repairs them; on failure, tries again later.
    fn reconcile(&mut self, full: bool, retry_at: &mut Option<Instant>, backoff: &mut Duration) {
        match self.backends.reconcile(full) {
            Ok(r) => {
                *backoff = RETRY_FIRST;
                *retry_at = None;
                if !r.repaired.is_empty() {
                    log::warn!(
                        "the data plane's maps differed from what the agent intends; repaired {} entries: {}",
                        r.repaired.len(),
                        r.repaired.join("; ")
                    );
                }
            }
            Err(e) => {
                log::error!(
                    "reconciling the maps: {e}; trying again in {}ms",
                    backoff.as_millis()
                );
                *retry_at = Some(Instant::now() + *backoff);
                *backoff = (*backoff * 2).min(self.reconcile_every);
            }
        }
    }

    fn agent_info(&self) -> AgentInfo {
        let w = self.backends.writer_ref();
        AgentInfo {
            map_repairs: w.repairs,
            last_map_repair: w.last_repair.clone(),
            map_write_failures: w.write_failures,
            maps_behind: self.backends.maps_behind(),
            ..self.info.clone()
        }
    }

    /// Recomputes how much tracking lowers the VRRP priority.
    fn update_penalty(&self, attached: bool) {
        let mut p: u16 = 0;
        if self.backends.some_vip_without_healthy_backend() {
            p += self.track.no_healthy_backend as u16;
        }
        if !attached {
            p += self.track.dataplane_down as u16;
        }
        let p = p.min(254) as u8;
        self.penalty.send_if_modified(|old| {
            let changed = *old != p;
            *old = p;
            changed
        });
    }
}

fn answer(r: Result<String, String>) -> Response {
    match r {
        Ok(m) => Response::done(m),
        Err(e) => Response::error(e),
    }
}
