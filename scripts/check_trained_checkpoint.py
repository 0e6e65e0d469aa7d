#!/usr/bin/env python3
"""Dev-time check that a checkpoint written by `infl train` loads in transformers and computes
the same thing as infl: GPT2LMHeadModel + the tokenizer from tokenizer.json, then the per-query
−log p(completion | prompt) compared with the `queries.losses` infl score recorded.

  python3 scripts/check_trained_checkpoint.py MODEL_DIR RESULTS_DIR QUERIES.jsonl
"""
import json
import sys

import torch
from tokenizers import Tokenizer
from transformers import GPT2LMHeadModel

model_dir, results_dir, queries_path = sys.argv[1:4]
model = GPT2LMHeadModel.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
tok = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
meta = json.load(open(f"{results_dir}/meta.json"))
ours = dict(zip(meta["queries"]["ids"], meta["queries"]["losses"]))
worst = 0.0
for line in open(queries_path):
    q = json.loads(line)
    p = tok.encode(q["prompt"], add_special_tokens=False).ids
    c = tok.encode(q["completion"], add_special_tokens=False).ids
    ids = torch.tensor([p + c])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    nll = -sum(logp[len(p) - 1 + i, t].item() for i, t in enumerate(c))
    worst = max(worst, abs(nll - ours[q["id"]]) / max(1.0, abs(nll)))
print(f"{len(ours)} queries: max relative difference of -log p, transformers vs infl: {worst:.2e}")
