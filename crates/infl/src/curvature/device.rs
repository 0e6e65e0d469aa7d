//! The fit's statistics formed on the device the model runs on (a GPU with `--device cuda`):
//! the products of [`super::accumulate`] as candle products, each batch's sums brought back
//! and added to the pass's f64 running sums on the host, so that shards, checkpoints and
//! resumed runs work as on the CPU.
//!
//! - Covariance: `āᵀā` and `gᵀg` over the batch's tokens, f32 products (the CPU path's
//!   precision: f32 over a batch, f64 across batches).
//! - Eigenvalue: the tokens rotated first, `(g Q_S)`, `(ā Q_A)`, then every sequence's
//!   `(g Q_S)ᵀ (ā Q_A)` as one batched product over the sequences zero-padded to the longest
//!   (padding rows add nothing), squared in f64 and summed over the batch.
//!
//! The same code runs on candle's CPU device, which is how it is tested against the CPU path.

use super::{Eigenbasis, PassSums, Sums};
use crate::error::Result;
use crate::linalg::Lower;
use crate::model::{TapBatch, TrackedLayer};
use candle_core::{DType, Device, Tensor};
use faer::Mat;

/// Per pass: the device and each layer's eigenbasis there (uploaded once).
pub struct DeviceStatistics {
    device: Device,
    /// `(Q_S, Q_A)` per tracked layer in the eigenvalue pass of EK-FAC; `None` in the covariance
    /// pass and for a layer in the original basis (diagonal).
    bases: Vec<Option<(Tensor, Tensor)>>,
}

/// A faer matrix as a row-major tensor on `device`.
pub(crate) fn upload(m: &Mat<f32>, device: &Device) -> Result<Tensor> {
    let (r, c) = (m.nrows(), m.ncols());
    let data: Vec<f32> = (0..r)
        .flat_map(|i| (0..c).map(move |j| m[(i, j)]))
        .collect();
    Ok(Tensor::from_vec(data, (r, c), device)?)
}

/// Adds the lower triangle of the row-major `d × d` `gram` to the packed `acc`.
fn add_lower(acc: &mut Lower, gram: &[f32], d: usize) {
    for j in 0..d {
        for (k, o) in acc.col_mut(j).iter_mut().enumerate() {
            *o += gram[(j + k) * d + j] as f64;
        }
    }
}

impl DeviceStatistics {
    pub fn new(device: Device, bases: &[Option<&Eigenbasis>]) -> Result<Self> {
        let bases = bases
            .iter()
            .map(|b| {
                b.map(|b| Ok((upload(&b.q_s, &device)?, upload(&b.q_a, &device)?)))
                    .transpose()
            })
            .collect::<Result<_>>()?;
        Ok(DeviceStatistics { device, bases })
    }

    /// [`super::accumulate`] on the device: adds one batch's taps to `state`.
    pub fn accumulate(
        &self,
        state: &mut PassSums,
        tracked: &[TrackedLayer],
        taps: &TapBatch,
    ) -> Result<()> {
        let offsets = taps.offsets();
        let n = offsets[offsets.len() - 1];
        state.n_tokens += n as u64;
        state.n_sequences += taps.seq_lens.len() as u64;
        if n == 0 {
            return Ok(());
        }
        for (k, (l, tap)) in tracked.iter().zip(&taps.layers).enumerate() {
            let a = tokens(&tap.a, (n, l.d_in), l.has_bias, &self.device)?;
            let g = tokens(&tap.g, (n, l.d_out), false, &self.device)?;
            match &mut state.sums {
                Sums::Covariance(sums) => {
                    for (x, sum) in [(&a, 2 * k), (&g, 2 * k + 1)] {
                        let d = x.dim(1)?;
                        // Transposed operands made contiguous: every backend's product takes them.
                        let xt = x.t()?.contiguous()?;
                        let gram = xt.matmul(x)?.flatten_all()?.to_vec1::<f32>()?;
                        add_lower(&mut sums[sum], &gram, d);
                    }
                }
                Sums::Eigenvalue(sums) => {
                    let basis = self.bases.get(k).and_then(Option::as_ref);
                    let (g, a) = rotate(g, a, basis)?;
                    let squares = sequence_products(&g, &a, &taps.seq_lens)?
                        .to_dtype(DType::F64)?
                        .sqr()?
                        .sum(0)?
                        .flatten_all()?
                        .to_vec1::<f64>()?;
                    let (i, sum) = (l.d_in_h(), &mut sums[k]);
                    for (idx, v) in squares.iter().enumerate() {
                        sum[(idx / i, idx % i)] += v;
                    }
                }
            }
        }
        Ok(())
    }
}

/// The tokens `x` (`n × d`, sequences of lengths `lens` in consecutive rows) as
/// `[n_seq, longest, d]`, each sequence zero-padded at its end.
fn padded_sequences(x: &Tensor, lens: &[usize]) -> Result<Tensor> {
    let t = lens.iter().copied().max().unwrap_or(0);
    let mut parts = Vec::with_capacity(lens.len());
    let mut start = 0;
    for &len in lens {
        parts.push(x.narrow(0, start, len)?.pad_with_zeros(0, 0, t - len)?);
        start += len;
    }
    Ok(Tensor::stack(&parts, 0)?)
}

