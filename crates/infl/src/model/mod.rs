//! Model stage: loads a checkpoint and, for a batch of token sequences, yields per tracked linear
//! layer the pair (a, g): the layer's inputs and the gradients of the loss with respect to its
//! outputs, for every real (non-padding) token. Nothing downstream ever sees an architecture.

pub mod fast;
pub mod gguf;
pub mod gpt2;
pub mod gpt_neox;
pub mod llama;
pub(crate) mod ops;
pub mod weights;

use crate::error::{Error, Result};
use rand::{Rng, SeedableRng};
use std::path::Path;

/// One tracked linear layer `y = W a + b`, named by its checkpoint name.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TrackedLayer {
    pub name: String,
    pub d_in: usize,
    pub d_out: usize,
    pub has_bias: bool,
}

impl TrackedLayer {
    /// Width of the homogeneous input `[a, 1]` (the 1 only when the layer has a bias).
    pub fn d_in_h(&self) -> usize {
        self.d_in + usize::from(self.has_bias)
    }
}

/// Which tracked layers to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum ModuleSelection {
    All,
    Mlp,
    Attn,
}

/// A batch of token sequences, right-padded to a common length by the model.
#[derive(Debug, Clone)]
pub struct TokenBatch {
    /// The sequences' token ids (unpadded).
    pub ids: Vec<Vec<u32>>,
    /// For each sequence and each position t, whether the cross-entropy of predicting token t+1
    /// from position t enters the loss. Length = sequence length (the last entry is always false).
    pub loss_positions: Vec<Vec<bool>>,
    /// A stable index per sequence (its position in the corpus or query file); seeds the labels
    /// sampled for the true Fisher so that they do not depend on batching.
    pub stable_index: Vec<u64>,
}

impl TokenBatch {
    /// Training sequences: every next-token prediction counts.
    pub fn training(seqs: &[(u64, &[u32])]) -> Self {
        let ids: Vec<Vec<u32>> = seqs.iter().map(|(_, s)| s.to_vec()).collect();
        let loss_positions = ids
            .iter()
            .map(|s| (0..s.len()).map(|t| t + 1 < s.len()).collect())
            .collect();
        TokenBatch {
            ids,
            loss_positions,
            stable_index: seqs.iter().map(|(i, _)| *i).collect(),
        }
    }

    /// Queries: only the predictions of completion tokens count (−log p(completion | prompt)).
    pub fn queries(queries: &[(u64, &[u32], &[u32])]) -> Self {
        let mut ids = Vec::new();
        let mut loss_positions = Vec::new();
        for (_, prompt, completion) in queries {
            let mut s = prompt.to_vec();
            s.extend_from_slice(completion);
            let p = prompt.len();
            loss_positions.push(
                (0..s.len())
                    .map(|t| t + 1 >= p && t + 1 < s.len())
                    .collect(),
            );
            ids.push(s);
        }
        TokenBatch {
            ids,
            loss_positions,
            stable_index: queries.iter().map(|(i, _, _)| *i).collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn max_len(&self) -> usize {
        self.ids.iter().map(Vec::len).max().unwrap_or(0)
    }

    pub fn n_tokens(&self) -> usize {
        self.ids.iter().map(Vec::len).sum()
    }
}

/// Where the labels of the loss come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Labels {
    /// The data's next tokens (training loss, query measurement, empirical Fisher).
    Data,
    /// Labels drawn from the model's own predictive distribution (the true Fisher / GGN).
    /// The draw for sequence `stable_index` and position t depends only on (seed, pass,
    /// stable_index, t), never on batching.
    Sampled { seed: u64, pass: u64 },
}

/// The taps of one tracked layer for a batch: rows are the real tokens of the batch's
/// sequences, concatenated in batch order (row-major, `n_tokens × d`).
#[derive(Debug, Clone)]
pub struct LayerTap {
    pub a: Vec<f32>,
    pub g: Vec<f32>,
}

/// Everything the curvature and influence stages need from one batch.
#[derive(Debug, Clone)]
pub struct TapBatch {
    pub seq_lens: Vec<usize>,
    /// The (summed) loss of each sequence under the labels used.
    pub losses: Vec<f64>,
    /// One entry per tracked layer, in [`TapModel::tracked`] order.
    pub layers: Vec<LayerTap>,
}

impl TapBatch {
    /// Row offsets of each sequence in the layers' `a`/`g` matrices.
    pub fn offsets(&self) -> Vec<usize> {
        let mut o = Vec::with_capacity(self.seq_lens.len() + 1);
        o.push(0);
        for l in &self.seq_lens {
            o.push(o.last().copied().unwrap_or(0) + l);
        }
        o
    }
}

/// Sizes of a transformer's blocks (all zero when unknown).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockShape {
    pub layers: usize,
    pub heads: usize,
    pub hidden: usize,
    pub intermediate: usize,
}

