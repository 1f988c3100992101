//! haproxy.cfg: sections and lines (quotes, backslashes, `#` comments), then what the HA
//! guides write in them: `frontend` + `backend` pairs and `listen` blocks in `mode tcp`,
//! their servers, and the health check the backend's options add up to.

use std::net::Ipv4Addr;

use super::render::{dur, int, s as tstr, Field};
use super::{At, ImportError, Notes, Source};

/// One tokenized line.
#[derive(Debug, Clone)]
struct Line {
    no: usize,
    words: Vec<String>,
}

impl Line {
    fn written(&self) -> String {
        self.words.join(" ")
    }
}

fn split_words(src: &Source, no: usize, raw: &str) -> Result<Vec<String>, ImportError> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        match quote {
            Some(q) if c == q => quote = None,
            Some('"') if c == '\\' => cur.extend(chars.next()),
            Some(_) => cur.push(c),
            None if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            None if c == '#' => break,
            None if c == '"' || c == '\'' => {
                quote = Some(c);
                in_word = true;
            }
            None if c == '\\' => {
                cur.extend(chars.next());
                in_word = true;
            }
            None => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if quote.is_some() {
        return Err(src.at(no, "a quoted string is not closed"));
    }
    if in_word {
        out.push(cur);
    }
    if let Some(w) = out.iter().find(|w| w.contains("${")) {
        return Err(src.at(
            no,
            format!(
                "{w}: a placeholder that was never filled in (the guide's ${{...}} variables are \
                 to be replaced by your values; import does not read the environment)"
            ),
        ));
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Global,
    Defaults,
    Frontend,
    Backend,
    Listen,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Global => "global",
            Kind::Defaults => "defaults",
            Kind::Frontend => "frontend",
            Kind::Backend => "backend",
            Kind::Listen => "listen",
        }
    }
}

/// Server options; `None` = not said here (a default-server line or HAProxy's default).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Params {
    check: Option<bool>,
    check_ssl: Option<bool>,
    verify: Option<String>,
    ca_file: Option<String>,
    sni: Option<String>,
    inter_ms: Option<u64>,
    rise: Option<u32>,
    fall: Option<u32>,
    weight: Option<u32>,
    backup: Option<bool>,
    disabled: Option<bool>,
}

impl Params {
    /// `over`'s settings where it has them, ours otherwise.
    fn overlay(&self, over: &Params) -> Params {
        Params {
            check: over.check.or(self.check),
            check_ssl: over.check_ssl.or(self.check_ssl),
            verify: over.verify.clone().or_else(|| self.verify.clone()),
            ca_file: over.ca_file.clone().or_else(|| self.ca_file.clone()),
            sni: over.sni.clone().or_else(|| self.sni.clone()),
            inter_ms: over.inter_ms.or(self.inter_ms),
            rise: over.rise.or(self.rise),
            fall: over.fall.or(self.fall),
            weight: over.weight.or(self.weight),
            backup: over.backup.or(self.backup),
            disabled: over.disabled.or(self.disabled),
        }
    }
}

#[derive(Debug, Clone)]
enum CheckOpt {
    HttpChk {
        method: String,
        uri: String,
        line: usize,
        written: String,
    },
    SslHello(usize),
    TcpCheck(usize),
}

/// What a section says, after the defaults section before it.
#[derive(Debug, Clone, Default)]
struct Settings {
    mode: Option<At<String>>,
    default_server: Params,
    check: Option<CheckOpt>,
    /// Check options an later one replaced (HAProxy keeps the last).
    overridden: Vec<CheckOpt>,
    connect_ssl: Option<usize>,
    connect_sni: Option<String>,
    send: Option<(Option<String>, Option<String>, usize)>,
    expect: Option<At<u16>>,
    timeout_check: Option<At<u64>>,
    timeout_connect: Option<At<u64>>,
    default_backend: Option<At<String>>,
}

#[derive(Debug, Clone)]
struct RawServer {
    name: String,
    address: Ipv4Addr,
    port: Option<u16>,
    params: Params,
    line: usize,
}

#[derive(Debug, Clone)]
struct Proxy {
    kind: Kind,
    name: String,
    line: usize,
    s: Settings,
    binds: Vec<Bind>,
    servers: Vec<RawServer>,
    stats: Option<usize>,
    disabled: Option<usize>,
}

/// One address:port a frontend listens on; None = every address (`*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Bind {
    pub address: Option<Ipv4Addr>,
    pub port: u16,
    pub line: usize,
}

/// A server, as lb's backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Server {
    pub name: String,
    pub address: Ipv4Addr,
    /// None: HAProxy used the client's destination port, lb the VIP's.
    pub port: Option<u16>,
    /// Written only when the servers' weights differ (HAProxy's, as they are relative).
    pub weight: Option<u32>,
    pub backup: bool,
    pub disabled: bool,
    pub line: usize,
}

/// A frontend with its backend, or a listen block: what becomes one or more lb VIPs.
#[derive(Debug, Clone)]
pub(crate) struct Service {
    /// The frontend's (or listen block's) name: the VIP's.
    pub name: String,
    /// "frontend apiserver" or "listen kubernetes-apiserver-https", with its line.
    pub origin: At<String>,
    /// "backend apiserverbackend" with its line, for a frontend.
    pub backend: Option<At<String>>,
    pub binds: Vec<Bind>,
    pub servers: Vec<Server>,
    /// The `[vip.health]` fields, with comments, and comment lines before them.
    pub health: Vec<Field>,
    pub health_before: Vec<String>,
}

const LOGGING: &str = "lb logs no connections; `lb-agent status` counts packets, bytes and \
    new connections per VIP and per backend";
const HTTP: &str =
    "HTTP-mode settings: no meaning for a TCP VIP (HAProxy ignored them in mode tcp too)";
const RETRIES: &str = "lb does not retry a failed connect on another server: the client's \
    next SYN picks a backend afresh, and a backend that fails its probes gets no new connections";
