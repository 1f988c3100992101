//! keepalived.conf: a tokenizer (braces, double quotes, `#` and `!` comments) that makes a
//! tree of statements, and the reading of the parts the HA guides write: `global_defs`,
//! `vrrp_script` and `vrrp_instance`. Instances are merged into lb's one VRRP router when
//! they agree on everything but their router id and addresses.

use std::net::Ipv4Addr;

use super::{decimal_seconds_ms, At, ImportError, Notes, Source};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Word,
    Open,
    Close,
}

#[derive(Debug, Clone)]
pub(crate) struct Tok {
    pub text: String,
    pub line: usize,
    kind: Kind,
}

/// Words (a double-quoted string is one word, quotes removed) and braces, each with its line.
fn tokenize(src: &Source) -> Result<Vec<Tok>, ImportError> {
    let mut out = Vec::new();
    for (i, raw) in src.text.lines().enumerate() {
        let line = i + 1;
        let mut chars = raw.chars().peekable();
        while let Some(&c) = chars.peek() {
            match c {
                c if c.is_whitespace() => {
                    chars.next();
                }
                '#' | '!' => break,
                '{' | '}' => {
                    chars.next();
                    out.push(Tok {
                        text: c.to_string(),
                        line,
                        kind: if c == '{' { Kind::Open } else { Kind::Close },
                    });
                }
                '"' => {
                    chars.next();
                    let mut text = String::new();
                    loop {
                        match chars.next() {
                            None => return Err(src.at(line, "a quoted string is not closed")),
                            Some('"') => break,
                            Some(c) => text.push(c),
                        }
                    }
                    out.push(Tok {
                        text,
                        line,
                        kind: Kind::Word,
                    });
                }
                _ => {
                    let mut text = String::new();
                    while let Some(&c) = chars.peek() {
                        if c.is_whitespace() || c == '{' || c == '}' || c == '"' {
                            break;
                        }
                        text.push(c);
                        chars.next();
                        // `${NAME}` stays one word, so a placeholder is named as written.
                        if c == '$' && chars.peek() == Some(&'{') {
                            for c in chars.by_ref() {
                                text.push(c);
                                if c == '}' {
                                    break;
                                }
                            }
                        }
                    }
                    out.push(Tok {
                        text,
                        line,
                        kind: Kind::Word,
                    });
                }
            }
        }
    }
    Ok(out)
}

/// A directive: the words of one line, and the block that follows when it opens one.
#[derive(Debug)]
pub(crate) struct Stmt {
    pub line: usize,
    pub words: Vec<Tok>,
    pub block: Option<Vec<Stmt>>,
}

impl Stmt {
    fn key(&self) -> &str {
        &self.words[0].text
    }

    fn args(&self) -> &[Tok] {
        &self.words[1..]
    }

