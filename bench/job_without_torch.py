#!/usr/bin/env python3
"""The job of bench/kronfluence_job.py, written with numpy alone (no torch, no transformers).

Same shapes (GPT-2 4x256, 4 heads, vocab 8192), the same training sequences and queries (the
same numpy generator and seed, drawn in the same order), and weights drawn as transformers
initialises GPT-2 (normal 0.02, residual projections 0.02/sqrt(2 n_layer), zero biases, unit
norms) but from numpy, so they differ from that script's. For rerunning
`infl bench --passes-only` on the job where torch cannot be installed:

    python3 bench/job_without_torch.py --out /tmp/job     # needs numpy and safetensors
    infl --threads 2 bench --passes-only --model /tmp/job/model --train /tmp/job/corpus.jsonl \
        --queries /tmp/job/queries1.jsonl --max-len 128 --batch-size 16 --fisher empirical \
        --out /tmp/job/passes
"""

import argparse
import json
import os

import numpy as np
from safetensors.numpy import save_file

SCALES = {
    "full": dict(layers=4, width=256, heads=4, vocab=8192, n_train=1000, seq_len=128, n_query=16),
    "small": dict(layers=2, width=64, heads=4, vocab=512, n_train=100, seq_len=32, n_query=4),
}
SEED = 1234


def model_tensors(cfg, rng):
    d, layers = cfg["width"], cfg["layers"]
    normal = lambda *shape, std=0.02: rng.normal(0.0, std, shape).astype(np.float32)
    residual = 0.02 / np.sqrt(2 * layers)
    t = {"transformer.wte.weight": normal(cfg["vocab"], d),
         "transformer.wpe.weight": normal(cfg["seq_len"], d)}
    for i in range(layers):
        p = f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            t[p + ln + ".weight"] = np.ones(d, np.float32)
            t[p + ln + ".bias"] = np.zeros(d, np.float32)
        # transformers' Conv1D stores [in, out].
        for name, shape, std in [("attn.c_attn", (d, 3 * d), 0.02), ("attn.c_proj", (d, d), residual),
                                 ("mlp.c_fc", (d, 4 * d), 0.02), ("mlp.c_proj", (4 * d, d), residual)]:
            t[p + name + ".weight"] = normal(*shape, std=std)
            t[p + name + ".bias"] = np.zeros(shape[1], np.float32)
    t["transformer.ln_f.weight"] = np.ones(d, np.float32)
    t["transformer.ln_f.bias"] = np.zeros(d, np.float32)
    return t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", choices=sorted(SCALES), default="full")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    cfg = SCALES[a.scale]
    rng = np.random.default_rng(SEED)
    model_dir = os.path.join(a.out, "model")
    os.makedirs(model_dir, exist_ok=True)
    # The data first, from the generator's first draws, exactly as kronfluence_job.py draws them.
    train = [rng.integers(0, cfg["vocab"], cfg["seq_len"]).tolist() for _ in range(cfg["n_train"])]
    def queries(n):
        return [(rng.integers(0, cfg["vocab"], 16).tolist(), rng.integers(0, cfg["vocab"], 8).tolist())
                for _ in range(n)]
    q1, q2 = queries(cfg["n_query"]), queries(cfg["n_query"])
    with open(os.path.join(a.out, "corpus.jsonl"), "w") as f:
        for s in train:
            f.write(json.dumps({"ids": s}) + "\n")
    for k, qs in enumerate([q1, q2]):
        with open(os.path.join(a.out, f"queries{k + 1}.jsonl"), "w") as f:
            for i, (pr, co) in enumerate(qs):
                f.write(json.dumps({"id": f"q{i}", "prompt_ids": pr, "completion_ids": co}) + "\n")
    save_file(model_tensors(cfg, np.random.default_rng(SEED + 1)),
              os.path.join(model_dir, "model.safetensors"), metadata={"format": "pt"})
    config = dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=cfg["vocab"],
                  n_positions=cfg["seq_len"], n_ctx=cfg["seq_len"], n_embd=cfg["width"],
                  n_layer=cfg["layers"], n_head=cfg["heads"], layer_norm_epsilon=1e-5,
                  activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                  tie_word_embeddings=True)
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    print(f"wrote {a.out}: model/, corpus.jsonl ({len(train)} x {cfg['seq_len']}), "
          f"queries1.jsonl, queries2.jsonl ({cfg['n_query']} each)")


if __name__ == "__main__":
    main()
