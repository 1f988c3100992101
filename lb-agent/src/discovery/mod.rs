//! Following the control plane (`[vip.discovery] kubernetes = true`): once one of a VIP's
//! backends is up, the agent asks it (HTTPS, straight to the backend, with the probes'
//! server verification and a kubeconfig's credentials) for the `kubernetes` Service's
//! EndpointSlices, the real apiserver addresses, and watches them. The configured backends
//! are a seed: the apiservers found replace them (`effective`), through the same path as a
//! config reload (`app::reload`), so the maps, probes and Maglev tables follow.
//!
//! `kubeconfig`: the credentials. `slices`: the API's objects and the union of their ready
//! endpoints (pure). `http`: the small HTTP/1.1 client. Here: what a set of apiservers does
//! to a VIP's backends (pure), and the tasks that follow each VIP's slices.

pub mod http;
pub mod kubeconfig;
pub mod slices;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{SocketAddr, SocketAddrV4},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use tokio::{
    sync::{mpsc, watch},
    task::{AbortHandle, JoinSet},
};

use crate::{
    config::{BackendConfig, Config, DiscoveryConfig, HealthConfig},
    health::probe::{self, io_failure},
};
use slices::{Slices, Step};

/// Per VIP, the addresses of its backends that the health checks report up (the keeper
/// publishes it): the apiservers the agent may ask.
pub type Reachable = BTreeMap<String, Vec<SocketAddr>>;

/// What a follower learnt: a VIP's apiservers as of a resource version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Found {
    pub vip: String,
    /// The ready IPv4 endpoints of every slice, with their apiserver port.
    pub backends: BTreeSet<SocketAddrV4>,
    pub resource_version: String,
    /// The apiserver that said so.
    pub via: String,
    /// When, Unix seconds.
    pub at_unix: u64,
}

/// Where a VIP's backend list comes from, for `lb-agent status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiscoveryStatus {
    pub vip: String,
    /// "endpointslice": the apiservers the EndpointSlice lists; "seed": the config's.
    pub source: String,
    /// The EndpointSlices' version the backends are at.
    pub resource_version: Option<String>,
    /// When the EndpointSlices last said something (a list, an event), Unix seconds.
    pub updated_unix: Option<u64>,
    /// The apiservers the EndpointSlices list now, address:port.
    pub listed: Vec<String>,
    /// Why what they list is not what the VIP serves (empty, does not fit).
    pub held: Option<String>,
    /// What the follower does now ("watching via 192.0.2.11:6443", "waiting for an
    /// apiserver", "retrying in 4s").
    pub state: String,
    /// The last failure, in words.
    pub last_error: Option<String>,
}

impl DiscoveryStatus {
    /// One line for `lb-agent status`.
    pub fn line(&self) -> String {
        let at = |t: u64| {
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(t)).to_string()
        };
        let mut l = match (self.source.as_str(), &self.resource_version) {
            ("endpointslice", Some(rv)) => format!(
                "discovered from the kubernetes EndpointSlice (rv {rv}, at {})",
                self.updated_unix.map(at).unwrap_or_else(|| "?".into())
            ),
            _ => "seed (the configured backends)".to_string(),
        };
        if !self.state.is_empty() {
            l += &format!("; {}", self.state);
        }
        if let Some(h) = &self.held {
            l += &format!("; HELD: {h}");
        }
        if let Some(e) = &self.last_error {
            l += &format!("; last error: {e}");
        }
        l
    }
}

/// Every VIP's discovery status, by VIP name: the followers write what they do, the agent
/// what it applied; the keeper answers status with it.
pub type Shared = Arc<Mutex<BTreeMap<String, DiscoveryStatus>>>;

/// Changes the status of `vip` (made if missing).
pub fn set_status(shared: &Shared, vip: &str, f: impl FnOnce(&mut DiscoveryStatus)) {
    let mut m = shared.lock().unwrap_or_else(|e| e.into_inner());
    let s = m.entry(vip.to_string()).or_insert_with(|| DiscoveryStatus {
        vip: vip.to_string(),
        source: "seed".into(),
        ..Default::default()
    });
    f(s);
}

