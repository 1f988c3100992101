//! What a keepalived tracking script checks, so that lb's own tracking (`[vrrp.track]`) can
//! stand in for it: lb runs no tracking scripts. Recognised: a curl or wget of the VIP's
//! port (through the load balancer: `no_healthy_backend`), of this host's apiserver
//! (`local_backend_down`), and `pgrep`/`pidof`/`killall -0`/`systemctl is-active` of
//! haproxy (`dataplane_down`). Anything else in a script is an error naming its line.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use super::keepalived::{Script, Vrrp};
use super::{ImportError, Notes, Source};

/// What the rest of the translation knows, to tell one curl from another.
pub(crate) struct Context {
    /// The lb VIPs' ports (the HAProxy frontends' binds).
    pub vip_ports: Vec<u16>,
    /// The servers' ports.
    pub server_ports: Vec<u16>,
    /// keepalived's virtual addresses.
    pub vip_addresses: Vec<Ipv4Addr>,
    /// Whether an haproxy config was given (without one a localhost curl is ambiguous).
    pub haproxy: bool,
}

/// A `[vrrp.track]` weight and the comment that says where it came from.
pub(crate) type Weight = Option<(u8, String)>;

/// `[vrrp.track]` as the tracking scripts translate.
#[derive(Debug, Clone, Default)]
pub(crate) struct Track {
    pub no_healthy_backend: Weight,
    pub dataplane_down: Weight,
    pub local_backend_down: Weight,
    /// Positive script weights: added to the base priority (and taken off while failing).
    pub raise: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Watch {
    /// The VIP's port answers: some backend is healthy and the data plane forwards.
    ThroughLb,
    /// This host's own apiserver answers.
    LocalBackend,
    /// The HAProxy process is alive.
    Dataplane,
}

impl Watch {
    fn field(self) -> &'static str {
        match self {
            Watch::ThroughLb => "no_healthy_backend",
            Watch::LocalBackend => "local_backend_down",
            Watch::Dataplane => "dataplane_down",
        }
    }

    fn lb_does(self) -> &'static str {
        match self {
            Watch::ThroughLb => "while the VIP has no healthy backend",
            Watch::LocalBackend => {
                "while this host's own apiserver (a backend) is down or not ready"
            }
            Watch::Dataplane => "while the XDP program is not attached",
        }
    }
}

#[derive(Debug, Clone)]
struct Finding {
    watch: Watch,
    what: String,
}

/// `[vrrp.track]` from the instance's track_script entries.
pub(crate) fn track(
    ka: &Source,
    vrrp: &Vrrp,
    check: Option<&Source>,
    ctx: &Context,
    notes: &mut Notes,
) -> Result<Track, ImportError> {
    let mut out = Track::default();
    let scripts: Vec<&Script> = vrrp
        .tracks
        .iter()
        .filter_map(|t| vrrp.scripts.iter().find(|s| s.name == t.script))
        .collect();
    let externals = scripts.iter().filter(|s| external(s).is_some()).count();
    let mut check_used = false;
    for t in &vrrp.tracks {
        let script = vrrp
            .scripts
            .iter()
            .find(|s| s.name == t.script)
            .expect("keepalived::read checked the names");
        let (command, cline) = (&script.command.0, script.command.1);
        let findings = match external(script) {
            None => {
                let inline = inline_text(command);
                classify(ka, cline, true, &inline, ctx)?
            }
            Some(program) => {
                let matches = check.filter(|c| {
                    externals == 1
                        || c.path.file_name() == std::path::Path::new(program).file_name()
                });
                let Some(c) = matches else {
                    return Err(ka.at(
                        cline,
                        format!(
                            "vrrp_script {} runs {program}, which import cannot see: give it with \
                             --check-script FILE (lb runs no tracking scripts; import reads it to \
                             choose what lb's own tracking stands in for it)",
                            script.name
                        ),
                    ));
                };
                check_used = true;
                classify(c, 1, false, &c.text, ctx)?
            }
        };
        let weight = t
            .weight
            .or(script.weight.as_ref().map(|w| w.0))
            .unwrap_or(0);
        let (by, how) = match weight {
            w if w < 0 => (w.unsigned_abs().min(254) as u8, format!("weight {w}")),
            0 => (
                254,
                "weight 0: keepalived went to FAULT (gave the VIP up) while it failed; lb lowers \
                 its priority by 254 instead (to 1): the VIP moves when a peer is there, and \
                 stays when none is"
                    .to_string(),
            ),
            w => {
                out.raise = out.raise.saturating_add(w.min(254) as u8);
                (
                    w.min(254) as u8,
                    format!(
                        "weight +{w}: keepalived added {w} to the priority while it succeeded; lb \
                         starts {w} higher and lowers it by {w} while the condition holds"
                    ),
                )
            }
        };
        let mut watches: Vec<Watch> = findings.iter().map(|f| f.watch).collect();
        watches.dedup();
        for f in &findings {
            let slot = match f.watch {
                Watch::ThroughLb => &mut out.no_healthy_backend,
                Watch::LocalBackend => &mut out.local_backend_down,
                Watch::Dataplane => &mut out.dataplane_down,
            };
            let comment = format!(
                "vrrp_script {} ({}), {}",
                script.name,
                f.what,
                match weight {
                    w if w < 0 => format!("weight {w}"),
                    0 => "weight 0: keepalived's FAULT".into(),
                    w => format!("weight +{w}: the priority starts {w} higher"),
                }
            );
            match slot {
                Some((old, _)) if *old >= by => {}
                _ => *slot = Some((by, comment)),
            }
        }
        let whats: Vec<String> = {
            let mut w: Vec<String> = findings.iter().map(|f| f.what.clone()).collect();
            w.dedup();
            w
        };
        let instead: Vec<String> = {
            let mut seen = Vec::new();
            for w in &watches {
                if !seen.contains(w) {
                    seen.push(*w);
                }
            }
            seen.iter()
                .map(|w| format!("{} ({} = {by})", w.lb_does(), w.field()))
                .collect()
        };
        let timing = if script.timing.is_empty() {
            String::new()
        } else {
            format!(
                "; its timing ({}) has no equivalent: lb's tracking follows its own probes \
                 (health interval × fall)",
                script.timing.join(", ")
            )
        };
        notes.add_lines(
            ka,
            vec![script.line, t.line],
            format!(
                "vrrp_script {} ({}): lb runs no tracking scripts; its own tracking lowers the \
                 priority {} instead{}{timing}",
                script.name,
                whats.join("; "),
                instead.join(" and "),
                if weight >= 0 {
                    format!(" ({how})")
                } else {
                    String::new()
                }
            ),
        );
    }
    if let (Some(c), false) = (check, check_used) {
        return Err(ImportError::File {
            file: c.path.clone(),
            message: "no tracked vrrp_script runs a file of this name".into(),
        });
    }
    Ok(out)
}

