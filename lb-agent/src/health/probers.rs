//! The running probers (one per backend) and certificate watches (one per VIP), kept equal
//! to what the backends' plan asks for: a reload starts what is new, stops what is gone and
//! restarts only what changed, so an unchanged backend's probes never pause.

use std::{
    collections::{HashMap, HashSet},
    net::{SocketAddr, SocketAddrV4},
    sync::Arc,
};

use rustls::ClientConfig;
use tokio::{
    sync::{mpsc, watch},
    task::{Id, JoinSet},
};

use super::{
    probe::{LocalLink, Target, VipPathCheck},
    run_prober,
    tls_watch::{self, TlsSource},
    vip_path::DsrMode,
    ProbeEvent, TlsError,
};
use crate::config::{HealthConfig, HealthKind};

/// One backend to probe, as the plan has it.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeSpec {
    pub vip: String,
    pub backend: u32,
    pub name: String,
    pub addr: SocketAddr,
    pub health: HealthConfig,
    /// DSR VIPs: the mode and the VIP's address and port, for the VIP-path probe.
    pub dsr: Option<(DsrMode, SocketAddrV4)>,
}

struct Prober {
    id: u64,
    spec: ProbeSpec,
    task: Id,
    _stop: watch::Sender<bool>,
}

struct Watch {
    health: HealthConfig,
    tls: watch::Receiver<Option<Arc<ClientConfig>>>,
    task: Option<Id>,
    _stop: watch::Sender<bool>,
}

/// Every prober and certificate watch of the agent. Dropping it stops them all.
pub struct Probers {
    events: mpsc::Sender<ProbeEvent>,
    /// The data plane's interface, for DSR backends' VIP-path probes (None: not probed).
    local: Option<LocalLink>,
    running: HashMap<u32, Prober>,
    watches: HashMap<String, Watch>,
    set: JoinSet<()>,
    names: HashMap<Id, String>,
    /// Tasks told to stop: their end is no failure.
    stopping: HashSet<Id>,
    next_id: u64,
}

/// A VIP whose TLS settings cannot be used (the reload is refused before this, so it means
/// a file changed in between).
#[derive(Debug, thiserror::Error)]
#[error("VIP {vip}: health.{source}")]
pub struct SyncError {
    pub vip: String,
    #[source]
    pub source: TlsError,
}

impl Probers {
    /// No probers yet; their results go to `events`. DSR backends get a VIP-path probe
    /// through `local`, the data plane's interface, when given.
    pub fn new(events: mpsc::Sender<ProbeEvent>, local: Option<LocalLink>) -> Self {
        Self {
            events,
            local,
            running: HashMap::new(),
            watches: HashMap::new(),
            set: JoinSet::new(),
            names: HashMap::new(),
            stopping: HashSet::new(),
            next_id: 1,
        }
    }

    /// True when `ev` comes from the prober now running for its backend.
    pub fn is_current(&self, ev: &ProbeEvent) -> bool {
        self.running
            .get(&ev.backend)
            .is_some_and(|p| p.id == ev.prober)
    }

    fn stop(&mut self, task: Id) {
        self.stopping.insert(task);
    }

    /// Makes the running probers and watches those of `specs`; returns how many probers it
    /// started and stopped.
    pub fn sync(&mut self, specs: &[ProbeSpec]) -> Result<(usize, usize), SyncError> {
        // Watches first: a prober takes its VIP's current TLS config.
        let mut vips: HashMap<&str, &HealthConfig> = HashMap::new();
        for s in specs.iter().filter(|s| s.health.kind != HealthKind::None) {
            vips.entry(&s.vip).or_insert(&s.health);
        }
        let gone: Vec<String> = self
            .watches
            .iter()
            .filter(|(v, w)| vips.get(v.as_str()) != Some(&&w.health))
            .map(|(v, _)| v.clone())
            .collect();
        for v in gone {
            if let Some(w) = self.watches.remove(&v) {
                if let Some(t) = w.task {
                    self.stop(t);
                }
            }
        }
        for (vip, health) in vips {
            if self.watches.contains_key(vip) {
                continue;
            }
            let source = TlsSource::new(health).map_err(|source| SyncError {
                vip: vip.to_string(),
                source,
            })?;
            let (tx, rx) = watch::channel(source.config());
            let (stop_tx, stop_rx) = watch::channel(false);
            // kubeadm rotates certificates: probes follow the files.
            let task = (!source.paths().is_empty()).then(|| {
                let name = vip.to_string();
                let h = self.set.spawn(tls_watch::watch_tls(
                    name.clone(),
                    source,
                    tls_watch::POLL_PERIOD,
                    tx,
                    stop_rx,
                ));
                self.names
                    .insert(h.id(), format!("certificate watch {name}"));
                h.id()
            });
            self.watches.insert(
                vip.to_string(),
                Watch {
                    health: health.clone(),
                    tls: rx,
                    task,
                    _stop: stop_tx,
                },
            );
        }

        let wanted: HashMap<u32, &ProbeSpec> = specs
            .iter()
            .filter(|s| s.health.kind != HealthKind::None)
            .map(|s| (s.backend, s))
            .collect();
        let stale: Vec<u32> = self
            .running
            .iter()
            .filter(|(b, p)| {
                wanted.get(b).is_none_or(|s| **s != p.spec)
                    || !self.watches.contains_key(&p.spec.vip)
            })
            .map(|(b, _)| *b)
            .collect();
        let stopped = stale.len();
        for b in stale {
            if let Some(p) = self.running.remove(&b) {
                self.stop(p.task);
            }
        }
        let mut started = 0;
        for (b, spec) in wanted {
            if self.running.contains_key(&b) {
                continue;
            }
            let Some(w) = self.watches.get(&spec.vip) else {
                continue;
            };
            let mut target = Target::new(spec.addr, &spec.health, w.tls.borrow().clone())
                .with_tls_updates(w.tls.clone());
            if let (Some((mode, vip)), Some(local)) = (spec.dsr, &self.local) {
                target.vip_path = Some(VipPathCheck {
                    local: local.clone(),
                    mode,
                    vip: *vip.ip(),
                    port: vip.port(),
                });
            }
            let id = self.next_id;
            self.next_id += 1;
            let (stop_tx, stop_rx) = watch::channel(false);
            let h = self.set.spawn(run_prober(
                b,
                id,
                target,
                spec.health.interval,
                self.events.clone(),
                stop_rx,
            ));
            self.names
                .insert(h.id(), format!("prober {}/{}", spec.vip, spec.name));
            self.running.insert(
                b,
                Prober {
                    id,
                    spec: spec.clone(),
                    task: h.id(),
                    _stop: stop_tx,
                },
            );
            started += 1;
        }
        Ok((started, stopped))
    }

    /// Waits until a prober or watch ends without being told to, and names it; pending
    /// forever while all of them run.
    pub async fn failure(&mut self) -> String {
        loop {
            let Some(r) = self.set.join_next_with_id().await else {
                return std::future::pending().await;
            };
            let (id, how) = match r {
                Ok((id, ())) => (id, "returned".to_string()),
                Err(e) if e.is_panic() => (e.id(), "panicked".to_string()),
                Err(e) => (e.id(), "was cancelled".to_string()),
            };
            let name = self.names.remove(&id).unwrap_or_else(|| "?".into());
            if self.stopping.remove(&id) && how != "panicked" {
                continue;
            }
            return format!("task {name} {how}");
        }
    }
}