/// The backends of a VIP whose configured backends are `seed` once the EndpointSlices list
/// `found`: a configured backend at a listed address is kept as configured (its name,
/// port, weight); a listed address no backend has becomes a backend named after it, with
/// the default weight; configured backends at addresses not listed are left out.
pub fn overlay(seed: &[BackendConfig], found: &BTreeSet<SocketAddrV4>) -> Vec<BackendConfig> {
    let listed = |b: &BackendConfig| found.iter().any(|f| *f.ip() == b.address);
    let mut out: Vec<BackendConfig> = seed.iter().filter(|b| listed(b)).cloned().collect();
    for f in found {
        if seed.iter().any(|b| b.address == *f.ip()) {
            continue;
        }
        let mut name = f.ip().to_string();
        if out.iter().any(|b| b.name == name) {
            name = f.to_string();
        }
        out.push(BackendConfig {
            name,
            address: *f.ip(),
            port: f.port(),
            weight: crate::config::DEFAULT_WEIGHT,
        });
    }
    out
}

/// `config` with the backends the EndpointSlices listed (`found`, by VIP) in place of the
/// configured ones, for the VIPs that follow them; the other VIPs, and a VIP with nothing
/// found (or an empty list: never applied), keep their configured backends.
pub fn effective(config: &Config, found: &BTreeMap<String, Found>) -> Config {
    let mut c = config.clone();
    for v in c.vips.iter_mut().filter(|v| v.discovery.is_some()) {
        if let Some(f) = found.get(&v.name).filter(|f| !f.backends.is_empty()) {
            v.backends = overlay(&v.backends, &f.backends);
        }
    }
    c
}

/// Where the agent asks for the `kubernetes` Service's EndpointSlices.
pub const LIST_PATH: &str = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices?labelSelector=kubernetes.io%2Fservice-name%3Dkubernetes";
/// How long a watch lasts (the apiserver ends it then); the agent lists again after it.
pub const WATCH_SECONDS: u64 = 300;
/// How long a TCP connect and TLS handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a list may take.
const LIST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest list answer, and largest watch event, accepted.
const MAX_LIST: usize = 8 << 20;
const MAX_EVENT: usize = 1 << 20;
/// A follower that ran at least this long starts its backoff afresh.
const SETTLED: Duration = Duration::from_secs(10);

/// Waits between tries: 1 s, doubling to 30 s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    pub const FIRST: Duration = Duration::from_secs(1);
    pub const MAX: Duration = Duration::from_secs(30);

    pub fn new() -> Self {
        Self { next: Self::FIRST }
    }

    /// The wait before the next try.
    pub fn wait(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        d
    }

    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

/// One VIP to follow: its discovery settings and its probes' TLS settings (the server
/// verification the agent uses with the apiservers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Follow {
    pub vip: String,
    pub discovery: DiscoveryConfig,
    pub health: HealthConfig,
}

/// The VIPs of `config` to follow.
pub fn follows(config: &Config) -> Vec<Follow> {
    config
        .vips
        .iter()
        .filter_map(|v| {
            Some(Follow {
                vip: v.name.clone(),
                discovery: v.discovery.clone()?,
                health: v.health.clone(),
            })
        })
        .collect()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Runs one follower per VIP of `specs` (kept in step with it) until `stop` turns true; an
/// error when a follower panicked. Followers send what they find to `found`.
pub async fn run(
    mut specs: watch::Receiver<Vec<Follow>>,
    reachable: watch::Receiver<Reachable>,
    found: mpsc::Sender<Found>,
    status: Shared,
    mut stop: watch::Receiver<bool>,
) -> Result<(), String> {
    let mut running: HashMap<String, (Follow, AbortHandle)> = HashMap::new();
    let mut set = JoinSet::new();
    loop {
        let want = specs.borrow_and_update().clone();
        running.retain(|vip, (f, task)| {
            let keep = want.contains(f);
            if !keep {
                // Dropped mid-request: nothing to undo.
                task.abort();
                log::info!("VIP {vip}: discovery stopped");
            }
            keep
        });
        status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|vip, _| want.iter().any(|f| &f.vip == vip));
        for f in want {
            if running.contains_key(&f.vip) {
                continue;
            }
            set_status(&status, &f.vip, |_| {});
            log::info!(
                "VIP {}: following the kubernetes EndpointSlice (credentials from {}); the configured backends are the seed",
                f.vip,
                f.discovery.kubeconfig.display()
            );
            let task = set.spawn(follow(
                f.clone(),
                reachable.clone(),
                found.clone(),
                status.clone(),
            ));
            running.insert(f.vip.clone(), (f, task));
        }
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            changed = specs.changed() => if changed.is_err() { return Ok(()) },
            Some(ended) = set.join_next() => match ended {
                // Stopped above.
                Err(e) if e.is_cancelled() => {}
                Err(e) => return Err(format!("a discovery follower panicked: {e}")),
                Ok(()) => return Err("a discovery follower returned".into()),
            },
        }
    }
}

