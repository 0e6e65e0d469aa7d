//! Resumable state on disk: a pass's running sums (or a shard's finished ones) that survive a
//! `kill -9` at any instant.
//!
//! A state named `STEM` in a directory is two files: the payload `STEM.POSITION.EXT` and the
//! manifest `STEM.json`, which records the position (sequences of the shard done), whether the
//! pass is complete, the fingerprint of the settings that produced it and the payload's SHA-256.
//! Both are written atomically (temp file + rename), payload first; the manifest is the commit
//! point. A crash before it leaves the previous state intact (the new payload is an orphan,
//! removed by the next save); a crash after it leaves the new one. A payload that does not hash
//! to its manifest, or a manifest from other settings, is reported and never used.
//!
//! When a pass saves is [`CheckpointPolicy`]'s to say ([`Checkpointer`]).

mod policy;

pub use policy::{CheckpointPolicy, Checkpointer};

use crate::data::hex;
use crate::error::{Error, Result};
use crate::io;
use sha2::Digest;
use std::path::{Path, PathBuf};

/// What a saved state says about itself.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// SHA-256 of the canonical JSON of `settings`.
    pub fingerprint: String,
    /// The settings that produced the state (for messages when they differ).
    pub settings: serde_json::Value,
    /// Sequences of the shard already accounted for.
    pub position: u64,
    /// The pass over the shard finished.
    pub complete: bool,
    /// The payload's file name, in the manifest's directory.
    pub file: String,
    pub sha256: String,
}

/// Fingerprint of a settings object.
pub fn fingerprint(settings: &serde_json::Value) -> String {
    hex(&sha2::Sha256::digest(settings.to_string().as_bytes()))
}

fn manifest_path(dir: &Path, stem: &str) -> PathBuf {
    dir.join(format!("{stem}.json"))
}

/// Saves `payload` as the state `stem` at `position`.
pub fn save(
    dir: &Path,
    stem: &str,
    ext: &str,
    payload: &[u8],
    settings: &serde_json::Value,
    position: u64,
    complete: bool,
) -> Result<()> {
    io::ensure_dir(dir)?;
    let file = format!("{stem}.{position:012}.{ext}");
    io::write_atomic(&dir.join(&file), payload)?;
    let sha256 = hex(&sha2::Sha256::digest(payload));
    commit(dir, stem, ext, file, sha256, settings, position, complete)
}

