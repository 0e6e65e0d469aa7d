//! Training stage: `infl train` makes a small GPT-2 from scratch, a byte-level BPE tokenizer
//! (the `tokenizers` crate's trainer, GPT-2's pre-tokenisation) and the model itself (AdamW,
//! linear warm-up then cosine decay, gradient clipping), deterministic for a given `--seed`.
//!
//! The model trains on exactly the sequences `fit` and `score` stream (documents cut into
//! windows of `n_positions` tokens, [`crate::data::read_corpus`]), so that "which training
//! sequence" means the same thing in every stage, and `infl validate lds` can retrain on subsets
//! of those sequences. The output is a standard Hugging Face checkpoint directory
//! (`config.json`, `model.safetensors`, `tokenizer.json`) that `infl fit` and transformers read.
//!
//! Gradients come from candle's autograd over the same GPT-2 forward the influence engine's
//! reference path uses ([`crate::model::gpt2`]), with every parameter a `Var`.

use crate::error::{Error, Result};
use crate::model::gpt2::{Gpt2, Gpt2Config};
use crate::model::weights::Weights;
use crate::model::ModuleSelection;
use crate::pass::Progress;
use candle_core::{backprop::GradStore, DType, Device, Tensor, Var, D};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::Path;

/// The special token that ends (and pads) documents; id 0 in every tokenizer `infl` trains.
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// Trains a byte-level BPE tokenizer (GPT-2's pre-tokenisation: no prefix space, regex split,
/// byte-level decoder) with `vocab_size` entries on `texts`. Deterministic for the same texts.
pub fn train_tokenizer(texts: &[String], vocab_size: usize) -> Result<tokenizers::Tokenizer> {
    use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
    use tokenizers::models::TrainerWrapper;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{AddedToken, Tokenizer};
    // 256 byte symbols + the special token is the smallest vocabulary that can encode anything.
    if vocab_size < 257 {
        return Err(Error::input(format!(
            "--vocab-size {vocab_size} is too small: a byte-level tokenizer needs at least 257 \
             entries (256 bytes + {END_OF_TEXT})"
        )));
    }
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
        .build();
    let mut trainer = TrainerWrapper::BpeTrainer(trainer);
    let byte_level = ByteLevel::new(false, true, true);
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer
        .with_pre_tokenizer(Some(byte_level))
        .with_post_processor(Some(byte_level))
        .with_decoder(Some(byte_level));
    tokenizer
        .train(&mut trainer, texts.iter())
        .map_err(|e| Error::Other(format!("training the tokenizer failed: {e}")))?;
    Ok(tokenizer)
}

/// Everything that changes the training run besides the data.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TrainOptions {
    /// Passes over the training sequences.
    pub epochs: usize,
    /// Sequences per optimiser step.
    pub batch_size: usize,
    /// Peak learning rate (after warm-up).
    pub lr: f64,
    /// The cosine schedule decays to `lr · min_lr_ratio` at the last step.
    pub min_lr_ratio: f64,
    /// Linear warm-up steps (capped at a tenth of the run).
    pub warmup_steps: usize,
    /// AdamW's decoupled weight decay, applied to matrices and embeddings (not biases or norms).
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Clip the global gradient norm to this value (0 = no clipping).
    pub grad_clip: f64,
    /// Seeds the initialisation and the order of the sequences in every epoch.
    pub seed: u64,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            epochs: 10,
            batch_size: 16,
            lr: 3e-3,
            min_lr_ratio: 0.1,
            warmup_steps: 50,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            grad_clip: 1.0,
            seed: 0,
        }
    }
}

impl TrainOptions {
    fn check(&self) -> Result<()> {
        let bad = |msg: &str| Err(Error::usage(msg.to_string()));
        crate::options::EPOCHS.check(self.epochs)?;
        crate::options::BATCH_SIZE.check(self.batch_size)?;
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("--lr must be a positive number");
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad("the minimum learning-rate ratio must lie in [0, 1]");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("--weight-decay must be a non-negative number");
        }
        Ok(())
    }

    /// Steps of a run over `n_sequences` sequences.
    pub fn total_steps(&self, n_sequences: usize) -> usize {
        self.epochs * n_sequences.div_ceil(self.batch_size)
    }

    /// Learning rate at `step` (0-based) of `total`: linear warm-up, then cosine decay.
    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        let warmup = self.warmup_steps.min(total / 10).max(1);
        if step < warmup {
            return self.lr * (step + 1) as f64 / warmup as f64;
        }
        let progress = (step - warmup) as f64 / (total - warmup).max(1) as f64;
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos());
        self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine)
    }
}

