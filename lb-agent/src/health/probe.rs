//! One probe: connect straight to the backend (not through the VIP), do a real TLS
//! handshake, send an HTTP/1.1 GET, read the status line. Any failure keeps its reason,
//! and the reason says whose fault it likely is (`FailureClass`).

use std::{
    io,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use rustls::{pki_types::ServerName, AlertDescription};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    sync::watch,
};

use crate::config::{HealthConfig, HealthKind};

/// Whose fault a failed probe most likely is, which decides what happens to the flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureClass {
    /// The backend is gone: its flows are re-picked (their connections reset).
    Unreachable,
    /// The backend answers but should get no new connections; its flows are kept. An
    /// overloaded apiserver answering /readyz late lands here, so that its watches live.
    NotReady,
    /// Probably our fault (CA, client certificate, credentials): flows are kept as for
    /// not ready, and `policy::panic_mode` may serve the backend anyway.
    LbSide,
}

impl FailureClass {
    /// True when the backend's existing flows must stay where they are.
    pub fn keeps_flows(self) -> bool {
        self != FailureClass::Unreachable
    }

    /// The word status and logs use for a backend down for this class.
    pub fn word(self) -> &'static str {
        match self {
            FailureClass::Unreachable => "unreachable",
            FailureClass::NotReady => "not ready",
            FailureClass::LbSide => "LB side",
        }
    }
}

/// What a probe that connected was waiting for when its time ran out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Waiting {
    /// The server's side of the TLS handshake.
    Handshake,
    /// The status line of the answer to `GET path`.
    Answer(String),
}

/// Why a probe failed; `class()` says what that means for the backend's flows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Connection refused: nothing listens on the port.
    Refused,
    /// The TCP connect did not finish within the timeout.
    ConnectTimeout,
    /// Another connect error (no route, host or network unreachable...).
    Connect(String),
    /// The TLS handshake failed for a reason not about certificates (closed, reset,
    /// a protocol error).
    Handshake(String),
    /// Our CA does not vouch for the server's certificate (the verifier's error).
    CertNotTrusted(String),
    /// The server rejected our client certificate (the alert it sent).
    ClientCertRejected(String),
    /// Connected, then no progress before the timeout.
    TimeoutAfterConnect(Waiting),
    /// A read or write failed after the connection (and TLS) was established.
    Io(String),
    /// The answer was not HTTP.
    Protocol(String),
    /// It answered with another status.
    Status(u16),
    /// Made by the tracker, never by a probe: the failures that took the backend down
    /// were of different classes, so it is down as not ready; this is the latest one.
    Mixed(Box<Failure>),
    /// Never made by a probe: the previous agent left the backend down but its flows kept
    /// (adoption), and no probe of ours has said otherwise yet.
    Inherited,
    /// DSR: the backend answers at its own address but not for the VIP (lost its
    /// `backend-setup`, or nothing listens on the VIP's port): `health::vip_path`.
    NoVipPath(String),
    /// DSR: the VIP-path probe could not run on this host (a socket, a route or neighbour
    /// lookup): this host's problem, not the backend's.
    VipPathLocal(String),
}

impl Failure {
    /// What this failure means for the backend's flows.
    pub fn class(&self) -> FailureClass {
        match self {
            // A backend that drops the VIP's packets has no live DSR connection left either.
            Failure::Refused
            | Failure::ConnectTimeout
            | Failure::Connect(_)
            | Failure::Handshake(_)
            | Failure::NoVipPath(_) => FailureClass::Unreachable,
            Failure::CertNotTrusted(_)
            | Failure::ClientCertRejected(_)
            | Failure::VipPathLocal(_) => FailureClass::LbSide,
            // Credentials are ours: the apiserver answers, it just does not know us.
            Failure::Status(401 | 403) => FailureClass::LbSide,
            Failure::TimeoutAfterConnect(_)
            | Failure::Io(_)
            | Failure::Protocol(_)
            | Failure::Status(_)
            | Failure::Mixed(_)
            | Failure::Inherited => FailureClass::NotReady,
        }
    }