/// The program a vrrp_script runs when it is a file import must be shown (None for a
/// command it can read from the line itself).
fn external(s: &Script) -> Option<&str> {
    let first = s.command.0.split_whitespace().next()?;
    if known_program(basename(first)) || is_shell_c(&s.command.0) {
        None
    } else {
        Some(first)
    }
}

fn basename(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

fn known_program(p: &str) -> bool {
    matches!(
        p,
        "curl" | "wget" | "pgrep" | "pidof" | "killall" | "systemctl"
    )
}

fn is_shell_c(command: &str) -> bool {
    let words = shlex::split(command).unwrap_or_default();
    matches!(words.as_slice(), [sh, c, _] if matches!(basename(sh), "sh" | "bash" | "dash") && c == "-c")
}

/// The text of an inline script: the command, or the string a `sh -c` runs.
fn inline_text(command: &str) -> String {
    if is_shell_c(command) {
        shlex::split(command)
            .and_then(|w| w.into_iter().nth(2))
            .unwrap_or_default()
    } else {
        command.to_string()
    }
}

/// What the script (a file, or one command line at `base` of `src`) checks.
fn classify(
    src: &Source,
    base: usize,
    inline: bool,
    text: &str,
    ctx: &Context,
) -> Result<Vec<Finding>, ImportError> {
    let mut vars: HashMap<String, String> = HashMap::new();
    let mut funcs: Vec<String> = Vec::new();
    let mut out = Vec::new();
    // (line, what, URL): told apart once all are known (see below).
    let mut urls: Vec<(usize, String, String)> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = if inline { base } else { base + i };
        let t = raw.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let t = substitute(t, &vars);
        if let Some(name) = function_name(&t) {
            funcs.push(name);
            continue;
        }
        let Some(words) = shlex::split(&t) else {
            return Err(src.at(line, "unbalanced quotes"));
        };
        for cmd in commands(words) {
            let mut cmd: &[String] = &cmd;
            while let Some(first) = cmd.first() {
                if matches!(
                    first.as_str(),
                    "if" | "elif" | "while" | "until" | "!" | "exec" | "command" | "export"
                ) {
                    cmd = &cmd[1..];
                } else if let Some((name, value)) = assignment(first) {
                    vars.insert(name, value);
                    cmd = &cmd[1..];
                } else {
                    break;
                }
            }
            let Some(prog) = cmd.first() else { continue };
            let prog = basename(prog);
            let written = cmd.join(" ");
            match prog {
                "curl" | "wget" => {
                    let Some(url) = cmd
                        .iter()
                        .find(|w| w.starts_with("https://") || w.starts_with("http://"))
                    else {
                        return Err(src.at(line, format!("{prog} without an http(s):// URL: import cannot tell what it checks")));
                    };
                    urls.push((line, format!("{prog} {url}"), url.clone()));
                }
                "pgrep" | "pidof" | "killall" => {
                    let target = cmd[1..].iter().rev().find(|w| !w.starts_with('-'));
                    match target.map(String::as_str) {
                        Some("haproxy") => out.push(Finding {
                            watch: Watch::Dataplane,
                            what: written.clone(),
                        }),
                        other => {
                            return Err(src.at(
                                line,
                                format!(
                                    "`{written}` checks the process {}: lb's tracking knows its own data plane, not other processes",
                                    other.unwrap_or("(none)")
                                ),
                            ))
                        }
                    }
                }
                "systemctl" => {
                    if cmd.iter().any(|w| w == "is-active")
                        && cmd.iter().any(|w| w == "haproxy" || w == "haproxy.service")
                    {
                        out.push(Finding {
                            watch: Watch::Dataplane,
                            what: written.clone(),
                        });
                    } else {
                        return Err(src.at(
                            line,
                            format!("`{written}`: import knows systemctl is-active haproxy only"),
                        ));
                    }
                }
                "ip" | "grep" | "echo" | "printf" | "exit" | "return" | "true" | "false" | "fi"
                | "done" | "esac" | "[" | "[[" | "test" | "set" | "sleep" | "local" | "shift"
                | "}" | "{" | "then" | "else" | "do" => {}
                p if funcs.iter().any(|f| f == p) => {}
                p => {
                    return Err(src.at(
                        line,
                        format!(
                            "`{p}`: import does not know what this checks; lb runs no tracking \
                             scripts and tracks its own probes and data plane ([vrrp.track]): \
                             translate this by hand, or drop it from track_script"
                        ),
                    ))
                }
            }
        }
    }
    // Without the haproxy config, a localhost URL at the port the script also curls on a
    // VIP is the load balancer too (the guide's earlier script curls both).
    let mut ctx = Context {
        vip_ports: ctx.vip_ports.clone(),
        server_ports: ctx.server_ports.clone(),
        vip_addresses: ctx.vip_addresses.clone(),
        haproxy: ctx.haproxy,
    };
    if !ctx.haproxy {
        for (_, _, url) in &urls {
            if let Some((host, port)) = host_port(url) {
                if host.parse().is_ok_and(|a| ctx.vip_addresses.contains(&a)) {
                    ctx.vip_ports.push(port);
                    ctx.haproxy = true;
                }
            }
        }
    }
    for (line, what, url) in urls {
        let watch = url_watch(src, line, &url, &ctx)?;
        out.push(Finding { watch, what });
    }
    if out.is_empty() {
        return Err(src.at(
            base,
            "the script checks nothing import recognises (a curl of the apiserver or the VIP, or pgrep/killall -0 haproxy)",
        ));
    }
    Ok(out)
}

