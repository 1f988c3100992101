//! `lb-agent import`: an lb.toml from the haproxy.cfg and keepalived.conf that the kubeadm
//! HA guide (and Kubespray's, and their many copies) tell people to write.
//!
//! Pure code: the files come in as text, the lb.toml goes out as text, with one comment for
//! everything the original did that lb does differently (`Note`, also one line on stderr).
//! Anything it cannot translate is an error naming the file and line: a guess that looks
//! like a translation is worse than a refusal.
//!
//! Where things live: `keepalived` (its tokenizer, global_defs, vrrp_script, vrrp_instance),
//! `haproxy` (sections and lines; frontend + backend pairs and listen blocks), `script`
//! (what a tracking script checks, so lb's own tracking can stand in for it), `render` (the
//! TOML text). The tests parse every output with the config loader `check-config` uses.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

mod haproxy;
mod keepalived;
mod render;
mod script;

#[cfg(test)]
mod tests;

/// One input file, read.
#[derive(Debug, Clone)]
pub struct Source {
    /// As the operator named it (errors and comments show it so).
    pub path: PathBuf,
    /// Its contents.
    pub text: String,
}

impl Source {
    /// Reads `path`; a failure names the file.
    pub fn read(path: &Path) -> Result<Source, ImportError> {
        let text = std::fs::read_to_string(path).map_err(|e| ImportError::File {
            file: path.to_path_buf(),
            message: format!("cannot read: {e}"),
        })?;
        Ok(Source {
            path: path.to_path_buf(),
            text,
        })
    }

    /// A source for tests and callers that have the text already.
    pub fn new(path: impl Into<PathBuf>, text: impl Into<String>) -> Source {
        Source {
            path: path.into(),
            text: text.into(),
        }
    }

    fn at(&self, line: usize, message: impl Into<String>) -> ImportError {
        ImportError::At {
            file: self.path.clone(),
            line,
            message: message.into(),
        }
    }
}

/// What `lb-agent import` was given.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    /// haproxy.cfg.
    pub haproxy: Option<Source>,
    /// keepalived.conf.
    pub keepalived: Option<Source>,
    /// The script a `vrrp_script` runs (the guide's check_apiserver.sh).
    pub check_script: Option<Source>,
    /// The LB host's NIC: agent.interface and where VRRP runs (default: keepalived's).
    pub interface: Option<String>,
}

/// The translation: lb.toml text and the differences it comments on.
#[derive(Debug, Clone)]
pub struct Imported {
    /// The lb.toml, comments included.
    pub toml: String,
    /// What the original did that lb does differently; each is also a comment in `toml`.
    pub notes: Vec<Note>,
}

/// Why nothing was translated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImportError {
    /// A line of an input that import cannot translate.
    #[error("{}:{line}: {message}", file.display())]
    At {
        /// The input file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong, and what to do about it.
        message: String,
    },
    /// A whole input file (unreadable, or lacking something).
    #[error("{}: {message}", file.display())]
    File {
        /// The input file.
        file: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The command line does not give what the translation needs.
    #[error("{0}")]
    Usage(String),
}

/// One thing the original did that lb does differently (or not at all).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// The file, and the lines of it, the note is about; None for the inputs as a whole.
    pub origin: Option<(PathBuf, Vec<usize>)>,
    /// One line: what the original did, and what lb does instead.
    pub text: String,
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.origin {
            None => write!(f, "{}", self.text),
            Some((file, lines)) if lines.is_empty() => {
                write!(f, "{}: {}", file.display(), self.text)
            }
            Some((file, lines)) => {
                let lines: Vec<String> = lines.iter().map(usize::to_string).collect();
                write!(f, "{}:{}: {}", file.display(), lines.join(","), self.text)
            }
        }
    }
}

/// Notes as they are found; several directives of one kind (HTTP-mode options, logging)
/// make one note, so stderr has one line per kind of difference rather than per line.
#[derive(Debug, Default)]
pub(crate) struct Notes {
    items: Vec<NoteItem>,
}

#[derive(Debug)]
struct NoteItem {
    file: Option<PathBuf>,
    lines: Vec<usize>,
    group: Option<&'static str>,
    directives: Vec<String>,
    text: String,
}

impl Notes {
    /// A note about `line` of `src`.
    pub(crate) fn add(&mut self, src: &Source, line: usize, text: impl Into<String>) {
        self.items.push(NoteItem {
            file: Some(src.path.clone()),
            lines: vec![line],
            group: None,
            directives: Vec::new(),
            text: text.into(),
        });
    }

    /// A note about several lines of `src`.
    pub(crate) fn add_lines(
        &mut self,
        src: &Source,
        mut lines: Vec<usize>,
        text: impl Into<String>,
    ) {
        lines.dedup();
        self.items.push(NoteItem {
            file: Some(src.path.clone()),
            lines,
            group: None,
            directives: Vec::new(),
            text: text.into(),
        });
    }

