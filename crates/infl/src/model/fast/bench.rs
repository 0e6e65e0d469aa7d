//! `infl bench`'s engine comparison: per family, on a random model with GPT-2-small widths and
//! two blocks, forward+backward tokens/s of the fast and the autograd engine, and the fast
//! pass against its GEMM-bound floor (its products' FLOPs, counted from the shapes, at the
//! GEMM rate measured in the same run).

use super::{kernels, Fast, Net};
use crate::error::Result;
use crate::model::gpt2::{Gpt2, Gpt2Config};
use crate::model::gpt_neox::{GptNeoX, GptNeoXConfig};
use crate::model::llama::{Llama, LlamaConfig};
use crate::model::weights::Weights;
use crate::model::{Labels, ModuleSelection, TapModel, TokenBatch};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

const D: usize = 768;
const HEADS: usize = 12;
const LAYERS: usize = 2;
const VOCAB: usize = 8192;
const SEQS: usize = 4;
const LEN: usize = 256;

/// One family's measurements.
pub struct EngineTiming {
    pub family: String,
    pub n_tokens: usize,
    pub fast_s: f64,
    pub autograd_s: f64,
    /// FLOPs of the fast pass's products.
    pub flops: f64,
    /// f32 GEMM rate measured on a `[SEQS·LEN, D] × [D, 4D]` product just before the fast
    /// pass (the machine's load changes within a run), FLOP/s.
    pub gemm_rate: f64,
}

/// The whole comparison.
pub struct EngineBench {
    pub families: Vec<EngineTiming>,
}

impl EngineBench {
    pub fn table(&self) -> String {
        let mut s = format!(
            "engines (forward + backward with taps): random {LAYERS}-block models, d = {D}, {HEADS} heads, \
             vocab {VOCAB}, {SEQS} × {LEN} tokens\n{:<10} {:>10} {:>11} {:>15} {:>9} {:>15}\n",
            "family",
            "GEMM GF/s",
            "fast tok/s",
            "autograd tok/s",
            "speedup",
            "floor/fast"
        );
        for f in &self.families {
            // The time a pass doing only its products at the measured GEMM rate would take,
            // as a fraction of the fast pass's time.
            let floor = f.flops / f.gemm_rate;
            s.push_str(&format!(
                "{:<10} {:>10.1} {:>11.0} {:>15.0} {:>8.2}× {:>14.0}%\n",
                f.family,
                f.gemm_rate / 1e9,
                f.n_tokens as f64 / f.fast_s,
                f.n_tokens as f64 / f.autograd_s,
                f.autograd_s / f.fast_s,
                100.0 * floor / f.fast_s
            ));
        }
        s
    }
}

/// Tensors drawn from N(mean, std²).
struct Gen {
    rng: rand_chacha::ChaCha8Rng,
    tensors: HashMap<String, Tensor>,
}

impl Gen {
    fn add(&mut self, name: String, shape: &[usize], mean: f32, std: f32) -> Result<()> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| {
                let (u1, u2): (f32, f32) = (self.rng.random::<f32>().max(1e-7), self.rng.random());
                mean + std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
            })
            .collect();
        self.tensors
            .insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
        Ok(())
    }
}

fn gen() -> Gen {
    Gen {
        rng: rand_chacha::ChaCha8Rng::seed_from_u64(1),
        tensors: HashMap::new(),
    }
}

pub fn llama() -> Result<Llama> {
    let (kv, di, hd) = (4, 2048, D / HEADS);
    let v = serde_json::json!({"model_type": "llama", "vocab_size": VOCAB, "hidden_size": D,
        "intermediate_size": di, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": kv, "tie_word_embeddings": false});
    let c = LlamaConfig::from_json(&v, Path::new("bench"))?;
    let mut g = gen();
    g.add("model.embed_tokens.weight".into(), &[VOCAB, D], 0.0, 0.5)?;
    g.add("lm_head.weight".into(), &[VOCAB, D], 0.0, 0.05)?;
    g.add("model.norm.weight".into(), &[D], 1.0, 0.1)?;
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}");
        for n in ["input_layernorm", "post_attention_layernorm"] {
            g.add(format!("{p}.{n}.weight"), &[D], 1.0, 0.1)?;
        }
        for (n, o, inp) in [
            ("self_attn.q_proj", HEADS * hd, D),
            ("self_attn.k_proj", kv * hd, D),
            ("self_attn.v_proj", kv * hd, D),
            ("self_attn.o_proj", D, HEADS * hd),
            ("mlp.gate_proj", di, D),
            ("mlp.up_proj", di, D),
            ("mlp.down_proj", D, di),
        ] {
            g.add(format!("{p}.{n}.weight"), &[o, inp], 0.0, 0.03)?;
        }
    }
    Llama::from_weights(
        c,
        &Weights::owned(g.tensors, "random"),
        ModuleSelection::All,
    )
}