    /// The directive as written, for comments and messages.
    fn written(&self) -> String {
        self.words
            .iter()
            .map(|w| {
                if w.text.contains(' ') || w.text.is_empty() {
                    format!("\"{}\"", w.text)
                } else {
                    w.text.clone()
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn parse(src: &Source) -> Result<Vec<Stmt>, ImportError> {
    let toks = tokenize(src)?;
    let mut pos = 0;
    parse_block(src, &toks, &mut pos, None)
}

fn parse_block(
    src: &Source,
    toks: &[Tok],
    pos: &mut usize,
    opened: Option<usize>,
) -> Result<Vec<Stmt>, ImportError> {
    let mut out: Vec<Stmt> = Vec::new();
    let mut cur: Vec<Tok> = Vec::new();
    let flush = |cur: &mut Vec<Tok>, out: &mut Vec<Stmt>| -> Result<(), ImportError> {
        if cur.is_empty() {
            return Ok(());
        }
        let stmt = Stmt {
            line: cur[0].line,
            words: std::mem::take(cur),
            block: None,
        };
        check_statement(src, &stmt)?;
        out.push(stmt);
        Ok(())
    };
    while let Some(t) = toks.get(*pos) {
        *pos += 1;
        match t.kind {
            Kind::Word => {
                if cur.last().is_some_and(|l| l.line != t.line) {
                    flush(&mut cur, &mut out)?;
                }
                cur.push(t.clone());
            }
            Kind::Open => {
                if cur.is_empty() {
                    return Err(src.at(t.line, "`{` with no directive before it"));
                }
                let stmt_words = std::mem::take(&mut cur);
                let stmt = Stmt {
                    line: stmt_words[0].line,
                    words: stmt_words,
                    block: None,
                };
                check_statement(src, &stmt)?;
                let block = parse_block(src, toks, pos, Some(t.line))?;
                out.push(Stmt {
                    block: Some(block),
                    ..stmt
                });
            }
            Kind::Close => {
                flush(&mut cur, &mut out)?;
                if opened.is_none() {
                    return Err(src.at(t.line, "`}` closes no block"));
                }
                return Ok(out);
            }
        }
    }
    flush(&mut cur, &mut out)?;
    if let Some(line) = opened {
        return Err(src.at(line, "this `{` is never closed"));
    }
    Ok(out)
}

/// What no directive may be, wherever it is.
fn check_statement(src: &Source, s: &Stmt) -> Result<(), ImportError> {
    let key = s.key();
    if key == "include" {
        return Err(src.at(
            s.line,
            "include: import reads one file; paste the included file in its place and run it again",
        ));
    }
    if key.starts_with('$') || key.starts_with('@') || key.starts_with('~') {
        return Err(src.at(
            s.line,
            format!(
                "{key}: keepalived's parameter substitution and conditional lines are not \
                 translated; expand them first (keepalived -t --config-test shows the result)"
            ),
        ));
    }
    if let Some(w) = s.words.iter().find(|w| w.text.contains("${")) {
        return Err(src.at(
            w.line,
            format!(
                "{}: a placeholder that was never filled in (the guide's ${{...}} variables are \
                 to be replaced by your values)",
                w.text
            ),
        ));
    }
    Ok(())
}

/// One `virtual_ipaddress` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VirtualAddress {
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub line: usize,
    /// `dev IFNAME`, checked against the instance's interface once that is known.
    dev: Option<String>,
}

/// A `track_script` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TrackRef {
    pub script: String,
    /// `weight N` written in the track_script entry itself.
    pub weight: Option<i32>,
    pub line: usize,
}

/// A `vrrp_script` block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Script {
    pub name: String,
    pub line: usize,
    pub command: At<String>,
    pub weight: Option<At<i32>>,
    /// interval, fall, rise, timeout as written (lb's tracking has no timing of its own).
    pub timing: Vec<String>,
}

/// The notify scripts of an instance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Notify {
    pub any: Option<At<String>>,
    pub master: Option<At<String>>,
    pub backup: Option<At<String>>,
    pub fault: Option<At<String>>,
}

/// Gratuitous ARP settings (global_defs' vrrp_garp_* or the instance's garp_*).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Garp {
    pub master_repeat: Option<At<u32>>,
    pub lower_prio_repeat: Option<At<u32>>,
    pub master_refresh_s: Option<At<u64>>,
}

/// The VRRP router lb runs: one vrrp_instance, or several that agree, merged.
#[derive(Debug, Clone)]
pub(crate) struct Vrrp {
    pub name: At<String>,
    /// The other instances merged into this one.
    pub merged: Vec<At<String>>,
    pub state: Option<At<String>>,
    pub interface: At<String>,
    pub vrid: At<u8>,
    pub priority: Option<At<u8>>,
    pub version: Option<At<u8>>,
    pub advert_ms: Option<At<u64>>,
    pub nopreempt: Option<usize>,
    pub preempt_delay_ms: Option<At<u64>>,
    pub auth_pass: Option<At<String>>,
    pub unicast_src: Option<At<Ipv4Addr>>,
    pub peers: Vec<At<Ipv4Addr>>,
    pub addresses: Vec<VirtualAddress>,
    pub tracks: Vec<TrackRef>,
    pub scripts: Vec<Script>,
    pub notify: Notify,
    pub garp: Garp,
    pub rt_priority: Option<At<u8>>,
}

impl Vrrp {
    /// The VRRP version in force: the instance's, global_defs', or keepalived's default 2.
    pub(crate) fn version(&self) -> u8 {
        self.version.as_ref().map_or(2, |v| v.0)
    }
}

