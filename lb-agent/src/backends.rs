//! Where a backend's state is decided: probe results (health), operator drains and weights
//! combine into the one state the data plane should see. `dataplane::writer` owns the map
//! writes; a write that fails leaves the plan ahead of the maps until `reconcile` succeeds.

use std::time::{SystemTime, UNIX_EPOCH};

use lb_common::state;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::{
    config::{Config, HealthKind},
    control::Peer,
    dataplane::{
        writer::{Reconciled, VipPlan, Writer},
        DataplaneError,
    },
    health::{
        policy::{self, BackendView, PanicDecision},
        probe::{Failure, FailureClass},
        tracker::{Health, Tracker},
        ProbeEvent,
    },
};

/// The data plane state for a backend's health, drain and weight.
///
/// Unreachable wins over everything (its flows must move: the backend is gone); a drain
/// (operator's or weight 0) keeps flows and takes no new ones; not ready and LB side keep
/// flows too.
pub fn effective(health: &Health, probes: bool, drained: bool, weight: u32) -> u8 {
    let health = if probes { health } else { &Health::Up };
    match health {
        Health::Down(f) if f.class() == FailureClass::Unreachable => state::DOWN,
        Health::Unknown => state::DOWN,
        _ if drained || weight == 0 => state::DRAIN,
        Health::Down(_) => state::UNREADY,
        Health::Up => state::UP,
    }
}

struct Runtime {
    tracker: Tracker,
    drained: bool,
    weight: u32,
    address: String,
}

/// Per-backend health as `lb-agent status` shows it (from the control socket).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BackendHealth {
    pub name: String,
    /// "up", "down" or "unknown" (never probed).
    pub health: String,
    /// Drained by `lb-agent drain`.
    pub drained: bool,
    /// "ok" or "failed"; None before the first probe.
    pub last_result: Option<String>,
    pub last_latency_ms: Option<f64>,
    pub consecutive_successes: u32,
    pub consecutive_failures: u32,
    pub last_failure: Option<String>,
    /// Unix time of the last health change.
    pub last_change_unix: Option<u64>,
    /// Why it is down: "unreachable" (flows re-picked), "not ready" or "LB side" (flows
    /// kept).
    pub down_reason: Option<String>,
    /// Served although its probes fail, because the VIP is in panic mode.
    #[serde(default)]
    pub served_in_panic: bool,
}

/// Per-VIP health for status.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VipHealth {
    pub name: String,
    pub probe: String,
    /// Why the VIP is in panic mode (every backend fails its probes for a reason on the LB
    /// side, so they are served as if healthy); None when it is not.
    #[serde(default)]
    pub panic: Option<String>,
    pub backends: Vec<BackendHealth>,
}

/// Owns the VIPs' plans (what the data plane should hold) and the map writer; the only
/// place a backend's state is decided.
pub struct Backends {
    writer: Writer,
    vips: Vec<VipPlan>,
    runtime: Vec<Vec<Runtime>>,
    probes: Vec<HealthKind>,
    /// Per VIP: whether it is in panic mode and which backends that serves.
    panic: Vec<PanicDecision>,
    /// A write failed since the last look (the keeper schedules a retry).
    write_failed: bool,
    /// The maps are behind the plan (a write failed and no reconcile has succeeded since).
    behind: bool,
}

