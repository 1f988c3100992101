//! Where a backend's state is decided: probe results (health), operator drains and weights
//! combine into the one state the data plane should see. `dataplane::writer` owns the map
//! writes; a write that fails leaves the plan ahead of the maps until `reconcile` succeeds.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::{SystemTime, UNIX_EPOCH},
};

use lb_common::{backend_flags, name_str, state, VipInfo, VipKey, MAX_BACKENDS, MAX_VIPS};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::{
    config::{Config, HealthConfig, HealthKind, RemovedBackends},
    control::Peer,
    dataplane::{
        writer::{self, BackendPlan, Reconciled, VipPlan, Writer},
        DataplaneError,
    },
    health::{
        policy::{self, BackendView, PanicDecision},
        probe::{Failure, FailureClass},
        probers::ProbeSpec,
        tracker::{Health, Tracker},
        vip_path::DsrMode,
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

#[derive(Clone)]
struct Runtime {
    tracker: Tracker,
    drained: bool,
    weight: u32,
    address: String,
    /// Taken out of the config by a reload, kept (drained) until its connections end.
    removed: bool,
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
    /// Taken out of the config by a reload; kept, drained, until its connections end.
    #[serde(default)]
    pub removed: bool,
    /// Health changes since the agent started.
    #[serde(default)]
    pub transitions: u64,
    /// Failed probes by reason since the agent started.
    #[serde(default)]
    pub probe_failures: std::collections::BTreeMap<String, u64>,
    /// How long its probes took since the agent started (None before the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_latency: Option<crate::health::tracker::LatencyHistogram>,
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
    /// The config's VIPs in its order, then VIPs a reload removed whose connections are
    /// still kept (`VipPlan::removed`).
    vips: Vec<VipPlan>,
    runtime: Vec<Vec<Runtime>>,
    health: Vec<HealthConfig>,
    /// Per VIP: whether it is in panic mode and which backends that serves.
    panic: Vec<PanicDecision>,
    /// A write failed since the last look (the keeper schedules a retry).
    write_failed: bool,
    /// The maps are behind the plan (a write failed and no reconcile has succeeded since).
    behind: bool,
    /// Indices below these have been given out since start: new backends and VIPs take
    /// fresh ones first, so a stale flow or counter never meets a newcomer on its index.
    fresh_backend: u32,
    fresh_vip: u32,
    policy: RemovedBackends,
    default_snat: Ipv4Addr,
}

/// What a reload changed in the maps, beyond what the config diff says.
#[derive(Debug, Default)]
pub struct Reloaded {
    /// In words, one line each.
    pub notes: Vec<String>,
}

/// The lowest index below `max` that `used` lacks, fresh ones (from `*fresh`) first.
fn take_index(used: &BTreeSet<u32>, fresh: &mut u32, max: u32) -> Option<u32> {
    if *fresh < max {
        let i = *fresh;
        *fresh += 1;
        return Some(i);
    }
    (0..max).find(|i| !used.contains(i))
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
    /// No plans yet.
    fn empty(config: &Config, writer: Writer, default_snat: Ipv4Addr) -> Self {
        Self {
            writer,
            vips: Vec::new(),
            runtime: Vec::new(),
            health: Vec::new(),
            panic: Vec::new(),
            write_failed: false,
            behind: false,
            fresh_backend: 0,
            fresh_vip: 0,
            policy: config.agent.removed_backends,
            default_snat,
        }
    }

    /// Serves `config` from empty maps: a reload from nothing. Every probed backend is down
    /// until its first probe answers.
    pub fn install(
        config: &Config,
        writer: Writer,
        default_snat: Ipv4Addr,
    ) -> Result<Self, DataplaneError> {
        let mut b = Self::empty(config, writer, default_snat);
        b.reload(config)?;
        Ok(b)
    }

    /// Takes over the maps a previous agent left (adoption), then serves `config` as a
    /// reload would: VIPs and backends keep the indices the maps give them, so every flow
    /// keeps its backend, and each backend keeps the health, drain and removal the maps
    /// record until its probes say otherwise.
    pub fn adopt(
        config: &Config,
        writer: Writer,
        default_snat: Ipv4Addr,
    ) -> Result<(Self, Vec<String>), DataplaneError> {
        let mut b = Self::empty(config, writer, default_snat);
        let maps = &b.writer.maps;
        let live: Vec<(VipKey, VipInfo)> = maps.vips.iter().filter_map(Result::ok).collect();
        for i in 0..MAX_VIPS {
            let Ok(meta) = maps.vip_meta.get(&i, 0) else {
                continue;
            };
            if meta.in_use == 0 {
                continue;
            }
            let name = name_str(&meta.name);
            let (key, info, removed) = match live.iter().find(|(_, info)| info.index == i) {
                Some((k, info)) => (*k, *info, false),
                // A VIP a reload removed, kept for its connections: no entry any more.
                None => (
                    VipKey::default(),
                    VipInfo {
                        index: i,
                        ..Default::default()
                    },
                    true,
                ),
            };
            let health = config
                .vips
                .iter()
                .find(|v| v.name == name)
                .map(|v| v.health.clone())
                .unwrap_or_else(HealthConfig::none);
            let mut plan = VipPlan {
                name,
                key,
                info,
                backends: Vec::new(),
                table: Vec::new(),
                removed,
            };
            let mut rts = Vec::new();
            for j in 0..MAX_BACKENDS {
                let (Ok(bm), Ok(bi)) = (maps.backend_meta.get(&j, 0), maps.backends.get(&j, 0))
                else {
                    continue;
                };
                if bm.in_use & backend_flags::IN_USE == 0 || bi.vip != i {
                    continue;
                }
                let addr = Ipv4Addr::from(u32::from_be(bi.addr));
                let port = u16::from_be(bi.port);
                let carried = match bi.state {
                    state::UP | state::DRAIN => Health::Up,
                    state::UNREADY => Health::Down(Failure::Inherited),
                    _ => Health::Unknown,
                };
                rts.push(Runtime {
                    tracker: Tracker::carried(health.rise, health.fall, carried),
                    drained: bm.in_use & backend_flags::DRAINED != 0,
                    weight: bm.weight,
                    address: format!("{addr}:{port}"),
                    removed: removed || bm.in_use & backend_flags::REMOVED != 0,
                });
                plan.backends.push(BackendPlan {
                    index: j,
                    name: name_str(&bm.name),
                    addr,
                    port,
                    weight: bm.weight,
                    state: bi.state,
                    flags: bm.in_use & !backend_flags::IN_USE,
                    local: bi.flags & lb_common::backend_info_flags::LOCAL != 0,
                });
                b.fresh_backend = b.fresh_backend.max(j + 1);
            }
            b.fresh_vip = b.fresh_vip.max(i + 1);
            b.vips.push(plan);
            b.runtime.push(rts);
            b.health.push(health);
            b.panic.push(PanicDecision::Normal);
        }
        let found = format!(
            "adopted {} VIPs and {} backends from the maps",
            b.vips.len(),
            b.runtime.iter().map(Vec::len).sum::<usize>()
        );
        let mut notes = vec![found];
        notes.extend(b.reload(config)?.notes);
        Ok((b, notes))
    }

    /// Makes the plans those of `config` and writes what changed. A VIP keeps its index by
    /// name and a backend by (VIP, name, address, port), so its flows, counters and state
    /// carry over; backends and VIPs the config dropped are kept drained until their
    /// connections end, or reset, as `agent.removed_backends` says.
    pub fn reload(&mut self, config: &Config) -> Result<Reloaded, DataplaneError> {
        self.policy = config.agent.removed_backends;
        let mut fresh = writer::plan(config, self.default_snat, &crate::host::local_ipv4());
        let mut used_vips: BTreeSet<u32> = BTreeSet::new();
        let mut used: BTreeSet<u32> = BTreeSet::new();
        for v in &self.vips {
            used_vips.insert(v.info.index);
            used.extend(v.backends.iter().map(|b| b.index));
        }
        let mut notes = Vec::new();
        let mut taken = vec![false; self.vips.len()];
        let mut runtime = Vec::new();
        let mut panic = Vec::new();
        let mut new_backends = Vec::new();
        let mut new_vips = Vec::new();
        for (vc, plan) in config.vips.iter().zip(fresh.iter_mut()) {
            let old = self
                .vips
                .iter()
                .position(|o| o.name == plan.name && !o.removed)
                .or_else(|| self.vips.iter().position(|o| o.name == plan.name));
            if let Some(o) = old {
                taken[o] = true;
                plan.info.index = self.vips[o].info.index;
                plan.info.active_half = self.vips[o].info.active_half;
            } else {
                let i = take_index(&used_vips, &mut self.fresh_vip, MAX_VIPS)
                    .ok_or(DataplaneError::NoIndex("VIP", MAX_VIPS))?;
                used_vips.insert(i);
                plan.info.index = i;
                new_vips.push(i);
            }
            let mut rts = Vec::new();
            let mut kept = vec![false; old.map_or(0, |o| self.vips[o].backends.len())];
            for (bc, bp) in vc.backends.iter().zip(plan.backends.iter_mut()) {
                let same = old.and_then(|o| {
                    self.vips[o]
                        .backends
                        .iter()
                        .position(|p| p.name == bp.name && p.addr == bp.addr && p.port == bp.port)
                });
                let rt = match (old, same) {
                    (Some(o), Some(b)) => {
                        kept[b] = true;
                        bp.index = self.vips[o].backends[b].index;
                        let mut rt = self.runtime[o][b].clone();
                        if rt.removed {
                            notes.push(format!(
                                "VIP {}: backend {} is back before its connections ended",
                                plan.name, bp.name
                            ));
                        }
                        rt.removed = false;
                        rt.weight = bc.weight;
                        rt.tracker.set_thresholds(vc.health.rise, vc.health.fall);
                        rt
                    }
                    _ => {
                        let i = take_index(&used, &mut self.fresh_backend, MAX_BACKENDS)
                            .ok_or(DataplaneError::NoIndex("backend", MAX_BACKENDS))?;
                        used.insert(i);
                        bp.index = i;
                        new_backends.push(i);
                        Runtime {
                            tracker: Tracker::new(vc.health.rise, vc.health.fall),
                            drained: false,
                            weight: bc.weight,
                            address: format!("{}:{}", bc.address, bc.port),
                            removed: false,
                        }
                    }
                };
                rts.push(rt);
            }
            // Backends this VIP no longer has.
            if let Some(o) = old {
                for (b, k) in kept.iter().enumerate() {
                    if !k {
                        self.keep_or_retire(o, b, plan, &mut rts, &mut notes);
                    }
                }
            }
            runtime.push(rts);
            panic.push(old.map_or(PanicDecision::Normal, |o| self.panic[o].clone()));
            plan.table.clear();
        }
        let mut health: Vec<HealthConfig> = config.vips.iter().map(|v| v.health.clone()).collect();
        // VIPs the config no longer has.
        let mut gone_vips = Vec::new();
        for (o, t) in taken.iter().enumerate() {
            if *t {
                continue;
            }
            let mut plan = self.vips[o].clone();
            plan.removed = true;
            plan.backends.clear();
            let mut rts = Vec::new();
            for b in 0..self.vips[o].backends.len() {
                self.keep_or_retire(o, b, &mut plan, &mut rts, &mut notes);
            }
            if plan.backends.is_empty() {
                gone_vips.push(plan.info.index);
                continue;
            }
            fresh.push(plan);
            runtime.push(rts);
            panic.push(PanicDecision::Normal);
            health.push(self.health[o].clone());
        }
        let retired: Vec<u32> = used
            .iter()
            .copied()
            .filter(|i| {
                !fresh
                    .iter()
                    .any(|v| v.backends.iter().any(|b| b.index == *i))
            })
            .collect();
        for i in &new_vips {
            self.writer.fresh_vip(*i)?;
        }
        for i in &new_backends {
            self.writer.fresh_backend(*i)?;
        }
        let old_plans = std::mem::replace(&mut self.vips, fresh);
        self.runtime = runtime;
        self.health = health;
        self.panic = panic;
        for v in 0..self.vips.len() {
            for (b, st) in self.decide(v).0.into_iter().enumerate() {
                self.vips[v].backends[b].state = st;
            }
        }
        // The same safe order as any change: backends that take new flows, tables, then the
        // rest, then VIP entries no VIP has; only then are indices nobody uses retired.
        let r = self.writer.sync(&mut self.vips);
        if r.is_err() {
            self.write_failed = true;
            self.behind = true;
        }
        for i in retired {
            self.writer.retire_backend(i)?;
        }
        for i in gone_vips {
            self.writer.retire_vip(i)?;
        }
        self.writer.clear_filter(&old_plans, &self.vips)?;
        r?;
        Ok(Reloaded { notes })
    }

    /// Keeps backend `b` of old VIP `o` in `plan` as removed (drained until its connections
    /// end) under the drain policy unless it is down; otherwise leaves it out, and the caller
    /// retires its index.
    fn keep_or_retire(
        &self,
        o: usize,
        b: usize,
        plan: &mut VipPlan,
        rts: &mut Vec<Runtime>,
        notes: &mut Vec<String>,
    ) {
        let bp = self.vips[o].backends[b].clone();
        let mut rt = self.runtime[o][b].clone();
        if self.policy == RemovedBackends::Reset || bp.state == state::DOWN {
            notes.push(format!(
                "VIP {}: backend {} ({}): its connections are reset at their next packet",
                self.vips[o].name, bp.name, rt.address
            ));
            return;
        }
        if !rt.removed {
            notes.push(format!(
                "VIP {}: backend {} ({}): kept, drained, until its connections end",
                self.vips[o].name, bp.name, rt.address
            ));
        }
        rt.removed = true;
        plan.backends.push(bp);
        rts.push(rt);
    }

    /// True while a removed backend is kept for its connections.
    pub fn keeps_removed(&self) -> bool {
        self.runtime.iter().flatten().any(|r| r.removed)
    }

    /// Ends the removed backends (and removed VIPs) that no connection uses any more;
    /// returns what ended, in words. Reads the flow tables, so only while some are kept.
    pub fn release_removed(&mut self) -> Result<Vec<String>, DataplaneError> {
        if !self.keeps_removed() {
            return Ok(Vec::new());
        }
        let now = crate::dataplane::pinned::monotonic_coarse_ns();
        let flows = self.writer.maps.flows_by_backend(Some(now)).by_backend;
        let mut ended = Vec::new();
        let old_plans = self.vips.clone();
        let mut retired = Vec::new();
        for v in (0..self.vips.len()).rev() {
            for b in (0..self.vips[v].backends.len()).rev() {
                let index = self.vips[v].backends[b].index;
                let rt = &self.runtime[v][b];
                if !rt.removed || flows.get(&index).copied().unwrap_or(0) > 0 {
                    continue;
                }
                ended.push(format!(
                    "VIP {}: removed backend {} ({}) has no connections left: gone",
                    self.vips[v].name, self.vips[v].backends[b].name, rt.address
                ));
                // Drained, so no table holds it: dropping it from the plan changes no table.
                self.vips[v].backends.remove(b);
                self.vips[v].table.clear();
                self.runtime[v].remove(b);
                retired.push(index);
            }
            if self.vips[v].removed && self.vips[v].backends.is_empty() {
                ended.push(format!(
                    "VIP {}: removed, no connections left: gone",
                    self.vips[v].name
                ));
                let index = self.vips[v].info.index;
                self.vips.remove(v);
                self.runtime.remove(v);
                self.health.remove(v);
                self.panic.remove(v);
                self.writer.retire_vip(index)?;
            }
        }
        for i in retired {
            self.writer.retire_backend(i)?;
        }
        self.writer.clear_filter(&old_plans, &self.vips)?;
        Ok(ended)
    }

    /// What the probers should probe: every backend of the plan, removed ones included (a
    /// removed backend that dies must still let its connections go).
    pub fn probe_specs(&self) -> Vec<ProbeSpec> {
        self.vips
            .iter()
            .zip(&self.health)
            .flat_map(|(v, h)| {
                let dsr = match v.info.mode {
                    lb_common::mode::DSR_L2 => Some(DsrMode::L2),
                    lb_common::mode::DSR_IPIP => Some(DsrMode::Ipip),
                    _ => None,
                }
                .map(|m| {
                    let vip = Ipv4Addr::from(u32::from_be(v.key.addr));
                    (m, SocketAddrV4::new(vip, u16::from_be(v.key.port)))
                });
                v.backends.iter().map(move |b| ProbeSpec {
                    vip: v.name.clone(),
                    backend: b.index,
                    name: b.name.clone(),
                    addr: SocketAddr::from((b.addr, b.port)),
                    health: h.clone(),
                    dsr,
                })
            })
            .collect()
    }

    /// Where backend index `i` is in the plans.
    fn position(&self, i: u32) -> Option<(usize, usize)> {
        self.vips
            .iter()
            .enumerate()
            .find_map(|(v, p)| p.backends.iter().position(|b| b.index == i).map(|b| (v, b)))
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
        let Some((v, b)) = self.position(ev.backend) else {
            return;
        };
        let rt = &mut self.runtime[v][b];
        let Some(tr) = rt.tracker.record(now, ev.outcome) else {
            return;
        };
        let vip = &self.vips[v];
        let be = &vip.backends[b];
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
        let why = match &tr.to {
            Health::Down(f) => f.to_string(),
            _ => String::new(),
        };
        // One event per change, with fields a log shipper can filter on.
        tracing::info!(
            event = "backend_state",
            vip = %vip.name,
            backend = %be.name,
            address = %rt.address,
            from = health_word(&tr.from),
            to = health_word(&tr.to),
            reason = %why,
            "VIP {} backend {} ({}): {} -> {}{}; {effect}",
            vip.name,
            be.name,
            rt.address,
            health_word(&tr.from),
            health_word(&tr.to),
            if why.is_empty() { String::new() } else { format!(" ({why})") }
        );
        self.apply(v);
    }

    /// Decides the state of every backend of VIP `v` (one backend's change can start or end
    /// panic mode for all of them) and writes what changed; a failed write is logged and left
    /// to the keeper's retry (the plan already holds the new state).
    fn apply(&mut self, v: usize) {
        let (states, flagged) = self.decide(v);
        for b in flagged {
            if let Err(e) = self.writer.set_backend_meta(&self.vips[v], b) {
                log::error!(
                    "VIP {} backend {}: writing its flags to the data plane: {e} (retrying)",
                    self.vips[v].name,
                    self.vips[v].backends[b].name
                );
                self.write_failed = true;
                self.behind = true;
            }
        }
        for (b, s) in states.into_iter().enumerate() {
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
    }

    /// Decides (and logs) whether VIP `v` is in panic mode, and the state each of its
    /// backends should have; sets the plan's flags (drained, removed) and returns which
    /// backends' flags changed.
    fn decide(&mut self, v: usize) -> (Vec<u8>, Vec<usize>) {
        let mut flagged = Vec::new();
        for (b, rt) in self.runtime[v].iter().enumerate() {
            let mut flags = 0;
            if rt.drained {
                flags |= backend_flags::DRAINED;
            }
            if rt.removed {
                flags |= backend_flags::REMOVED;
            }
            let plan = &mut self.vips[v].backends[b];
            if plan.flags != flags {
                plan.flags = flags;
                flagged.push(b);
            }
        }
        let decision = policy::panic_mode(
            &self.vips[v]
                .backends
                .iter()
                .zip(&self.runtime[v])
                .map(|(b, rt)| BackendView {
                    name: &b.name,
                    health: &rt.tracker.health,
                    drained: rt.drained || rt.removed || rt.weight == 0,
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
        let probes = self.health[v].kind != HealthKind::None;
        let states = self.runtime[v]
            .iter()
            .enumerate()
            .map(|(b, rt)| {
                let health = if decision.serves(b) {
                    &Health::Up
                } else {
                    &rt.tracker.health
                };
                effective(health, probes, rt.drained || rt.removed, rt.weight)
            })
            .collect();
        self.panic[v] = decision;
        (states, flagged)
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
            .position(|p| p.name == vip && !p.removed)
            .ok_or_else(|| format!("no VIP named {vip:?}"))?;
        let b = (0..self.vips[v].backends.len())
            .find(|&b| self.vips[v].backends[b].name == backend && !self.runtime[v][b].removed)
            .ok_or_else(|| format!("VIP {vip:?} has no backend named {backend:?}"))?;
        self.runtime[v][b].drained = drain;
        let failures = self.writer.write_failures;
        self.apply(v);
        let word = if drain { "drained" } else { "undrained" };
        tracing::info!(
            event = "backend_drain",
            vip,
            backend,
            to = word,
            by = %peer,
            "VIP {vip} backend {backend}: {word} by {peer}"
        );
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
            !v.removed
                && !v
                    .backends
                    .iter()
                    .enumerate()
                    .any(|(i, b)| b.state == state::UP && !p.serves(i))
        })
    }

    /// Marks as local the NAT VIPs' backends at one of `local` (this host's addresses now)
    /// and no others, writing the maps if that changed anything: an address added to or
    /// removed from the host after the config was loaded. Returns one line per change.
    pub fn refresh_local(&mut self, local: &[Ipv4Addr]) -> Result<Vec<String>, DataplaneError> {
        let mut changed = Vec::new();
        for v in self
            .vips
            .iter_mut()
            .filter(|v| v.info.mode == lb_common::mode::NAT)
        {
            for b in v.backends.iter_mut() {
                let now = local.contains(&b.addr);
                if b.local != now {
                    b.local = now;
                    changed.push(format!(
                        "VIP {}: backend {} ({}) is {} an address of this host",
                        v.name,
                        b.name,
                        b.addr,
                        if now { "now" } else { "no longer" }
                    ));
                }
            }
        }
        if !changed.is_empty() {
            self.writer.sync(&mut self.vips)?;
        }
        Ok(changed)
    }

    /// True while a backend at an address of this host is down or not ready (drained does
    /// not count: the operator chose it).
    pub fn local_backend_down(&self) -> bool {
        self.vips.iter().filter(|v| !v.removed).any(|v| {
            v.backends
                .iter()
                .any(|b| b.local && matches!(b.state, state::DOWN | state::UNREADY))
        })
    }

    /// Per VIP, the addresses of the backends its health checks report up (all of them
    /// without probes); removed backends and VIPs left out: the apiservers discovery may ask.
    pub fn reachable(&self) -> crate::discovery::Reachable {
        self.vips
            .iter()
            .zip(&self.runtime)
            .zip(&self.health)
            .filter(|((v, _), _)| !v.removed)
            .map(|((v, rts), h)| {
                let up = v
                    .backends
                    .iter()
                    .zip(rts)
                    .filter(|(_, rt)| {
                        !rt.removed
                            && (h.kind == HealthKind::None || rt.tracker.health == Health::Up)
                    })
                    .map(|(b, _)| SocketAddr::from((b.addr, b.port)))
                    .collect();
                (v.name.clone(), up)
            })
            .collect()
    }

    /// Health of every backend, for status.
    pub fn report(&self) -> Vec<VipHealth> {
        self.vips
            .iter()
            .zip(&self.runtime)
            .zip(&self.health)
            .zip(&self.panic)
            .map(|(((vip, rts), health), panic)| VipHealth {
                name: vip.name.clone(),
                probe: format!("{:?}", health.kind).to_lowercase(),
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
                            removed: rt.removed,
                            transitions: t.stats.transitions,
                            probe_failures: t
                                .stats
                                .failures
                                .iter()
                                .map(|(k, v)| (k.to_string(), *v))
                                .collect(),
                            probe_latency: (t.stats.latency.count > 0)
                                .then(|| t.stats.latency.clone()),
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
