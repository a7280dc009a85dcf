//! net_cls class ids: how the iptables datapath recognises the outgoing
//! traffic of a linux-process PU whose cgroup is a cgroup v1 net_cls
//! cgroup (`[cgroups] version = "v1"`), where `-m cgroup --path` (cgroup
//! v2 only) cannot.
//!
//! Each such PU gets a class id of its own, numbered the seed's way: the
//! tc handle `1111:<100 + n>`, i.e. `0x1111 << 16 | (100 + n)` for the
//! `n`-th PU (the lowest free `n` is taken). The agent writes it to
//! `net_cls.classid` of the PU's cgroup and of every cgroup below it (a
//! new child cgroup inherits its parent's id; existing ones do not), the
//! kernel stamps it on every socket created there, and the PU's hook
//! matches `-m cgroup --cgroup <class id>`. A PU keeps its id across
//! updates; delete and cleanup write 0 back.
//!
//! The cgroups written are recorded in a file of the agent instance
//! (`/run/enforcer/<instance>.net_cls`) before any is written, so that a
//! `run` or `cleanup` after a crash can reset them: a class id left on a
//! cgroup the next run no longer manages would make its traffic pass for
//! whichever PU gets that id next. A reset writes 0 only where the id is
//! still the recorded one, so a cgroup someone else changed since is left
//! alone.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{DatapathError, Result};
use crate::policy::{CgroupPath, PuId};

/// The tc major number of every class id the agent assigns (the seed's
/// `0x1111` base).
pub const MAJOR: u32 = 0x1111;
/// The minor number of the first PU (the seed's `100 + n`).
pub const FIRST_MINOR: u32 = 100;
/// How many PUs can have a class id at once: minors 100..=0xffff.
pub const CAPACITY: usize = (0xffff - FIRST_MINOR + 1) as usize;

/// The file in each cgroup that holds its class id.
const CLASSID_FILE: &str = "net_cls.classid";

/// A net_cls class id the agent assigned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ClassId(u32);

impl ClassId {
    /// The `n`-th id, if `n` is below [`CAPACITY`].
    pub fn nth(n: usize) -> Option<Self> {
        let minor = u32::try_from(n).ok()?.checked_add(FIRST_MINOR)?;
        (minor <= 0xffff).then_some(Self(MAJOR << 16 | minor))
    }

    pub fn value(self) -> u32 {
        self.0
    }
}

/// Decimal, as `iptables-save` prints `--cgroup` (and as
/// `net_cls.classid` reads).
impl fmt::Display for ClassId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One cgroup tree that carries a class id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    class_id: ClassId,
    /// The PU's cgroup directory (absolute).
    cgroup: PathBuf,
}

/// The class ids of the PUs, the cgroups they are written to, and the
/// record of those on disk. With no net_cls mount (PU cgroups are cgroup
/// v2), it assigns nothing and only resets what a record names.
#[derive(Debug)]
pub struct ClassIds {
    /// The net_cls v1 mount PU cgroups are relative to; `None`: cgroup v2.
    mount: Option<PathBuf>,
    record: PathBuf,
    assigned: BTreeMap<PuId, Entry>,
}

impl ClassIds {
    pub fn new(mount: Option<PathBuf>, record: PathBuf) -> Self {
        Self {
            mount,
            record,
            assigned: BTreeMap::new(),
        }
    }

    /// Whether PU cgroups are net_cls v1 cgroups (matched by class id).
    pub fn enabled(&self) -> bool {
        self.mount.is_some()
    }

    /// The class id of PU `id`, if it has one.
    pub fn get(&self, id: &PuId) -> Option<ClassId> {
        self.assigned.get(id).map(|e| e.class_id)
    }

    /// Resets every cgroup the record names and removes the record, then
    /// forgets every assignment: for `run` (a previous instance may have
    /// crashed) and `cleanup`. Best effort; each failure is logged.
    pub fn reset_all(&mut self) {
        let recorded = match read_record(&self.record) {
            Ok(entries) => entries,
            Err(e) => {
                warn!(
                    "reading the net_cls record {}: {e:#}",
                    self.record.display()
                );
                Vec::new()
            }
        };
        let mine = std::mem::take(&mut self.assigned).into_values();
        for entry in recorded.into_iter().chain(mine) {
            reset(&entry);
        }
        if let Err(e) = remove_file(&self.record) {
            warn!("removing the net_cls record {}: {e}", self.record.display());
        }
    }

