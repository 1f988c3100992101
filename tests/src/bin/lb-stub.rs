//! lb-stub: a fake kube-apiserver over HTTPS, with a plain-HTTP admin port to count traffic and
//! inject failures (readyz 503/401/403/hang/slow, accept hang, dropping every connection).
//!
//! Bulk transfers for path MTU tests: `GET /bytes?n=N` answers N bytes of
//! `lb_tests::http::pattern` (N up to 64 MiB); `POST /upload` reads a body of up to 16 MiB and
//! answers `{"received": LEN, "fnv1a64": "HEX"}` (`lb_tests::http::fnv1a64` of the body).
//!
//! The `kubernetes` Service's EndpointSlice (`lb_tests::endpointslice`): listed and watched
//! at `/apis/discovery.k8s.io/v1/namespaces/default/endpointslices`, set with the admin
//! port's `/endpointslice?addresses=A,B,C[&port=P]` (each change is a watch event). With
//! `--api-client-ca` or `--api-token` it answers only clients that present a certificate
//! from that CA or that bearer token (401 otherwise), as an apiserver does; /readyz and the
//! rest stay open.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use lb_tests::endpointslice::{self, Slice};
use lb_tests::http::{self, Request};
use lb_tests::tls;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio_rustls::rustls::{server::WebPkiClientVerifier, RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

/// A slow or silent client must not pin a task forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bounds the per-path map so a client spraying random paths cannot grow it without limit.
const MAX_TRACKED_PATHS: usize = 256;
/// Largest /bytes response.
const MAX_BYTES: usize = 64 << 20;
/// Largest /upload body kept and hashed (bodies of other requests are kept too, up to this).
const MAX_UPLOAD: usize = 16 << 20;

#[derive(Parser)]
#[command(
    name = "lb-stub",
    about = "Fake kube-apiserver over HTTPS for lb tests"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write ca.crt, ca.key, server.crt, server.key, other-ca.crt, client.crt and client.key
    /// into DIR.
    GenCerts {
        /// Output directory (created if missing; files are overwritten).
        #[arg(long)]
        dir: PathBuf,
        /// Server certificate SAN (IP if it parses as one, else DNS); "kubernetes" and
        /// "localhost" are always added.
        #[arg(long = "san", value_name = "NAME_OR_IP")]
        sans: Vec<String>,
    },
    /// Serve the fake API over HTTPS.
    Serve(ServeArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// HTTPS listen address; repeat it to serve the same API on several (one process
    /// standing in for many apiservers, e.g. to measure probing 100 backends).
    #[arg(long, value_name = "IP:PORT", required = true)]
    listen: Vec<SocketAddr>,
    /// Backend name, reported in X-Backend and /version.
    #[arg(long)]
    name: String,
    /// PEM certificate chain.
    #[arg(long)]
    cert: PathBuf,
    /// PEM private key.
    #[arg(long)]
    key: PathBuf,
    /// Plain-HTTP admin listen address (/stats, /mode, /close-all).
    #[arg(long, value_name = "IP:PORT")]
    admin_listen: Option<SocketAddr>,
    /// Initial accept mode.
    #[arg(long, value_enum, default_value = "normal")]
    accept: AcceptMode,
    /// Initial /readyz behaviour.
    #[arg(long, value_enum, default_value = "200")]
    readyz: ReadyzMode,
    /// Initial delay before answering /readyz, in milliseconds (an overloaded apiserver).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    readyz_delay_ms: u64,
    /// Require a client certificate issued by this CA (PEM), as an apiserver with
    /// --client-ca-file does for clients that present one.
    #[arg(long, value_name = "PEM")]
    client_ca: Option<PathBuf>,
    /// The EndpointSlice API answers only clients with a certificate from this CA (PEM) or
    /// with `--api-token`; a certificate is asked for, not required, on every connection.
    #[arg(long, value_name = "PEM", conflicts_with = "client_ca")]
    api_client_ca: Option<PathBuf>,
    /// The EndpointSlice API answers only this bearer token (or an `--api-client-ca`
    /// certificate).
    #[arg(long, value_name = "TOKEN")]
    api_token: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
#[repr(u8)]
enum AcceptMode {
    /// Complete TLS and serve HTTP.
    Normal,
    /// Accept TCP, then never handshake or answer.
    Hang,
}

impl AcceptMode {
    fn as_str(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::Hang => "hang",
        }
    }
    fn from_u8(v: u8) -> Self {
        if v == Self::Hang as u8 {
            Self::Hang
        } else {
            Self::Normal
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
#[repr(u8)]
enum ReadyzMode {
    /// 200 ok.
    #[value(name = "200")]
    Ok,
    /// 503 like an apiserver that is shutting down.
    #[value(name = "503")]
    Unavailable,
    /// Never answer /readyz.
    Hang,
    /// 401 like an apiserver that does not accept the prober's credentials.
    #[value(name = "401")]
    Unauthorized,
    /// 403 like an apiserver whose RBAC denies the prober /readyz.
    #[value(name = "403")]
    Forbidden,
}

impl ReadyzMode {
    fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "200",
            Self::Unavailable => "503",
            Self::Hang => "hang",
            Self::Unauthorized => "401",
            Self::Forbidden => "403",
        }
    }
    fn from_u8(v: u8) -> Self {
        match v {
            v if v == Self::Unavailable as u8 => Self::Unavailable,
            v if v == Self::Hang as u8 => Self::Hang,
            v if v == Self::Unauthorized as u8 => Self::Unauthorized,
            v if v == Self::Forbidden as u8 => Self::Forbidden,
            _ => Self::Ok,
        }
    }
}

/// What the connection loop should do with a request.
enum Reply {
    Full {
        status: u16,
        content_type: &'static str,
        body: Vec<u8>,
    },
    /// Leave the request unanswered while keeping the connection open.
    Hang,
    /// Stream watch bookmarks at this interval until the connection dies.
    Watch(Duration),
    /// Watch the EndpointSlice from version `from` for `timeout`, with BOOKMARKs if asked.
    SliceWatch {
        from: u64,
        timeout: Duration,
        bookmarks: bool,
    },
}

impl Reply {
    fn text(status: u16, body: &str) -> Self {
        Self::Full {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.as_bytes().to_vec(),
        }
    }
    fn json(status: u16, v: serde_json::Value) -> Self {
        Self::Full {
            status,
            content_type: "application/json",
            body: v.to_string().into_bytes(),
        }
    }
    fn bytes(body: Vec<u8>) -> Self {
        Self::Full {
            status: 200,
            content_type: "application/octet-stream",
            body,
        }
    }
}

struct Stub {
    name: String,
    connections: AtomicU64,
    tls_handshakes: AtomicU64,
    requests_total: AtomicU64,
    requests: Mutex<BTreeMap<String, u64>>,
    /// Connections per peer address: the client's own address when lb forwards by DSR,
    /// the LB's SNAT address under NAT.
    peers: Mutex<BTreeMap<String, u64>>,
    active: AtomicU64,
    accept: AtomicU8,
    readyz: AtomicU8,
    readyz_delay_ms: AtomicU64,
    /// Bumped by /close-all; every client connection task watches it and drops its socket.
    close_gen: watch::Sender<u64>,
    /// The `kubernetes` Service's EndpointSlice.
    slices: endpointslice::Store,
    /// Whom the EndpointSlice API answers: None, everybody; else a client certificate (when
    /// asked for one) or this token.
    api_auth: Option<ApiAuth>,
}

/// The EndpointSlice API's credentials.
struct ApiAuth {
    certificates: bool,
    token: Option<String>,
}

/// How often a watch that asked for them gets a BOOKMARK.
const BOOKMARK_EVERY: Duration = Duration::from_secs(5);

/// Keeps `active_connections` exact however a connection task ends (including cancellation).
struct ActiveGuard(Arc<Stub>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Stub {
    fn accept_mode(&self) -> AcceptMode {
        AcceptMode::from_u8(self.accept.load(Ordering::Relaxed))
    }

    fn readyz_mode(&self) -> ReadyzMode {
        ReadyzMode::from_u8(self.readyz.load(Ordering::Relaxed))
    }

    fn readyz_delay(&self) -> Duration {
        Duration::from_millis(self.readyz_delay_ms.load(Ordering::Relaxed))
    }

    fn modes_json(&self) -> serde_json::Value {
        json!({
            "readyz": self.readyz_mode().as_str(),
            "readyz_delay_ms": self.readyz_delay_ms.load(Ordering::Relaxed),
            "accept": self.accept_mode().as_str(),
        })
    }

    /// How long to sit on a request before answering it.
    fn api_delay(&self, req: &Request) -> Duration {
        match req.path() {
            "/readyz" => self.readyz_delay(),
            _ => Duration::ZERO,
        }
    }

    fn count_request(&self, path: &str) {
        self.requests_total.fetch_add(1, Ordering::Relaxed);
        let mut map = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        let key = if map.contains_key(path) || map.len() < MAX_TRACKED_PATHS {
            path
        } else {
            "(other)"
        };
        *map.entry(key.to_string()).or_default() += 1;
    }

    /// The EndpointSlice API: a list, or a watch; refused without the credentials asked for.
    fn slice_route(&self, req: &Request, cert: bool) -> Reply {
        if let Some(a) = &self.api_auth {
            let bearer = req
                .header("authorization")
                .and_then(|h| h.strip_prefix("Bearer "));
            let ok =
                (a.certificates && cert) || (a.token.is_some() && bearer == a.token.as_deref());
            if !ok {
                return Reply::json(
                    401,
                    endpointslice::status(401, "Unauthorized", "Unauthorized"),
                );
            }
        }
        if !matches!(req.query_param("watch"), Some("1" | "true")) {
            return Reply::json(200, self.slices.list());
        }
        let from = match req.query_param("resourceVersion").map(str::parse::<u64>) {
            Some(Ok(rv)) => rv,
            None => self.slices.get().0,
            Some(Err(_)) => {
                return Reply::json(
                    400,
                    endpointslice::status(400, "BadRequest", "bad resourceVersion"),
                )
            }
        };
        let timeout = match req.query_param("timeoutSeconds").map(str::parse::<u64>) {
            Some(Ok(s)) => Duration::from_secs(s),
            _ => Duration::from_secs(1800),
        };
        Reply::SliceWatch {
            from,
            timeout,
            bookmarks: req.query_param("allowWatchBookmarks") == Some("true"),
        }
    }

    fn api_route(&self, req: &Request, body: &[u8], cert: bool) -> Reply {
        let path = req.path();
        self.count_request(path);
        match path {
            endpointslice::PATH => self.slice_route(req, cert),
            "/readyz" => match self.readyz_mode() {
                ReadyzMode::Ok => Reply::text(200, "ok"),
                ReadyzMode::Unavailable => Reply::text(
                    503,
                    "[-]shutdown failed: reason withheld\nreadyz check failed",
                ),
                ReadyzMode::Hang => Reply::Hang,
                ReadyzMode::Unauthorized => Reply::json(
                    401,
                    json!({"kind": "Status", "status": "Failure", "reason": "Unauthorized", "code": 401}),
                ),
                ReadyzMode::Forbidden => Reply::json(
                    403,
                    json!({"kind": "Status", "status": "Failure", "reason": "Forbidden", "code": 403}),
                ),
            },
            "/livez" | "/healthz" => Reply::text(200, "ok"),
            // Formatted by hand to keep the field order of a real apiserver's reply.
            "/version" => Reply::Full {
                status: 200,
                content_type: "application/json",
                body: format!(
                    r#"{{"major":"1","minor":"30","gitVersion":"v1.30.0-lb-stub","backend":{}}}"#,
                    json!(self.name)
                )
                .into_bytes(),
            },
            "/bytes" => match req.query_param("n").map(str::parse::<usize>) {
                Some(Ok(n)) if n <= MAX_BYTES => Reply::bytes(http::pattern(n)),
                _ => Reply::text(400, "bad n: /bytes?n=N with N at most 64 MiB\n"),
            },
            "/upload" if req.method == "POST" => match req.content_length() {
                Ok(n) if n as usize <= MAX_UPLOAD => Reply::json(
                    200,
                    json!({
                        "received": body.len(),
                        "fnv1a64": format!("{:016x}", http::fnv1a64(body)),
                    }),
                ),
                _ => Reply::text(400, "upload: a Content-Length of at most 16 MiB\n"),
            },
            "/watch" => match req.query_param("interval_ms").map(str::parse::<u64>) {
                None => Reply::Watch(Duration::from_millis(100)),
                Some(Ok(ms)) => Reply::Watch(Duration::from_millis(ms.max(1))),
                Some(Err(_)) => Reply::text(400, "bad interval_ms\n"),
            },
            _ => Reply::text(404, "404 page not found\n"),
        }
    }

    fn admin_route(&self, req: &Request) -> Reply {
        match req.path() {
            "/stats" => {
                let requests = self
                    .requests
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                Reply::json(
                    200,
                    json!({
                        "name": self.name,
                        "connections": self.connections.load(Ordering::Relaxed),
                        "tls_handshakes": self.tls_handshakes.load(Ordering::Relaxed),
                        "requests_total": self.requests_total.load(Ordering::Relaxed),
                        "requests": requests,
                        "peers": self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone(),
                        "active_connections": self.active.load(Ordering::Relaxed),
                        "readyz": self.readyz_mode().as_str(),
                        "readyz_delay_ms": self.readyz_delay_ms.load(Ordering::Relaxed),
                        "accept": self.accept_mode().as_str(),
                    }),
                )
            }
            "/mode" => {
                // Validate everything before applying anything, so a bad request changes nothing.
                let readyz = match req.query_param("readyz") {
                    None => None,
                    Some(v) => match ReadyzMode::from_str(v, true) {
                        Ok(m) => Some(m),
                        Err(_) => return Reply::json(400, json!({"error": "bad readyz mode"})),
                    },
                };
                let accept = match req.query_param("accept") {
                    None => None,
                    Some(v) => match AcceptMode::from_str(v, true) {
                        Ok(m) => Some(m),
                        Err(_) => return Reply::json(400, json!({"error": "bad accept mode"})),
                    },
                };
                let delay = match req.query_param("readyz_delay_ms").map(str::parse::<u64>) {
                    None => None,
                    Some(Ok(ms)) => Some(ms),
                    Some(Err(_)) => {
                        return Reply::json(400, json!({"error": "bad readyz_delay_ms"}))
                    }
                };
                if let Some(m) = readyz {
                    self.readyz.store(m as u8, Ordering::Relaxed);
                }
                if let Some(ms) = delay {
                    self.readyz_delay_ms.store(ms, Ordering::Relaxed);
                }
                if let Some(m) = accept {
                    self.accept.store(m as u8, Ordering::Relaxed);
                }
                eprintln!("lb-stub {}: mode {}", self.name, self.modes_json());
                Reply::json(200, self.modes_json())
            }
            "/endpointslice" => {
                if let Some(a) = req.query_param("addresses") {
                    let addresses = match endpointslice::parse_addresses(a) {
                        Ok(a) => a,
                        Err(e) => return Reply::json(400, json!({"error": e})),
                    };
                    let port = match req.query_param("port").map(str::parse::<u16>) {
                        None => self.slices.get().1.port,
                        Some(Ok(p)) => p,
                        Some(Err(_)) => return Reply::json(400, json!({"error": "bad port"})),
                    };
                    let rv = self.slices.set(Slice { addresses, port });
                    eprintln!(
                        "lb-stub {}: EndpointSlice at rv {rv}: {a:?} port {port}",
                        self.name
                    );
                }
                let (rv, slice) = self.slices.get();
                Reply::json(
                    200,
                    json!({"resourceVersion": rv.to_string(), "port": slice.port,
                        "addresses": slice.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>()}),
                )
            }
            "/close-all" => {
                let active = self.active.load(Ordering::Relaxed);
                self.close_gen.send_modify(|g| *g += 1);
                Reply::json(200, json!({"closed": active}))
            }
            _ => Reply::text(404, "404 page not found\n"),
        }
    }
}

/// Reads and discards until the peer goes away: "hanging" without leaking closed sockets.
async fn drain<R: AsyncRead + Unpin>(mut r: R) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

/// Serves requests on one connection until the peer closes, asks to close, or an error occurs.
async fn serve_http<S: AsyncRead + AsyncWrite + Unpin>(
    stub: &Stub,
    stream: S,
    admin: bool,
    cert: bool,
) -> io::Result<()> {
    // BufReader passes writes through to the stream, so one value serves both directions.
    let mut conn = BufReader::new(stream);
    let name = stub.name.as_str();
    loop {
        let (req, body) = match http::read_request_keep(&mut conn, MAX_UPLOAD).await {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                let resp = http::response(
                    400,
                    &[("X-Backend", name), ("Connection", "close")],
                    b"bad request\n",
                );
                conn.write_all(&resp).await?;
                conn.shutdown().await?;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        // Admin clients are curl and test helpers: closing after each reply keeps them simple.
        let close = admin || req.wants_close();
        let reply = if admin {
            stub.admin_route(&req)
        } else {
            let delay = stub.api_delay(&req);
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            stub.api_route(&req, &body, cert)
        };
        match reply {
            Reply::Full {
                status,
                content_type,
                body,
            } => {
                let mut headers = vec![("Content-Type", content_type), ("X-Backend", name)];
                if close {
                    headers.push(("Connection", "close"));
                }
                conn.write_all(&http::response(status, &headers, &body))
                    .await?;
                conn.flush().await?;
                if close {
                    conn.shutdown().await?;
                    return Ok(());
                }
            }
            Reply::Hang => {
                drain(conn).await;
                return Ok(());
            }
            Reply::Watch(every) => {
                let head = http::response_head(
                    200,
                    &[("Content-Type", "application/json"), ("X-Backend", name)],
                    None,
                );
                conn.write_all(head.as_bytes()).await?;
                conn.flush().await?;
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                for seq in 1u64.. {
                    tick.tick().await;
                    let line = format!(
                        "{}\n",
                        json!({"type": "BOOKMARK", "backend": name, "seq": seq})
                    );
                    conn.write_all(&http::encode_chunk(line.as_bytes())).await?;
                    conn.flush().await?;
                }
                return Ok(());
            }
            Reply::SliceWatch {
                from,
                timeout,
                bookmarks,
            } => {
                let head = http::response_head(
                    200,
                    &[("Content-Type", "application/json"), ("X-Backend", name)],
                    None,
                );
                conn.write_all(head.as_bytes()).await?;
                let mut changed = stub.slices.subscribe();
                let end = tokio::time::Instant::now() + timeout;
                let mut bookmark = tokio::time::interval_at(
                    tokio::time::Instant::now() + BOOKMARK_EVERY,
                    BOOKMARK_EVERY,
                );
                let mut sent = from;
                loop {
                    for (rv, line) in stub.slices.events_after(sent) {
                        conn.write_all(&http::encode_chunk(format!("{line}\n").as_bytes()))
                            .await?;
                        sent = rv;
                    }
                    conn.flush().await?;
                    tokio::select! {
                        _ = changed.changed() => {}
                        _ = bookmark.tick(), if bookmarks => {
                            let line = format!("{}\n", stub.slices.bookmark());
                            conn.write_all(&http::encode_chunk(line.as_bytes())).await?;
                        }
                        _ = tokio::time::sleep_until(end) => {
                            conn.write_all(http::LAST_CHUNK).await?;
                            conn.flush().await?;
                            conn.shutdown().await?;
                            return Ok(());
                        }
                    }
                }
            }
        }
    }
}

async fn handle_client(stub: &Stub, acceptor: TlsAcceptor, sock: TcpStream) {
    let _ = sock.set_nodelay(true);
    if stub.accept_mode() == AcceptMode::Hang {
        drain(sock).await;
        return;
    }
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(sock)).await {
        Ok(Ok(tls)) => tls,
        // Failed handshakes (wrong CA on the client, port scans, timeouts) are expected in tests.
        _ => return,
    };
    stub.tls_handshakes.fetch_add(1, Ordering::Relaxed);
    // Verified by the server config's verifier when present.
    let cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .is_some_and(|c| !c.is_empty());
    let _ = serve_http(stub, tls, false, cert).await;
}

async fn accept_loop(stub: Arc<Stub>, listener: TcpListener, acceptor: TlsAcceptor) {
    loop {
        let sock = match listener.accept().await {
            Ok((sock, peer)) => {
                let mut peers = stub.peers.lock().unwrap_or_else(|e| e.into_inner());
                if peers.len() < MAX_TRACKED_PATHS || peers.contains_key(&peer.ip().to_string()) {
                    *peers.entry(peer.ip().to_string()).or_default() += 1;
                }
                drop(peers);
                sock
            }
            Err(e) => {
                // EMFILE and friends are transient; spinning on them would burn a core.
                eprintln!("lb-stub {}: accept: {e}", stub.name);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        stub.connections.fetch_add(1, Ordering::Relaxed);
        stub.active.fetch_add(1, Ordering::Relaxed);
        let guard = ActiveGuard(stub.clone());
        let mut close_rx = stub.close_gen.subscribe();
        let (stub, acceptor) = (stub.clone(), acceptor.clone());
        tokio::spawn(async move {
            let _guard = guard;
            tokio::select! {
                _ = close_rx.changed() => {}
                _ = handle_client(&stub, acceptor, sock) => {}
            }
        });
    }
}

async fn admin_loop(stub: Arc<Stub>, listener: TcpListener) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let stub = stub.clone();
        tokio::spawn(async move {
            let _ = serve_http(&stub, sock, true, false).await;
        });
    }
}

/// The server config; with `--client-ca` a client certificate from that CA is required,
/// with `--api-client-ca` one is asked for (and verified when presented).
fn server_config(args: &ServeArgs) -> Result<Arc<ServerConfig>> {
    let (ca, required) = match (&args.client_ca, &args.api_client_ca) {
        (Some(ca), _) => (ca, true),
        (None, Some(ca)) => (ca, false),
        (None, None) => return tls::server_config(&args.cert, &args.key),
    };
    let mut roots = RootCertStore::empty();
    for c in tls::load_certs(ca)? {
        roots
            .add(c)
            .with_context(|| format!("adding client CA from {}", ca.display()))?;
    }
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), tls::provider());
    let builder = if required {
        builder
    } else {
        builder.allow_unauthenticated()
    };
    let verifier = builder.build().context("client certificate verifier")?;
    let mut cfg = ServerConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(tls::load_certs(&args.cert)?, tls::load_key(&args.key)?)
        .context("building TLS server config")?;
    cfg.alpn_protocols = vec![tls::ALPN_HTTP11.to_vec()];
    Ok(Arc::new(cfg))
}

async fn serve(args: ServeArgs) -> Result<()> {
    let acceptor = TlsAcceptor::from(server_config(&args)?);
    let mut listeners = Vec::with_capacity(args.listen.len());
    for addr in &args.listen {
        listeners.push(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr}"))?,
        );
    }
    let admin = match args.admin_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding admin {addr}"))?,
        ),
        None => None,
    };
    let stub = Arc::new(Stub {
        name: args.name.clone(),
        connections: AtomicU64::new(0),
        tls_handshakes: AtomicU64::new(0),
        requests_total: AtomicU64::new(0),
        requests: Mutex::new(BTreeMap::new()),
        peers: Mutex::new(BTreeMap::new()),
        active: AtomicU64::new(0),
        accept: AtomicU8::new(args.accept as u8),
        readyz: AtomicU8::new(args.readyz as u8),
        readyz_delay_ms: AtomicU64::new(args.readyz_delay_ms),
        close_gen: watch::channel(0).0,
        slices: endpointslice::Store::new(Slice {
            addresses: Vec::new(),
            port: 6443,
        }),
        api_auth: (args.api_client_ca.is_some() || args.api_token.is_some()).then(|| ApiAuth {
            certificates: args.api_client_ca.is_some(),
            token: args.api_token.clone(),
        }),
    });
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;

    for listener in listeners {
        let addr = listener.local_addr()?;
        tokio::spawn(accept_loop(stub.clone(), listener, acceptor.clone()));
        eprintln!("lb-stub {} listening on {addr}", args.name);
    }
    if let Some(admin) = admin {
        tokio::spawn(admin_loop(stub.clone(), admin));
    }

    tokio::select! {
        _ = sigterm.recv() => {}
        _ = sigint.recv() => {}
    }
    eprintln!("lb-stub {} shutting down", args.name);
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::GenCerts { dir, sans } => {
            tls::write_pki(&dir, &sans)?;
            eprintln!("lb-stub: wrote test PKI to {}", dir.display());
            Ok(())
        }
        Cmd::Serve(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let res = rt.block_on(serve(args));
            // Connection tasks may be parked on sockets forever; don't wait for them.
            rt.shutdown_background();
            res
        }
    }
}