/// One trainable parameter, by checkpoint name.
struct Parameter {
    name: String,
    var: Var,
    decay: bool,
    m: Tensor,
    v: Tensor,
}

/// A GPT-2 under training: every parameter is a `Var`, and [`Gpt2`] is built over the same
/// tensors, so updates to the `Var`s are updates to the model.
pub struct Trainer {
    config: Gpt2Config,
    params: Vec<Parameter>,
    model: Gpt2,
    options: TrainOptions,
    step: usize,
}

/// Gaussian samples by Box–Muller from a seeded generator (portable, bit-reproducible).
fn normal(rng: &mut rand_chacha::ChaCha8Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let (u1, u2): (f32, f32) = (rng.random::<f32>().max(1e-7), rng.random());
            std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
        })
        .collect()
}

impl Trainer {
    /// A freshly initialised model: GPT-2's scheme (N(0, 0.02) weights, residual projections
    /// scaled by 1/√(2·layers), zero biases, unit layer norms), drawn from `options.seed`.
    pub fn new(config: Gpt2Config, options: TrainOptions) -> Result<Self> {
        options.check()?;
        crate::io::keep_freed_memory();
        crate::linalg::flush_subnormals();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(options.seed);
        let (d, v, p) = (config.n_embd, config.vocab_size, config.n_positions);
        let di = config.n_inner.unwrap_or(4 * d);
        let residual_std = 0.02 / (2.0 * config.n_layer as f32).sqrt();
        let mut specs: Vec<(String, Vec<usize>, Init)> = vec![
            ("wte.weight".into(), vec![v, d], Init::Normal(0.02)),
            ("wpe.weight".into(), vec![p, d], Init::Normal(0.01)),
        ];
        for i in 0..config.n_layer {
            let h = |s: &str| format!("h.{i}.{s}");
            specs.extend([
                (h("ln_1.weight"), vec![d], Init::Ones),
                (h("ln_1.bias"), vec![d], Init::Zeros),
                (h("attn.c_attn.weight"), vec![d, 3 * d], Init::Normal(0.02)),
                (h("attn.c_attn.bias"), vec![3 * d], Init::Zeros),
                (
                    h("attn.c_proj.weight"),
                    vec![d, d],
                    Init::Normal(residual_std),
                ),
                (h("attn.c_proj.bias"), vec![d], Init::Zeros),
                (h("ln_2.weight"), vec![d], Init::Ones),
                (h("ln_2.bias"), vec![d], Init::Zeros),
                (h("mlp.c_fc.weight"), vec![d, di], Init::Normal(0.02)),
                (h("mlp.c_fc.bias"), vec![di], Init::Zeros),
                (
                    h("mlp.c_proj.weight"),
                    vec![di, d],
                    Init::Normal(residual_std),
                ),
                (h("mlp.c_proj.bias"), vec![d], Init::Zeros),
            ]);
        }
        specs.push(("ln_f.weight".into(), vec![d], Init::Ones));
        specs.push(("ln_f.bias".into(), vec![d], Init::Zeros));
        let mut params = Vec::with_capacity(specs.len());
        for (name, shape, init) in specs {
            let n: usize = shape.iter().product();
            let data = match init {
                Init::Normal(std) => normal(&mut rng, n, std),
                Init::Ones => vec![1.0; n],
                Init::Zeros => vec![0.0; n],
            };
            let var = Var::from_tensor(&Tensor::from_vec(data, shape.as_slice(), &Device::Cpu)?)?;
            let decay = shape.len() == 2;
            let m = Tensor::zeros(shape.as_slice(), DType::F32, &Device::Cpu)?;
            params.push(Parameter {
                name,
                var,
                decay,
                v: m.clone(),
                m,
            });
        }
        let model = build_model(&config, &params)?;
        Ok(Trainer {
            config,
            params,
            model,
            options,
            step: 0,
        })
    }

    pub fn model(&self) -> &Gpt2 {
        &self.model
    }

