//! `cargo xtask package`'s .deb, installed with dpkg on this machine and purged again: the
//! binary runs, the man page is found, systemd accepts the unit, the example config is a
//! conffile, nothing is enabled or started, and a purge leaves nothing behind.
//!
//! The package is built from the debug binary the test run already has (`xtask package
//! --binary`), not a release build. Needs root; refuses to touch a host that already has an
//! lb-agent of its own.

use std::{
    io::ErrorKind,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Instant,
};

use lb_tests::{lab::bin, netns::unique_id};

const VERSION: &str = env!("CARGO_PKG_VERSION");
const UNIT: &str = "/lib/systemd/system/lb-agent.service";
const CONFIG: &str = "/etc/lb/lb.toml";
const WANTS: &str = "/etc/systemd/system/multi-user.target.wants/lb-agent.service";
/// What the package installs, all gone after a purge.
const FILES: &[&str] = &[
    "/usr/sbin/lb-agent",
    UNIT,
    CONFIG,
    "/usr/share/man/man8/lb-agent.8.gz",
    "/usr/share/bash-completion/completions/lb-agent",
    "/usr/share/zsh/vendor-completions/_lb-agent",
    "/usr/share/fish/vendor_completions.d/lb-agent.fish",
    "/usr/share/doc/lb-agent/copyright",
    "/usr/share/doc/lb-agent/changelog.Debian.gz",
];

fn ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn sh(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn ok(cmd: &mut Command) -> String {
    let out = sh(cmd);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?}: {}\n{text}", out.status);
    text
}

/// dpkg's idea of the package: None when it has never heard of it.
fn dpkg_status() -> Option<String> {
    let out = sh(Command::new("dpkg-query").args(["-W", "--showformat=${Status}", "lb-agent"]));
    let status = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !status.is_empty() && !status.ends_with("not-installed"))
        .then_some(status)
}

