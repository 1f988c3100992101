//! `[metrics] listen = "ADDR:PORT"`: `/metrics` in the Prometheus text format
//! (prometheus-client), `/healthz` (the agent is alive) and `/readyz` (it serves: the data
//! plane attached and a backend up) on one small HTTP/1.1 listener.

mod families;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot, watch},
};

use crate::control::{Call, Peer, Request, Response};

pub use families::registry;

/// The port `[metrics]` listens on when `listen` names none: outside Prometheus' exporter
/// range (9100-9999, all allocated) and kube-vip's 2112, MetalLB's 7472 and HAProxy's 8404.
pub const DEFAULT_PORT: u16 = 8297;

/// Every family `/metrics` can show (VRRP's only with `[vrrp]`), with its type: the names
/// dashboards and alert rules may use (tests check both against this list, and the
/// exposition against it).
pub const FAMILIES: &[(&str, &str)] = &[
    ("lb_build", "info"),
    ("lb_backend_up", "gauge"),
    ("lb_backend_state", "gauge"),
    ("lb_backend_flows", "gauge"),
    ("lb_backend_packets", "counter"),
    ("lb_backend_bytes", "counter"),
    ("lb_backend_new_flows", "counter"),
    ("lb_backend_probe_duration_seconds", "histogram"),
    ("lb_backend_probe_failures", "counter"),
    ("lb_backend_transitions", "counter"),
    ("lb_flows", "gauge"),
    ("lb_flow_table_capacity", "gauge"),
    ("lb_snat_ports_in_use", "gauge"),
    ("lb_snat_ports", "gauge"),
    ("lb_dataplane_packets", "counter"),
    ("lb_vrrp_state", "gauge"),
    ("lb_vrrp_priority", "gauge"),
    ("lb_vrrp_transitions", "counter"),
    ("lb_vrrp_adverts_sent", "counter"),
    ("lb_vrrp_adverts_received", "counter"),
    ("lb_vrrp_bad_adverts", "counter"),
    ("lb_config_reloads", "counter"),
    ("lb_config_last_reload_timestamp_seconds", "gauge"),
];

/// The names samples of `FAMILIES` carry (what PromQL selects): `_total` for counters,
/// `_info` for infos, `_bucket`, `_sum` and `_count` for histograms.
pub fn sample_names() -> Vec<String> {
    FAMILIES
        .iter()
        .flat_map(|(n, k)| match *k {
            "counter" => vec![format!("{n}_total")],
            "info" => vec![format!("{n}_info")],
            "histogram" => ["_bucket", "_sum", "_count"]
                .iter()
                .map(|s| format!("{n}{s}"))
                .collect(),
            _ => vec![n.to_string()],
        })
        .collect()
}

/// Config reloads counted for `lb_config_reloads_total`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Reloads {
    pub ok: u64,
    pub refused: u64,
    /// When the running config was loaded (Unix seconds).
    pub last_unix: u64,
}

static RELOADS_OK: AtomicU64 = AtomicU64::new(0);
static RELOADS_REFUSED: AtomicU64 = AtomicU64::new(0);
static LAST_RELOAD: AtomicU64 = AtomicU64::new(0);

/// Counts a reload; `loaded_unix` is when the config now running was loaded.
pub fn record_reload(ok: bool, loaded_unix: u64) {
    if ok {
        RELOADS_OK.fetch_add(1, Ordering::Relaxed);
        LAST_RELOAD.store(loaded_unix, Ordering::Relaxed);
    } else {
        RELOADS_REFUSED.fetch_add(1, Ordering::Relaxed);
    }
}

/// Sets when the config was loaded at start.
pub fn set_loaded(loaded_unix: u64) {
    LAST_RELOAD.store(loaded_unix, Ordering::Relaxed);
}

fn reloads() -> Reloads {
    Reloads {
        ok: RELOADS_OK.load(Ordering::Relaxed),
        refused: RELOADS_REFUSED.load(Ordering::Relaxed),
        last_unix: LAST_RELOAD.load(Ordering::Relaxed),
    }
}