    /// A short word for metrics labels: one per kind, never a message (bounded cardinality).
    pub fn reason(&self) -> &'static str {
        match self {
            Failure::Refused => "refused",
            Failure::ConnectTimeout => "connect_timeout",
            Failure::Connect(_) => "connect",
            Failure::Handshake(_) => "handshake",
            Failure::CertNotTrusted(_) => "cert_not_trusted",
            Failure::ClientCertRejected(_) => "client_cert_rejected",
            Failure::TimeoutAfterConnect(_) => "timeout",
            Failure::Io(_) => "io",
            Failure::Protocol(_) => "protocol",
            Failure::Status(_) => "status",
            Failure::Mixed(_) => "mixed",
            Failure::Inherited => "inherited",
            Failure::NoVipPath(_) => "no_vip_path",
            Failure::VipPathLocal(_) => "vip_path_local",
        }
    }

    /// True unless the backend is unreachable, i.e. its flows are kept: not ready in the
    /// wide sense, LB side included. Prefer `class()`.
    pub fn is_not_ready(&self) -> bool {
        self.class().keeps_flows()
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Refused => write!(f, "connection refused"),
            Failure::ConnectTimeout => write!(f, "connect timeout"),
            Failure::Connect(e) => write!(f, "connect: {e}"),
            Failure::Handshake(e) => write!(f, "TLS handshake: {e}"),
            Failure::CertNotTrusted(e) => write!(f, "TLS: certificate not trusted: {e}"),
            Failure::ClientCertRejected(e) => {
                write!(f, "TLS: our client certificate was rejected: {e}")
            }
            Failure::TimeoutAfterConnect(Waiting::Handshake) => {
                write!(f, "timeout after connect (TLS handshake)")
            }
            Failure::TimeoutAfterConnect(Waiting::Answer(path)) => {
                write!(f, "timeout after connect (no answer to GET {path})")
            }
            Failure::Io(e) => write!(f, "{e}"),
            Failure::Protocol(e) => write!(f, "bad HTTP answer: {e}"),
            Failure::Status(s) => write!(f, "status {s}"),
            Failure::Mixed(latest) => write!(f, "failures of several kinds, latest: {latest}"),
            Failure::Inherited => write!(f, "not ready when the previous agent left"),
            Failure::NoVipPath(e) => write!(f, "VIP path: {e}"),
            Failure::VipPathLocal(e) => write!(f, "VIP path probe cannot run here: {e}"),
        }
    }
}

/// The outcome of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub result: Result<(), Failure>,
    pub latency: Duration,
}

/// The TLS client config a VIP's probers use, replaced when its files change on disk.
pub type TlsUpdates = watch::Receiver<Option<Arc<rustls::ClientConfig>>>;

/// What a prober needs to probe one backend.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub kind: HealthKind,
    pub path: String,
    pub expect_status: u16,
    pub timeout: Duration,
    /// Host header and SNI.
    pub host: String,
    pub server_name: ServerName<'static>,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// When set, the latest config published here replaces `tls` at each probe.
    pub tls_updates: Option<TlsUpdates>,
    /// DSR VIPs: after a probe that passed, the VIP path is probed too.
    pub vip_path: Option<VipPathCheck>,
}

/// The LB's own side of a VIP-path probe: the data plane's interface and address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalLink {
    pub ifname: String,
    pub ifindex: u32,
    pub mac: [u8; 6],
    /// The interface's primary IPv4: the probe SYN's source.
    pub addr: std::net::Ipv4Addr,
}

/// What a DSR backend's VIP-path probe needs besides the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipPathCheck {
    pub local: LocalLink,
    pub mode: super::vip_path::DsrMode,
    pub vip: std::net::Ipv4Addr,
    pub port: u16,
}