    /// Mean next-token cross-entropy of a batch (a graph to differentiate).
    fn batch_loss(&self, batch: &[&[u32]]) -> Result<(Tensor, usize)> {
        let t = batch.iter().map(|s| s.len()).max().unwrap_or(0);
        let v = self.config.vocab_size;
        let (mut rows, mut targets) = (Vec::new(), Vec::new());
        for (b, s) in batch.iter().enumerate() {
            for p in 0..s.len().saturating_sub(1) {
                rows.push((b * t + p) as u32);
                targets.push(s[p + 1]);
            }
        }
        if rows.is_empty() {
            return Err(Error::input(
                "a training batch holds no next-token prediction (every sequence is one token long)",
            ));
        }
        let ids: Vec<Vec<u32>> = batch.iter().map(|s| s.to_vec()).collect();
        let forward = self.model.forward(&ids, t, &[])?;
        let n = rows.len();
        let logits = forward
            .logits
            .reshape((batch.len() * t, v))?
            .index_select(&Tensor::from_vec(rows, n, &Device::Cpu)?, 0)?;
        let loss = cross_entropy(&logits, &targets)?.mean_all()?;
        Ok((loss, n))
    }

    /// The mean next-token cross-entropy of `batch` under the current weights.
    pub fn loss(&self, batch: &[&[u32]]) -> Result<f64> {
        Ok(self.batch_loss(batch)?.0.to_scalar::<f32>()? as f64)
    }

    /// ∂loss/∂parameter for every parameter, by checkpoint name.
    pub fn gradients(&self, batch: &[&[u32]]) -> Result<HashMap<String, Tensor>> {
        let grads = self.batch_loss(batch)?.0.backward()?;
        self.params
            .iter()
            .map(|p| {
                let g = match grads.get(p.var.as_tensor()) {
                    Some(g) => g.detach(),
                    None => p.var.as_tensor().zeros_like()?,
                };
                Ok((p.name.clone(), g))
            })
            .collect()
    }

    /// Overwrites one parameter entry (finite-difference tests).
    #[cfg(test)]
    fn set_entry(&self, name: &str, index: usize, value: f32) -> Result<()> {
        let p = self
            .params
            .iter()
            .find(|p| p.name == name)
            .expect("a parameter");
        let shape = p.var.as_tensor().dims().to_vec();
        let mut data = p.var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        data[index] = value;
        p.var.set(&Tensor::from_vec(data, shape, &Device::Cpu)?)?;
        Ok(())
    }

    /// One AdamW step on `batch`; returns the batch's mean loss before the step.
    pub fn step(&mut self, batch: &[&[u32]], total_steps: usize) -> Result<f32> {
        let (loss, _) = self.batch_loss(batch)?;
        let value = loss.to_scalar::<f32>()?;
        if !value.is_finite() {
            return Err(Error::NonFinite(format!(
                "training loss became {value} at step {}; lower --lr",
                self.step + 1
            )));
        }
        let grads = loss.backward()?;
        self.apply(&grads, total_steps)?;
        Ok(value)
    }

    fn apply(&mut self, grads: &GradStore, total_steps: usize) -> Result<()> {
        let o = &self.options;
        let mut sq = 0.0f64;
        let mut gs = Vec::with_capacity(self.params.len());
        for p in &self.params {
            // Detached: a gradient's own op graph reaches back into the forward pass, and the
            // optimiser state must not keep every step's graph alive.
            let g = match grads.get(p.var.as_tensor()) {
                Some(g) => g.detach(),
                None => p.var.as_tensor().zeros_like()?,
            };
            sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            gs.push(g);
        }
        let norm = sq.sqrt();
        let clip = if o.grad_clip > 0.0 && norm > o.grad_clip {
            o.grad_clip / norm
        } else {
            1.0
        };
        let lr = o.lr_at(self.step, total_steps);
        self.step += 1;
        let t = self.step as i32;
        let (bc1, bc2) = (1.0 - o.beta1.powi(t), 1.0 - o.beta2.powi(t));
        for (p, g) in self.params.iter_mut().zip(gs) {
            let g = (g * clip)?;
            p.m = ((&p.m * o.beta1)? + (&g * (1.0 - o.beta1))?)?;
            p.v = ((&p.v * o.beta2)? + (g.sqr()? * (1.0 - o.beta2))?)?;
            let update = ((&p.m / bc1)? / ((&p.v / bc2)?.sqrt()? + o.eps)?)?;
            let w = p.var.as_tensor();
            let decayed = if p.decay {
                (w * (1.0 - lr * o.weight_decay))?
            } else {
                w.clone()
            };
            p.var.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
    }

    /// Trains on `sequences` for `options.epochs` epochs, each in an order drawn from the seed.
    /// Returns the mean training loss of every epoch.
    pub fn fit(&mut self, sequences: &[&[u32]], progress: &dyn Progress) -> Result<Vec<f64>> {
        let o = self.options.clone();
        if sequences.is_empty() {
            return Err(Error::input("the training set holds no sequences"));
        }
        let total = o.total_steps(sequences.len());
        let tokens: u64 = sequences.iter().map(|s| s.len() as u64).sum();
        progress.begin("train", tokens * o.epochs as u64);
        // The order stream is separate from the initialisation's, so the same seed gives the
        // same order whatever the model's size.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(o.seed ^ 0x005e_ed0f_0dde);
        let mut order: Vec<usize> = (0..sequences.len()).collect();
        let mut epoch_losses = Vec::with_capacity(o.epochs);
        for _ in 0..o.epochs {
            for i in (1..order.len()).rev() {
                order.swap(i, rng.random_range(0..=i));
            }
            let (mut sum, mut count) = (0.0f64, 0usize);
            for chunk in order.chunks(o.batch_size) {
                let batch: Vec<&[u32]> = chunk.iter().map(|&i| sequences[i]).collect();
                // A batch of one-token sequences predicts nothing and has no gradient: no
                // step. A corpus's own training rarely draws one, a retraining on part of it
                // (`infl validate removal`) can.
                if batch.iter().all(|s| s.len() < 2) {
                    progress.advance(batch.iter().map(|s| s.len() as u64).sum());
                    continue;
                }
                let loss = self.step(&batch, total)?;
                sum += loss as f64;
                count += 1;
                progress.advance(batch.iter().map(|s| s.len() as u64).sum());
            }
            if count == 0 {
                return Err(Error::input(
                    "no training sequence is longer than one token: nothing to predict",
                ));
            }
            epoch_losses.push(sum / count as f64);
        }
        progress.end();
        Ok(epoch_losses)
    }

    /// The trained weights by checkpoint name (tensors detached from the optimiser).
    pub fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        self.params
            .iter()
            .map(|p| Ok((p.name.clone(), p.var.as_tensor().detach().copy()?)))
            .collect()
    }
}

