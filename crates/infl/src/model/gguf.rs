//! llama.cpp GGUF files (`--model file.gguf`) of the Llama architecture: config and tokenizer
//! from the file's metadata, weights memory-mapped and dequantised to f32 once at load, then the
//! model runs as [`super::llama::Llama`] (see notes/gguf-llama.md for the rules followed).
//!
//! * Dequantisation: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K (checked against gguf-py in
//!   the tests), and the other types candle's ggml kernels read (Q5_0, Q5_1, Q2_K, Q3_K, Q5_K).
//!   Any other type is an error naming the tensor and its type.
//! * llama.cpp's converter permutes the rows of `attn_q` / `attn_k` inside each head so that its
//!   RoPE can rotate adjacent pairs; [`unpermute_rows`] undoes it so that the HF `rotate_half`
//!   RoPE of the Llama model applies unchanged.
//! * No `output.weight` → tied embeddings.

use super::llama::{Llama, LlamaConfig, RopeScaling};
use super::weights::Weights;
use super::ModuleSelection;
use crate::error::{Error, Result};
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i128),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    fn as_usize(&self) -> Option<usize> {
        match self {
            Value::Int(i) => usize::try_from(*i).ok(),
            _ => None,
        }
    }

    fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(f) => Some(*f),
            Value::Int(i) => Some(*i as f64),
            _ => None,
        }
    }

    fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// One tensor's header entry.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Row-major shape (GGUF lists dimensions fastest-first; this is reversed).
    pub shape: Vec<usize>,
    pub ggml_type: u32,
    /// Byte offset from the start of the tensor data section.
    pub offset: u64,
}

/// A parsed, memory-mapped GGUF file.
pub struct GgufFile {
    path: String,
    map: memmap2::Mmap,
    pub metadata: HashMap<String, Value>,
    pub tensors: HashMap<String, TensorInfo>,
    /// Tensor names in file order.
    pub order: Vec<String>,
    data_offset: usize,
}

/// ggml type ids → (name, elements per block, bytes per block).
pub fn ggml_type_info(t: u32) -> Option<(&'static str, usize, usize)> {
    Some(match t {
        0 => ("F32", 1, 4),
        1 => ("F16", 1, 2),
        2 => ("Q4_0", 32, 18),
        3 => ("Q4_1", 32, 20),
        6 => ("Q5_0", 32, 22),
        7 => ("Q5_1", 32, 24),
        8 => ("Q8_0", 32, 34),
        9 => ("Q8_1", 32, 36),
        10 => ("Q2_K", 256, 84),
        11 => ("Q3_K", 256, 110),
        12 => ("Q4_K", 256, 144),
        13 => ("Q5_K", 256, 176),
        14 => ("Q6_K", 256, 210),
        15 => ("Q8_K", 256, 292),
        16 => ("IQ2_XXS", 256, 66),
        17 => ("IQ2_XS", 256, 74),
        18 => ("IQ3_XXS", 256, 98),
        19 => ("IQ1_S", 256, 50),
        20 => ("IQ4_NL", 32, 18),
        21 => ("IQ3_S", 256, 110),
        22 => ("IQ2_S", 256, 82),
        23 => ("IQ4_XS", 256, 136),
        24 => ("I8", 1, 1),
        25 => ("I16", 1, 2),
        26 => ("I32", 1, 4),
        27 => ("I64", 1, 8),
        28 => ("F64", 1, 8),
        29 => ("IQ1_M", 256, 56),
        30 => ("BF16", 1, 2),
        34 => ("TQ1_0", 256, 54),
        35 => ("TQ2_0", 256, 66),
        _ => return None,
    })
}

