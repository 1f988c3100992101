//! Reloading the config in place (`lb-agent reload`, SIGHUP): the file is checked as
//! `check-config` checks it, compared with the running config (`config::diff`), and what
//! may change in place is applied by the keeper (plans, maps, probers, tracking) and the VRRP
//! instance (priority, notify, gratuitous ARP). Anything else is refused with one line and
//! nothing changes.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use tokio::sync::{mpsc, oneshot, watch};

use super::keeper::Order;
use crate::{
    config::{diff, Config, ConfigError, Mode, VrrpConfig},
    host::{self, Sysctls},
};

/// What a reload needs of the running agent.
pub struct Serving {
    /// The config the agent runs with.
    pub config: Config,
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
        let mut changes = diff::diff(&self.config, &new).map_err(|e| e.to_string())?;
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
        let (reply, answer) = oneshot::channel();
        self.keeper
            .send(Order::Reload {
                config: Box::new(new.clone()),
                reply,
            })
            .await
            .map_err(|_| "the keeper is not running".to_string())?;
        let notes = answer
            .await
            .map_err(|_| "the keeper ended during the reload".to_string())??;
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
        self.config = new;
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
}
