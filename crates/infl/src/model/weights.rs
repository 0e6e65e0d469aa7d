//! Checkpoint tensors shared by every architecture: memory-mapped safetensors (one file or the
//! shards of `model.safetensors.index.json`, f32/f16/bf16 on disk, converted to f32 as loaded), or
//! owned tensors (random test models, dequantised GGUF files), placed on one candle device
//! (the CPU unless [`Weights::on`] chose another).

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Checkpoint tensors and the device they are loaded onto.
pub struct Weights {
    store: Store,
    device: Device,
}

/// Memory-mapped safetensors (single file or sharded), or owned tensors.
enum Store {
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
        let (paths, source) = weight_files(dir)?;
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
        Ok(Weights {
            store: Store::Mapped {
                files,
                names,
                source,
            },
            device: Device::Cpu,
        })
    }

    /// The same tensors, loaded onto `device` by [`Weights::get`].
    pub fn on(self, device: &Device) -> Self {
        Weights {
            device: device.clone(),
            ..self
        }
    }

    /// The device [`Weights::get`] loads onto.
    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn contains(&self, name: &str) -> bool {
        match &self.store {
            Store::Mapped { names, .. } => names.contains(name),
            Store::Owned { tensors, .. } => tensors.contains_key(name),
        }
    }

    /// Loads tensor `name` as f32 onto the device and checks its shape against the config.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let (t, source) = match &self.store {
            Store::Mapped {
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
            Store::Owned { tensors, source } => (
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
        // Converted on the CPU (mapped f16/bf16 files), then moved: one copy onto the device.
        Ok(t.to_dtype(DType::F32)?.to_device(&self.device)?)
    }
}

impl Weights {
    /// Owned tensors; `source` names them in error messages (a file, or "random weights").
    pub fn owned(tensors: HashMap<String, Tensor>, source: impl Into<String>) -> Self {
        Weights {
            store: Store::Owned {
                tensors,
                source: source.into(),
            },
            device: Device::Cpu,
        }
    }

    /// Where the tensors come from, for messages.
    pub fn source(&self) -> &str {
        match &self.store {
            Store::Mapped { source, .. } | Store::Owned { source, .. } => source,
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

/// The safetensors files holding a checkpoint's weights (one file, or the shards of
/// `model.safetensors.index.json`), and a description of where they came from for messages.
pub fn weight_files(dir: &Path) -> Result<(Vec<std::path::PathBuf>, String)> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if single.exists() {
        return Ok((vec![single.clone()], single.display().to_string()));
    }
    if !index.exists() {
        return Err(Error::input(format!(
            "{}: no model.safetensors or model.safetensors.index.json (PyTorch .bin checkpoints are not read; convert with `save_pretrained(safe_serialization=True)`)",
            dir.display()
        )));
    }
    let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::input(format!("{}: invalid JSON: {e}", index.display())))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::input(format!("{}: field `weight_map` missing", index.display())))?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|f| f.as_str().map(String::from))
        .collect();
    files.sort();
    files.dedup();
    Ok((
        files.iter().map(|f| dir.join(f)).collect(),
        index.display().to_string(),
    ))
}
