//! The `[vip.discovery]` section: whether the agent follows the `kubernetes` Service's
//! EndpointSlice for the VIP's backends (`crate::discovery`), and with which credentials.

use std::{collections::HashSet, path::PathBuf};

use lb_common::{MAX_BACKENDS, NAME_LEN};
use serde::Deserialize;

use super::{issue, validate_table_size, Config, Issue};

/// Where kubeadm leaves the kubelet's credentials on every node.
pub const DEFAULT_KUBECONFIG: &str = "/etc/kubernetes/kubelet.conf";

/// `[vip.discovery]` with `kubernetes = true`: the configured backends are a seed, and the
/// agent replaces them with the apiservers the `kubernetes` EndpointSlice lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryConfig {
    /// The kubeconfig whose current context's user the agent authenticates as (its
    /// client certificate or token; its server URL is not used: the agent asks the VIP's
    /// backends directly).
    pub kubeconfig: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [vip.discovery] table")]
pub(super) struct RawDiscovery {
    kubernetes: Option<bool>,
    kubeconfig: Option<String>,
}

/// None unless `kubernetes = true`.
pub(super) fn validate_discovery(
    i: usize,
    raw: RawDiscovery,
) -> Result<Option<DiscoveryConfig>, Issue> {
    let kubeconfig = match raw.kubeconfig {
        None => PathBuf::from(DEFAULT_KUBECONFIG),
        Some(s) if s.trim().is_empty() => {
            return Err(issue(
                format!("vip[{i}].discovery.kubeconfig"),
                "must not be empty",
            ))
        }
        Some(s) => PathBuf::from(s),
    };
    Ok(raw
        .kubernetes
        .unwrap_or(false)
        .then_some(DiscoveryConfig { kubeconfig }))
}

/// Checks what validation checks of the backend lists, for a config whose lists discovery
/// replaced: the file was valid, the apiservers' list may not fit it (too many backends for
/// the Maglev table, a port a DSR VIP cannot use). The error names the VIP.
pub fn check_backends(config: &Config) -> Result<(), String> {
    let mut total = 0;
    for (i, v) in config.vips.iter().enumerate() {
        let at = |what: String| format!("VIP {}: {what}", v.name);
        if v.backends.is_empty() {
            return Err(at("no backend".into()));
        }
        total += v.backends.len();
        validate_table_size(
            &format!("vip[{i}].maglev_table_size"),
            Some(i64::from(v.maglev_table_size)),
            v.backends.len(),
        )
        .map_err(|e| at(format!("{}: {}", e.field, e.message)))?;
        let mut names = HashSet::new();
        let mut endpoints = HashSet::new();
        for b in &v.backends {
            if b.name.is_empty() || b.name.len() > NAME_LEN - 1 || !names.insert(&b.name) {
                return Err(at(format!(
                    "backend name {:?} is empty, too long or taken",
                    b.name
                )));
            }
            if !endpoints.insert((b.address, b.port)) {
                return Err(at(format!("backend {}:{} twice", b.address, b.port)));
            }
            if v.mode.is_dsr() && b.port != v.port {
                return Err(at(format!(
                    "backend {}:{}: in {} mode a backend must listen on the VIP's port {}",
                    b.address,
                    b.port,
                    v.mode.as_str(),
                    v.port
                )));
            }
        }
    }
    if total > MAX_BACKENDS as usize {
        return Err(format!(
            "{total} backends across all VIPs; at most {MAX_BACKENDS} are supported"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{assert_err, minimal, parse};

    use super::*;

    #[test]
    fn off_unless_asked() {
        let cfg = parse(&minimal("", "")).unwrap();
        assert_eq!(cfg.vips[0].discovery, None);
        let cfg = parse(&minimal("[vip.discovery]\nkubernetes = false", "")).unwrap();
        assert_eq!(cfg.vips[0].discovery, None);
    }

    #[test]
    fn kubernetes_with_the_default_kubeconfig_or_another() {
        let cfg = parse(&minimal(
            "mode = \"socket\"\n[vip.discovery]\nkubernetes = true",
            "",
        ))
        .unwrap();
        assert_eq!(
            cfg.vips[0].discovery,
            Some(DiscoveryConfig {
                kubeconfig: DEFAULT_KUBECONFIG.into()
            })
        );
        // Every mode may use it.
        let cfg = parse(&minimal(
            "[vip.discovery]\nkubernetes = true\nkubeconfig = \"/etc/lb/kubeconfig\"",
            "",
        ))
        .unwrap();
        assert_eq!(
            cfg.vips[0].discovery.as_ref().unwrap().kubeconfig,
            PathBuf::from("/etc/lb/kubeconfig")
        );
    }

    #[test]
    fn replaced_lists_are_checked_as_the_file_is() {
        let mut cfg = parse(&minimal("maglev_table_size = 211", "")).unwrap();
        check_backends(&cfg).unwrap();
        let mut b = cfg.vips[0].backends[0].clone();
        b.name = "198.18.0.12".into();
        b.address = "198.18.0.12".parse().unwrap();
        cfg.vips[0].backends.push(b.clone());
        check_backends(&cfg).unwrap();
        let mut third = b.clone();
        third.name = "198.18.0.13".into();
        third.address = "198.18.0.13".parse().unwrap();
        cfg.vips[0].backends.push(third);
        let e = check_backends(&cfg).unwrap_err();
        assert!(
            e.starts_with("VIP api: vip[0].maglev_table_size: 211 is too small for 3 backends"),
            "{e}"
        );
        cfg.vips[0].backends.pop();
        cfg.vips[0].maglev_table_size = 65537;
        cfg.vips[0].backends.push(b);
        let e = check_backends(&cfg).unwrap_err();
        assert!(
            e.contains("\"198.18.0.12\" is empty, too long or taken"),
            "{e}"
        );
        let mut cfg = parse(&minimal("mode = \"dsr-l2\"", "")).unwrap();
        cfg.vips[0].backends[0].port = 443;
        let e = check_backends(&cfg).unwrap_err();
        assert!(e.contains("must listen on the VIP's port 6443"), "{e}");
    }

    #[test]
    fn mistakes_name_the_field() {
        let err = assert_err(
            &minimal("[vip.discovery]\nkubernetes = true\nkubeconfig = \"\"", ""),
            "vip[0].discovery.kubeconfig",
            "must not be empty",
        );
        assert_eq!(
            err.to_string(),
            "/etc/lb/lb.toml: vip[0].discovery.kubeconfig: must not be empty"
        );
        assert_err(
            &minimal("[vip.discovery]\nkubernetes = true\nendpoints = true", ""),
            "vip[0].discovery.endpoints",
            "unknown field \"endpoints\"",
        );
        assert_err(
            &minimal("[vip.discovery]\nkubernetes = \"yes\"", ""),
            "vip[0].discovery.kubernetes",
            "invalid type",
        );
    }
}
