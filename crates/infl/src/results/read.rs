//! Reads a results directory written by `infl score` back into [`Results`], through the same
//! typed records the writer serialises (`meta.json`: [`ScoresMetaView`], the readers' view of
//! [`super::meta::ScoresMeta`]; `top_k.jsonl`: [`TopEntry`]; `distribution.json`,
//! `layers.json`), checking that every file agrees with `meta.json`'s queries and layers.
//! `infl report` and `infl compare` read results through it.

use super::meta::{QueriesInfo, ScoresMetaView};
use super::schema::{DistributionFile, LayersFile};
use super::{Direction, Distribution, LayerTotals, TopEntry};
use crate::error::{Error, Result};
use crate::io;
use std::path::{Path, PathBuf};

/// One query of a results directory.
#[derive(Debug, Clone)]
pub struct QueryInfo {
    pub id: String,
    /// −log p(completion | prompt), nats.
    pub loss: Option<f64>,
    pub prompt: Option<String>,
    pub completion: Option<String>,
}

/// A results directory written by `infl score`, read back.
#[derive(Debug, Clone)]
pub struct Results {
    pub dir: PathBuf,
    pub queries: Vec<QueryInfo>,
    pub queries_sha256: Option<String>,
    pub strategy: String,
    /// Score normalisation (`none`, `cosine`), when recorded.
    pub normalize: Option<String>,
    pub model: String,
    pub corpus: String,
    pub corpus_sha256: Option<String>,
    pub n_sequences: Option<usize>,
    /// Tracked layer names, in order, when known.
    pub layers: Option<Vec<String>>,
    pub entries: Vec<TopEntry>,
    /// Per query (in `queries` order): from distribution.json, else from the dense scores.
    pub distribution: Option<Vec<Distribution>>,
    /// Where `distribution` came from (a file name).
    pub distribution_source: Option<&'static str>,
    /// Per query (in `queries` order), from layers.json.
    pub layer_totals: Option<Vec<LayerTotals>>,
    /// Dense scores, one row per query, when scores.safetensors exists.
    pub dense: Option<Vec<Vec<f64>>>,
    /// What turns a score into nats on removal, when recorded.
    pub removal: Option<super::RemovalScale>,
    /// The pre-filter's recall estimates (prefilter.json), when the run was pre-filtered.
    pub prefilter: Option<super::PrefilterFile>,
    /// The ranking's stability across the fits of `fit --seeds` (stability.json).
    pub stability: Option<super::StabilityFile>,
}

/// A JSON file of the results read when present.
fn read_optional<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    match path.exists() {
        true => io::read_json(path).map(Some),
        false => Ok(None),
    }
}

impl Results {
    /// Reads `dir`: meta.json and top_k.jsonl are required; distribution.json, layers.json and
    /// scores.safetensors are read when present.
    pub fn open(dir: &Path) -> Result<Self> {
        let (meta, meta_path) = read_meta(dir)?;
        let queries_info = meta.queries.ok_or_else(|| {
            Error::input(format!(
                "{}: field `queries.ids` is missing or not an array of strings",
                meta_path.display()
            ))
        })?;
        let queries = query_infos(&queries_info, &meta_path)?;
        let ids = &queries_info.ids;
        // Older results: the layer names are those of `damping_per_layer` ([name, λ] pairs).
        let mut layers = meta.layers.or_else(|| {
            meta.damping_per_layer
                .map(|pairs| pairs.into_iter().map(|(name, _)| name).collect())
        });

        let entries = read_entries(&dir.join("top_k.jsonl"), ids, layers.as_deref())?;

        let dense = read_dense(&dir.join("scores.safetensors"), ids.len())?;
        let (distribution, distribution_source) =
            read_distribution(&dir.join("distribution.json"), ids, dense.as_deref())?;

        let layers_path = dir.join("layers.json");
        let layer_totals = if layers_path.exists() {
            let file = read_layers(&layers_path, ids)?;
            if let Some(names) = &layers {
                if names != &file.layers && entries.iter().any(|e| e.per_layer.is_some()) {
                    return Err(Error::input(format!(
                        "{}: `layers` {:?} differ from meta.json's {:?}",
                        layers_path.display(),
                        file.layers,
                        names
                    )));
                }
            }
            layers = Some(file.layers);
            Some(file.queries)
        } else {
            None
        };

        Ok(Results {
            dir: dir.to_path_buf(),
            queries,
            queries_sha256: Some(queries_info.sha256).filter(|s| !s.is_empty()),
            strategy: meta
                .strategy
                .map_or_else(|| "unknown".into(), |s| s.name().to_string()),
            normalize: meta.normalize.map(|n| serde_name(&n)),
            model: meta.model.path.unwrap_or_else(|| "unknown model".into()),
            corpus: meta.corpus.path.unwrap_or_else(|| "unknown corpus".into()),
            corpus_sha256: meta.corpus.sha256,
            n_sequences: meta.corpus.n_sequences,
            layers,
            entries,
            distribution,
            distribution_source,
            layer_totals,
            dense,
            removal: meta.removal,
            prefilter: read_optional(&dir.join("prefilter.json"))?,
            stability: super::stability::read_stability(dir)?,
        })
    }

