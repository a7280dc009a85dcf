//! `enforcer demo` end to end, once per datapath: the built CLI runs the
//! demo for a few seconds on a world of its own, must pass its own check
//! (trapped by the agent = queued by the kernel = target connections, and
//! every kind of connection as the policy says), and must leave nothing
//! named after it on the machine.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use enforcer::{agent::InstanceName, demo::PREFIX};
use enforcer_tests::privilege;
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// Seconds of traffic.
const DURATION: &str = "5";
/// Set-up, traffic and tear-down together.
const TIMEOUT: Duration = Duration::from_secs(60);
/// How long a demo stopped at [`TIMEOUT`] may take to clean up (stopping
/// the agent alone may take 20 s).
const GRACE: Duration = Duration::from_secs(40);

#[test]
fn demo_on_ebpf() -> Result<()> {
    demo("ebpf")
}

#[test]
fn demo_on_iptables() -> Result<()> {
    demo("iptables")
}

fn demo(datapath: &str) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let (pid, status, output) = run_demo(datapath)?;
    assert!(status.success(), "the demo failed ({status}):\n{output}");
    assert!(
        output.contains(&format!("\ndatapath: {datapath} (")),
        "the demo names the datapath in use:\n{output}"
    );
    assert!(
        output.contains(&format!("on the {datapath} datapath:\n")),
        "{output}"
    );
    assert!(output.contains("\ncheck passed\n"), "{output}");
    assert!(output.contains("nothing of the demo is left"), "{output}");

    // Everything of this run is `enfdemo<pid>` or `enfdemo<pid>-<role>`.
    let base = format!("{PREFIX}{pid}");
    let ours = |name: &str| {
        name.strip_prefix(&base)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['-', '.']))
    };
    let control_dir = Path::new(InstanceName::CONTROL_DIR);
    let temp = std::env::temp_dir();
    let mut left = Vec::new();
    for dir in [
        Path::new("/run/netns"),
        &env.cgroup2,
        &env.bpffs,
        control_dir,
        &temp,
    ] {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if ours(&name) {
                left.push(dir.join(name));
            }
        }
    }
    assert!(left.is_empty(), "the demo left {left:?} behind:\n{output}");
    Ok(())
}

/// Runs `agent demo` and returns its pid, exit status and output. A demo
/// still running at [`TIMEOUT`] gets SIGTERM (it then cleans up), and
/// SIGKILL if that does not end it.
fn run_demo(datapath: &str) -> Result<(u32, std::process::ExitStatus, String)> {
    let out_path: PathBuf = std::env::temp_dir().join(format!(
        "enforcer-demo-test-{}-{datapath}.out",
        std::process::id()
    ));
    let out = std::fs::File::create(&out_path)?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(["demo", "--duration", DURATION, "--datapath", datapath])
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .context("starting agent demo")?;
    let pid = child.id();
    let mut deadline = Instant::now() + TIMEOUT;
    let mut stopped = false;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            if stopped {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "the demo did not end, even after SIGTERM:\n{}",
                    std::fs::read_to_string(&out_path).unwrap_or_default()
                );
            }
            kill(Pid::from_raw(i32::try_from(pid)?), Signal::SIGTERM)?;
            stopped = true;
            deadline = Instant::now() + GRACE;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = std::fs::read_to_string(&out_path)?;
    std::fs::remove_file(&out_path)?;
    if stopped {
        bail!("the demo ran over {TIMEOUT:?} and was stopped with SIGTERM:\n{output}");
    }
    Ok((pid, status, output))
}