/// The types this reader dequantises.
fn candle_dtype(t: u32) -> Option<GgmlDType> {
    Some(match t {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// A little-endian cursor over the header bytes with bounds checks.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a str,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.bytes.len());
        match end {
            Some(end) => {
                let s = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(Error::input(format!(
                "{}: truncated GGUF header (needs {n} bytes at offset {})",
                self.path, self.pos
            ))),
        }
    }

    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn len(&mut self) -> Result<usize> {
        let n = self.u64()?;
        usize::try_from(n)
            .ok()
            .filter(|n| *n <= self.bytes.len())
            .ok_or_else(|| Error::input(format!("{}: corrupt GGUF header (length {n})", self.path)))
    }

    fn string(&mut self) -> Result<String> {
        let n = self.len()?;
        let b = self.take(n)?;
        Ok(String::from_utf8_lossy(b).into_owned())
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::Int(self.take(1)?[0] as i128),
            1 => Value::Int(self.take(1)?[0] as i8 as i128),
            2 => {
                let b = self.take(2)?;
                Value::Int(u16::from_le_bytes([b[0], b[1]]) as i128)
            }
            3 => {
                let b = self.take(2)?;
                Value::Int(i16::from_le_bytes([b[0], b[1]]) as i128)
            }
            4 => Value::Int(self.u32()? as i128),
            5 => Value::Int(self.u32()? as i32 as i128),
            6 => Value::Float(f32::from_bits(self.u32()?) as f64),
            7 => Value::Bool(self.take(1)?[0] != 0),
            8 => Value::Str(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(Error::input(format!(
                        "{}: GGUF metadata arrays nested too deeply",
                        self.path
                    )));
                }
                let elem = self.u32()?;
                let n = self.len()?;
                let mut v = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    v.push(self.value(elem, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::Int(self.u64()? as i128),
            11 => Value::Int(self.u64()? as i64 as i128),
            12 => Value::Float(f64::from_bits(self.u64()?)),
            other => {
                return Err(Error::input(format!(
                    "{}: unknown GGUF metadata value type {other}",
                    self.path
                )))
            }
        })
    }
}

impl GgufFile {
    /// Memory-maps `path` and parses its header.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: mapped read-only; like every mmap user we rely on nobody truncating the file
        // while it is read.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let name = path.display().to_string();
        let mut r = Reader {
            bytes: &map,
            pos: 0,
            path: &name,
        };
        if r.take(4)? != b"GGUF" {
            return Err(Error::input(format!("{name}: not a GGUF file (bad magic)")));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(Error::input(format!(
                "{name}: GGUF version {version} is not supported (2 and 3 are)"
            )));
        }
        let n_tensors = r.len()?;
        let n_kv = r.len()?;
        let mut metadata = HashMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let v = r.value(ty, 0)?;
            metadata.insert(key, v);
        }
        let mut tensors = HashMap::new();
        let mut order = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let tname = r.string()?;
            let n_dims = r.u32()?;
            if n_dims > 4 {
                return Err(Error::input(format!(
                    "{name}: tensor `{tname}` has {n_dims} dimensions"
                )));
            }
            let mut shape = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                shape.push(r.len()?);
            }
            shape.reverse();
            let ggml_type = r.u32()?;
            let offset = r.u64()?;
            order.push(tname.clone());
            tensors.insert(
                tname,
                TensorInfo {
                    shape,
                    ggml_type,
                    offset,
                },
            );
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(Value::as_usize)
            .filter(|a| *a > 0)
            .unwrap_or(32);
        let data_offset = r.pos.div_ceil(alignment) * alignment;
        Ok(GgufFile {
            path: name,
            map,
            metadata,
            tensors,
            order,
            data_offset,
        })
    }

    fn meta(&self, key: &str) -> Result<&Value> {
        self.metadata
            .get(key)
            .ok_or_else(|| Error::input(format!("{}: metadata key `{key}` is missing", self.path)))
    }

    fn meta_usize(&self, key: &str) -> Result<usize> {
        self.meta(key)?.as_usize().ok_or_else(|| {
            Error::input(format!(
                "{}: metadata `{key}` must be an integer",
                self.path
            ))
        })
    }

    fn meta_f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.metadata.get(key) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| {
                Error::input(format!("{}: metadata `{key}` must be a number", self.path))
            }),
        }
    }

    fn meta_str(&self, key: &str) -> Result<&str> {
        self.meta(key)?.as_str().ok_or_else(|| {
            Error::input(format!("{}: metadata `{key}` must be a string", self.path))
        })
    }

    /// Tensor `name` dequantised to f32, row-major shape.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::input(format!("{}: tensor `{name}` is missing", self.path)))?;
        let (tname, block, bytes) = ggml_type_info(info.ggml_type).unwrap_or(("unknown", 1, 0));
        let dtype = candle_dtype(info.ggml_type).ok_or_else(|| {
            Error::input(format!(
                "{}: tensor `{name}` has GGML type {tname} (id {}), which is not supported (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)",
                self.path, info.ggml_type
            ))
        })?;
        let n: usize = info.shape.iter().product();
        let row = info.shape.last().copied().unwrap_or(1);
        if row % block != 0 {
            return Err(Error::input(format!(
                "{}: tensor `{name}` rows of {row} are not a multiple of the {tname} block size {block}",
                self.path
            )));
        }
        let size = n / block * bytes;
        let start = usize::try_from(info.offset)
            .ok()
            .and_then(|o| o.checked_add(self.data_offset));
        let range = start
            .and_then(|s| Some(s..s.checked_add(size)?))
            .filter(|r| r.end <= self.map.len())
            .ok_or_else(|| {
                Error::input(format!(
                    "{}: tensor `{name}` extends past the end of the file (truncated download?)",
                    self.path
                ))
            })?;
        let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
            dtype,
            &self.map[range],
            info.shape.clone(),
            &Device::Cpu,
        )?;
        Ok(q.dequantize(&Device::Cpu)?)
    }
}

