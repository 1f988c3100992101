//! Minimal HTTP/1.1 framing shared by lb-stub (server side) and lb-loadgen (client side).
//!
//! Hand-written on purpose: the test tools need exact control over connections (keep-alive,
//! hangs, abrupt closes) and only ever speak to each other or to a real kube-apiserver.

use std::io;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt};

/// Upper bound on a request or response head; larger heads are rejected as garbage.
pub const MAX_HEAD: usize = 64 * 1024;

/// Terminating chunk of a chunked body (no trailers).
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Looks up a header by case-insensitive name.
fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Whether a `Connection` header value contains `token` (comma-separated, case-insensitive).
fn has_token(value: Option<&str>, token: &str) -> bool {
    value.is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// HTTP/1.0 closes by default, HTTP/1.1 keeps alive by default.
fn wants_close(version: &str, headers: &[(String, String)]) -> bool {
    let conn = find_header(headers, "connection");
    if has_token(conn, "close") {
        return true;
    }
    version.eq_ignore_ascii_case("HTTP/1.0") && !has_token(conn, "keep-alive")
}

fn parse_headers<'a>(lines: impl Iterator<Item = &'a str>) -> io::Result<Vec<(String, String)>> {
    lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (k, v) = l
                .split_once(':')
                .ok_or_else(|| invalid(format!("malformed header line {l:?}")))?;
            if k.is_empty() || k.contains(char::is_whitespace) {
                return Err(invalid(format!("malformed header name {k:?}")));
            }
            Ok((k.to_string(), v.trim().to_string()))
        })
        .collect()
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Method, e.g. `GET`.
    pub method: String,
    /// Request target as sent (path plus optional query).
    pub target: String,
    /// Protocol version, e.g. `HTTP/1.1`.
    pub version: String,
    /// Headers in arrival order, values trimmed.
    pub headers: Vec<(String, String)>,
}

impl Request {
    /// Path without the query string.
    pub fn path(&self) -> &str {
        self.target.split_once('?').map_or(&self.target, |(p, _)| p)
    }

    /// Raw query string, if any.
    pub fn query(&self) -> Option<&str> {
        self.target.split_once('?').map(|(_, q)| q)
    }

    /// Value of the first `key=value` query parameter named `key` (no percent-decoding).
    pub fn query_param(&self, key: &str) -> Option<&str> {
        self.query()?
            .split('&')
            .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }

    /// Header value by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// Whether the connection must be closed after answering this request.
    pub fn wants_close(&self) -> bool {
        wants_close(&self.version, &self.headers)
    }

    /// Declared body length (0 when absent).
    pub fn content_length(&self) -> io::Result<u64> {
        self.header("content-length").map_or(Ok(0), |v| {
            v.parse()
                .map_err(|_| invalid(format!("bad Content-Length {v:?}")))
        })
    }

    /// Whether the body uses chunked transfer coding.
    pub fn is_chunked(&self) -> bool {
        has_token(self.header("transfer-encoding"), "chunked")
    }
}

/// Parses a request head (request line plus header lines, without the blank line).
pub fn parse_request_head(head: &str) -> io::Result<Request> {
    let mut lines = head.lines().map(|l| l.trim_end_matches('\r'));
    let request_line = lines.next().ok_or_else(|| invalid("empty request"))?;
    let mut parts = request_line.split(' ').filter(|p| !p.is_empty());
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid(format!("malformed request line {request_line:?}")));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(invalid(format!("unsupported version {version:?}")));
    }
    Ok(Request {
        method: method.to_string(),
        target: target.to_string(),
        version: version.to_string(),
        headers: parse_headers(lines)?,
    })
}

/// Reads one head up to and excluding the blank line; `None` on a clean EOF before any byte.
///
/// Leading empty lines are skipped (RFC 9112 §2.2 robustness).
pub async fn read_head<R: AsyncBufRead + Unpin>(r: &mut R) -> io::Result<Option<String>> {
    read_lines(r, true).await
}

