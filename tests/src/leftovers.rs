//! What a test run left on the machine. Every harness object carries
//! [`NAME_PREFIX`](crate::NAME_PREFIX); after a run, none may remain.

use std::path::Path;

use anyhow::Result;

use crate::NAME_PREFIX;

/// Namespaces, cgroups and bpffs pins whose names carry the harness
/// prefix, as `kind: name` lines.
pub fn find(cgroup2: &Path, bpffs: &Path) -> Result<Vec<String>> {
    let mut found = Vec::new();
    for (kind, dir) in [
        ("netns", Path::new("/run/netns")),
        ("cgroup", cgroup2),
        ("pin", bpffs),
    ] {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.starts_with(NAME_PREFIX) {
                found.push(format!("{kind}: {}", dir.join(name).display()));
            }
        }
    }
    Ok(found)
}
