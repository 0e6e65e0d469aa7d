//! GPT-2's reference forward on candle autograd: every tracked Conv1D computes
//! `y = a W + b + probe`, and the probe's gradient is the tap g. The forward with no probes
//! also serves training ([`crate::train`]).

use super::{Conv1D, Gpt2};
use crate::model::autograd::{self, Autograd, Forward, Spec};
use crate::model::BlockShape;
use candle_core::Tensor;

impl Gpt2 {
    /// Forward pass over a right-padded batch. `probes[i]` is added to the output of tracked
    /// layer i (`[B*T, d_out]`); with no probes (training) nothing is added. Returns the logits
    /// `[B, T, V]` and each tracked layer's input.
    pub(crate) fn forward(
        &self,
        ids: &[Vec<u32>],
        padded_len: usize,
        probes: &[Tensor],
    ) -> candle_core::Result<Forward> {
        let (b, t) = (ids.len(), padded_len);
        let (d, h) = (self.config.n_embd, self.config.n_head);
        let hd = d / h;
        let ids_t = autograd::padded_ids(ids, t, &self.device)?;
        let pos: Vec<u32> = (0..b).flat_map(|_| 0..t as u32).collect();
        let pos_t = Tensor::from_vec(pos, b * t, &self.device)?;
        let mut x = (self.wte.index_select(&ids_t, 0)? + self.wpe.index_select(&pos_t, 0)?)?;

        let mask = autograd::causal_mask(t, None, &self.device)?;
        let scale = if self.config.scale_attn_weights {
            1.0 / (hd as f64).sqrt()
        } else {
            1.0
        };

        let mut inputs = vec![None; self.tracked.len()];
        // Records `a` as tracked layer `tap`'s input and adds its probe (if any) to `y`.
        let mut record = |tap: Option<usize>, a: &Tensor, y: Tensor| match tap {
            Some(i) => {
                inputs[i] = Some(a.clone());
                match probes.get(i) {
                    Some(probe) => y + probe,
                    None => Ok(y),
                }
            }
            None => Ok(y),
        };
        // With an adapter, PEFT's `base(a) + B(A(a)) · scaling`, A and B tapped as layers.
        let mut linear = |layer: &Conv1D, a: &Tensor| -> candle_core::Result<Tensor> {
            let mut y = a.matmul(&layer.weight)?.broadcast_add(&layer.bias)?;
            if let Some(lora) = &layer.lora {
                let u = record(lora.tap_a, a, a.matmul(&lora.a.t()?)?)?;
                let v = record(lora.tap_b, &u, u.matmul(&lora.b.t()?)?)?;
                y = (y + (v * lora.scaling)?)?;
            }
            record(layer.tap, a, y)
        };
        for block in &self.blocks {
            let hidden = block.ln_1.forward(&x)?;
            let qkv = linear(&block.c_attn, &hidden)?.reshape((b, t, 3, h, hd))?;
            let heads = |k: usize| -> candle_core::Result<Tensor> {
                qkv.narrow(2, k, 1)?
                    .squeeze(2)?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let (q, k, v) = (heads(0)?, heads(1)?, heads(2)?);
            let attn = autograd::attention(&q, &k, &v, &mask, scale)?;
            x = (x + linear(&block.c_proj, &attn)?)?;
            let hidden = block.ln_2.forward(&x)?;
            let pre = linear(&block.c_fc, &hidden)?;
            let act = self.activation(&pre)?;
            x = (x + linear(&block.mlp_proj, &act)?)?;
        }
        let x = self.ln_f.forward(&x)?;
        let logits = x
            .matmul(&self.lm_head.t()?)?
            .reshape((b, t, self.config.vocab_size))?;
        let inputs = inputs
            .into_iter()
            .map(|i| i.expect("every tracked layer is in a block"))
            .collect();
        Ok(Forward { logits, inputs })
    }

    fn activation(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self.config.activation_function.as_str() {
            "gelu" => x.gelu_erf(),
            "relu" => x.relu(),
            // gelu_new: 0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³))), composed so that its
            // backward is exact (candle's fused gelu backward uses rounded constants).
            _ => {
                let c = (2.0 / std::f64::consts::PI).sqrt();
                let inner = ((x + ((x.sqr()? * x)? * 0.044715)?)? * c)?;
                (x * 0.5)? * (inner.tanh()? + 1.0)?
            }
        }
    }
}

impl Autograd for Gpt2 {
    fn spec(&self) -> Spec<'_> {
        let c = &self.config;
        Spec {
            architecture: "gpt2",
            tracked: &self.tracked,
            vocab: c.vocab_size,
            max_positions: c.n_positions,
            n_parameters: self.n_parameters,
            shape: BlockShape {
                layers: c.n_layer,
                heads: c.n_head,
                hidden: c.n_embd,
                intermediate: c.d_inner(),
            },
            device: &self.device,
        }
    }