/// Reads lines up to a blank one; only heads may be preceded by stray blank lines, trailers
/// end at the first one.
async fn read_lines<R: AsyncBufRead + Unpin>(
    r: &mut R,
    skip_leading_blank: bool,
) -> io::Result<Option<String>> {
    let mut head = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        let budget = (MAX_HEAD - head.len()) as u64 + 1;
        let n = (&mut *r).take(budget).read_until(b'\n', &mut line).await?;
        if n == 0 {
            return if head.is_empty() {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        if line.last() != Some(&b'\n') {
            return Err(if head.len() + line.len() > MAX_HEAD {
                invalid("head too large")
            } else {
                io::ErrorKind::UnexpectedEof.into()
            });
        }
        if line == b"\r\n" || line == b"\n" {
            if head.is_empty() && skip_leading_blank {
                continue;
            }
            return String::from_utf8(head)
                .map(Some)
                .map_err(|_| invalid("head is not UTF-8"));
        }
        head.extend_from_slice(&line);
    }
}

/// Reads a body framed by `Content-Length` or chunked coding, returning at most `keep` bytes of it.
async fn read_framed_body<R: AsyncBufRead + Unpin>(
    r: &mut R,
    chunked: bool,
    content_length: Option<u64>,
    keep: usize,
) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut line = Vec::new();
            (&mut *r).take(1024).read_until(b'\n', &mut line).await?;
            if line.last() != Some(&b'\n') {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let text = std::str::from_utf8(&line).map_err(|_| invalid("bad chunk size"))?;
            let size = text.split(';').next().unwrap_or("").trim();
            let size = u64::from_str_radix(size, 16)
                .map_err(|_| invalid(format!("bad chunk size {size:?}")))?;
            if size == 0 {
                // Trailers, up to the blank line.
                read_lines(r, false).await?;
                return Ok(body);
            }
            copy_limited(r, size, &mut body, keep).await?;
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf).await?;
            if &crlf != b"\r\n" {
                return Err(invalid("chunk not terminated by CRLF"));
            }
        }
    }
    match content_length {
        Some(n) => copy_limited(r, n, &mut body, keep).await?,
        None => copy_limited(r, u64::MAX, &mut body, keep).await?,
    }
    Ok(body)
}

/// Reads exactly `n` bytes (or to EOF when `n == u64::MAX`), keeping at most `keep` in `out`.
async fn copy_limited<R: AsyncBufRead + Unpin>(
    r: &mut R,
    n: u64,
    out: &mut Vec<u8>,
    keep: usize,
) -> io::Result<()> {
    let mut left = n;
    while left > 0 {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return if n == u64::MAX {
                Ok(())
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        let take = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let room = keep.saturating_sub(out.len()).min(take);
        out.extend_from_slice(&buf[..room]);
        r.consume(take);
        if n != u64::MAX {
            left -= take as u64;
        }
    }
    Ok(())
}

/// Reads the next request and discards its body; `None` when the peer closed between requests.
pub async fn read_request<R: AsyncBufRead + Unpin>(r: &mut R) -> io::Result<Option<Request>> {
    Ok(read_request_keep(r, 0).await?.map(|(req, _)| req))
}

/// Reads the next request and up to `keep` bytes of its body (the rest is read and
/// dropped); `None` when the peer closed between requests.
pub async fn read_request_keep<R: AsyncBufRead + Unpin>(
    r: &mut R,
    keep: usize,
) -> io::Result<Option<(Request, Vec<u8>)>> {
    let Some(head) = read_head(r).await? else {
        return Ok(None);
    };
    let req = parse_request_head(&head)?;
    let body = if req.is_chunked() {
        read_framed_body(r, true, None, keep).await?
    } else {
        match req.content_length()? {
            0 => Vec::new(),
            len => read_framed_body(r, false, Some(len), keep).await?,
        }
    };
    Ok(Some((req, body)))
}

/// FNV-1a, 64 bits: a content check for bulk transfers (lb-stub's /upload reports it).
pub fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `n` bytes of a fixed pseudo-random stream (xorshift64): what lb-stub's /bytes?n=N
/// sends, so a client can check every byte it got. No period lines up with segment sizes.
pub fn pattern(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}

/// A complete response as seen by a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Protocol version of the status line.
    pub version: String,
    /// Headers in arrival order, values trimmed.
    pub headers: Vec<(String, String)>,
    /// Body (possibly truncated to the caller's limit).
    pub body: Vec<u8>,
}

