//! Checkpoint tensors shared by every architecture: memory-mapped safetensors (one file or the
//! shards of `model.safetensors.index.json`, f32/f16/bf16 on disk, converted to f32 as loaded), or
//! owned tensors (random test models, dequantised GGUF files).

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Checkpoint tensors: memory-mapped safetensors (single file or sharded), or owned tensors.
pub enum Weights {
    Mapped {
        files: candle_core::safetensors::MmapedSafetensors,
        names: std::collections::HashSet<String>,
        source: String,
    },
    Owned {
        tensors: HashMap<String, Tensor>,
        source: String,
    },
}

impl Weights {
    pub fn open(dir: &Path) -> Result<Self> {
        let (paths, source) = super::weight_files(dir)?;
        for p in &paths {
            if !p.exists() {
                return Err(Error::input(format!(
                    "{source}: weight file {} is missing",
                    p.display()
                )));
            }
        }
        // SAFETY: the files are mapped read-only; like every mmap user we rely on nobody
        // truncating a checkpoint while it is being read.
        let files = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&paths) }
            .map_err(|e| Error::input(format!("{source}: not a readable safetensors file: {e}")))?;
        let names = files.tensors().into_iter().map(|(n, _)| n).collect();
        Ok(Weights::Mapped {
            files,
            names,
            source,
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        match self {
            Weights::Mapped { names, .. } => names.contains(name),
            Weights::Owned { tensors, .. } => tensors.contains_key(name),
        }
    }

    /// Loads tensor `name` as f32 and checks its shape against the config.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let (t, source) = match self {
            Weights::Mapped {
                files,
                names,
                source,
            } => {
                if !names.contains(name) {
                    return Err(Error::input(format!(
                        "{source}: tensor `{name}` is missing"
                    )));
                }
                (files.load(name, &Device::Cpu)?, source.as_str())
            }
            Weights::Owned { tensors, source } => (
                tensors
                    .get(name)
                    .cloned()
                    .ok_or_else(|| Error::input(format!("{source}: tensor `{name}` is missing")))?,
                source.as_str(),
            ),
        };
        if t.dims() != shape {
            return Err(Error::input(format!(
                "{source}: tensor `{name}` has shape {:?} but the config implies {:?}",
                t.dims(),
                shape
            )));
        }
        Ok(t.to_dtype(DType::F32)?)
    }
}

impl Weights {
    /// Owned tensors; `source` names them in error messages (a file, or "random weights").
    pub fn owned(tensors: HashMap<String, Tensor>, source: impl Into<String>) -> Self {
        Weights::Owned {
            tensors,
            source: source.into(),
        }
    }

    /// Where the tensors come from, for messages.
    pub fn source(&self) -> &str {
        match self {
            Weights::Mapped { source, .. } | Weights::Owned { source, .. } => source,
        }
    }

    /// Loads `name` if the checkpoint has it (optional tensors such as an untied LM head).
    pub fn get_opt(&self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        if self.contains(name) {
            self.get(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }
}
