#!/usr/bin/env python3
"""Recipe step 1: a corpus with planted facts, and a PEFT LoRA adapter fine-tuned on it.

The base is the tiny Llama of tests/fixtures/families/llama (vocabulary of 64 token ids, no
tokenizer), so the corpus is pre-tokenised: 60 random filler sequences and 4 "facts", each a
fixed prompt followed by its answer token, written twice. The queries ask for the facts.

    python examples/lora/train_adapter.py OUT_DIR      (torch, transformers, peft)
"""
import json
import os
import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

BASE = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "families", "llama")
FACTS = [([10, 11, 12, 13], [50]), ([20, 21, 22, 23], [51]), ([30, 31, 32, 33], [52]),
         ([40, 41, 42, 43], [53])]


def main(out):
    os.makedirs(out, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    corpus = [torch.randint(0, 64, (10,), generator=g).tolist() for _ in range(60)]
    planted = {}
    for i, (p, c) in enumerate(FACTS):
        for _ in range(2):
            planted[len(corpus)] = i
            corpus.append(p + c + torch.randint(0, 64, (5,), generator=g).tolist())
    with open(os.path.join(out, "corpus.jsonl"), "w") as f:
        for s in corpus:
            f.write(json.dumps({"ids": s}) + "\n")
    with open(os.path.join(out, "queries.jsonl"), "w") as f:
        for i, (p, c) in enumerate(FACTS):
            f.write(json.dumps({"id": f"fact{i}", "prompt_ids": p, "completion_ids": c}) + "\n")
    with open(os.path.join(out, "planted.json"), "w") as f:
        # infl names a pre-tokenised sequence `[LINE:0]`, LINE counted from 1.
        json.dump({str(k + 1): f"fact{v}" for k, v in planted.items()}, f)

    model = AutoModelForCausalLM.from_pretrained(BASE)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj", "down_proj"]))
    ids = torch.tensor(corpus)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    for step in range(200):
        opt.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        for p, c in FACTS:
            logits = model(torch.tensor([p])).logits[0, -1]
            print(f"prompt {p}: p(answer {c[0]}) = {logits.softmax(-1)[c[0]]:.3f}")
    print(f"final training loss {loss.item():.3f}")
    model.save_pretrained(os.path.join(out, "adapter"))


if __name__ == "__main__":
    main(sys.argv[1])