impl Response {
    /// Header value by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// Whether the server will close the connection after this response.
    pub fn wants_close(&self) -> bool {
        wants_close(&self.version, &self.headers)
    }
}

/// Reads one full response; `keep` caps how much of the body is retained (the rest is drained).
pub async fn read_response<R: AsyncBufRead + Unpin>(
    r: &mut R,
    keep: usize,
) -> io::Result<Response> {
    let head = read_head(r)
        .await?
        .ok_or(io::Error::from(io::ErrorKind::UnexpectedEof))?;
    let mut lines = head.lines().map(|l| l.trim_end_matches('\r'));
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|_| version.starts_with("HTTP/1."))
        .ok_or_else(|| invalid(format!("malformed status line {status_line:?}")))?;
    let headers = parse_headers(lines)?;
    let chunked = has_token(find_header(&headers, "transfer-encoding"), "chunked");
    let content_length = match find_header(&headers, "content-length") {
        Some(v) => Some(
            v.parse::<u64>()
                .map_err(|_| invalid(format!("bad Content-Length {v:?}")))?,
        ),
        None => None,
    };
    let body = if status == 204 || status == 304 || (100..200).contains(&status) {
        Vec::new()
    } else {
        read_framed_body(r, chunked, content_length, keep).await?
    };
    Ok(Response {
        status,
        version: version.to_string(),
        headers,
        body,
    })
}

