//! Output directories: every directory infl writes (factors, results, self-influence, an index,
//! a trained model) is owned by one run at a time, records what made it, and is never mixed
//! with another run's files.
//!
//! - What a directory holds: [`MARKER_FILE`] names the kind of output and the settings
//!   fingerprint of the run that made it (the one each job already computes for its `work/`
//!   state), written before the first output file, so it describes a run in progress and a
//!   finished one alike. A directory without it (written by an older infl) is recognised by its
//!   files: `meta.json`'s `kind`, `work/fit.json` or `work/score.json`, `index.safetensors`,
//!   `training.json`.
//! - Refusal ([`Error::Mismatch`], exit 4): another kind of output, the same kind made with other
//!   settings, or a non-empty directory that is not an infl output. `--overwrite` removes the
//!   previous run's files (never a file infl did not write) before writing.
//! - The lock: an exclusive advisory lock on [`LOCK_FILE`] (held by an unsharded run or a merge,
//!   which writes its pid there), or a shared one plus an exclusive lock per shard for the
//!   concurrent `--shard i/N` processes of one job. The OS releases it when the process dies.
//! - Stale temporary files (`.NAME.tmp-PID`, [`crate::io::temp_sibling`]) of dead processes are
//!   swept when a run takes the exclusive lock.

use crate::error::{Error, Result};
use crate::io;
use crate::shard::Shard;
use std::fs::File;
use std::path::{Path, PathBuf};

/// The directory-wide lock; its holder's pid is written in it.
pub const LOCK_FILE: &str = ".infl.lock";
/// What the directory holds and the settings that made it.
pub const MARKER_FILE: &str = ".infl-output.json";
/// Intermediate state of a fit or score ([`crate::workflow::WORK_DIR`]).
const WORK: &str = "work";

/// The kinds of output infl writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// `infl fit`: factors (and the gradient store under `store/`).
    Factors,
    /// `infl score`.
    Scores,
    /// `infl self-influence`.
    SelfInfluence,
    /// `infl index`.
    Index,
    /// `infl train`: a checkpoint directory.
    Model,
}

impl Kind {
    /// The names this kind writes in its directory (files or folders).
    pub fn files(self) -> &'static [&'static str] {
        match self {
            Kind::Factors => &["meta.json", "factors.safetensors", "store", WORK],
            Kind::Scores => &[
                "meta.json",
                "top_k.jsonl",
                "distribution.json",
                "layers.json",
                "scores.safetensors",
                WORK,
            ],
            Kind::SelfInfluence => &[
                "meta.json",
                "self_influence.jsonl",
                "top_k.jsonl",
                "distribution.json",
            ],
            Kind::Index => &[crate::index::INDEX_FILE],
            Kind::Model => &[
                "config.json",
                "model.safetensors",
                "tokenizer.json",
                "training.json",
            ],
        }
    }

    /// How messages name it: what it is and which command writes it.
    pub fn describe(self) -> &'static str {
        match self {
            Kind::Factors => "factors (`infl fit`)",
            Kind::Scores => "scores (`infl score`)",
            Kind::SelfInfluence => "self-influence scores (`infl self-influence`)",
            Kind::Index => "a BM25 index (`infl index`)",
            Kind::Model => "a model trained by `infl train`",
        }
    }

    const ALL: [Kind; 5] = [
        Kind::Factors,
        Kind::Scores,
        Kind::SelfInfluence,
        Kind::Index,
        Kind::Model,
    ];
}

/// The record in [`MARKER_FILE`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Marker {
    kind: Kind,
    /// The run's settings fingerprint (without its shard count: shards merge to the single run).
    settings: serde_json::Value,
}

/// An output directory owned by this process until dropped (the lock is released with it).
#[derive(Debug)]
pub struct OutputDir {
    dir: PathBuf,
    kind: Kind,
    /// This (unsharded) run made the directory: if it fails before its first output or state,
    /// the directory goes with it ([`Drop`]).
    created: bool,
    _locks: Vec<File>,
}