/// Reads keepalived.conf: the VRRP router it describes (None without a vrrp_instance).
pub(crate) fn read(src: &Source, notes: &mut Notes) -> Result<Option<Vrrp>, ImportError> {
    let tree = parse(src)?;
    let mut global = Global::default();
    let mut scripts: Vec<Script> = Vec::new();
    let mut instances: Vec<Instance> = Vec::new();
    for s in &tree {
        match s.key() {
            "global_defs" => {
                let block = block_of(src, s)?;
                read_global(src, block, &mut global, notes)?;
            }
            "vrrp_script" => {
                let name = one_name(src, s)?;
                if let Some(other) = scripts.iter().find(|o| o.name == name) {
                    return Err(src.at(
                        s.line,
                        format!(
                            "vrrp_script {name} is defined twice (also line {})",
                            other.line
                        ),
                    ));
                }
                scripts.push(read_script(src, s, name, block_of(src, s)?)?);
            }
            "vrrp_instance" => {
                let name = one_name(src, s)?;
                instances.push(read_instance(src, s, name, block_of(src, s)?, notes)?);
            }
            "vrrp_sync_group" => {
                return Err(src.at(
                    s.line,
                    "vrrp_sync_group: lb runs one VRRP router per host, so there is nothing to \
                     synchronise; merge the group's instances into one vrrp_instance first",
                ))
            }
            "virtual_server" | "virtual_server_group" => {
                return Err(src.at(
                    s.line,
                    format!(
                        "{}: keepalived's own (LVS) load balancing is not translated; give the \
                         frontends and servers as an haproxy config (--haproxy)",
                        s.key()
                    ),
                ))
            }
            other => return Err(unknown(src, s, other, "at the top level")),
        }
    }
    let mut instances = instances.into_iter();
    let Some(first) = instances.next() else {
        return Ok(None);
    };
    let mut vrrp = first.into_vrrp(&global);
    for other in instances {
        merge(src, &mut vrrp, other, &global, notes)?;
    }
    for t in &vrrp.tracks {
        if !scripts.iter().any(|s| s.name == t.script) {
            return Err(src.at(
                t.line,
                format!("track_script {}: no vrrp_script of that name", t.script),
            ));
        }
    }
    for s in &scripts {
        if !vrrp.tracks.iter().any(|t| t.script == s.name) {
            notes.add(
                src,
                s.line,
                format!(
                    "vrrp_script {}: tracked by no instance, not translated",
                    s.name
                ),
            );
        }
    }
    vrrp.scripts = scripts;
    check_timing(src, &mut vrrp, notes)?;
    Ok(Some(vrrp))
}

/// The advert interval against the version, and what VRRPv3 drops.
fn check_timing(src: &Source, v: &mut Vrrp, notes: &mut Notes) -> Result<(), ImportError> {
    let version = v.version();
    if let Some((ms, l)) = v.advert_ms {
        if version == 2 && (ms % 1000 != 0 || !(1000..=255_000).contains(&ms)) {
            return Err(src.at(
                l,
                format!(
                    "advert_int {}: VRRPv2 counts whole seconds, 1 to 255 (for less, vrrp_version 3, on \
                     the keepalived peers too)",
                    super::render::human_ms(ms)
                ),
            ));
        }
        if version == 3 && (ms % 10 != 0 || !(10..=40_950).contains(&ms)) {
            return Err(src.at(
                l,
                format!(
                    "advert_int {}: VRRPv3 counts centiseconds, 0.01 to 40.95",
                    super::render::human_ms(ms)
                ),
            ));
        }
    }
    if version == 3 {
        if let Some((_, l)) = v.auth_pass.take() {
            notes.add(
                src,
                l,
                "authentication: VRRPv3 has none (keepalived ignores it with vrrp_version 3); not written",
            );
        }
    }
    if let Some((st, l)) = &v.state {
        notes.add(
            src,
            *l,
            format!(
                "state {st}: lb starts as backup and lets the priorities decide within one \
                 master-down interval; it has no initial state"
            ),
        );
    }
    Ok(())
}

fn block_of<'a>(src: &Source, s: &'a Stmt) -> Result<&'a [Stmt], ImportError> {
    s.block
        .as_deref()
        .ok_or_else(|| src.at(s.line, format!("{}: expected a {{ block }}", s.key())))
}

fn one_name(src: &Source, s: &Stmt) -> Result<String, ImportError> {
    match s.args() {
        [name] => Ok(name.text.clone()),
        _ => Err(src.at(s.line, format!("{}: expected one name", s.key()))),
    }
}

fn unknown(src: &Source, s: &Stmt, key: &str, place: &str) -> ImportError {
    src.at(
        s.line,
        format!(
            "{key} {place}: import does not translate this directive (see docs/migration.md for what lb has)"
        ),
    )
}

fn arg<'a>(src: &Source, s: &'a Stmt) -> Result<&'a str, ImportError> {
    match s.args() {
        [a] => Ok(&a.text),
        _ => Err(src.at(s.line, format!("{}: expected one value", s.key()))),
    }
}