    /// Gives each of `pus` (id and cgroup) without a class id one, records
    /// it, and writes it to its cgroup tree. All or nothing: on failure
    /// every cgroup written is reset and no id is kept.
    pub fn assign(&mut self, pus: &[(&PuId, &CgroupPath)]) -> Result<()> {
        let Some(mount) = self.mount.clone() else {
            return Ok(());
        };
        // One pass over the ids in order, skipping the taken ones: a
        // start-up with many PUs stays linear.
        let taken: BTreeSet<ClassId> = self.assigned.values().map(|e| e.class_id).collect();
        let mut free = (0..CAPACITY)
            .filter_map(ClassId::nth)
            .filter(|c| !taken.contains(c));
        let mut new: Vec<(PuId, Entry)> = Vec::new();
        let mut seen = BTreeSet::new();
        for &(id, cgroup) in pus {
            if self.assigned.contains_key(id) || !seen.insert(id) {
                continue;
            }
            let class_id = free.next().ok_or_else(|| DatapathError::Full {
                what: "the net_cls class ids".into(),
                capacity: CAPACITY,
            })?;
            let cgroup = mount.join(cgroup.as_path());
            new.push((id.clone(), Entry { class_id, cgroup }));
        }
        if new.is_empty() {
            return Ok(());
        }
        let entries: Vec<&Entry> = new.iter().map(|(_, e)| e).collect();
        self.save(&entries)
            .context("recording the net_cls class ids")?;
        for (done, (id, entry)) in new.iter().enumerate() {
            if let Err(e) = write_tree(&entry.cgroup, entry.class_id) {
                for (_, written) in &new[..=done] {
                    reset(written);
                }
                if let Err(e) = self.save(&[]) {
                    warn!("rewriting the net_cls record: {e:#}");
                }
                return Err(e.context(format!("setting the class id of PU {id}")).into());
            }
        }
        for (id, entry) in new {
            info!(pu = %id, class_id = %entry.class_id, cgroup = %entry.cgroup.display(), "net_cls class id set");
            self.assigned.insert(id, entry);
        }
        Ok(())
    }

    /// Moves PU `id`'s class id to `cgroup` (an update that changed it):
    /// written there first; the old tree is reset by [`Self::finish_move`]
    /// once the update is in force, or the new one by
    /// [`Self::undo_move`] if it failed. No-op for the same cgroup.
    pub fn start_move(&mut self, id: &PuId, cgroup: &CgroupPath) -> Result<Option<PathBuf>> {
        let (Some(mount), Some(entry)) = (&self.mount, self.assigned.get(id)) else {
            return Ok(None);
        };
        let to = mount.join(cgroup.as_path());
        if to == entry.cgroup {
            return Ok(None);
        }
        let moved = Entry {
            class_id: entry.class_id,
            cgroup: to.clone(),
        };
        self.save(&[&moved])
            .context("recording the net_cls class ids")?;
        if let Err(e) = write_tree(&moved.cgroup, moved.class_id) {
            reset(&moved);
            if let Err(e) = self.save(&[]) {
                warn!("rewriting the net_cls record: {e:#}");
            }
            return Err(e.context(format!("setting the class id of PU {id}")).into());
        }
        Ok(Some(to))
    }

    /// The update that [`Self::start_move`] prepared is in force.
    pub fn finish_move(&mut self, id: &PuId, to: PathBuf) {
        if let Some(entry) = self.assigned.get_mut(id) {
            let old = std::mem::replace(&mut entry.cgroup, to);
            let class_id = entry.class_id;
            reset(&Entry {
                class_id,
                cgroup: old,
            });
        }
        if let Err(e) = self.save(&[]) {
            warn!("rewriting the net_cls record: {e:#}");
        }
    }

    /// The update that [`Self::start_move`] prepared failed.
    pub fn undo_move(&mut self, id: &PuId, to: PathBuf) {
        if let Some(class_id) = self.get(id) {
            reset(&Entry {
                class_id,
                cgroup: to,
            });
        }
        if let Err(e) = self.save(&[]) {
            warn!("rewriting the net_cls record: {e:#}");
        }
    }

    /// Resets PU `id`'s cgroup tree and frees its class id: delete, and
    /// the undo of a failed configure. Best effort, logged.
    pub fn release(&mut self, id: &PuId) {
        if let Some(entry) = self.assigned.remove(id) {
            reset(&entry);
            if let Err(e) = self.save(&[]) {
                warn!("rewriting the net_cls record: {e:#}");
            }
        }
    }

    /// Writes the record: every assignment plus `extra`; removes it when
    /// that is nothing.
    fn save(&self, extra: &[&Entry]) -> anyhow::Result<()> {
        let entries: Vec<&Entry> = self
            .assigned
            .values()
            .chain(extra.iter().copied())
            .collect();
        if entries.is_empty() {
            return remove_file(&self.record)
                .with_context(|| format!("removing {}", self.record.display()));
        }
        write_record(&self.record, &entries)
    }
}

/// The entries of the record at `path`; none if there is no record.
fn read_record(path: &Path) -> anyhow::Result<Vec<Entry>> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).context("parsing it"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e.into()),
    }
}

