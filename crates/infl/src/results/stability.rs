//! Stability of a ranking across K fits (`fit --seeds K`, `stability.json`): the scoring pass
//! dots each training gradient with every fit's preconditioned queries, and per query a
//! [`Track`] keeps the seed fit's top-k with each of those sequences' score in every fit, and
//! every other fit's own ranking to [`DEPTH`]. From them: the overlap of the fits' top-k (mean
//! pairwise Jaccard, and the share in all of them), each top sequence's rank in every fit
//! (min–max) and its score's spread (standard deviation over the fits, and relative to the
//! mean's magnitude). A query whose overlap is below `score --stable-overlap` (default
//! [`crate::options::DEFAULT_STABLE_OVERLAP`]) is flagged.

use super::{Prefilter, QuerySummary, TopEntry};
use crate::error::{Error, Result};
use faer::Mat;
use std::path::Path;

/// How deep each other fit's ranking is kept: a top sequence of the seed fit ranked below this
/// in another fit has its rank there reported as null (beyond [`DEPTH`]).
pub const DEPTH: usize = 1000;

/// One sequence and its score in every fit (the seed fit's first).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Tracked {
    pub index: usize,
    pub scores: Vec<f64>,
}

/// What the pass keeps of one query for its stability: saved with the query's summary.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Track {
    k: usize,
    /// The seed fit's top-k (its order: by score, ties by corpus position), every fit's score.
    top: Vec<Tracked>,
    /// Every other fit's top [`DEPTH`] (corpus index, score), in the same order.
    fits: Vec<Vec<(usize, f64)>>,
}

impl Track {
    /// A track of `n_fits` fits (the seed fit included) keeping the top `k`.
    pub fn new(n_fits: usize, k: usize) -> Self {
        Track {
            k,
            top: Vec::new(),
            fits: vec![Vec::new(); n_fits.saturating_sub(1)],
        }
    }

    /// Adds sequence `index` with its score in every fit (`scores[0]`: the seed fit's). A
    /// sequence enters a list only above a strictly lower score: the first of equals stays
    /// first, as in the summary's own top-k.
    pub fn push(&mut self, index: usize, scores: &[f64]) {
        let Some(&main) = scores.first() else { return };
        if self.top.len() < self.k || self.top.last().is_some_and(|t| main > t.scores[0]) {
            let pos = self
                .top
                .iter()
                .position(|t| main > t.scores[0])
                .unwrap_or(self.top.len());
            self.top.insert(
                pos,
                Tracked {
                    index,
                    scores: scores.to_vec(),
                },
            );
            self.top.truncate(self.k);
        }
        for (list, &s) in self.fits.iter_mut().zip(&scores[1..]) {
            if list.len() == DEPTH && list.last().is_some_and(|l| s <= l.1) {
                continue;
            }
            let pos = list.iter().position(|l| s > l.1).unwrap_or(list.len());
            list.insert(pos, (index, s));
            list.truncate(DEPTH);
        }
    }
}

/// Adds a batch to every query's track: `fits[j][ℓ]` is fit j's layer-ℓ scores
/// `[n_queries, n_seq]` (fit 0 the seed fit, summed over layers as the summary sums them).
/// Only a query's pre-filter candidates count, as in its summary.
pub fn track_batch(
    summaries: &mut [QuerySummary],
    indices: &[usize],
    fits: &[&[Mat<f32>]],
    prefilter: Option<Prefilter<'_>>,
) {
    for (q, summary) in summaries.iter_mut().enumerate() {
        let Some(track) = summary.stability.as_mut() else {
            continue;
        };
        for (n, &index) in indices.iter().enumerate() {
            if prefilter.is_some_and(|p| !p.candidates[q].contains(&index)) {
                continue;
            }
            let scores: Vec<f64> = fits
                .iter()
                .map(|parts| parts.iter().map(|p| p[(q, n)] as f64).sum())
                .collect();
            track.push(index, &scores);
        }
    }
}

