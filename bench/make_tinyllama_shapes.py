"""A random-weight checkpoint in TinyLlama-1.1B's shapes, and a corpus and queries of random
token ids, for the 1B-class run of docs/scale-out.md (`bench/run_1b.sh`).

    python bench/make_tinyllama_shapes.py OUT_DIR

Needs numpy and safetensors only (no torch): writes OUT_DIR/model (config.json and
model.safetensors, f32, 4.4 GB), OUT_DIR/corpus.jsonl (256 documents of 256 ids) and
OUT_DIR/queries.jsonl (4 queries of 32 + 32 ids). Weights follow transformers' initialisation
(normal, std 0.02; norms 1), so the model's outputs are near uniform, as an untrained model's.
"""
import json, os, sys

import numpy as np
from safetensors.numpy import save_file

# TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T's config.json.
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
    "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "float32",
}


def weights(rng):
    c = CONFIG
    d, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = d // c["num_attention_heads"] * c["num_key_value_heads"]
    normal = lambda *shape: (rng.standard_normal(shape, dtype=np.float32) * 0.02)
    w = {"model.embed_tokens.weight": normal(v, d), "model.norm.weight": np.ones(d, np.float32),
         "lm_head.weight": normal(v, d)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = np.ones(d, np.float32)
        w[p + "post_attention_layernorm.weight"] = np.ones(d, np.float32)
        w[p + "self_attn.q_proj.weight"] = normal(d, d)
        w[p + "self_attn.k_proj.weight"] = normal(kv, d)
        w[p + "self_attn.v_proj.weight"] = normal(kv, d)
        w[p + "self_attn.o_proj.weight"] = normal(d, d)
        w[p + "mlp.gate_proj.weight"] = normal(f, d)
        w[p + "mlp.up_proj.weight"] = normal(f, d)
        w[p + "mlp.down_proj.weight"] = normal(d, f)
    return w


def main(out):
    rng = np.random.default_rng(0)
    os.makedirs(f"{out}/model", exist_ok=True)
    with open(f"{out}/model/config.json", "w") as fh:
        json.dump(CONFIG, fh, indent=1)
    w = weights(rng)
    save_file(w, f"{out}/model/model.safetensors", metadata={"format": "pt"})
    print("parameters", sum(a.size for a in w.values()))
    v = CONFIG["vocab_size"]
    with open(f"{out}/corpus.jsonl", "w") as fh:
        for _ in range(256):
            fh.write(json.dumps({"ids": rng.integers(0, v, 256).tolist()}) + "\n")
    with open(f"{out}/queries.jsonl", "w") as fh:
        for q in range(4):
            ids = rng.integers(0, v, 64).tolist()
            fh.write(json.dumps({"id": f"q{q}", "prompt_ids": ids[:32], "completion_ids": ids[32:]}) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