/// A causal LM that exposes (a, g) for its tracked linear layers.
pub trait TapModel: Send + Sync {
    /// Architecture name as in config.json (`gpt2`).
    fn architecture(&self) -> &str;
    fn tracked(&self) -> &[TrackedLayer];
    fn vocab_size(&self) -> usize;
    fn max_positions(&self) -> usize;
    fn n_parameters(&self) -> usize;
    /// Forward and backward on one batch: per tracked layer, a and g of every real token.
    fn taps(&self, batch: &TokenBatch, labels: Labels) -> Result<TapBatch>;
    /// Logits of one sequence, `[len, vocab]` row-major (for parity checks and greedy decoding).
    fn logits(&self, ids: &[u32]) -> Result<Vec<f32>>;
    /// The transformer's shape, for memory estimates of the autograd graph.
    fn block_shape(&self) -> BlockShape {
        BlockShape::default()
    }
    /// Do the engine's kernels split over the rayon pool they run in? Then the passes give each
    /// of the batches they compute at once a pool of its own share of the threads, instead of
    /// one thread each ([`crate::pass::batches_at_once`]).
    fn is_threaded(&self) -> bool {
        false
    }
    /// The engine that computes the taps (recorded in the outputs' metadata).
    fn engine(&self) -> Engine {
        Engine::Autograd
    }
    /// The device the taps are computed on (recorded in the outputs' metadata).
    fn device(&self) -> ComputeDevice {
        ComputeDevice::Cpu
    }
    /// FLOPs of the products of one [`TapModel::taps`] call on `batch`, counted from the
    /// shapes (for `infl bench`'s floors); `None` where the engine does not count them.
    fn tap_flops(&self, _batch: &TokenBatch) -> Option<f64> {
        None
    }
    /// Bytes one [`TapModel::taps`] call on `batch_size` sequences of `max_len` tokens holds
    /// at its peak, counted from what the engine keeps (the forward's saved tensors, the taps
    /// the backward makes, a chunk of logits); `None` where the engine does not count them
    /// (autograd: [`crate::inspect::estimate`] models its graph instead).
    fn taps_peak_bytes(&self, _batch_size: usize, _max_len: usize) -> Option<u64> {
        None
    }
}

/// A model restricted to some of its tracked layers, chosen by checkpoint name.
struct SelectedLayers {
    inner: Box<dyn TapModel>,
    keep: Vec<usize>,
    tracked: Vec<TrackedLayer>,
}

