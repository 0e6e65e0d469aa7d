//! llama.cpp GGUF files (`--model file.gguf`) of the architectures `llama` (with Mixtral's
//! experts when `llama.expert_count` is set), `qwen2moe` and `qwen3moe`: config and tokenizer
//! from the file's metadata, weights memory-mapped and dequantised to f32 once at load, then the
//! model runs as [`super::llama::Llama`] (docs/gguf.md has the rules followed).
//!
//! * Dequantisation ([`file`]): F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K (checked against
//!   gguf-py in the tests), and the other types candle's ggml kernels read (Q5_0, Q5_1, Q2_K,
//!   Q3_K, Q5_K). Any other type is an error naming the tensor and its type.
//! * The mapping onto the Llama folder ([`llama`]): llama.cpp's converter permutes the rows of
//!   `attn_q` / `attn_k` inside each head of a `llama` file so that its RoPE can rotate
//!   adjacent pairs; [`unpermute_rows`] undoes it so that the HF `rotate_half` RoPE of the
//!   Llama model applies unchanged (the Qwen architectures are stored unpermuted). Stacked
//!   experts are split into the safetensors checkpoints' per-expert names.
//! * No `output.weight` → tied embeddings.

mod file;
mod llama;
mod tokenizer;

pub use file::{ggml_type_info, GgufFile, TensorInfo, Value};
pub use llama::{llama_config, load, load_on, permute_rows, unpermute_rows};
pub use tokenizer::tokenizer;

use std::path::Path;

/// Whether `path` names a GGUF file (by extension).
pub fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::autograd::testing::{fixture, max_logit_diff};
    use crate::model::{ModuleSelection, TapModel};

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
