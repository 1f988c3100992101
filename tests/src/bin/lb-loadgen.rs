//! lb-loadgen: HTTPS load and availability probe for lb tests; prints one JSON object on stdout.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{ArgGroup, Parser};
use lb_tests::http::{self, Response};
use lb_tests::tls;
use rustls::pki_types::ServerName;
use serde::Serialize;
use serde_json::json;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant, MissedTickBehavior};
use tokio_rustls::TlsConnector;

/// Responses are only checked for completeness; keeping a little of the body is enough.
const KEEP_BODY: usize = 64 * 1024;

#[derive(Parser, Debug)]
#[command(
    name = "lb-loadgen",
    about = "HTTPS load/probe client for lb tests; prints one JSON object on stdout",
    group(ArgGroup::new("trust").required(true).args(["ca", "insecure"]))
)]
struct Args {
    /// Target, https://IP:PORT/PATH (IP literal host, port defaults to 443).
    #[arg(long)]
    url: String,
    /// Verify the server against this CA (PEM).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Skip server certificate verification.
    #[arg(long)]
    insecure: bool,
    /// SNI and verification name.
    #[arg(long, default_value = "kubernetes")]
    server_name: String,
    /// Per-request budget for connect + TLS + response.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Count mode (default): N requests, each on a new connection with `Connection: close`.
    #[arg(long, conflicts_with_all = ["connections", "gap"])]
    count: Option<u64>,
    /// Count mode: requests in flight at once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    concurrency: u64,
    /// Count mode: start a request every 1/RATE s whatever became of the earlier ones (an
    /// open-loop client: a request stuck until its timeout holds none of the others back, so
    /// failures weigh in the tally as often as they happen).
    #[arg(long, requires = "count", conflicts_with = "concurrency",
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    rate: Option<u64>,
    /// Long mode: N keep-alive connections, each sending a request every --interval.
    #[arg(long, requires_all = ["interval", "duration"], conflicts_with = "gap",
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    connections: Option<u64>,
    /// Gap mode: one client measuring the longest time without a successful response.
    #[arg(long, requires_all = ["interval", "duration"])]
    gap: bool,
    /// Gap mode: open a new connection for every request instead of keep-alive.
    #[arg(long, requires = "gap")]
    new_connection: bool,
    /// Time between requests (long and gap modes).
    #[arg(long, value_parser = humantime::parse_duration)]
    interval: Option<Duration>,
    /// How long to run (long and gap modes).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
}

/// Where to connect and what to ask for.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    addr: SocketAddr,
    /// Host header value (the URL authority as given).
    authority: String,
    /// Path plus query.
    path: String,
}

fn parse_url(url: &str) -> Result<Target> {
    let rest = url
        .strip_prefix("https://")
        .context("--url must start with https://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = match authority.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(_) => {
            let bare = authority.trim_start_matches('[').trim_end_matches(']');
            let ip: IpAddr = bare
                .parse()
                .with_context(|| format!("--url host must be an IP literal, got {authority:?}"))?;
            SocketAddr::new(ip, 443)
        }
    };
    Ok(Target {
        addr,
        authority: authority.to_string(),
        path: path.to_string(),
    })
}

/// Short, stable reason for an I/O error, suitable as a JSON map key.
fn io_reason(e: &io::Error) -> String {
    match e.kind() {
        // rustls and the HTTP parser report here; their messages are already short and specific.
        io::ErrorKind::InvalidData | io::ErrorKind::Other => e.to_string(),
        kind => kind.to_string(),
    }
}

type Conn = BufReader<tokio_rustls::client::TlsStream<TcpStream>>;

/// A successful exchange.
struct Ok200 {
    backend: String,
    server_closes: bool,
}

struct Client {
    connector: TlsConnector,
    server_name: ServerName<'static>,
    target: Target,
    timeout: Duration,
}