    /// A note about the inputs as a whole.
    pub(crate) fn general(&mut self, text: impl Into<String>) {
        self.items.push(NoteItem {
            file: None,
            lines: Vec::new(),
            group: None,
            directives: Vec::new(),
            text: text.into(),
        });
    }

    /// `directive` at `line` joins the note of its `group` in `src` (made with `text`).
    pub(crate) fn group(
        &mut self,
        group: &'static str,
        src: &Source,
        line: usize,
        directive: &str,
        text: &str,
    ) {
        let item = match self
            .items
            .iter_mut()
            .position(|n| n.group == Some(group) && n.file.as_deref() == Some(&*src.path))
        {
            Some(i) => &mut self.items[i],
            None => {
                self.items.push(NoteItem {
                    file: Some(src.path.clone()),
                    lines: Vec::new(),
                    group: Some(group),
                    directives: Vec::new(),
                    text: text.to_string(),
                });
                self.items.last_mut().expect("just pushed")
            }
        };
        if !item.lines.contains(&line) {
            item.lines.push(line);
        }
        if !item.directives.iter().any(|d| d == directive) {
            item.directives.push(directive.to_string());
        }
    }

    pub(crate) fn finish(self) -> Vec<Note> {
        self.items
            .into_iter()
            .map(|mut n| {
                n.lines.sort_unstable();
                n.lines.dedup();
                let text = if n.directives.is_empty() {
                    n.text
                } else {
                    format!("{}: {}", n.directives.join(", "), n.text)
                };
                Note {
                    origin: n.file.map(|f| (f, n.lines)),
                    text,
                }
            })
            .collect()
    }
}

/// A value and the line it came from.
pub(crate) type At<T> = (T, usize);

/// Translates the inputs into an lb.toml.
pub fn import(inputs: &Inputs) -> Result<Imported, ImportError> {
    if inputs.haproxy.is_none() && inputs.keepalived.is_none() {
        return Err(ImportError::Usage(
            "nothing to import: give --haproxy FILE, --keepalived FILE, or both".into(),
        ));
    }
    if let (Some(s), None) = (&inputs.check_script, &inputs.keepalived) {
        return Err(ImportError::Usage(format!(
            "--check-script {}: only read with --keepalived FILE (the vrrp_script that runs it)",
            s.path.display()
        )));
    }
    if let Some(i) = &inputs.interface {
        crate::config::validate_ifname(i.clone())
            .map_err(|m| ImportError::Usage(format!("--interface: {m}")))?;
    }
    let mut notes = Notes::default();
    let vrrp = match &inputs.keepalived {
        Some(src) => keepalived::read(src, &mut notes)?,
        None => None,
    };
    let vip_addresses: Vec<At<Ipv4Addr>> = vrrp
        .as_ref()
        .map(|v| v.addresses.iter().map(|a| (a.address, a.line)).collect())
        .unwrap_or_default();
    let services = match &inputs.haproxy {
        Some(src) => haproxy::read(src, &mut notes)?,
        None => Vec::new(),
    };
    let vips = resolve_vips(inputs, &services, &vip_addresses, &mut notes)?;
    let track = match (&vrrp, &inputs.keepalived) {
        (Some(v), Some(ka)) => Some(script::track(
            ka,
            v,
            inputs.check_script.as_ref(),
            &script::Context {
                vip_ports: vips.iter().map(|v| v.port.0).collect(),
                server_ports: services
                    .iter()
                    .flat_map(|s| s.servers.iter().filter_map(|b| b.port))
                    .collect(),
                vip_addresses: vip_addresses.iter().map(|a| a.0).collect(),
                haproxy: inputs.haproxy.is_some(),
            },
            &mut notes,
        )?),
        _ => {
            if let Some(s) = &inputs.check_script {
                return Err(ImportError::File {
                    file: s.path.clone(),
                    message: "no vrrp_script in the keepalived config runs it".into(),
                });
            }
            None
        }
    };
    if let (None, Some(ka)) = (&vrrp, &inputs.keepalived) {
        return Err(ImportError::File {
            file: ka.path.clone(),
            message: "no vrrp_instance: nothing to translate".into(),
        });
    }
    let interface = match (&inputs.interface, &vrrp) {
        (Some(i), Some(v)) => {
            if *i != v.interface.0 {
                notes.add(
                    inputs.keepalived.as_ref().expect("vrrp comes from keepalived"),
                    v.interface.1,
                    format!(
                        "keepalived ran VRRP on {}; lb runs it on --interface {i}, where XDP attaches",
                        v.interface.0
                    ),
                );
            }
            render::Origin::Flag(i.clone())
        }
        (Some(i), None) => render::Origin::Flag(i.clone()),
        (None, Some(v)) => render::Origin::Line(v.interface.0.clone(), v.interface.1),
        (None, None) => return Err(ImportError::Usage(
            "the haproxy config does not say which NIC the VIP arrives on: give --interface NAME"
                .into(),
        )),
    };
    if inputs.haproxy.is_none() {
        notes.general(
            "no --haproxy: the [[vip]] sections (port, backends) are left for you to write; \
             check-config refuses the file until they are there",
        );
    }
    let notes = notes.finish();
    let toml = render::render(
        &render::Plan {
            inputs,
            interface,
            services: &services,
            vips: &vips,
            vrrp: vrrp.as_ref(),
            track: track.as_ref(),
        },
        &notes,
    );
    Ok(Imported { toml, notes })
}