const TIMEOUTS: &str = "lb ends no connection on a timer: it forwards packets, and a \
    connection lasts until the client or the apiserver ends it";
const LIMITS: &str = "lb sets no connection limits (agent.max_flows sizes its flow table)";
const INTERNALS: &str = "HAProxy's own process and proxy settings: nothing to translate";
const BALANCE: &str = "lb picks a backend by Maglev consistent hashing of the connection: \
    every LB host makes the same pick, and connections spread evenly by weight";
const STATS: &str = "HAProxy's statistics page: `lb-agent status` (and --json) shows lb's";
const TLS: &str = "lb's probes use TLS 1.2 or 1.3 with rustls' defaults";
const REACTIONS: &str = "lb's own: connections of a backend its probes find unreachable are \
    moved, those of one that is only not ready are kept";
const KEEPALIVE: &str = "lb forwards packets: TCP keepalives go end to end, as the client and \
    the apiserver set them";
const FASTINTER: &str = "lb probes at one interval, up or down";
const GLOBAL: &str = "HAProxy's process settings (global): nothing to translate";

/// Reads haproxy.cfg into the services it load-balances.
pub(crate) fn read(src: &Source, notes: &mut Notes) -> Result<Vec<Service>, ImportError> {
    let mut proxies: Vec<Proxy> = Vec::new();
    let mut defaults = Proxy {
        kind: Kind::Defaults,
        name: String::new(),
        line: 0,
        s: Settings::default(),
        binds: Vec::new(),
        servers: Vec::new(),
        stats: None,
        disabled: None,
    };
    // The section being read: None before the first, Some(Global) ignores its lines.
    let mut current: Option<Proxy> = None;
    let finish = |p: Option<Proxy>, proxies: &mut Vec<Proxy>, defaults: &mut Proxy| match p {
        Some(p) if p.kind == Kind::Defaults => *defaults = p,
        Some(p) if p.kind == Kind::Global => {}
        Some(p) => proxies.push(p),
        None => {}
    };
    for (i, raw) in src.text.lines().enumerate() {
        let no = i + 1;
        let words = split_words(src, no, raw)?;
        if words.is_empty() {
            continue;
        }
        let line = Line { no, words };
        let key = line.words[0].as_str();
        let kind = match key {
            "global" => Some(Kind::Global),
            "defaults" => Some(Kind::Defaults),
            "frontend" => Some(Kind::Frontend),
            "backend" => Some(Kind::Backend),
            "listen" => Some(Kind::Listen),
            "resolvers" | "peers" | "userlist" | "mailers" | "program" | "cache"
            | "http-errors" | "ring" | "log-forward" | "crt-store" | "fcgi-app" | "traces"
            | "acme" => {
                return Err(src.at(
                    no,
                    format!("{key} section: not translated (lb has no equivalent)"),
                ))
            }
            _ => None,
        };
        if let Some(kind) = kind {
            finish(current.take(), &mut proxies, &mut defaults);
            let name = line.words.get(1).cloned().unwrap_or_default();
            if line.words.len() > 2 {
                return Err(src.at(
                    no,
                    format!(
                        "{}: only a name may follow the section keyword (`from`, addresses on \
                         the section line: write them as directives)",
                        line.written()
                    ),
                ));
            }
            if name.is_empty() && matches!(kind, Kind::Frontend | Kind::Backend | Kind::Listen) {
                return Err(src.at(no, format!("{key}: needs a name")));
            }
            if let Some(p) = proxies.iter().find(|p| p.name == name && !name.is_empty()) {
                return Err(src.at(
                    no,
                    format!(
                        "{key} {name}: the name is taken by {} {name} (line {})",
                        p.kind.as_str(),
                        p.line
                    ),
                ));
            }
            let s = match kind {
                // A defaults section starts from nothing, as HAProxy's do.
                Kind::Global | Kind::Defaults => Settings::default(),
                _ => defaults.s.clone(),
            };
            current = Some(Proxy {
                kind,
                name,
                line: no,
                s,
                binds: Vec::new(),
                servers: Vec::new(),
                stats: None,
                disabled: None,
            });
            continue;
        }
        let Some(p) = current.as_mut() else {
            return Err(src.at(no, format!("{key}: outside any section")));
        };
        if p.kind == Kind::Global {
            if key == "ssl-server-verify" && line.words.get(1).map(String::as_str) == Some("none") {
                // Servers' certificates are then not verified unless a server says so.
                defaults
                    .s
                    .default_server
                    .verify
                    .get_or_insert_with(|| "none".into());
            }
            notes.group("global", src, no, key, GLOBAL);
            continue;
        }
        directive(src, p, &line, notes)?;
    }
    finish(current.take(), &mut proxies, &mut defaults);
    services(src, &proxies, notes)
}

fn value<'a>(src: &Source, line: &'a Line, i: usize) -> Result<&'a str, ImportError> {
    line.words.get(i).map(String::as_str).ok_or_else(|| {
        src.at(
            line.no,
            format!("{}: {} needs a value", line.written(), line.words[i - 1]),
        )
    })
}

/// HAProxy's time format: a number and a unit (us, ms, s, m, h, d); no unit = milliseconds.
fn time_ms(s: &str) -> Option<u64> {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return None;
    }
    let n: u64 = s[..digits].parse().ok()?;
    let per = match &s[digits..] {
        "" | "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "us" if n.is_multiple_of(1000) => return Some(n / 1000),
        _ => return None,
    };
    n.checked_mul(per)
}

fn time(src: &Source, line: &Line, i: usize) -> Result<u64, ImportError> {
    let v = value(src, line, i)?;
    time_ms(v).ok_or_else(|| {
        src.at(
            line.no,
            format!(
                "{}: {v:?} is not a time such as 2s or 500ms",
                line.words[i - 1]
            ),
        )
    })
}

