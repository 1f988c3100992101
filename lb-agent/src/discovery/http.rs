//! A small HTTP/1.1 client over TLS for the agent's few API requests: one GET per connection
//! (`Connection: close`), the status line and the headers that frame the body
//! (`Content-Length`, chunked transfer coding, or until the close), and the body whole (a
//! list) or line by line (a watch, one JSON event per line). Hand-written: the agent needs
//! nothing more of HTTP, and no HTTP stack is in its dependencies.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use rustls::{pki_types::ServerName, ClientConfig};
use tokio::{
    io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};
use tokio_rustls::client::TlsStream;

use crate::health::probe::{self, connect_failure, handshake_failure, io_failure};

/// Longest line of a response head, and most lines.
const MAX_HEAD_LINE: usize = 8 * 1024;
const MAX_HEAD_LINES: usize = 100;
/// Largest chunk accepted in a chunked body.
const MAX_CHUNK: usize = 4 << 20;

/// An apiserver to ask, and how.
pub struct Server {
    pub addr: SocketAddr,
    /// Host header.
    pub host: String,
    pub server_name: ServerName<'static>,
    pub tls: Arc<ClientConfig>,
    /// Sent as `Authorization: Bearer`.
    pub token: Option<String>,
}

/// A response: its status, and its body to read.
pub struct Response<R> {
    pub status: u16,
    pub body: Body<R>,
}

/// The connection a response comes on.
pub type Conn = BufReader<TlsStream<TcpStream>>;

/// Connects to `s` (within `connect_timeout`, TCP and TLS), sends `GET target` and reads the
/// response's head. The error is one line saying what failed.
pub async fn get(
    s: &Server,
    target: &str,
    connect_timeout: Duration,
) -> Result<Response<Conn>, String> {
    let tls = tokio::time::timeout(connect_timeout, async {
        let tcp = TcpStream::connect(s.addr)
            .await
            .map_err(|e| connect_failure(&e).to_string())?;
        let _ = tcp.set_nodelay(true);
        tokio_rustls::TlsConnector::from(s.tls.clone())
            .connect(s.server_name.clone(), tcp)
            .await
            .map_err(|e| handshake_failure(&e).to_string())
    })
    .await
    .map_err(|_| format!("no connection within {}s", connect_timeout.as_secs_f32()))??;
    let auth = s.token.as_ref().map(|t| format!("Bearer {t}"));
    let extra: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    let req = probe::get_request(target, &s.host, "application/json", &extra);
    let mut conn = BufReader::new(tls);
    conn.get_mut()
        .write_all(req.as_bytes())
        .await
        .map_err(|e| io_failure("write", &e).to_string())?;
    let (status, framing) = read_head(&mut conn)
        .await
        .map_err(|e| io_failure("read", &e).to_string())?;
    Ok(Response {
        status,
        body: Body::new(conn, framing),
    })
}

/// How a body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// After this many bytes.
    Length(u64),
    /// At the last chunk.
    Chunked,
    /// When the server closes.
    Close,
}

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// One line, at most `max` bytes, without its line end; an error at the end of the stream.
async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R, max: usize) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let n = (&mut *r)
        .take(max as u64)
        .read_until(b'\n', &mut line)
        .await?;
    if n == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    if line.last() != Some(&b'\n') {
        return Err(invalid(if n >= max {
            "a line too long"
        } else {
            "the connection closed mid-line"
        }));
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(line)
}

/// Reads the status line and headers: the status, and how the body is framed.
pub async fn read_head<R: AsyncBufRead + Unpin>(r: &mut R) -> io::Result<(u16, Framing)> {
    let line = read_line(r, MAX_HEAD_LINE).await?;
    let line = String::from_utf8_lossy(&line).into_owned();
    let status =
        probe::parse_status(&line).ok_or_else(|| invalid(format!("not HTTP: {line:?}")))?;
    let mut framing = Framing::Close;
    for _ in 0..MAX_HEAD_LINES {
        let h = read_line(r, MAX_HEAD_LINE).await?;
        if h.is_empty() {
            return Ok((status, framing));
        }
        let h = String::from_utf8_lossy(&h);
        let Some((name, value)) = h.split_once(':') else {
            return Err(invalid(format!("a header without a colon: {h:?}")));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            if value.to_ascii_lowercase().ends_with("chunked") {
                framing = Framing::Chunked;
            }
        } else if name.eq_ignore_ascii_case("content-length") && framing != Framing::Chunked {
            framing = Framing::Length(
                value
                    .parse()
                    .map_err(|_| invalid(format!("Content-Length {value:?}")))?,
            );
        }
    }
    Err(invalid("a response head of too many lines"))
}

/// A response body being read.
pub struct Body<R> {
    r: R,
    framing: Framing,
    done: bool,
    /// Read but not yet returned (`next_line`).
    pending: Vec<u8>,
}

impl<R: AsyncBufRead + Unpin> Body<R> {
    pub fn new(r: R, framing: Framing) -> Self {
        Self {
            r,
            framing,
            done: false,
            pending: Vec::new(),
        }
    }