impl Client {
    async fn connect(&self, deadline: Instant) -> Result<Conn, String> {
        let tcp = timeout_at(deadline, TcpStream::connect(self.target.addr))
            .await
            .map_err(|_| "connect timeout".to_string())?
            .map_err(|e| format!("connect: {}", io_reason(&e)))?;
        let _ = tcp.set_nodelay(true);
        let tls = timeout_at(
            deadline,
            self.connector.connect(self.server_name.clone(), tcp),
        )
        .await
        .map_err(|_| "tls timeout".to_string())?
        .map_err(|e| format!("tls: {}", io_reason(&e)))?;
        Ok(BufReader::new(tls))
    }

    async fn exchange(
        &self,
        conn: &mut Conn,
        close: bool,
        deadline: Instant,
    ) -> Result<Ok200, String> {
        let req = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: lb-loadgen\r\nAccept: */*\r\n{}\r\n",
            self.target.path,
            self.target.authority,
            if close { "Connection: close\r\n" } else { "" }
        );
        timeout_at(deadline, async {
            conn.write_all(req.as_bytes()).await?;
            conn.flush().await
        })
        .await
        .map_err(|_| "write timeout".to_string())?
        .map_err(|e| format!("write: {}", io_reason(&e)))?;
        let resp: Response = timeout_at(deadline, http::read_response(conn, KEEP_BODY))
            .await
            .map_err(|_| "response timeout".to_string())?
            .map_err(|e| format!("read: {}", io_reason(&e)))?;
        if resp.status != 200 {
            return Err(format!("status {}", resp.status));
        }
        Ok(Ok200 {
            backend: resp.header("x-backend").unwrap_or("(none)").to_string(),
            server_closes: resp.wants_close(),
        })
    }

    /// One request on a fresh connection.
    async fn one_shot(&self) -> Result<Ok200, String> {
        let deadline = Instant::now() + self.timeout;
        let mut conn = self.connect(deadline).await?;
        self.exchange(&mut conn, true, deadline).await
    }

    /// One request on `conn`, (re)connecting first if it is gone; any failure drops the connection
    /// so the next request starts over with a new TCP+TLS session.
    async fn keep_alive(&self, conn: &mut Option<Conn>, dials: &mut u64) -> Result<Ok200, String> {
        let deadline = Instant::now() + self.timeout;
        if conn.is_none() {
            *dials += 1;
            *conn = Some(self.connect(deadline).await?);
        }
        let res = match conn.as_mut() {
            Some(c) => self.exchange(c, false, deadline).await,
            None => unreachable!("connected above"),
        };
        if res.as_ref().map_or(true, |ok| ok.server_closes) {
            *conn = None;
        }
        res
    }
}

/// Outcome counts shared by all modes.
#[derive(Default, Serialize)]
struct Tally {
    ok: u64,
    failed: u64,
    errors: BTreeMap<String, u64>,
    backends: BTreeMap<String, u64>,
}

impl Tally {
    fn record(&mut self, res: &Result<Ok200, String>) {
        match res {
            Ok(ok) => {
                self.ok += 1;
                *self.backends.entry(ok.backend.clone()).or_default() += 1;
            }
            Err(reason) => {
                self.failed += 1;
                *self.errors.entry(reason.clone()).or_default() += 1;
            }
        }
    }

    fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        self.failed += other.failed;
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        for (k, v) in other.backends {
            *self.backends.entry(k).or_default() += v;
        }
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

async fn run_count(client: Arc<Client>, count: u64, concurrency: u64) -> serde_json::Value {
    let start = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.min(count) {
        let (client, next) = (client.clone(), next.clone());
        workers.spawn(async move {
            let mut tally = Tally::default();
            while next.fetch_add(1, Ordering::Relaxed) < count {
                tally.record(&client.one_shot().await);
            }
            tally
        });
    }
    let mut total = Tally::default();
    while let Some(t) = workers.join_next().await {
        total.merge(t.expect("worker panicked"));
    }
    json!({"mode": "count", "ok": total.ok, "failed": total.failed, "errors": total.errors,
           "backends": total.backends, "elapsed_ms": start.elapsed().as_millis() as u64})
}

async fn run_open(client: Arc<Client>, count: u64, rate: u64) -> serde_json::Value {
    let start = Instant::now();
    // A late tick fires at once (Burst, the default): the pace over the run stays the rate.
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..count {
        tick.tick().await;
        let client = client.clone();
        requests.spawn(async move { client.one_shot().await });
    }
    let mut total = Tally::default();
    while let Some(res) = requests.join_next().await {
        total.record(&res.expect("request panicked"));
    }
    json!({"mode": "count", "rate": rate, "ok": total.ok, "failed": total.failed,
           "errors": total.errors, "backends": total.backends,
           "elapsed_ms": start.elapsed().as_millis() as u64})
}

#[derive(Serialize)]
struct Failure {
    at_ms: u64,
    reason: String,
}

#[derive(Serialize)]
struct ConnReport {
    id: u64,
    backend_first: Option<String>,
    requests_ok: u64,
    requests_failed: u64,
    reconnects: u64,
    /// The longest request, ms: on a connection that lived through an LB failover, how long
    /// its requests waited for the backup (TCP retransmitting into the outage).
    max_request_ms: u64,
    failures: Vec<Failure>,
    backends: BTreeMap<String, u64>,
    #[serde(skip)]
    errors: BTreeMap<String, u64>,
}

async fn long_worker(
    client: Arc<Client>,
    id: u64,
    start: Instant,
    interval: Duration,
    duration: Duration,
) -> ConnReport {
    let mut tally = Tally::default();
    let mut failures = Vec::new();
    let mut backend_first = None;
    let mut max_request = Duration::ZERO;
    let (mut conn, mut dials) = (None, 0u64);
    let mut tick = tokio::time::interval_at(start, interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if start.elapsed() >= duration {
            break;
        }
        let sent = Instant::now();
        let res = client.keep_alive(&mut conn, &mut dials).await;
        max_request = max_request.max(sent.elapsed());
        tally.record(&res);
        match res {
            Ok(ok) => {
                backend_first.get_or_insert(ok.backend);
            }
            Err(reason) => failures.push(Failure {
                at_ms: start.elapsed().as_millis() as u64,
                reason,
            }),
        }
    }
    ConnReport {
        id,
        backend_first,
        requests_ok: tally.ok,
        requests_failed: tally.failed,
        reconnects: dials.saturating_sub(1),
        max_request_ms: max_request.as_millis() as u64,
        failures,
        backends: tally.backends,
        errors: tally.errors,
    }
}

async fn run_long(
    client: Arc<Client>,
    connections: u64,
    interval: Duration,
    duration: Duration,
) -> serde_json::Value {
    let start = Instant::now();
    let workers: Vec<_> = (0..connections)
        .map(|id| tokio::spawn(long_worker(client.clone(), id, start, interval, duration)))
        .collect();
    let mut reports = Vec::new();
    let mut total = Tally::default();
    let mut max_request_ms = 0;
    for w in workers {
        let r = w.await.expect("worker panicked");
        max_request_ms = max_request_ms.max(r.max_request_ms);
        total.ok += r.requests_ok;
        total.failed += r.requests_failed;
        total.merge(Tally {
            errors: r.errors.clone(),
            ..Tally::default()
        });
        reports.push(r);
    }
    json!({"mode": "long", "connections": reports, "ok": total.ok, "failed": total.failed,
           "errors": total.errors, "max_request_ms": max_request_ms,
           "elapsed_ms": start.elapsed().as_millis() as u64})
}

/// Availability gaps from `(completion_ms, ok)` events in order: the time between consecutive
/// successes, plus start→first success and last success→last event when failures sit there
/// (otherwise an outage at either edge of the run would not show).
/// Returns the longest gap and every gap longer than `threshold_ms`.
fn compute_gaps(events: &[(f64, bool)], threshold_ms: f64) -> (f64, Vec<(f64, f64)>) {
    let (mut max, mut gaps) = (0.0f64, Vec::new());
    let mut note = |from: f64, to: f64| {
        max = max.max(to - from);
        if to - from > threshold_ms {
            gaps.push((from, to));
        }
    };
    let (mut anchor, mut anchor_is_success, mut failed_since) = (0.0, false, false);
    for &(t, ok) in events {
        if !ok {
            failed_since = true;
            continue;
        }
        if anchor_is_success || failed_since {
            note(anchor, t);
        }
        (anchor, anchor_is_success, failed_since) = (t, true, false);
    }
    if failed_since {
        if let Some(&(last, _)) = events.last() {
            note(anchor, last);
        }
    }
    (max, gaps)
}

async fn run_gap(
    client: Arc<Client>,
    interval: Duration,
    duration: Duration,
    new_connection: bool,
) -> serde_json::Value {
    let start = Instant::now();
    let mut tally = Tally::default();
    let mut events = Vec::new();
    let (mut conn, mut dials) = (None, 0u64);
    let mut tick = tokio::time::interval_at(start, interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if start.elapsed() >= duration {
            break;
        }
        let res = if new_connection {
            client.one_shot().await
        } else {
            client.keep_alive(&mut conn, &mut dials).await
        };
        events.push((ms(start.elapsed()), res.is_ok()));
        tally.record(&res);
    }
    let (max_gap, gaps) = compute_gaps(&events, 3.0 * ms(interval));
    let gaps: Vec<_> = gaps
        .into_iter()
        .map(|(s, e)| json!({"start_ms": s, "end_ms": e}))
        .collect();
    // False when the run ended in failures: its last gap is then only a lower bound.
    let last_ok = events.last().is_some_and(|&(_, ok)| ok);
    json!({"mode": "gap", "ok": tally.ok, "failed": tally.failed,
           "max_gap_ms": (max_gap * 1e3).round() / 1e3, "gaps": gaps, "last_ok": last_ok,
           "errors": tally.errors, "backends": tally.backends,
           "elapsed_ms": start.elapsed().as_millis() as u64})
}

async fn run(args: Args) -> Result<serde_json::Value> {
    let target = parse_url(&args.url)?;
    let cfg = tls::client_config(if args.insecure {
        None
    } else {
        args.ca.as_deref()
    })?;
    let server_name = ServerName::try_from(args.server_name.clone())
        .with_context(|| format!("invalid --server-name {:?}", args.server_name))?;
    if args.interval.is_some_and(|i| i.is_zero()) {
        bail!("--interval must be positive");
    }
    let client = Arc::new(Client {
        connector: TlsConnector::from(cfg),
        server_name,
        target,
        timeout: args.timeout,
    });
    let (interval, duration) = (
        args.interval.unwrap_or_default(),
        args.duration.unwrap_or_default(),
    );
    Ok(if args.gap {
        run_gap(client, interval, duration, args.new_connection).await
    } else if let Some(n) = args.connections {
        run_long(client, n, interval, duration).await
    } else if let Some(rate) = args.rate {
        run_open(client, args.count.unwrap_or(1), rate).await
    } else {
        run_count(client, args.count.unwrap_or(1), args.concurrency).await
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let out = run(args).await?;
    println!("{out}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parsing() {
        let t = parse_url("https://10.0.0.1:6443/version?x=1").unwrap();
        assert_eq!(t.addr, "10.0.0.1:6443".parse().unwrap());
        assert_eq!(t.authority, "10.0.0.1:6443");
        assert_eq!(t.path, "/version?x=1");
        let t = parse_url("https://127.0.0.1").unwrap();
        assert_eq!((t.addr.port(), t.path.as_str()), (443, "/"));
        let t = parse_url("https://[::1]:8443/readyz").unwrap();
        assert_eq!(t.addr, "[::1]:8443".parse().unwrap());
        let t = parse_url("https://[::1]/").unwrap();
        assert_eq!(t.addr.port(), 443);
        assert!(parse_url("http://127.0.0.1/").is_err());
        assert!(parse_url("https://kubernetes:6443/").is_err());
    }

    #[test]
    fn gaps_between_successes() {
        let ev = [(10.0, true), (110.0, true), (210.0, true)];
        assert_eq!(compute_gaps(&ev, 300.0), (100.0, vec![]));
        // Failures in the middle: one gap spanning them.
        let ev = [
            (10.0, true),
            (110.0, false),
            (210.0, false),
            (310.0, false),
            (410.0, true),
            (510.0, true),
        ];
        assert_eq!(compute_gaps(&ev, 300.0), (400.0, vec![(10.0, 410.0)]));
        // A short blip stays under the threshold but still sets max_gap.
        let ev = [(10.0, true), (110.0, false), (210.0, true)];
        assert_eq!(compute_gaps(&ev, 300.0), (200.0, vec![]));
    }

    #[test]
    fn gaps_at_the_edges() {
        // Leading failures count from the start of the run.
        let ev = [(100.0, false), (600.0, false), (700.0, true), (800.0, true)];
        assert_eq!(compute_gaps(&ev, 300.0), (700.0, vec![(0.0, 700.0)]));
        // Trailing failures count up to the last request.
        let ev = [
            (10.0, true),
            (110.0, true),
            (2110.0, false),
            (4110.0, false),
        ];
        assert_eq!(compute_gaps(&ev, 300.0), (4000.0, vec![(110.0, 4110.0)]));
        // Never successful: the whole run is one gap.
        let ev = [(100.0, false), (900.0, false)];
        assert_eq!(compute_gaps(&ev, 300.0), (900.0, vec![(0.0, 900.0)]));
        assert_eq!(compute_gaps(&[], 300.0), (0.0, vec![]));
        // A first success is not a gap by itself.
        assert_eq!(compute_gaps(&[(500.0, true)], 300.0), (0.0, vec![]));
    }

    #[test]
    fn io_reasons_are_short() {
        let e = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(io_reason(&e), "connection refused");
        let e = io::Error::new(
            io::ErrorKind::InvalidData,
            "invalid peer certificate: UnknownIssuer",
        );
        assert_eq!(io_reason(&e), "invalid peer certificate: UnknownIssuer");
    }

    #[test]
    fn cli_modes() {
        let p = |a: &[&str]| {
            Args::try_parse_from(std::iter::once("lb-loadgen").chain(a.iter().copied()))
        };
        assert!(p(&["--url", "https://127.0.0.1/", "--insecure"]).is_ok());
        assert!(
            p(&["--url", "https://127.0.0.1/"]).is_err(),
            "needs --ca or --insecure"
        );
        assert!(p(&["--url", "u", "--insecure", "--gap", "--interval", "1s"]).is_err());
        assert!(p(&[
            "--url",
            "u",
            "--insecure",
            "--connections",
            "2",
            "--interval",
            "1s",
            "--duration",
            "2s"
        ])
        .is_ok());
        assert!(p(&[
            "--url",
            "u",
            "--insecure",
            "--count",
            "2",
            "--gap",
            "--interval",
            "1s",
            "--duration",
            "2s"
        ])
        .is_err());
        let a = p(&["--url", "u", "--insecure", "--count", "9", "--rate", "3"]).unwrap();
        assert_eq!((a.count, a.rate), (Some(9), Some(3)));
        assert!(
            p(&["--url", "u", "--insecure", "--rate", "3"]).is_err(),
            "needs --count"
        );
        assert!(p(&[
            "--url",
            "u",
            "--insecure",
            "--count",
            "9",
            "--rate",
            "3",
            "--concurrency",
            "2"
        ])
        .is_err());
        let a = p(&["--url", "u", "--insecure", "--timeout", "500ms"]).unwrap();
        assert_eq!(a.timeout, Duration::from_millis(500));
    }
}