enum Init {
    Normal(f32),
    Ones,
    Zeros,
}

fn build_model(config: &Gpt2Config, params: &[Parameter]) -> Result<Gpt2> {
    let tensors = params
        .iter()
        .map(|p| (p.name.clone(), p.var.as_tensor().clone()))
        .collect();
    Gpt2::from_weights(
        config.clone(),
        &Weights::owned(tensors, "parameters in training"),
        ModuleSelection::All,
    )
}

/// Per-row cross-entropy `−log softmax(logits)[target]`, `[n, V]` → `[n]`, composed from
/// differentiable ops (the max is detached: softmax is shift-invariant).
fn cross_entropy(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let n = targets.len();
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let idx = Tensor::from_vec(targets.to_vec(), (n, 1), &Device::Cpu)?;
    let picked = shifted.gather(&idx, D::Minus1)?;
    Ok((log_sum - picked)?.squeeze(D::Minus1)?)
}

/// −log p(completion | prompt) under `model`, summed over the completion's tokens, for each
/// (prompt, completion) pair: the query measurement `infl score` differentiates.
pub fn completion_losses(model: &Gpt2, queries: &[(&[u32], &[u32])]) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(queries.len());
    for (prompt, completion) in queries {
        let ids: Vec<u32> = prompt.iter().chain(completion.iter()).copied().collect();
        if prompt.is_empty() || completion.is_empty() {
            return Err(Error::input(
                "a query needs a non-empty prompt and completion to measure",
            ));
        }
        let t = ids.len();
        let forward = model.forward(std::slice::from_ref(&ids), t, &[])?;
        let v = model.config().vocab_size;
        let rows: Vec<u32> = (prompt.len() - 1..t - 1).map(|p| p as u32).collect();
        let n = rows.len();
        let logits = forward
            .logits
            .reshape((t, v))?
            .index_select(&Tensor::from_vec(rows, n, &Device::Cpu)?, 0)?
            .to_dtype(DType::F64)?;
        let loss = cross_entropy(&logits, completion)?.sum_all()?;
        out.push(loss.to_scalar::<f64>()?);
    }
    Ok(out)
}

/// What `infl train` records next to the checkpoint (`training.json`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TrainingRecord {
    pub tool: String,
    pub corpus: String,
    pub corpus_sha256: String,
    pub n_documents: usize,
    pub n_sequences: usize,
    pub n_tokens: usize,
    pub config: Gpt2Config,
    pub options: TrainOptions,
    /// Where the tokenizer came from: trained here (with its vocabulary size) or reused.
    pub tokenizer: String,
    pub epoch_losses: Vec<f64>,
    pub steps: usize,
    pub seconds: f64,
    pub parameters: usize,
}