    /// The entries of query `id` in one direction, by rank.
    pub fn entries(&self, id: &str, direction: Direction) -> Vec<&TopEntry> {
        let mut v: Vec<&TopEntry> = self
            .entries
            .iter()
            .filter(|e| e.query_id == id && e.direction == direction)
            .collect();
        v.sort_by_key(|e| e.rank);
        v
    }

    /// What this directory lacks for a full report, each with the command that produces it.
    pub fn missing(&self) -> Vec<String> {
        let mut m = Vec::new();
        if !self.entries.iter().any(|e| e.tokens.is_some()) {
            m.push(
                "per-token parts (token highlighting): run `infl score --per-token`".to_string(),
            );
        }
        if self.layer_totals.is_none() && !self.entries.iter().any(|e| e.per_layer.is_some()) {
            m.push("per-layer parts (layer chart): run `infl score --per-layer`".to_string());
        }
        if self.distribution.is_none() {
            m.push(
                "distribution statistics (tail fit and plot): no distribution.json or scores.safetensors; rerun `infl score` with this version of infl (or with `--dense`)"
                    .to_string(),
            );
        }
        if !self
            .entries
            .iter()
            .any(|e| e.direction == Direction::Bottom)
        {
            m.push("bottom-k sequences (most negative influence): rerun `infl score` with this version of infl".to_string());
        }
        if self
            .queries
            .iter()
            .all(|q| q.prompt.is_none() && q.completion.is_none())
        {
            m.push("query texts: meta.json has no `queries.prompts` (pre-tokenised queries, or an older `infl score`)".to_string());
        }
        m
    }
}

/// A unit enum's name as the files spell it (`Normalize::Cosine` → `cosine`).
fn serde_name<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// `dir`'s meta.json (and its path), which must describe scores.
fn read_meta(dir: &Path) -> Result<(ScoresMetaView, PathBuf)> {
    let meta_path = dir.join("meta.json");
    if !meta_path.exists() {
        return Err(Error::input(format!(
            "{}: not a results directory (no meta.json); create one with `infl score`",
            dir.display()
        )));
    }
    // The kind first: another kind of output (factors) does not parse as scores at all.
    let value: serde_json::Value = io::read_json(&meta_path)?;
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .map(str::to_string);
    let meta: ScoresMetaView = match &kind {
        Some(k) if k != "scores" => ScoresMetaView {
            kind,
            ..Default::default()
        },
        _ => serde_json::from_value(value)
            .map_err(|e| Error::input(format!("{}: {e}", meta_path.display())))?,
    };
    if let Some(kind) = &meta.kind {
        if kind != "scores" {
            return Err(Error::Mismatch(format!(
                "{}: holds `{kind}` (the output of `infl {}`), not scores; `infl report` and `infl compare` read a results directory written by `infl score`",
                meta_path.display(),
                if kind == "factors" { "fit" } else { kind.as_str() }
            )));
        }
    }
    Ok((meta, meta_path))
}

/// The queries of meta.json; a per-query list that is present must have one item per query.
fn query_infos(q: &QueriesInfo, meta_path: &Path) -> Result<Vec<QueryInfo>> {
    let n = q.ids.len();
    let per_query = |len: usize, what: &str| -> Result<bool> {
        match len {
            0 => Ok(false),
            l if l == n => Ok(true),
            _ => Err(Error::input(format!(
                "{}: field `queries.{what}` must hold one {} per query ({n})",
                meta_path.display(),
                if what == "losses" {
                    "number"
                } else {
                    "string or null"
                }
            ))),
        }
    };
    let (losses, prompts, completions) = (
        per_query(q.losses.len(), "losses")?,
        per_query(q.prompts.len(), "prompts")?,
        per_query(q.completions.len(), "completions")?,
    );
    Ok((0..n)
        .map(|i| QueryInfo {
            id: q.ids[i].clone(),
            // A non-finite loss is written as null, read back as NaN: not recorded.
            loss: losses.then(|| q.losses[i]).filter(|l| l.is_finite()),
            prompt: prompts.then(|| q.prompts[i].clone()).flatten(),
            completion: completions.then(|| q.completions[i].clone()).flatten(),
        })
        .collect())
}