impl Drop for OutputDir {
    /// A directory this run created and leaves holding nothing but its own bookkeeping (the
    /// lock and the marker: the run failed before its first output or work state) is removed,
    /// so a failed run leaves nothing behind. Work state that a rerun resumes from is kept.
    fn drop(&mut self) {
        if !self.created {
            return;
        }
        let only_bookkeeping = std::fs::read_dir(&self.dir).is_ok_and(|entries| {
            entries.filter_map(|e| e.ok()).all(|e| {
                let name = e.file_name();
                name == LOCK_FILE || name == MARKER_FILE
            })
        });
        if only_bookkeeping {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The `.NAME.tmp-PID` of a temporary file, as (NAME, PID).
fn temp_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?;
    let (_, pid) = rest.rsplit_once(".tmp-")?;
    pid.parse().ok()
}

/// Whether `name` is infl's own bookkeeping (locks, marker, temporaries), not output.
fn is_bookkeeping(name: &str) -> bool {
    name == LOCK_FILE
        || name == MARKER_FILE
        || (name.starts_with(".infl-shard-") && name.ends_with(".lock"))
        || temp_owner(name).is_some()
}

/// Whether process `pid` is alive on this machine.
fn alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return false;
        };
        // SAFETY: signal 0 only checks that the process exists and may be signalled.
        let rc = unsafe { libc::kill(pid, 0) };
        rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Removes the temporary files and folders in `dir` left by dead processes (or an earlier
/// process with this one's pid). Returns how many.
pub fn sweep_temps(dir: &Path) -> Result<usize> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(0);
    };
    let mut swept = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = temp_owner(&name) else {
            continue;
        };
        if pid != std::process::id() && alive(pid) {
            continue;
        }
        remove(&entry.path())?;
        swept += 1;
    }
    Ok(swept)
}

/// Removes a file or a folder, if there.
fn remove(path: &Path) -> Result<()> {
    let result = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(_) => return Ok(()),
    };
    match result {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(path, e)),
        _ => Ok(()),
    }
}

/// Takes the lock on `path`, exclusive or shared; the exclusive holder writes its pid there.
fn lock(path: &Path, exclusive: bool, out: &Path) -> Result<File> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let taken = match exclusive {
        true => file.try_lock(),
        false => file.try_lock_shared(),
    };
    match taken {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(Error::Mismatch(format!(
                "{} is in use by another infl process ({}; lock {}): wait for it to end, or write to another --out",
                out.display(),
                holders(out, path),
                path.display()
            )))
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(path, e)),
    }
    if exclusive {
        file.set_len(0).map_err(|e| Error::io(path, e))?;
        writeln!(file, "{}", std::process::id()).map_err(|e| Error::io(path, e))?;
    }
    Ok(file)
}

/// Who holds the locks of `out`: the pid in the lock that could not be taken, and those of the
/// shard locks held now.
fn holders(out: &Path, tried: &Path) -> String {
    let pid_in = |p: &Path| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok())
    };
    let mut pids = Vec::new();
    // A pid left by an earlier holder (the lock is now held shared, by shards) is dead.
    if let Some(pid) = pid_in(tried).filter(|&p| alive(p)) {
        pids.push(pid);
    }
    if let Ok(entries) = std::fs::read_dir(out) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !(name.starts_with(".infl-shard-") && name.ends_with(".lock")) {
                continue;
            }
            // A shard lock that cannot be shared is held now.
            let held = File::open(e.path()).is_ok_and(|f| f.try_lock_shared().is_err());
            if let Some(pid) = pid_in(&e.path()).filter(|_| held) {
                pids.push(pid);
            }
        }
    }
    pids.sort_unstable();
    pids.dedup();
    match pids.as_slice() {
        [] => "pid unknown".into(),
        [pid] => format!("pid {pid}"),
        _ => format!(
            "pids {}",
            pids.iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// What a directory holds now.
struct Survey {
    marker: Option<Marker>,
    /// The kind, from the marker or else from the files.
    kind: Option<Kind>,
    /// Entries infl did not write.
    foreign: Vec<String>,
}

fn survey(dir: &Path) -> Result<Survey> {
    let mut entries = Vec::new();
    if let Ok(read) = std::fs::read_dir(dir) {
        for e in read.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !is_bookkeeping(&name) {
                entries.push(name);
            }
        }
    }
    entries.sort();
    let marker_path = dir.join(MARKER_FILE);
    let marker: Option<Marker> = match marker_path.exists() {
        true => Some(io::read_json(&marker_path).map_err(|e| {
            Error::Mismatch(format!(
                "{}: unreadable ({e}); pass --overwrite to replace this directory's output",
                marker_path.display()
            ))
        })?),
        false => None,
    };
    let kind = match &marker {
        Some(m) => Some(m.kind),
        None => kind_from_files(dir),
    };
    // Without a kind, even a name infl uses (a checkpoint's config.json) is not infl's.
    let foreign = entries
        .into_iter()
        .filter(|name| match kind {
            Some(_) => !Kind::ALL.iter().any(|k| k.files().contains(&name.as_str())),
            None => name != WORK,
        })
        .collect();
    Ok(Survey {
        marker,
        kind,
        foreign,
    })
}

/// The kind of an output written without a marker, from its files.
fn kind_from_files(dir: &Path) -> Option<Kind> {
    let meta_kind = std::fs::read_to_string(dir.join(crate::provenance::META_FILE))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("kind")?.as_str().map(str::to_string));
    match meta_kind.as_deref() {
        Some("factors") => return Some(Kind::Factors),
        Some("scores") => return Some(Kind::Scores),
        Some("self-influence") => return Some(Kind::SelfInfluence),
        _ => {}
    }
    let has = |p: &str| dir.join(p).exists();
    if has("work/fit.json") || has("factors.safetensors") {
        Some(Kind::Factors)
    } else if has("work/score.json") {
        Some(Kind::Scores)
    } else if has(crate::index::INDEX_FILE) {
        Some(Kind::Index)
    } else if has("training.json") {
        Some(Kind::Model)
    } else if has("self_influence.jsonl") {
        Some(Kind::SelfInfluence)
    } else {
        None
    }
}

