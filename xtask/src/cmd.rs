//! Running external programs: always an argument list, never a shell, and
//! every error names the command line that failed.

use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

/// The command line as one would type it: environment assignments first.
pub fn describe(cmd: &Command) -> String {
    let envs = cmd.get_envs().filter_map(|(key, value)| {
        value.map(|value| format!("{}={}", key.display(), value.display()))
    });
    let words = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|word| word.display().to_string());
    envs.chain(words).collect::<Vec<_>>().join(" ")
}

/// Echoes `cmd`, runs it with the terminal as its output, and fails unless
/// it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = describe(cmd);
    println!("$ {line}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` quietly and returns what it printed on stdout; fails unless
/// it exits 0, quoting its stderr.
pub fn stdout(cmd: &mut Command) -> Result<String> {
    let line = describe(cmd);
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{line}`"))?;
    if !output.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    String::from_utf8(output.stdout).with_context(|| format!("`{line}` printed non-UTF-8 output"))
}
