//! The loss head both engines share: the summed next-token cross-entropy of each sequence at
//! its loss positions and its gradient with respect to the logits, with the data's labels or
//! labels sampled from the model (the true Fisher), computed so that the draws never depend on
//! batching.

use super::{fast, Labels, TokenBatch};
use rand::{Rng, SeedableRng};

/// Per-position loss weights and labels → the gradient of the summed cross-entropy with respect
/// to the logits, `dL/dlogits = Σ_t w_t (softmax(z_t) − onehot(y_t))`, and the per-sequence
/// losses. Computed in f64 so that the surrogate backward starts from exact values.
pub(crate) fn loss_head(
    logits: &[f32],
    vocab: usize,
    padded_len: usize,
    batch: &TokenBatch,
    labels: Labels,
) -> (Vec<f32>, Vec<f64>) {
    let mut dlogits = vec![0f32; logits.len()];
    let mut losses = vec![0f64; batch.len()];
    let mut probs = vec![0f64; vocab];
    let draws = label_draws(batch, labels);
    for (b, ids) in batch.ids.iter().enumerate() {
        for t in 0..ids.len() {
            if !batch.loss_positions[b][t] {
                continue;
            }
            let row = (b * padded_len + t) * vocab;
            let d = &mut dlogits[row..row + vocab];
            d.copy_from_slice(&logits[row..row + vocab]);
            losses[b] += position_loss(d, target(batch, draws.as_deref(), b, t), &mut probs);
        }
    }
    (dlogits, losses)
}

/// The label of one loss position: the data's next token, or a uniform draw that picks one
/// from the model's distribution.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Target {
    Token(usize),
    Draw(f64),
}

/// For sampled labels, one uniform draw per position of each sequence (every position, loss
/// or not, so that the random stream does not depend on the mask); `None` for the data's labels.
pub(crate) fn label_draws(batch: &TokenBatch, labels: Labels) -> Option<Vec<Vec<f64>>> {
    match labels {
        Labels::Data => None,
        Labels::Sampled { seed, pass } => Some(
            batch
                .ids
                .iter()
                .zip(&batch.stable_index)
                .map(|(ids, &i)| {
                    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(mix(mix(seed, pass), i));
                    (0..ids.len()).map(|_| rng.random::<f64>()).collect()
                })
                .collect(),
        ),
    }
}

/// The target of position `t` of sequence `b` (a loss position).
pub(crate) fn target(batch: &TokenBatch, draws: Option<&[Vec<f64>]>, b: usize, t: usize) -> Target {
    match draws {
        Some(d) => Target::Draw(d[b][t]),
        None => Target::Token(batch.ids[b][t + 1] as usize),
    }
}

fast::kernels::multiversion! {
/// Cross-entropy of one position: `z` holds the logits on entry and dL/dz on return; returns
/// the loss. `logits` is scratch of the vocabulary's length (used for sampled labels only).
///
/// `e_i = e^(z_i − max)` in f32 through the vectorising [`fast::kernels::exp`] (2.5e-7
/// relative), their sum, the loss and the normalisation in f64: the loop runs 8 wide instead
/// of a libm call per logit (at a vocabulary of 8,192 that call was a tenth of a fit). The
/// label's gradient `p_y − 1 = −Σ_{i≠y} p_i` is formed from the other terms, so it keeps its
/// relative accuracy when the model is confident (p_y → 1).
pub(crate) fn position_loss(z: &mut [f32], target: Target, logits: &mut [f64]) -> f64 {
    {
        let m = fast::kernels::max_lanes(z);
        if let Target::Draw(_) = target {
            for (l, &v) in logits.iter_mut().zip(z.iter()) {
                *l = v as f64;
            }
        }
        let z_y = match target {
            Target::Token(y) => z[y] as f64,
            Target::Draw(_) => f64::NAN,
        };
        for v in z.iter_mut() {
            *v = fast::kernels::exp(*v - m);
        }
        // Eight partial sums, combined in a fixed order: vectorisable and deterministic.
        let mut lanes = [0f64; 8];
        let mut chunks = z.chunks_exact(8);
        for c in &mut chunks {
            for (l, v) in lanes.iter_mut().zip(c) {
                *l += *v as f64;
            }
        }
        for (l, v) in lanes.iter_mut().zip(chunks.remainder()) {
            *l += *v as f64;
        }
        let sum: f64 = lanes.iter().sum();
        let inv = 1.0 / sum;
        let (y, z_y) = match target {
            Target::Token(y) => (y, z_y),
            Target::Draw(u) => {
                let y = sample_index(z, u * sum);
                (y, logits[y])
            }
        };
        let e_y = z[y] as f64;
        for v in z.iter_mut() {
            *v = (*v as f64 * inv) as f32;
        }
        z[y] = (-(sum - e_y) * inv) as f32;
        sum.ln() - (z_y - m as f64)
    }
}
}

/// Inverse-CDF draw from unnormalised weights: the first index whose running sum exceeds
/// `u_total = u · Σ w`, for a uniform `u ∈ [0, 1)`.
fn sample_index(weights: &[f32], u_total: f64) -> usize {
    let mut acc = 0.0;
    for (i, &w) in weights.iter().enumerate() {
        acc += w as f64;
        if u_total < acc {
            return i;
        }
    }
    // Rounding left `acc` a hair below the total: take the last token with non-zero weight.
    weights.iter().rposition(|&w| w > 0.0).unwrap_or(0)
}

/// SplitMix64 finaliser: decorrelates (seed, index) pairs into RNG seeds.
fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b
        .wrapping_add(0x9E37_79B9_7F4A_7C15)
        .wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_head_matches_hand_computed_cross_entropy() {
        // One sequence [0, 1], vocab 2, logits at position 0 = [0, ln 3] → p = [1/4, 3/4].
        let batch = TokenBatch::training(&[(0, &[0, 1])]);
        let logits = vec![0.0, 3f32.ln(), 5.0, 5.0];
        let (d, losses) = loss_head(&logits, 2, 2, &batch, Labels::Data);
        assert!((losses[0] - (4.0f64 / 3.0).ln()).abs() < 1e-6);
        assert!((d[0] - 0.25).abs() < 1e-6 && (d[1] + 0.25).abs() < 1e-6);
        assert_eq!(&d[2..], &[0.0, 0.0]);
    }

    #[test]
    fn sampled_labels_follow_the_model_distribution() {
        // Unnormalised weights: the draw scales the uniform by their total.
        let weights = [0.2f32, 1.2, 0.6];
        let probs = [0.1, 0.6, 0.3];
        let mut counts = [0usize; 3];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for _ in 0..30000 {
            counts[sample_index(&weights, rng.random::<f64>() * 2.0)] += 1;
        }
        for (c, p) in counts.iter().zip(probs) {
            assert!((*c as f64 / 30000.0 - p).abs() < 0.01, "{counts:?}");
        }
    }
}