/// The settings as recorded: without the shard count (a sharded run merges to the single run).
fn recorded(settings: &serde_json::Value) -> serde_json::Value {
    let mut s = settings.clone();
    if let Some(map) = s.as_object_mut() {
        map.remove("shards");
    }
    s
}

impl OutputDir {
    /// Opens `dir` for a run of `kind`: creates it, takes its lock (for a shard of a sharded
    /// run, shared with the other shards plus one of its own), sweeps stale temporary files
    /// (under the exclusive lock), and refuses a directory that holds another kind of output
    /// or is not an infl output. With `overwrite`, the previous run's files are removed first.
    pub fn open(dir: &Path, kind: Kind, shard: Shard, overwrite: bool) -> Result<Self> {
        if overwrite && !shard.is_whole() {
            return Err(Error::input(
                "--overwrite does not go with --shard: the shards would remove each other's files; empty the directory once, or use another --out",
            ));
        }
        let mut out = Self::lock(dir, shard)?;
        out.kind = kind;
        let found = match survey(dir) {
            // An unreadable marker is replaced by the overwrite.
            Err(_) if overwrite => {
                remove(&dir.join(MARKER_FILE))?;
                survey(dir)?
            }
            found => found?,
        };
        if found.kind.is_none() && !found.foreign.is_empty() {
            return Err(Error::Mismatch(format!(
                "{} is not empty and is not an infl output (it holds {}); write to a new or empty --out (infl never deletes files it did not write)",
                dir.display(),
                list(&found.foreign)
            )));
        }
        match found.kind {
            Some(theirs) if overwrite => out.remove_output(theirs)?,
            Some(theirs) if theirs != kind => {
                return Err(Error::Mismatch(format!(
                    "{} holds {}, not {}; write to another --out, or pass --overwrite to remove its files first",
                    dir.display(),
                    theirs.describe(),
                    kind.describe()
                )))
            }
            _ => {}
        }
        Ok(out)
    }

