//! Re-reads a VIP's CA file and client certificate when they change on disk (kubeadm
//! renews certificates; an operator may rotate the CA), and hands the new TLS client
//! config to the probers.
//!
//! The files are polled with stat(2), not watched with inotify: an inotify watch follows
//! one inode, so an atomic rename or a Kubernetes-style `..data` symlink swap needs extra
//! care to catch, whereas stat on the path (following symlinks) sees the new file as a
//! new device/inode pair. It costs one stat per file per period and no dependency.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use rustls::ClientConfig;
use tokio::sync::watch;

use super::{tls_config, TlsError};
use crate::config::{HealthConfig, HealthKind};

/// How often `watch_tls` looks at the files. No longer than the default fall x interval
/// (2 x 1 s), so a rotated CA is usually in use before probes failing for the lack of it
/// can take a backend down; a few stat calls every 2 s cost nothing.
pub const POLL_PERIOD: Duration = Duration::from_secs(2);

/// What tells one version of a file from another without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    /// Changes with chmod/chown too, so a permission fix after a failed load is seen.
    ctime: (i64, i64),
}

/// One stamp per watched path; None when the path cannot be stat'ed (missing, say).
type Fingerprint = Vec<Option<Stamp>>;

fn stamp(path: &Path) -> Option<Stamp> {
    // metadata() follows symlinks: a swapped link shows the new target's inode.
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
    })
}

fn fingerprint(paths: &[PathBuf]) -> Fingerprint {
    paths.iter().map(|p| stamp(p)).collect()
}

/// The files `tls_config` reads for `cfg`.
fn files(cfg: &HealthConfig) -> Vec<PathBuf> {
    if cfg.kind != HealthKind::Https {
        return Vec::new();
    }
    let mut v = Vec::new();
    if !cfg.insecure_skip_verify {
        v.push(cfg.ca_file.clone());
    }
    v.extend(cfg.client_cert.iter().cloned());
    v.extend(cfg.client_key.iter().cloned());
    v
}

/// A VIP's TLS client config and the files it was built from, as they were then.
pub struct TlsSource {
    health: HealthConfig,
    paths: Vec<PathBuf>,
    seen: Fingerprint,
    config: Option<Arc<ClientConfig>>,
}

impl TlsSource {
    /// Builds the config `health` names (None unless https) and remembers its files.
    pub fn new(health: &HealthConfig) -> Result<Self, TlsError> {
        let paths = files(health);
        // Stamped before reading: a change during the read shows at the next check.
        let seen = fingerprint(&paths);
        let config = tls_config(health)?;
        Ok(Self {
            health: health.clone(),
            paths,
            seen,
            config,
        })
    }

    /// The config in use: the latest that loaded.
    pub fn config(&self) -> Option<Arc<ClientConfig>> {
        self.config.clone()
    }

    /// The files watched (none unless https).
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// Looks at the files: `Ok(Some(config))` when they changed and load, `Ok(None)` when
    /// unchanged, an error when they changed but do not load (mid-rotation, say); the
    /// config in use stays. Each change is reported once, the next check says Ok(None).
    pub fn check(&mut self) -> Result<Option<Arc<ClientConfig>>, TlsError> {
        let now = fingerprint(&self.paths);
        if now == self.seen {
            return Ok(None);
        }
        self.seen = now;
        let config = tls_config(&self.health)?;
        self.config = config.clone();
        Ok(config)
    }
}

