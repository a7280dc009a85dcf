//! Rust toolchain steps: the nightly toolchain, its `rust-src`, and a
//! bpf-linker built against the nightly's own LLVM (TOOLCHAIN.md step 2).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, anyhow, bail};

use super::{Host, Outcome};
use crate::cmd;

/// The bpf-linker release the recipe in TOOLCHAIN.md was verified with.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Looks for the toolchain that `+nightly` names, in the list rather than
/// by running it: running a missing toolchain may make rustup download it.
pub fn nightly(_: &Host) -> Result<Outcome> {
    let toolchains = cmd::stdout(Command::new("rustup").args(["toolchain", "list"]))?;
    let mut names = toolchains
        .lines()
        .filter_map(|line| line.split_whitespace().next());
    match names.find(|name| is_nightly_channel(name)) {
        Some(name) => Ok(Outcome::Ready(name.to_string())),
        None => bail!(
            "no nightly toolchain is installed, and it cannot be fetched on this machine; \
             the eBPF crate needs one (1.97, LLVM 22): install it where the network allows \
             with `rustup toolchain install nightly --component rust-src`"
        ),
    }
}

/// `nightly` or `nightly-<host>`, but not a dated `nightly-2026-05-19-…`,
/// which `+nightly` does not select.
fn is_nightly_channel(name: &str) -> bool {
    name == "nightly"
        || name
            .strip_prefix("nightly-")
            .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
}

pub fn rust_src(_: &Host) -> Result<Outcome> {
    let installed = cmd::stdout(&mut rustup_nightly(["component", "list", "--installed"]))?;
    if installed.lines().any(|line| line.trim() == "rust-src") {
        return Ok(Outcome::Ready("installed for nightly".into()));
    }
    cmd::run(&mut rustup_nightly(["component", "add", "rust-src"]))?;
    Ok(Outcome::Fixed("added to nightly".into()))
}

/// `rustup ARGS --toolchain nightly`.
fn rustup_nightly<const N: usize>(args: [&str; N]) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(args).args(["--toolchain", "nightly"]);
    cmd
}

/// bpf-linker finds libLLVM only through the `LD_LIBRARY_PATH` that
/// `rustup run nightly` sets; aya-build runs it that way, so check it so.
pub fn bpf_linker(_: &Host) -> Result<Outcome> {
    if let Ok(version) = linker_version() {
        return Ok(Outcome::Ready(version));
    }
    let major = nightly_llvm_major()?;
    let prefix = llvm_prefix(&major)?;
    println!(
        "  ...      bpf-linker: building {BPF_LINKER_VERSION} against nightly's LLVM {major} \
         (takes about 2 minutes)"
    );
    cmd::run(
        Command::new("cargo")
            .env("LLVM_PREFIX", &prefix)
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{major}"),
            ]),
    )?;
    let version = linker_version().context("bpf-linker was installed but does not run")?;
    Ok(Outcome::Fixed(version))
}

fn linker_version() -> Result<String> {
    let version =
        cmd::stdout(Command::new("rustup").args(["run", "nightly", "bpf-linker", "--version"]))?;
    Ok(version.trim().to_string())
}

/// The LLVM major version of the nightly rustc.
fn nightly_llvm_major() -> Result<String> {
    let verbose = cmd::stdout(Command::new("rustc").args(["+nightly", "-vV"]))?;
    llvm_major(&verbose)
        .map(str::to_string)
        .ok_or_else(|| anyhow!("`rustc +nightly -vV` names no LLVM version:\n{verbose}"))
}

/// "22" from `rustc -vV` output with a line "LLVM version: 22.1.4".
fn llvm_major(verbose: &str) -> Option<&str> {
    verbose
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .and_then(|version| version.split('.').next())
}

/// Makes `$HOME/.cache/bpf-linker-llvm/lib/libLLVM.so` point at the
/// nightly's own libLLVM of that major version and returns the prefix, for
/// bpf-linker's `LLVM_PREFIX`.
fn llvm_prefix(major: &str) -> Result<PathBuf> {
    let library = nightly_libllvm(major)?;
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let prefix = Path::new(&home).join(".cache/bpf-linker-llvm");
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    let link = lib.join("libLLVM.so");
    if link.symlink_metadata().is_ok() {
        std::fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
    }
    std::os::unix::fs::symlink(&library, &link)
        .with_context(|| format!("linking {} to {}", link.display(), library.display()))?;
    Ok(prefix)
}

/// The nightly sysroot's `lib/libLLVM.so.<major>.…` (the exact name carries
/// the rust version, so it is looked up rather than spelled out).
fn nightly_libllvm(major: &str) -> Result<PathBuf> {
    let sysroot = cmd::stdout(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let wanted = format!("libLLVM.so.{major}.");
    let entries = std::fs::read_dir(&lib).with_context(|| format!("listing {}", lib.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", lib.display()))?;
        if entry.file_name().to_string_lossy().starts_with(&wanted) {
            return Ok(entry.path());
        }
    }
    bail!(
        "no {wanted}* in {}: the nightly ships no LLVM {major} library",
        lib.display()
    )
}

#[cfg(test)]
mod tests {
    use super::{is_nightly_channel, llvm_major};

    #[test]
    fn recognises_the_toolchain_plus_nightly_selects() {
        assert!(is_nightly_channel("nightly-x86_64-unknown-linux-gnu"));
        assert!(is_nightly_channel("nightly"));
        assert!(!is_nightly_channel(
            "nightly-2026-05-19-x86_64-unknown-linux-gnu"
        ));
        assert!(!is_nightly_channel("stable-x86_64-unknown-linux-gnu"));
    }

    #[test]
    fn reads_the_llvm_major_from_rustc_verbose_version() {
        let verbose = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nhost: x86_64-unknown-linux-gnu\nLLVM version: 22.1.4\n";
        assert_eq!(llvm_major(verbose), Some("22"));
        assert_eq!(llvm_major("rustc 1.97.0\n"), None);
    }
}
