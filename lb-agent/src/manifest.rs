//! `lb-agent manifest static-pod`: a Kubernetes static-pod manifest that runs the agent on a
//! control-plane node, for /etc/kubernetes/manifests.
//!
//! The manifest is written as text, not serialized from a model, because it is printed for
//! people: its comments say why the pod needs each privilege and each host path.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use lb_common::{DEFAULT_CONFIG, DEFAULT_CONTROL_SOCKET};

use crate::config::DEFAULT_CA_FILE;

/// The image `--image` defaults to: this binary's own release.
pub const DEFAULT_IMAGE: &str = concat!("ghcr.io/lb-project/lb-agent:", env!("CARGO_PKG_VERSION"));
/// Where the image (the repository's Containerfile) installs the agent.
pub const IMAGE_BINARY: &str = "/usr/sbin/lb-agent";
/// The bpffs root the pins live under (`agent.pin_path` defaults to /sys/fs/bpf/lb).
const BPFFS: &str = "/sys/fs/bpf";

/// What `lb-agent manifest static-pod` was asked for (its command line).
#[derive(Debug, Clone, clap::Args)]
pub struct StaticPodOptions {
    /// The config file on the host; the pod mounts its directory read-only at the same path.
    #[arg(long, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// The container image holding the agent at /usr/sbin/lb-agent.
    #[arg(long, default_value = DEFAULT_IMAGE)]
    pub image: String,
}

impl Default for StaticPodOptions {
    fn default() -> Self {
        Self {
            config: DEFAULT_CONFIG.into(),
            image: DEFAULT_IMAGE.into(),
        }
    }
}

/// Why no manifest could be made from the options.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("--config {0}: must be an absolute path (the kubelet mounts it from the host)")]
    RelativeConfig(PathBuf),
    #[error(
        "--config {0}: must be in a directory other than / (the pod mounts the config's directory)"
    )]
    ConfigInRoot(PathBuf),
    #[error("--config {0}: must be valid UTF-8 to be written into the manifest")]
    NotUtf8(PathBuf),
    #[error("--image must not be empty")]
    NoImage,
}

/// A host directory the pod mounts at the same path.
struct Mount {
    name: &'static str,
    path: String,
    /// The hostPath type: what the kubelet checks (or creates) before starting the pod.
    kind: &'static str,
    read_only: bool,
    propagation: Option<&'static str>,
    /// Comment lines above the volume: why the pod needs it.
    why: &'static str,
}