pub fn gpt_neox() -> Result<GptNeoX> {
    let di = 4 * D;
    let v = serde_json::json!({"vocab_size": VOCAB, "hidden_size": D, "intermediate_size": di,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "rotary_pct": 0.25,
        "use_parallel_residual": true, "hidden_act": "gelu"});
    let c = GptNeoXConfig::from_json(&v, Path::new("bench"))?;
    let mut g = gen();
    g.add("gpt_neox.embed_in.weight".into(), &[VOCAB, D], 0.0, 0.5)?;
    g.add("embed_out.weight".into(), &[VOCAB, D], 0.0, 0.05)?;
    g.add("gpt_neox.final_layer_norm.weight".into(), &[D], 1.0, 0.1)?;
    g.add("gpt_neox.final_layer_norm.bias".into(), &[D], 0.0, 0.1)?;
    for i in 0..LAYERS {
        let p = format!("gpt_neox.layers.{i}");
        for n in ["input_layernorm", "post_attention_layernorm"] {
            g.add(format!("{p}.{n}.weight"), &[D], 1.0, 0.1)?;
            g.add(format!("{p}.{n}.bias"), &[D], 0.0, 0.1)?;
        }
        for (n, o, inp) in [
            ("attention.query_key_value", 3 * D, D),
            ("attention.dense", D, D),
            ("mlp.dense_h_to_4h", di, D),
            ("mlp.dense_4h_to_h", D, di),
        ] {
            g.add(format!("{p}.{n}.weight"), &[o, inp], 0.0, 0.03)?;
            g.add(format!("{p}.{n}.bias"), &[o], 0.0, 0.02)?;
        }
    }
    GptNeoX::from_weights(
        c,
        &Weights::owned(g.tensors, "random"),
        ModuleSelection::All,
    )
}

pub fn gpt2() -> Result<Gpt2> {
    let c = Gpt2Config {
        vocab_size: VOCAB,
        n_positions: 1024,
        n_embd: D,
        n_layer: LAYERS,
        n_head: HEADS,
        n_inner: None,
        layer_norm_epsilon: 1e-5,
        activation_function: "gelu_new".into(),
        scale_attn_weights: true,
        scale_attn_by_inverse_layer_idx: false,
        reorder_and_upcast_attn: false,
    };
    Gpt2::random(c, 1, ModuleSelection::All)
}

/// Best of `reps` timings of `f`, after one untimed warm-up.
fn best(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut t = f64::INFINITY;
    for _ in 0..reps {
        let t0 = Instant::now();
        f()?;
        t = t.min(t0.elapsed().as_secs_f64());
    }
    Ok(t)
}

/// The f32 GEMM rate of the fast engine's product on a block-sized shape, FLOP/s: the faster
/// of one product split over the pool's threads and one whole product per thread at once (the
/// way the passes' driver runs its batches), each the best of several.
///
/// The floor is a lower bound only if its rate is the fastest the machine shows. On a 2-core
/// Zen 4 without AVX-512 the split product ran at 122 or 162 GF/s from one process to the next
/// while one product per core ran at 150–167 together, and a bench whose three split
/// measurements all landed at 128 printed the eigenvalue pass at 101% of its "floor".
pub fn gemm_rate() -> f64 {
    let (x, w) = reference_inputs();
    let (n, k, m) = reference_shape();
    let flops = 2.0 * (n * k * m) as f64;
    let threads = rayon::current_num_threads().max(1);
    // One output per thread; the inputs are only read, so the threads share them.
    let mut outputs: Vec<Vec<f32>> = (0..threads).map(|_| vec![0f32; n * m]).collect();
    let split = best(6, || {
        kernels::matmul_wt(&x, &w, k, m, &mut outputs[0], false);
        Ok(())
    })
    .map_or(0.0, |s| flops / s);
    let whole = best(6, || {
        products_at_once(&x, &w, &mut outputs);
        Ok(())
    })
    .map_or(0.0, |s| threads as f64 * flops / s);
    split.max(whole)
}