    /// Locks `dir` (created if needed) for the whole-directory work of `infl merge` or of a
    /// shard, without looking at what it holds.
    pub fn lock(dir: &Path, shard: Shard) -> Result<Self> {
        let whole = shard.is_whole();
        let created = whole && !dir.exists();
        io::ensure_dir(dir)?;
        let mut locks = vec![lock(&dir.join(LOCK_FILE), whole, dir)?];
        if whole {
            for d in [dir.to_path_buf(), dir.join(WORK)] {
                sweep_temps(&d)?;
            }
        } else {
            let path = dir.join(format!(".infl-shard-{}.lock", shard.tag()));
            locks.push(lock(&path, true, dir)?);
        }
        Ok(OutputDir {
            dir: dir.to_path_buf(),
            kind: Kind::Factors,
            created,
            _locks: locks,
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Records `settings` (the run's fingerprint) as what makes this output, before its first
    /// file: a run of the same settings resumes (its work state is kept) or redoes (the
    /// previous run's finished files are removed, so none is left stale); other settings are
    /// refused, unless the previous run never finished and `fresh` discards it.
    pub fn claim(&self, settings: &serde_json::Value, fresh: bool) -> Result<()> {
        let ours = Marker {
            kind: self.kind,
            settings: recorded(settings),
        };
        let found = survey(&self.dir)?;
        let finished = self.dir.join(crate::provenance::META_FILE).exists()
            || (self.kind == Kind::Index && self.dir.join(crate::index::INDEX_FILE).exists())
            || (self.kind == Kind::Model && self.dir.join("training.json").exists());
        match (&found.marker, found.kind) {
            (Some(theirs), _) if *theirs == ours => self.remove_finished()?,
            (Some(_), _) if fresh && !finished => self.remove_output(self.kind)?,
            (Some(theirs), _) => {
                return Err(Error::Mismatch(format!(
                    "{} holds {} made with other settings ({}); write to another --out, or pass --overwrite to replace them",
                    self.dir.display(),
                    theirs.kind.describe(),
                    crate::checkpoint::differing_keys(&theirs.settings, &ours.settings)
                )))
            }
            (None, Some(_)) if finished => {
                return Err(Error::Mismatch(format!(
                    "{} holds {} that record no settings (written by an older infl); write to another --out, or pass --overwrite to replace them",
                    self.dir.display(),
                    self.kind.describe()
                )))
            }
            // Empty, or the work state of an older infl (which checks its own settings).
            (None, _) => {}
        }
        io::write_json(&self.dir.join(MARKER_FILE), &ours)
    }

    /// Removes every file `kind` writes here (its work state too) and the marker.
    fn remove_output(&self, kind: Kind) -> Result<()> {
        for name in kind.files() {
            remove(&self.dir.join(name))?;
        }
        remove(&self.dir.join(MARKER_FILE))
    }

    /// Removes this kind's finished files (not its work state): a redo must not leave a file
    /// of the previous run that it does not write itself.
    fn remove_finished(&self) -> Result<()> {
        for name in self.kind.files().iter().filter(|n| **n != WORK) {
            remove(&self.dir.join(name))?;
        }
        Ok(())
    }
}

/// Up to five names, then a count.
fn list(names: &[String]) -> String {
    let shown: Vec<&str> = names.iter().take(5).map(String::as_str).collect();
    match names.len() {
        n if n > 5 => format!("{}, … {} entries", shown.join(", "), n),
        _ => shown.join(", "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("infl-outdir-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn temporary_names_parse_to_their_pid() {
        assert_eq!(temp_owner(".meta.json.tmp-123"), Some(123));
        assert_eq!(temp_owner(".store.tmp-7"), Some(7));
        assert_eq!(temp_owner("meta.json.tmp-123"), None);
        assert_eq!(temp_owner(".x.tmp-12a"), None);
    }

    #[test]
    fn a_second_exclusive_lock_names_the_holder_and_shards_share() {
        let dir = scratch("locks");
        let held = OutputDir::open(&dir, Kind::Scores, Shard::WHOLE, false).unwrap();
        let e = OutputDir::open(&dir, Kind::Scores, Shard::WHOLE, false).unwrap_err();
        assert!(matches!(e, Error::Mismatch(_)));
        assert!(
            e.to_string()
                .contains(&format!("pid {}", std::process::id())),
            "{e}"
        );
        drop(held);
        let s0 = OutputDir::open(&dir, Kind::Scores, Shard::new(0, 2).unwrap(), false).unwrap();
        let s1 = OutputDir::open(&dir, Kind::Scores, Shard::new(1, 2).unwrap(), false).unwrap();
        assert!(OutputDir::open(&dir, Kind::Scores, Shard::new(1, 2).unwrap(), false).is_err());
        assert!(OutputDir::lock(&dir, Shard::WHOLE).is_err(), "merge waits");
        drop((s0, s1));
        OutputDir::lock(&dir, Shard::WHOLE).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn claims_refuse_other_settings_and_redo_removes_stale_files() {
        let dir = scratch("claims");
        let a = serde_json::json!({"stage": "score", "queries": "a", "shards": 1});
        let out = OutputDir::open(&dir, Kind::Scores, Shard::WHOLE, false).unwrap();
        out.claim(&a, false).unwrap();
        std::fs::write(dir.join("meta.json"), "{\"kind\": \"scores\"}").unwrap();
        std::fs::write(dir.join("layers.json"), "[]").unwrap();
        std::fs::write(dir.join("report.html"), "mine").unwrap();
        // The same settings (another shard count): a redo, the old files gone.
        let same = serde_json::json!({"stage": "score", "queries": "a", "shards": 3});
        out.claim(&same, false).unwrap();
        assert!(!dir.join("layers.json").exists() && !dir.join("meta.json").exists());
        assert!(dir.join("report.html").exists(), "not infl's: kept");
        std::fs::write(dir.join("meta.json"), "{\"kind\": \"scores\"}").unwrap();
        let b = serde_json::json!({"stage": "score", "queries": "b", "shards": 1});
        let e = out.claim(&b, true).unwrap_err().to_string();
        assert!(
            e.contains("differs in: queries") && e.contains("--overwrite"),
            "{e}"
        );
        drop(out);
        let e = OutputDir::open(&dir, Kind::Factors, Shard::WHOLE, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("holds scores"), "{e}");
        let out = OutputDir::open(&dir, Kind::Factors, Shard::WHOLE, true).unwrap();
        out.claim(&a, false).unwrap();
        assert!(!dir.join("meta.json").exists() && dir.join("report.html").exists());
        drop(out);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn foreign_directories_are_refused_even_with_overwrite() {
        let dir = scratch("foreign");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("notes.txt"), "x").unwrap();
        for overwrite in [false, true] {
            let e = OutputDir::open(&dir, Kind::Factors, Shard::WHOLE, overwrite).unwrap_err();
            assert!(e.to_string().contains("not an infl output"), "{e}");
        }
        assert!(dir.join("notes.txt").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