fn int(src: &Source, s: &Stmt, range: std::ops::RangeInclusive<i64>) -> Result<i64, ImportError> {
    let a = arg(src, s)?;
    a.parse::<i64>()
        .ok()
        .filter(|n| range.contains(n))
        .ok_or_else(|| {
            src.at(
                s.line,
                format!(
                    "{}: {a:?} is not a number from {} to {}",
                    s.key(),
                    range.start(),
                    range.end()
                ),
            )
        })
}

fn seconds_ms(src: &Source, s: &Stmt) -> Result<u64, ImportError> {
    let a = arg(src, s)?;
    decimal_seconds_ms(a).ok_or_else(|| {
        src.at(
            s.line,
            format!("{}: {a:?} is not a number of seconds", s.key()),
        )
    })
}

fn ipv4(src: &Source, line: usize, what: &str, text: &str) -> Result<Ipv4Addr, ImportError> {
    text.parse::<Ipv4Addr>().map_err(|_| {
        if text.parse::<std::net::Ipv6Addr>().is_ok() || text.contains(':') {
            src.at(
                line,
                format!("{what} {text}: an IPv6 address; lb's VIPs and VRRP are IPv4 only"),
            )
        } else {
            src.at(line, format!("{what}: {text:?} is not an IPv4 address"))
        }
    })
}

#[derive(Debug, Default)]
struct Global {
    version: Option<At<u8>>,
    garp: Garp,
    rt_priority: Option<At<u8>>,
}

const EMAIL: &str = "keepalived's alert emails: lb sends none (a notify script can)";
const SCRIPT_USER: &str =
    "lb runs notify scripts as itself (root, with the systemd unit's capabilities only)";
const GARP_TIMING: &str = "lb sends its gratuitous ARPs at once on becoming master and \
    again 5 s later, back to back; it has no setting for the delays between them";

fn read_global(
    src: &Source,
    block: &[Stmt],
    g: &mut Global,
    notes: &mut Notes,
) -> Result<(), ImportError> {
    for s in block {
        let key = s.key();
        match key {
            "router_id" => notes.add(
                src,
                s.line,
                format!(
                    "{}: names this host in keepalived's alert emails; lb has no equivalent",
                    s.written()
                ),
            ),
            "vrrp_version" => g.version = Some((int(src, s, 2..=3)? as u8, s.line)),
            "vrrp_rt_priority" => g.rt_priority = Some((int(src, s, 1..=99)? as u8, s.line)),
            "vrrp_garp_master_repeat" => {
                g.garp.master_repeat = Some((int(src, s, 0..=100)? as u32, s.line))
            }
            "vrrp_garp_lower_prio_repeat" => {
                g.garp.lower_prio_repeat = Some((int(src, s, 0..=100)? as u32, s.line))
            }
            "vrrp_garp_master_refresh" => {
                g.garp.master_refresh_s = Some((int(src, s, 0..=86400)? as u64, s.line))
            }
            "vrrp_garp_master_delay" => garp_delay(src, s, notes)?,
            "vrrp_garp_master_refresh_repeat" => refresh_repeat(src, s, notes)?,
            "vrrp_garp_lower_prio_delay" | "vrrp_garp_interval" | "vrrp_gna_interval" => {
                notes.group("garp_timing", src, s.line, key, GARP_TIMING)
            }
            "notification_email" | "notification_email_from" | "smtp_server"
            | "smtp_connect_timeout" | "smtp_alert" => notes.group("email", src, s.line, key, EMAIL),
            "enable_script_security" | "script_user" => {
                notes.group("script_user", src, s.line, key, SCRIPT_USER)
            }
            "vrrp_skip_check_adv_addr" => notes.add(
                src,
                s.line,
                "vrrp_skip_check_adv_addr: lb has no such switch; it accepts an advert whatever addresses it lists",
            ),
            "vrrp_strict" => notes.add(
                src,
                s.line,
                "vrrp_strict: lb has no strict mode; it follows RFC 5798 as written and adds no firewall rules for the virtual addresses",
            ),
            other => return Err(unknown(src, s, other, "in global_defs")),
        }
    }
    Ok(())
}

fn garp_delay(src: &Source, s: &Stmt, notes: &mut Notes) -> Result<(), ImportError> {
    if int(src, s, 0..=1000)? != 5 {
        notes.group("garp_timing", src, s.line, s.key(), GARP_TIMING);
    }
    Ok(())
}