/// A scratch directory, removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Purges the package when dropped, also when the test fails half way.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        if dpkg_status().is_some() {
            let out = sh(Command::new("dpkg").args(["--purge", "lb-agent"]));
            if !out.status.success() {
                eprintln!(
                    "dpkg --purge lb-agent failed: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}

/// Runs a tool the test needs; None (with a SKIP line) when it is missing outside CI.
fn tool(cmd: &mut Command, package: &str) -> Option<Output> {
    match cmd.stdin(Stdio::null()).output() {
        Ok(out) => Some(out),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            assert!(
                !ci(),
                "{cmd:?}: not found and CI=true (Debian package {package}; cargo xtask test installs it)"
            );
            eprintln!("SKIP part of deb_package: {cmd:?} not found (Debian package {package})");
            None
        }
        Err(e) => panic!("running {cmd:?}: {e}"),
    }
}

/// The host has no lb-agent of its own that installing and purging the package would
/// overwrite or remove.
fn refuse_to_clobber() {
    if let Some(status) = dpkg_status() {
        panic!(
            "a package lb-agent is already on this host ({status}): refusing to install over it"
        );
    }
    for path in [FILES[0], UNIT, CONFIG, WANTS] {
        assert!(
            std::fs::symlink_metadata(path).is_err(),
            "{path} exists and is not from this test: refusing to install the package over it"
        );
    }
}

/// Processes running /usr/sbin/lb-agent.
fn running_installed_agent() -> Vec<String> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(exe) = std::fs::read_link(entry.path().join("exe")) {
            if exe.to_string_lossy().starts_with(FILES[0]) {
                pids.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
    }
    pids
}

#[test]
fn the_deb_installs_checks_out_and_purges_clean() {
    if !is_root() {
        assert!(
            !ci(),
            "deb_package needs root (dpkg -i) and CI=true: refusing to skip"
        );
        eprintln!("SKIP the_deb_installs_checks_out_and_purges_clean: needs root (dpkg -i)");
        return;
    }
    let start = Instant::now();
    refuse_to_clobber();

    // Build it from the binary this run has.
    let dir = TempDir(std::env::temp_dir().join(format!("lb-deb-{}", unique_id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let agent = bin("lb-agent");
    let built = sh(Command::new(&cargo)
        .current_dir(&root)
        .args(["run", "--quiet", "--package", "xtask", "--", "package"])
        .arg("--binary")
        .arg(&agent)
        .arg("--out")
        .arg(&dir.0));
    let out = String::from_utf8_lossy(&built.stdout);
    assert!(
        built.status.success(),
        "xtask package: {}\n{out}{}",
        built.status,
        String::from_utf8_lossy(&built.stderr)
    );
    let deb = PathBuf::from(out.trim());
    let arch = ok(Command::new("dpkg").arg("--print-architecture"));
    assert_eq!(
        deb,
        dir.0
            .join(format!("lb-agent_{VERSION}_{}.deb", arch.trim())),
        "xtask package prints the .deb's path:\n{out}"
    );
    println!("built {} in {:?}", deb.display(), start.elapsed());

    let _installed = Installed;
    let install = ok(Command::new("dpkg")
        .arg("-i")
        .arg(&deb)
        .env("DEBIAN_FRONTEND", "noninteractive"));
    println!("dpkg -i:\n{install}");
    assert!(
        install.contains("not enabled or started"),
        "the postinst says the service waits for the config:\n{install}"
    );
    assert!(dpkg_status().is_some_and(|s| s == "install ok installed"));
    for f in FILES {
        assert!(Path::new(f).is_file(), "{f} installed");
    }

    // The binary, from where the unit runs it.
    let version = ok(Command::new(FILES[0]).arg("--version"));
    assert_eq!(version.trim(), format!("lb-agent {VERSION}"));

    // The man page, where man looks.
    if let Some(out) = tool(Command::new("man").args(["-w", "lb-agent"]), "man-db") {
        let path = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "man -w lb-agent: {}", out.status);
        assert_eq!(path.trim(), "/usr/share/man/man8/lb-agent.8.gz");
    }

    // systemd accepts the installed unit (offline: PID 1 need not be systemd).
    if let Some(out) = tool(
        Command::new("systemd-analyze").args(["verify", UNIT]),
        "systemd",
    ) {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "systemd-analyze verify {UNIT}:\n{text}"
        );
        let ours: Vec<&str> = text.lines().filter(|l| l.contains("lb-agent")).collect();
        assert!(
            ours.is_empty(),
            "systemd-analyze warns about the unit:\n{text}"
        );
    }

    // The example config is a conffile, and needs editing before the agent takes it.
    let conffiles =
        ok(Command::new("dpkg-query").args(["-W", "--showformat=${Conffiles}", "lb-agent"]));
    assert!(
        conffiles.lines().any(|l| l.trim().starts_with(CONFIG)),
        "{CONFIG} is a conffile: {conffiles:?}"
    );
    // As shipped the agent refuses it (status 2); with a CA file it names the interface
    // to edit; with an interface too it is a config the agent takes.
    let check = |path: &Path| {
        sh(Command::new(FILES[0])
            .arg("check-config")
            .arg("--config")
            .arg(path))
    };
    let shipped = check(Path::new(CONFIG));
    assert_eq!(
        shipped.status.code(),
        Some(2),
        "the example as shipped: {}",
        String::from_utf8_lossy(&shipped.stderr)
    );
    let text = std::fs::read_to_string(CONFIG).unwrap();
    let ca = dir.0.join("ca.crt");
    std::fs::write(&ca, lb_tests::tls::generate_pki(&[]).unwrap().ca_cert).unwrap();
    let with_ca = text.replace("/etc/kubernetes/pki/ca.crt", ca.to_str().unwrap());
    let edited = dir.0.join("lb.toml");
    std::fs::write(&edited, &with_ca).unwrap();
    let out = check(&edited);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("agent.interface"), "{err}");
    std::fs::write(&edited, with_ca.replace("\"EDIT-ME\"", "\"lo\"")).unwrap();
    let out = check(&edited);
    assert!(
        out.status.success(),
        "the example with an interface and a CA file: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Neither enabled nor started.
    assert!(
        std::fs::symlink_metadata(WANTS).is_err(),
        "{WANTS}: the package enabled the service"
    );
    assert_eq!(
        running_installed_agent(),
        Vec::<String>::new(),
        "an agent runs"
    );

    let bash = std::fs::read_to_string(FILES[4]).unwrap();
    assert!(
        bash.contains("lb-agent"),
        "the bash completion is lb-agent's"
    );

    let purge = ok(Command::new("dpkg").args(["--purge", "lb-agent"]));
    println!("dpkg --purge:\n{purge}");
    assert_eq!(dpkg_status(), None, "purged");
    for f in FILES.iter().chain(&["/etc/lb", "/usr/share/doc/lb-agent"]) {
        assert!(
            std::fs::symlink_metadata(f).is_err(),
            "{f} left behind by the purge"
        );
    }
    println!("deb_package: {:?}", start.elapsed());
}
