//! Reloading the config in place (`lb-agent reload`, SIGHUP): the file is checked as
//! `check-config` checks it, compared with the running config (`config::diff`), and what
//! may change in place is applied by the keeper (plans, maps, probers, tracking) and the VRRP
//! instance (priority, notify, gratuitous ARP). Anything else is refused with one line and
//! nothing changes.
//!
//! The apiservers discovery finds (`crate::discovery`) go the same way: the file's config
//! with the discovered backends in place of a VIP's seed is served as a reloaded one would
//! be, and a reload of the file keeps what was discovered.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use tokio::sync::{mpsc, oneshot, watch};

use super::keeper::Order;
use crate::{
    config::{check_backends, diff, Config, ConfigError, Mode, VrrpConfig},
    discovery::{self, set_status, Follow, Found},
    host::{self, Sysctls},
};

/// What a reload needs of the running agent.
pub struct Serving {
    /// The config the agent runs with, as its file has it (a discovering VIP's backends
    /// there are its seed).
    pub config: Config,
    /// What the keeper serves: `config` with the discovered backends in place.
    pub applied: Config,
    /// Per VIP, the apiservers discovery found that are served (`applied`).
    pub discovered: BTreeMap<String, Found>,
    /// The VIPs discovery follows (the discovery task keeps its followers in step).
    pub follow: watch::Sender<Vec<Follow>>,
    /// Discovery's status, for `lb-agent status`.
    pub discovery: discovery::Shared,
    pub sysctls: Sysctls,
    pub keeper: mpsc::Sender<Order>,
    /// The VRRP instance's settings, when `[vrrp]` is configured.
    pub vrrp: Option<watch::Sender<VrrpConfig>>,
    /// The interface's primary address: the SNAT address of VIPs that name none
    /// (unspecified when the interface had none at start).
    pub default_snat: Ipv4Addr,
}

impl Serving {
    /// The file the agent's config came from.
    pub fn path(&self) -> &Path {
        self.config
            .source
            .as_ref()
            .map_or(self.config.path.as_path(), |s| s.path.as_path())
    }

