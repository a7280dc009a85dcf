//! Rebuild the eBPF objects when bpf-linker changes (aya's template does
//! the same): the linker is part of the toolchain but cargo cannot see it.
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(e) => println!("cargo:warning=bpf-linker not found ({e}); run `cargo xtask setup`"),
    }
}
