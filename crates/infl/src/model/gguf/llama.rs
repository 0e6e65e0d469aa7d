//! A GGUF file of the llama.cpp architectures `llama`, `qwen2moe` and `qwen3moe` mapped onto
//! [`crate::model::llama`]: the config from the file's metadata, tensor names from llama.cpp's
//! onto transformers', and (`llama` only) llama.cpp's q/k row permutation undone
//! ([`unpermute_rows`]) so that the HF `rotate_half` RoPE applies unchanged; the Qwen
//! architectures use NeoX-style RoPE, which is `rotate_half`, and are stored unpermuted.
//!
//! Mixtures of experts have their stacked `ffn_{gate,up,down}_exps` tensors split into the
//! per-expert checkpoint names of the safetensors layout (so the tracked layers are named
//! alike): Mixtral's for `llama` with `llama.expert_count` (as llama.cpp converts Mixtral),
//! Qwen's for `qwen2moe` / `qwen3moe`, with the shared expert (`ffn_*_shexp`) and its gate
//! (`ffn_gate_inp_shexp`) under `mlp.shared_expert*` and Qwen3's `attn_{q,k}_norm` under
//! `self_attn.{q,k}_norm`.

use super::file::{GgufFile, Value};
use crate::error::{Error, Result};
use crate::model::llama::{Llama, LlamaConfig, RopeScaling};
use crate::model::moe::{MoeConfig, MoeLayout};
use crate::model::weights::Weights;
use crate::model::ModuleSelection;
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Loads a Llama-architecture GGUF file.
pub fn load(path: &Path, modules: ModuleSelection) -> Result<Llama> {
    load_on(path, modules, &Device::Cpu)
}

/// [`load`] with the (dequantised) weights on `device`.
pub fn load_on(path: &Path, modules: ModuleSelection, device: &Device) -> Result<Llama> {
    let f = GgufFile::open(path)?;
    let config = llama_config(&f)?;
    // Only llama.cpp's `llama` architecture permutes q/k (its RoPE rotates adjacent pairs).
    let permuted = config
        .moe
        .as_ref()
        .is_none_or(|m| m.layout == MoeLayout::Mixtral);
    let layout = config.moe.as_ref().map(|m| m.layout);
    let mut tensors = HashMap::new();
    for name in &f.order {
        if let Some(experts) = expert_tensors(&f, name, layout)? {
            tensors.extend(experts);
            continue;
        }
        let Some(hf) = hf_name(name) else {
            // rope_freqs and similar helper tensors carry nothing the HF model uses.
            continue;
        };
        let mut t = f.tensor(name)?;
        if permuted && name.contains(".attn_q.") {
            t = unpermute_gguf(&t, config.num_attention_heads, name, &f.path)?;
        } else if permuted && name.contains(".attn_k.") {
            t = unpermute_gguf(&t, config.num_key_value_heads, name, &f.path)?;
        }
        tensors.insert(hf, t);
    }
    let weights = Weights::owned(tensors, f.path.clone()).on(device);
    Llama::from_weights(config, &weights, modules)
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

/// The llama.cpp architectures read, and the transformers `model_type` each becomes.
const ARCHITECTURES: [(&str, &str); 3] = [
    ("llama", "llama"),
    ("qwen2moe", "qwen2_moe"),
    ("qwen3moe", "qwen3_moe"),
];

/// The Llama-family config a GGUF file's metadata describes.
pub fn llama_config(f: &GgufFile) -> Result<LlamaConfig> {
    let arch = f.meta_str("general.architecture")?;
    let Some(&(arch, model_type)) = ARCHITECTURES.iter().find(|(a, _)| *a == arch) else {
        return Err(Error::input(format!(
            "{}: GGUF architecture `{arch}` is not supported (supported: llama, qwen2moe, \
             qwen3moe)",
            f.path
        )));
    };
    let k = |s: &str| format!("{arch}.{s}");
    let hidden = f.meta_usize(&k("embedding_length"))?;
    let heads = f.meta_usize(&k("attention.head_count"))?;
    let kv = optional_usize(f, &k("attention.head_count_kv"))?.unwrap_or(heads);
    // Qwen3 sets head_dim apart from hidden / heads; the converter writes it as key_length.
    let key_length = optional_usize(f, &k("attention.key_length"))?;
    if heads == 0
        || kv == 0
        || heads % kv != 0
        || (key_length.is_none() && hidden % heads != 0)
        || key_length == Some(0)
    {
        return Err(Error::input(format!(
            "{}: inconsistent attention shape: embedding_length {hidden}, head_count {heads}, head_count_kv {kv}",
            f.path
        )));
    }
    let head_dim = key_length.unwrap_or(hidden / heads);
    let value_length = optional_usize(f, &k("attention.value_length"))?;
    if value_length.is_some_and(|v| v != head_dim) {
        return Err(Error::input(format!(
            "{}: {} ({value_length:?}) differs from the key length {head_dim} (not supported)",
            f.path,
            k("attention.value_length")
        )));
    }
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
    let moe = expert_config(f, arch, &k)?;
    let model_type = match (&moe, model_type) {
        (Some(_), "llama") => "mixtral",
        _ => model_type,
    };
    Ok(LlamaConfig {
        model_type: model_type.into(),
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
        qk_norm: arch == "qwen3moe",
        moe,
    })
}

/// An integer metadata value that may be absent.
fn optional_usize(f: &GgufFile, key: &str) -> Result<Option<usize>> {
    match f.metadata.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_usize()
            .map(Some)
            .ok_or_else(|| Error::input(format!("{}: {key} must be an integer", f.path))),
    }
}