fn number(
    src: &Source,
    line: &Line,
    i: usize,
    range: std::ops::RangeInclusive<u32>,
) -> Result<u32, ImportError> {
    let v = value(src, line, i)?;
    v.parse::<u32>()
        .ok()
        .filter(|n| range.contains(n))
        .ok_or_else(|| {
            src.at(
                line.no,
                format!(
                    "{} {v}: lb takes {} to {}",
                    line.words[i - 1],
                    range.start(),
                    range.end()
                ),
            )
        })
}

fn refuse(src: &Source, line: &Line, why: &str) -> ImportError {
    src.at(line.no, format!("{}: {why}", line.written()))
}

fn directive(
    src: &Source,
    p: &mut Proxy,
    line: &Line,
    notes: &mut Notes,
) -> Result<(), ImportError> {
    let w = &line.words;
    let key = w[0].as_str();
    let kind = p.kind;
    let in_backend = matches!(kind, Kind::Defaults | Kind::Backend | Kind::Listen);
    let not_here = || {
        src.at(
            line.no,
            format!(
                "{key} in a {} section: HAProxy would refuse it too",
                kind.as_str()
            ),
        )
    };
    match key {
        "mode" => {
            let m = value(src, line, 1)?;
            if m != "tcp" && m != "http" {
                return Err(refuse(src, line, "lb translates mode tcp only"));
            }
            p.s.mode = Some((m.to_string(), line.no));
        }
        "bind" => {
            if !matches!(kind, Kind::Frontend | Kind::Listen) {
                return Err(not_here());
            }
            bind(src, p, line)?;
        }
        "default_backend" => {
            if !matches!(kind, Kind::Frontend | Kind::Defaults) {
                return Err(not_here());
            }
            p.s.default_backend = Some((value(src, line, 1)?.to_string(), line.no));
        }
        "use_backend" => {
            return Err(refuse(
                src,
                line,
                "lb sends a VIP's connections to one list of backends; rules that choose between \
                 backends are not translated",
            ))
        }
        "acl" | "tcp-request" | "tcp-response" => {
            return Err(refuse(
                src,
                line,
                "lb neither filters nor routes connections by rules; not translated",
            ))
        }
        "server" => {
            if !matches!(kind, Kind::Backend | Kind::Listen) {
                return Err(not_here());
            }
            server(src, p, line, notes)?;
        }
        "default-server" => {
            if !in_backend {
                return Err(not_here());
            }
            let params = params(src, line, 1, notes)?;
            p.s.default_server = p.s.default_server.overlay(&params);
        }
        "balance" | "hash-type" => {
            if !in_backend {
                return Err(not_here());
            }
            notes.group("balance", src, line.no, &line.written(), BALANCE);
        }
        "option" | "no" => option(src, p, line, notes)?,
        "http-check" => {
            if !in_backend {
                return Err(not_here());
            }
            http_check(src, p, line, notes)?;
        }
        "tcp-check" => {
            if w.len() == 2 && w[1] == "connect" {
                return Ok(());
            }
            return Err(refuse(
                src,
                line,
                "lb's tcp probe only connects; send/expect rules are not translated",
            ));
        }
        "timeout" => {
            let what = value(src, line, 1)?;
            let ms = time(src, line, 2)?;
            match what {
                "check" => p.s.timeout_check = Some((ms, line.no)),
                "connect" => {
                    p.s.timeout_connect = Some((ms, line.no));
                    notes.group("timeouts", src, line.no, &line.written(), TIMEOUTS);
                }
                "client" | "server" | "queue" | "tunnel" | "client-fin" | "server-fin"
                | "tarpit" => notes.group("timeouts", src, line.no, &line.written(), TIMEOUTS),
                "http-request" | "http-keep-alive" => {
                    notes.group("http", src, line.no, &line.written(), HTTP)
                }
                _ => return Err(refuse(src, line, "not translated")),
            }
        }
        "log" | "log-format" | "log-tag" | "capture" | "unique-id-format" | "unique-id-header"
        | "log-format-sd" | "error-log-format" => {
            notes.group("logging", src, line.no, key, LOGGING)
        }
        "retries" => notes.group("retries", src, line.no, &line.written(), RETRIES),
        "maxconn" | "fullconn" | "rate-limit" | "backlog" => {
            notes.group("limits", src, line.no, &line.written(), LIMITS)
        }
        "http-request"
        | "http-response"
        | "http-after-response"
        | "errorfile"
        | "errorloc"
        | "errorloc302"
        | "errorloc303"
        | "errorfiles"
        | "compression"
        | "cookie"
        | "http-reuse"
        | "redirect"
        | "monitor-uri"
        | "monitor"
        | "http-error"
        | "http-send-name-header" => notes.group("http", src, line.no, key, HTTP),
        "stats" => p.stats = Some(p.stats.unwrap_or(line.no)),
        "description" | "id" | "enabled" => notes.group("internals", src, line.no, key, INTERNALS),
        "disabled" => p.disabled = Some(line.no),
        _ => {
            return Err(refuse(
                src,
                line,
                "import does not translate this directive (docs/migration.md says what it does)",
            ))
        }
    }
    Ok(())
}

/// `ADDRESS:PORT` with the address optional (`*`, empty or 0.0.0.0: any).
fn address_port(text: &str) -> Result<(Option<Ipv4Addr>, Option<u16>), String> {
    let text = text.strip_prefix("ipv4@").unwrap_or(text);
    if let Some((kind, _)) = text.split_once('@') {
        return Err(format!("{kind}@ addresses are not translated (IPv4 only)"));
    }
    let (host, port) = match text.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (text, None),
    };
    if host.contains(':') || host.starts_with('[') {
        return Err(format!(
            "{text}: an IPv6 address; lb's VIPs and backends are IPv4 only"
        ));
    }
    let address = match host {
        "" | "*" | "0.0.0.0" => None,
        h => Some(h.parse::<Ipv4Addr>().map_err(|_| {
            format!("{h:?} is not an IPv4 address (lb takes addresses, not host names: resolve it)")
        })?),
    };
    let port = match port {
        None => None,
        Some(p) if !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit()) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|&n| n != 0)
                .ok_or_else(|| format!("port {p} is out of range (1-65535)"))?,
        ),
        Some(p) => {
            return Err(format!(
                "port {p:?}: a port number (ranges and offsets are not translated)"
            ))
        }
    };
    Ok((address, port))
}