/// Writes a trained model as a Hugging Face GPT-2 checkpoint directory: `config.json` (with the
/// fields transformers needs to load it as `GPT2LMHeadModel`), `model.safetensors` (tied LM head,
/// so no `lm_head.weight`), `tokenizer.json` and `training.json`. Files are written into a
/// temporary folder inside `dir` (removed on any error, swept by the next run after a kill)
/// and renamed into place, so a failure leaves no half-written file.
pub fn save_checkpoint(
    dir: &Path,
    tensors: &HashMap<String, Tensor>,
    tokenizer: &tokenizers::Tokenizer,
    record: &TrainingRecord,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tmp = crate::io::temp_sibling(&dir.join("checkpoint"));
    let written = write_checkpoint(dir, &tmp, tensors, tokenizer, record);
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written
}

/// [`save_checkpoint`]'s files, built in `tmp`.
fn write_checkpoint(
    dir: &Path,
    tmp: &Path,
    tensors: &HashMap<String, Tensor>,
    tokenizer: &tokenizers::Tokenizer,
    record: &TrainingRecord,
) -> Result<()> {
    std::fs::create_dir_all(tmp).map_err(|e| Error::io(tmp, e))?;
    let c = &record.config;
    let config = serde_json::json!({
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": c.vocab_size,
        "n_positions": c.n_positions,
        "n_ctx": c.n_positions,
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": c.n_inner,
        "activation_function": c.activation_function,
        "layer_norm_epsilon": c.layer_norm_epsilon,
        "scale_attn_weights": true,
        "tie_word_embeddings": true,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "torch_dtype": "float32",
    });
    let write_json = |file: &str, value: &serde_json::Value| -> Result<()> {
        let path = tmp.join(file);
        let text = serde_json::to_string_pretty(value).map_err(|e| Error::Other(e.to_string()))?;
        std::fs::write(&path, text + "\n").map_err(|e| Error::io(&path, e))
    };
    write_json("config.json", &config)?;
    let st = tmp.join("model.safetensors");
    candle_core::safetensors::save(tensors, &st)?;
    let tok = tmp.join("tokenizer.json");
    tokenizer
        .save(&tok, false)
        .map_err(|e| Error::Other(format!("{}: {e}", tok.display())))?;
    write_json(
        "training.json",
        &serde_json::to_value(record).map_err(|e| Error::Other(e.to_string()))?,
    )?;
    for file in [
        "model.safetensors",
        "tokenizer.json",
        "training.json",
        "config.json",
    ] {
        let (from, to) = (tmp.join(file), dir.join(file));
        std::fs::rename(&from, &to).map_err(|e| Error::io(&to, e))?;
    }
    std::fs::remove_dir(tmp).map_err(|e| Error::io(tmp, e))
}

/// Settings of `infl train`.
#[derive(Debug, Clone)]
pub struct TrainJob {
    /// JSONL corpus (`{"text": ...}` per line).
    pub train: std::path::PathBuf,
    pub out: std::path::PathBuf,
    /// Reuse this `tokenizer.json` instead of training one.
    pub tokenizer: Option<std::path::PathBuf>,
    /// Entries of the tokenizer to train (ignored with `tokenizer`).
    pub vocab_size: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    /// Context length, and the window length the corpus is cut into.
    pub n_positions: usize,
    pub options: TrainOptions,
    /// What may be replaced in `out`.
    pub output: crate::options::OutputOptions,
}

/// What `train` hands back.
pub struct Trained {
    pub record: TrainingRecord,
    pub tokenizer: tokenizers::Tokenizer,
    pub tensors: HashMap<String, Tensor>,
}

/// Trains (or reads) the tokenizer, cuts the corpus into the windows fit and score will stream,
/// trains the model and writes the checkpoint to `job.out`.
/// The model's shape and the training options in their ranges ([`Error::Usage`]), before any
/// work.
fn check_job(job: &TrainJob) -> Result<()> {
    use crate::options::{N_EMBD, N_HEAD, N_LAYER, N_POSITIONS, VOCAB_SIZE};
    if job.tokenizer.is_none() {
        VOCAB_SIZE.check(job.vocab_size)?;
    }
    N_EMBD.check(job.n_embd)?;
    N_LAYER.check(job.n_layer)?;
    N_HEAD.check(job.n_head)?;
    N_POSITIONS.check(job.n_positions)?;
    if !job.n_embd.is_multiple_of(job.n_head) {
        return Err(Error::usage(format!(
            "--n-embd ({}) must be a multiple of --n-head ({})",
            job.n_embd, job.n_head
        )));
    }
    job.options.check()
}