/// What the endpoint reads: the pins and the keeper.
#[derive(Clone)]
pub struct Source {
    pub pin_path: PathBuf,
    pub control_socket: PathBuf,
    /// The keeper's requests (it answers Status).
    pub keeper: mpsc::Sender<Call>,
}

impl Source {
    /// The report `lb-agent status` would print, or why not.
    async fn report(&self) -> Result<crate::status::Report, String> {
        let (tx, rx) = oneshot::channel();
        let me = Peer {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            pid: Some(std::process::id() as i32),
            groups: Vec::new(),
        };
        self.keeper
            .send((Request::Status, me, tx))
            .await
            .map_err(|_| "the keeper is not running".to_string())?;
        let answer: Response = tokio::time::timeout(Duration::from_secs(2), rx)
            .await
            .map_err(|_| "the keeper did not answer in 2s".to_string())?
            .map_err(|_| "the keeper dropped the request".to_string())?;
        let (pin, sock) = (self.pin_path.clone(), self.control_socket.clone());
        // Reading per-CPU maps is blocking syscalls: off the runtime's threads.
        tokio::task::spawn_blocking(move || {
            crate::status::gather_from(&pin, &sock, Ok(answer)).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

/// The exposition of `report` in OpenMetrics text, as prometheus-client writes it.
pub fn render(report: &crate::status::Report) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry(report, &reloads()))
        .expect("writing to a String");
    out
}

/// OpenMetrics text rewritten in the Prometheus text format (0.0.4), for clients that do
/// not ask for OpenMetrics (curl, `promtool check metrics`, older scrapers). The samples are
/// the same; only the metadata differs: a counter's family is named with its `_total`, an
/// info is a gauge named with its `_info`, and there is no `# UNIT` or `# EOF`.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut kinds = std::collections::HashMap::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some((name, kind)) = rest.split_once(' ') {
                kinds.insert(name.to_string(), kind.to_string());
            }
        }
    }
    let renamed = |name: &str| match kinds.get(name).map(String::as_str) {
        Some("counter") => (format!("{name}_total"), "counter"),
        Some("info") => (format!("{name}_info"), "gauge"),
        Some(k) => (name.to_string(), if k == "unknown" { "untyped" } else { k }),
        None => (name.to_string(), "untyped"),
    };
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            out.push_str(&format!("# HELP {} {help}\n", renamed(name).0));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split_once(' ').map_or(rest, |(n, _)| n);
            let (n, k) = renamed(name);
            out.push_str(&format!("# TYPE {n} {k}\n"));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Content types of the two formats.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Binds `addr`; the error names it (the caller adds the config field).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves requests until `stop` turns true.
pub async fn serve(listener: TcpListener, source: Source, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            a = listener.accept() => match a {
                Ok((s, _)) => {
                    let source = source.clone();
                    tokio::spawn(async move {
                        // A client that stalls gets cut off; nothing here takes longer.
                        let _ = tokio::time::timeout(Duration::from_secs(10), answer(s, &source)).await;
                    });
                }
                Err(e) => {
                    log::warn!("metrics: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// Reads one request's head and answers it; the connection closes after.
async fn answer(mut s: TcpStream, source: &Source) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut chunk).await?;
        if n == 0 || buf.len() > 16 * 1024 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let mut words = head.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") => match source.report().await {
            Ok(r) => {
                let om = render(&r);
                if wants_openmetrics(&head) {
                    ("200 OK", OPENMETRICS, om)
                } else {
                    ("200 OK", PROMETHEUS_TEXT, to_prometheus_text(&om))
                }
            }
            Err(e) => ("503 Service Unavailable", "text/plain", format!("{e}\n")),
        },
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
        ("GET", "/readyz") => match source.report().await {
            Ok(r) => match not_ready(&r) {
                None => ("200 OK", "text/plain", "ok\n".to_string()),
                Some(why) => ("503 Service Unavailable", "text/plain", format!("{why}\n")),
            },
            Err(e) => ("503 Service Unavailable", "text/plain", format!("{e}\n")),
        },
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "/metrics, /healthz or /readyz\n".into(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_string(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body.as_bytes()).await?;
    s.shutdown().await
}

/// Whether the request's Accept header asks for OpenMetrics (Prometheus' own scrapes do).
fn wants_openmetrics(head: &str) -> bool {
    head.lines().any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("accept") && v.contains("application/openmetrics-text")
        })
    })
}