fn bind(src: &Source, p: &mut Proxy, line: &Line) -> Result<(), ImportError> {
    let addrs = value(src, line, 1)?;
    if line.words.len() > 2 {
        return Err(refuse(
            src,
            line,
            &format!(
                "bind options ({}) are not translated: lb forwards TCP as it comes, it terminates no TLS",
                line.words[2..].join(" ")
            ),
        ));
    }
    for a in addrs.split(',') {
        let (address, port) = address_port(a).map_err(|m| src.at(line.no, format!("bind {m}")))?;
        let Some(port) = port else {
            return Err(src.at(line.no, format!("bind {a}: needs a port")));
        };
        p.binds.push(Bind {
            address,
            port,
            line: line.no,
        });
    }
    Ok(())
}

fn server(src: &Source, p: &mut Proxy, line: &Line, notes: &mut Notes) -> Result<(), ImportError> {
    let name = value(src, line, 1)?.to_string();
    let addr = value(src, line, 2)?;
    if name.len() > lb_common::NAME_LEN - 1 {
        return Err(src.at(
            line.no,
            format!(
                "server {name}: lb's names are at most {} bytes",
                lb_common::NAME_LEN - 1
            ),
        ));
    }
    if let Some(o) = p.servers.iter().find(|s| s.name == name) {
        return Err(src.at(line.no, format!("server {name}: also at line {}", o.line)));
    }
    let (address, port) =
        address_port(addr).map_err(|m| src.at(line.no, format!("server {name}: {m}")))?;
    let Some(address) = address else {
        return Err(src.at(line.no, format!("server {name}: {addr} names no address")));
    };
    let params = params(src, line, 3, notes)?;
    p.servers.push(RawServer {
        name,
        address,
        port,
        params,
        line: line.no,
    });
    Ok(())
}

/// The options of a server or default-server line, from word `from` on.
fn params(
    src: &Source,
    line: &Line,
    from: usize,
    notes: &mut Notes,
) -> Result<Params, ImportError> {
    let mut p = Params::default();
    let mut i = from;
    while i < line.words.len() {
        let k = line.words[i].as_str();
        let mut takes_value = false;
        match k {
            "check" => p.check = Some(true),
            "no-check" => p.check = Some(false),
            "check-ssl" => p.check_ssl = Some(true),
            "no-check-ssl" => p.check_ssl = Some(false),
            "verify" => {
                let v = value(src, line, i + 1)?;
                if v != "none" && v != "required" {
                    return Err(src.at(line.no, format!("verify {v}: none or required")));
                }
                p.verify = Some(v.to_string());
                takes_value = true;
            }
            "ca-file" => {
                p.ca_file = Some(value(src, line, i + 1)?.to_string());
                takes_value = true;
            }
            "check-sni" => {
                p.sni = Some(value(src, line, i + 1)?.to_string());
                takes_value = true;
            }
            "inter" => {
                p.inter_ms = Some(time(src, line, i + 1)?);
                takes_value = true;
            }
            "fastinter" | "downinter" => {
                time(src, line, i + 1)?;
                notes.group("fastinter", src, line.no, k, FASTINTER);
                takes_value = true;
            }
            "rise" => {
                p.rise = Some(number(src, line, i + 1, 1..=100)?);
                takes_value = true;
            }
            "fall" => {
                p.fall = Some(number(src, line, i + 1, 1..=100)?);
                takes_value = true;
            }
            "weight" => {
                p.weight = Some(number(src, line, i + 1, 0..=256)?);
                takes_value = true;
            }
            "backup" => p.backup = Some(true),
            "no-backup" => p.backup = Some(false),
            "disabled" => p.disabled = Some(true),
            "enabled" => p.disabled = Some(false),
            "maxconn" | "maxqueue" | "minconn" => {
                value(src, line, i + 1)?;
                notes.group("limits", src, line.no, k, LIMITS);
                takes_value = true;
            }
            "slowstart" => {
                value(src, line, i + 1)?;
                notes.add(
                    src,
                    line.no,
                    "slowstart: lb has no slow start; a backend that comes up gets its full share of new connections at once",
                );
                takes_value = true;
            }
            "on-marked-down" | "on-marked-up" | "on-error" | "error-limit" | "observe" => {
                value(src, line, i + 1)?;
                notes.group("reactions", src, line.no, k, REACTIONS);
                takes_value = true;
            }
            "id" | "cookie" | "pool-max-conn" | "pool-purge-delay" | "pool-low-conn"
            | "max-reuse" => {
                value(src, line, i + 1)?;
                notes.group("internals", src, line.no, k, INTERNALS);
                takes_value = true;
            }
            "ssl-min-ver" | "ssl-max-ver" | "ciphers" | "ciphersuites" | "curves" | "sigalgs" => {
                value(src, line, i + 1)?;
                notes.group("tls", src, line.no, k, TLS);
                takes_value = true;
            }
            "no-sslv3" | "no-tlsv10" | "no-tlsv11" | "no-tlsv12" | "no-tlsv13" | "force-sslv3"
            | "force-tlsv10" | "force-tlsv11" | "force-tlsv12" | "force-tlsv13" | "no-ssl-reuse" => {
                notes.group("tls", src, line.no, k, TLS)
            }
            "ssl" => {
                return Err(src.at(
                    line.no,
                    "server ... ssl: HAProxy encrypted the traffic to this server itself; lb \
                     forwards TCP as it comes and cannot (the apiserver terminates TLS behind lb)",
                ))
            }
            "send-proxy" | "send-proxy-v2" | "send-proxy-v2-ssl" | "send-proxy-v2-ssl-cn" => {
                return Err(src.at(
                    line.no,
                    format!("{k}: lb adds no PROXY protocol header (DSR modes keep the client's address: docs/dsr.md)"),
                ))
            }
            "port" | "addr" => {
                return Err(src.at(
                    line.no,
                    format!("{k}: lb probes a backend at its own address and port"),
                ))
            }
            _ => {
                return Err(src.at(
                    line.no,
                    format!("{} ... {k}: this server option is not translated", line.words[0]),
                ))
            }
        }
        i += if takes_value { 2 } else { 1 };
    }
    Ok(p)
}