/// The expert blocks of a GGUF file with `{arch}.expert_count` > 0, routed as llama.cpp's
/// graph for the architecture routes them: softmax, top `expert_used_count`; the top-k weights
/// renormalised for `llama` (Mixtral) and `qwen3moe`, not for `qwen2moe`, unless the file says
/// otherwise in `{arch}.expert_weights_norm` (transformers' `norm_topk_prob`, which llama.cpp
/// hard-codes per architecture). Experts are `feed_forward_length` wide for `llama`,
/// `expert_feed_forward_length` for the Qwen architectures, whose shared expert (`qwen2moe`)
/// is `expert_shared_feed_forward_length` wide. A Qwen block without a router
/// (`ffn_gate_inp`) is a dense MLP of `feed_forward_length` (transformers' `mlp_only_layers`).
fn expert_config(
    f: &GgufFile,
    arch: &str,
    k: &dyn Fn(&str) -> String,
) -> Result<Option<MoeConfig>> {
    let n = match optional_usize(f, &k("expert_count"))? {
        None | Some(0) => return Ok(None),
        Some(n) => n,
    };
    let used = optional_usize(f, &k("expert_used_count"))?.ok_or_else(|| {
        Error::input(format!(
            "{}: {} is set but {} is missing",
            f.path,
            k("expert_count"),
            k("expert_used_count")
        ))
    })?;
    if used == 0 || used > n {
        return Err(Error::input(format!(
            "{}: expert_used_count {used} must be between 1 and expert_count {n}",
            f.path
        )));
    }
    check_routing(f, k)?;
    let norm_topk_prob = match f.metadata.get(&k("expert_weights_norm")) {
        None => arch != "qwen2moe",
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            return Err(Error::input(format!(
                "{}: {} must be a boolean, not {v:?}",
                f.path,
                k("expert_weights_norm")
            )))
        }
    };
    let ff = f.meta_usize(&k("feed_forward_length"))?;
    if arch == "llama" {
        return Ok(Some(MoeConfig {
            layout: MoeLayout::Mixtral,
            num_experts: n,
            top_k: used,
            norm_topk_prob,
            expert_intermediate: ff,
            shared_intermediate: None,
            sparse_step: 1,
            mlp_only_layers: Vec::new(),
        }));
    }
    let layers = f.meta_usize(&k("block_count"))?;
    let has = |name: String| f.tensors.contains_key(&name);
    Ok(Some(MoeConfig {
        layout: MoeLayout::Qwen,
        num_experts: n,
        top_k: used,
        norm_topk_prob,
        // llama.cpp's fallbacks when the converter wrote no width.
        expert_intermediate: optional_usize(f, &k("expert_feed_forward_length"))?
            .unwrap_or(ff / used),
        shared_intermediate: (arch == "qwen2moe")
            .then_some(optional_usize(f, &k("expert_shared_feed_forward_length"))?.unwrap_or(ff)),
        sparse_step: 1,
        mlp_only_layers: (0..layers)
            .filter(|i| !has(format!("blk.{i}.ffn_gate_inp.weight")))
            .collect(),
    }))
}