/// `name() {` or `function name {`.
fn function_name(t: &str) -> Option<String> {
    let t = t.strip_prefix("function ").unwrap_or(t);
    let (name, rest) = t.split_once("()").or_else(|| {
        t.strip_suffix('{')
            .map(|n| (n.trim(), ""))
            .filter(|(n, _)| !n.contains(' '))
    })?;
    let name = name.trim();
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && matches!(rest.trim(), "" | "{");
    ok.then(|| name.to_string())
}

fn assignment(w: &str) -> Option<(String, String)> {
    let (name, value) = w.split_once('=')?;
    let ok = !name.is_empty()
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    ok.then(|| (name.to_string(), value.to_string()))
}

/// `$NAME` and `${NAME}` of the variables the script set itself.
fn substitute(t: &str, vars: &HashMap<String, String>) -> String {
    let mut s = t.to_string();
    for (k, v) in vars {
        s = s
            .replace(&format!("${{{k}}}"), v)
            .replace(&format!("${k}"), v);
    }
    s
}

/// The commands of a line: words split at `||`, `&&`, `;`, `|`, `then`, `else`, `do`.
fn commands(words: Vec<String>) -> Vec<Vec<String>> {
    let mut out = vec![Vec::new()];
    for w in words {
        let (w, semi) = match w.strip_suffix(';') {
            Some(x) if !x.is_empty() => (x.to_string(), true),
            _ => (w, false),
        };
        if matches!(w.as_str(), "||" | "&&" | ";" | "|" | "then" | "else" | "do") {
            out.push(Vec::new());
        } else {
            out.last_mut().expect("never empty").push(w);
        }
        if semi {
            out.push(Vec::new());
        }
    }
    out.retain(|c| !c.is_empty());
    out
}