/// Follows `f`'s EndpointSlices for ever: list, watch, list again; through a backend the
/// health checks report up, another after a failure.
async fn follow(
    f: Follow,
    mut reachable: watch::Receiver<Reachable>,
    out: mpsc::Sender<Found>,
    status: Shared,
) {
    let mut backoff = Backoff::new();
    let mut turn = 0usize;
    loop {
        let pick = {
            let r = reachable.borrow_and_update();
            r.get(&f.vip)
                .filter(|a| !a.is_empty())
                .map(|a| a[turn % a.len()])
        };
        let Some(addr) = pick else {
            set_status(&status, &f.vip, |s| {
                s.state = "waiting for an apiserver (no backend is up)".into()
            });
            if reachable.changed().await.is_err() {
                // The keeper is gone: the agent is stopping.
                std::future::pending::<()>().await;
            }
            continue;
        };
        let started = Instant::now();
        let ended = session(&f, addr, &mut reachable, &out, &status).await;
        if started.elapsed() >= SETTLED {
            backoff.reset();
        }
        let wait = match ended {
            Ok(why) => {
                log::debug!("VIP {}: discovery via {addr}: {why}; listing again", f.vip);
                // A watch that ends at once (410 after every list) must not spin.
                if started.elapsed() < SETTLED {
                    backoff.wait()
                } else {
                    Duration::ZERO
                }
            }
            Err(e) => {
                turn += 1;
                let wait = backoff.wait();
                log::warn!(
                    "VIP {}: discovery via {addr}: {e}; trying again in {}s",
                    f.vip,
                    wait.as_secs()
                );
                set_status(&status, &f.vip, |s| {
                    s.last_error = Some(format!("{addr}: {e}"));
                    s.state = format!("retrying in {}s", wait.as_secs());
                });
                wait
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// Resolves when `addr` is no longer among `vip`'s backends that are up.
async fn gone(reachable: &mut watch::Receiver<Reachable>, vip: &str, addr: SocketAddr) {
    loop {
        if !reachable
            .borrow_and_update()
            .get(vip)
            .is_some_and(|a| a.contains(&addr))
        {
            return;
        }
        if reachable.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// What a non-200 answer says, in one line.
fn refusal(status: u16, body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Status {
        message: Option<String>,
    }
    let message = serde_json::from_slice::<Status>(body)
        .ok()
        .and_then(|s| s.message)
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned());
    let hint = match status {
        401 => " (the apiserver does not accept the kubeconfig's credentials)",
        403 => " (RBAC: the user needs get, list and watch on endpointslices in namespace default: docs/node-local.md)",
        _ => "",
    };
    format!("status {status}: {}{hint}", message.trim())
}

/// One list and the watch after it, through `addr`; Ok(why it ended) when the agent should
/// list again at once, Err(what failed) when it should wait and try elsewhere.
async fn session(
    f: &Follow,
    addr: SocketAddr,
    reachable: &mut watch::Receiver<Reachable>,
    out: &mpsc::Sender<Found>,
    status: &Shared,
) -> Result<String, String> {
    let creds = kubeconfig::load(&f.discovery.kubeconfig)
        .map_err(|e| format!("kubeconfig {}: {e}", f.discovery.kubeconfig.display()))?;
    let tls =
        crate::health::client_config(&f.health, creds.identity).map_err(|e| format!("TLS: {e}"))?;
    let (host, server_name) = probe::server_name(&f.health, addr);
    let server = http::Server {
        addr,
        host,
        server_name,
        tls,
        token: creds.token,
    };
    set_status(status, &f.vip, |s| s.state = format!("listing via {addr}"));
    let mut slices = tokio::time::timeout(LIST_TIMEOUT, async {
        let mut r = http::get(&server, LIST_PATH, CONNECT_TIMEOUT).await?;
        let body = r
            .body
            .read_all(MAX_LIST)
            .await
            .map_err(|e| io_failure("read", &e).to_string())?;
        if r.status != 200 {
            return Err(refusal(r.status, &body));
        }
        Slices::from_list(&body)
    })
    .await
    .map_err(|_| format!("no answer to the list within {}s", LIST_TIMEOUT.as_secs()))??;
    let send = |s: &Slices| {
        out.try_send(Found {
            vip: f.vip.clone(),
            backends: s.members(),
            resource_version: s.resource_version.clone(),
            via: addr.to_string(),
            at_unix: unix_now(),
        })
    };
    if send(&slices).is_err() {
        return Err("the agent is not taking what discovery finds".into());
    }
    set_status(status, &f.vip, |s| {
        s.state = format!("watching via {addr}");
        s.last_error = None;
    });
    let target = format!(
        "{LIST_PATH}&watch=1&resourceVersion={}&allowWatchBookmarks=true&timeoutSeconds={WATCH_SECONDS}",
        slices.resource_version
    );
    let mut w = http::get(&server, &target, CONNECT_TIMEOUT).await?;
    match w.status {
        200 => {}
        410 => return Ok("the resource version is too old (410 Gone)".into()),
        s => {
            let body = w.body.read_all(64 << 10).await.unwrap_or_default();
            return Err(refusal(s, &body));
        }
    }
    // The apiserver ends the watch after WATCH_SECONDS; one that does not is dropped.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(WATCH_SECONDS + 30);
    loop {
        let line = tokio::select! {
            l = w.body.next_line(MAX_EVENT) => l.map_err(|e| io_failure("read", &e).to_string())?,
            _ = tokio::time::sleep_until(deadline) => return Ok("the watch outlived its timeout".into()),
            _ = gone(reachable, &f.vip, addr) => return Err("no longer up (health checks)".into()),
        };
        let Some(line) = line else {
            return Ok("the watch ended".into());
        };
        match slices.apply(slices::parse_event(&line)?) {
            Step::Moved => {
                if send(&slices).is_err() {
                    return Err("the agent is not taking what discovery finds".into());
                }
            }
            Step::Relist(why) => return Ok(why),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn addrs(list: &[&str]) -> BTreeSet<SocketAddrV4> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    const CONFIG: &str =
        "[[vip]]\nname = \"api\"\naddress = \"127.0.0.1\"\nport = 6443\nmode = \"socket\"\n\
        [vip.discovery]\nkubernetes = true\n\
        [[vip.backend]]\nname = \"master01\"\naddress = \"192.0.2.11\"\nweight = 50\n\
        [[vip.backend]]\nname = \"master02\"\naddress = \"192.0.2.12\"\n\
        [[vip]]\nname = \"other\"\naddress = \"127.0.0.2\"\nport = 6443\nmode = \"socket\"\n\
        [[vip.backend]]\nname = \"m\"\naddress = \"192.0.2.11\"\n";

    fn config() -> Config {
        Config::parse(std::path::Path::new("lb.toml"), CONFIG).unwrap()
    }

    fn found(vip: &str, list: &[&str]) -> BTreeMap<String, Found> {
        [(
            vip.to_string(),
            Found {
                vip: vip.into(),
                backends: addrs(list),
                resource_version: "7".into(),
                via: "192.0.2.11:6443".into(),
                at_unix: 0,
            },
        )]
        .into()
    }

    fn names(c: &Config, vip: usize) -> Vec<(String, String, u32)> {
        c.vips[vip]
            .backends
            .iter()
            .map(|b| {
                (
                    b.name.clone(),
                    format!("{}:{}", b.address, b.port),
                    b.weight,
                )
            })
            .collect()
    }

    #[test]
    fn listed_addresses_keep_their_backend_new_ones_are_named_after_them() {
        let c = effective(
            &config(),
            &found(
                "api",
                &["192.0.2.11:6443", "192.0.2.12:6443", "192.0.2.13:6443"],
            ),
        );
        assert_eq!(
            names(&c, 0),
            [
                ("master01".into(), "192.0.2.11:6443".into(), 50),
                ("master02".into(), "192.0.2.12:6443".into(), 100),
                ("192.0.2.13".into(), "192.0.2.13:6443".into(), 100),
            ]
        );
        // The other VIP follows nothing.
        assert_eq!(names(&c, 1), names(&config(), 1));
        crate::config::check_backends(&c).unwrap();
    }

    #[test]
    fn unlisted_backends_are_left_out_and_an_empty_list_changes_nothing() {
        let c = effective(
            &config(),
            &found("api", &["192.0.2.12:6443", "192.0.2.14:443"]),
        );
        assert_eq!(
            names(&c, 0),
            [
                ("master02".into(), "192.0.2.12:6443".into(), 100),
                ("192.0.2.14".into(), "192.0.2.14:443".into(), 100),
            ]
        );
        // An empty slice is an apiserver-side problem, not zero apiservers.
        assert_eq!(effective(&config(), &found("api", &[])), config());
        assert_eq!(effective(&config(), &BTreeMap::new()), config());
        // A VIP without discovery ignores what is said about it.
        assert_eq!(
            effective(&config(), &found("other", &["192.0.2.13:6443"])),
            config()
        );
    }

    #[test]
    fn a_configured_port_is_kept_and_a_name_taken_by_another_backend_gets_the_port() {
        let seed = vec![
            BackendConfig {
                name: "192.0.2.13".into(),
                address: "192.0.2.99".parse().unwrap(),
                port: 6443,
                weight: 100,
            },
            BackendConfig {
                name: "m1".into(),
                address: "192.0.2.11".parse().unwrap(),
                port: 8443,
                weight: 0,
            },
        ];
        let out = overlay(&seed, &addrs(&["192.0.2.11:6443", "192.0.2.13:6443"]));
        assert_eq!(out[0].name, "m1");
        assert_eq!(out[0].port, 8443, "as configured");
        assert_eq!(out[0].weight, 0, "a drained backend stays drained");
        // 192.0.2.99 is gone, so its name is free again.
        assert_eq!(out[1].name, "192.0.2.13");
        let seed = vec![seed[1].clone(), seed[0].clone()];
        let mut kept = seed.clone();
        kept[1].address = "192.0.2.12".parse().unwrap();
        let out = overlay(
            &kept,
            &addrs(&["192.0.2.11:6443", "192.0.2.12:6443", "192.0.2.13:6443"]),
        );
        assert_eq!(
            out[2].name, "192.0.2.13:6443",
            "the name is taken by a kept backend"
        );
    }

    #[test]
    fn backoff_doubles_to_thirty_seconds() {
        let mut b = Backoff::new();
        let waits: Vec<u64> = (0..7).map(|_| b.wait().as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
        b.reset();
        assert_eq!(b.wait(), Duration::from_secs(1));
    }

    #[test]
    fn follows_only_the_vips_that_ask() {
        let f = follows(&config());
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].vip, "api");
    }

    #[test]
    fn refusals_say_why() {
        let forbidden = br#"{"kind":"Status","status":"Failure","message":"endpointslices.discovery.k8s.io is forbidden: User \"system:node:w1\" cannot list resource \"endpointslices\"","reason":"Forbidden","code":403}"#;
        let r = refusal(403, forbidden);
        assert!(
            r.starts_with(
                "status 403: endpointslices.discovery.k8s.io is forbidden: User \"system:node:w1\""
            ),
            "{r}"
        );
        assert!(r.contains("RBAC"), "{r}");
        assert_eq!(refusal(500, b"oops\n"), "status 500: oops");
    }

    #[test]
    fn status_lines() {
        let mut s = DiscoveryStatus {
            vip: "api".into(),
            source: "seed".into(),
            state: "waiting for an apiserver (no backend is up)".into(),
            ..Default::default()
        };
        assert_eq!(
            s.line(),
            "seed (the configured backends); waiting for an apiserver (no backend is up)"
        );
        s.source = "endpointslice".into();
        s.resource_version = Some("42".into());
        s.updated_unix = Some(1_795_000_000);
        s.state = "watching via 192.0.2.11:6443".into();
        assert_eq!(
            s.line(),
            "discovered from the kubernetes EndpointSlice (rv 42, at 2026-11-18T11:06:40Z); watching via 192.0.2.11:6443"
        );
    }
}
