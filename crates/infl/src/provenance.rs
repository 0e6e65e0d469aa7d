//! What made an output: the identity of the checkpoint and of the corpus, recorded in every
//! `meta.json` (factors, results) so that a later stage can refuse inputs that do not belong
//! together.

use crate::data;
use crate::error::Result;
use crate::model::{self, TapModel};
use std::path::Path;

/// Every output directory's provenance file.
pub const META_FILE: &str = "meta.json";

/// The layout of the files this infl writes. 1: up to infl 0.1.0 (no `format_version` field);
/// 2: the options of the stage recorded as one flat set of keys ([`crate::options`]), `store` a
/// flag, `max_len` as asked; 3: the gradient store and the BM25 index carry checksums
/// ([`crate::checksum`]; `meta.json` is as in 2); 4: a store's `form` may be `auto`, which an
/// infl of format 3 cannot parse. This infl reads every format up to its own: a store of format
/// 1 or 2 unverified with a warning, an index of format 1 or 2 not at all.
pub const FORMAT_VERSION: u32 = 4;

/// The `format_version` of a `meta.json` without one.
pub fn format_1() -> u32 {
    1
}

/// Refuses a `meta.json` written by a newer infl, whose layout this one cannot know.
pub fn check_format(version: u32, path: &Path) -> Result<()> {
    if version > FORMAT_VERSION {
        return Err(crate::Error::Mismatch(format!(
            "{}: written in format {version} by a newer infl; this infl {} reads formats 1 to {FORMAT_VERSION}: upgrade infl",
            path.display(),
            env!("CARGO_PKG_VERSION")
        )));
    }
    Ok(())
}

/// Identity of a checkpoint: hashes of its config and weight files.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelInfo {
    pub path: String,
    pub architecture: String,
    pub config_sha256: String,
    pub weights_sha256: String,
    pub n_parameters: usize,
    /// The engine and device that computed the taps (`fast`, `cpu`; `autograd`, `cuda:0`).
    /// Results agree across them to f32 rounding; factors made on one score on another.
    #[serde(default)]
    pub engine: model::Engine,
    #[serde(default)]
    pub device: String,
    /// The LoRA adapter applied on top of the checkpoint, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<AdapterInfo>,
}

/// Identity of a PEFT LoRA adapter: its directory and the hash of its two files.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AdapterInfo {
    pub path: String,
    /// SHA-256 of `"<sha256 of adapter_config.json>,<sha256 of adapter_model.safetensors>"`.
    pub sha256: String,
}

impl AdapterInfo {
    pub fn of(dir: &Path) -> Result<Self> {
        let files = [model::lora::CONFIG_FILE, model::lora::WEIGHTS_FILE];
        if let Some(missing) = files.iter().find(|f| !dir.join(f).is_file()) {
            return Err(crate::Error::input(format!(
                "{}: no {missing}; --adapter must be a PEFT adapter directory \
                 (adapter_config.json + adapter_model.safetensors)",
                dir.display()
            )));
        }
        let files = files
            .iter()
            .map(|f| data::sha256_file(&dir.join(f)))
            .collect::<Result<Vec<_>>>()?;
        Ok(AdapterInfo {
            path: dir.display().to_string(),
            sha256: data::hex(&<sha2::Sha256 as sha2::Digest>::digest(
                files.join(",").as_bytes(),
            )),
        })
    }
}

impl ModelInfo {
    /// `dir` is a checkpoint directory (config.json and weight files hashed) or a GGUF file
    /// (the file holds config and weights: both hashes are its hash).
    pub fn of(dir: &Path, model: &dyn TapModel) -> Result<Self> {
        if model::gguf::is_gguf(dir) {
            let sha = data::sha256_file(dir)?;
            return Ok(ModelInfo {
                path: dir.display().to_string(),
                architecture: model.architecture().to_string(),
                config_sha256: sha.clone(),
                weights_sha256: sha,
                n_parameters: model.n_parameters(),
                engine: model.engine(),
                device: model.device().to_string(),
                adapter: None,
            });
        }
        let (files, _) = model::weight_files(dir)?;
        let weights = files
            .iter()
            .map(|p| data::sha256_file(p))
            .collect::<Result<Vec<_>>>()?;
        Ok(ModelInfo {
            path: dir.display().to_string(),
            architecture: model.architecture().to_string(),
            config_sha256: data::sha256_file(&dir.join("config.json"))?,
            weights_sha256: data::hex(&<sha2::Sha256 as sha2::Digest>::digest(
                weights.join(",").as_bytes(),
            )),
            n_parameters: model.n_parameters(),
            engine: model.engine(),
            device: model.device().to_string(),
            adapter: None,
        })
    }

    /// The same checkpoint with `adapter` (a PEFT adapter directory) applied, if any.
    pub fn with_adapter(self, adapter: Option<&Path>) -> Result<Self> {
        Ok(ModelInfo {
            adapter: adapter.map(AdapterInfo::of).transpose()?,
            ..self
        })
    }
}

impl AdapterInfo {
    /// Refuses outputs made with another adapter than `this` run's (or with one where this run
    /// has none, or the reverse): `what` names them (`the factors in DIR`).
    pub fn check(
        this: &Option<AdapterInfo>,
        made_with: &Option<AdapterInfo>,
        what: &str,
    ) -> Result<()> {
        if this == made_with {
            return Ok(());
        }
        let describe = |a: &Option<AdapterInfo>| match a {
            Some(a) => format!("adapter {} (sha256 {}…)", a.path, &a.sha256[..12]),
            None => "no adapter".to_string(),
        };
        Err(crate::Error::Mismatch(format!(
            "{what} were made with {}, but this run has {}; give the same --adapter, or rerun \
             `infl fit` with this one",
            describe(made_with),
            describe(this)
        )))
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CorpusInfo {
    pub path: String,
    pub sha256: String,
    pub max_len: usize,
    pub n_documents: usize,
    pub n_sequences: usize,
    pub n_tokens: usize,
}

impl CorpusInfo {
    pub fn streamed(path: &Path, stats: &data::CorpusStats, max_len: usize) -> Self {
        CorpusInfo {
            path: path.display().to_string(),
            sha256: stats.sha256.clone(),
            max_len,
            n_documents: stats.n_documents,
            n_sequences: stats.n_sequences,
            n_tokens: stats.n_tokens,
        }
    }
}
