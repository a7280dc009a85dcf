//! The agent binary, built inside the test crate so that behavioural tests
//! find it as `CARGO_BIN_EXE_agent`.

fn main() -> std::process::ExitCode {
    enforcer::cli::main()
}
