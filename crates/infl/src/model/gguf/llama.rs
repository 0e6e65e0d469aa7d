//! A GGUF file of the Llama architecture mapped onto [`crate::model::llama`]: the config from
//! the file's metadata, tensor names from llama.cpp's onto transformers', and llama.cpp's q/k row
//! permutation undone ([`unpermute_rows`]) so that the HF `rotate_half` RoPE applies unchanged.
//! A mixture of experts (`llama.expert_count`, as llama.cpp converts Mixtral) has its stacked
//! `ffn_{gate,up,down}_exps` tensors split into Mixtral's per-expert checkpoint names.

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
    let mut tensors = HashMap::new();
    for name in &f.order {
        if let Some(experts) = expert_tensors(&f, name)? {
            tensors.extend(experts);
            continue;
        }
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
    let moe = expert_config(f, &k)?;
    Ok(LlamaConfig {
        model_type: if moe.is_some() { "mixtral" } else { "llama" }.into(),
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
        qk_norm: false,
        moe,
    })
}

/// The expert blocks of a GGUF file with `llama.expert_count` > 0: Mixtral's routing
/// (softmax, top `expert_used_count`, renormalised), experts `feed_forward_length` wide.
fn expert_config(f: &GgufFile, k: &dyn Fn(&str) -> String) -> Result<Option<MoeConfig>> {
    let count = |key: &str| -> Result<Option<usize>> {
        match f.metadata.get(&k(key)) {
            None => Ok(None),
            Some(v) => v
                .as_usize()
                .map(Some)
                .ok_or_else(|| Error::input(format!("{}: {} must be an integer", f.path, k(key)))),
        }
    };
    let n = match count("expert_count")? {
        None | Some(0) => return Ok(None),
        Some(n) => n,
    };
    let used = count("expert_used_count")?.ok_or_else(|| {
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
    Ok(Some(MoeConfig {
        layout: MoeLayout::Mixtral,
        num_experts: n,
        top_k: used,
        norm_topk_prob: true,
        expert_intermediate: f.meta_usize(&k("feed_forward_length"))?,
        shared_intermediate: None,
        sparse_step: 1,
        mlp_only_layers: Vec::new(),
    }))
}

/// llama.cpp's router and stacked experts of one block (`blk.N.ffn_gate_inp`,
/// `blk.N.ffn_{gate,up,down}_exps`, `[n_expert, …]`) under Mixtral's checkpoint names, one
/// tensor per expert; `None` for every other tensor.
fn expert_tensors(f: &GgufFile, name: &str) -> Result<Option<Vec<(String, Tensor)>>> {
    let Some((layer, module)) = name
        .strip_prefix("blk.")
        .and_then(|r| r.split_once('.'))
        .and_then(|(l, r)| Some((l.parse::<usize>().ok()?, r.strip_suffix(".weight")?)))
    else {
        return Ok(None);
    };
    let block = MoeLayout::Mixtral.prefix(layer);
    let hf = match module {
        "ffn_gate_inp" => {
            return Ok(Some(vec![(
                format!("{block}.gate.weight"),
                f.tensor(name)?,
            )]))
        }
        "ffn_gate_exps" => "w1",
        "ffn_up_exps" => "w3",
        "ffn_down_exps" => "w2",
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
        .map(|e| Ok((format!("{block}.experts.{e}.{hf}.weight"), t.get(e)?)))
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
}
