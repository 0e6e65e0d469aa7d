//! The passes' parts timed apart, for `infl bench --passes-only`: the forward and activation
//! backward alone (every batch, through the passes' own driver), and each pass's statistics
//! alone on a few batches' taps. A pass overlaps the two, so the parts say which of them is
//! off its floor, and their sum against the pass says what the overlap wins or loses.
//!
//! The statistics' cost does not depend on the values they are formed from, so they are timed
//! with dense stand-ins for the eigenbases and the queries: every product has the shape it has
//! in a real fit and score.

use crate::curvature::{self, Eigenbasis, Pass, PassSums};
use crate::data::Sequence;
use crate::error::Result;
use crate::influence::{self, LayerQueries};
use crate::model::{Labels, TapBatch, TapModel, TokenBatch};
use crate::pass::{self, Silent};
use faer::Mat;
use std::time::Instant;

/// Batches whose taps the statistics are timed on (each is a batch's taps kept in memory).
pub const KEPT_BATCHES: usize = 4;

/// Seconds of each part over the whole corpus.
#[derive(Debug, Clone, Copy)]
pub struct PartSeconds {
    /// Forward and activation backward of every batch, nothing consuming the taps.
    pub taps: f64,
    /// The covariance pass's Grams, timed on the kept batches and scaled by tokens.
    pub covariance: f64,
    /// The eigenvalue pass's rotations and squared per-sequence products, likewise.
    pub eigenvalue: f64,
    /// The scoring pass's per-sequence products and dot products with `n_queries`, likewise.
    pub scoring: f64,
}

/// Times the parts of the passes over `seqs` in batches of `batch_size`, the scoring part with
/// `n_queries` full-rank queries.
pub fn time_parts(
    model: &dyn TapModel,
    seqs: &[Sequence],
    batch_size: usize,
    n_queries: usize,
) -> Result<PartSeconds> {
    crate::linalg::flush_subnormals();
    let tracked = model.tracked().to_vec();
    let size = batch_size.max(1);
    let started = Instant::now();
    pass::run_batches(
        model,
        seqs,
        0,
        size,
        Labels::Data,
        &Silent,
        "taps alone",
        |_, _| Ok(()),
    )?;
    let taps = started.elapsed().as_secs_f64();

    // Kept apart from the timed run: copying taps out of the visit would slow that run down.
    let kept: Vec<TapBatch> = seqs
        .chunks(size)
        .take(KEPT_BATCHES)
        .map(|chunk| {
            let refs: Vec<(u64, &[u32])> = chunk
                .iter()
                .enumerate()
                .map(|(k, s)| (k as u64, s.ids.as_slice()))
                .collect();
            model.taps(&TokenBatch::training(&refs), Labels::Data)
        })
        .collect::<Result<_>>()?;
    let kept_tokens: usize = kept.iter().map(|t| t.seq_lens.iter().sum::<usize>()).sum();
    let all_tokens: usize = seqs.iter().map(|s| s.ids.len()).sum();
    let scale = all_tokens as f64 / kept_tokens.max(1) as f64;
    let timed = |f: &mut dyn FnMut(&TapBatch)| {
        let started = Instant::now();
        for t in &kept {
            f(t);
        }
        started.elapsed().as_secs_f64() * scale
    };

    let mut sums = PassSums::zeros(Pass::Covariance, &tracked);
    let covariance = timed(&mut |t| curvature::accumulate(&mut sums, &tracked, &[], t));

    let bases: Vec<Eigenbasis> = tracked
        .iter()
        .map(|l| Eigenbasis {
            eigvals_a: vec![1.0; l.d_in_h()],
            q_a: stand_in(l.d_in_h(), l.d_in_h()),
            eigvals_s: vec![1.0; l.d_out],
            q_s: stand_in(l.d_out, l.d_out),
        })
        .collect();
    let refs: Vec<Option<&Eigenbasis>> = bases.iter().map(Some).collect();
    let mut sums = PassSums::zeros(Pass::Eigenvalue, &tracked);
    let eigenvalue = timed(&mut |t| curvature::accumulate(&mut sums, &tracked, &refs, t));

    let queries: Vec<LayerQueries> = tracked
        .iter()
        .map(|l| LayerQueries::Full(stand_in(l.d_out * l.d_in_h(), n_queries)))
        .collect();
    let scoring = timed(&mut |t| {
        std::hint::black_box(influence::batch_scores(&tracked, &queries, t));
    });
    Ok(PartSeconds {
        taps,
        covariance,
        eigenvalue,
        scoring,
    })
}

/// A dense matrix of ordinary (normal, non-zero) values: what a product costs does not depend
/// on them, as long as none is subnormal.
fn stand_in(rows: usize, cols: usize) -> Mat<f32> {
    Mat::from_fn(rows, cols, |i, j| {
        if i == j {
            1.0
        } else {
            ((i * 7 + j * 13) % 17) as f32 * 1e-3 + 1e-3
        }
    })
}
