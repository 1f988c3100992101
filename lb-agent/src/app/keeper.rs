//! The keeper: the one task that owns the backends' state and the map writer. It applies
//! probe results and operator commands, retries map writes that failed, reconciles the maps
//! with what the agent intends, keeps VLAN_DEVS in step with the VLAN devices on the
//! interface, watches that the XDP program stays attached, answers status, and tells VRRP
//! how much tracking lowers the priority.

use std::time::Duration;

use futures_util::StreamExt;
use lb_common::VlanDev;
use tokio::{
    sync::{mpsc, oneshot, watch},
    time::{sleep_until, Instant, Interval, MissedTickBehavior},
};

use crate::{
    backends::Backends,
    config::{Config, TrackConfig},
    control::{AgentInfo, Call, Request, Response},
    discovery,
    health::{probers::Probers, ProbeEvent},
    heartbeat::Heartbeat,
    netlink::{Events, Netlink},
    vrrp,
};

/// First retry of a failed map write; doubled on each failure up to the reconcile interval.
const RETRY_FIRST: Duration = Duration::from_millis(100);
/// How often the keeper checks that the XDP program is still attached.
const WATCHDOG_EVERY: Duration = Duration::from_secs(1);
/// How long after a link event VLAN_DEVS is refreshed: a device being set up is announced
/// several times in a row (created, renamed, brought up), and one read after them is enough.
const VLAN_SETTLE: Duration = Duration::from_millis(200);
/// When a VLAN_DEVS refresh failed, the next try.
const VLAN_RETRY: Duration = Duration::from_secs(1);
/// Longest wait for the list of links.
const VLAN_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// VLAN_DEVS entries for the VLAN devices (ifindex, VLAN id) stacked on link `parent`.
pub fn vlan_devs(parent: u32, vlans: &[(u32, u16)]) -> Vec<(u32, VlanDev)> {
    vlans
        .iter()
        .map(|&(index, vid)| {
            (
                index,
                VlanDev {
                    parent,
                    // As the tag carries it, so the program compares and sets it unconverted.
                    vid: vid.to_be(),
                    _pad: 0,
                },
            )
        })
        .collect()
}

/// What the agent's main loop asks of the keeper.
pub enum Order {
    /// Serve this config from now on (checked and found changeable in place); the answer
    /// lists what that did beyond the config's own differences.
    Reload {
        config: Box<Config>,
        reply: oneshot::Sender<Result<Vec<String>, String>>,
    },
}

fn every(period: Duration) -> Interval {
    let mut i = tokio::time::interval_at(Instant::now() + period, period);
    i.set_missed_tick_behavior(MissedTickBehavior::Delay);
    i
}

/// Everything the keeper owns.
pub struct Keeper {
    pub backends: Backends,
    /// One prober per backend of the plan, kept in step with it.
    pub probers: Probers,
    pub track: TrackConfig,
    pub penalty: watch::Sender<u8>,
    pub info: AgentInfo,
    pub vrrp: Option<vrrp::Shared>,
    pub nl: Netlink,
    /// The XDP program's interface; 0 (and "") when every VIP is in socket mode.
    pub ifindex: u32,
    pub iface: String,
    pub reconcile_every: Duration,
    /// Beaten on every turn of the loop; VRRP resigns when it goes stale.
    pub alive: Heartbeat,
    /// Link events (`netlink::link_events`): any of them re-reads the VLAN devices.
    pub link_events: Option<Events>,
    /// Where the keeper publishes which backends are up, for discovery to ask.
    pub reachable: watch::Sender<discovery::Reachable>,
    /// Discovery's status, shown by status.
    pub discovery: discovery::Shared,
}