    /// Reads `path` (or the agent's own file), checks it and applies what changed; returns
    /// one line per change, or the one-line reason nothing changed.
    pub async fn reload(&mut self, path: Option<PathBuf>) -> Result<Vec<String>, String> {
        let path = path.unwrap_or_else(|| self.path().to_path_buf());
        let new = host::load_checked(&path).await.map_err(|e| e.to_string())?;
        // What discovery found stays, for the VIPs that still follow the EndpointSlice.
        let discovered: BTreeMap<String, Found> = self
            .discovered
            .iter()
            .filter(|(vip, _)| {
                new.vips
                    .iter()
                    .any(|v| &v.name == *vip && v.discovery.is_some())
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let applied = discovery::effective(&new, &discovered);
        check_backends(&applied).map_err(|e| {
            format!(
                "{}: the backends discovery found do not fit this config: {e}",
                new.path.display()
            )
        })?;
        let mut changes = diff::diff(&self.applied, &applied).map_err(|e| e.to_string())?;
        if self.default_snat.is_unspecified() {
            if let Some(i) = new
                .vips
                .iter()
                .position(|v| v.mode != Mode::Socket && v.snat_address.is_none())
            {
                return Err(ConfigError {
                    file: new.path.clone(),
                    field: format!("vip[{i}].snat_address"),
                    message: format!(
                        "not set, and interface {} had no IPv4 address when the agent started",
                        new.agent.interface.as_deref().unwrap_or_default()
                    ),
                }
                .to_string());
            }
        }
        let old_path = self.path().to_path_buf();
        let new_path = new
            .source
            .as_ref()
            .map_or(new.path.clone(), |s| s.path.clone());
        let sha = |c: &Config| {
            c.source
                .as_ref()
                .map(|s| s.sha256.clone())
                .unwrap_or_default()
        };
        let (old_sha, new_sha) = (sha(&self.config), sha(&new));
        if new_path != old_path {
            changes.insert(
                0,
                format!(
                    "config file: {} -> {}",
                    old_path.display(),
                    new_path.display()
                ),
            );
        }
        let ranges = super::snat_ranges(&new);
        self.sysctls
            .reserve_ports(&ranges)
            .map_err(|e| format!("reserving the new VIPs' SNAT ports: {e}"))?;
        let notes = self.serve(&applied).await?;
        if let (Some(tx), Some(v)) = (&self.vrrp, &new.vrrp) {
            tx.send_if_modified(|old| {
                let changed = old != v;
                *old = v.clone();
                changed
            });
        }
        if new.agent.log_level != self.config.agent.log_level && !crate::logging::level_from_env() {
            let level = new
                .agent
                .log_level
                .as_deref()
                .unwrap_or(crate::logging::DEFAULT_LEVEL);
            if let Err(e) = crate::logging::set_level(level) {
                log::error!("agent.log_level: {e}");
            }
        }
        for (vip, f) in &self.discovered {
            if !discovered.contains_key(vip) {
                log::info!("VIP {vip}: discovery off, the configured backends apply (the EndpointSlice listed {} at rv {})", f.backends.len(), f.resource_version);
            }
        }
        let follows = discovery::follows(&new);
        self.follow.send_if_modified(|f| {
            let changed = *f != follows;
            *f = follows;
            changed
        });
        self.config = new;
        self.applied = applied;
        self.discovered = discovered;
        changes.extend(notes);
        if changes.is_empty() {
            changes.push(if new_sha == old_sha {
                "no changes".to_string()
            } else {
                format!(
                    "no changes that matter (the file differs: SHA-256 {} -> {})",
                    &old_sha.get(..12).unwrap_or(""),
                    new_sha.get(..12).unwrap_or("")
                )
            });
        }
        Ok(changes)
    }

    /// Has the keeper serve `config`; the keeper's notes on what that did.
    async fn serve(&self, config: &Config) -> Result<Vec<String>, String> {
        let (reply, answer) = oneshot::channel();
        self.keeper
            .send(Order::Reload {
                config: Box::new(config.clone()),
                reply,
            })
            .await
            .map_err(|_| "the keeper is not running".to_string())?;
        answer
            .await
            .map_err(|_| "the keeper ended during the reload".to_string())?
    }

    /// Serves what discovery found for a VIP: its backends become the apiservers found
    /// (`discovery::effective`), unless the list is empty (an apiserver-side problem, not
    /// zero apiservers) or does not fit the config; each change is logged once.
    pub async fn discovered(&mut self, found: Found) {
        let vip = found.vip.clone();
        if !self
            .config
            .vips
            .iter()
            .any(|v| v.name == vip && v.discovery.is_some())
        {
            // From a follower a reload has stopped since.
            return;
        }
        set_status(&self.discovery, &vip, |s| {
            s.resource_version = Some(found.resource_version.clone());
            s.updated_unix = Some(found.at_unix);
            s.listed = found.backends.iter().map(|a| a.to_string()).collect();
        });
        let hold = |this: &Self, why: String| {
            let mut first = false;
            set_status(&this.discovery, &vip, |s| {
                first = s.held.as_deref() != Some(why.as_str());
                s.held = Some(why.clone());
            });
            if first {
                log::warn!(
                    "VIP {vip}: discovery (EndpointSlice rv {} via {}): {why}",
                    found.resource_version,
                    found.via
                );
            }
        };
        if found.backends.is_empty() {
            return hold(
                self,
                "the EndpointSlice lists no ready IPv4 apiserver; the current backends are kept (an empty list means a problem on the apiservers' side, not that there are none)".into(),
            );
        }
        let mut discovered = self.discovered.clone();
        let same = discovered
            .get(&vip)
            .is_some_and(|d| d.backends == found.backends);
        discovered.insert(vip.clone(), found.clone());
        if !same {
            let applied = discovery::effective(&self.config, &discovered);
            if let Err(e) = check_backends(&applied) {
                return hold(
                    self,
                    format!("not applied, the current backends are kept: {e}"),
                );
            }
            let lines = match diff::diff(&self.applied, &applied) {
                Ok(l) => l,
                Err(e) => return hold(self, format!("not applied: {e}")),
            };
            if !lines.is_empty() {
                match self.serve(&applied).await {
                    Ok(notes) => {
                        for l in lines.iter().chain(&notes) {
                            log::info!(
                                "discovery (EndpointSlice rv {} via {}): {l}",
                                found.resource_version,
                                found.via
                            );
                        }
                    }
                    Err(e) => return hold(self, format!("not applied: {e}")),
                }
            }
            self.applied = applied;
        }
        self.discovered = discovered;
        set_status(&self.discovery, &vip, |s| {
            s.source = "endpointslice".into();
            s.held = None;
        });
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeSet,
        sync::{Arc, Mutex},
    };

    use super::*;

    const CONFIG: &str =
        "[[vip]]\nname = \"api\"\naddress = \"127.0.0.1\"\nport = 6443\nmode = \"socket\"\n\
        [vip.discovery]\nkubernetes = true\n\
        [[vip.backend]]\nname = \"master01\"\naddress = \"192.0.2.11\"\n\
        [[vip.backend]]\nname = \"master02\"\naddress = \"192.0.2.12\"\n";

    /// A Serving whose keeper records the configs it is told to serve.
    fn serving() -> (Serving, Arc<Mutex<Vec<Config>>>) {
        let config = Config::parse(Path::new("lb.toml"), CONFIG).unwrap();
        let (keeper, mut orders) = mpsc::channel(4);
        let served = Arc::new(Mutex::new(Vec::new()));
        let s = served.clone();
        tokio::spawn(async move {
            while let Some(Order::Reload { config, reply }) = orders.recv().await {
                s.lock().unwrap().push(*config);
                let _ = reply.send(Ok(Vec::new()));
            }
        });
        let serving = Serving {
            applied: config.clone(),
            config,
            discovered: BTreeMap::new(),
            follow: watch::channel(Vec::new()).0,
            discovery: discovery::Shared::default(),
            sysctls: Sysctls::inherit(Vec::new()),
            keeper,
            vrrp: None,
            default_snat: Ipv4Addr::UNSPECIFIED,
        };
        (serving, served)
    }

    fn found(vip: &str, rv: &str, list: &[&str]) -> Found {
        Found {
            vip: vip.into(),
            backends: list
                .iter()
                .map(|a| a.parse().unwrap())
                .collect::<BTreeSet<_>>(),
            resource_version: rv.into(),
            via: "192.0.2.11:6443".into(),
            at_unix: 1_795_000_000,
        }
    }

    fn backends(c: &Config) -> Vec<String> {
        c.vips[0]
            .backends
            .iter()
            .map(|b| format!("{} {}:{}", b.name, b.address, b.port))
            .collect()
    }

    fn status(s: &Serving) -> discovery::DiscoveryStatus {
        s.discovery.lock().unwrap()["api"].clone()
    }

    #[tokio::test]
    async fn what_discovery_finds_is_served_once_and_an_empty_list_is_held() {
        let (mut s, served) = serving();
        s.discovered(found(
            "api",
            "7",
            &["192.0.2.11:6443", "192.0.2.12:6443", "192.0.2.13:6443"],
        ))
        .await;
        let want = [
            "master01 192.0.2.11:6443",
            "master02 192.0.2.12:6443",
            "192.0.2.13 192.0.2.13:6443",
        ];
        assert_eq!(backends(&served.lock().unwrap()[0]), want);
        assert_eq!(backends(&s.applied), want);
        assert_eq!(
            backends(&s.config).len(),
            2,
            "the file's config is the seed"
        );
        assert_eq!(status(&s).source, "endpointslice");

        // The same apiservers at a later version: nothing to serve anew.
        s.discovered(found(
            "api",
            "8",
            &["192.0.2.11:6443", "192.0.2.12:6443", "192.0.2.13:6443"],
        ))
        .await;
        assert_eq!(served.lock().unwrap().len(), 1);
        assert_eq!(status(&s).resource_version.as_deref(), Some("8"));

        // Empty: held, the backends stay.
        s.discovered(found("api", "9", &[])).await;
        assert_eq!(served.lock().unwrap().len(), 1);
        assert_eq!(backends(&s.applied), want);
        assert!(status(&s).held.unwrap().contains("no ready IPv4 apiserver"));

        // One gone: removed (the keeper drains or resets it as a reload would).
        s.discovered(found("api", "10", &["192.0.2.11:6443", "192.0.2.13:6443"]))
            .await;
        assert_eq!(
            backends(&served.lock().unwrap()[1]),
            ["master01 192.0.2.11:6443", "192.0.2.13 192.0.2.13:6443"]
        );
        assert_eq!(status(&s).held, None);

        // From a follower of a VIP that follows nothing (any more): ignored.
        s.discovered(found("nope", "1", &["192.0.2.14:6443"])).await;
        assert_eq!(served.lock().unwrap().len(), 2);
    }
}