/// The static-pod manifest (YAML, with comments) that runs `lb-agent run` as `opts` say.
pub fn static_pod(opts: &StaticPodOptions) -> Result<String, ManifestError> {
    let config = opts
        .config
        .to_str()
        .ok_or_else(|| ManifestError::NotUtf8(opts.config.clone()))?;
    if !opts.config.is_absolute() {
        return Err(ManifestError::RelativeConfig(opts.config.clone()));
    }
    let config_dir = match opts.config.parent() {
        Some(d) if d != Path::new("/") => d.to_str().expect("a prefix of a UTF-8 path"),
        _ => return Err(ManifestError::ConfigInRoot(opts.config.clone())),
    };
    if opts.image.trim().is_empty() {
        return Err(ManifestError::NoImage);
    }
    let socket_dir = parent(DEFAULT_CONTROL_SOCKET);
    let pki_dir = parent(DEFAULT_CA_FILE);

    let mut mounts = Vec::new();
    // A config kept in a directory mounted anyway needs no volume of its own: two mounts at
    // one path are refused.
    if ![BPFFS, socket_dir, pki_dir].contains(&config_dir) {
        mounts.push(Mount {
            name: "config",
            path: config_dir.to_string(),
            kind: "Directory",
            read_only: true,
            propagation: None,
            why: "The config file's directory, not the file: an editor replaces the file, and a\n\
                  mount of the file would keep showing the old one to `lb-agent reload`. The\n\
                  same path as on the host, so `lb-agent reload --config` there names it too.",
        });
    }
    mounts.extend([
        Mount {
            name: "bpffs",
            path: BPFFS.into(),
            kind: "DirectoryOrCreate",
            read_only: false,
            propagation: Some("Bidirectional"),
            why: "The pinned maps and XDP link (agent.pin_path). Bidirectional: where the host has\n\
                  no bpffs mounted here the agent mounts it, and the mount must be the host's so\n\
                  the pins outlive the container (the pinned link keeps forwarding through a\n\
                  crash) and `lb-agent status` on the host sees them. It requires privileged.",
        },
        Mount {
            name: "run",
            path: socket_dir.into(),
            kind: "Directory",
            read_only: false,
            propagation: None,
            why: "The control socket (agent.control_socket, default /run/lb-agent.sock) and its\n\
                  lock: `lb-agent status`, `reload` and `drain` on the host reach the agent, and an\n\
                  agent under systemd and this one never run at once. Mount the socket's\n\
                  directory instead if the config puts it elsewhere.",
        },
        Mount {
            name: "pki",
            path: pki_dir.into(),
            kind: "DirectoryOrCreate",
            read_only: true,
            propagation: None,
            why: "The CA the health probes verify the apiservers with (health.ca_file, default\n\
                  /etc/kubernetes/pki/ca.crt). A file the config names elsewhere (a CA, a\n\
                  client_cert or client_key, a notify script) needs a mount like this one.",
        },
    ]);

    let mut y = String::new();
    let w = &mut y;
    // Writing to a String cannot fail: the results of write! are ignored throughout.
    let _ = write!(
        w,
        "\
# lb-agent as a Kubernetes static pod, from `lb-agent manifest static-pod` ({version}).
# Save it as /etc/kubernetes/manifests/lb-agent.yaml on each control-plane node that is an
# LB host: the kubelet runs it there, with no apiserver needed, and restarts it if it exits.
# The agent works on the host itself: its network (XDP on agent.interface, the VIP, VRRP),
# its bpffs (the pinned maps) and its sysctls; the config stays a file on the host.
apiVersion: v1
kind: Pod
metadata:
  name: lb-agent
  namespace: kube-system
  labels:
    component: lb-agent
    tier: control-plane
spec:
  # The host's interfaces, addresses and VRRP adverts: the pod's own network would have none.
  hostNetwork: true
  # It carries the API endpoint: evicted last, like the apiserver it fronts.
  priorityClassName: system-node-critical
  restartPolicy: Always
  # On SIGTERM the agent gives up the VIP (VRRP priority 0), forwards a moment longer while
  # the peer LB takes over, then detaches and removes its pins: about 7 s at most.
  terminationGracePeriodSeconds: 30
  # The kubelet starts a static pod whatever the node's taints; this keeps the mirror pod
  # (and a copy of this spec used elsewhere) consistent with where it runs.
  tolerations:
  - key: node-role.kubernetes.io/control-plane
    operator: Exists
    effect: NoSchedule
  containers:
  - name: lb-agent
    image: {image}
    command: [{bin}, \"run\", \"--config\", {config}]
    # No livenessProbe: the agent has no health endpoint yet, and `lb-agent status` exits 0
    # whenever the maps are pinned, as they stay after a crash, answering agent or not. An
    # agent whose supervised task fails exits non-zero by itself; the kubelet restarts it.
    securityContext:
      # privileged: the agent writes sysctls under /proc/sys (forwarding, accept_local and
      # send_redirects of agent.interface, ip_local_reserved_ports for the SNAT ranges),
      # which a container otherwise has read-only; /sys/fs/bpf's Bidirectional mount needs
      # it too. It grants every capability: the list below says which the agent uses.
      privileged: true
      capabilities:
        add:
        - NET_ADMIN  # attaching XDP, the VIP addresses (rtnetlink), the sysctls
        - NET_RAW    # VRRP's raw socket and gratuitous ARPs; DSR VIP-path probes
        - BPF        # loading the XDP program and creating its maps
        - PERFMON    # the verifier accepts the program's packet pointer arithmetic only with it
        - SYS_ADMIN  # mounting bpffs at /sys/fs/bpf where the host has not
        - SYS_NICE   # vrrp.rt_priority: SCHED_RR for the VRRP thread
        - CHOWN      # agent.control_socket_group: the socket and pins given to the group
    volumeMounts:
",
        version = crate::VERSION,
        image = scalar(&opts.image),
        bin = quoted(IMAGE_BINARY),
        config = quoted(config),
    );
    for m in &mounts {
        let _ = writeln!(
            w,
            "    - name: {}\n      mountPath: {}",
            m.name,
            scalar(&m.path)
        );
        if m.read_only {
            let _ = writeln!(w, "      readOnly: true");
        }
        if let Some(p) = m.propagation {
            let _ = writeln!(w, "      mountPropagation: {p}");
        }
    }
    let _ = writeln!(w, "  volumes:");
    for m in &mounts {
        for line in m.why.lines() {
            let _ = writeln!(w, "  # {}", line.trim_start());
        }
        let _ = writeln!(
            w,
            "  - name: {}\n    hostPath:\n      path: {}\n      type: {}",
            m.name,
            scalar(&m.path),
            m.kind
        );
    }
    Ok(y)
}

/// The directory of an absolute default path.
fn parent(path: &'static str) -> &'static str {
    path.rsplit_once('/').map_or("/", |(dir, _)| dir)
}

/// `s` as a double-quoted YAML scalar: JSON's string escapes are YAML's too.
fn quoted(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// `s` plain where YAML reads it back as the same string, quoted otherwise.
fn scalar(s: &str) -> String {
    let safe = s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._:@+-".contains(c));
    // Letters alone may be a keyword (true, no, null...), a leading digit a number or date.
    let plain = safe
        && s.starts_with(|c: char| c == '/' || c.is_ascii_alphabetic())
        && !s.chars().all(|c| c.is_ascii_alphabetic());
    if plain {
        s.to_string()
    } else {
        quoted(s)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    use super::*;

    // The part of Kubernetes' Pod the manifest uses, all of it: a field the manifest gains
    // or misspells fails to parse here.

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    struct Pod {
        api_version: String,
        kind: String,
        metadata: Metadata,
        spec: Spec,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Metadata {
        name: String,
        namespace: String,
        labels: BTreeMap<String, String>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    struct Spec {
        host_network: bool,
        priority_class_name: String,
        restart_policy: String,
        termination_grace_period_seconds: u32,
        tolerations: Vec<Toleration>,
        containers: Vec<Container>,
        volumes: Vec<Volume>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Toleration {
        key: String,
        operator: String,
        effect: String,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    struct Container {
        name: String,
        image: String,
        command: Vec<String>,
        security_context: SecurityContext,
        volume_mounts: Vec<VolumeMount>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct SecurityContext {
        privileged: bool,
        capabilities: Capabilities,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Capabilities {
        add: Vec<String>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    struct VolumeMount {
        name: String,
        mount_path: String,
        #[serde(default)]
        read_only: bool,
        mount_propagation: Option<String>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    struct Volume {
        name: String,
        host_path: HostPath,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct HostPath {
        path: String,
        #[serde(rename = "type")]
        kind: String,
    }

    fn parse(opts: &StaticPodOptions) -> Pod {
        let yaml = static_pod(opts).expect("a manifest");
        serde_norway::from_str(&yaml).unwrap_or_else(|e| panic!("{e}:\n{yaml}"))
    }

    /// The host path mounted at `path`, with its mount, checking both name one volume.
    fn mounted<'a>(pod: &'a Pod, path: &str) -> (&'a VolumeMount, &'a HostPath) {
        let c = &pod.spec.containers[0];
        let m = c
            .volume_mounts
            .iter()
            .find(|m| m.mount_path == path)
            .unwrap_or_else(|| panic!("nothing mounted at {path}: {:?}", c.volume_mounts));
        let v = pod
            .spec
            .volumes
            .iter()
            .find(|v| v.name == m.name)
            .unwrap_or_else(|| panic!("no volume {}", m.name));
        assert_eq!(v.host_path.path, path, "mounted at the host's path");
        (m, &v.host_path)
    }

    /// What every manifest must say, whatever the options.
    fn check_common(pod: &Pod) {
        assert_eq!(pod.api_version, "v1");
        assert_eq!(pod.kind, "Pod");
        assert_eq!(pod.metadata.name, "lb-agent");
        assert_eq!(pod.metadata.namespace, "kube-system");
        assert_eq!(pod.metadata.labels["component"], "lb-agent");
        assert_eq!(pod.metadata.labels["tier"], "control-plane");
        let s = &pod.spec;
        assert!(s.host_network);
        assert_eq!(s.priority_class_name, "system-node-critical");
        assert_eq!(s.restart_policy, "Always");
        assert_eq!(s.termination_grace_period_seconds, 30);
        assert!(s
            .tolerations
            .iter()
            .any(|t| t.key == "node-role.kubernetes.io/control-plane"
                && t.operator == "Exists"
                && t.effect == "NoSchedule"));
        assert_eq!(s.containers.len(), 1);
        let c = &s.containers[0];
        assert_eq!(c.name, "lb-agent");
        assert!(c.security_context.privileged);
        for cap in ["NET_ADMIN", "NET_RAW", "BPF", "PERFMON", "SYS_ADMIN"] {
            assert!(
                c.security_context.capabilities.add.iter().any(|c| c == cap),
                "{cap}"
            );
        }
        let (m, h) = mounted(pod, "/sys/fs/bpf");
        assert_eq!(m.mount_propagation.as_deref(), Some("Bidirectional"));
        assert!(!m.read_only);
        assert_eq!(h.kind, "DirectoryOrCreate");
        let (m, _) = mounted(pod, "/run");
        assert!(!m.read_only, "the agent creates its socket there");
        let (m, _) = mounted(pod, "/etc/kubernetes/pki");
        assert!(m.read_only);
        // The kubelet refuses a pod with two volumes or two mounts of one name or path.
        let mut names: Vec<_> = s.volumes.iter().map(|v| &v.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), s.volumes.len(), "volume names unique");
        let mut paths: Vec<_> = c.volume_mounts.iter().map(|m| &m.mount_path).collect();
        paths.sort();
        paths.dedup();
        assert_eq!(paths.len(), c.volume_mounts.len(), "mount paths unique");
        assert_eq!(
            s.volumes.len(),
            c.volume_mounts.len(),
            "every volume mounted"
        );
    }

    #[test]
    fn the_default_manifest_runs_the_default_config_with_this_release() {
        let pod = parse(&StaticPodOptions::default());
        check_common(&pod);
        let c = &pod.spec.containers[0];
        assert_eq!(
            c.image,
            format!("ghcr.io/lb-project/lb-agent:{}", env!("CARGO_PKG_VERSION"))
        );
        assert_eq!(
            c.command,
            ["/usr/sbin/lb-agent", "run", "--config", "/etc/lb/lb.toml"]
        );
        let (m, h) = mounted(&pod, "/etc/lb");
        assert!(m.read_only);
        assert_eq!(h.kind, "Directory");
    }

    #[test]
    fn a_custom_config_and_image_are_what_the_pod_runs_and_mounts() {
        let pod = parse(&StaticPodOptions {
            config: "/etc/custom/x.toml".into(),
            image: "registry.example/lb/lb-agent:v9".into(),
        });
        check_common(&pod);
        let c = &pod.spec.containers[0];
        assert_eq!(c.image, "registry.example/lb/lb-agent:v9");
        assert_eq!(
            c.command,
            [
                "/usr/sbin/lb-agent",
                "run",
                "--config",
                "/etc/custom/x.toml"
            ]
        );
        let (m, _) = mounted(&pod, "/etc/custom");
        assert!(m.read_only);
        assert!(
            c.volume_mounts.iter().all(|m| m.mount_path != "/etc/lb"),
            "the default config directory is not mounted"
        );
    }

    #[test]
    fn values_yaml_would_misread_are_quoted() {
        let pod = parse(&StaticPodOptions {
            config: "/etc/lb conf/#1: x.toml".into(),
            image: "true".into(),
        });
        let c = &pod.spec.containers[0];
        assert_eq!(c.image, "true");
        assert_eq!(c.command[3], "/etc/lb conf/#1: x.toml");
        mounted(&pod, "/etc/lb conf");
        for s in ["null", "1.0", "0x1f", "-x", ".inf", "a b", "~"] {
            assert_eq!(
                serde_norway::from_str::<String>(&scalar(s)).unwrap(),
                s,
                "{s}"
            );
        }
        assert_eq!(scalar("/etc/lb"), "/etc/lb");
        assert_eq!(scalar(DEFAULT_IMAGE), DEFAULT_IMAGE);
    }

    #[test]
    fn a_config_in_a_directory_mounted_anyway_gets_no_second_mount() {
        let pod = parse(&StaticPodOptions {
            config: "/run/lb.toml".into(),
            ..Default::default()
        });
        check_common(&pod);
        assert_eq!(pod.spec.containers[0].command[3], "/run/lb.toml");
    }

    #[test]
    fn relative_or_root_configs_and_empty_images_are_refused() {
        let err = |config: &str, image: &str| {
            static_pod(&StaticPodOptions {
                config: config.into(),
                image: image.into(),
            })
            .unwrap_err()
            .to_string()
        };
        assert!(err("lb.toml", DEFAULT_IMAGE).contains("must be an absolute path"));
        assert!(err("/lb.toml", DEFAULT_IMAGE).contains("directory other than /"));
        assert_eq!(err("/etc/lb/lb.toml", " "), "--image must not be empty");
    }
}