impl TapModel for SelectedLayers {
    fn architecture(&self) -> &str {
        self.inner.architecture()
    }
    fn tracked(&self) -> &[TrackedLayer] {
        &self.tracked
    }
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }
    fn max_positions(&self) -> usize {
        self.inner.max_positions()
    }
    fn n_parameters(&self) -> usize {
        self.inner.n_parameters()
    }
    fn taps(&self, batch: &TokenBatch, labels: Labels) -> Result<TapBatch> {
        let mut all = self.inner.taps(batch, labels)?;
        let mut layers: Vec<Option<LayerTap>> = all.layers.drain(..).map(Some).collect();
        all.layers = self
            .keep
            .iter()
            .map(|&i| layers[i].take().expect("kept indices are distinct"))
            .collect();
        Ok(all)
    }
    fn logits(&self, ids: &[u32]) -> Result<Vec<f32>> {
        self.inner.logits(ids)
    }
    fn block_shape(&self) -> BlockShape {
        self.inner.block_shape()
    }
    fn is_threaded(&self) -> bool {
        self.inner.is_threaded()
    }
    fn engine(&self) -> Engine {
        self.inner.engine()
    }
    fn device(&self) -> ComputeDevice {
        self.inner.device()
    }
    fn tap_flops(&self, batch: &TokenBatch) -> Option<f64> {
        self.inner.tap_flops(batch)
    }
    fn taps_peak_bytes(&self, batch_size: usize, max_len: usize) -> Option<u64> {
        self.inner.taps_peak_bytes(batch_size, max_len)
    }
}

/// Keeps only the tracked layers named in `names` (checkpoint names, in the model's order);
/// an unknown name is an error listing the available ones. The inner model still runs every
/// tap; only the chosen layers reach curvature and influence.
pub fn select_layers(model: Box<dyn TapModel>, names: &[String]) -> Result<Box<dyn TapModel>> {
    for n in names {
        if !model.tracked().iter().any(|l| &l.name == n) {
            let available: Vec<&str> = model.tracked().iter().map(|l| l.name.as_str()).collect();
            return Err(Error::input(format!(
                "--layers: `{n}` is not a tracked layer of this model (with the chosen --modules); available: {}",
                available.join(", ")
            )));
        }
    }
    let keep: Vec<usize> = (0..model.tracked().len())
        .filter(|&i| names.contains(&model.tracked()[i].name))
        .collect();
    let tracked = keep.iter().map(|&i| model.tracked()[i].clone()).collect();
    Ok(Box::new(SelectedLayers {
        inner: model,
        keep,
        tracked,
    }))
}

/// Which implementation computes the taps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// Explicit forward and activation-only backward with fused, threaded kernels (CPU).
    #[default]
    Fast,
    /// candle autograd: the reference the fast engine is tested against.
    Autograd,
}

/// The engine [`load`] uses: [`Engine::Fast`] unless [`set_default_engine`] chose another.
static DEFAULT_ENGINE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Chooses the engine of every later [`load`] in this process (the command line's `--engine`;
/// a process-wide choice so that the workflow's jobs need no new field).
pub fn set_default_engine(engine: Engine) {
    DEFAULT_ENGINE.store(
        engine == Engine::Autograd,
        std::sync::atomic::Ordering::Relaxed,
    );
}

/// The engine [`load`] uses now.
pub fn default_engine() -> Engine {
    if DEFAULT_ENGINE.load(std::sync::atomic::Ordering::Relaxed) {
        Engine::Autograd
    } else {
        Engine::Fast
    }
}

/// Where the autograd engine runs: the CPU, or a CUDA GPU (builds with the `cuda` feature).
/// The fast engine is CPU code. On a GPU the fit's statistics, the scoring pass's scores and
/// self-influence run there too ([`crate::curvature::device`], [`crate::influence::device`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ComputeDevice {
    #[default]
    Cpu,
    /// The GPU of this ordinal.
    Cuda(usize),
}

impl std::str::FromStr for ComputeDevice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(ComputeDevice::Cpu),
            "cuda" => Ok(ComputeDevice::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(ComputeDevice::Cuda)
                .ok_or_else(|| format!("`{s}` is not a device: use cpu, cuda or cuda:N")),
        }
    }
}