fn option(src: &Source, p: &mut Proxy, line: &Line, notes: &mut Notes) -> Result<(), ImportError> {
    let w = &line.words;
    let (negated, rest) = if w[0] == "no" {
        if w.get(1).map(String::as_str) != Some("option") {
            return Err(refuse(src, line, "not translated"));
        }
        (true, &w[2..])
    } else {
        (false, &w[1..])
    };
    let Some(name) = rest.first() else {
        return Err(src.at(line.no, "option: needs a name"));
    };
    let set_check = |p: &mut Proxy, c: CheckOpt| {
        if let Some(old) = p.s.check.replace(c) {
            p.s.overridden.push(old);
        }
    };
    match name.as_str() {
        "httpchk" | "ssl-hello-chk" | "tcp-check" if negated => {
            return Err(refuse(src, line, "not translated"))
        }
        "httpchk" => {
            let (method, uri) = match &rest[1..] {
                [] => ("OPTIONS".to_string(), "/".to_string()),
                [uri] => ("OPTIONS".to_string(), uri.clone()),
                [m, uri, extra @ ..] => {
                    if !extra.is_empty() {
                        notes.add(
                            src,
                            line.no,
                            format!(
                                "option httpchk ... {}: lb's probes send HTTP/1.1 with a Host header of their own",
                                extra.join(" ")
                            ),
                        );
                    }
                    (m.clone(), uri.clone())
                }
            };
            set_check(
                p,
                CheckOpt::HttpChk {
                    method,
                    uri,
                    line: line.no,
                    written: line.written(),
                },
            );
        }
        "ssl-hello-chk" => set_check(p, CheckOpt::SslHello(line.no)),
        "tcp-check" => set_check(p, CheckOpt::TcpCheck(line.no)),
        "mysql-check" | "pgsql-check" | "redis-check" | "smtpchk" | "ldap-check" | "spop-check"
        | "external-check" => {
            return Err(refuse(
                src,
                line,
                "lb probes with HTTPS, HTTP or a TCP connect; this check is not translated",
            ))
        }
        "tcplog"
        | "httplog"
        | "httpslog"
        | "dontlognull"
        | "log-health-checks"
        | "dontlog-normal"
        | "logasap"
        | "log-separate-errors" => notes.group("logging", src, line.no, &line.written(), LOGGING),
        "http-server-close"
        | "forwardfor"
        | "httpclose"
        | "http-keep-alive"
        | "http-pretend-keepalive"
        | "http-buffer-request"
        | "http-use-htx"
        | "http-no-delay"
        | "forceclose"
        | "http-ignore-probes"
        | "http-use-proxy-header"
        | "http-restrict-req-hdr-names"
        | "originalto"
        | "accept-invalid-http-request"
        | "accept-invalid-http-response"
        | "h1-case-adjust-bogus-client"
        | "h1-case-adjust-bogus-server"
        | "disable-h2-upgrade"
        | "checkcache" => notes.group("http", src, line.no, &format!("option {name}"), HTTP),
        "redispatch" => notes.group("retries", src, line.no, &line.written(), RETRIES),
        "tcpka" | "clitcpka" | "srvtcpka" => {
            notes.group("keepalive", src, line.no, &line.written(), KEEPALIVE)
        }
        "abortonclose"
        | "splice-auto"
        | "splice-request"
        | "splice-response"
        | "nolinger"
        | "socket-stats"
        | "contstats"
        | "independent-streams"
        | "persist"
        | "prefer-last-server"
        | "tcp-smart-accept"
        | "tcp-smart-connect"
        | "transparent"
        | "idle-close-on-response"
        | "allbackups" => notes.group("internals", src, line.no, &line.written(), INTERNALS),
        _ => return Err(refuse(src, line, "this option is not translated")),
    }
    Ok(())
}

fn http_check(
    src: &Source,
    p: &mut Proxy,
    line: &Line,
    notes: &mut Notes,
) -> Result<(), ImportError> {
    let w = &line.words;
    match w.get(1).map(String::as_str) {
        Some("expect") => match &w[2..] {
            [k, n] if k == "status" => {
                let code = n.parse::<u16>().ok().filter(|c| (100..=599).contains(c));
                let Some(code) = code else {
                    return Err(refuse(src, line, "lb expects one status, 100 to 599"));
                };
                p.s.expect = Some((code, line.no));
            }
            _ => {
                return Err(refuse(
                    src,
                    line,
                    "lb's probes check one status (expect_status); other expectations are not translated",
                ))
            }
        },
        Some("connect") => {
            let mut i = 2;
            while i < w.len() {
                match w[i].as_str() {
                    "ssl" => p.s.connect_ssl = Some(line.no),
                    "sni" => {
                        p.s.connect_sni = Some(value(src, line, i + 1)?.to_string());
                        i += 1;
                    }
                    "alpn" => i += 1,
                    "linger" | "default" => {}
                    other => {
                        return Err(refuse(
                            src,
                            line,
                            &format!("{other}: lb probes a backend at its own address and port"),
                        ))
                    }
                }
                i += 1;
            }
        }
        Some("send") => {
            let (mut meth, mut uri) = (None, None);
            let mut i = 2;
            while i < w.len() {
                match w[i].as_str() {
                    "meth" => meth = Some(value(src, line, i + 1)?.to_string()),
                    "uri" => uri = Some(value(src, line, i + 1)?.to_string()),
                    "ver" => {}
                    "hdr" => {
                        value(src, line, i + 2)?;
                        notes.add(
                            src,
                            line.no,
                            format!("http-check send hdr {}: lb's probes send no extra headers", w[i + 1]),
                        );
                        i += 1;
                    }
                    other => {
                        return Err(refuse(src, line, &format!("{other}: not translated")));
                    }
                }
                i += 2;
            }
            p.s.send = Some((meth, uri, line.no));
        }
        Some("disable-on-404") => notes.add(
            src,
            line.no,
            "http-check disable-on-404: lb takes a 404 as a failed probe, not as a drain (lb-agent drain does that)",
        ),
        Some("send-state") | Some("comment") => {
            notes.group("internals", src, line.no, &line.written(), INTERNALS)
        }
        _ => return Err(refuse(src, line, "not translated")),
    }
    Ok(())
}