fn unix_of(t: Instant) -> u64 {
    let ago = Instant::now().saturating_duration_since(t);
    SystemTime::now()
        .checked_sub(ago)
        .and_then(|s| s.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Backends {
    /// Installs `vips` with every probed backend down until its first probe answers.
    pub fn install(
        config: &Config,
        mut writer: Writer,
        mut vips: Vec<VipPlan>,
    ) -> Result<Self, DataplaneError> {
        let mut runtime = Vec::new();
        let mut probes = Vec::new();
        for (v, plan) in config.vips.iter().zip(vips.iter_mut()) {
            let h = &v.health;
            probes.push(h.kind);
            let rts: Vec<Runtime> = v
                .backends
                .iter()
                .map(|b| Runtime {
                    tracker: Tracker::new(h.rise, h.fall),
                    drained: false,
                    weight: b.weight,
                    address: format!("{}:{}", b.address, b.port),
                })
                .collect();
            for (b, rt) in plan.backends.iter_mut().zip(&rts) {
                b.state = effective(
                    &rt.tracker.health,
                    h.kind != HealthKind::None,
                    false,
                    rt.weight,
                );
            }
            runtime.push(rts);
        }
        writer.install(&mut vips)?;
        Ok(Self {
            writer,
            vips,
            panic: vec![PanicDecision::Normal; runtime.len()],
            runtime,
            probes,
            write_failed: false,
            behind: false,
        })
    }

    /// The writer, for agent-wide map entries.
    pub fn writer(&mut self) -> &mut Writer {
        &mut self.writer
    }

    /// The writer's counters.
    pub fn writer_ref(&self) -> &Writer {
        &self.writer
    }

    /// True once after a map write failed.
    pub fn take_write_failed(&mut self) -> bool {
        std::mem::take(&mut self.write_failed)
    }

    /// True while the maps are behind the plan.
    pub fn maps_behind(&self) -> bool {
        self.behind
    }

    /// Compares the maps with the plans and repairs them; `full` reads back whole tables.
    pub fn reconcile(&mut self, full: bool) -> Result<Reconciled, DataplaneError> {
        let r = self.writer.reconcile(&mut self.vips, full);
        self.behind = r.is_err();
        r
    }

    /// Applies a probe result; logs and publishes a change of state.
    pub fn on_probe(&mut self, ev: ProbeEvent) {
        let now = Instant::now();
        let rt = &mut self.runtime[ev.vip][ev.backend];
        let Some(tr) = rt.tracker.record(now, ev.outcome) else {
            return;
        };
        let vip = &self.vips[ev.vip];
        let b = &vip.backends[ev.backend];
        let effect = match &tr.to {
            Health::Up => "takes new connections".to_string(),
            Health::Down(f) if f.class().keeps_flows() => {
                "no new connections, its connections are kept until they end".to_string()
            }
            Health::Down(_) => {
                "no new connections, its connections move to other backends".to_string()
            }
            Health::Unknown => String::new(),
        };
        log::info!(
            "VIP {} backend {} ({}): {} -> {}{}; {effect}",
            vip.name,
            b.name,
            rt.address,
            health_word(&tr.from),
            health_word(&tr.to),
            match &tr.to {
                Health::Down(f) => format!(" ({f})"),
                _ => String::new(),
            }
        );
        self.apply(ev.vip);
    }

    /// Decides the state of every backend of VIP `v` (one backend's change can start or end
    /// panic mode for all of them) and writes what changed; a failed write is logged and left
    /// to the keeper's retry (the plan already holds the new state).
    fn apply(&mut self, v: usize) {
        let decision = policy::panic_mode(
            &self.vips[v]
                .backends
                .iter()
                .zip(&self.runtime[v])
                .map(|(b, rt)| BackendView {
                    name: &b.name,
                    health: &rt.tracker.health,
                    drained: rt.drained || rt.weight == 0,
                })
                .collect::<Vec<_>>(),
        );
        if decision != self.panic[v] {
            match decision.reason() {
                Some(r) => log::error!(
                    "VIP {}: PANIC MODE: {r}. Fix the probes' CA/client certificate (the VIP keeps serving meanwhile)",
                    self.vips[v].name
                ),
                None => log::warn!(
                    "VIP {}: panic mode over, probes decide again",
                    self.vips[v].name
                ),
            }
        }
        let probes = self.probes[v] != HealthKind::None;
        for b in 0..self.runtime[v].len() {
            let rt = &self.runtime[v][b];
            let health = if decision.serves(b) {
                &Health::Up
            } else {
                &rt.tracker.health
            };
            let s = effective(health, probes, rt.drained, rt.weight);
            if let Err(e) = self.writer.set_state(&mut self.vips[v], b, s) {
                log::error!(
                    "VIP {} backend {}: writing state {} to the data plane: {e} (retrying)",
                    self.vips[v].name,
                    self.vips[v].backends[b].name,
                    state::name(s)
                );
                self.write_failed = true;
                self.behind = true;
            }
        }
        self.panic[v] = decision;
    }

    /// Drains (or undrains) backend `backend` of VIP `vip`, by name, for `peer`.
    pub fn set_drain(
        &mut self,
        vip: &str,
        backend: &str,
        drain: bool,
        peer: &Peer,
    ) -> Result<String, String> {
        let v = self
            .vips
            .iter()
            .position(|p| p.name == vip)
            .ok_or_else(|| format!("no VIP named {vip:?}"))?;
        let b = self.vips[v]
            .backends
            .iter()
            .position(|p| p.name == backend)
            .ok_or_else(|| format!("VIP {vip:?} has no backend named {backend:?}"))?;
        self.runtime[v][b].drained = drain;
        let failures = self.writer.write_failures;
        self.apply(v);
        let word = if drain { "drained" } else { "undrained" };
        log::info!("VIP {vip} backend {backend}: {word} by {peer}");
        let pending = if self.writer.write_failures != failures {
            " (the map write failed; the agent retries it)"
        } else {
            ""
        };
        Ok(format!(
            "{vip}/{backend}: {word}; data plane state {}{pending}",
            state::name(self.vips[v].backends[b].state)
        ))
    }

    /// True while some VIP has no backend taking new connections on the strength of its
    /// probes (VRRP tracking): a VIP in panic mode counts as unhealthy, so the VIP moves to
    /// an LB whose probes work, if there is one.
    pub fn some_vip_without_healthy_backend(&self) -> bool {
        self.vips.iter().zip(&self.panic).any(|(v, p)| {
            !v.backends
                .iter()
                .enumerate()
                .any(|(i, b)| b.state == state::UP && !p.serves(i))
        })
    }

    /// Health of every backend, for status.
    pub fn report(&self) -> Vec<VipHealth> {
        self.vips
            .iter()
            .zip(&self.runtime)
            .zip(&self.probes)
            .zip(&self.panic)
            .map(|(((vip, rts), kind), panic)| VipHealth {
                name: vip.name.clone(),
                probe: format!("{kind:?}").to_lowercase(),
                panic: panic.reason().map(Into::into),
                backends: vip
                    .backends
                    .iter()
                    .zip(rts)
                    .enumerate()
                    .map(|(i, (b, rt))| {
                        let t = &rt.tracker;
                        BackendHealth {
                            name: b.name.clone(),
                            health: health_word(&t.health).to_string(),
                            drained: rt.drained,
                            last_result: t.last.as_ref().map(|o| {
                                if o.result.is_ok() { "ok" } else { "failed" }.to_string()
                            }),
                            last_latency_ms: t
                                .last
                                .as_ref()
                                .map(|o| (o.latency.as_secs_f64() * 1e4).round() / 10.0),
                            consecutive_successes: t.successes,
                            consecutive_failures: t.failures,
                            last_failure: t.last_failure.as_ref().map(Failure::to_string),
                            last_change_unix: t.last_change.map(unix_of),
                            down_reason: match &t.health {
                                Health::Down(f) => Some(f.class().word().into()),
                                _ => None,
                            },
                            served_in_panic: panic.serves(i),
                        }
                    })
                    .collect(),
            })
            .collect()
    }
}

fn health_word(h: &Health) -> &'static str {
    match h {
        Health::Unknown => "unknown",
        Health::Up => "up",
        Health::Down(_) => "down",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_state_precedence() {
        let refused = Health::Down(Failure::Refused);
        let unready = Health::Down(Failure::Status(503));
        assert_eq!(effective(&Health::Up, true, false, 100), state::UP);
        assert_eq!(effective(&Health::Unknown, true, false, 100), state::DOWN);
        assert_eq!(effective(&refused, true, false, 100), state::DOWN);
        assert_eq!(
            effective(&refused, true, true, 100),
            state::DOWN,
            "a dead backend's flows move even when drained"
        );
        assert_eq!(effective(&unready, true, false, 100), state::UNREADY);
        assert_eq!(effective(&unready, true, true, 100), state::DRAIN);
        assert_eq!(effective(&Health::Up, true, true, 100), state::DRAIN);
        assert_eq!(effective(&Health::Up, true, false, 0), state::DRAIN);
        assert_eq!(
            effective(&Health::Unknown, false, false, 100),
            state::UP,
            "kind none: always up"
        );
    }
}
