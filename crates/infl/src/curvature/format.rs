//! The factors directory: `factors.safetensors` (the tensors, [`super::Factors::to_tensors`])
//! and its `meta.json` ([`FactorsMeta`]), which vouches for the tensors by hash.

use crate::data;
use crate::error::{Error, Result};
use crate::io;
use crate::options::FitOptions;
use crate::provenance::{check_format, format_1, CorpusInfo, ModelInfo, FORMAT_VERSION, META_FILE};
use std::path::Path;

pub const FACTORS_FILE: &str = "factors.safetensors";

/// `meta.json` of a factors directory.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FactorsMeta {
    /// [`crate::provenance::FORMAT_VERSION`] when written.
    #[serde(default = "format_1")]
    pub format_version: u32,
    pub tool: String,
    pub version: String,
    pub kind: String,
    /// The fit's options, as top-level keys.
    #[serde(flatten)]
    pub options: FitOptions,
    pub model: ModelInfo,
    pub corpus: CorpusInfo,
    /// Each tracked layer's name, shape and fitted statistics' summary.
    pub layers: Vec<std::collections::BTreeMap<String, serde_json::Value>>,
    pub factors_sha256: String,
    /// Format 1 kept `batch_size` and `seed` (with a copy of the strategy and Fisher) here.
    #[serde(default, rename = "options", skip_serializing)]
    format_1_options: Option<Format1Options>,
}

#[derive(Debug, Clone, serde::Deserialize)]
struct Format1Options {
    batch_size: usize,
    seed: u64,
}

impl FactorsMeta {
    pub fn new(
        options: FitOptions,
        model: ModelInfo,
        corpus: CorpusInfo,
        layers: Vec<std::collections::BTreeMap<String, serde_json::Value>>,
        factors_sha256: String,
    ) -> Self {
        FactorsMeta {
            format_version: FORMAT_VERSION,
            tool: "infl".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            kind: "factors".into(),
            options,
            model,
            corpus,
            layers,
            factors_sha256,
            format_1_options: None,
        }
    }

    /// Reads a factors `meta.json` of any format this infl knows.
    pub fn read(path: &Path) -> Result<Self> {
        let mut meta: FactorsMeta = io::read_json(path)?;
        check_format(meta.format_version, path)?;
        if let Some(old) = meta.format_1_options.take() {
            meta.options.batch_size = old.batch_size;
            meta.options.seed = old.seed;
        }
        Ok(meta)
    }
}

/// Reads a factors directory, checking it is complete and belongs to `model_dir`'s checkpoint.
pub fn open_factors(dir: &Path) -> Result<FactorsMeta> {
    let meta = factors_meta(dir)?;
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

/// The meta.json of the factors directory `dir`, checked to be a factors directory's, without
/// reading the factors (for a refusal that needs only the fit's options; [`open_factors`]
/// checks the file too).
pub fn factors_meta(dir: &Path) -> Result<FactorsMeta> {
    let meta_path = dir.join(META_FILE);
    if !meta_path.exists() {
        return Err(Error::input(format!(
            "{}: not a factors directory (no meta.json); create one with `infl fit`",
            dir.display()
        )));
    }
    let meta = FactorsMeta::read(&meta_path)?;
    if meta.kind != "factors" {
        return Err(Error::Mismatch(format!(
            "{}: holds `{}`, not factors",
            meta_path.display(),
            meta.kind
        )));
    }
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::curvature::{Fisher, Strategy};
    use crate::model::ModuleSelection;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/format1")
            .join(name)
    }

    /// A factors meta.json written by infl 0.1.0 (format 1: batch size and seed nested under
    /// `options`), with batch size 5 and seed 7 so that defaults cannot pass for them.
    #[test]
    fn format_1_factors_meta_reads_with_its_options() {
        let meta = FactorsMeta::read(&fixture("factors_meta.json")).unwrap();
        assert_eq!(meta.format_version, 1);
        assert_eq!(meta.options.strategy, Strategy::Ekfac);
        assert_eq!(meta.options.fisher, Fisher::Sampled);
        assert_eq!(meta.options.modules, ModuleSelection::All);
        assert_eq!(meta.options.layers, None);
        assert_eq!((meta.options.batch_size, meta.options.seed), (5, 7));
        assert_eq!(meta.layers.len(), 2);
    }

    #[test]
    fn factors_meta_round_trips_and_newer_formats_are_refused() {
        let old = FactorsMeta::read(&fixture("factors_meta.json")).unwrap();
        let options = FitOptions {
            layers: Some(vec!["h.0.mlp.c_fc".into()]),
            seed: 9,
            ..old.options.clone()
        };
        let meta = FactorsMeta::new(
            options.clone(),
            old.model.clone(),
            old.corpus.clone(),
            old.layers.clone(),
            old.factors_sha256.clone(),
        );
        let dir = std::env::temp_dir().join(format!("infl-format-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("meta.json");
        io::write_json(&path, &meta).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"selected_layers\""), "{text}");
        assert!(!text.contains("\"options\""), "{text}");
        let back = FactorsMeta::read(&path).unwrap();
        assert_eq!(back.format_version, FORMAT_VERSION);
        assert_eq!(back.options, options);
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["format_version"] = (FORMAT_VERSION + 1).into();
        io::write_json(&path, &v).unwrap();
        let err = FactorsMeta::read(&path).unwrap_err().to_string();
        assert!(err.contains("newer infl"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