/// Pairs frontends with their backends, takes listen blocks as they are, and works out
/// each one's servers and health check.
fn services(
    src: &Source,
    proxies: &[Proxy],
    notes: &mut Notes,
) -> Result<Vec<Service>, ImportError> {
    let mut out = Vec::new();
    let mut used: Vec<&str> = Vec::new();
    for p in proxies {
        if let Some(l) = p.disabled {
            notes.add(
                src,
                l,
                format!("{} {} is disabled: not translated", p.kind.as_str(), p.name),
            );
            continue;
        }
        let is_stats = p.stats.is_some() && p.servers.is_empty() && p.s.default_backend.is_none();
        match p.kind {
            Kind::Frontend | Kind::Listen if is_stats => {
                notes.add(
                    src,
                    p.line,
                    format!("{} {}: {STATS}", p.kind.as_str(), p.name),
                );
            }
            Kind::Frontend => {
                check_mode(src, p)?;
                let Some((bname, bline)) = &p.s.default_backend else {
                    return Err(src.at(p.line, format!("frontend {}: no default_backend", p.name)));
                };
                let Some(b) = proxies
                    .iter()
                    .find(|b| b.name == *bname && matches!(b.kind, Kind::Backend | Kind::Listen))
                else {
                    return Err(src.at(
                        *bline,
                        format!("default_backend {bname}: no backend of that name"),
                    ));
                };
                if let Some(l) = b.disabled {
                    return Err(src.at(
                        l,
                        format!(
                            "backend {bname} is disabled, but frontend {} sends to it",
                            p.name
                        ),
                    ));
                }
                check_mode(src, b)?;
                used.push(&b.name);
                out.push(service(src, p, b, notes)?);
            }
            Kind::Listen => {
                check_mode(src, p)?;
                out.push(service(src, p, p, notes)?);
            }
            _ => {}
        }
    }
    for p in proxies {
        if p.kind == Kind::Backend && p.disabled.is_none() && !used.contains(&p.name.as_str()) {
            notes.add(
                src,
                p.line,
                format!(
                    "backend {}: no frontend sends to it; not translated",
                    p.name
                ),
            );
        }
    }
    if out.is_empty() {
        return Err(ImportError::File {
            file: src.path.clone(),
            message: "no frontend with a default_backend and no listen block with servers: nothing to translate".into(),
        });
    }
    Ok(out)
}

fn check_mode(src: &Source, p: &Proxy) -> Result<(), ImportError> {
    match &p.s.mode {
        Some((m, l)) if m == "http" => Err(src.at(
            *l,
            format!(
                "mode http applies to {} {}: lb is a layer-4 load balancer and translates mode tcp only \
                 (write `mode tcp` in the section if HTTP was not meant)",
                p.kind.as_str(),
                p.name
            ),
        )),
        _ => Ok(()),
    }
}

fn service(
    src: &Source,
    front: &Proxy,
    back: &Proxy,
    notes: &mut Notes,
) -> Result<Service, ImportError> {
    if front.binds.is_empty() {
        return Err(src.at(
            front.line,
            format!("{} {}: no bind line", front.kind.as_str(), front.name),
        ));
    }
    let eff: Vec<(&RawServer, Params)> = back
        .servers
        .iter()
        .map(|s| (s, back.s.default_server.overlay(&s.params)))
        .collect();
    if !eff.iter().any(|(_, p)| p.backup != Some(true)) {
        return Err(src.at(
            back.line,
            format!(
                "{} {}: no server other than backup ones",
                back.kind.as_str(),
                back.name
            ),
        ));
    }
    let active: Vec<&(&RawServer, Params)> =
        eff.iter().filter(|(_, p)| p.backup != Some(true)).collect();
    let share = |p: &Params| {
        if p.disabled == Some(true) {
            0
        } else {
            p.weight.unwrap_or(1)
        }
    };
    let shares: Vec<u32> = active
        .iter()
        .map(|(_, p)| share(p))
        .filter(|&w| w > 0)
        .collect();
    let weights_differ = shares.windows(2).any(|w| w[0] != w[1]);
    let mut servers = Vec::new();
    for (s, p) in &eff {
        let backup = p.backup == Some(true);
        if backup {
            notes.add(
                src,
                s.line,
                format!(
                    "server {} is a backup: lb has no backup servers (as a backend it would get its \
                     share of new connections all the time); written commented out",
                    s.name
                ),
            );
        }
        servers.push(Server {
            name: s.name.clone(),
            address: s.address,
            port: s.port,
            weight: weights_differ.then(|| share(p)),
            backup,
            disabled: p.disabled == Some(true),
            line: s.line,
        });
    }
    let (health_before, health) = health(src, back, &active, notes)?;
    Ok(Service {
        name: front.name.clone(),
        origin: (
            format!("{} {}", front.kind.as_str(), front.name),
            front.line,
        ),
        backend: (front.kind == Kind::Frontend)
            .then(|| (format!("backend {}", back.name), back.line)),
        binds: front.binds.clone(),
        servers,
        health,
        health_before,
    })
}

