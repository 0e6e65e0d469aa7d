//! Model stage: loads a checkpoint and, for a batch of token sequences, yields per tracked linear
//! layer the pair (a, g): the layer's inputs and the gradients of the loss with respect to its
//! outputs, for every real (non-padding) token. Nothing downstream ever sees an architecture.

pub(crate) mod autograd;
pub mod fast;
pub mod gguf;
pub mod gpt2;
pub mod gpt_neox;
pub mod llama;
pub mod lora;
pub(crate) mod loss;
pub mod moe;
pub(crate) mod rope;
pub mod weights;

pub use weights::weight_files;

use crate::error::{Error, Result};
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
    /// Every linear layer of the blocks (with --adapter: the adapter's lora_A/lora_B too).
    All,
    /// The MLP's linear layers (and the adapters on them).
    Mlp,
    /// The attention's linear layers (and the adapters on them).
    Attn,
    /// Only the --adapter's lora_A and lora_B layers: what a LoRA fine-tune learned.
    Adapter,
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

/// Where and how the forward and backward passes run (fit, score, self-influence, inspect),
/// and the LoRA adapter applied to the model: passed to [`load`] explicitly by every caller,
/// recorded in every output's model info.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct Compute {
    /// Engine of the forward/backward passes: fast (explicit forward, activation-only
    /// backward, fused threaded kernels; CPU only) or autograd (candle autograd, the reference:
    /// slower on the CPU, and the engine that runs on a GPU; the one that applies --adapter
    /// and runs mixtures of experts) [default: fast on the CPU, autograd on a GPU, with
    /// --adapter or for a mixture of experts].
    #[cfg_attr(feature = "clap", arg(long, value_enum))]
    pub engine: Option<Engine>,
    /// Device of the forward/backward passes: cpu, cuda (GPU 0) or cuda:N. A GPU needs a build
    /// with `--features cuda`; there the fit's statistics (covariances, Λ), the training
    /// sequences' scores and their self-influence are formed on the GPU too;
    /// eigendecompositions, query preconditioning, `--normalize cosine` and a gradient store
    /// run on the CPU.
    #[cfg_attr(
        feature = "clap",
        arg(long, default_value_t = ComputeDevice::Cpu, value_name = "DEVICE")
    )]
    pub device: ComputeDevice,
    /// A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) applied
    /// on top of --model: the forward is the adapted model's, and the adapter's lora_A/lora_B
    /// become tracked layers (`--modules adapter` tracks only them). Its hash is recorded,
    /// and factors fitted with one adapter refuse another. Needs --engine autograd.
    #[cfg_attr(feature = "clap", arg(long, value_name = "DIR"))]
    pub adapter: Option<std::path::PathBuf>,
}

impl Compute {
    /// The fast engine on the CPU.
    pub const CPU: Compute = Compute {
        engine: None,
        device: ComputeDevice::Cpu,
        adapter: None,
    };

    /// `engine` on the CPU.
    pub fn cpu(engine: Engine) -> Self {
        Compute {
            engine: Some(engine),
            ..Compute::CPU
        }
    }

    /// The engine that runs: the one asked for, or the default: autograd with an adapter (the
    /// engine that applies one), else the device's.
    pub fn engine(&self) -> Engine {
        match (self.engine, &self.adapter) {
            (Some(engine), _) => engine,
            (None, Some(_)) => Engine::Autograd,
            (None, None) => self.device.default_engine(),
        }
    }
}