/// The distribution statistics, in query order: from distribution.json, else computed from
/// the dense scores; with the name of the file they came from.
#[allow(clippy::type_complexity)]
fn read_distribution(
    dist_path: &Path,
    ids: &[String],
    dense: Option<&[Vec<f64>]>,
) -> Result<(Option<Vec<Distribution>>, Option<&'static str>)> {
    if dist_path.exists() {
        let file: DistributionFile = io::read_json(dist_path)?;
        let ordered = in_query_order(file.queries, ids, dist_path, |d| &d.query_id)?;
        for d in &ordered {
            if d.tail_pos
                .iter()
                .chain(&d.tail_neg)
                .any(|x| !(x.is_finite() && *x >= 0.0))
            {
                return Err(Error::input(format!(
                    "{}: query `{}`: `tail_pos` and `tail_neg` must hold non-negative finite magnitudes",
                    dist_path.display(),
                    d.query_id
                )));
            }
        }
        Ok((Some(ordered), Some("distribution.json")))
    } else if let Some(rows) = dense {
        let d = ids
            .iter()
            .zip(rows)
            .map(|(id, row)| Distribution::from_scores(id, row))
            .collect();
        Ok((Some(d), Some("scores.safetensors")))
    } else {
        Ok((None, None))
    }
}

/// layers.json with its queries in `ids`' order, each with one value per layer.
fn read_layers(layers_path: &Path, ids: &[String]) -> Result<LayersFile> {
    let file: LayersFile = io::read_json(layers_path)?;
    let queries = in_query_order(file.queries, ids, layers_path, |t| &t.query_id)?;
    for t in &queries {
        if t.total_per_layer.len() != file.layers.len()
            || t.abs_per_layer.len() != file.layers.len()
        {
            return Err(Error::input(format!(
                "{}: query `{}`: `total_per_layer` and `abs_per_layer` must have one value per layer ({})",
                layers_path.display(),
                t.query_id,
                file.layers.len()
            )));
        }
    }
    Ok(LayersFile {
        layers: file.layers,
        queries,
    })
}

/// Reorders per-query records to `ids`' order; every query must appear exactly once.
fn in_query_order<T>(
    items: Vec<T>,
    ids: &[String],
    file: &Path,
    id_of: impl Fn(&T) -> &String,
) -> Result<Vec<T>> {
    let mut slots: Vec<Option<T>> = (0..ids.len()).map(|_| None).collect();
    for item in items {
        let id = id_of(&item);
        let i = ids.iter().position(|q| q == id).ok_or_else(|| {
            Error::input(format!(
                "{}: query `{id}` is not among meta.json's `queries.ids`",
                file.display()
            ))
        })?;
        if slots[i].replace(item).is_some() {
            return Err(Error::input(format!(
                "{}: query `{}` has more than one record",
                file.display(),
                ids[i]
            )));
        }
    }
    slots
        .into_iter()
        .zip(ids)
        .map(|(s, id)| {
            s.ok_or_else(|| Error::input(format!("{}: no record for query `{id}`", file.display())))
        })
        .collect()
}

fn read_entries(path: &Path, ids: &[String], layers: Option<&[String]>) -> Result<Vec<TopEntry>> {
    if !path.exists() {
        return Err(Error::input(format!(
            "{}: missing; `infl score` writes it",
            path.display()
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let e: TopEntry = serde_json::from_str(line)
            .map_err(|err| Error::input(format!("{}:{}: {err}", path.display(), i + 1)))?;
        if !ids.contains(&e.query_id) {
            return Err(Error::input(format!(
                "{}:{}: query `{}` is not among meta.json's `queries.ids`",
                path.display(),
                i + 1,
                e.query_id
            )));
        }
        if let (Some(p), Some(names)) = (&e.per_layer, layers) {
            if p.len() != names.len() {
                return Err(Error::input(format!(
                    "{}:{}: `per_layer` has {} values but there are {} tracked layers",
                    path.display(),
                    i + 1,
                    p.len(),
                    names.len()
                )));
            }
        }
        out.push(e);
    }
    Ok(out)
}

fn read_dense(path: &Path, n_queries: usize) -> Result<Option<Vec<Vec<f64>>>> {
    if !path.exists() {
        return Ok(None);
    }
    let mut t = io::read_safetensors(path)?;
    let (shape, values) = t
        .remove("scores")
        .ok_or_else(|| Error::input(format!("{}: no tensor `scores`", path.display())))?;
    if shape.len() != 2 || shape[0] != n_queries {
        return Err(Error::input(format!(
            "{}: tensor `scores` has shape {shape:?}; expected [{n_queries}, n_train]",
            path.display()
        )));
    }
    Ok(Some(
        values
            .chunks(shape[1].max(1))
            .map(<[f64]>::to_vec)
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_query_records_must_name_each_query_once() {
        let ids = vec!["a".to_string(), "b".to_string()];
        let file = Path::new("layers.json");
        fn id(s: &String) -> &String {
            s
        }
        let ordered = in_query_order(vec!["b".into(), "a".into()], &ids, file, id).unwrap();
        assert_eq!(ordered, ids);
        // A second record of `a` used to replace the first without a word.
        let e = in_query_order(vec!["a".into(), "b".into(), "a".into()], &ids, file, id)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`a` has more than one record"), "{e}");
        let e = in_query_order(vec!["a".to_string()], &ids, file, id)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no record for query `b`"), "{e}");
    }
}