/// Replaces the record at `path` atomically (a crash leaves the old one
/// or the new one, never half of one).
fn write_record(path: &Path, entries: &[&Entry]) -> anyhow::Result<()> {
    let dir = path.parent().context("the record path has no directory")?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path
        .file_name()
        .context("the record path has no file name")?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let text = serde_json::to_vec(entries)?;
    fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming {} into place", tmp.display()))
}

fn remove_file(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The cgroup at `dir` and every cgroup below it, parents first.
fn tree(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut all = vec![dir.to_path_buf()];
    let mut i = 0;
    while let Some(dir) = all.get(i).cloned() {
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                all.push(entry.path());
            }
        }
        i += 1;
    }
    Ok(all)
}

/// Writes `class_id` to every cgroup of the tree at `dir`.
fn write_tree(dir: &Path, class_id: ClassId) -> anyhow::Result<()> {
    let cgroups =
        tree(dir).with_context(|| format!("listing the net_cls cgroup {}", dir.display()))?;
    for cgroup in cgroups {
        let file = cgroup.join(CLASSID_FILE);
        fs::write(&file, class_id.to_string()).with_context(|| {
            format!(
                "writing {class_id} to {} (is it a net_cls cgroup?)",
                file.display()
            )
        })?;
    }
    Ok(())
}