fn refresh_repeat(src: &Source, s: &Stmt, notes: &mut Notes) -> Result<(), ImportError> {
    if int(src, s, 1..=100)? != 1 {
        notes.add(
            src,
            s.line,
            format!(
                "{}: lb's refresh sends one gratuitous ARP per address",
                s.written()
            ),
        );
    }
    Ok(())
}

fn read_script(
    src: &Source,
    s: &Stmt,
    name: String,
    block: &[Stmt],
) -> Result<Script, ImportError> {
    let mut command = None;
    let mut weight = None;
    let mut timing = Vec::new();
    for d in block {
        match d.key() {
            "script" => {
                if d.args().is_empty() {
                    return Err(src.at(d.line, "script: expected a command"));
                }
                let words: Vec<&str> = d.args().iter().map(|w| w.text.as_str()).collect();
                command = Some((words.join(" "), d.line));
            }
            "weight" => {
                match d.args() {
                    [w] => {
                        let n = w
                            .text
                            .parse::<i32>()
                            .ok()
                            .filter(|n| (-253..=253).contains(n));
                        let Some(n) = n else {
                            return Err(src.at(
                                d.line,
                                format!("weight: {:?} is not a number from -253 to 253", w.text),
                            ));
                        };
                        weight = Some((n, d.line));
                    }
                    [_, r] if r.text == "reverse" => return Err(src.at(
                        d.line,
                        "weight ... reverse: lb's tracking lowers the priority while something is \
                         wrong, never the other way round",
                    )),
                    _ => return Err(src.at(d.line, "weight: expected one number")),
                }
            }
            "interval" | "fall" | "rise" | "timeout" => {
                arg(src, d)?;
                timing.push(d.written());
            }
            "user" | "init_fail" => {}
            other => return Err(unknown(src, d, other, "in vrrp_script")),
        }
    }
    let Some(command) = command else {
        return Err(src.at(s.line, format!("vrrp_script {name}: no script line")));
    };
    Ok(Script {
        name,
        line: s.line,
        command,
        weight,
        timing,
    })
}

/// One vrrp_instance as written.
#[derive(Debug)]
struct Instance {
    name: At<String>,
    state: Option<At<String>>,
    interface: Option<At<String>>,
    vrid: Option<At<u8>>,
    priority: Option<At<u8>>,
    version: Option<At<u8>>,
    advert_ms: Option<At<u64>>,
    nopreempt: Option<usize>,
    preempt_delay_ms: Option<At<u64>>,
    auth_pass: Option<At<String>>,
    unicast_src: Option<At<Ipv4Addr>>,
    peers: Vec<At<Ipv4Addr>>,
    addresses: Vec<VirtualAddress>,
    tracks: Vec<TrackRef>,
    notify: Notify,
    garp: Garp,
}