/// Encodes one chunk of a chunked body; empty input yields nothing (an empty chunk would end the body).
pub fn encode_chunk(data: &[u8]) -> Vec<u8> {
    if data.is_empty() {
        return Vec::new();
    }
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

/// Reason phrase for the status codes the tools use.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        410 => "Gone",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Serializes a response head; pass `None` as `content_length` for chunked responses.
pub fn response_head(
    status: u16,
    headers: &[(&str, &str)],
    content_length: Option<usize>,
) -> String {
    let mut out = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    match content_length {
        Some(n) => out.push_str(&format!("Content-Length: {n}\r\n")),
        None => out.push_str("Transfer-Encoding: chunked\r\n"),
    }
    out.push_str("\r\n");
    out
}

/// Serializes a complete response with a `Content-Length` body.
pub fn response(status: u16, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = response_head(status, headers, Some(body.len())).into_bytes();
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::BufReader;

    fn block<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn parses_request_line_headers_and_query() {
        let req = parse_request_head(
            "GET /watch?interval_ms=50&x HTTP/1.1\r\nHost: k\r\nconnection:  Keep-Alive, Close \r\n",
        )
        .unwrap();
        assert_eq!(req.method, "GET");
        assert_eq!(req.path(), "/watch");
        assert_eq!(req.query_param("interval_ms"), Some("50"));
        assert_eq!(req.query_param("x"), Some(""));
        assert_eq!(req.query_param("y"), None);
        assert_eq!(req.header("HOST"), Some("k"));
        assert!(req.wants_close());
    }

    #[test]
    fn keep_alive_defaults_depend_on_version() {
        let r11 = parse_request_head("GET / HTTP/1.1\r\n").unwrap();
        assert!(!r11.wants_close());
        let r10 = parse_request_head("GET / HTTP/1.0\r\n").unwrap();
        assert!(r10.wants_close());
        let r10ka = parse_request_head("GET / HTTP/1.0\r\nConnection: keep-alive\r\n").unwrap();
        assert!(!r10ka.wants_close());
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_request_head("\x16\x03\x01 hello").is_err());
        assert!(parse_request_head("GET / HTTP/2\r\n").is_err());
        assert!(parse_request_head("GET / HTTP/1.1\r\nno colon\r\n").is_err());
        assert!(parse_request_head("GET / HTTP/1.1 extra\r\n").is_err());
    }

    #[test]
    fn reads_pipelined_requests_and_discards_bodies() {
        let wire: &[u8] =
            b"\r\nPOST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\n\
            Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /c HTTP/1.1\r\n\r\n";
        block(async {
            let mut r = BufReader::new(wire);
            let paths: Vec<String> = [
                read_request(&mut r).await.unwrap().unwrap(),
                read_request(&mut r).await.unwrap().unwrap(),
                read_request(&mut r).await.unwrap().unwrap(),
            ]
            .iter()
            .map(|q| q.path().to_string())
            .collect();
            assert_eq!(paths, ["/a", "/b", "/c"]);
            assert!(read_request(&mut r).await.unwrap().is_none());
        });
    }

    #[test]
    fn request_bodies_are_kept_up_to_the_limit() {
        let wire: &[u8] = b"POST /upload HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello\
            POST /upload HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n\
            GET /c HTTP/1.1\r\n\r\n";
        block(async {
            let mut r = BufReader::new(wire);
            let (a, body) = read_request_keep(&mut r, 4).await.unwrap().unwrap();
            assert_eq!((a.path(), body.as_slice()), ("/upload", &b"hell"[..]));
            let (_, body) = read_request_keep(&mut r, 100).await.unwrap().unwrap();
            assert_eq!(body, b"abcde");
            let (c, body) = read_request_keep(&mut r, 100).await.unwrap().unwrap();
            assert_eq!((c.path(), body.len()), ("/c", 0));
        });
    }

    #[test]
    fn pattern_and_hash_are_fixed() {
        let p = pattern(1 << 20);
        assert_eq!(p.len(), 1 << 20);
        assert_eq!(&pattern(13)[..], &p[..13], "a prefix of the same stream");
        // Not constant, not short-periodic.
        assert_ne!(p[..1460], p[1460..2920]);
        assert!(p.iter().filter(|&&b| b == 0).count() < 8192);
        // FNV-1a test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn truncated_request_is_an_error_not_eof() {
        block(async {
            let mut r = BufReader::new(&b"GET / HTTP/1.1\r\nHost: x"[..]);
            assert!(read_request(&mut r).await.is_err());
            let mut r = BufReader::new(&b"POST / HTTP/1.1\r\nContent-Length: 9\r\n\r\nabc"[..]);
            assert!(read_request(&mut r).await.is_err());
        });
    }

    #[test]
    fn oversized_head_is_rejected() {
        let mut wire = b"GET / HTTP/1.1\r\nX: ".to_vec();
        wire.resize(MAX_HEAD + 100, b'a');
        wire.extend_from_slice(b"\r\n\r\n");
        block(async {
            let mut r = BufReader::new(&wire[..]);
            let err = read_request(&mut r).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        });
    }

    #[test]
    fn chunk_encoding_round_trips() {
        assert_eq!(encode_chunk(b"hello"), b"5\r\nhello\r\n");
        assert!(encode_chunk(b"").is_empty());
        let big = vec![b'x'; 300];
        assert!(encode_chunk(&big).starts_with(b"12c\r\n"));

        let mut wire = response_head(200, &[("X-Backend", "m1")], None).into_bytes();
        wire.extend(encode_chunk(b"{\"seq\":1}\n"));
        wire.extend(encode_chunk(&big));
        wire.extend_from_slice(LAST_CHUNK);
        block(async {
            let mut r = BufReader::new(&wire[..]);
            let resp = read_response(&mut r, usize::MAX).await.unwrap();
            assert_eq!(resp.status, 200);
            assert_eq!(resp.header("x-backend"), Some("m1"));
            assert_eq!(resp.body.len(), 10 + 300);
            assert!(resp.body.starts_with(b"{\"seq\":1}\n"));
        });
    }

    #[test]
    fn response_framing() {
        let mut wire = response(503, &[("Connection", "close")], b"nope");
        wire.extend(response(200, &[], b"ok"));
        block(async {
            let mut r = BufReader::new(&wire[..]);
            let a = read_response(&mut r, 2).await.unwrap();
            assert_eq!((a.status, a.body.as_slice()), (503, &b"no"[..]));
            assert!(a.wants_close());
            let b = read_response(&mut r, 100).await.unwrap();
            assert_eq!((b.status, b.body.as_slice()), (200, &b"ok"[..]));
            assert!(!b.wants_close());
            // Short body: the response must not count as complete.
            let mut r = BufReader::new(&b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok"[..]);
            assert!(read_response(&mut r, 100).await.is_err());
            // No framing: body runs to EOF.
            let mut r = BufReader::new(&b"HTTP/1.0 200 OK\r\n\r\nall of it"[..]);
            assert_eq!(read_response(&mut r, 100).await.unwrap().body, b"all of it");
        });
    }
}