/// Checks `source` every `period` and publishes each new config on `tx` until `shutdown`
/// turns true; logs every reload and every change that does not load.
pub async fn watch_tls(
    vip: String,
    mut source: TlsSource,
    period: Duration,
    tx: watch::Sender<Option<Arc<ClientConfig>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    if source.paths().is_empty() {
        return;
    }
    let files = source
        .paths()
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(period) => {}
        }
        match source.check() {
            Ok(None) => {}
            Ok(Some(config)) => {
                log::info!("VIP {vip}: reloaded CA/client certificate from {files}");
                tx.send_replace(Some(config));
            }
            Err(e) => log::warn!(
                "VIP {vip}: {files} changed but cannot be used ({e}); \
                 probes keep the previous CA/client certificate"
            ),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::fs;

    /// A self-signed test CA (EC P-256, valid until 2126) and its key; test use only.
    pub(crate) const CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBjzCCATWgAwIBAgIUN/Ivtznq5Esn8ZQhwjdHpONAXuQwCgYIKoZIzj0EAwIw
HDEaMBgGA1UEAwwRbGIgdGxzX3dhdGNoIHRlc3QwIBcNMjYxMTIzMTg0NzU4WhgP
MjEyNjEwMzAxODQ3NThaMBwxGjAYBgNVBAMMEWxiIHRsc193YXRjaCB0ZXN0MFkw
EwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEEpzqEwJMc0yIx8oHxbh7nNgHzmBToCUP
SATzsduhB4FdBTMM3Yc07xmoo6Sq1xO6aVx1pFqekfqgvap60/vQCKNTMFEwHQYD
VR0OBBYEFKuOHj/xuUf6bj96JLjrmWfDcZHXMB8GA1UdIwQYMBaAFKuOHj/xuUf6
bj96JLjrmWfDcZHXMA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZIzj0EAwIDSAAwRQIh
AIJuDu6Aw4ygYo7EYwirJwXohD/hGGdNMacwgcMAaop1AiB0rmDJMmKIimIPGihV
FtDcnZn7Q5FfG7Ia3OjlAPmu2w==
-----END CERTIFICATE-----
";
    pub(crate) const KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgw8wl/SCSerRzijZz
PofVkNvaiYatjOWYtQ8AHP6xorOhRANCAAQSnOoTAkxzTIjHygfFuHuc2AfOYFOg
JQ9IBPOx26EHgV0FMwzdhzTvGaijpKrXE7ppXHWkWp6R+qC9qnrT+9AI
-----END PRIVATE KEY-----
";

    /// A scratch directory removed on drop.
    pub(crate) struct Dir(pub(crate) PathBuf);
    impl Dir {
        pub(crate) fn new(name: &str) -> Self {
            let d =
                std::env::temp_dir().join(format!("lb-tls-watch-{}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&d);
            fs::create_dir_all(&d).unwrap();
            Self(d)
        }
        /// Writes `text` to `name` the way kubeadm does: a new file renamed into place.
        fn replace(&self, name: &str, text: &str) {
            let tmp = self.0.join(format!(".{name}.tmp"));
            fs::write(&tmp, text).unwrap();
            fs::rename(&tmp, self.0.join(name)).unwrap();
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn https(ca: PathBuf) -> HealthConfig {
        HealthConfig {
            kind: HealthKind::Https,
            ca_file: ca,
            ..Default::default()
        }
    }

    #[test]
    fn a_changed_file_is_reloaded_and_a_broken_one_keeps_the_old_config() {
        let d = Dir::new("rotate");
        let ca = d.0.join("ca.crt");
        fs::write(&ca, CERT).unwrap();
        let mut src = TlsSource::new(&https(ca.clone())).unwrap();
        let first = src.config().unwrap();
        assert_eq!(src.paths(), std::slice::from_ref(&ca));
        assert!(src.check().unwrap().is_none(), "nothing changed");

        d.replace("ca.crt", CERT);
        let second = src.check().unwrap().expect("renamed into place: reloaded");
        assert!(!Arc::ptr_eq(&first, &second));
        assert!(src.check().unwrap().is_none(), "reported once");

        // Mid-rotation the file is missing: an error, once, and the config stays.
        fs::remove_file(&ca).unwrap();
        let e = src.check().unwrap_err();
        assert_eq!(e.field, "ca_file");
        assert!(src.check().unwrap().is_none(), "the error is reported once");
        assert!(Arc::ptr_eq(&src.config().unwrap(), &second));

        // Half written: no certificate in it yet.
        fs::write(&ca, "-----BEGIN CERT").unwrap();
        assert!(src.check().is_err());
        assert!(Arc::ptr_eq(&src.config().unwrap(), &second));

        d.replace("ca.crt", CERT);
        let third = src.check().unwrap().expect("restored: reloaded");
        assert!(Arc::ptr_eq(&src.config().unwrap(), &third));
    }

    #[test]
    fn a_symlink_swap_is_seen() {
        // The Kubernetes secret volume layout: ca.crt -> ..data/ca.crt, ..data -> a dir.
        let d = Dir::new("symlink");
        for v in ["v1", "v2"] {
            fs::create_dir(d.0.join(v)).unwrap();
            fs::write(d.0.join(v).join("ca.crt"), CERT).unwrap();
        }
        std::os::unix::fs::symlink("v1", d.0.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/ca.crt", d.0.join("ca.crt")).unwrap();
        let mut src = TlsSource::new(&https(d.0.join("ca.crt"))).unwrap();
        assert!(src.check().unwrap().is_none());

        std::os::unix::fs::symlink("v2", d.0.join("..data_tmp")).unwrap();
        fs::rename(d.0.join("..data_tmp"), d.0.join("..data")).unwrap();
        assert!(src.check().unwrap().is_some(), "new target, new inode");
    }

    #[test]
    fn client_certificate_and_key_are_watched_too() {
        let d = Dir::new("client");
        fs::write(d.0.join("ca.crt"), CERT).unwrap();
        fs::write(d.0.join("client.crt"), CERT).unwrap();
        fs::write(d.0.join("client.key"), KEY).unwrap();
        let cfg = HealthConfig {
            client_cert: Some(d.0.join("client.crt")),
            client_key: Some(d.0.join("client.key")),
            ..https(d.0.join("ca.crt"))
        };
        let mut src = TlsSource::new(&cfg).unwrap();
        assert_eq!(src.paths().len(), 3);
        d.replace("client.key", KEY);
        assert!(src.check().unwrap().is_some());
        fs::remove_file(d.0.join("client.key")).unwrap();
        assert_eq!(src.check().unwrap_err().field, "client_key");
        assert!(src.config().is_some(), "the old config stays");
    }

    #[test]
    fn nothing_to_watch_without_https_or_with_skip_verify() {
        let plain = HealthConfig {
            kind: HealthKind::Tcp,
            ..Default::default()
        };
        let src = TlsSource::new(&plain).unwrap();
        assert!(src.paths().is_empty() && src.config().is_none());
        let skip = HealthConfig {
            insecure_skip_verify: true,
            ..https(PathBuf::from("/nonexistent/ca.crt"))
        };
        let mut src = TlsSource::new(&skip).unwrap();
        assert!(src.paths().is_empty() && src.config().is_some());
        assert!(src.check().unwrap().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn the_watcher_publishes_reloads() {
        let d = Dir::new("watcher");
        let ca = d.0.join("ca.crt");
        fs::write(&ca, CERT).unwrap();
        let src = TlsSource::new(&https(ca)).unwrap();
        let (tx, mut rx) = watch::channel(src.config());
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(watch_tls("k8s".into(), src, POLL_PERIOD, tx, stop_rx));
        d.replace("ca.crt", CERT);
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .expect("published within a few periods")
            .unwrap();
        assert!(rx.borrow().is_some());
        stop_tx.send(true).unwrap();
        task.await.unwrap();
    }
}