    /// The next bytes of the body; None at its end.
    async fn piece(&mut self) -> io::Result<Option<Vec<u8>>> {
        if self.done {
            return Ok(None);
        }
        match self.framing {
            Framing::Chunked => {
                let line = read_line(&mut self.r, 1024).await?;
                let line = String::from_utf8_lossy(&line);
                // Chunk extensions (";name=value") are allowed and ignored.
                let size = line.split(';').next().unwrap_or("").trim();
                let size = usize::from_str_radix(size, 16)
                    .map_err(|_| invalid(format!("a chunk size {size:?}")))?;
                if size == 0 {
                    // Trailers, up to the empty line.
                    while !read_line(&mut self.r, MAX_HEAD_LINE).await?.is_empty() {}
                    self.done = true;
                    return Ok(None);
                }
                if size > MAX_CHUNK {
                    return Err(invalid(format!("a chunk of {size} bytes")));
                }
                let mut data = vec![0; size];
                self.r.read_exact(&mut data).await?;
                if !read_line(&mut self.r, 2).await?.is_empty() {
                    return Err(invalid("a chunk longer than its size"));
                }
                Ok(Some(data))
            }
            Framing::Length(left) => {
                if left == 0 {
                    self.done = true;
                    return Ok(None);
                }
                let buf = self.r.fill_buf().await?;
                if buf.is_empty() {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                let data = buf[..n].to_vec();
                self.r.consume(n);
                self.framing = Framing::Length(left - n as u64);
                Ok(Some(data))
            }
            Framing::Close => {
                let buf = self.r.fill_buf().await?;
                if buf.is_empty() {
                    self.done = true;
                    return Ok(None);
                }
                let data = buf.to_vec();
                self.r.consume(data.len());
                Ok(Some(data))
            }
        }
    }

    /// The whole body, refused beyond `limit` bytes.
    pub async fn read_all(&mut self, limit: usize) -> io::Result<Vec<u8>> {
        let mut all = std::mem::take(&mut self.pending);
        while let Some(p) = self.piece().await? {
            all.extend_from_slice(&p);
            if all.len() > limit {
                return Err(invalid(format!("a body over {limit} bytes")));
            }
        }
        Ok(all)
    }

    /// The body's next non-empty line (without its line end), refused beyond `limit`
    /// bytes; None at the end of the body.
    pub async fn next_line(&mut self, limit: usize) -> io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(i) = self.pending.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.pending.drain(..=i).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                if line.is_empty() {
                    continue;
                }
                return Ok(Some(line));
            }
            if self.pending.len() > limit {
                return Err(invalid(format!("a line over {limit} bytes")));
            }
            match self.piece().await? {
                Some(p) => self.pending.extend_from_slice(&p),
                None if self.pending.is_empty() => return Ok(None),
                None => return Ok(Some(std::mem::take(&mut self.pending))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn response(bytes: &[u8]) -> io::Result<(u16, Body<&[u8]>)> {
        let mut r = bytes;
        let (status, framing) = read_head(&mut r).await?;
        Ok((status, Body::new(r, framing)))
    }

    #[tokio::test]
    async fn a_watch_stream_in_chunks_comes_out_line_by_line() {
        // The first event spans two chunks; the second chunk holds the rest of it and a
        // whole second one; an extension and a trailer for good measure.
        let wire = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
            Transfer-Encoding: chunked\r\n\r\n\
            6\r\n{\"a\":1\r\n\
            b;ext=1\r\n}\n{\"b\":2}\n\n\r\n\
            0\r\nX-Trailer: y\r\n\r\n";
        let (status, mut body) = response(wire).await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(body.next_line(1024).await.unwrap().unwrap(), b"{\"a\":1}");
        assert_eq!(body.next_line(1024).await.unwrap().unwrap(), b"{\"b\":2}");
        assert_eq!(body.next_line(1024).await.unwrap(), None);
        assert_eq!(body.next_line(1024).await.unwrap(), None);
    }

    #[tokio::test]
    async fn bodies_by_length_by_close_and_limits() {
        let (status, mut body) =
            response(b"HTTP/1.1 410 Gone\r\ncontent-length: 5\r\n\r\nhello, and more")
                .await
                .unwrap();
        assert_eq!(status, 410);
        assert_eq!(body.read_all(100).await.unwrap(), b"hello");
        let (_, mut body) = response(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")
            .await
            .unwrap();
        assert_eq!(body.read_all(100).await.unwrap(), b"until the end");
        let (_, mut body) = response(b"HTTP/1.1 200 OK\r\n\r\n0123456789")
            .await
            .unwrap();
        assert!(body.read_all(5).await.is_err());
        let (_, mut body) = response(b"HTTP/1.1 200 OK\r\n\r\n0123456789")
            .await
            .unwrap();
        assert!(body.next_line(5).await.is_err());
        // Cut short.
        let (_, mut body) = response(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nshort")
            .await
            .unwrap();
        assert!(body.read_all(100).await.is_err());
        let (_, mut body) =
            response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nshort")
                .await
                .unwrap();
        assert!(body.read_all(100).await.is_err());
        let (_, mut body) =
            response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
                .await
                .unwrap();
        assert!(body.read_all(100).await.is_err());
    }

    #[tokio::test]
    async fn heads_that_are_not_http() {
        assert!(response(b"SSH-2.0-OpenSSH_9.2\r\n").await.is_err());
        assert!(response(b"HTTP/1.1 200 OK\r\nbroken header\r\n\r\n")
            .await
            .is_err());
        assert!(response(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n")
            .await
            .is_err());
        assert!(
            response(b"HTTP/1.1 200 OK\r\n").await.is_err(),
            "closed in the head"
        );
        let long = format!(
            "HTTP/1.1 200 OK\r\nX: {}\r\n\r\n",
            "a".repeat(MAX_HEAD_LINE)
        );
        assert!(response(long.as_bytes()).await.is_err());
    }
}