/// Writes 0 to every cgroup of `entry`'s tree that still holds its class
/// id. Best effort: a tree that is gone is fine, other failures are
/// logged.
fn reset(entry: &Entry) {
    let cgroups = match tree(&entry.cgroup) {
        Ok(cgroups) => cgroups,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return,
        Err(e) => {
            warn!("listing the net_cls cgroup {}: {e}", entry.cgroup.display());
            return;
        }
    };
    for cgroup in cgroups {
        let file = cgroup.join(CLASSID_FILE);
        let outcome = fs::read_to_string(&file).and_then(|now| {
            match now.trim().parse::<u32>() == Ok(entry.class_id.value()) {
                true => fs::write(&file, "0"),
                false => Ok(()),
            }
        });
        match outcome {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => warn!("resetting {}: {e}", file.display()),
        }
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    /// A fake net_cls hierarchy in a temporary directory: directories
    /// with a `net_cls.classid` file each, as the kernel shows them.
    pub(crate) struct Hierarchy(pub(crate) PathBuf);

    impl Hierarchy {
        pub(crate) fn new(cgroups: &[&str]) -> Self {
            let root = std::env::temp_dir().join(format!(
                "enforcer-netcls-{}",
                crate::sandbox::unique_name("u")
            ));
            for cgroup in cgroups {
                let dir = root.join(cgroup);
                fs::create_dir_all(&dir).unwrap();
                fs::write(dir.join(CLASSID_FILE), "0\n").unwrap();
            }
            Self(root)
        }

        pub(crate) fn classid(&self, cgroup: &str) -> u32 {
            let text = fs::read_to_string(self.0.join(cgroup).join(CLASSID_FILE)).unwrap();
            text.trim().parse().unwrap()
        }

        pub(crate) fn ids(&self, record: &str) -> ClassIds {
            ClassIds::new(Some(self.0.clone()), self.0.join(record))
        }
    }

    impl Drop for Hierarchy {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::Hierarchy;
    use super::*;

    fn id(text: &str) -> PuId {
        PuId::new(text).unwrap()
    }

    fn cgroup(text: &str) -> CgroupPath {
        CgroupPath::new(text).unwrap()
    }

    #[test]
    fn numbering_is_the_seeds() {
        assert_eq!(ClassId::nth(0).unwrap().value(), 0x1111_0064);
        assert_eq!(ClassId::nth(1).unwrap().to_string(), "286326885");
        assert_eq!(ClassId::nth(CAPACITY - 1).unwrap().value(), 0x1111_ffff);
        assert_eq!(ClassId::nth(CAPACITY), None);
    }

    #[test]
    fn assigns_writes_the_tree_keeps_and_releases() {
        let h = Hierarchy::new(&["web", "web/worker", "db", "other"]);
        let mut ids = h.ids("record");
        let (web, db) = (id("web"), id("db"));
        ids.assign(&[(&web, &cgroup("web")), (&db, &cgroup("db"))])
            .unwrap();
        let first = ClassId::nth(0).unwrap().value();
        let second = ClassId::nth(1).unwrap().value();
        assert_eq!(
            [h.classid("web"), h.classid("web/worker"), h.classid("db")],
            [first, first, second]
        );
        assert_eq!(h.classid("other"), 0);
        // Assigning again (an update) keeps the id.
        ids.assign(&[(&web, &cgroup("web"))]).unwrap();
        assert_eq!(ids.get(&web).unwrap().value(), first);
        // A released id is reused by the next PU.
        ids.release(&web);
        assert_eq!([h.classid("web"), h.classid("web/worker")], [0, 0]);
        let api = id("api");
        ids.assign(&[(&api, &cgroup("other"))]).unwrap();
        assert_eq!(h.classid("other"), first);
    }

    #[test]
    fn a_failed_write_resets_and_keeps_nothing() {
        let h = Hierarchy::new(&["web"]);
        let mut ids = h.ids("record");
        let (web, gone) = (id("web"), id("gone"));
        let err = ids
            .assign(&[(&web, &cgroup("web")), (&gone, &cgroup("missing"))])
            .unwrap_err();
        assert!(format!("{err:#}").contains("PU gone"), "{err:#}");
        assert_eq!(h.classid("web"), 0);
        assert_eq!(ids.get(&web), None);
        assert!(!h.0.join("record").exists());
    }

    #[test]
    fn a_new_instance_resets_what_the_record_names() {
        let h = Hierarchy::new(&["web", "db"]);
        let web = id("web");
        let mut crashed = h.ids("record");
        crashed.assign(&[(&web, &cgroup("web"))]).unwrap();
        // Someone else set db's id to the one the record names: left alone.
        fs::write(h.0.join("db").join(CLASSID_FILE), "286326884").unwrap();
        let recorded = fs::read_to_string(h.0.join("record")).unwrap();
        assert!(recorded.contains("286326884"), "{recorded}");
        drop(crashed);
        let mut next = h.ids("record");
        next.reset_all();
        assert_eq!([h.classid("web"), h.classid("db")], [0, 286326884]);
        assert!(!h.0.join("record").exists());
    }

    #[test]
    fn a_move_writes_the_new_tree_then_resets_the_old() {
        let h = Hierarchy::new(&["a", "b", "c"]);
        let mut ids = h.ids("record");
        let web = id("web");
        ids.assign(&[(&web, &cgroup("a"))]).unwrap();
        let class_id = ids.get(&web).unwrap().value();
        assert_eq!(ids.start_move(&web, &cgroup("a")).unwrap(), None);
        let to = ids.start_move(&web, &cgroup("b")).unwrap().unwrap();
        assert_eq!([h.classid("a"), h.classid("b")], [class_id, class_id]);
        ids.finish_move(&web, to);
        assert_eq!([h.classid("a"), h.classid("b")], [0, class_id]);
        let to = ids.start_move(&web, &cgroup("c")).unwrap().unwrap();
        ids.undo_move(&web, to);
        assert_eq!([h.classid("b"), h.classid("c")], [class_id, 0]);
    }

    #[test]
    fn without_a_mount_nothing_is_assigned() {
        let h = Hierarchy::new(&["web"]);
        let mut ids = ClassIds::new(None, h.0.join("record"));
        let web = id("web");
        ids.assign(&[(&web, &cgroup("web"))]).unwrap();
        assert_eq!((ids.get(&web), h.classid("web")), (None, 0));
        assert!(!ids.enabled());
    }

    /// The eBPF datapath attaches to cgroup v2 only: it refuses a PU of a
    /// net_cls cgroup by name, before anything changes.
    #[test]
    fn the_ebpf_datapath_refuses_a_net_cls_pu() {
        use crate::datapath::{Datapath, DatapathKind, DatapathSettings};
        use crate::policy::{Mode, Pu, PuKind, QueueSettings};
        let settings = DatapathSettings {
            mode: Mode::LocalServer,
            queues: QueueSettings::default(),
            marks: enforcer_common::marks::MarkLayout::default(),
            cgroup2: PathBuf::from("/sys/fs/cgroup"),
            host_scope: PathBuf::from("/sys/fs/cgroup"),
            net_cls_mount: Some(PathBuf::from("/sys/fs/cgroup/net_cls")),
            net_cls_record: PathBuf::from("/nonexistent/enforcer-test.net_cls"),
            pin_dir: PathBuf::from("/nonexistent/enforcer-test-pins"),
            iptables_backend: crate::datapath::iptables::backend::Backend::Nft,
        };
        let mut ebpf = crate::datapath::ebpf::EbpfDatapath::new(settings).unwrap();
        let pu = Pu {
            id: id("web"),
            kind: PuKind::LinuxProcess {
                cgroup: cgroup("web"),
            },
            labels: Default::default(),
            tcp_ports: vec![],
            udp_ports: vec![],
            application_acls: vec![],
            network_acls: vec![],
            proxy_port: None,
            dns_proxy_port: None,
            dependent_services: vec![],
            exposed_services: vec![],
        };
        let err = ebpf.configure(0, &pu).unwrap_err();
        assert!(
            matches!(&err, DatapathError::Unsupported(_, DatapathKind::Ebpf)),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "PU web: a net_cls (cgroup v1) cgroup ([cgroups] version = \"v1\") is not \
             supported by the ebpf datapath"
        );
    }
}