/// Why the agent does not serve, for `/readyz`: None when the data plane is attached (XDP
/// or the socket hooks) and some VIP has a backend up.
pub fn not_ready(r: &crate::status::Report) -> Option<String> {
    let attached = r.agent.xdp_mode != "none" || r.agent.socket_hooks;
    if !attached {
        return Some("the data plane is not attached".into());
    }
    let up = r
        .vips
        .iter()
        .flat_map(|v| &v.backends)
        .any(|b| b.state == "up");
    (!up).then(|| "no backend is up".into())
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use super::*;
    use crate::{
        backends::BackendHealth,
        status::{BackendStatus, Report, VipStatus},
        vrrp::VrrpStatus,
    };

    /// A report with `n` backends on one NAT VIP (the first up and probed three times, the
    /// second down), VRRP master, and two reasons counted.
    fn report(n: usize) -> Report {
        let mut r = Report::default();
        r.agent.xdp_mode = "native".into();
        r.flow_table.capacity = 262_144;
        let backends = (0..n)
            .map(|i| {
                let mut lat = crate::health::tracker::LatencyHistogram::default();
                for ms in [2, 3, 40] {
                    lat = observe(lat, ms);
                }
                BackendStatus {
                    name: format!("m{}", i + 1),
                    state: if i == 1 { "down" } else { "up" }.into(),
                    packets: 10,
                    bytes: 1000,
                    new_flows: 4,
                    reply_packets: 9,
                    reply_bytes: 900,
                    flows: 2,
                    health: Some(BackendHealth {
                        transitions: 1,
                        probe_failures: BTreeMap::from([("refused".to_string(), 5)]),
                        probe_latency: Some(lat),
                        ..Default::default()
                    }),
                    ..Default::default()
                }
            })
            .collect();
        r.vips.push(VipStatus {
            name: "api".into(),
            mode: "nat".into(),
            snat_ports: "61000-65535".into(),
            flows: 2 * n as u64,
            backends,
            ..Default::default()
        });
        r.counters = BTreeMap::from([("tx".to_string(), 7), ("pass_not_ours".to_string(), 3)]);
        r.vrrp = Some(VrrpStatus {
            state: "master".into(),
            virtual_router_id: 51,
            base_priority: 150,
            effective_priority: 120,
            adverts_sent: 11,
            adverts_received: 2,
            transitions: 2,
            bad_packets: BTreeMap::from([("ttl".to_string(), 1)]),
            ..Default::default()
        });
        r
    }

    /// `h` after a probe of `ms` milliseconds.
    fn observe(
        mut h: crate::health::tracker::LatencyHistogram,
        ms: u64,
    ) -> crate::health::tracker::LatencyHistogram {
        let mut t = crate::health::tracker::Tracker::new(1, 1);
        t.stats.latency = h;
        t.record(
            tokio::time::Instant::now(),
            crate::health::probe::Outcome {
                result: Ok(()),
                latency: Duration::from_millis(ms),
            },
        );
        h = t.stats.latency;
        h
    }

    /// "# TYPE name kind" lines: family name -> kind.
    fn types(text: &str) -> HashMap<String, String> {
        text.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_once(' '))
            .map(|(n, k)| (n.to_string(), k.to_string()))
            .collect()
    }

    #[test]
    fn every_family_the_issue_names_is_there_with_its_type_and_labels() {
        let om = render(&report(3));
        let t = types(&om);
        let want: HashMap<String, String> = FAMILIES
            .iter()
            .map(|(n, k)| (n.to_string(), k.to_string()))
            .collect();
        assert_eq!(t, want, "{om}");
        for sample in [
            format!("lb_build_info{{version=\"{}\"}} 1", crate::VERSION),
            "lb_backend_up{vip=\"api\",backend=\"m1\"} 1".into(),
            "lb_backend_up{vip=\"api\",backend=\"m2\"} 0".into(),
            "lb_backend_state{vip=\"api\",backend=\"m2\",state=\"down\"} 1".into(),
            "lb_backend_state{vip=\"api\",backend=\"m2\",state=\"up\"} 0".into(),
            "lb_backend_packets_total{vip=\"api\",backend=\"m1\",direction=\"to_backend\"} 10"
                .into(),
            "lb_backend_bytes_total{vip=\"api\",backend=\"m1\",direction=\"reply\"} 900".into(),
            "lb_backend_new_flows_total{vip=\"api\",backend=\"m3\"} 4".into(),
            "lb_backend_probe_duration_seconds_bucket{le=\"0.0025\",vip=\"api\",backend=\"m1\"} 1"
                .into(),
            "lb_backend_probe_duration_seconds_bucket{le=\"+Inf\",vip=\"api\",backend=\"m1\"} 3"
                .into(),
            "lb_backend_probe_duration_seconds_count{vip=\"api\",backend=\"m1\"} 3".into(),
            "lb_backend_probe_failures_total{vip=\"api\",backend=\"m1\",reason=\"refused\"} 5"
                .into(),
            "lb_backend_transitions_total{vip=\"api\",backend=\"m1\"} 1".into(),
            "lb_flows{vip=\"api\"} 6".into(),
            "lb_flow_table_capacity 262144".into(),
            "lb_snat_ports_in_use{vip=\"api\"} 6".into(),
            "lb_dataplane_packets_total{reason=\"tx\"} 7".into(),
            "lb_vrrp_state{vrid=\"51\",state=\"master\"} 1".into(),
            "lb_vrrp_state{vrid=\"51\",state=\"backup\"} 0".into(),
            "lb_vrrp_priority{vrid=\"51\",kind=\"effective\"} 120".into(),
            "lb_vrrp_adverts_sent_total{vrid=\"51\"} 11".into(),
            "lb_vrrp_bad_adverts_total{vrid=\"51\",reason=\"ttl\"} 1".into(),
            "lb_config_reloads_total{result=\"ok\"} 0".into(),
        ] {
            assert!(om.lines().any(|l| l == sample), "missing {sample}\n{om}");
        }
        assert!(om.ends_with("# EOF\n"));
    }

    #[test]
    fn the_prometheus_text_form_names_families_by_their_samples() {
        let text = to_prometheus_text(&render(&report(2)));
        let t = types(&text);
        assert_eq!(t["lb_backend_packets_total"], "counter");
        assert_eq!(t["lb_build_info"], "gauge");
        assert_eq!(t["lb_backend_probe_duration_seconds"], "histogram");
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
        // Every sample's name belongs to the family TYPE'd last.
        let mut family = String::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                family = rest.split(' ').next().unwrap().to_string();
            } else if !l.starts_with('#') {
                let name = l.split(['{', ' ']).next().unwrap();
                assert!(name.starts_with(&family), "{name} under {family}");
            }
        }
    }

    #[test]
    fn a_scrape_of_a_thousand_backends_is_cheap() {
        let r = report(1000);
        let t0 = std::time::Instant::now();
        let om = render(&r);
        let text = to_prometheus_text(&om);
        let took = t0.elapsed();
        // Not a timing assertion (the benchmark's job): the figure, and that it is all there.
        eprintln!(
            "1000 backends: {} bytes, {} lines, rendered in {took:?}",
            text.len(),
            text.lines().count()
        );
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("lb_backend_up{"))
                .count(),
            1000
        );
    }

    #[test]
    fn readyz_wants_an_attached_data_plane_and_a_backend_up() {
        let mut r = report(2);
        assert_eq!(not_ready(&r), None);
        r.vips[0]
            .backends
            .iter_mut()
            .for_each(|b| b.state = "down".into());
        assert_eq!(not_ready(&r).as_deref(), Some("no backend is up"));
        r.agent.xdp_mode = "none".into();
        assert_eq!(
            not_ready(&r).as_deref(),
            Some("the data plane is not attached")
        );
        r.agent.socket_hooks = true;
        assert_eq!(not_ready(&r).as_deref(), Some("no backend is up"));
    }
}