impl Target {
    /// A target for `addr` under `cfg`; `tls` is the VIP's client config (https only).
    pub fn new(
        addr: SocketAddr,
        cfg: &HealthConfig,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Self {
        let (host, server_name) = server_name(cfg, addr);
        Self {
            addr,
            kind: cfg.kind,
            path: cfg.path.clone(),
            expect_status: cfg.expect_status,
            timeout: cfg.timeout,
            host,
            server_name,
            tls,
            tls_updates: None,
            vip_path: None,
        }
    }

    /// Makes every probe use the latest config published on `rx` (see `tls_watch`).
    pub fn with_tls_updates(mut self, rx: TlsUpdates) -> Self {
        self.tls_updates = Some(rx);
        self
    }

    /// The client config the next probe uses.
    pub fn tls_config(&self) -> Option<Arc<rustls::ClientConfig>> {
        match &self.tls_updates {
            Some(rx) => rx.borrow().clone(),
            None => self.tls.clone(),
        }
    }
}

/// The Host header and the TLS server name (SNI, and the name verified) for a backend at
/// `addr`: `health.server_name`, or the address.
pub fn server_name(cfg: &HealthConfig, addr: SocketAddr) -> (String, ServerName<'static>) {
    let host = cfg
        .server_name
        .clone()
        .unwrap_or_else(|| addr.ip().to_string());
    let name = ServerName::try_from(host.clone())
        .unwrap_or_else(|_| ServerName::IpAddress(addr.ip().into()));
    (host, name)
}

/// Runs one probe against `t`.
#[tracing::instrument(level = "debug", name = "probe", skip_all, fields(addr = %t.addr))]
pub async fn probe(t: &Target) -> Outcome {
    let start = Instant::now();
    // One deadline for the whole probe, so the timeout keeps its meaning, but each phase
    // is timed against it on its own: a connect that times out means nobody is there,
    // a timeout after the connect means somebody is there and slow.
    let deadline = tokio::time::Instant::now() + t.timeout;
    let result = run(t, deadline).await;
    Outcome {
        result,
        latency: start.elapsed(),
    }
}

async fn run(t: &Target, deadline: tokio::time::Instant) -> Result<(), Failure> {
    if t.kind == HealthKind::None {
        return Ok(());
    }
    let tcp = match tokio::time::timeout_at(deadline, TcpStream::connect(t.addr)).await {
        Err(_) => return Err(Failure::ConnectTimeout),
        Ok(Err(e)) => return Err(connect_failure(&e)),
        Ok(Ok(s)) => s,
    };
    let _ = tcp.set_nodelay(true);
    match t.kind {
        HealthKind::Tcp | HealthKind::None => Ok(()),
        HealthKind::Http => http_get(tcp, t, deadline).await,
        HealthKind::Https => {
            let cfg = t.tls_config().expect("https targets carry a TLS config");
            let connect = tokio_rustls::TlsConnector::from(cfg).connect(t.server_name.clone(), tcp);
            let tls = match tokio::time::timeout_at(deadline, connect).await {
                Err(_) => return Err(Failure::TimeoutAfterConnect(Waiting::Handshake)),
                Ok(Err(e)) => return Err(handshake_failure(&e)),
                Ok(Ok(s)) => s,
            };
            http_get(tls, t, deadline).await
        }
    }
}

pub(crate) fn connect_failure(e: &io::Error) -> Failure {
    match e.raw_os_error() {
        _ if e.kind() == io::ErrorKind::ConnectionRefused => Failure::Refused,
        // The route lookup for a blackhole route fails with EINVAL, which says nothing.
        Some(libc::EINVAL) => Failure::Connect("blackhole route".into()),
        _ => Failure::Connect(e.to_string()),
    }
}

/// The rustls error inside an I/O error from tokio-rustls, if that is what it is.
fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

/// Sorts out a TLS error: certificates (theirs or ours) are LB side, anything else is
/// about the backend. None when `e` does not come from rustls.
fn tls_failure(e: &rustls::Error) -> Option<Failure> {
    use rustls::Error as E;
    match e {
        // Whatever the verifier says: our CA does not vouch for their certificate.
        E::InvalidCertificate(c) => Some(Failure::CertNotTrusted(c.to_string())),
        E::NoCertificatesPresented | E::UnsupportedNameType | E::InvalidCertRevocationList(_) => {
            Some(Failure::CertNotTrusted(e.to_string()))
        }
        E::AlertReceived(a) if rejects_client_cert(*a) => {
            Some(Failure::ClientCertRejected(format!("{a:?}")))
        }
        _ => None,
    }
}

/// Alerts a server sends when it does not accept our client certificate (or its key):
/// RFC 8446 section 6.2.
fn rejects_client_cert(a: AlertDescription) -> bool {
    use AlertDescription as A;
    matches!(
        a,
        A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA
            | A::AccessDenied
            | A::DecryptError
            | A::CertificateRequired
    )
}

pub(crate) fn handshake_failure(e: &io::Error) -> Failure {
    if let Some(r) = rustls_error(e) {
        return tls_failure(r).unwrap_or_else(|| Failure::Handshake(r.to_string()));
    }
    match e.kind() {
        io::ErrorKind::UnexpectedEof => Failure::Handshake("connection closed".into()),
        _ => Failure::Handshake(e.to_string()),
    }
}

/// An I/O error once TLS is up. With TLS 1.3 the client finishes its handshake before
/// the server has checked the client certificate, so a rejection arrives here, as an
/// alert on the first read.
pub(crate) fn io_failure(what: &str, e: &io::Error) -> Failure {
    rustls_error(e)
        .and_then(tls_failure)
        .unwrap_or_else(|| Failure::Io(format!("{what}: {e}")))
}

/// Sends the GET and checks the status line by `deadline`; the body is not needed.
async fn http_get<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    t: &Target,
    deadline: tokio::time::Instant,
) -> Result<(), Failure> {
    let status = tokio::time::timeout_at(deadline, status(&mut s, t))
        .await
        .unwrap_or_else(|_| {
            Err(Failure::TimeoutAfterConnect(Waiting::Answer(
                t.path.clone(),
            )))
        })?;
    // Close politely so the backend does not log a reset for every probe, but never let
    // the close turn an answer into a timeout.
    let _ = tokio::time::timeout_at(deadline, s.shutdown()).await;
    if status == t.expect_status {
        Ok(())
    } else {
        Err(Failure::Status(status))
    }
}