pub fn train(job: &TrainJob, progress: &dyn Progress) -> Result<Trained> {
    use crate::output_dir::{Kind, OutputDir};
    let started = std::time::Instant::now();
    check_job(job)?;
    let out = OutputDir::open(
        &job.out,
        Kind::Model,
        crate::shard::Shard::WHOLE,
        job.output.overwrite,
    )?;
    let (texts, corpus_sha256) = crate::data::read_texts(&job.train)?;
    let (tokenizer, tokenizer_source) = match &job.tokenizer {
        Some(path) => (
            tokenizers::Tokenizer::from_file(path).map_err(|e| {
                Error::input(format!("{}: not a tokenizer.json: {e}", path.display()))
            })?,
            format!("reused {}", path.display()),
        ),
        None => (
            train_tokenizer(&texts, job.vocab_size)?,
            format!("byte-level BPE trained here, {} entries", job.vocab_size),
        ),
    };
    let vocab_size = tokenizer.get_vocab_size(true);
    // Exactly the windows `fit` and `score` will stream from this corpus.
    let corpus = crate::data::read_corpus(
        &job.train,
        &mut crate::data::LazyTokenizer::loaded(tokenizer.clone()),
        job.n_positions.max(1),
        vocab_size,
    )?;
    let sequences: Vec<Vec<u32>> = corpus.sequences.into_iter().map(|s| s.ids).collect();
    let config = Gpt2Config {
        vocab_size,
        n_positions: job.n_positions,
        n_embd: job.n_embd,
        n_layer: job.n_layer,
        n_head: job.n_head,
        n_inner: None,
        layer_norm_epsilon: 1e-5,
        activation_function: "gelu_new".into(),
        scale_attn_weights: true,
        scale_attn_by_inverse_layer_idx: false,
        reorder_and_upcast_attn: false,
    };
    out.claim(
        &serde_json::json!({
            "corpus_sha256": corpus_sha256,
            "config": config,
            "options": job.options,
            "tokenizer": tokenizer_source,
        }),
        false,
    )?;
    let mut trainer = Trainer::new(config.clone(), job.options.clone())?;
    let refs: Vec<&[u32]> = sequences.iter().map(|s| s.as_slice()).collect();
    let epoch_losses = trainer.fit(&refs, progress)?;
    let tensors = trainer.tensors()?;
    let record = TrainingRecord {
        tool: format!("infl {}", env!("CARGO_PKG_VERSION")),
        corpus: job.train.display().to_string(),
        corpus_sha256,
        n_documents: texts.len(),
        n_sequences: sequences.len(),
        n_tokens: sequences.iter().map(|s| s.len()).sum(),
        parameters: tensors.values().map(|t| t.elem_count()).sum(),
        config,
        options: job.options.clone(),
        tokenizer: tokenizer_source,
        steps: job.options.total_steps(sequences.len()),
        epoch_losses,
        seconds: started.elapsed().as_secs_f64(),
    };
    save_checkpoint(&job.out, &tensors, &tokenizer, &record)?;
    Ok(Trained {
        record,
        tokenizer,
        tensors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pass::Silent;

    fn tiny() -> Gpt2Config {
        Gpt2Config {
            vocab_size: 23,
            n_positions: 12,
            n_embd: 8,
            n_layer: 2,
            n_head: 2,
            n_inner: None,
            layer_norm_epsilon: 1e-5,
            activation_function: "gelu_new".into(),
            scale_attn_weights: true,
            scale_attn_by_inverse_layer_idx: false,
            reorder_and_upcast_attn: false,
        }
    }

    fn data() -> Vec<Vec<u32>> {
        (0..12u32)
            .map(|d| {
                (0..4 + d % 8)
                    .map(|t| (d * 7 + t * t * 3 + 1) % 23)
                    .collect()
            })
            .collect()
    }

    fn refs(d: &[Vec<u32>]) -> Vec<&[u32]> {
        d.iter().map(|s| s.as_slice()).collect()
    }

    fn value(t: &Tensor, index: usize) -> f32 {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()[index]
    }

    #[test]
    fn gradients_match_central_differences() {
        let trainer = Trainer::new(tiny(), TrainOptions::default()).unwrap();
        // At GPT-2's init the embeddings are ~0.02 and the first layer norm divides by their
        // spread: the loss is so curved there that f32 differences cannot resolve a gradient.
        // Unit-scale embeddings (as after some training) make the check well conditioned.
        for p in trainer
            .params
            .iter()
            .filter(|p| p.name.starts_with("wte") || p.name.starts_with("wpe"))
        {
            p.var.set(&(p.var.as_tensor() * 40.0).unwrap()).unwrap();
        }
        let d = data();
        let batch = refs(&d[..5]);
        let grads = trainer.gradients(&batch).unwrap();
        // Entries of every kind of parameter: embeddings (token and position), a norm, the
        // attention and MLP weights and biases, the final norm.
        let probes = [
            ("wte.weight", 3 * 8 + 2),
            ("wpe.weight", 5),
            ("h.0.ln_1.weight", 4),
            ("h.0.attn.c_attn.weight", 17),
            ("h.1.attn.c_proj.bias", 3),
            ("h.1.mlp.c_fc.weight", 40),
            ("h.0.mlp.c_proj.weight", 99),
            ("ln_f.bias", 6),
        ];
        for (name, i) in probes {
            let p = trainer.params.iter().find(|p| p.name == name).unwrap();
            let w = value(p.var.as_tensor(), i);
            let central = |h: f32| {
                trainer.set_entry(name, i, w + h).unwrap();
                let up = trainer.loss(&batch).unwrap();
                trainer.set_entry(name, i, w - h).unwrap();
                let down = trainer.loss(&batch).unwrap();
                trainer.set_entry(name, i, w).unwrap();
                (up - down) / (2.0 * h as f64)
            };
            // Richardson: (4·D(h/2) − D(h))/3 cancels the h² term; the f32 loss limits h below.
            let fd = (4.0 * central(1e-2) - central(2e-2)) / 3.0;
            let g = value(&grads[name], i) as f64;
            assert!(
                (fd - g).abs() <= 1e-2 * g.abs() + 5e-5,
                "{name}[{i}]: autograd {g:e} vs central difference {fd:e}"
            );
        }
    }

    #[test]
    fn first_adamw_step_moves_each_weight_by_lr_times_the_gradient_sign() {
        // With bias correction, Adam's first update is lr · g / (|g| + eps) = ±lr; decay adds
        // −lr·wd·w on matrices only. Worked by hand from the gradients.
        let options = TrainOptions {
            lr: 1e-2,
            warmup_steps: 0,
            weight_decay: 0.1,
            grad_clip: 0.0,
            ..Default::default()
        };
        let mut trainer = Trainer::new(tiny(), options.clone()).unwrap();
        let d = data();
        let batch = refs(&d[..4]);
        let before = trainer.tensors().unwrap();
        let grads = trainer.gradients(&batch).unwrap();
        assert_eq!(options.lr_at(0, 10), options.lr);
        trainer.step(&batch, 10).unwrap();
        let after = trainer.tensors().unwrap();
        let mut moved = 0;
        for (name, w0) in &before {
            let (w0, w1, g) = (
                w0.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                after[name].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                grads[name].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            let decay = if before[name].rank() == 2 { 0.1 } else { 0.0 };
            for k in 0..w0.len() {
                let step = options.lr * g[k] as f64 / ((g[k] as f64).abs() + options.eps);
                let expected = w0[k] as f64 * (1.0 - options.lr * decay) - step;
                assert!(
                    (w1[k] as f64 - expected).abs() < 1e-6,
                    "{name}[{k}]: {} vs {expected}",
                    w1[k]
                );
                moved += usize::from(g[k] != 0.0);
            }
        }
        assert!(moved > 1000, "only {moved} weights had a gradient");
    }

    #[test]
    fn the_same_seed_gives_the_same_weights_and_another_seed_does_not() {
        let d = data();
        let run = |seed: u64| {
            let options = TrainOptions {
                epochs: 2,
                batch_size: 4,
                seed,
                ..Default::default()
            };
            let mut t = Trainer::new(tiny(), options).unwrap();
            let losses = t.fit(&refs(&d), &Silent).unwrap();
            (t.tensors().unwrap(), losses)
        };
        let (a, la) = run(7);
        let (b, lb) = run(7);
        let (c, _) = run(8);
        assert_eq!(la, lb);
        let bits = |m: &HashMap<String, Tensor>, k: &str| {
            m[k].flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        for k in a.keys() {
            assert_eq!(bits(&a, k), bits(&b, k), "{k}");
        }
        assert_ne!(bits(&a, "wte.weight"), bits(&c, "wte.weight"));
    }

    #[test]
    fn training_lowers_the_loss() {
        let d = data();
        let options = TrainOptions {
            epochs: 30,
            batch_size: 4,
            lr: 1e-2,
            ..Default::default()
        };
        let mut t = Trainer::new(tiny(), options).unwrap();
        let before = t.loss(&refs(&d)).unwrap();
        let losses = t.fit(&refs(&d), &Silent).unwrap();
        let after = t.loss(&refs(&d)).unwrap();
        // ln 23 = 3.14 is the loss of a uniform guess; these short repeated patterns are learnable.
        assert!((before - 23f64.ln()).abs() < 0.1, "initial loss {before}");
        assert!(after < 0.7 * before, "loss {before} → {after} ({losses:?})");
    }

    #[test]
    fn schedule_warms_up_linearly_then_decays_by_cosine_to_the_floor() {
        let o = TrainOptions {
            lr: 1.0,
            warmup_steps: 10,
            min_lr_ratio: 0.1,
            ..Default::default()
        };
        let total = 200;
        assert!((o.lr_at(0, total) - 0.1).abs() < 1e-12);
        assert!((o.lr_at(9, total) - 1.0).abs() < 1e-12);
        assert!((o.lr_at(10, total) - 1.0).abs() < 1e-12);
        // Half-way through the decay: the cosine is at 0, so lr = floor + (1 - floor)/2.
        assert!((o.lr_at(10 + 95, total) - 0.55).abs() < 1e-12);
        assert!((o.lr_at(total, total) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn completion_losses_sum_the_completion_tokens_cross_entropy() {
        let trainer = Trainer::new(tiny(), TrainOptions::default()).unwrap();
        let model = trainer.model();
        let (prompt, completion): (&[u32], &[u32]) = (&[1, 5, 9], &[4, 2]);
        let got = completion_losses(model, &[(prompt, completion)]).unwrap()[0];
        // By hand: softmax of the logits at positions 2 and 3 (predicting 4, then 2).
        let ids = vec![vec![1u32, 5, 9, 4, 2]];
        let logits = model.forward(&ids, 5, &[]).unwrap().logits;
        let rows = logits.squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        let nll = |row: &[f32], target: usize| {
            let m = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let z: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
            -(row[target] as f64 - m - z.ln())
        };
        let expected = nll(&rows[2], 4) + nll(&rows[3], 2);
        assert!((got - expected).abs() < 1e-5, "{got} vs {expected}");
    }

    #[test]
    fn the_tokenizer_is_byte_level_and_round_trips() {
        let texts: Vec<String> = (0..50)
            .map(|i| format!("The capital of Veloria is Tarn, said the {i}th herald — naïvely."))
            .collect();
        let a = train_tokenizer(&texts, 300).unwrap();
        let b = train_tokenizer(&texts, 300).unwrap();
        assert_eq!(a.to_string(false).unwrap(), b.to_string(false).unwrap());
        assert!(a.get_vocab_size(true) <= 300 && a.get_vocab_size(true) > 257);
        assert_eq!(a.token_to_id(END_OF_TEXT), Some(0));
        let text = "Unseen: Ωmega, 東京 and the herald of Tarn.";
        let ids = a.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(a.decode(&ids, false).unwrap(), text);
        // Merges were learnt: the frequent phrase takes fewer tokens than bytes.
        let common = a.encode("The capital of Veloria", false).unwrap();
        assert!(common.get_ids().len() < 8, "{:?}", common.get_ids());
        assert!(train_tokenizer(&texts, 100).is_err());
    }

    /// A batch of one-token sequences is skipped, not an error: with batches of one, the two
    /// one-token sequences are batches of their own every epoch.
    #[test]
    fn batches_with_nothing_to_predict_are_skipped() {
        let d: Vec<Vec<u32>> = vec![vec![1], vec![2, 3, 4, 5], vec![6]];
        let options = TrainOptions {
            batch_size: 1,
            epochs: 2,
            ..TrainOptions::default()
        };
        let mut t = Trainer::new(tiny(), options.clone()).unwrap();
        let before = value(&t.tensors().unwrap()["h.0.mlp.c_fc.weight"], 3);
        let losses = t.fit(&refs(&d), &Silent).unwrap();
        assert!(
            losses.len() == 2 && losses.iter().all(|l| l.is_finite()),
            "{losses:?}"
        );
        assert_ne!(
            value(&t.tensors().unwrap()["h.0.mlp.c_fc.weight"], 3),
            before
        );
        let mut t = Trainer::new(tiny(), options).unwrap();
        assert!(t.fit(&refs(&[vec![1], vec![2]]), &Silent).is_err());
    }
}