/// The GEMM rate read quickly and often, while a run goes on: the reference product once per
/// thread at once (as the passes' driver runs its batches), the faster of two tries (the first
/// may find its inputs out of cache). Inputs and outputs are made once, so that a reading
/// times the products only. On a 2-core Zen 4 without AVX-512 shared with other tenants, this
/// rate read 64–167 GF/s in half-second windows over one minute.
pub struct GemmProbe {
    x: Vec<f32>,
    w: Vec<f32>,
    outputs: std::sync::Mutex<Vec<Vec<f32>>>,
}

impl Default for GemmProbe {
    fn default() -> Self {
        let (x, w) = reference_inputs();
        let (n, _, m) = reference_shape();
        let threads = rayon::current_num_threads().max(1);
        GemmProbe {
            x,
            w,
            outputs: std::sync::Mutex::new((0..threads).map(|_| vec![0f32; n * m]).collect()),
        }
    }
}

impl GemmProbe {
    /// One reading, FLOP/s.
    pub fn read(&self) -> f64 {
        let (n, k, m) = reference_shape();
        let mut outputs = self
            .outputs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let flops = 2.0 * (n * k * m) as f64 * outputs.len() as f64;
        let mut fastest = f64::INFINITY;
        for _ in 0..2 {
            let t0 = Instant::now();
            products_at_once(&self.x, &self.w, &mut outputs);
            fastest = fastest.min(t0.elapsed().as_secs_f64());
        }
        flops / fastest
    }
}

/// The reference product's (rows, inner, columns): a block-sized layer's up-projection.
fn reference_shape() -> (usize, usize, usize) {
    (SEQS * LEN, D, 4 * D)
}

/// The reference product's inputs: rows × inner activations and a columns × inner weight.
fn reference_inputs() -> (Vec<f32>, Vec<f32>) {
    let (n, k, m) = reference_shape();
    let x = (0..n * k).map(|i| (i % 7) as f32 * 0.1).collect();
    let w = (0..m * k).map(|i| (i % 5) as f32 * 0.1).collect();
    (x, w)
}

/// `x · wᵀ` into every output at once, one whole product per task of the current pool.
fn products_at_once(x: &[f32], w: &[f32], outputs: &mut [Vec<f32>]) {
    let (n, k, m) = reference_shape();
    rayon::scope(|s| {
        for y in outputs.iter_mut() {
            s.spawn(move |_| {
                // SAFETY: `x` is n × k and `w` m × k, row-major; `y` is this task's own n × m
                // output.
                unsafe {
                    kernels::gemm(
                        n,
                        m,
                        k,
                        y.as_mut_ptr(),
                        m,
                        kernels::View::rows(x, k),
                        kernels::View::t(w, k),
                        false,
                        1.0,
                        false,
                    )
                }
            });
        }
    });
}

fn time_family<N: Net>(
    family: &str,
    fast: &Fast<N>,
    autograd: &dyn TapModel,
    batch: &TokenBatch,
) -> Result<EngineTiming> {
    let labels = Labels::Data;
    let gemm_rate = gemm_rate();
    let fast_s = best(2, || fast.taps(batch, labels).map(drop))?;
    let autograd_s = best(1, || autograd.taps(batch, labels).map(drop))?;
    Ok(EngineTiming {
        family: family.into(),
        n_tokens: batch.n_tokens(),
        fast_s,
        autograd_s,
        flops: fast.flops(batch),
        gemm_rate,
    })
}

/// Runs the comparison (about a minute on two cores).
pub fn run() -> Result<EngineBench> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    let seqs: Vec<Vec<u32>> = (0..SEQS)
        .map(|_| {
            (0..LEN)
                .map(|_| rng.random_range(0..VOCAB as u32))
                .collect()
        })
        .collect();
    let batch = TokenBatch::training(
        &seqs
            .iter()
            .enumerate()
            .map(|(i, s)| (i as u64, s.as_slice()))
            .collect::<Vec<_>>(),
    );
    let mut families = Vec::new();
    {
        let m = gpt2()?;
        families.push(time_family(
            "gpt2",
            &crate::model::gpt2::fast::FastGpt2::new(&m)?,
            &m,
            &batch,
        )?);
    }
    {
        let m = gpt_neox()?;
        let f = crate::model::gpt_neox::fast::FastGptNeoX::new(&m)?;
        families.push(time_family("gpt_neox", &f, &m, &batch)?);
    }
    {
        let m = llama()?;
        families.push(time_family(
            "llama",
            &crate::model::llama::fast::FastLlama::new(&m)?,
            &m,
            &batch,
        )?);
    }
    Ok(EngineBench { families })
}