/// Undoes llama.cpp's q/k row permutation (`LlamaModel.permute` in convert_hf_to_gguf.py):
/// within each of the `n_heads` heads, GGUF row `2i + j` is HF row `j·hd/2 + i`.
pub fn unpermute_rows(w: &Tensor, n_heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let hd = rows / n_heads;
    w.reshape((n_heads, hd / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

/// What the llama.cpp converter does: the inverse of [`unpermute_rows`].
pub fn permute_rows(w: &Tensor, n_heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let hd = rows / n_heads;
    w.reshape((n_heads, 2, hd / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

/// The Llama config a GGUF file's metadata describes.
pub fn llama_config(f: &GgufFile) -> Result<LlamaConfig> {
    let arch = f.meta_str("general.architecture")?;
    if arch != "llama" {
        return Err(Error::input(format!(
            "{}: GGUF architecture `{arch}` is not supported (supported: llama)",
            f.path
        )));
    }
    let k = |s: &str| format!("llama.{s}");
    let hidden = f.meta_usize(&k("embedding_length"))?;
    let heads = f.meta_usize(&k("attention.head_count"))?;
    let kv = match f.metadata.get(&k("attention.head_count_kv")) {
        Some(v) => v
            .as_usize()
            .ok_or_else(|| Error::input(format!("{}: head_count_kv must be an integer", f.path)))?,
        None => heads,
    };
    if heads == 0 || kv == 0 || hidden % heads != 0 || heads % kv != 0 {
        return Err(Error::input(format!(
            "{}: inconsistent attention shape: embedding_length {hidden}, head_count {heads}, head_count_kv {kv}",
            f.path
        )));
    }
    let head_dim = hidden / heads;
    if let Some(rd) = f.metadata.get(&k("rope.dimension_count")) {
        if rd.as_usize() != Some(head_dim) {
            return Err(Error::input(format!(
                "{}: rope.dimension_count {rd:?} differs from the head size {head_dim} (partial rotary is not supported for GGUF llama)",
                f.path
            )));
        }
    }
    let rope_scaling = match f
        .metadata
        .get(&k("rope.scaling.type"))
        .and_then(Value::as_str)
    {
        None | Some("none") => RopeScaling::None,
        Some("linear") => RopeScaling::Linear {
            factor: f.meta_f64_or(&k("rope.scaling.factor"), 1.0)?,
        },
        Some(other) => {
            return Err(Error::input(format!(
                "{}: rope.scaling.type `{other}` is not supported (none, linear)",
                f.path
            )))
        }
    };
    let n_tokens = match f.metadata.get("tokenizer.ggml.tokens") {
        Some(Value::Array(v)) => Some(v.len()),
        _ => None,
    };
    let vocab_size = match f.metadata.get(&k("vocab_size")).and_then(Value::as_usize) {
        Some(v) => v,
        None => n_tokens.ok_or_else(|| {
            Error::input(format!(
                "{}: neither llama.vocab_size nor tokenizer.ggml.tokens is present",
                f.path
            ))
        })?,
    };
    if let Some(n) = n_tokens {
        if n != vocab_size {
            return Err(Error::input(format!(
                "{}: the tokenizer has {n} tokens but the model's vocabulary is {vocab_size}",
                f.path
            )));
        }
    }
    Ok(LlamaConfig {
        model_type: "llama".into(),
        vocab_size,
        hidden_size: hidden,
        intermediate_size: f.meta_usize(&k("feed_forward_length"))?,
        num_hidden_layers: f.meta_usize(&k("block_count"))?,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim,
        max_position_embeddings: f.meta_usize(&k("context_length"))?,
        rms_norm_eps: f.meta_f64_or(&k("attention.layer_norm_rms_epsilon"), 1e-5)?,
        rope_theta: f.meta_f64_or(&k("rope.freq_base"), 10000.0)?,
        rope_scaling,
        tie_word_embeddings: !f.tensors.contains_key("output.weight"),
        qkv_bias: f.tensors.contains_key("blk.0.attn_q.bias"),
        o_bias: f.tensors.contains_key("blk.0.attn_output.bias"),
        mlp_bias: f.tensors.contains_key("blk.0.ffn_gate.bias"),
        hidden_act: "silu".into(),
        sliding_window: None,
    })
}

/// GGUF tensor name → transformers name.
fn hf_name(gguf: &str) -> Option<String> {
    let simple = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(s) = simple {
        return Some(s.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, param) = rest.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{param}"))
}

/// Loads a Llama-architecture GGUF file.
pub fn load(path: &Path, modules: ModuleSelection) -> Result<Llama> {
    load_on(path, modules, &Device::Cpu)
}

/// [`load`] with the (dequantised) weights on `device`.
pub fn load_on(path: &Path, modules: ModuleSelection, device: &Device) -> Result<Llama> {
    let f = GgufFile::open(path)?;
    let config = llama_config(&f)?;
    let mut tensors = HashMap::new();
    for name in &f.order {
        let Some(hf) = hf_name(name) else {
            // rope_freqs and similar helper tensors carry nothing the HF model uses.
            continue;
        };
        let mut t = f.tensor(name)?;
        if name.contains(".attn_q.") {
            t = unpermute_gguf(&t, config.num_attention_heads, name, &f.path)?;
        } else if name.contains(".attn_k.") {
            t = unpermute_gguf(&t, config.num_key_value_heads, name, &f.path)?;
        }
        tensors.insert(hf, t);
    }
    let weights = Weights::owned(tensors, f.path.clone()).on(device);
    Llama::from_weights(config, &weights, modules)
}

fn unpermute_gguf(t: &Tensor, heads: usize, name: &str, path: &str) -> Result<Tensor> {
    let ok = match t.dims() {
        [rows, _] => rows % (2 * heads) == 0,
        [rows] => rows % (2 * heads) == 0,
        _ => false,
    };
    if !ok {
        return Err(Error::input(format!(
            "{path}: tensor `{name}` with shape {:?} cannot be split into {heads} heads",
            t.dims()
        )));
    }
    if t.rank() == 1 {
        // A bias is permuted like a weight with one column.
        let n = t.dim(0)?;
        return Ok(unpermute_rows(&t.reshape((n, 1))?, heads)?.reshape(n)?);
    }
    Ok(unpermute_rows(t, heads)?)
}

/// The byte-level BPE tokenizer a `tokenizer.ggml.model = gpt2` GGUF file describes (GPT-2
/// regex pre-tokenizer, no BOS added: `add_bos_token` is honoured only by chat templates).
pub fn tokenizer(path: &Path) -> Result<tokenizers::Tokenizer> {
    let f = GgufFile::open(path)?;
    let model = f.meta_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(Error::input(format!(
            "{}: GGUF tokenizer model `{model}` is not supported (only gpt2-style byte-level BPE); pre-tokenise the corpus and queries (`ids`, `prompt_ids`/`completion_ids`)",
            f.path
        )));
    }
    let strings = |key: &str| -> Result<Vec<String>> {
        match f.meta(key)? {
            Value::Array(v) => v
                .iter()
                .map(|x| {
                    x.as_str().map(String::from).ok_or_else(|| {
                        Error::input(format!("{}: `{key}` must be an array of strings", f.path))
                    })
                })
                .collect(),
            _ => Err(Error::input(format!(
                "{}: `{key}` must be an array",
                f.path
            ))),
        }
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types: Vec<usize> = match f.metadata.get("tokenizer.ggml.token_type") {
        Some(Value::Array(v)) => v.iter().map(|x| x.as_usize().unwrap_or(1)).collect(),
        _ => vec![1; tokens.len()],
    };
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), serde_json::Value::from(i)))
        .collect();
    // Control (3) and user-defined (4) tokens match as whole special tokens, as transformers does.
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
        .map(|(i, t)| {
            serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": types.get(i) == Some(&3)})
        })
        .collect();
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
        "trim_offsets": true, "use_regex": true});
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": byte_level, "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges}
    });
    json.to_string()
        .parse::<tokenizers::Tokenizer>()
        .map_err(|e| Error::input(format!("{}: cannot build the tokenizer: {e}", f.path)))
}