/// One top sequence of the seed fit across the fits (in `stability.json` and on its
/// `top_k.jsonl` line).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SequenceStability {
    /// Its rank in each fit, in seed order (1 = first; null: below the top [`DEPTH`]).
    pub ranks: Vec<Option<usize>>,
    pub rank_min: usize,
    /// Null when some fit ranks it below the top [`DEPTH`].
    pub rank_max: Option<usize>,
    /// Its score in each fit, in seed order.
    pub scores: Vec<f64>,
    /// Standard deviation of `scores` (over the K fits, divided by K − 1).
    pub score_std: f64,
    /// `score_std / |mean(scores)|` (null when the mean is 0).
    pub score_rel_std: Option<f64>,
}

/// One query's stability record in `stability.json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct QueryStability {
    pub query_id: String,
    /// Mean over pairs of fits of |A ∩ B| / |A ∪ B|, A and B the two fits' top-k sets.
    pub overlap: f64,
    /// Share of the seed fit's top-k that is in every fit's top-k.
    pub shared: f64,
    /// `overlap` ≥ the file's `stable_overlap`.
    pub stable: bool,
    /// The seed fit's top-k, best first.
    pub top: Vec<TopStability>,
}

/// A top sequence's record in `stability.json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TopStability {
    pub sequence_id: String,
    #[serde(flatten)]
    pub spread: SequenceStability,
}

/// `stability.json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StabilityFile {
    /// The fits' sampled-Fisher seeds; the first is the one whose scores the results hold.
    pub seeds: Vec<u64>,
    pub top_k: usize,
    /// Ranks below this are not tracked (null).
    pub depth: usize,
    /// A query whose overlap is below this is flagged as not stable.
    pub stable_overlap: f64,
    pub queries: Vec<QueryStability>,
}

/// A query's stability from its track, the seed fit's top list naming the sequences.
fn query_stability(
    query_id: &str,
    summary: &QuerySummary,
    track: &Track,
    threshold: f64,
) -> QueryStability {
    let k = track.k;
    let main: Vec<usize> = track.top.iter().map(|t| t.index).collect();
    let mut sets: Vec<Vec<usize>> = vec![main.clone()];
    sets.extend(
        track
            .fits
            .iter()
            .map(|f| f.iter().take(k).map(|l| l.0).collect()),
    );
    let mut pairs = Vec::new();
    for (i, a) in sets.iter().enumerate() {
        for b in &sets[i + 1..] {
            let inter = a.iter().filter(|x| b.contains(x)).count();
            let union = a.len() + b.len() - inter;
            pairs.push(if union == 0 {
                1.0
            } else {
                inter as f64 / union as f64
            });
        }
    }
    let overlap = match pairs.len() {
        0 => 1.0,
        n => pairs.iter().sum::<f64>() / n as f64,
    };
    let in_all = main
        .iter()
        .filter(|x| sets.iter().all(|s| s.contains(x)))
        .count();
    let top = track
        .top
        .iter()
        .enumerate()
        .map(|(r, t)| {
            let mut ranks = vec![Some(r + 1)];
            ranks.extend(
                track
                    .fits
                    .iter()
                    .map(|f| f.iter().position(|l| l.0 == t.index).map(|p| p + 1)),
            );
            let sequence_id = summary
                .top
                .iter()
                .find(|c| c.index == t.index)
                .map_or_else(|| t.index.to_string(), |c| c.sequence_id.clone());
            TopStability {
                sequence_id,
                spread: spread(ranks, &t.scores),
            }
        })
        .collect();
    QueryStability {
        query_id: query_id.to_string(),
        overlap,
        shared: in_all as f64 / main.len().max(1) as f64,
        stable: overlap >= threshold,
        top,
    }
}

/// Rank range and score spread of one sequence over the fits.
fn spread(ranks: Vec<Option<usize>>, scores: &[f64]) -> SequenceStability {
    let n = scores.len() as f64;
    let mean = scores.iter().sum::<f64>() / n;
    let var = match scores.len() {
        0 | 1 => 0.0,
        _ => scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (n - 1.0),
    };
    let std = var.sqrt();
    SequenceStability {
        rank_min: ranks.iter().flatten().copied().min().unwrap_or(0),
        rank_max: ranks
            .iter()
            .copied()
            .collect::<Option<Vec<usize>>>()
            .and_then(|r| r.into_iter().max()),
        ranks,
        scores: scores.to_vec(),
        score_std: std,
        score_rel_std: (mean != 0.0).then(|| std / mean.abs()),
    }
}

