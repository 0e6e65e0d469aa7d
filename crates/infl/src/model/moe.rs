//! Mixture-of-experts feed-forward blocks of the Llama family (Mixtral, Qwen2-MoE, Qwen3-MoE) on
//! the autograd engine: their config fields, the mapping of checkpoint names onto a router and
//! experts, and the routed forward.
//!
//! Routing as transformers computes it: router logits → softmax → top-k → (optionally)
//! renormalised weights. Each expert runs only on the tokens routed to it (gathered rows), its
//! output is scaled by the router weight afterwards and scatter-added back, so an expert's
//! linear layers see (a, g) only for its tokens: the other rows of its taps are exactly zero
//! (the layers have no bias, so a zero row adds nothing to A, S or a per-sequence gradient).
//! The router is an ordinary tracked layer over every token; Qwen2-MoE's shared expert and its
//! sigmoid gate run on every token too.

use super::autograd::{activation, Linear, LinearLoader, Recorder};
use super::ModuleSelection;
use crate::error::{Error, Result};
use candle_core::{Tensor, D};
use std::path::Path;

/// Where a layout keeps its experts, by checkpoint name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoeLayout {
    /// `block_sparse_moe.gate`, `block_sparse_moe.experts.{i}.w1/w3/w2`.
    Mixtral,
    /// `mlp.gate`, `mlp.experts.{i}.{gate,up,down}_proj`, `mlp.shared_expert.*` and
    /// `mlp.shared_expert_gate` (Qwen2-MoE only).
    Qwen,
}

impl MoeLayout {
    /// The block's name prefix within layer `layer`.
    pub fn prefix(self, layer: usize) -> String {
        match self {
            MoeLayout::Mixtral => format!("model.layers.{layer}.block_sparse_moe"),
            MoeLayout::Qwen => format!("model.layers.{layer}.mlp"),
        }
    }

    /// The names of an expert's (gate, up, down) linears.
    pub fn expert_linears(self) -> [&'static str; 3] {
        match self {
            MoeLayout::Mixtral => ["w1", "w3", "w2"],
            MoeLayout::Qwen => ["gate_proj", "up_proj", "down_proj"],
        }
    }
}

/// The fields of a mixture-of-experts config.json (Mixtral's and Qwen's spellings), read
/// alongside the Llama-family fields.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub(crate) struct HfMoeFields {
    num_local_experts: Option<usize>,
    num_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    norm_topk_prob: Option<bool>,
    moe_intermediate_size: Option<usize>,
    shared_expert_intermediate_size: Option<usize>,
    decoder_sparse_step: Option<usize>,
    mlp_only_layers: Option<Vec<usize>>,
}

/// The settings of a model's expert blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoeConfig {
    pub layout: MoeLayout,
    pub num_experts: usize,
    /// Experts each token is routed to.
    pub top_k: usize,
    /// Whether the top-k router probabilities are renormalised to sum to 1.
    pub norm_topk_prob: bool,
    /// Width of each routed expert's hidden layer.
    pub expert_intermediate: usize,
    /// Width of Qwen2-MoE's shared expert (none elsewhere).
    pub shared_intermediate: Option<usize>,
    /// Layers `i` with `(i + 1) % sparse_step == 0` are expert blocks, unless in
    /// `mlp_only_layers` (then a dense MLP of `intermediate_size`).
    pub sparse_step: usize,
    pub mlp_only_layers: Vec<usize>,
}