/// Whether `path` names a GGUF file (by extension).
pub fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::testing::{fixture, max_logit_diff};
    use crate::model::TapModel;

    #[test]
    fn dequantisation_matches_gguf_py() {
        let f = GgufFile::open(&fixture("quant.gguf")).unwrap();
        let reference =
            candle_core::safetensors::load(fixture("quant_reference.safetensors"), &Device::Cpu)
                .unwrap();
        let mut seen = Vec::new();
        for name in &f.order {
            let got = f.tensor(name).unwrap();
            let want = &reference[name];
            assert_eq!(got.dims(), want.dims(), "{name}");
            let (g, w) = (
                got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            let worst = g
                .iter()
                .zip(&w)
                .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
                .fold(0f32, f32::max);
            eprintln!("{name}: max rel diff vs gguf-py {worst:e}");
            assert!(worst < 1e-6, "{name}: {worst}");
            assert!(w.iter().any(|x| *x != 0.0));
            seen.push(name.as_str());
        }
        for t in ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k", "q6_k"] {
            assert!(seen.contains(&format!("t_{t}").as_str()), "{t} not tested");
        }
    }

    #[test]
    fn permutation_round_trips() {
        let w = Tensor::arange(0f32, 8.0 * 3.0 * 5.0, &Device::Cpu)
            .unwrap()
            .reshape((24, 5))
            .unwrap();
        let p = permute_rows(&w, 3).unwrap();
        assert_ne!(p.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        // GGUF row h·hd + 2i + j holds HF row h·hd + j·hd/2 + i (hd = 8).
        let pv = p.to_vec2::<f32>().unwrap();
        let wv = w.to_vec2::<f32>().unwrap();
        for h in 0..3 {
            for i in 0..4 {
                for j in 0..2 {
                    assert_eq!(pv[h * 8 + 2 * i + j], wv[h * 8 + j * 4 + i]);
                }
            }
        }
        let back = unpermute_rows(&p, 3).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), wv);
    }

    #[test]
    fn tiny_llama_gguf_matches_transformers() {
        let path = fixture("tiny_llama.gguf");
        let m = load(&path, ModuleSelection::All).unwrap();
        assert!(m.config().tie_word_embeddings);
        let diff = max_logit_diff(&m, &fixture("tiny_llama_gguf_reference.json"));
        eprintln!("tiny_llama.gguf: max |logit diff| = {diff:e}");
        assert!(diff < 1e-4, "{diff}");

        let text = std::fs::read_to_string(fixture("tiny_llama_gguf_reference.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let tok = tokenizer(&path).unwrap();
        for (t, ids) in v["texts"]
            .as_array()
            .unwrap()
            .iter()
            .zip(v["ids"].as_array().unwrap())
        {
            let want: Vec<u32> = serde_json::from_value(ids.clone()).unwrap();
            let got = tok
                .encode(t.as_str().unwrap(), false)
                .unwrap()
                .get_ids()
                .to_vec();
            assert_eq!(got, want, "{t}");
            assert_eq!(tok.decode(&got, false).unwrap(), t.as_str().unwrap());
        }
    }

    #[test]
    fn not_unpermuting_changes_the_logits() {
        // The permutation matters: loading q/k as stored gives different logits.
        let f = GgufFile::open(&fixture("tiny_llama.gguf")).unwrap();
        let config = llama_config(&f).unwrap();
        let mut tensors = HashMap::new();
        for name in &f.order {
            tensors.insert(hf_name(name).unwrap(), f.tensor(name).unwrap());
        }
        let m = Llama::from_weights(
            config,
            &Weights::owned(tensors, "raw"),
            ModuleSelection::All,
        )
        .unwrap();
        let diff = max_logit_diff(&m, &fixture("tiny_llama_gguf_reference.json"));
        assert!(diff > 1e-2, "{diff}");
    }

    #[test]
    fn unsupported_type_and_bad_files_are_clear_errors() {
        let dir = std::env::temp_dir().join(format!("infl-gguf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bytes = std::fs::read(fixture("quant.gguf")).unwrap();
        let f = GgufFile::open(&fixture("quant.gguf")).unwrap();
        // Rewrite the type id of `t_q8_0` to IQ2_XS (17) in a copy of the header.
        let key = b"t_q8_0";
        let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len();
        let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let type_at = at + 4 + 8 * n_dims;
        assert_eq!(
            u32::from_le_bytes(bytes[type_at..type_at + 4].try_into().unwrap()),
            f.tensors["t_q8_0"].ggml_type
        );
        let mut bad = bytes.clone();
        bad[type_at..type_at + 4].copy_from_slice(&17u32.to_le_bytes());
        let p = dir.join("bad.gguf");
        std::fs::write(&p, &bad).unwrap();
        let err = GgufFile::open(&p)
            .unwrap()
            .tensor("t_q8_0")
            .unwrap_err()
            .to_string();
        assert!(err.contains("t_q8_0") && err.contains("IQ2_XS"), "{err}");
        std::fs::write(&p, &bytes[..100]).unwrap();
        assert!(GgufFile::open(&p).is_err());
        std::fs::write(&p, b"not a gguf file at all").unwrap();
        let err = GgufFile::open(&p).err().unwrap().to_string();
        assert!(err.contains("not a GGUF file"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    /// The real SmolLM2-135M-Instruct Q4_1 file (examples/smollm2.sh fetches it):
    /// `INFL_SMOLLM2_GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf cargo test -- --ignored smollm2`.
    #[test]
    #[ignore]
    fn smollm2_says_berlin() {
        let path = std::env::var("INFL_SMOLLM2_GGUF").expect("set INFL_SMOLLM2_GGUF");
        let path = Path::new(&path);
        let m = load(path, ModuleSelection::All).unwrap();
        assert_eq!(m.tracked().len(), 30 * 7);
        let tok = tokenizer(path).unwrap();
        let ids = tok
            .encode("The capital of Germany is", false)
            .unwrap()
            .get_ids()
            .to_vec();
        let out = greedy(&m, &ids, 3);
        let text = tok.decode(&out, false).unwrap();
        eprintln!("greedy continuation: {text:?}");
        assert!(text.starts_with(" Berlin"), "{text:?}");
    }

    /// Tokenizer ids and logits of the real file against transformers' GGUF loader
    /// (tests/fixtures/families/smollm2_reference.json, scripts/make_smollm2_reference.py).
    #[test]
    #[ignore]
    fn smollm2_matches_transformers() {
        let path = std::env::var("INFL_SMOLLM2_GGUF").expect("set INFL_SMOLLM2_GGUF");
        let path = Path::new(&path);
        let m = load(path, ModuleSelection::Mlp).unwrap();
        let tok = tokenizer(path).unwrap();
        let text = std::fs::read_to_string(fixture("smollm2_reference.json")).unwrap();
        let r: serde_json::Value = serde_json::from_str(&text).unwrap();
        let stride = r["stride"].as_u64().unwrap() as usize;
        let v = m.vocab_size();
        let mut worst = 0f32;
        for (k, t) in r["texts"].as_array().unwrap().iter().enumerate() {
            let want_ids: Vec<u32> = serde_json::from_value(r["ids"][k].clone()).unwrap();
            let ids = tok
                .encode(t.as_str().unwrap(), false)
                .unwrap()
                .get_ids()
                .to_vec();
            assert_eq!(ids, want_ids, "{t}");
            let logits = m.logits(&ids).unwrap();
            let want: Vec<Vec<f32>> = serde_json::from_value(r["logits"][k].clone()).unwrap();
            let argmax: Vec<usize> = serde_json::from_value(r["argmax"][k].clone()).unwrap();
            for (p, row) in want.iter().enumerate() {
                for (j, w) in row.iter().enumerate() {
                    worst = worst.max((logits[p * v + j * stride] - w).abs());
                }
                let got = &logits[p * v..(p + 1) * v];
                let best = (0..v).max_by(|&a, &b| got[a].total_cmp(&got[b])).unwrap();
                assert_eq!(best, argmax[p], "{t} position {p}");
            }
        }
        eprintln!("SmolLM2 GGUF: max |logit diff| vs transformers = {worst:e}");
        assert!(worst < 1e-3, "{worst}");
    }

    pub(crate) fn greedy(m: &dyn TapModel, prompt: &[u32], n: usize) -> Vec<u32> {
        let mut ids = prompt.to_vec();
        let v = m.vocab_size();
        for _ in 0..n {
            let logits = m.logits(&ids).unwrap();
            let last = &logits[(ids.len() - 1) * v..];
            let best = (0..v).max_by(|&a, &b| last[a].total_cmp(&last[b])).unwrap() as u32;
            ids.push(best);
        }
        ids[prompt.len()..].to_vec()
    }
}