/// Loads the model at `dir` (a Hugging Face checkpoint directory, or a llama.cpp `.gguf` file)
/// with `compute`'s adapter attached, keeping `modules`, on `compute`'s engine and device (the
/// fast engine runs on the CPU only and applies no adapter). The fast models are built from
/// the autograd models' loaded weights, so every loader (safetensors, GGUF) serves both.
pub fn load(dir: &Path, modules: ModuleSelection, compute: Compute) -> Result<Box<dyn TapModel>> {
    let (engine, device) = (compute.engine(), compute.device);
    if engine == Engine::Fast && device != ComputeDevice::Cpu {
        return Err(Error::input(format!(
            "--engine fast runs on the CPU only; on --device {device} use --engine autograd \
             (the default there)"
        )));
    }
    if engine == Engine::Fast && compute.adapter.is_some() {
        return Err(Error::usage(
            "--engine fast does not apply LoRA adapters; use --engine autograd (the default \
             with --adapter)",
        ));
    }
    if modules == ModuleSelection::Adapter && compute.adapter.is_none() {
        return Err(Error::usage(
            "--modules adapter tracks a LoRA adapter's layers: give the adapter with \
             --adapter DIR",
        ));
    }
    let adapter = compute
        .adapter
        .as_deref()
        .map(lora::Adapter::open)
        .transpose()?;
    let mut model = load_autograd(dir, modules, &device.candle()?)?;
    if let Some(adapter) = &adapter {
        model.attach(adapter, modules)?;
    }
    // The fast engine has no expert blocks: without --engine such a model runs on autograd.
    let engine = match (&model, compute.engine) {
        (AnyModel::Llama(m), None) if m.config().moe.is_some() || m.config().qk_norm => {
            Engine::Autograd
        }
        _ => engine,
    };
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
    /// Applies `adapter` to the model's linear layers; the tracked layers become those
    /// `modules` selects among the base layers and the adapter's.
    pub fn attach(&mut self, adapter: &lora::Adapter, modules: ModuleSelection) -> Result<()> {
        match self {
            AnyModel::Llama(m) => m.attach(adapter, modules),
            AnyModel::GptNeoX(m) => m.attach(adapter, modules),
            AnyModel::Gpt2(m) => m.attach(adapter, modules),
        }
    }

    pub fn into_dyn(self) -> Box<dyn TapModel> {
        match self {
            AnyModel::Gpt2(m) => Box::new(m),
            AnyModel::GptNeoX(m) => Box::new(m),
            AnyModel::Llama(m) => Box::new(m),
        }
    }
}

pub(crate) fn load_autograd(
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
    match model_type(&config_path)?.as_str() {
        "gpt2" => Ok(AnyModel::Gpt2(gpt2::Gpt2::load_on(dir, modules, device)?)),
        "gpt_neox" => Ok(AnyModel::GptNeoX(gpt_neox::GptNeoX::load_on(
            dir, modules, device,
        )?)),
        "llama" | "mistral" | "qwen2" | "mixtral" | "qwen2_moe" | "qwen3_moe" => Ok(AnyModel::Llama(llama::Llama::load_on(
            dir, modules, device,
        )?)),
        other => Err(Error::input(format!(
            "{}: model_type `{other}` is not supported (supported: gpt2, gpt_neox, llama, mistral, qwen2, mixtral, qwen2_moe, qwen3_moe, and llama GGUF files)",
            config_path.display()
        ))),
    }
}

/// The `model_type` of a checkpoint's config.json, which picks the architecture.
fn model_type(config_path: &Path) -> Result<String> {
    #[derive(serde::Deserialize)]
    struct Header {
        model_type: Option<serde_json::Value>,
    }
    let text = std::fs::read_to_string(config_path).map_err(|e| {
        Error::input(format!(
            "{}: cannot read the model's config.json ({e}); --model must be a Hugging Face checkpoint directory",
            config_path.display()
        ))
    })?;
    let header: Header = serde_json::from_str(&text)
        .map_err(|e| Error::input(format!("{}: invalid JSON: {e}", config_path.display())))?;
    match header.model_type {
        Some(serde_json::Value::String(t)) => Ok(t),
        _ => Err(Error::input(format!(
            "{}: field `model_type` is missing or not a string",
            config_path.display()
        ))),
    }
}

/// Reads `dir/config.json` into an architecture's serde config (`what` names the architecture
/// in errors); returns it with the file's path, for the checks that follow.
pub(crate) fn read_config<T: serde::de::DeserializeOwned>(
    dir: &Path,
    what: &str,
) -> Result<(T, std::path::PathBuf)> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::input(format!("{}: invalid JSON: {e}", path.display())))?;
    let config = parse_config(value, &path, what)?;
    Ok((config, path))
}

/// An architecture's serde config from parsed JSON; a mismatch names the file and the field.
pub(crate) fn parse_config<T: serde::de::DeserializeOwned>(
    value: serde_json::Value,
    path: &Path,
    what: &str,
) -> Result<T> {
    serde_json::from_value(value).map_err(|e| {
        Error::input(format!(
            "{}: not a valid {what} config: {e}",
            path.display()
        ))
    })
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
}