impl MoeConfig {
    /// The expert settings of `model_type` with transformers' defaults; `None` for the dense
    /// members of the family. `intermediate_size` is Mixtral's expert width.
    pub(crate) fn from_hf(
        model_type: &str,
        f: &HfMoeFields,
        intermediate_size: usize,
        path: &Path,
    ) -> Result<Option<Self>> {
        let config = match model_type {
            "mixtral" => MoeConfig {
                layout: MoeLayout::Mixtral,
                num_experts: f.num_local_experts.or(f.num_experts).unwrap_or(8),
                top_k: f.num_experts_per_tok.unwrap_or(2),
                norm_topk_prob: true,
                expert_intermediate: intermediate_size,
                shared_intermediate: None,
                sparse_step: 1,
                mlp_only_layers: Vec::new(),
            },
            "qwen2_moe" | "qwen3_moe" => {
                let qwen2 = model_type == "qwen2_moe";
                MoeConfig {
                    layout: MoeLayout::Qwen,
                    num_experts: f.num_experts.or(f.num_local_experts).unwrap_or(if qwen2 {
                        60
                    } else {
                        128
                    }),
                    top_k: f.num_experts_per_tok.unwrap_or(if qwen2 { 4 } else { 8 }),
                    norm_topk_prob: f.norm_topk_prob.unwrap_or(false),
                    expert_intermediate: f.moe_intermediate_size.unwrap_or(if qwen2 {
                        1408
                    } else {
                        768
                    }),
                    shared_intermediate: qwen2
                        .then(|| f.shared_expert_intermediate_size.unwrap_or(5632)),
                    sparse_step: f.decoder_sparse_step.unwrap_or(1),
                    mlp_only_layers: f.mlp_only_layers.clone().unwrap_or_default(),
                }
            }
            _ => return Ok(None),
        };
        let c = &config;
        if c.num_experts == 0 || c.top_k == 0 || c.top_k > c.num_experts || c.sparse_step == 0 {
            return Err(Error::input(format!(
                "{}: the expert settings are inconsistent (num_experts {}, num_experts_per_tok \
                 {}, decoder_sparse_step {}): need 1 ≤ num_experts_per_tok ≤ num_experts and \
                 decoder_sparse_step ≥ 1",
                path.display(),
                c.num_experts,
                c.top_k,
                c.sparse_step
            )));
        }
        Ok(Some(config))
    }

    /// Whether layer `layer` is an expert block (else a dense MLP).
    pub fn is_sparse(&self, layer: usize) -> bool {
        !self.mlp_only_layers.contains(&layer) && (layer + 1).is_multiple_of(self.sparse_step)
    }
}

/// A SwiGLU feed-forward: `down(act(gate(x)) · up(x))`.
pub(crate) struct Expert {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

impl Expert {
    fn load(
        l: &mut LinearLoader,
        prefix: &str,
        names: [&str; 3],
        d: usize,
        di: usize,
    ) -> Result<Self> {
        let mlp = ModuleSelection::Mlp;
        Ok(Expert {
            gate: l.linear(&format!("{prefix}.{}", names[0]), d, di, false, mlp)?,
            up: l.linear(&format!("{prefix}.{}", names[1]), d, di, false, mlp)?,
            down: l.linear(&format!("{prefix}.{}", names[2]), di, d, false, mlp)?,
        })
    }

    /// On every row of `x`.
    fn forward(&self, rec: &mut Recorder, x: &Tensor, act: &str) -> candle_core::Result<Tensor> {
        let h = (activation(act, &rec.linear(&self.gate, x)?)? * rec.linear(&self.up, x)?)?;
        rec.linear(&self.down, &h)
    }

    /// On the rows `rows` of the batch only: `x` holds those rows.
    fn forward_routed(
        &self,
        rec: &mut Recorder,
        x: &Tensor,
        rows: &Tensor,
        act: &str,
    ) -> candle_core::Result<Tensor> {
        let gate = rec.linear_routed(&self.gate, x, rows)?;
        let up = rec.linear_routed(&self.up, x, rows)?;
        let h = (activation(act, &gate)? * up)?;
        rec.linear_routed(&self.down, &h, rows)
    }

