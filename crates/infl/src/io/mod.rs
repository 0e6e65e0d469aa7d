//! Files that leave the process: atomic writes (a temporary sibling, then a rename), whole or
//! streamed, and safetensors. A temporary file never outlives a failed write: it is removed on
//! every error path (and when an [`AtomicFile`] is dropped uncommitted); one left by a killed
//! process is swept by the next run that opens the directory ([`crate::output_dir`]).

mod tensor_file;

pub use tensor_file::TensorFile;

use crate::error::{Error, Result};
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` atomically: a crash leaves either the old file or the new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_sibling(path);
    if let Err(e) = std::fs::write(&tmp, bytes) {
        // A full disk leaves a partial file behind.
        discard(&tmp);
        return Err(Error::io(&tmp, e));
    }
    publish(&tmp, path)
}

/// Removes a temporary file or folder after a failed write; the error being reported is the
/// write's, so a failure to remove is not.
fn discard(tmp: &Path) {
    let _ = match tmp.is_dir() {
        true => std::fs::remove_dir_all(tmp),
        false => std::fs::remove_file(tmp),
    };
}

/// The hidden sibling `.NAME.tmp-PID` that a file or directory is built in before
/// [`publish`] renames it into place (per process, so concurrent writers do not collide).
pub fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Renames the finished `tmp` onto `path`; a directory at `path` is removed first (a rename
/// does not replace a non-empty directory). On failure `tmp` is removed.
pub fn publish(tmp: &Path, path: &Path) -> Result<()> {
    let renamed = (|| {
        if tmp.is_dir() && path.exists() {
            std::fs::remove_dir_all(path)?;
        }
        std::fs::rename(tmp, path)
    })();
    renamed.map_err(|e| {
        discard(tmp);
        Error::io(path, e)
    })
}

/// A file streamed through a buffer into its [`temp_sibling`] and renamed into place by
/// [`AtomicFile::commit`], for outputs too large to hold in memory: a crash leaves either the
/// old file or the new one. Write errors name [`AtomicFile::tmp_path`]; dropped without a
/// commit (an error on the way), the temporary file is removed.
pub struct AtomicFile {
    path: PathBuf,
    tmp: PathBuf,
    /// None once committed.
    out: Option<std::io::BufWriter<std::fs::File>>,
}

impl AtomicFile {
    pub fn create(path: &Path) -> Result<Self> {
        let tmp = temp_sibling(path);
        let f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        Ok(AtomicFile {
            path: path.to_path_buf(),
            tmp,
            out: Some(std::io::BufWriter::new(f)),
        })
    }

    /// Where the bytes go until the commit (for error messages).
    pub fn tmp_path(&self) -> &Path {
        &self.tmp
    }

    /// Flushes and renames the file into place.
    pub fn commit(self) -> Result<()> {
        self.finish(false)
    }

    /// [`AtomicFile::commit`] after syncing the data to disk.
    pub fn sync_and_commit(self) -> Result<()> {
        self.finish(true)
    }

    fn finish(mut self, sync: bool) -> Result<()> {
        let Some(out) = self.out.take() else {
            return Err(Error::Other(format!(
                "{}: committed twice",
                self.tmp.display()
            )));
        };
        // On an error below, the drop of `self` removes the temporary file.
        let file = out
            .into_inner()
            .map_err(|e| Error::io(&self.tmp, e.into_error()))?;
        if sync {
            file.sync_all().map_err(|e| Error::io(&self.tmp, e))?;
        }
        drop(file);
        let published = publish(&self.tmp, &self.path);
        if published.is_ok() {
            self.tmp = PathBuf::new();
        }
        published
    }

    fn writer(&mut self) -> std::io::Result<&mut std::io::BufWriter<std::fs::File>> {
        self.out
            .as_mut()
            .ok_or_else(|| std::io::Error::other("write after commit"))
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            // Unbuffered first, so no flush recreates the file after its removal.
            drop(self.out.take().map(std::io::BufWriter::into_parts));
            discard(&self.tmp);
        }
    }
}

impl std::io::Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.writer()?.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.writer()?.flush()
    }
}

pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| Error::Other(e.to_string()))?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::input(format!("{}: {e}", path.display())))
}

/// Creates `dir` (and parents) if needed.
pub fn ensure_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
}

/// A tensor to be written: row-major data.
pub enum OwnedTensor {
    F32(Vec<usize>, Vec<f32>),
    F64(Vec<usize>, Vec<f64>),
}

impl OwnedTensor {
    fn view(&self) -> Result<TensorView<'_>> {
        let (dtype, shape, bytes): (Dtype, &Vec<usize>, &[u8]) = match self {
            OwnedTensor::F32(s, v) => (Dtype::F32, s, bytemuck_f32(v)),
            OwnedTensor::F64(s, v) => (Dtype::F64, s, bytemuck_f64(v)),
        };
        TensorView::new(dtype, shape.clone(), bytes).map_err(|e| Error::Other(e.to_string()))
    }
}

fn bytemuck_f32(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte pattern is a valid u8; little-endian hosts only
    // (safetensors is little-endian), which `cfg` below enforces.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

fn bytemuck_f64(v: &[f64]) -> &[u8] {
    // SAFETY: as above.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

#[cfg(not(target_endian = "little"))]
compile_error!("infl writes safetensors (little-endian) by reinterpreting memory; big-endian hosts are not supported");

/// A tensor to be written, borrowed from where it lives: a matrix is converted to its bytes only
/// while it is written, so writing large factors or sums never holds a second copy of them.
pub struct TensorRef<'a> {
    shape: Vec<usize>,
    data: TensorData<'a>,
}

enum TensorData<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
    /// Small values made for the file (counts).
    F64Owned(Vec<f64>),
    /// Matrices, written row-major.
    F32Mat(faer::MatRef<'a, f32>),
    F64Mat(faer::MatRef<'a, f64>),
    /// A tensor of another safetensors file, read from it only while it is written.
    InFile(&'a tensor_file::TensorFile, Dtype, (usize, usize)),
}

impl<'a> TensorRef<'a> {
    pub fn f32(shape: Vec<usize>, values: &'a [f32]) -> Self {
        TensorRef {
            shape,
            data: TensorData::F32(values),
        }
    }

    pub fn f64(shape: Vec<usize>, values: &'a [f64]) -> Self {
        TensorRef {
            shape,
            data: TensorData::F64(values),
        }
    }

    pub fn f64_owned(shape: Vec<usize>, values: Vec<f64>) -> Self {
        TensorRef {
            shape,
            data: TensorData::F64Owned(values),
        }
    }

    pub fn mat_f32(m: faer::MatRef<'a, f32>) -> Self {
        TensorRef {
            shape: vec![m.nrows(), m.ncols()],
            data: TensorData::F32Mat(m),
        }
    }

    pub fn mat_f64(m: faer::MatRef<'a, f64>) -> Self {
        TensorRef {
            shape: vec![m.nrows(), m.ncols()],
            data: TensorData::F64Mat(m),
        }
    }
}

impl<'a> TensorRef<'a> {
    /// Tensor `name` of `file`, read from it only while the new file is written (a failed
    /// read is kept in `file`: check [`tensor_file::TensorFile::read_error`] after writing).
    pub fn in_file(file: &'a tensor_file::TensorFile, name: &str) -> Option<Self> {
        let info = file.info(name)?;
        Some(TensorRef {
            shape: info.shape.clone(),
            data: TensorData::InFile(file, info.dtype, info.data_offsets),
        })
    }
}

impl<'a> From<&'a OwnedTensor> for TensorRef<'a> {
    fn from(t: &'a OwnedTensor) -> Self {
        match t {
            OwnedTensor::F32(s, v) => TensorRef::f32(s.clone(), v),
            OwnedTensor::F64(s, v) => TensorRef::f64(s.clone(), v),
        }
    }
}

/// The little-endian bytes of a matrix in row-major order.
fn row_major_bytes<T: Copy, const N: usize>(
    m: faer::MatRef<'_, T>,
    to_bytes: impl Fn(T) -> [u8; N],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(N * m.nrows() * m.ncols());
    for i in 0..m.nrows() {
        for j in 0..m.ncols() {
            out.extend_from_slice(&to_bytes(m[(i, j)]));
        }
    }
    out
}

impl safetensors::View for TensorRef<'_> {
    fn dtype(&self) -> Dtype {
        match self.data {
            TensorData::F32(_) | TensorData::F32Mat(_) => Dtype::F32,
            TensorData::F64(_) | TensorData::F64Owned(_) | TensorData::F64Mat(_) => Dtype::F64,
            TensorData::InFile(_, dtype, _) => dtype,
        }
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        use std::borrow::Cow;
        match &self.data {
            TensorData::F32(v) => Cow::Borrowed(bytemuck_f32(v)),
            TensorData::F64(v) => Cow::Borrowed(bytemuck_f64(v)),
            TensorData::F64Owned(v) => Cow::Borrowed(bytemuck_f64(v)),
            TensorData::F32Mat(m) => Cow::Owned(row_major_bytes(*m, f32::to_le_bytes)),
            TensorData::F64Mat(m) => Cow::Owned(row_major_bytes(*m, f64::to_le_bytes)),
            TensorData::InFile(file, _, range) => Cow::Owned(file.read_range(*range)),
        }
    }

    fn data_len(&self) -> usize {
        let n: usize = self.shape.iter().product();
        match self.data {
            TensorData::F32(_) | TensorData::F32Mat(_) => 4 * n,
            TensorData::F64(_) | TensorData::F64Owned(_) | TensorData::F64Mat(_) => 8 * n,
            TensorData::InFile(_, _, (start, end)) => end - start,
        }
    }
}

/// Writes named tensors to a safetensors file atomically, with string metadata in its header,
/// and returns the file's SHA-256 (hex).
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, OwnedTensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<String> {
    write_tensors(
        path,
        tensors
            .iter()
            .map(|(n, t)| (n.clone(), TensorRef::from(t)))
            .collect(),
        metadata,
    )
}

/// [`write_safetensors`] from borrowed tensors, streamed to the file one tensor at a time (a
/// matrix's bytes exist only while it is written), then hashed by reading the file back: the
/// memory a write takes is one tensor, not the file.
pub fn write_tensors<V: safetensors::View>(
    path: &Path,
    tensors: Vec<(String, V)>,
    metadata: Option<HashMap<String, String>>,
) -> Result<String> {
    let tmp = temp_sibling(path);
    let written = safetensors::serialize_to_file(tensors, metadata, &tmp)
        .map_err(|e| Error::Other(format!("{}: {e}", tmp.display())))
        .and_then(|()| crate::data::sha256_file(&tmp));
    match written {
        Ok(sha256) => {
            publish(&tmp, path)?;
            Ok(sha256)
        }
        Err(e) => {
            discard(&tmp);
            Err(e)
        }
    }
}

/// The bytes of a safetensors file holding `tensors` (small files hashed before writing).
pub fn safetensors_bytes(tensors: &[(String, OwnedTensor)]) -> Result<Vec<u8>> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.view()?)))
        .collect::<Result<_>>()?;
    safetensors::serialize(views, None).map_err(|e| Error::Other(e.to_string()))
}

/// Reads every tensor of a safetensors file as f64 (f32 and f64 on disk), with shapes.
/// Tensors read back: name → (shape, row-major values).
pub type TensorMap = HashMap<String, (Vec<usize>, Vec<f64>)>;

pub fn read_safetensors(path: &Path) -> Result<TensorMap> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_safetensors(&bytes, &path.display().to_string())
}

/// [`read_safetensors`] from bytes in memory; `what` names their source in messages.
pub fn parse_safetensors(bytes: &[u8], what: &str) -> Result<TensorMap> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| Error::input(format!("{what}: not a safetensors file: {e}")))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let data = view.data();
        let values: Vec<f64> = match view.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                .collect(),
            Dtype::F64 => data
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
            other => {
                return Err(Error::input(format!(
                    "{what}: tensor `{name}` has dtype {other:?}; expected F32 or F64"
                )))
            }
        };
        out.insert(name, (view.shape().to_vec(), values));
    }
    Ok(out)
}

/// CPU time used so far by every thread of this process (user and system), in seconds, where
/// the platform reports it: `infl bench` divides a phase's CPU time by its wall time to tell
/// how many cores the phase kept busy.
pub fn process_cpu_seconds() -> Option<f64> {
    #[cfg(unix)]
    {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec, which `t` is.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) };
        (rc == 0).then_some(t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Keeps freed memory in the process's heap instead of returning it to the kernel. The autograd
/// paths (training, the reference engine) allocate and free many short-lived multi-megabyte
/// tensors, and the fast engine's passes buffers of several megabytes per layer and batch;
/// glibc would unmap each one and fault it back in, zeroed, on the next use.
///
/// One arena: glibc gives each thread that allocates an arena of its own, made of mapped heaps
/// of at most 64 MiB that it shrinks back as buffers are freed, so a worker thread's buffers
/// were faulted in again batch after batch. Measured on 200 sequences of the kronfluence bench
/// job (`infl fit`, 2 threads, two runs each): page faults 448k–888k → 168k–187k, system CPU
/// time 2.5–2.9 s → 0.9–1.5 s, peak RSS 1.0–1.2 GB → 0.68–0.76 GB. The passes allocate a few
/// large buffers per layer and batch, so one arena's lock is not contended.
///
/// Process-wide; [`crate::train::Trainer::new`] and the binary call it, and calling it again
/// does nothing.
pub fn keep_freed_memory() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("INFL_NO_MALLOPT").is_some() {
            return;
        }
        #[cfg(target_env = "gnu")]
        // SAFETY: mallopt only changes allocator thresholds; it is called once, before the
        // large allocations it concerns.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    });
}

/// Returns the freed memory the allocator keeps ([`keep_freed_memory`]) to the system, at the
/// boundary between two phases of a job: a phase's freed buffers are not the next phase's
/// sizes, so keeping them only adds to the peak the next phase reaches (about 0.2 GiB on a
/// 6-block 512-wide fit, against the 1 GiB it holds live), and `infl inspect`'s estimate of
/// that peak counts what is live.
pub fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free pages of the allocator's heap to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_safetensors_returns_the_written_files_sha256() {
        let dir = std::env::temp_dir().join(format!("infl-io-{}", std::process::id()));
        ensure_dir(&dir).unwrap();
        let path = dir.join("t.safetensors");
        let tensors = vec![
            ("a".to_string(), OwnedTensor::F32(vec![2, 3], vec![1.5; 6])),
            ("b".to_string(), OwnedTensor::F64(vec![4], vec![-0.25; 4])),
        ];
        let sha = write_safetensors(&path, &tensors, None).unwrap();
        // Hashed independently, from the file on disk.
        assert_eq!(sha, crate::data::sha256_file(&path).unwrap());
        assert_eq!(sha.len(), 64);
        let back = read_safetensors(&path).unwrap();
        assert_eq!(back["a"], (vec![2, 3], vec![1.5; 6]));
        assert_eq!(back["b"], (vec![4], vec![-0.25; 4]));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn atomic_files_appear_whole_at_the_commit() {
        use std::io::Write;
        let dir = std::env::temp_dir().join(format!("infl-io-atomic-{}", std::process::id()));
        ensure_dir(&dir).unwrap();
        let path = dir.join("out.txt");
        write_atomic(&path, b"old").unwrap();
        let mut f = AtomicFile::create(&path).unwrap();
        f.write_all(b"new ").unwrap();
        f.write_all(b"text").unwrap();
        assert_eq!(f.tmp_path(), temp_sibling(&path));
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"old",
            "unchanged until the commit"
        );
        f.sync_and_commit().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new text");
        assert!(!temp_sibling(&path).exists());
        // A directory built in its temporary sibling replaces the one in place.
        let sub = dir.join("store");
        ensure_dir(&sub).unwrap();
        std::fs::write(sub.join("stale"), b"x").unwrap();
        let tmp = temp_sibling(&sub);
        ensure_dir(&tmp).unwrap();
        std::fs::write(tmp.join("fresh"), b"y").unwrap();
        publish(&tmp, &sub).unwrap();
        assert!(sub.join("fresh").exists() && !sub.join("stale").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn failed_writes_leave_no_temporary_file() {
        use std::io::Write;
        let dir = std::env::temp_dir().join(format!("infl-io-failed-{}", std::process::id()));
        ensure_dir(&dir).unwrap();
        // Dropped uncommitted (an error on the way): its temporary file goes with it.
        let path = dir.join("big.jsonl");
        let mut f = AtomicFile::create(&path).unwrap();
        f.write_all(b"partial").unwrap();
        f.flush().unwrap();
        assert!(temp_sibling(&path).exists());
        drop(f);
        assert!(!temp_sibling(&path).exists() && !path.exists());
        // The rename fails (a non-empty directory is in the way): the temporary file is removed.
        let blocked = dir.join("blocked");
        ensure_dir(&blocked).unwrap();
        std::fs::write(blocked.join("x"), b"x").unwrap();
        assert!(write_atomic(&blocked, b"new").is_err());
        assert!(!temp_sibling(&blocked).exists());
        let mut f = AtomicFile::create(&blocked).unwrap();
        f.write_all(b"new").unwrap();
        assert!(f.commit().is_err());
        assert!(!temp_sibling(&blocked).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