fn read_instance(
    src: &Source,
    s: &Stmt,
    name: String,
    block: &[Stmt],
    notes: &mut Notes,
) -> Result<Instance, ImportError> {
    let mut i = Instance {
        name: (name, s.line),
        state: None,
        interface: None,
        vrid: None,
        priority: None,
        version: None,
        advert_ms: None,
        nopreempt: None,
        preempt_delay_ms: None,
        auth_pass: None,
        unicast_src: None,
        peers: Vec::new(),
        addresses: Vec::new(),
        tracks: Vec::new(),
        notify: Notify::default(),
        garp: Garp::default(),
    };
    let mut auth_type: Option<At<String>> = None;
    let mut addresses_line = None;
    for d in block {
        let key = d.key();
        match key {
            "state" => {
                let st = arg(src, d)?;
                if st != "MASTER" && st != "BACKUP" {
                    return Err(src.at(d.line, format!("state: {st:?} is not MASTER or BACKUP")));
                }
                i.state = Some((st.to_string(), d.line));
            }
            "interface" => {
                let name = arg(src, d)?.to_string();
                crate::config::validate_ifname(name.clone())
                    .map_err(|m| src.at(d.line, format!("interface: {m}")))?;
                i.interface = Some((name, d.line));
            }
            "virtual_router_id" => i.vrid = Some((int(src, d, 1..=255)? as u8, d.line)),
            "priority" => i.priority = Some((int(src, d, 1..=255)? as u8, d.line)),
            "version" => i.version = Some((int(src, d, 2..=3)? as u8, d.line)),
            "advert_int" => {
                let ms = seconds_ms(src, d)?;
                if ms == 0 {
                    return Err(src.at(d.line, "advert_int: must be more than 0"));
                }
                i.advert_ms = Some((ms, d.line));
            }
            "nopreempt" => i.nopreempt = Some(d.line),
            "preempt" => i.nopreempt = None,
            "preempt_delay" => {
                let ms = seconds_ms(src, d)?;
                if ms > 1_000_000 {
                    return Err(src.at(d.line, "preempt_delay: at most 1000 seconds"));
                }
                i.preempt_delay_ms = Some((ms, d.line));
            }
            "authentication" => {
                let words: Vec<&Tok> = block_of(src, d)?.iter().flat_map(|x| &x.words).collect();
                for pair in words.chunks(2) {
                    match pair {
                        [k, v] if k.text == "auth_type" => {
                            auth_type = Some((v.text.clone(), k.line))
                        }
                        [k, v] if k.text == "auth_pass" => {
                            i.auth_pass = Some((v.text.clone(), k.line))
                        }
                        [k, ..] => {
                            return Err(src.at(
                                k.line,
                                format!(
                                    "{} in authentication: expected auth_type and auth_pass",
                                    k.text
                                ),
                            ))
                        }
                        [] => {}
                    }
                }
            }
            "unicast_src_ip" => {
                i.unicast_src = Some((ipv4(src, d.line, key, arg(src, d)?)?, d.line))
            }
            "unicast_peer" => {
                for p in block_of(src, d)? {
                    // keepalived allows options after the address (min_ttl, max_ttl).
                    if p.words.len() > 1 {
                        return Err(src.at(
                            p.line,
                            format!(
                                "unicast_peer {}: options on a peer are not translated",
                                p.written()
                            ),
                        ));
                    }
                    i.peers
                        .push((ipv4(src, p.line, "unicast_peer", p.key())?, p.line));
                }
            }
            "virtual_ipaddress" => {
                addresses_line = Some(d.line);
                for a in block_of(src, d)? {
                    i.addresses.push(virtual_address(src, a, notes)?);
                }
            }
            "track_script" => {
                for t in block_of(src, d)? {
                    let weight = match t.args() {
                        [] => None,
                        [w, n] if w.text == "weight" => Some(
                            n.text
                                .parse::<i32>()
                                .ok()
                                .filter(|n| (-253..=253).contains(n))
                                .ok_or_else(|| {
                                    src.at(
                                        t.line,
                                        format!("weight: {:?} is not -253 to 253", n.text),
                                    )
                                })?,
                        ),
                        _ => {
                            return Err(src.at(
                                t.line,
                                format!(
                                    "track_script entry {}: expected NAME [weight N]",
                                    t.written()
                                ),
                            ))
                        }
                    };
                    i.tracks.push(TrackRef {
                        script: t.key().to_string(),
                        weight,
                        line: t.line,
                    });
                }
            }
            "notify" | "notify_master" | "notify_backup" | "notify_fault" => {
                if d.args().is_empty() {
                    return Err(src.at(d.line, format!("{key}: expected a script")));
                }
                let words: Vec<&str> = d.args().iter().map(|w| w.text.as_str()).collect();
                let value = Some((words.join(" "), d.line));
                match key {
                    "notify" => i.notify.any = value,
                    "notify_master" => i.notify.master = value,
                    "notify_backup" => i.notify.backup = value,
                    _ => i.notify.fault = value,
                }
            }
            "notify_stop" => notes.add(
                src,
                d.line,
                format!(
                    "{}: lb has no separate stop script; the `notify` script is run with STOP",
                    d.written()
                ),
            ),
            "garp_master_repeat" => {
                i.garp.master_repeat = Some((int(src, d, 0..=100)? as u32, d.line))
            }
            "garp_lower_prio_repeat" => {
                i.garp.lower_prio_repeat = Some((int(src, d, 0..=100)? as u32, d.line))
            }
            "garp_master_refresh" => {
                i.garp.master_refresh_s = Some((int(src, d, 0..=86400)? as u64, d.line))
            }
            "garp_master_delay" => garp_delay(src, d, notes)?,
            "garp_master_refresh_repeat" => refresh_repeat(src, d, notes)?,
            "garp_lower_prio_delay" | "garp_interval" | "gna_interval" => {
                notes.group("garp_timing", src, d.line, key, GARP_TIMING)
            }
            "smtp_alert" => notes.group("email", src, d.line, key, EMAIL),
            other => return Err(unknown(src, d, other, "in vrrp_instance")),
        }
    }
    let (name, line) = &i.name;
    if i.interface.is_none() {
        return Err(src.at(*line, format!("vrrp_instance {name}: no interface")));
    }
    if i.vrid.is_none() {
        return Err(src.at(*line, format!("vrrp_instance {name}: no virtual_router_id")));
    }
    let interface = &i.interface.as_ref().expect("checked above").0;
    for a in &i.addresses {
        match &a.dev {
            Some(dev) if dev != interface => {
                return Err(src.at(
                    a.line,
                    format!(
                        "virtual_ipaddress {} dev {dev}: lb puts the virtual addresses on the VRRP \
                         interface ({interface}), not on another device",
                        a.address
                    ),
                ))
            }
            _ => {}
        }
    }
    if i.addresses.is_empty() {
        return Err(src.at(
            addresses_line.unwrap_or(*line),
            format!("vrrp_instance {name}: no virtual_ipaddress entry"),
        ));
    }
    match auth_type {
        None if i.auth_pass.is_some() => {
            let l = i.auth_pass.as_ref().map_or(*line, |p| p.1);
            return Err(src.at(l, "auth_pass without auth_type PASS"));
        }
        Some((t, l)) if t != "PASS" => {
            return Err(src.at(
                l,
                format!("auth_type {t}: lb speaks VRRPv2's simple password (PASS) only"),
            ))
        }
        _ => {}
    }
    if let Some((p, l)) = &i.auth_pass {
        if p.is_empty() || !p.is_ascii() {
            return Err(src.at(*l, "auth_pass: 1 to 8 ASCII characters"));
        }
        if p.len() > 8 {
            notes.add(
                src,
                *l,
                format!(
                    "auth_pass is {} characters; keepalived sent the first 8, lb is given just those ({:?})",
                    p.len(),
                    &p[..8]
                ),
            );
            i.auth_pass = Some((p[..8].to_string(), *l));
        }
    }
    Ok(i)
}

