//! A safetensors file read one tensor at a time: the header is parsed once, and each tensor's
//! bytes are read from the file when it is asked for, so reading large factors layer by layer
//! holds one tensor (not the file) in memory.

use crate::error::{Error, Result};
use safetensors::tensor::{Dtype, TensorInfo};
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

pub struct TensorFile {
    path: PathBuf,
    file: std::fs::File,
    tensors: HashMap<String, TensorInfo>,
    /// Where the data section starts (after the length and the header).
    data_start: u64,
    /// The first failed [`TensorFile::read_range`] (a tensor written from this file).
    failed: std::sync::Mutex<Option<String>>,
}

impl TensorFile {
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let bad = |why: String| {
            Error::input(format!("{}: not a safetensors file: {why}", path.display()))
        };
        let mut len = [0u8; 8];
        file.read_exact(&mut len)
            .map_err(|e| bad(format!("no header ({e})")))?;
        let n = u64::from_le_bytes(len);
        let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if n > 100_000_000 || 8 + n > size {
            return Err(bad(format!("a header of {n} bytes in a file of {size}")));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header)
            .map_err(|e| bad(format!("truncated header ({e})")))?;
        let raw: HashMap<String, serde_json::Value> =
            serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
        let data_len = size - 8 - n;
        let mut tensors = HashMap::new();
        for (name, value) in raw {
            if name == "__metadata__" {
                continue;
            }
            let info: TensorInfo =
                serde_json::from_value(value).map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
            let (start, end) = info.data_offsets;
            let elements = info.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let expected = elements.and_then(|e| e.checked_mul(info.dtype.bitsize() / 8));
            if start > end || end as u64 > data_len || expected != Some(end - start) {
                return Err(bad(format!(
                    "tensor `{name}`: bytes {start}..{end} do not hold shape {:?} within the {data_len} bytes of data",
                    info.shape
                )));
            }
            tensors.insert(name, info);
        }
        Ok(TensorFile {
            path: path.to_path_buf(),
            file,
            tensors,
            data_start: 8 + n,
            failed: std::sync::Mutex::new(None),
        })
    }

    /// Every tensor's name.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub(super) fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// Bytes `start..end` of the data section; on a failed read, zeros, with the failure kept
    /// for [`TensorFile::read_error`] (a writer's `data()` cannot return an error).
    pub(super) fn read_range(&self, (start, end): (usize, usize)) -> Vec<u8> {
        let mut bytes = vec![0u8; end - start];
        let mut f = &self.file;
        let read = f
            .seek(SeekFrom::Start(self.data_start + start as u64))
            .and_then(|_| f.read_exact(&mut bytes));
        if let Err(e) = read {
            let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
            failed.get_or_insert_with(|| format!("{}: {e}", self.path.display()));
        }
        bytes
    }

    /// The first read that failed while tensors of this file were written elsewhere.
    pub fn read_error(&self) -> Option<String> {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The bytes and dtype of tensor `name`, checked to have `shape`.
    fn bytes(&mut self, name: &str, shape: &[usize]) -> Result<(Dtype, Vec<u8>)> {
        let what = self.path.display();
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::Mismatch(format!("{what}: tensor `{name}` is missing")))?;
        if info.shape != shape {
            return Err(Error::Mismatch(format!(
                "{what}: tensor `{name}` has shape {:?}, the model's layer needs {shape:?}",
                info.shape
            )));
        }
        let (start, end) = info.data_offsets;
        let dtype = info.dtype;
        let mut bytes = vec![0u8; end - start];
        self.file
            .seek(SeekFrom::Start(self.data_start + start as u64))
            .and_then(|_| self.file.read_exact(&mut bytes))
            .map_err(|e| Error::io(&self.path, e))?;
        Ok((dtype, bytes))
    }

    /// Tensor `name` (`rows × cols`, f32 on disk, row-major) as a matrix.
    pub fn mat_f32(&mut self, name: &str, rows: usize, cols: usize) -> Result<faer::Mat<f32>> {
        let (dtype, bytes) = self.bytes(name, &[rows, cols])?;
        if dtype != Dtype::F32 {
            return Err(Error::Mismatch(format!(
                "{}: tensor `{name}` is {dtype:?}; expected F32",
                self.path.display()
            )));
        }
        let at = |k: usize| {
            f32::from_le_bytes([
                bytes[4 * k],
                bytes[4 * k + 1],
                bytes[4 * k + 2],
                bytes[4 * k + 3],
            ])
        };
        Ok(faer::Mat::from_fn(rows, cols, |i, j| at(i * cols + j)))
    }

    /// Tensor `name` (`rows × cols`, f64 on disk, row-major) as a matrix: running sums
    /// read back one at a time.
    pub fn mat_f64(&mut self, name: &str, rows: usize, cols: usize) -> Result<faer::Mat<f64>> {
        let (dtype, bytes) = self.bytes(name, &[rows, cols])?;
        if dtype != Dtype::F64 {
            return Err(Error::Mismatch(format!(
                "{}: tensor `{name}` is {dtype:?}; expected F64",
                self.path.display()
            )));
        }
        let at =
            |k: usize| f64::from_le_bytes(bytes[8 * k..8 * k + 8].try_into().expect("8 bytes"));
        Ok(faer::Mat::from_fn(rows, cols, |i, j| at(i * cols + j)))
    }

    /// Tensor `name` (`len` values, f32 or f64 on disk) as f64.
    pub fn vec_f64(&mut self, name: &str, len: usize) -> Result<Vec<f64>> {
        let (dtype, bytes) = self.bytes(name, &[len])?;
        match dtype {
            Dtype::F64 => Ok(bytes
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect()),
            Dtype::F32 => Ok(bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")) as f64)
                .collect()),
            other => Err(Error::Mismatch(format!(
                "{}: tensor `{name}` is {other:?}; expected F32 or F64",
                self.path.display()
            ))),
        }
    }
}