/// One lb VIP: a bind of a frontend (or listen) at one address.
#[derive(Debug, Clone)]
pub(crate) struct Vip {
    pub name: String,
    /// Index into the services.
    pub service: usize,
    /// The address and where it came from: the bind line, or keepalived's virtual_ipaddress.
    pub address: (Ipv4Addr, AddressFrom),
    pub port: At<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AddressFrom {
    Bind(usize),
    Keepalived(usize),
}

/// Each bind of each frontend at each of its addresses: a bind to `*` serves every
/// virtual address keepalived moves.
fn resolve_vips(
    inputs: &Inputs,
    services: &[haproxy::Service],
    vip_addresses: &[At<Ipv4Addr>],
    notes: &mut Notes,
) -> Result<Vec<Vip>, ImportError> {
    let Some(src) = &inputs.haproxy else {
        return Ok(Vec::new());
    };
    let mut out: Vec<Vip> = Vec::new();
    for (si, s) in services.iter().enumerate() {
        let mut mine = Vec::new();
        for b in &s.binds {
            match b.address {
                Some(a) => {
                    if inputs.keepalived.is_some() && !vip_addresses.iter().any(|v| v.0 == a) {
                        notes.add(
                            src,
                            b.line,
                            format!(
                                "{a} is not one of keepalived's virtual addresses: lb serves it, \
                                 but VRRP does not move it (packets for it must reach this host)"
                            ),
                        );
                    }
                    mine.push((a, AddressFrom::Bind(b.line), b.port, b.line));
                }
                None if vip_addresses.is_empty() => {
                    return Err(src.at(
                        b.line,
                        format!(
                            "bind *:{0} listens on every address; the VIP's address comes from \
                             keepalived's virtual_ipaddress: give --keepalived FILE too (or write \
                             bind ADDRESS:{0})",
                            b.port
                        ),
                    ))
                }
                None => {
                    for (a, line) in vip_addresses {
                        if !mine.iter().any(|m: &(Ipv4Addr, AddressFrom, u16, usize)| {
                            m.0 == *a && m.2 == b.port
                        }) {
                            mine.push((*a, AddressFrom::Keepalived(*line), b.port, b.line));
                        }
                    }
                }
            }
        }
        let many = mine.len() > 1;
        for (i, (address, from, port, line)) in mine.into_iter().enumerate() {
            if let Some(other) = out
                .iter()
                .find(|v| v.address.0 == address && v.port.0 == port)
            {
                return Err(src.at(
                    line,
                    format!(
                        "{address}:{port} is served by {} already (at line {}): one VIP, one backend list",
                        other.name, other.port.1
                    ),
                ));
            }
            let name = if many {
                format!("{}-{}", s.name, i + 1)
            } else {
                s.name.clone()
            };
            if name.len() > lb_common::NAME_LEN - 1 {
                return Err(src.at(
                    s.origin.1,
                    format!(
                        "{}: lb's VIP names are at most {} bytes ({name:?})",
                        s.origin.0,
                        lb_common::NAME_LEN - 1
                    ),
                ));
            }
            if let Some(other) = out.iter().find(|v| v.name == name) {
                return Err(src.at(
                    s.origin.1,
                    format!(
                        "{}: its VIP would be named {name:?}, as the one from {} is; rename one",
                        s.origin.0, services[other.service].origin.0
                    ),
                ));
            }
            out.push(Vip {
                name,
                service: si,
                address: (address, from),
                port: (port, line),
            });
        }
    }
    Ok(out)
}

/// Whole milliseconds of a keepalived or HAProxy time written as decimal seconds
/// ("1", "0.1", "2.5"); None when not a number or finer than a millisecond.
pub(crate) fn decimal_seconds_ms(s: &str) -> Option<u64> {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    if !int.bytes().all(|c| c.is_ascii_digit()) || !frac.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let frac = frac.trim_end_matches('0');
    if frac.len() > 3 {
        return None;
    }
    let int: u64 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let frac_ms: u64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<3}").parse().ok()?
    };
    int.checked_mul(1000)?.checked_add(frac_ms)
}
