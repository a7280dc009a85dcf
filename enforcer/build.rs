//! Builds the eBPF objects (every binary of `enforcer-ebpf`) with the
//! nightly toolchain and bpf-linker, into OUT_DIR, where `src/bpf.rs`
//! embeds them. `cargo xtask setup` installs what this needs.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};
use std::io::Read as _;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("enforcer crate has no parent directory"))?
        .join("enforcer-ebpf");
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    // aya-build turns every line of the inner cargo's progress into a
    // `cargo:warning`, which cargo then replays on every build of this
    // crate. Capture its output and pass on only the build directives and
    // real compiler diagnostics.
    let mut captured = gag::BufferRedirect::stdout().context("capturing aya-build output")?;
    let built = aya_build::build_ebpf(
        [Package {
            name: "enforcer-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    );
    let mut output = String::new();
    captured.read_to_string(&mut output)?;
    drop(captured);
    for line in output.lines() {
        if built.is_err() || !is_progress(line) {
            println!("{line}");
        }
    }
    built.context("building the eBPF programs failed; run `cargo xtask setup` first")?;

    // With AYA_BUILD_SKIP=1 (host-only work such as editing the policy
    // model) nothing is built; leave empty objects so the crate still
    // compiles. Loading one fails with a clear error (see src/bpf.rs).
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR").context("OUT_DIR")?);
    for object in ["enforcer", "enforcer-facts"] {
        let path = out_dir.join(object);
        if !path.exists() {
            std::fs::write(&path, []).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(())
}

/// A forwarded progress line of the inner cargo (`Compiling …`), as
/// opposed to a directive or a diagnostic.
fn is_progress(line: &str) -> bool {
    const PROGRESS: &[&str] = &[
        "Compiling",
        "Downloaded",
        "Downloading",
        "Updating",
        "Finished",
        "Fresh",
        "Locking",
        "Adding",
        "Blocking",
        "Checking",
    ];
    line.strip_prefix("cargo:warning=")
        .map(str::trim_start)
        .is_some_and(|rest| PROGRESS.iter().any(|p| rest.starts_with(p)))
}