impl Keeper {
    /// Runs until `stop` turns true.
    pub async fn run(
        mut self,
        mut probes: mpsc::Receiver<ProbeEvent>,
        mut calls: mpsc::Receiver<Call>,
        mut orders: mpsc::Receiver<Order>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), String> {
        self.probers
            .sync(&self.backends.probe_specs())
            .map_err(|e| e.to_string())?;
        let mut reconcile = every(self.reconcile_every);
        let mut watchdog = tokio::time::interval(WATCHDOG_EVERY);
        watchdog.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut retry_at: Option<Instant> = None;
        let mut backoff = RETRY_FIRST;
        let mut attached = true;
        let mut link_events = self.link_events.take();
        let mut vlans_at: Option<Instant> = None;
        self.update_penalty(attached);
        loop {
            self.alive.beat();
            fail::fail_point!("keeper-loop", |_| Err(
                "injected failure (failpoint keeper-loop)".into()
            ));
            tokio::select! {
                _ = stop.changed() => return Ok(()),
                failure = self.probers.failure() => return Err(failure),
                Some(ev) = probes.recv() => {
                    if self.probers.is_current(&ev) {
                        self.backends.on_probe(ev);
                        self.update_penalty(attached);
                    }
                }
                Some(Order::Reload { config, reply }) = orders.recv() => {
                    let r = self.reload(&config, &mut reconcile);
                    self.update_penalty(attached);
                    let _ = reply.send(r);
                }
                Some((req, peer, reply)) = calls.recv() => {
                    let resp = self.answer(req, &peer);
                    self.update_penalty(attached);
                    let _ = reply.send(resp);
                }
                ev = async { link_events.as_mut()?.next().await }, if link_events.is_some() => {
                    match ev {
                        Some(_) => {
                            vlans_at.get_or_insert_with(|| Instant::now() + VLAN_SETTLE);
                        }
                        None => {
                            log::warn!(
                                "link events stopped; VLAN devices on {} are re-read every {} only",
                                self.iface,
                                humantime::format_duration(self.reconcile_every)
                            );
                            link_events = None;
                        }
                    }
                }
                _ = sleep_until(vlans_at.unwrap_or_else(Instant::now)), if vlans_at.is_some() => {
                    vlans_at = (!self.refresh_vlans().await).then(|| Instant::now() + VLAN_RETRY);
                }
                _ = reconcile.tick() => {
                    self.reconcile(false, &mut retry_at, &mut backoff);
                    match self.backends.release_removed() {
                        Ok(ended) if !ended.is_empty() => {
                            for e in ended {
                                log::info!("{e}");
                            }
                            // Their probers go too.
                            if let Err(e) = self.probers.sync(&self.backends.probe_specs()) {
                                log::error!("{e}");
                            }
                        }
                        Ok(_) => {}
                        Err(e) => log::error!("releasing removed backends: {e}"),
                    }
                    // Link events can be lost (a full socket buffer): the VLANs are read
                    // here too.
                    self.refresh_vlans().await;
                }
                _ = sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => {
                    retry_at = None;
                    // After a failed write, look at everything.
                    self.reconcile(true, &mut retry_at, &mut backoff);
                }
                _ = watchdog.tick(), if self.ifindex != 0 => {
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
            let up = self.backends.reachable();
            self.reachable.send_if_modified(|r| {
                let changed = *r != up;
                if changed {
                    *r = up;
                }
                changed
            });
        }
    }

    /// Answers a control socket request.
    fn answer(&mut self, req: Request, peer: &crate::control::Peer) -> Response {
        match req {
            Request::Status => Response {
                ok: true,
                agent: Some(self.agent_info()),
                health: Some(self.backends.report()),
                vrrp: self.vrrp.as_ref().map(|v| vrrp::lock(v).clone()),
                discovery: Some(
                    self.discovery
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .values()
                        .cloned()
                        .collect(),
                ),
                ..Default::default()
            },
            Request::Drain { vip, backend } => {
                answer(self.backends.set_drain(&vip, &backend, true, peer))
            }
            Request::Undrain { vip, backend } => {
                answer(self.backends.set_drain(&vip, &backend, false, peer))
            }
            Request::Failpoint { .. }
            | Request::Reload { .. }
            | Request::Restart { .. }
            | Request::LogLevel { .. } => Response::error("not the keeper's to answer"),
        }
    }

    /// Serves `config` from now on: plans, maps, probers, tracking; the caller checked it.
    fn reload(&mut self, config: &Config, reconcile: &mut Interval) -> Result<Vec<String>, String> {
        let mut notes = match self.backends.reload(config) {
            Ok(r) => r.notes,
            Err(e) => {
                // The plan is the new one; the keeper's retry brings the maps level.
                log::error!("writing the reloaded config to the maps: {e} (retrying)");
                vec![format!("a map write failed ({e}); the agent retries it")]
            }
        };
        self.track = config.vrrp.as_ref().map(|v| v.track).unwrap_or_default();
        if self.reconcile_every != config.agent.reconcile_interval {
            self.reconcile_every = config.agent.reconcile_interval;
            *reconcile = every(self.reconcile_every);
        }
        if let Some(src) = &config.source {
            self.info.config = src.path.display().to_string();
            self.info.config_sha256 = src.sha256.clone();
            self.info.config_loaded_unix = super::unix_seconds(src.loaded);
        }
        match self.probers.sync(&self.backends.probe_specs()) {
            Ok((started, stopped)) if started + stopped > 0 => {
                notes.push(format!("probers: {started} started, {stopped} stopped"))
            }
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
        Ok(notes)
    }

    /// Compares the maps with the plan and repairs them; on failure, tries again later.
    fn reconcile(&mut self, full: bool, retry_at: &mut Option<Instant>, backoff: &mut Duration) {
        match self.backends.refresh_local(&crate::host::local_ipv4()) {
            Ok(changes) => {
                for c in changes {
                    log::warn!(
                        "{c}: its connections now go through the local stack or NAT accordingly"
                    );
                }
            }
            Err(e) => log::error!("writing which backends are this host's: {e}"),
        }
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

    /// Makes VLAN_DEVS hold the VLAN devices now on the interface and logs each change;
    /// false when that failed (logged).
    async fn refresh_vlans(&mut self) -> bool {
        if self.ifindex == 0 {
            return true;
        }
        // The keeper's loop waits for this: a netlink answer that never comes must not stop
        // probes, commands and heartbeats.
        let vlans = match tokio::time::timeout(VLAN_READ_TIMEOUT, self.nl.vlans(self.ifindex)).await
        {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                log::warn!("re-reading the VLAN devices on {}: {e}", self.iface);
                return false;
            }
            Err(_) => {
                log::warn!(
                    "re-reading the VLAN devices on {}: no answer from netlink in {}s",
                    self.iface,
                    VLAN_READ_TIMEOUT.as_secs()
                );
                return false;
            }
        };
        match self
            .backends
            .writer()
            .set_vlans(&vlan_devs(self.ifindex, &vlans))
        {
            Ok(changes) => {
                for c in changes {
                    log::info!("VLAN devices on {}: {c}", self.iface);
                }
                true
            }
            Err(e) => {
                log::error!("updating the VLAN devices on {}: {e}", self.iface);
                false
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
        if self.track.local_backend_down > 0 && self.backends.local_backend_down() {
            p += self.track.local_backend_down as u16;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vlan_entries_carry_the_parent_and_the_id_as_the_tag_does() {
        let devs = vlan_devs(4, &[(7, 100), (9, 0x0abc)]);
        assert_eq!(devs.len(), 2);
        assert_eq!(devs[0].0, 7);
        assert_eq!(devs[0].1.parent, 4);
        assert_eq!(
            devs[0].1.vid.to_ne_bytes(),
            [0x00, 0x64],
            "network byte order"
        );
        assert_eq!(devs[1].1.vid.to_ne_bytes(), [0x0a, 0xbc]);
        assert!(vlan_devs(4, &[]).is_empty());
    }
}
