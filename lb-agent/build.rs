//! Builds the XDP object (lb-ebpf) with nightly for bpfel-unknown-none so the agent can embed
//! it: one binary is all an LB host needs. `cargo xtask build` installs what this needs.

use std::{env, path::PathBuf, process::Command};

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().to_path_buf();
    let ebpf = root.join("lb-ebpf");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    for p in [
        "lb-ebpf/src",
        "lb-ebpf/Cargo.toml",
        "lb-ebpf/Cargo.lock",
        "lb-common/src",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    // v3: atomic fetch-and-add (kernel >= 5.12) for the SNAT port ring.
    // A target dir of its own: the outer cargo holds the workspace's lock.
    let target_dir = root.join("target").join("bpf");
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "build", "--release", "--locked"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(&ebpf)
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "--cfg=bpf_target_arch=\"x86_64\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf\x1f-Ctarget-cpu=v3",
        );
    for key in [
        "RUSTC",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "RUSTFLAGS",
        "RUSTUP_TOOLCHAIN",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO",
    ] {
        cmd.env_remove(key);
    }
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("lb-agent build: cannot run rustup to build lb-ebpf ({e}); run `cargo xtask build`, which installs the toolchain")
    });
    if !status.success() {
        panic!(
            "lb-agent build: building the XDP object (lb-ebpf) failed; it needs nightly with rust-src and bpf-linker: `cargo xtask build` installs both"
        );
    }
    let obj = target_dir.join("bpfel-unknown-none/release/lb-ebpf");
    std::fs::copy(&obj, out.join("lb-ebpf.o"))
        .unwrap_or_else(|e| panic!("copy {}: {e}", obj.display()));
}