    fn linears(&mut self) -> [&mut Linear; 3] {
        [&mut self.gate, &mut self.up, &mut self.down]
    }
}

/// Qwen2-MoE's shared expert: run on every token, scaled by `sigmoid(shared_expert_gate(x))`.
pub(crate) struct SharedExpert {
    pub mlp: Expert,
    pub gate: Linear,
}

/// One expert block: the router, the routed experts and the shared expert where present.
pub(crate) struct MoeBlock {
    pub router: Linear,
    pub experts: Vec<Expert>,
    pub shared: Option<SharedExpert>,
    pub top_k: usize,
    pub norm_topk_prob: bool,
}

impl MoeBlock {
    /// The block of layer `layer`, tensors named as `c.layout` names them; every linear is of
    /// the MLP kind (`--modules mlp` tracks the router and the experts).
    pub fn load(l: &mut LinearLoader, c: &MoeConfig, layer: usize, d: usize) -> Result<Self> {
        let p = c.layout.prefix(layer);
        let mlp = ModuleSelection::Mlp;
        let router = l.linear(&format!("{p}.gate"), d, c.num_experts, false, mlp)?;
        let names = c.layout.expert_linears();
        let experts = (0..c.num_experts)
            .map(|e| {
                Expert::load(
                    l,
                    &format!("{p}.experts.{e}"),
                    names,
                    d,
                    c.expert_intermediate,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let shared = match c.shared_intermediate {
            Some(ds) => Some(SharedExpert {
                mlp: Expert::load(l, &format!("{p}.shared_expert"), names, d, ds)?,
                gate: l.linear(&format!("{p}.shared_expert_gate"), d, 1, false, mlp)?,
            }),
            None => None,
        };
        Ok(MoeBlock {
            router,
            experts,
            shared,
            top_k: c.top_k,
            norm_topk_prob: c.norm_topk_prob,
        })
    }

    /// Every linear layer, in load order (what a LoRA adapter may target).
    pub fn linears(&mut self) -> Vec<&mut Linear> {
        let mut out = vec![&mut self.router];
        for e in &mut self.experts {
            out.extend(e.linears());
        }
        if let Some(s) = &mut self.shared {
            out.extend(s.mlp.linears());
            out.push(&mut s.gate);
        }
        out
    }

    /// `x` is `[rows, d]`; returns the block's output `[rows, d]`.
    pub fn forward(
        &self,
        rec: &mut Recorder,
        x: &Tensor,
        act: &str,
    ) -> candle_core::Result<Tensor> {
        let logits = rec.linear(&self.router, x)?;
        // Softmax is shift-invariant, so the detached max changes no gradient.
        let max = logits.max_keepdim(D::Minus1)?.detach();
        let e = logits.broadcast_sub(&max)?.exp()?;
        let probs = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        // The choice of experts is discrete (no gradient); the chosen weights carry one.
        let routes = Routes::top_k(&probs.to_vec2::<f32>()?, self.top_k);
        let chosen =
            Tensor::from_vec(routes.chosen.clone(), (routes.rows, self.top_k), x.device())?;
        let mut weights = probs.gather(&chosen, 1)?;
        if self.norm_topk_prob {
            weights = weights.broadcast_div(&weights.sum_keepdim(1)?)?;
        }
        let weights = weights.flatten_all()?;
        let mut out = x.zeros_like()?;
        for (e, expert) in self.experts.iter().enumerate() {
            let (rows, slots) = routes.of(e);
            // An expert without tokens still runs, on zero rows: its taps are all-zero rows
            // and its probes are kept in the graph with a zero gradient.
            let rows = Tensor::from_vec(rows, slots.len(), x.device())?;
            let slots = Tensor::from_vec(slots, rows.dim(0)?, x.device())?;
            let y = expert.forward_routed(rec, &x.index_select(&rows, 0)?, &rows, act)?;
            let w = weights.index_select(&slots, 0)?.unsqueeze(1)?;
            out = out.index_add(&rows, &y.broadcast_mul(&w)?, 0)?;
        }
        out = rec.keep_idle_probes(out)?;
        if let Some(s) = &self.shared {
            let y = s.mlp.forward(rec, x, act)?;
            let g = rec.linear(&s.gate, x)?;
            // σ(g) = (1 + tanh(g/2)) / 2: finite gradient for every g.
            let sigmoid = (((g * 0.5)?.tanh()? + 1.0)? * 0.5)?;
            out = (out + y.broadcast_mul(&sigmoid)?)?;
        }
        Ok(out)
    }
}

/// The experts each row is routed to: per row the `k` most probable, in descending order (ties
/// to the lower index, as `torch.topk` on distinct values).
struct Routes {
    rows: usize,
    k: usize,
    /// `[rows, k]` row-major expert indices.
    chosen: Vec<u32>,
}

impl Routes {
    fn top_k(probs: &[Vec<f32>], k: usize) -> Self {
        let mut chosen = Vec::with_capacity(probs.len() * k);
        for p in probs {
            let mut order: Vec<usize> = (0..p.len()).collect();
            order.sort_by(|&i, &j| p[j].total_cmp(&p[i]).then(i.cmp(&j)));
            chosen.extend(order.iter().take(k).map(|&e| e as u32));
        }
        Routes {
            rows: probs.len(),
            k,
            chosen,
        }
    }

    /// The rows routed to expert `e` and, for each, its slot in the flattened `[rows, k]`
    /// weights.
    fn of(&self, e: usize) -> (Vec<u32>, Vec<u32>) {
        let mut rows = Vec::new();
        let mut slots = Vec::new();
        for (slot, &chosen) in self.chosen.iter().enumerate() {
            if chosen as usize == e {
                rows.push((slot / self.k) as u32);
                slots.push(slot as u32);
            }
        }
        (rows, slots)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::autograd::testing::*;
    use crate::model::autograd::Autograd;
    use crate::model::llama::{Llama, Mlp};
    use crate::model::{Labels, TapModel, TokenBatch};

    const FIXTURES: [&str; 3] = ["mixtral", "qwen2_moe", "qwen3_moe"];

    fn load(name: &str) -> Llama {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/moe")
            .join(name);
        Llama::load(&dir, ModuleSelection::All).unwrap()
    }

    /// Tracked-layer indices of layer 0's experts: `[expert][gate, up, down]`.
    fn expert_taps(m: &Llama) -> Vec<[usize; 3]> {
        let Mlp::Moe(moe) = &m.blocks[0].mlp else {
            panic!("layer 0 is an expert block")
        };
        let tap = |l: &Linear| l.tap.unwrap();
        moe.experts
            .iter()
            .map(|e| [tap(&e.gate), tap(&e.up), tap(&e.down)])
            .collect()
    }

    #[test]
    fn tap_tests() {
        for name in FIXTURES {
            let m = load(name);
            every_probe_receives_a_gradient(&m);
            taps_do_not_depend_on_padding(&m);
            taps_match_finite_differences(&m.tracked, |p| {
                m.run(&batch(), Labels::Data, p).unwrap()
            });
        }
    }

    #[test]
    fn each_token_reaches_exactly_top_k_experts_and_nothing_else() {
        for name in FIXTURES {
            let m = load(name);
            let taps = m.taps(&batch(), Labels::Data).unwrap();
            let d = m.config.hidden_size;
            let routed = |layer: usize, row: usize| {
                taps.layers[layer].a[row * d..(row + 1) * d]
                    .iter()
                    .any(|x| *x != 0.0)
            };
            for row in 0..batch().n_tokens() {
                let mut reached = 0;
                for [gate, up, down] in expert_taps(&m) {
                    let r = routed(gate, row);
                    assert_eq!(r, routed(up, row), "{name}: gate and up share their rows");
                    let d_out = m.tracked[down].d_out;
                    let g = &taps.layers[down].g[row * d_out..(row + 1) * d_out];
                    if !r {
                        assert!(g.iter().all(|x| *x == 0.0), "{name}: unrouted row has a g");
                    }
                    reached += usize::from(r);
                }
                assert_eq!(reached, 2, "{name} row {row}");
            }
        }
    }

    #[test]
    fn an_expert_without_tokens_has_all_zero_taps() {
        // One two-token sequence reaches at most 4 (token, expert) pairs per layer of 4 experts
        // with top-2; this one leaves an expert of layer 0 without tokens.
        let m = load("mixtral");
        let batch = TokenBatch::training(&[(0, &[5, 5])]);
        let taps = m.taps(&batch, Labels::Data).unwrap();
        let idle: Vec<usize> = expert_taps(&m)
            .into_iter()
            .flatten()
            .filter(|&l| {
                let t = &taps.layers[l];
                t.a.iter().chain(&t.g).all(|x| *x == 0.0)
            })
            .collect();
        assert_eq!(idle.len(), 6, "two idle experts (3 linears each): {idle:?}");
        assert!(taps.losses[0].is_finite());
    }

    #[test]
    fn routes_take_the_k_most_probable_experts_per_row() {
        let r = Routes::top_k(&[vec![0.1, 0.5, 0.3, 0.1], vec![0.4, 0.1, 0.1, 0.4]], 2);
        assert_eq!(r.chosen, vec![1, 2, 0, 3]);
        assert_eq!(r.of(0), (vec![1], vec![2]));
        assert_eq!(r.of(3), (vec![1], vec![3]));
        assert_eq!(r.of(1), (vec![0], vec![0]));
        assert_eq!(r.of(2), (vec![0], vec![1]));
    }

    #[test]
    fn sparse_layers_follow_step_and_exceptions() {
        let f = HfMoeFields {
            num_experts: Some(4),
            num_experts_per_tok: Some(2),
            decoder_sparse_step: Some(2),
            mlp_only_layers: Some(vec![3]),
            ..Default::default()
        };
        let c = MoeConfig::from_hf("qwen2_moe", &f, 8, Path::new("c.json"))
            .unwrap()
            .unwrap();
        let sparse: Vec<bool> = (0..4).map(|i| c.is_sparse(i)).collect();
        assert_eq!(sparse, vec![false, true, false, false]);
        let bad = HfMoeFields {
            num_experts: Some(2),
            num_experts_per_tok: Some(3),
            ..Default::default()
        };
        let err = MoeConfig::from_hf("qwen3_moe", &bad, 8, Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("c.json") && err.contains("num_experts_per_tok 3"),
            "{err}"
        );
    }
}