/// Sends the GET and reads the answer's status.
async fn status<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, t: &Target) -> Result<u16, Failure> {
    let req = get_request(&t.path, &t.host, "*/*", &[]);
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| io_failure("write", &e))?;
    let mut buf = [0u8; 256];
    let mut n = 0;
    while !buf[..n].windows(2).any(|w| w == b"\r\n") {
        if n == buf.len() {
            return Err(Failure::Protocol("status line too long".into()));
        }
        let m = s
            .read(&mut buf[n..])
            .await
            .map_err(|e| io_failure("read", &e))?;
        if m == 0 {
            return Err(Failure::Protocol(
                "connection closed before the status line".into(),
            ));
        }
        n += m;
    }
    let line = String::from_utf8_lossy(&buf[..n]);
    parse_status(&line)
        .ok_or_else(|| Failure::Protocol(line.lines().next().unwrap_or("").to_string()))
}

/// An HTTP/1.1 GET of `target` (path and query) with `Connection: close` and `extra`
/// headers.
pub(crate) fn get_request(
    target: &str,
    host: &str,
    accept: &str,
    extra: &[(&str, &str)],
) -> String {
    let mut req = format!(
        "GET {target} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: lb-agent\r\nAccept: {accept}\r\n"
    );
    for (k, v) in extra {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("Connection: close\r\n\r\n");
    req
}

/// The status of an HTTP/1.x status line.
pub(crate) fn parse_status(line: &str) -> Option<u16> {
    let mut it = line.split_whitespace();
    let version = it.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    it.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::CertificateError;

    #[test]
    fn status_line() {
        assert_eq!(parse_status("HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(
            parse_status("HTTP/1.0 503 Service Unavailable\r\n"),
            Some(503)
        );
        assert_eq!(parse_status("SSH-2.0-OpenSSH\r\n"), None);
    }

    #[test]
    fn classes() {
        use FailureClass::*;
        let cases = [
            (Failure::Refused, Unreachable),
            (Failure::ConnectTimeout, Unreachable),
            (Failure::Connect("No route to host".into()), Unreachable),
            (Failure::Handshake("connection closed".into()), Unreachable),
            (Failure::TimeoutAfterConnect(Waiting::Handshake), NotReady),
            (
                Failure::TimeoutAfterConnect(Waiting::Answer("/readyz".into())),
                NotReady,
            ),
            (Failure::Status(503), NotReady),
            (Failure::Status(500), NotReady),
            (Failure::Protocol("SSH-2.0".into()), NotReady),
            (Failure::Io("read: connection reset".into()), NotReady),
            (Failure::Status(401), LbSide),
            (Failure::Status(403), LbSide),
            (Failure::CertNotTrusted("UnknownIssuer".into()), LbSide),
            (Failure::ClientCertRejected("BadCertificate".into()), LbSide),
            (Failure::Mixed(Box::new(Failure::Refused)), NotReady),
        ];
        for (f, class) in cases {
            assert_eq!(f.class(), class, "{f}");
            assert_eq!(f.is_not_ready(), class != Unreachable, "{f}");
        }
    }

    #[test]
    fn tls_errors_about_certificates_are_lb_side() {
        let untrusted = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        let f = tls_failure(&untrusted).unwrap();
        assert_eq!(f.to_string(), "TLS: certificate not trusted: UnknownIssuer");
        assert_eq!(f.class(), FailureClass::LbSide);
        let bad_sig = rustls::Error::InvalidCertificate(CertificateError::BadSignature);
        assert_eq!(tls_failure(&bad_sig).unwrap().class(), FailureClass::LbSide);
        for a in [
            AlertDescription::BadCertificate,
            AlertDescription::UnknownCA,
            AlertDescription::CertificateRequired,
            AlertDescription::AccessDenied,
            AlertDescription::DecryptError,
        ] {
            let f = tls_failure(&rustls::Error::AlertReceived(a)).unwrap();
            assert!(matches!(f, Failure::ClientCertRejected(_)), "{a:?}");
        }
        // Not about certificates: the backend's problem.
        assert_eq!(
            tls_failure(&rustls::Error::AlertReceived(
                AlertDescription::HandshakeFailure
            )),
            None
        );
        let e = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(AlertDescription::ProtocolVersion),
        );
        assert_eq!(handshake_failure(&e).class(), FailureClass::Unreachable);
        let e = io::Error::new(io::ErrorKind::InvalidData, untrusted);
        assert_eq!(handshake_failure(&e).class(), FailureClass::LbSide);
        let eof = io::Error::new(io::ErrorKind::UnexpectedEof, "tls handshake eof");
        assert_eq!(
            handshake_failure(&eof),
            Failure::Handshake("connection closed".into())
        );
    }

    #[test]
    fn a_rejection_read_after_the_handshake_is_lb_side() {
        let e = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(AlertDescription::CertificateRequired),
        );
        assert_eq!(io_failure("read", &e).class(), FailureClass::LbSide);
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(io_failure("read", &reset).class(), FailureClass::NotReady);
    }

    #[test]
    fn connect_errors() {
        let refused = io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(connect_failure(&refused), Failure::Refused);
        let blackhole = io::Error::from_raw_os_error(libc::EINVAL);
        assert_eq!(blackhole_or(&blackhole), "connect: blackhole route");
        let no_route = io::Error::from_raw_os_error(libc::EHOSTUNREACH);
        assert_eq!(
            blackhole_or(&no_route),
            "connect: No route to host (os error 113)"
        );
    }

    fn blackhole_or(e: &io::Error) -> String {
        let f = connect_failure(e);
        assert_eq!(f.class(), FailureClass::Unreachable);
        f.to_string()
    }

    #[test]
    fn messages_stay_short() {
        assert_eq!(Failure::ConnectTimeout.to_string(), "connect timeout");
        assert_eq!(
            Failure::TimeoutAfterConnect(Waiting::Answer("/readyz".into())).to_string(),
            "timeout after connect (no answer to GET /readyz)"
        );
        assert_eq!(Failure::Status(503).to_string(), "status 503");
        assert_eq!(Failure::Refused.to_string(), "connection refused");
    }
}
