//! One probe: connect straight to the backend (not through the VIP), do a real TLS
//! handshake, send an HTTP/1.1 GET, read the status line. Any failure keeps its reason.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

use crate::config::{HealthConfig, HealthKind};

/// Why a probe failed. `Unreachable` failures take a backend's flows away from it;
/// `NotReady` ones (it answers, but not with the expected status) leave them alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Connection refused.
    Refused,
    /// No answer within the timeout (connect, handshake or response).
    Timeout,
    /// The TLS handshake failed (wrong CA, wrong name...).
    Tls(String),
    /// Another socket error.
    Io(String),
    /// The answer was not HTTP.
    Protocol(String),
    /// It answered with another status.
    Status(u16),
}

impl Failure {
    /// True when the backend answers but is not ready (a graceful shutdown, for one).
    pub fn is_not_ready(&self) -> bool {
        matches!(self, Failure::Status(_))
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Refused => write!(f, "connection refused"),
            Failure::Timeout => write!(f, "timeout"),
            Failure::Tls(e) => write!(f, "TLS: {e}"),
            Failure::Io(e) => write!(f, "{e}"),
            Failure::Protocol(e) => write!(f, "bad HTTP answer: {e}"),
            Failure::Status(s) => write!(f, "status {s}"),
        }
    }
}

/// The outcome of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub result: Result<(), Failure>,
    pub latency: Duration,
}

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
}

impl Target {
    /// A target for `addr` under `cfg`; `tls` is the VIP's client config (https only).
    pub fn new(
        addr: SocketAddr,
        cfg: &HealthConfig,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Self {
        let host = cfg
            .server_name
            .clone()
            .unwrap_or_else(|| addr.ip().to_string());
        let server_name = ServerName::try_from(host.clone())
            .unwrap_or_else(|_| ServerName::IpAddress(addr.ip().into()));
        Self {
            addr,
            kind: cfg.kind,
            path: cfg.path.clone(),
            expect_status: cfg.expect_status,
            timeout: cfg.timeout,
            host,
            server_name,
            tls,
        }
    }
}

/// Runs one probe against `t`.
pub async fn probe(t: &Target) -> Outcome {
    let start = Instant::now();
    let result = match tokio::time::timeout(t.timeout, run(t)).await {
        Ok(r) => r,
        Err(_) => Err(Failure::Timeout),
    };
    Outcome {
        result,
        latency: start.elapsed(),
    }
}

async fn run(t: &Target) -> Result<(), Failure> {
    if t.kind == HealthKind::None {
        return Ok(());
    }
    let tcp = TcpStream::connect(t.addr).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::ConnectionRefused {
            Failure::Refused
        } else {
            Failure::Io(format!("connect: {e}"))
        }
    })?;
    let _ = tcp.set_nodelay(true);
    match t.kind {
        HealthKind::Tcp | HealthKind::None => Ok(()),
        HealthKind::Http => http_get(tcp, t).await,
        HealthKind::Https => {
            let cfg = t.tls.clone().expect("https targets carry a TLS config");
            let tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(t.server_name.clone(), tcp)
                .await
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::InvalidData => Failure::Tls(
                        e.get_ref()
                            .map(|i| i.to_string())
                            .unwrap_or_else(|| e.to_string()),
                    ),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof => {
                        Failure::Tls(format!("connection closed during handshake ({e})"))
                    }
                    _ => Failure::Tls(e.to_string()),
                })?;
            http_get(tls, t).await
        }
    }
}

/// Sends the GET and checks the status line; the body is not needed.
async fn http_get<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, t: &Target) -> Result<(), Failure> {
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: lb-agent\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        t.path, t.host
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| Failure::Io(format!("write: {e}")))?;
    let mut buf = [0u8; 256];
    let mut n = 0;
    while !buf[..n].windows(2).any(|w| w == b"\r\n") {
        if n == buf.len() {
            return Err(Failure::Protocol("status line too long".into()));
        }
        let m = s
            .read(&mut buf[n..])
            .await
            .map_err(|e| Failure::Io(format!("read: {e}")))?;
        if m == 0 {
            return Err(Failure::Protocol(
                "connection closed before the status line".into(),
            ));
        }
        n += m;
    }
    let line = String::from_utf8_lossy(&buf[..n]);
    let status = parse_status(&line)
        .ok_or_else(|| Failure::Protocol(line.lines().next().unwrap_or("").to_string()))?;
    // Close politely so the backend does not log a reset for every probe.
    let _ = s.shutdown().await;
    if status == t.expect_status {
        Ok(())
    } else {
        Err(Failure::Status(status))
    }
}

fn parse_status(line: &str) -> Option<u16> {
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

    #[test]
    fn status_line() {
        assert_eq!(parse_status("HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(
            parse_status("HTTP/1.0 503 Service Unavailable\r\n"),
            Some(503)
        );
        assert_eq!(parse_status("SSH-2.0-OpenSSH\r\n"), None);
        assert!(Failure::Status(503).is_not_ready());
        assert!(!Failure::Refused.is_not_ready());
        assert!(!Failure::Timeout.is_not_ready());
    }
}