/// Refuses routing settings llama.cpp applies that the expert blocks do not compute: a gating
/// function other than softmax, and a scale on the routing weights.
fn check_routing(f: &GgufFile, k: &dyn Fn(&str) -> String) -> Result<()> {
    // llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX.
    const SOFTMAX: usize = 1;
    let gating = k("expert_gating_func");
    if let Some(g) = optional_usize(f, &gating)?.filter(|g| *g != SOFTMAX) {
        return Err(Error::input(format!(
            "{}: {gating} = {g} is not supported (only softmax routing, 1)",
            f.path
        )));
    }
    let scale = k("expert_weights_scale");
    match f.metadata.get(&scale).map(|v| v.as_f64()) {
        None => Ok(()),
        // llama.cpp scales only by a factor other than 0 and 1.
        Some(Some(s)) if s == 0.0 || s == 1.0 => Ok(()),
        Some(s) => Err(Error::input(format!(
            "{}: {scale} = {s:?} is not supported (routing weights are not scaled)",
            f.path
        ))),
    }
}

/// llama.cpp's router, stacked experts and shared expert of one block (`blk.N.ffn_gate_inp`,
/// `blk.N.ffn_{gate,up,down}_exps` `[n_expert, …]`, `blk.N.ffn_{gate,up,down}_shexp`,
/// `blk.N.ffn_gate_inp_shexp`) under `layout`'s checkpoint names, one tensor per expert;
/// `None` for every other tensor, and for every tensor of a model without experts.
fn expert_tensors(
    f: &GgufFile,
    name: &str,
    layout: Option<MoeLayout>,
) -> Result<Option<Vec<(String, Tensor)>>> {
    let Some(layout) = layout else {
        return Ok(None);
    };
    let Some((layer, module)) = name
        .strip_prefix("blk.")
        .and_then(|r| r.split_once('.'))
        .and_then(|(l, r)| Some((l.parse::<usize>().ok()?, r.strip_suffix(".weight")?)))
    else {
        return Ok(None);
    };
    let block = layout.prefix(layer);
    let [gate, up, down] = layout.expert_linears();
    let one = |hf: String, t: Tensor| Ok(Some(vec![(hf, t)]));
    let stacked = match module {
        "ffn_gate_inp" => return one(format!("{block}.gate.weight"), f.tensor(name)?),
        "ffn_gate_exps" => gate,
        "ffn_up_exps" => up,
        "ffn_down_exps" => down,
        "ffn_gate_shexp" | "ffn_up_shexp" | "ffn_down_shexp" if layout == MoeLayout::Qwen => {
            let part = module.trim_start_matches("ffn_").trim_end_matches("_shexp");
            let hf = format!("{block}.shared_expert.{part}_proj.weight");
            return one(hf, f.tensor(name)?);
        }
        "ffn_gate_inp_shexp" if layout == MoeLayout::Qwen => {
            // llama.cpp declares it {n_embd}; the converter may keep transformers' [1, n_embd].
            let t = f.tensor(name)?;
            let n = t.elem_count();
            if !matches!(t.dims(), [_] | [1, _]) {
                return Err(Error::input(format!(
                    "{}: tensor `{name}` has shape {:?}; the shared expert's gate is [n_embd]",
                    f.path,
                    t.dims()
                )));
            }
            return one(
                format!("{block}.shared_expert_gate.weight"),
                t.reshape((1, n))?,
            );
        }
        _ => return Ok(None),
    };
    let t = f.tensor(name)?;
    if t.rank() != 3 {
        return Err(Error::input(format!(
            "{}: tensor `{name}` has shape {:?}; stacked experts are [n_expert, rows, cols]",
            f.path,
            t.dims()
        )));
    }
    (0..t.dim(0)?)
        .map(|e| Ok((format!("{block}.experts.{e}.{stacked}.weight"), t.get(e)?)))
        .collect::<Result<Vec<_>>>()
        .map(Some)
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
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{param}"))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::autograd::testing::{fixture, max_logit_diff};

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

    fn moe_fixture(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/moe")
            .join(name)
    }

    /// The Qwen architectures: experts and shared expert widths from their own keys, the dense
    /// layer found by its missing router, no q/k permutation, and llama.cpp's per-architecture
    /// renormalisation unless `expert_weights_norm` says otherwise.
    #[test]
    fn qwen_expert_settings_come_from_their_keys() {
        let mut f = GgufFile::open(&moe_fixture("qwen2_moe.gguf")).unwrap();
        let c = llama_config(&f).unwrap();
        assert_eq!(c.model_type, "qwen2_moe");
        let moe = c.moe.clone().unwrap();
        assert_eq!(
            (moe.layout, moe.num_experts, moe.top_k, moe.norm_topk_prob),
            (MoeLayout::Qwen, 4, 2, false)
        );
        assert_eq!(
            (moe.expert_intermediate, moe.shared_intermediate),
            (12, Some(20))
        );
        assert_eq!(moe.mlp_only_layers, vec![1]);
        assert!(c.qkv_bias && !c.qk_norm);
        f.metadata
            .insert("qwen2moe.expert_weights_norm".into(), Value::Bool(true));
        assert!(llama_config(&f).unwrap().moe.unwrap().norm_topk_prob);

        let f = GgufFile::open(&moe_fixture("qwen3_moe.gguf")).unwrap();
        let c = llama_config(&f).unwrap();
        let moe = c.moe.unwrap();
        assert_eq!(c.model_type, "qwen3_moe");
        assert_eq!(
            (c.head_dim, c.hidden_size, c.num_attention_heads),
            (8, 16, 4)
        );
        assert!(c.qk_norm && moe.norm_topk_prob && moe.shared_intermediate.is_none());
        assert!(moe.mlp_only_layers.is_empty());
    }

    #[test]
    fn routing_llama_cpp_computes_otherwise_is_refused_by_key() {
        for (key, value) in [
            ("qwen3moe.expert_gating_func", Value::Int(2)),
            ("qwen3moe.expert_weights_scale", Value::Float(2.5)),
            ("qwen3moe.expert_weights_norm", Value::Int(1)),
            ("qwen3moe.attention.value_length", Value::Int(4)),
        ] {
            let mut f = GgufFile::open(&moe_fixture("qwen3_moe.gguf")).unwrap();
            f.metadata.insert(key.into(), value);
            let err = llama_config(&f).err().unwrap();
            assert!(matches!(err, Error::Input(_)), "{err:?}");
            assert!(err.to_string().contains(key), "{key}: {err}");
        }
        let mut f = GgufFile::open(&moe_fixture("qwen3_moe.gguf")).unwrap();
        f.metadata
            .insert("qwen3moe.expert_weights_scale".into(), Value::Float(1.0));
        assert!(llama_config(&f).is_ok());
    }
}