/// The `[vip.health]` the backend's check adds up to, and the comments that go before it.
fn health(
    src: &Source,
    back: &Proxy,
    active: &[&(&RawServer, Params)],
    notes: &mut Notes,
) -> Result<(Vec<String>, Vec<Field>), ImportError> {
    let checked: Vec<&&(&RawServer, Params)> = active
        .iter()
        .filter(|(_, p)| p.check == Some(true))
        .collect();
    let Some((first, p)) = checked.first().map(|x| (x.0, &x.1)) else {
        return Ok((
            vec![
                "No server line says `check`: HAProxy probed none of them, and neither does lb here."
                    .into(),
                "lb's default (HTTPS GET /readyz every 1s) takes a failed apiserver out in about 2s."
                    .into(),
            ],
            vec![Field::new("kind", tstr("none"), None)],
        ));
    };
    for (s, _) in active.iter().filter(|(_, p)| p.check != Some(true)) {
        notes.add(
            src,
            s.line,
            format!(
                "server {} has no `check` (HAProxy took it as always up): lb probes every backend of a VIP alike",
                s.name
            ),
        );
    }
    for (s, q) in checked.iter().map(|x| (x.0, &x.1)).skip(1) {
        let same = q.inter_ms == p.inter_ms
            && q.rise == p.rise
            && q.fall == p.fall
            && q.check_ssl == p.check_ssl
            && q.verify == p.verify
            && q.ca_file == p.ca_file
            && q.sni == p.sni;
        if !same {
            return Err(src.at(
                s.line,
                format!(
                    "server {}: its check options (inter, rise, fall, check-ssl, verify, ca-file, \
                     check-sni) differ from server {}'s (line {}); lb probes every backend of a VIP \
                     alike: make them the same (a default-server line)",
                    s.name, first.name, first.line
                ),
            ));
        }
    }
    let s = &back.s;
    let mut before = Vec::new();
    let mut fields = Vec::new();
    let tls = p.check_ssl == Some(true) || s.connect_ssl.is_some();
    let readyz = |fields: &mut Vec<Field>| {
        fields.push(Field::new("kind", tstr("https"), None));
        fields.push(Field::new(
            "path",
            tstr("/readyz"),
            Some("the apiserver's readiness: false while it starts or shuts down".into()),
        ));
    };
    match &s.check {
        Some(CheckOpt::SslHello(l)) => {
            readyz(&mut fields);
            fields.extend(verify_fields(
                p,
                s,
                first.line,
                Some("HAProxy's TLS hello verified no certificate".into()),
            ));
            let httpchk = s.overridden.iter().rev().find_map(|c| match c {
                CheckOpt::HttpChk { written, line, .. } => Some((written.clone(), *line)),
                _ => None,
            });
            let mut lines = vec![*l];
            let text = match &httpchk {
                Some((w, hl)) => {
                    lines.push(*hl);
                    format!(
                        "option ssl-hello-chk overrode `{w}` (HAProxy keeps the last check \
                         option): HAProxy only sent a TLS hello and never that request; lb probes \
                         HTTPS GET /readyz instead, not verifying the certificate until the CA is \
                         filled in (ca_file)"
                    )
                }
                None => "option ssl-hello-chk: HAProxy only sent a TLS hello; lb probes HTTPS GET \
                         /readyz instead, not verifying the certificate until the CA is filled in \
                         (ca_file)"
                    .to_string(),
            };
            notes.add_lines(src, lines, text);
            before.push(format!("Was: option ssl-hello-chk (line {l})."));
        }
        Some(CheckOpt::HttpChk {
            method,
            uri,
            line,
            written,
        }) => {
            let (meth, path, from) = match &s.send {
                Some((m, u, l)) => (
                    m.clone().unwrap_or_else(|| "GET".into()),
                    u.clone().unwrap_or_else(|| "/".into()),
                    *l,
                ),
                None => (method.clone(), uri.clone(), *line),
            };
            if !path.starts_with('/') || path.chars().any(char::is_whitespace) {
                return Err(src.at(
                    from,
                    format!("{path:?}: lb's probe path must start with '/'"),
                ));
            }
            before.push(format!(
                "Was: {written} (line {line}){}.",
                if s.send.is_some() {
                    format!(", http-check send (line {from})")
                } else {
                    String::new()
                }
            ));
            if meth != "GET" {
                notes.add(
                    src,
                    from,
                    format!("the check's method {meth}: lb's probes always GET"),
                );
            }
            fields.push(Field::new(
                "kind",
                tstr(if tls { "https" } else { "http" }),
                Some(match (tls, s.connect_ssl) {
                    (false, _) => "no check-ssl: in clear".into(),
                    (true, Some(l)) => format!("http-check connect ssl (line {l})"),
                    (true, None) => format!("check-ssl (line {})", first.line),
                }),
            ));
            let path_comment = (path == "/healthz" || path == "/livez" || path == "/").then(|| {
                "lb's default /readyz also turns false while an apiserver shuts down, so connections leave it first".to_string()
            });
            fields.push(Field::new("path", tstr(&path), path_comment));
            match s.expect {
                Some((code, l)) => fields.push(Field::new(
                    "expect_status",
                    int(code as i64),
                    Some(format!("http-check expect status {code} (line {l})")),
                )),
                None => notes.add(
                    src,
                    *line,
                    "no http-check expect: HAProxy took any 2xx or 3xx status as healthy; lb wants exactly 200 (expect_status)",
                ),
            }
            if tls {
                fields.extend(verify_fields(p, s, first.line, None));
            }
        }
        Some(CheckOpt::TcpCheck(l)) if !tls => {
            before.push(format!("Was: option tcp-check (line {l})."));
            fields.push(Field::new(
                "kind",
                tstr("tcp"),
                Some("a TCP connect".into()),
            ));
        }
        other => {
            if tls {
                readyz(&mut fields);
                fields.extend(verify_fields(p, s, first.line, None));
                notes.add(
                    src,
                    first.line,
                    "check-ssl: HAProxy checked that a TLS handshake succeeds; lb probes HTTPS GET /readyz",
                );
                before.push(format!("Was: check check-ssl (line {}).", first.line));
            } else {
                let l = match other {
                    Some(CheckOpt::TcpCheck(l)) => *l,
                    _ => first.line,
                };
                before.push(format!("Was: check (line {l}), HAProxy's TCP connect."));
                fields.push(Field::new(
                    "kind",
                    tstr("tcp"),
                    Some("a TCP connect".into()),
                ));
            }
        }
    }
    timing(src, s, p, first, notes, &mut fields)?;
    Ok((before, fields))
}

