//! The factors directory: `factors.safetensors` (the tensors, [`super::Factors::to_tensors`])
//! and its `meta.json` ([`FactorsMeta`]), which vouches for the tensors by hash.

use super::{Fisher, FitOptions, Strategy};
use crate::data;
use crate::error::{Error, Result};
use crate::io;
use crate::model::ModuleSelection;
use crate::provenance::{CorpusInfo, ModelInfo, META_FILE};
use std::path::Path;

pub const FACTORS_FILE: &str = "factors.safetensors";

/// `meta.json` of a factors directory.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FactorsMeta {
    pub tool: String,
    pub version: String,
    pub kind: String,
    pub strategy: Strategy,
    pub fisher: Fisher,
    pub modules: ModuleSelection,
    pub options: FitOptions,
    pub model: ModelInfo,
    pub corpus: CorpusInfo,
    pub layers: Vec<std::collections::HashMap<String, serde_json::Value>>,
    /// The explicit layer list of `fit --layers`, if one was given.
    #[serde(default)]
    pub selected_layers: Option<Vec<String>>,
    pub factors_sha256: String,
}

/// Reads a factors directory, checking it is complete and belongs to `model_dir`'s checkpoint.
pub fn open_factors(dir: &Path) -> Result<FactorsMeta> {
    let meta_path = dir.join(META_FILE);
    if !meta_path.exists() {
        return Err(Error::input(format!(
            "{}: not a factors directory (no meta.json); create one with `infl fit`",
            dir.display()
        )));
    }
    let meta: FactorsMeta = io::read_json(&meta_path)?;
    if meta.kind != "factors" {
        return Err(Error::Mismatch(format!(
            "{}: holds `{}`, not factors",
            meta_path.display(),
            meta.kind
        )));
    }
    let st = dir.join(FACTORS_FILE);
    let sha = data::sha256_file(&st)?;
    if sha != meta.factors_sha256 {
        return Err(Error::Mismatch(format!(
            "{}: its hash does not match meta.json (a fit was interrupted or the file was replaced); rerun `infl fit`",
            st.display()
        )));
    }
    Ok(meta)
}
