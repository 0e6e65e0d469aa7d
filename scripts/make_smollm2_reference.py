#!/usr/bin/env python3
"""Dev-time: reference logits and token ids of SmolLM2-135M-Instruct.Q4_1.gguf as transformers
loads it (dequantised to float32), for the ignored test `smollm2_matches_transformers`.

    python scripts/make_smollm2_reference.py PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf

Writes tests/fixtures/families/smollm2_reference.json: for a few texts, the GGUF tokenizer's ids
(no BOS) and the logits at every position for every 97th vocabulary id plus the argmax.
"""
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

path = sys.argv[1]
d, f = os.path.split(path)
torch.set_num_threads(2)
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
model.eval()
texts = ["The capital of Germany is", "In 1999 there were 42 of them.",
         "Bees make honey from the nectar of flowers."]
out = {"texts": texts, "stride": 97, "ids": [], "logits": [], "argmax": []}
for t in texts:
    ids = tok(t, add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    out["ids"].append(ids)
    out["logits"].append(logits[:, ::97].tolist())
    out["argmax"].append(logits.argmax(-1).tolist())
dest = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "families",
                    "smollm2_reference.json")
with open(dest, "w") as fh:
    json.dump(out, fh)
print(out["ids"], out["argmax"][0])
