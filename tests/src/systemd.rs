//! The systemd unit shipped in `packaging/systemd/`, for tests that check it or run the
//! agent the way it does.

use std::path::PathBuf;

/// `packaging/systemd/lb-agent.service` in this checkout.
pub fn unit_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../packaging/systemd/lb-agent.service")
}

/// The values of every `key=` line of the unit, in order (comments skipped).
pub fn unit_setting(key: &str) -> Vec<String> {
    let path = unit_path();
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with(';'))
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().to_string())
        .collect()
}

/// A setpriv command line that gives a root process what the unit gives lb-agent: only the
/// capabilities of its `CapabilityBoundingSet=` (nothing inherited) and no new privileges.
pub fn setpriv_as_unit() -> Vec<String> {
    let caps: Vec<String> = unit_setting("CapabilityBoundingSet")
        .iter()
        .flat_map(|v| v.split_whitespace())
        .map(|c| {
            let name = c
                .strip_prefix("CAP_")
                .unwrap_or_else(|| panic!("capability {c:?} in the unit"));
            format!("+{}", name.to_lowercase())
        })
        .collect();
    assert!(!caps.is_empty(), "the unit sets CapabilityBoundingSet=");
    let nnp = unit_setting("NoNewPrivileges");
    let mut argv = vec![
        "setpriv".to_string(),
        "--inh-caps=-all".to_string(),
        format!("--bounding-set=-all,{}", caps.join(",")),
    ];
    if nnp.iter().any(|v| v == "yes" || v == "true") {
        argv.push("--no-new-privs".to_string());
    }
    argv
}