/// `ADDRESS[/LEN] [dev IFNAME] [label LABEL]`.
fn virtual_address(
    src: &Source,
    a: &Stmt,
    notes: &mut Notes,
) -> Result<VirtualAddress, ImportError> {
    let text = a.key();
    let (addr, len) = text.split_once('/').unwrap_or((text, "32"));
    let address = ipv4(src, a.line, "virtual_ipaddress", addr)?;
    let prefix = match len.parse::<u8>() {
        Ok(p) if (1..=32).contains(&p) => p,
        _ => {
            return Err(src.at(
                a.line,
                format!("virtual_ipaddress {text}: the prefix length must be 1 to 32"),
            ))
        }
    };
    let mut dev = None;
    let mut rest = a.args().iter();
    while let Some(k) = rest.next() {
        let Some(v) = rest.next() else {
            return Err(src.at(
                a.line,
                format!("virtual_ipaddress {text}: {} needs a value", k.text),
            ));
        };
        match k.text.as_str() {
            "dev" => dev = Some(v.text.clone()),
            "label" => notes.add(
                src,
                a.line,
                format!(
                    "virtual_ipaddress {text} label {}: lb adds the address without a label (scripts that look for the label will not find it)",
                    v.text
                ),
            ),
            other => {
                return Err(src.at(
                    a.line,
                    format!("virtual_ipaddress {text}: `{other}` is not translated (only dev and label are)"),
                ))
            }
        }
    }
    Ok(VirtualAddress {
        address,
        prefix,
        line: a.line,
        dev,
    })
}

impl Instance {
    fn into_vrrp(self, g: &Global) -> Vrrp {
        let garp = Garp {
            master_repeat: self.garp.master_repeat.or(g.garp.master_repeat),
            lower_prio_repeat: self.garp.lower_prio_repeat.or(g.garp.lower_prio_repeat),
            master_refresh_s: self.garp.master_refresh_s.or(g.garp.master_refresh_s),
        };
        Vrrp {
            name: self.name,
            merged: Vec::new(),
            state: self.state,
            interface: self.interface.expect("checked in read_instance"),
            vrid: self.vrid.expect("checked in read_instance"),
            priority: self.priority,
            version: self.version.or(g.version),
            advert_ms: self.advert_ms,
            nopreempt: self.nopreempt,
            preempt_delay_ms: self.preempt_delay_ms,
            auth_pass: self.auth_pass,
            unicast_src: self.unicast_src,
            peers: self.peers,
            addresses: self.addresses,
            tracks: self.tracks,
            scripts: Vec::new(),
            notify: self.notify,
            garp,
            rt_priority: g.rt_priority,
        }
    }
}