impl std::fmt::Display for ComputeDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ComputeDevice::Cpu => write!(f, "cpu"),
            ComputeDevice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl ComputeDevice {
    /// Where a candle device is.
    pub fn of(device: &candle_core::Device) -> Self {
        match device.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => ComputeDevice::Cuda(gpu_id),
            _ => ComputeDevice::Cpu,
        }
    }

    /// The candle device; a CUDA device in a build without the `cuda` feature, or one the
    /// driver cannot open, is an input error that says so.
    pub fn candle(self) -> Result<candle_core::Device> {
        match self {
            ComputeDevice::Cpu => Ok(candle_core::Device::Cpu),
            ComputeDevice::Cuda(n) => cuda_device(n),
        }
    }

    /// The engine a command uses when `--engine` is not given: fast on the CPU, autograd on a
    /// GPU (the only engine that runs there).
    pub fn default_engine(self) -> Engine {
        match self {
            ComputeDevice::Cpu => Engine::Fast,
            ComputeDevice::Cuda(_) => Engine::Autograd,
        }
    }
}

/// Where the statistics and scores of the passes over `model`'s taps are formed as candle
/// products: the model's GPU, or `None` for the CPU path. `INFL_DEVICE_PATH_ON_CPU=1` takes the
/// device path on candle's CPU device instead, so that tests on machines without a GPU run the
/// same code as a GPU run (statistics, scores, their wiring into the passes).
pub fn statistics_device(model: &dyn TapModel) -> Result<Option<candle_core::Device>> {
    match model.device() {
        ComputeDevice::Cuda(n) => Ok(Some(cuda_device(n)?)),
        ComputeDevice::Cpu
            if std::env::var_os("INFL_DEVICE_PATH_ON_CPU").is_some_and(|v| v == "1") =>
        {
            Ok(Some(candle_core::Device::Cpu))
        }
        ComputeDevice::Cpu => Ok(None),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(n: usize) -> Result<candle_core::Device> {
    candle_core::Device::new_cuda(n).map_err(|e| {
        // candle's errors carry a backtrace after their first line: not for a user.
        let e = e.to_string();
        let first = e.lines().next().unwrap_or_default();
        Error::input(format!("--device cuda:{n}: cannot open the GPU: {first}"))
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(n: usize) -> Result<candle_core::Device> {
    Err(Error::input(format!(
        "--device cuda:{n}: this infl was built without GPU support; rebuild it with \
         `cargo build --release --features cuda` (needs CUDA's nvcc on the PATH)"
    )))
}

/// The device [`load`] uses: 0 for the CPU, n + 1 for GPU n.
static DEFAULT_DEVICE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Chooses the device of every later [`load`] in this process (the command line's `--device`).
pub fn set_default_device(device: ComputeDevice) {
    let code = match device {
        ComputeDevice::Cpu => 0,
        ComputeDevice::Cuda(n) => n + 1,
    };
    DEFAULT_DEVICE.store(code, std::sync::atomic::Ordering::Relaxed);
}

/// The device [`load`] uses now.
pub fn default_device() -> ComputeDevice {
    match DEFAULT_DEVICE.load(std::sync::atomic::Ordering::Relaxed) {
        0 => ComputeDevice::Cpu,
        n => ComputeDevice::Cuda(n - 1),
    }
}

/// Loads the model at `dir` (a Hugging Face checkpoint directory, or a llama.cpp `.gguf` file),
/// keeping `modules`, on the default engine and device (fast on the CPU unless
/// [`set_default_engine`] and [`set_default_device`] say otherwise).
pub fn load(dir: &Path, modules: ModuleSelection) -> Result<Box<dyn TapModel>> {
    load_on(dir, modules, default_engine(), default_device())
}

/// [`load`] with a chosen engine, on the CPU. The fast models are built from the autograd
/// models' loaded weights, so every loader (safetensors, GGUF) serves both.
pub fn load_with(
    dir: &Path,
    modules: ModuleSelection,
    engine: Engine,
) -> Result<Box<dyn TapModel>> {
    load_on(dir, modules, engine, ComputeDevice::Cpu)
}

/// [`load_with`] on a chosen device (the fast engine runs on the CPU only).
pub fn load_on(
    dir: &Path,
    modules: ModuleSelection,
    engine: Engine,
    device: ComputeDevice,
) -> Result<Box<dyn TapModel>> {
    if engine == Engine::Fast && device != ComputeDevice::Cpu {
        return Err(Error::input(format!(
            "--engine fast runs on the CPU only; on --device {device} use --engine autograd \
             (the default there)"
        )));
    }
    let model = load_autograd(dir, modules, &device.candle()?)?;
    match engine {
        Engine::Autograd => Ok(model.into_dyn()),
        Engine::Fast => fast::from_autograd(model),
    }
}

/// A model of one of the autograd implementations.
pub enum AnyModel {
    Gpt2(gpt2::Gpt2),
    GptNeoX(gpt_neox::GptNeoX),
    Llama(llama::Llama),
}

impl AnyModel {
    pub fn into_dyn(self) -> Box<dyn TapModel> {
        match self {
            AnyModel::Gpt2(m) => Box::new(m),
            AnyModel::GptNeoX(m) => Box::new(m),
            AnyModel::Llama(m) => Box::new(m),
        }
    }
}

fn load_autograd(
    dir: &Path,
    modules: ModuleSelection,
    device: &candle_core::Device,
) -> Result<AnyModel> {
    if gguf::is_gguf(dir) {
        if !dir.is_file() {
            return Err(Error::input(format!(
                "{}: no such GGUF file",
                dir.display()
            )));
        }
        return Ok(AnyModel::Llama(gguf::load_on(dir, modules, device)?));
    }
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|e| {
        Error::input(format!(
            "{}: cannot read the model's config.json ({e}); --model must be a Hugging Face checkpoint directory",
            config_path.display()
        ))
    })?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::input(format!("{}: invalid JSON: {e}", config_path.display())))?;
    let model_type = value
        .get("model_type")
        .and_then(|v| v.as_str())
        .ok_or_else(|| {
            Error::input(format!(
                "{}: field `model_type` is missing or not a string",
                config_path.display()
            ))
        })?;
    match model_type {
        "gpt2" => Ok(AnyModel::Gpt2(gpt2::Gpt2::load_on(dir, modules, device)?)),
        "gpt_neox" => Ok(AnyModel::GptNeoX(gpt_neox::GptNeoX::load_on(
            dir, modules, device,
        )?)),
        "llama" | "mistral" | "qwen2" => Ok(AnyModel::Llama(llama::Llama::load_on(
            dir, modules, device,
        )?)),
        other => Err(Error::input(format!(
            "{}: model_type `{other}` is not supported (supported: gpt2, gpt_neox, llama, mistral, qwen2, and llama GGUF files)",
            config_path.display()
        ))),
    }
}

/// The safetensors files holding a checkpoint's weights (one file, or the shards of
/// `model.safetensors.index.json`), and a description of where they came from for messages.
pub fn weight_files(dir: &Path) -> Result<(Vec<std::path::PathBuf>, String)> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if single.exists() {
        return Ok((vec![single.clone()], single.display().to_string()));
    }
    if !index.exists() {
        return Err(Error::input(format!(
            "{}: no model.safetensors or model.safetensors.index.json (PyTorch .bin checkpoints are not read; convert with `save_pretrained(safe_serialization=True)`)",
            dir.display()
        )));
    }
    let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::input(format!("{}: invalid JSON: {e}", index.display())))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::input(format!("{}: field `weight_map` missing", index.display())))?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|f| f.as_str().map(String::from))
        .collect();
    files.sort();
    files.dedup();
    Ok((
        files.iter().map(|f| dir.join(f)).collect(),
        index.display().to_string(),
    ))
}

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
    fn query_loss_positions_cover_exactly_the_completion() {
        let b = TokenBatch::queries(&[(0, &[1, 2, 3], &[4, 5])]);
        // positions 2 (predicts 4) and 3 (predicts 5)
        assert_eq!(b.loss_positions[0], vec![false, false, true, true, false]);
    }

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