/// Every query's stability, when the summaries carry tracks (a `--seeds` fit); None otherwise.
pub fn stability(
    summaries: &[QuerySummary],
    query_ids: &[String],
    seeds: &[u64],
    (top_k, threshold): (usize, f64),
) -> Option<StabilityFile> {
    let queries: Option<Vec<QueryStability>> = summaries
        .iter()
        .zip(query_ids)
        .map(|(s, id)| {
            s.stability
                .as_ref()
                .map(|t| query_stability(id, s, t, threshold))
        })
        .collect();
    Some(StabilityFile {
        seeds: seeds.to_vec(),
        top_k,
        depth: DEPTH,
        stable_overlap: threshold,
        queries: queries.filter(|q| !q.is_empty())?,
    })
}

/// Puts each top sequence's spread on its `top_k.jsonl` entry.
pub fn annotate(entries: &mut [TopEntry], file: &StabilityFile) {
    for q in &file.queries {
        for (rank, t) in q.top.iter().enumerate() {
            if let Some(e) = entries.iter_mut().find(|e| {
                e.query_id == q.query_id
                    && e.direction == super::Direction::Top
                    && e.rank == rank + 1
                    && e.sequence_id == t.sequence_id
            }) {
                e.stability = Some(t.spread.clone());
            }
        }
    }
}

/// Writes `stability.json`.
pub fn write_stability(path: &Path, file: &StabilityFile) -> Result<()> {
    let value = serde_json::to_value(file).map_err(|e| Error::Other(e.to_string()))?;
    crate::io::write_json(path, &value)
}

/// Reads `stability.json` when the results have one.
pub fn read_stability(dir: &Path) -> Result<Option<StabilityFile>> {
    let path = dir.join("stability.json");
    match path.exists() {
        true => crate::io::read_json(&path).map(Some),
        false => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_keep_the_summary_order_and_every_fit_ranking() {
        let mut t = Track::new(2, 2);
        // (index, seed fit, other fit)
        for (i, a, b) in [(0, 1.0, 5.0), (1, 3.0, 1.0), (2, 3.0, 4.0), (3, 0.5, 9.0)] {
            t.push(i, &[a, b]);
        }
        // Ties keep the earlier sequence first.
        assert_eq!(t.top.iter().map(|x| x.index).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(t.fits[0], [(3, 9.0), (0, 5.0), (2, 4.0), (1, 1.0)]);
        let q = query_stability("q", &QuerySummary::new(0), &t, 0.5);
        // Top-2 sets {1, 2} and {3, 0}: no overlap.
        assert_eq!((q.overlap, q.shared, q.stable), (0.0, 0.0, false));
        assert_eq!(q.top[1].spread.ranks, [Some(2), Some(3)]);
        assert_eq!(
            (q.top[1].spread.rank_min, q.top[1].spread.rank_max),
            (2, Some(3))
        );
        // Scores 3 and 4: mean 3.5, sample std √0.5.
        let s = &q.top[1].spread;
        assert!((s.score_std - 0.5f64.sqrt()).abs() < 1e-12);
        assert!((s.score_rel_std.unwrap() - 0.5f64.sqrt() / 3.5).abs() < 1e-12);
    }

    #[test]
    fn overlap_is_the_mean_pairwise_jaccard() {
        let mut t = Track::new(3, 2);
        // Top-2 per fit: {0, 1}, {0, 2}, {0, 1}: Jaccard 1/3, 1, 1/3.
        for (i, s) in [
            (0, [9.0, 9.0, 9.0]),
            (1, [8.0, 1.0, 8.0]),
            (2, [1.0, 8.0, 1.0]),
        ] {
            t.push(i, &s);
        }
        let q = query_stability("q", &QuerySummary::new(0), &t, 0.5);
        assert!((q.overlap - 5.0 / 9.0).abs() < 1e-12, "{}", q.overlap);
        assert_eq!((q.shared, q.stable), (0.5, true));
    }
}
