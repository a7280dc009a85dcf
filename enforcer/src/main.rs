//! The `enforcer` binary: a thin shell over [`enforcer::cli`].

fn main() -> std::process::ExitCode {
    enforcer::cli::main()
}