/// Adds `other`'s addresses to `vrrp` when the two instances agree on everything else: lb
/// runs one VRRP router per host, so instances whose masters could differ cannot be one.
fn merge(
    src: &Source,
    vrrp: &mut Vrrp,
    other: Instance,
    g: &Global,
    notes: &mut Notes,
) -> Result<(), ImportError> {
    let first = vrrp.name.0.clone();
    let o = other.into_vrrp(g);
    fn val<T: PartialEq + std::fmt::Debug>(v: &Option<At<T>>) -> Option<&T> {
        v.as_ref().map(|x| &x.0)
    }
    let vals = |v: &[At<Ipv4Addr>]| v.iter().map(|x| x.0).collect::<Vec<_>>();
    let differs: Option<(&str, usize)> = if o.interface.0 != vrrp.interface.0 {
        Some(("interface", o.interface.1))
    } else if val(&o.state) != val(&vrrp.state) {
        Some(("state", o.state.as_ref().map_or(o.name.1, |x| x.1)))
    } else if val(&o.priority) != val(&vrrp.priority) {
        Some(("priority", o.priority.as_ref().map_or(o.name.1, |x| x.1)))
    } else if o.version() != vrrp.version() {
        Some(("version", o.version.as_ref().map_or(o.name.1, |x| x.1)))
    } else if val(&o.advert_ms) != val(&vrrp.advert_ms) {
        Some(("advert_int", o.advert_ms.as_ref().map_or(o.name.1, |x| x.1)))
    } else if o.nopreempt.is_some() != vrrp.nopreempt.is_some() {
        Some(("nopreempt", o.nopreempt.unwrap_or(o.name.1)))
    } else if val(&o.preempt_delay_ms) != val(&vrrp.preempt_delay_ms) {
        Some((
            "preempt_delay",
            o.preempt_delay_ms.as_ref().map_or(o.name.1, |x| x.1),
        ))
    } else if val(&o.auth_pass) != val(&vrrp.auth_pass) {
        Some(("auth_pass", o.auth_pass.as_ref().map_or(o.name.1, |x| x.1)))
    } else if val(&o.unicast_src) != val(&vrrp.unicast_src) || vals(&o.peers) != vals(&vrrp.peers) {
        Some(("unicast_src_ip / unicast_peer", o.name.1))
    } else if o
        .tracks
        .iter()
        .map(|t| (&t.script, t.weight))
        .ne(vrrp.tracks.iter().map(|t| (&t.script, t.weight)))
    {
        Some((
            "track_script",
            o.tracks.first().map_or(o.name.1, |t| t.line),
        ))
    } else if o.notify != Notify::default() {
        let l = [
            &o.notify.any,
            &o.notify.master,
            &o.notify.backup,
            &o.notify.fault,
        ]
        .into_iter()
        .flatten()
        .map(|x| x.1)
        .min()
        .unwrap_or(o.name.1);
        Some(("notify", l))
    } else if o.garp != vrrp.garp {
        Some(("garp settings", o.name.1))
    } else {
        None
    };
    if let Some((what, line)) = differs {
        return Err(src.at(
            line,
            format!(
                "vrrp_instance {}: its {what} differs from vrrp_instance {first}'s; lb runs one \
                 VRRP router per host, so it merges instances only when they agree on all but \
                 their virtual_router_id and addresses (notify scripts: on the first only)",
                o.name.0
            ),
        ));
    }
    for a in &o.addresses {
        if vrrp.addresses.iter().any(|b| b.address == a.address) {
            return Err(src.at(
                a.line,
                format!(
                    "virtual_ipaddress {}: also in vrrp_instance {first}",
                    a.address
                ),
            ));
        }
    }
    notes.add(
        src,
        o.name.1,
        format!(
            "vrrp_instance {} (virtual_router_id {}) is merged into {first}'s router (virtual_router_id {}): \
             lb runs one VRRP router per host. Migrate the keepalived peers of both instances \
             together: a keepalived peer still master of {} would hold its addresses as well while this host is master",
            o.name.0, o.vrid.0, vrrp.vrid.0, o.name.0
        ),
    );
    vrrp.merged.push(o.name);
    vrrp.addresses.extend(o.addresses);
    Ok(())
}