    fn tapped_forward(
        &self,
        ids: &[Vec<u32>],
        padded_len: usize,
        probes: &[Tensor],
    ) -> candle_core::Result<Forward> {
        self.forward(ids, padded_len, probes)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::tiny_config;
    use super::super::Gpt2Config;
    use super::*;
    use crate::model::{Labels, ModuleSelection, TapModel, TokenBatch};
    use candle_core::{Device, Var};

    fn batch() -> TokenBatch {
        TokenBatch::training(&[(0, &[1, 5, 7, 2, 9, 11]), (1, &[3, 4, 22])])
    }

    #[test]
    fn every_probe_receives_a_nonzero_gradient() {
        let model = Gpt2::random(tiny_config(), 1, ModuleSelection::All).unwrap();
        assert_eq!(model.tracked().len(), 8);
        let taps = model.taps(&batch(), Labels::Data).unwrap();
        assert_eq!(taps.seq_lens, vec![6, 3]);
        for (l, tap) in model.tracked().iter().zip(&taps.layers) {
            assert_eq!(tap.a.len(), 9 * l.d_in);
            assert_eq!(tap.g.len(), 9 * l.d_out);
            let norm: f32 = tap.g.iter().map(|x| x * x).sum();
            assert!(norm > 1e-12, "layer {} got no gradient", l.name);
        }
    }

    /// g = ∂L/∂y checked against finite differences of the loss in the probes.
    #[test]
    fn taps_match_finite_differences() {
        let model = Gpt2::random(tiny_config(), 2, ModuleSelection::All).unwrap();
        let batch = batch();
        let t = batch.max_len();
        let rows = batch.len() * t;
        let probes = model.zero_probes(rows).unwrap();
        let (_, grads) = model.run(&batch, Labels::Data, &probes).unwrap();
        let raw_g: Vec<Tensor> = probes
            .iter()
            .map(|p| grads.get(p).unwrap().clone())
            .collect();
        let loss_at = |layer: usize, idx: usize, eps: f32| -> f64 {
            let probes: Vec<Var> = model.zero_probes(rows).unwrap();
            let mut v = vec![0f32; rows * model.tracked[layer].d_out];
            v[idx] = eps;
            probes[layer]
                .set(
                    &Tensor::from_vec(v, (rows, model.tracked[layer].d_out), &Device::Cpu).unwrap(),
                )
                .unwrap();
            let (taps, _) = model.run(&batch, Labels::Data, &probes).unwrap();
            taps.losses.iter().sum()
        };
        let mut checked = 0;
        for (layer, g) in raw_g.iter().enumerate() {
            let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let d_out = model.tracked[layer].d_out;
            // Rows 0 and 4 of the first sequence; rows 1 and 2 of the second (2 is its last token,
            // which predicts nothing: g = 0).
            for row in [0usize, 4, t + 1, t + 2] {
                for col in [0, d_out / 2, d_out - 1] {
                    let idx = row * d_out + col;
                    // Central differences with one Richardson step (error O(h⁴)); the
                    // random model is strongly curved, so plain O(h²) needs tiny steps that f32
                    // rounding then spoils.
                    let central = |h: f32| {
                        (loss_at(layer, idx, h) - loss_at(layer, idx, -h)) / (2.0 * h as f64)
                    };
                    let fd = (4.0 * central(2e-3) - central(4e-3)) / 3.0;
                    let err = (fd - g[idx] as f64).abs();
                    assert!(
                        err < 2e-3 * (1.0 + g[idx].abs() as f64),
                        "layer {layer} row {row} col {col}: autograd {} vs finite differences {fd}",
                        g[idx]
                    );
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 8 * 4 * 3);
    }

    /// Padding rows never influence real rows: taps of a sequence alone equal its taps in a
    /// padded batch.
    #[test]
    fn taps_do_not_depend_on_padding() {
        let model = Gpt2::random(tiny_config(), 3, ModuleSelection::All).unwrap();
        let alone = model
            .taps(&TokenBatch::training(&[(1, &[3, 4, 22])]), Labels::Data)
            .unwrap();
        let padded = model.taps(&batch(), Labels::Data).unwrap();
        for (l, (x, y)) in alone.layers.iter().zip(&padded.layers).enumerate() {
            let d_out = model.tracked[l].d_out;
            let tail = &y.g[6 * d_out..];
            for (p, q) in x.g.iter().zip(tail) {
                assert!(
                    (p - q).abs() <= 1e-5 * (1.0 + p.abs()),
                    "layer {l}: {p} vs {q}"
                );
            }
        }
        assert!((alone.losses[0] - padded.losses[1]).abs() < 1e-5);
    }

    /// Identity-strategy scores from the taps equal dot products of per-sequence weight
    /// gradients computed by autograd on the weights themselves.
    #[test]
    fn identity_scores_equal_autograd_weight_gradient_dot_products() {
        use crate::curvature::{Factors, LayerFactors, Strategy};
        use crate::data::{Query, Sequence};
        use crate::influence::{precondition_queries, score_dense, Damping, Preconditioner};
        use crate::pass::Silent;

        let mut model = Gpt2::random(tiny_config(), 5, ModuleSelection::All).unwrap();
        let mut params: Vec<(Var, Var)> = Vec::new();
        for block in model.blocks.iter_mut() {
            for conv in [
                &mut block.c_attn,
                &mut block.c_proj,
                &mut block.c_fc,
                &mut block.mlp_proj,
            ] {
                let (w, b) = (
                    Var::from_tensor(&conv.weight).unwrap(),
                    Var::from_tensor(&conv.bias).unwrap(),
                );
                conv.weight = w.as_tensor().clone();
                conv.bias = b.as_tensor().clone();
                params.push((w, b));
            }
        }
        let grad_of = |batch: &TokenBatch| -> Vec<f64> {
            let probes = model.zero_probes(batch.len() * batch.max_len()).unwrap();
            let (_, grads) = model.run(batch, Labels::Data, &probes).unwrap();
            params
                .iter()
                .flat_map(|(w, b)| {
                    let w = grads
                        .get(w)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap();
                    let b = grads.get(b).unwrap().to_vec1::<f32>().unwrap();
                    w.into_iter().chain(b).map(f64::from)
                })
                .collect()
        };
        let train: Vec<Sequence> = [vec![1u32, 5, 7, 2, 9], vec![3, 4, 22, 8], vec![6, 6, 1]]
            .into_iter()
            .enumerate()
            .map(|(k, ids)| Sequence {
                id: format!("{k}:0"),
                ids,
            })
            .collect();
        let queries: Vec<Query> = [(vec![2u32, 3], vec![4u32, 5]), (vec![7, 8, 9], vec![1])]
            .into_iter()
            .enumerate()
            .map(|(k, (p, c))| Query {
                id: k.to_string(),
                prompt_ids: p,
                completion_ids: c,
                prompt: None,
                completion: None,
            })
            .collect();

        let factors = Factors {
            strategy: Strategy::Identity,
            layers: model
                .tracked()
                .iter()
                .map(|l| LayerFactors {
                    layer: l.clone(),
                    n_tokens: 0,
                    n_sequences: 0,
                    covariance: None,
                    eigen: None,
                    lambda: None,
                })
                .collect(),
        };
        let pre = Preconditioner::new(&factors, Damping::Heuristic).unwrap();
        let pq = precondition_queries(&model, &queries, &pre, 2, None, false, &Silent).unwrap();
        let scores = score_dense(&model, &pq, &train, 2, &Silent).unwrap();

        for (qi, q) in queries.iter().enumerate() {
            let gq = grad_of(&TokenBatch::queries(&[(
                0,
                &q.prompt_ids,
                &q.completion_ids,
            )]));
            for (n, s) in train.iter().enumerate() {
                let gn = grad_of(&TokenBatch::training(&[(0, &s.ids)]));
                let want: f64 = gq.iter().zip(&gn).map(|(a, b)| a * b).sum();
                let got = scores[qi][n];
                assert!(
                    (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                    "query {qi}, train {n}: taps give {got}, autograd weight gradients give {want}"
                );
            }
        }
    }

    /// The gradients in the eigenbasis come out the same whether the tokens are rotated first
    /// or each summed gradient is, and scaling then rotating back is the preconditioner itself.
    #[test]
    fn basis_gradients_agree_in_both_orders_and_with_the_dense_rotation() {
        use crate::curvature::{fit, Fisher, Strategy};
        use crate::data::Sequence;
        use crate::influence::{column_as_matrix, sequence_gradients, Damping, Preconditioner};
        use crate::options::FitOptions;
        use crate::pass::Silent;

        let model = Gpt2::random(tiny_config(), 11, ModuleSelection::All).unwrap();
        let seqs: Vec<Sequence> = (0..6u32)
            .map(|k| Sequence {
                id: format!("{k}:0"),
                ids: (0..4 + 2 * k).map(|t| (t * 7 + k * 3) % 23).collect(),
            })
            .collect();
        let options = FitOptions {
            strategy: Strategy::Ekfac,
            fisher: Fisher::Empirical,
            batch_size: 3,
            seed: 1,
            ..FitOptions::default()
        };
        let factors = fit(&model, &seqs, &options, &Silent).unwrap();
        let pre = Preconditioner::new(&factors, Damping::Heuristic).unwrap();
        let refs: Vec<(u64, &[u32])> = seqs.iter().map(|s| (0, s.ids.as_slice())).collect();
        let taps = model
            .taps(&TokenBatch::training(&refs), Labels::Data)
            .unwrap();
        for (index, l) in model.tracked().iter().enumerate() {
            let (d_o, d_i) = (l.d_out, l.d_in_h());
            let tokens = pre.basis_gradients_in(index, l, &taps, true);
            let summed = pre.basis_gradients_in(index, l, &taps, false);
            let grads = sequence_gradients(l, &taps, index);
            let e = factors.layers[index].eigen.as_ref().unwrap();
            for k in 0..seqs.len() {
                let g = column_as_matrix(&grads, k, d_o, d_i);
                // Q_Sᵀ G Q_A in f64.
                let want = faer::Mat::<f64>::from_fn(d_o, d_i, |o, i| {
                    let mut sum = 0.0;
                    for p in 0..d_o {
                        for r in 0..d_i {
                            sum += e.q_s[(p, o)] as f64 * g[(p, r)] as f64 * e.q_a[(r, i)] as f64;
                        }
                    }
                    sum
                });
                let scale = (0..d_i)
                    .flat_map(|i| (0..d_o).map(move |o| (o, i)))
                    .fold(1e-12f64, |m, (o, i)| m.max(want[(o, i)].abs()));
                for (what, got) in [("tokens first", &tokens), ("summed", &summed)] {
                    let r = column_as_matrix(got, k, d_o, d_i);
                    for i in 0..d_i {
                        for o in 0..d_o {
                            let err = (r[(o, i)] as f64 - want[(o, i)]).abs();
                            assert!(
                                err <= 1e-4 * scale,
                                "{} seq {k} ({what}) [{o},{i}]: {} vs {}",
                                l.name,
                                r[(o, i)],
                                want[(o, i)]
                            );
                        }
                    }
                }
                // Scaled in the basis and rotated back: the preconditioned gradient.
                let scaled = pre.scale_columns(index, &tokens);
                let s = faer::MatRef::from_column_major_slice(
                    &scaled[k * d_o * d_i..(k + 1) * d_o * d_i],
                    d_o,
                    d_i,
                );
                let back = pre.from_basis(index, s.to_owned());
                let direct = pre.apply(index, g);
                let scale = (0..d_i)
                    .flat_map(|i| (0..d_o).map(move |o| (o, i)))
                    .fold(1e-12f32, |m, (o, i)| m.max(direct[(o, i)].abs()));
                for i in 0..d_i {
                    for o in 0..d_o {
                        assert!((back[(o, i)] - direct[(o, i)]).abs() <= 1e-4 * scale);
                    }
                }
            }
        }
    }

    /// The scoring pass's blocked scores equal per-sequence gradients dotted with the queries
    /// (in f64), at widths that cut the layers into several uneven blocks, and do not depend on
    /// the thread count.
    #[test]
    fn batch_scores_equal_dots_of_per_sequence_gradients() {
        use crate::influence::{batch_scores, sequence_gradients, LayerQueries};
        let config = Gpt2Config {
            n_embd: 100,
            n_layer: 1,
            n_head: 2,
            ..tiny_config()
        };
        let model = Gpt2::random(config, 4, ModuleSelection::All).unwrap();
        let refs: Vec<(u64, Vec<u32>)> = (0..5u32)
            .map(|k| (k as u64, (0..3 + 2 * k).map(|t| (t * 5 + k) % 23).collect()))
            .collect();
        let refs: Vec<(u64, &[u32])> = refs.iter().map(|(i, s)| (*i, s.as_slice())).collect();
        let taps = model
            .taps(&TokenBatch::training(&refs), Labels::Data)
            .unwrap();
        let tracked = model.tracked().to_vec();
        let nq = 3;
        let queries: Vec<LayerQueries> = tracked
            .iter()
            .map(|l| {
                LayerQueries::Full(faer::Mat::from_fn(l.d_out * l.d_in_h(), nq, |i, q| {
                    ((i * 7 + q * 13) % 29) as f32 / 29.0 - 0.5
                }))
            })
            .collect();
        // 101 and 401 inputs with the bias: one block, and two of 201 and 200 columns.
        assert!(tracked.iter().any(|l| l.d_in_h() == 401));
        let got = batch_scores(&tracked, &queries, &taps);
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let serial = one.install(|| batch_scores(&tracked, &queries, &taps));
        for (i, l) in tracked.iter().enumerate() {
            let grads = sequence_gradients(l, &taps, i);
            let LayerQueries::Full(stack) = &queries[i] else {
                unreachable!()
            };
            for s in 0..refs.len() {
                for q in 0..nq {
                    let want: f64 = (0..grads.nrows())
                        .map(|r| grads[(r, s)] as f64 * stack[(r, q)] as f64)
                        .sum();
                    // f32 products: the error scales with Σ|terms|, not with a sum that
                    // cancels (seen: 3.5e-6 on a dot of 0.052 whose terms sum to 461 in
                    // absolute value, on AVX2; 8e-9 of Σ|terms| at worst).
                    let scale: f64 = (0..grads.nrows())
                        .map(|r| (grads[(r, s)] as f64 * stack[(r, q)] as f64).abs())
                        .sum();
                    let v = got[i][(q, s)] as f64;
                    assert!(
                        (v - want).abs() <= 1e-5 * want.abs().max(1e-3) + 1e-7 * scale,
                        "{} seq {s} query {q}: {v} vs {want}",
                        l.name
                    );
                    assert_eq!(got[i][(q, s)], serial[i][(q, s)], "thread count");
                }
            }
        }
    }
}