/// The host and port of an http(s) URL (the scheme's port when none is written).
fn host_port(url: &str) -> Option<(String, u16)> {
    let (scheme, rest) = url.split_once("://")?;
    let hostport = rest.split(['/', '?']).next().unwrap_or("");
    let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
        let (h, p) = h.split_once(']').unwrap_or((h, ""));
        (h, p.strip_prefix(':'))
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    let port = match port {
        None if scheme == "https" => 443,
        None => 80,
        Some(p) => p.parse::<u16>().ok()?,
    };
    Some((host.to_string(), port))
}

fn url_watch(src: &Source, line: usize, url: &str, ctx: &Context) -> Result<Watch, ImportError> {
    let Some((host, port)) = host_port(url) else {
        return Err(src.at(
            line,
            format!("{url}: no port import can read (a variable the script does not set?)"),
        ));
    };
    let host = host.as_str();
    let ip = host.parse::<Ipv4Addr>().ok();
    let local = host == "localhost"
        || host == "::1"
        || ip.is_some_and(|a| a.is_loopback() || a.is_unspecified());
    let vip = ip.is_some_and(|a| ctx.vip_addresses.contains(&a));
    if ctx.haproxy {
        if (local || vip) && ctx.vip_ports.contains(&port) {
            return Ok(Watch::ThroughLb);
        }
        if local && ctx.server_ports.contains(&port) {
            return Ok(Watch::LocalBackend);
        }
        return Err(src.at(
            line,
            format!(
                "{url}: neither a VIP's port (through the load balancer: {}) nor this host's \
                 apiserver (localhost at a server's port): import cannot tell what it checks",
                ctx.vip_ports
                    .iter()
                    .map(u16::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    if vip {
        return Ok(Watch::ThroughLb);
    }
    Err(src.at(
        line,
        format!(
            "{url}: import cannot tell whether this is HAProxy's frontend or this host's \
             apiserver: give the haproxy config too (--haproxy)"
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Context {
        Context {
            vip_ports: vec![8443],
            server_ports: vec![6443],
            vip_addresses: vec![Ipv4Addr::new(198, 18, 0, 100)],
            haproxy: true,
        }
    }

    fn watches(text: &str) -> Result<Vec<Watch>, ImportError> {
        let src = Source::new("check.sh", text);
        classify(&src, 1, false, text, &ctx()).map(|f| f.into_iter().map(|f| f.watch).collect())
    }

    #[test]
    fn recognised_checks() {
        assert_eq!(
            watches("#!/bin/sh\nerrorExit() {\n  echo \"*** $*\" 1>&2\n  exit 1\n}\n\ncurl -sfk --max-time 2 https://localhost:8443/healthz -o /dev/null || errorExit \"Error GET https://localhost:8443/healthz\"\n").unwrap(),
            vec![Watch::ThroughLb]
        );
        assert_eq!(
            watches("if ip addr | grep -q 198.18.0.100; then\n  curl -sk https://198.18.0.100:8443/ -o /dev/null || exit 1\nfi\n").unwrap(),
            vec![Watch::ThroughLb]
        );
        assert_eq!(
            watches("curl -sk https://127.0.0.1:6443/livez").unwrap(),
            vec![Watch::LocalBackend]
        );
        assert_eq!(
            watches("killall -0 haproxy").unwrap(),
            vec![Watch::Dataplane]
        );
        assert_eq!(
            watches("/usr/bin/pgrep -x haproxy").unwrap(),
            vec![Watch::Dataplane]
        );
        assert_eq!(
            watches("systemctl is-active --quiet haproxy").unwrap(),
            vec![Watch::Dataplane]
        );
        // Variables the script sets itself.
        assert_eq!(
            watches("PORT=8443\nURL=\"https://localhost:${PORT}/healthz\"\ncurl -sk $URL\n")
                .unwrap(),
            vec![Watch::ThroughLb]
        );
    }

    #[test]
    fn unknown_checks_name_their_line() {
        let e = watches("#!/bin/sh\nnc -z localhost 6443\n").unwrap_err();
        assert!(e.to_string().starts_with("check.sh:2: `nc`"), "{e}");
        let e = watches("pgrep nginx").unwrap_err();
        assert!(e.to_string().contains("the process nginx"), "{e}");
        let e = watches("curl https://198.18.0.50:9999/").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("check.sh:1: https://198.18.0.50:9999/"),
            "{e}"
        );
        let e = watches("exit 0").unwrap_err();
        assert!(e.to_string().contains("nothing import recognises"), "{e}");
    }
}