/// The taps `x` (`n × d` row-major on the host; the first `d` of each row of `data`) on the
/// device, with a ones column appended for a layer with a bias (`ā = [a, 1]`).
pub(crate) fn tokens(
    data: &[f32],
    (n, d): (usize, usize),
    ones: bool,
    device: &Device,
) -> Result<Tensor> {
    let x = Tensor::from_slice(&data[..n * d], (n, d), device)?;
    Ok(if ones {
        Tensor::cat(&[x, Tensor::ones((n, 1), DType::F32, device)?], 1)?
    } else {
        x
    })
}

/// Every sequence's `x_sᵀ y_s`, `[n_seq, d_x, d_y]`, for the sequences of lengths `lens`
/// (consecutive rows of `x` and `y`): one batched product over the zero-padded sequences
/// (padding rows add nothing).
pub(crate) fn sequence_products(x: &Tensor, y: &Tensor, lens: &[usize]) -> Result<Tensor> {
    let (x, y) = (padded_sequences(x, lens)?, padded_sequences(y, lens)?);
    Ok(x.transpose(1, 2)?.contiguous()?.matmul(&y)?)
}

/// The tokens rotated into an eigenbasis, `(g Q_S, ā Q_A)`, or as they are without one.
pub(crate) fn rotate(
    g: Tensor,
    a: Tensor,
    basis: Option<&(Tensor, Tensor)>,
) -> Result<(Tensor, Tensor)> {
    Ok(match basis {
        Some((q_s, q_a)) => (g.matmul(q_s)?, a.matmul(q_a)?),
        None => (g, a),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::curvature::{accumulate, eigendecompose, Pass};
    use crate::model::LayerTap;
    use rand::{Rng, SeedableRng};

    fn layers() -> Vec<TrackedLayer> {
        vec![
            TrackedLayer {
                name: "w".into(),
                d_in: 7,
                d_out: 5,
                has_bias: true,
            },
            TrackedLayer {
                name: "v".into(),
                d_in: 4,
                d_out: 9,
                has_bias: false,
            },
        ]
    }

    /// Uniform(−1, 1) taps of `tracked` for sequences of lengths `lens`.
    pub(crate) fn random_taps(tracked: &[TrackedLayer], lens: &[usize], seed: u64) -> TapBatch {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = lens.iter().sum();
        let mut draw = |k: usize| (0..k).map(|_| rng.random_range(-1f32..1.0)).collect();
        TapBatch {
            seq_lens: lens.to_vec(),
            losses: vec![0.0; lens.len()],
            layers: tracked
                .iter()
                .map(|l| LayerTap {
                    a: draw(n * l.d_in),
                    g: draw(n * l.d_out),
                })
                .collect(),
        }
    }

    fn assert_close(host: &PassSums, device: &PassSums) {
        assert_eq!(host.n_tokens, device.n_tokens);
        assert_eq!(host.n_sequences, device.n_sequences);
        let whole = |s: &PassSums| -> Vec<Mat<f64>> {
            match &s.sums {
                Sums::Covariance(s) => s.iter().map(|l| l.to_full_scaled(1.0)).collect(),
                Sums::Eigenvalue(s) => s.clone(),
            }
        };
        for (x, y) in whole(host).iter().zip(&whole(device)) {
            let scale = (0..x.nrows())
                .flat_map(|i| (0..x.ncols()).map(move |j| (i, j)))
                .fold(0f64, |m, (i, j)| m.max(x[(i, j)].abs()));
            assert!(scale > 0.0);
            for i in 0..x.nrows() {
                for j in 0..x.ncols() {
                    let d = (x[(i, j)] - y[(i, j)]).abs();
                    assert!(
                        d <= 1e-5 * scale,
                        "({i}, {j}): {} vs {}",
                        x[(i, j)],
                        y[(i, j)]
                    );
                }
            }
        }
    }

    /// Both passes, two batches of unequal sequence lengths (one of a single token), EK-FAC
    /// bases and the original basis: the device path's sums are the CPU path's.
    #[test]
    fn device_sums_are_the_cpu_sums() {
        let tracked = layers();
        let batches = [
            random_taps(&tracked, &[6, 1, 3], 1),
            random_taps(&tracked, &[2, 5], 2),
        ];
        let mut host = PassSums::zeros(Pass::Covariance, &tracked);
        let mut dev = PassSums::zeros(Pass::Covariance, &tracked);
        let stats = DeviceStatistics::new(Device::Cpu, &[None, None]).unwrap();
        for b in &batches {
            accumulate(&mut host, &tracked, &[], b);
            stats.accumulate(&mut dev, &tracked, b).unwrap();
        }
        assert_close(&host, &dev);

        let factors = eigendecompose(&tracked, host.clone(), &crate::pass::Silent).unwrap();
        let bases: Vec<Option<&Eigenbasis>> = factors.iter().map(|f| f.eigen.as_ref()).collect();
        for bases in [bases, vec![None, None]] {
            let mut host = PassSums::zeros(Pass::Eigenvalue, &tracked);
            let mut dev = PassSums::zeros(Pass::Eigenvalue, &tracked);
            let stats = DeviceStatistics::new(Device::Cpu, &bases).unwrap();
            for b in &batches {
                accumulate(&mut host, &tracked, &bases, b);
                stats.accumulate(&mut dev, &tracked, b).unwrap();
            }
            assert_close(&host, &dev);
        }
    }
}