/// interval, timeout, rise and fall: HAProxy's inter, timeout connect + timeout check (at
/// most the interval), rise and fall, or HAProxy's defaults for them.
fn timing(
    src: &Source,
    s: &Settings,
    p: &Params,
    first: &RawServer,
    notes: &mut Notes,
    fields: &mut Vec<Field>,
) -> Result<(), ImportError> {
    let inter = p.inter_ms.unwrap_or(2000);
    if !(10..=3_600_000).contains(&inter) {
        return Err(src.at(
            first.line,
            format!("inter {inter}ms: lb probes every 10ms to 1h"),
        ));
    }
    let total = match s.timeout_check {
        Some((c, _)) => s.timeout_connect.map_or(inter, |t| t.0.min(inter)) + c,
        None => inter,
    };
    let timeout = total.min(inter);
    fields.push(Field::new(
        "interval",
        dur(inter),
        Some(match p.inter_ms {
            Some(_) => "HAProxy's inter; lb's default 1s".into(),
            None => "HAProxy's default inter; lb's default 1s".into(),
        }),
    ));
    fields.push(Field::new(
        "timeout",
        dur(timeout),
        Some(if total > inter {
            format!(
                "at most the interval (HAProxy allowed {}: timeout connect + timeout check); lb's default 500ms",
                super::render::human_ms(total)
            )
        } else if s.timeout_check.is_some() {
            "timeout connect + timeout check".into()
        } else {
            "HAProxy's: the interval".into()
        }),
    ));
    if total > inter {
        if let Some((_, l)) = s.timeout_check {
            notes.add(
                src,
                l,
                format!(
                    "timeout check: HAProxy gave a check up to {}; an lb probe must end before the next starts, so timeout = interval ({})",
                    super::render::human_ms(total),
                    super::render::human_ms(inter)
                ),
            );
        }
    }
    // HAProxy's defaults are written out where lb's differ (fall: lb 2, HAProxy 3).
    for (name, given, default, note) in [
        ("rise", p.rise, 2, "HAProxy's default"),
        ("fall", p.fall, 3, "HAProxy's default; lb's 2"),
    ] {
        fields.push(Field::new(
            name,
            int(i64::from(given.unwrap_or(default))),
            Some(match given {
                Some(_) => format!("HAProxy's {name}"),
                None => note.into(),
            }),
        ));
    }
    Ok(())
}

/// How the probe checks the certificate: the server's ca-file, or (verify none, or a TLS
/// hello that checked nothing) no verification, with the CA to fill in.
fn verify_fields(p: &Params, s: &Settings, line: usize, tls_says: Option<String>) -> Vec<Field> {
    let mut fields = Vec::new();
    match (&p.ca_file, p.verify.as_deref()) {
        (Some(ca), v) if v != Some("none") => fields.push(Field::new(
            "ca_file",
            tstr(ca),
            Some(format!("ca-file (line {line})")),
        )),
        _ => {
            fields.push(Field::new(
                "insecure_skip_verify",
                "true".into(),
                Some(tls_says.unwrap_or_else(|| {
                    format!("verify none (line {line}): HAProxy verified no certificate")
                })),
            ));
            fields.push(Field::commented(
                "ca_file",
                tstr(crate::config::DEFAULT_CA_FILE),
                Some(
                    "FILL IN: the CA of the apiservers' certificates; then drop insecure_skip_verify"
                        .into(),
                ),
            ));
        }
    }
    if let Some(sni) = p.sni.clone().or_else(|| s.connect_sni.clone()) {
        fields.push(Field::new(
            "server_name",
            tstr(&sni),
            Some("check-sni".into()),
        ));
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_quotes_and_comments() {
        let src = Source::new("h.cfg", "");
        assert_eq!(
            split_words(&src, 1, r#"  option httpchk "GET" /a\ b # c"#).unwrap(),
            vec!["option", "httpchk", "GET", "/a b"]
        );
        assert_eq!(split_words(&src, 1, "'#x' y").unwrap(), vec!["#x", "y"]);
        assert!(split_words(&src, 3, "bind \"*:1")
            .unwrap_err()
            .to_string()
            .starts_with("h.cfg:3: "));
    }

    #[test]
    fn times() {
        assert_eq!(time_ms("10000"), Some(10_000));
        assert_eq!(time_ms("2s"), Some(2000));
        assert_eq!(time_ms("3h"), Some(10_800_000));
        assert_eq!(time_ms("500ms"), Some(500));
        assert_eq!(time_ms("1.5s"), None);
        assert_eq!(time_ms("s"), None);
    }

    #[test]
    fn addresses() {
        assert_eq!(address_port("*:6443"), Ok((None, Some(6443))));
        assert_eq!(address_port(":6443"), Ok((None, Some(6443))));
        assert_eq!(
            address_port("198.18.0.100:8383"),
            Ok((Some(Ipv4Addr::new(198, 18, 0, 100)), Some(8383)))
        );
        assert_eq!(
            address_port("198.18.0.11"),
            Ok((Some(Ipv4Addr::new(198, 18, 0, 11)), None))
        );
        assert!(address_port("master1.example:6443")
            .unwrap_err()
            .contains("host names"));
        assert!(address_port(":::6443").unwrap_err().contains("IPv6"));
        assert!(address_port("*:6443-6444").is_err());
        assert!(address_port("unix@/run/x").is_err());
    }
}