/// [`save`] of named tensors as a safetensors payload, streamed to the file one tensor at a
/// time (a pass's sums are the largest thing a fit holds; they are never copied to be saved).
pub fn save_tensors(
    dir: &Path,
    stem: &str,
    tensors: Vec<(String, io::TensorRef<'_>)>,
    settings: &serde_json::Value,
    position: u64,
    complete: bool,
) -> Result<()> {
    io::ensure_dir(dir)?;
    let ext = "safetensors";
    let file = format!("{stem}.{position:012}.{ext}");
    let sha256 = io::write_tensors(&dir.join(&file), tensors, None)?;
    commit(dir, stem, ext, file, sha256, settings, position, complete)
}

/// Writes the manifest that makes the payload `file` the state `stem` (the commit point), then
/// removes older payloads of the state.
#[allow(clippy::too_many_arguments)]
fn commit(
    dir: &Path,
    stem: &str,
    ext: &str,
    file: String,
    sha256: String,
    settings: &serde_json::Value,
    position: u64,
    complete: bool,
) -> Result<()> {
    let manifest = Manifest {
        fingerprint: fingerprint(settings),
        settings: settings.clone(),
        position,
        complete,
        file: file.clone(),
        sha256,
    };
    io::write_json(&manifest_path(dir, stem), &manifest)?;
    // Older payloads of this state, and orphans of interrupted saves.
    let prefix = format!("{stem}.");
    let suffix = format!(".{ext}");
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let middle = name
                .strip_prefix(&prefix)
                .and_then(|r| r.strip_suffix(&suffix));
            if name != file && middle.is_some_and(|m| m.bytes().all(|b| b.is_ascii_digit())) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(())
}

/// Loads the state `stem` if there is one, checking it was made with `settings` and that its
/// payload is intact.
pub fn load(
    dir: &Path,
    stem: &str,
    settings: &serde_json::Value,
) -> Result<Option<(Manifest, Vec<u8>)>> {
    let mpath = manifest_path(dir, stem);
    if !mpath.exists() {
        return Ok(None);
    }
    let manifest = read_manifest(&mpath, settings)?;
    let ppath = dir.join(&manifest.file);
    let payload = std::fs::read(&ppath).map_err(|e| {
        Error::Mismatch(format!(
            "{}: the checkpoint's data file {} cannot be read ({e}); rerun with --fresh",
            mpath.display(),
            ppath.display()
        ))
    })?;
    if hex(&sha2::Sha256::digest(&payload)) != manifest.sha256 {
        return Err(Error::Mismatch(format!(
            "{}: corrupt checkpoint (its SHA-256 does not match {}); rerun with --fresh",
            ppath.display(),
            mpath.display()
        )));
    }
    Ok(Some((manifest, payload)))
}

/// [`load`] of a safetensors state, opened to be read a tensor at a time rather than read
/// whole (its checksum is verified by streaming the file).
pub fn load_tensor_file(
    dir: &Path,
    stem: &str,
    settings: &serde_json::Value,
) -> Result<Option<(Manifest, io::TensorFile)>> {
    let mpath = manifest_path(dir, stem);
    if !mpath.exists() {
        return Ok(None);
    }
    let manifest = read_manifest(&mpath, settings)?;
    let ppath = dir.join(&manifest.file);
    let mut hasher = sha2::Sha256::new();
    let mut file = std::fs::File::open(&ppath).map_err(|e| Error::io(&ppath, e))?;
    std::io::copy(&mut file, &mut hasher).map_err(|e| Error::io(&ppath, e))?;
    if hex(&hasher.finalize()) != manifest.sha256 {
        return Err(Error::Mismatch(format!(
            "{}: corrupt checkpoint (its SHA-256 does not match {}); rerun with --fresh",
            ppath.display(),
            mpath.display()
        )));
    }
    Ok(Some((manifest, io::TensorFile::open(&ppath)?)))
}

/// A state's manifest, checked to be of a run with `settings`.
fn read_manifest(mpath: &Path, settings: &serde_json::Value) -> Result<Manifest> {
    let manifest: Manifest = io::read_json(mpath).map_err(|e| {
        Error::Mismatch(format!(
            "{}: unreadable checkpoint manifest ({e}); delete it or rerun with --fresh",
            mpath.display()
        ))
    })?;
    if manifest.fingerprint != fingerprint(settings) {
        return Err(Error::Mismatch(format!(
            "{}: this state was written by a run with other settings ({}); rerun with those settings, or with --fresh to discard it",
            mpath.display(),
            differing_keys(&manifest.settings, settings)
        )));
    }
    Ok(manifest)
}

/// Removes the state `stem` (manifest and payloads).
pub fn discard(dir: &Path, stem: &str) -> Result<()> {
    let prefix = format!("{stem}.");
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                std::fs::remove_file(e.path()).map_err(|err| Error::io(e.path(), err))?;
            }
        }
    }
    Ok(())
}

/// Names the top-level keys in which two settings objects differ.
pub fn differing_keys(old: &serde_json::Value, new: &serde_json::Value) -> String {
    match (old.as_object(), new.as_object()) {
        (Some(o), Some(n)) => {
            let mut keys: Vec<&str> = o
                .keys()
                .chain(n.keys())
                .filter(|k| o.get(*k) != n.get(*k))
                .map(String::as_str)
                .collect();
            keys.sort_unstable();
            keys.dedup();
            format!("differs in: {}", keys.join(", "))
        }
        _ => "settings differ".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("infl-ckpt-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn round_trip_replaces_the_previous_payload() {
        let d = tmp("rt");
        let s = serde_json::json!({"a": 1});
        save(&d, "cov.0-of-1", "bin", b"first", &s, 8, false).unwrap();
        save(&d, "cov.0-of-1", "bin", b"second", &s, 16, true).unwrap();
        let (m, p) = load(&d, "cov.0-of-1", &s).unwrap().unwrap();
        assert_eq!(
            (m.position, m.complete, p.as_slice()),
            (16, true, &b"second"[..])
        );
        let files = std::fs::read_dir(&d).unwrap().count();
        assert_eq!(files, 2, "old payload removed");
        assert!(load(&d, "cov.1-of-1", &s).unwrap().is_none());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn other_settings_and_corruption_are_refused() {
        let d = tmp("bad");
        let s = serde_json::json!({"batch_size": 8, "seed": 0});
        save(&d, "x", "bin", b"payload", &s, 8, false).unwrap();
        let other = serde_json::json!({"batch_size": 4, "seed": 0});
        let e = load(&d, "x", &other).unwrap_err().to_string();
        assert!(e.contains("batch_size") && !e.contains("seed"), "{e}");
        let m: Manifest = io::read_json(&d.join("x.json")).unwrap();
        std::fs::write(d.join(&m.file), b"paylaod").unwrap();
        let e = load(&d, "x", &s).unwrap_err().to_string();
        assert!(e.contains("corrupt"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
