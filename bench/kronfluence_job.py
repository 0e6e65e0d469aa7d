#!/usr/bin/env python3
"""infl against kronfluence on one CPU job, same model, data and conventions.

The job (issue 9): a random GPT-2 with 4 blocks of width 256 (4 heads), vocab 8192; 1,000
training sequences of 128 random tokens; 16 queries (16-token prompt, 8-token completion).
EK-FAC, float32, empirical Fisher (deterministic labels), heuristic damping 0.1·mean(Λ), the
four linears of every block tracked, summed losses (the conventions of
scripts/make_fixture.py, which the kronfluence parity test checks to 3.7e-6).

Prints per-phase times, the end-to-end ratio kronfluence / infl, the per-query Pearson and
the max relative difference of the scores, and the re-scoring ratio with infl's gradient store
(`score --store`) against kronfluence's compute_pairwise_scores. Writes everything to
OUT/bench.json. Run through bench/kronfluence.sh (CPU) or bench/gpu_run.sh (`--device cuda`:
kronfluence on the GPU, infl's autograd engine on the GPU with its statistics on the CPU).
"""

import argparse
import json
import os
import subprocess
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

SCALES = {
    # layers, width, heads, vocab, sequences, tokens per sequence, queries
    "full": dict(layers=4, width=256, heads=4, vocab=8192, n_train=1000, seq_len=128, n_query=16),
    "small": dict(layers=2, width=64, heads=4, vocab=512, n_train=100, seq_len=32, n_query=4),
}
BATCH = 16
SEED = 1234


def pad(seqs, masks):
    L = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    att = torch.zeros(len(seqs), L, dtype=torch.long)
    lab = torch.full((len(seqs), L), -100, dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        n = len(s)
        ids[i, :n] = torch.tensor(s)
        att[i, :n] = 1
        t = torch.tensor(s)
        t[~torch.tensor(m, dtype=torch.bool)] = -100
        lab[i, :n] = t
    return {"input_ids": ids, "attention_mask": att, "labels": lab}


class Items(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate(items):
    return pad([it[0] for it in items], [it[1] for it in items])


def make_task(modules):
    from kronfluence.task import Task

    class LMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits.float()
            logits = logits[:, :-1].reshape(-1, logits.size(-1))
            labels = batch["labels"][:, 1:].reshape(-1)
            assert not sample, "the job uses the empirical Fisher"
            return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")

        def compute_measurement(self, batch, model):
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits.float()
            logits = logits[:, :-1].reshape(-1, logits.size(-1))
            labels = batch["labels"][:, 1:].reshape(-1)
            return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")

        def get_influence_tracked_modules(self):
            return list(modules)

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return LMTask()


def conv1d_to_linear(model):
    from transformers.pytorch_utils import Conv1D
    names = []
    for bi, block in enumerate(model.transformer.h):
        for parent, child in [("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"),
                              ("mlp", "c_proj")]:
            p = getattr(block, parent)
            conv = getattr(p, child)
            assert isinstance(conv, Conv1D)
            lin = nn.Linear(conv.weight.shape[0], conv.weight.shape[1], bias=True)
            lin.weight.data = conv.weight.data.t().contiguous().clone()
            lin.bias.data = conv.bias.data.clone()
            setattr(p, child, lin)
            names.append(f"transformer.h.{bi}.{parent}.{child}")
    return names


def timed(label, times, f):
    t0 = time.perf_counter()
    out = f()
    times[label] = time.perf_counter() - t0
    print(f"  {label:<42s} {times[label]:8.1f} s", flush=True)
    return out


def infl(cmd, times, label, env):
    def go():
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr}")
        return r
    return timed(label, times, go)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", choices=sorted(SCALES), default="full")
    ap.add_argument("--out", required=True)
    ap.add_argument("--infl", required=True, help="the infl binary")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="where both tools run their forward and backward passes")
    a = ap.parse_args()
    cfg = SCALES[a.scale]
    os.makedirs(a.out, exist_ok=True)
    torch.manual_seed(SEED)
    torch.set_num_threads(a.threads)
    rng = np.random.default_rng(SEED)

    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(vocab_size=cfg["vocab"], n_positions=cfg["seq_len"], n_embd=cfg["width"],
                        n_layer=cfg["layers"], n_head=cfg["heads"], resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).eval()
    model_dir = os.path.join(a.out, "model")
    model.save_pretrained(model_dir, safe_serialization=True)

    train = [rng.integers(0, cfg["vocab"], cfg["seq_len"]).tolist() for _ in range(cfg["n_train"])]
    def queries(n):
        return [(rng.integers(0, cfg["vocab"], 16).tolist(), rng.integers(0, cfg["vocab"], 8).tolist())
                for _ in range(n)]
    q1, q2 = queries(cfg["n_query"]), queries(cfg["n_query"])
    corpus = os.path.join(a.out, "corpus.jsonl")
    with open(corpus, "w") as f:
        for s in train:
            f.write(json.dumps({"ids": s}) + "\n")
    qpaths = []
    for k, qs in enumerate([q1, q2]):
        p = os.path.join(a.out, f"queries{k + 1}.jsonl")
        with open(p, "w") as f:
            for i, (pr, co) in enumerate(qs):
                f.write(json.dumps({"id": f"q{i}", "prompt_ids": pr, "completion_ids": co}) + "\n")
        qpaths.append(p)

    times = {}
    print(f"job: GPT-2 {cfg['layers']}x{cfg['width']}, vocab {cfg['vocab']}, "
          f"{cfg['n_train']} x {cfg['seq_len']} tokens, {cfg['n_query']} queries, "
          f"{a.threads} threads, device {a.device}", flush=True)

    # ---- kronfluence ---------------------------------------------------------------
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs
    kmodel = GPT2LMHeadModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    modules = conv1d_to_linear(kmodel)
    task = make_task(modules)
    kmodel = prepare_model(kmodel, task)
    an = Analyzer(analysis_name="bench", model=kmodel, task=task, cpu=a.device == "cpu",
                  disable_tqdm=True,
                  output_dir=os.path.join(a.out, "kronfluence"), disable_model_save=True)
    an.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0, collate_fn=collate))
    train_ds = Items([(s, [True] * len(s)) for s in train])
    qds = [Items([(p + c, [False] * len(p) + [True] * len(c)) for p, c in qs]) for qs in (q1, q2)]
    fargs = FactorArguments(strategy="ekfac", use_empirical_fisher=True)
    import importlib.metadata as md
    versions = {p: md.version(p) for p in ("torch", "transformers", "kronfluence")}
    print(f"kronfluence {versions['kronfluence']} (ekfac, float32; torch {versions['torch']}):",
          flush=True)
    kw = dict(factors_name="ekfac", dataset=train_ds, factor_args=fargs,
              per_device_batch_size=BATCH, overwrite_output_dir=True)
    timed("covariance pass", times, lambda: an.fit_covariance_matrices(**kw))
    timed("eigendecomposition", times, lambda: an.perform_eigendecomposition(
        factors_name="ekfac", factor_args=fargs, overwrite_output_dir=True))
    timed("eigenvalue (lambda) pass", times, lambda: an.fit_lambda_matrices(**kw))
    sargs = ScoreArguments(damping_factor=None)
    def pairwise(k):
        an.compute_pairwise_scores(
            scores_name=f"s{k}", factors_name="ekfac", query_dataset=qds[k], train_dataset=train_ds,
            per_device_query_batch_size=BATCH, per_device_train_batch_size=BATCH,
            score_args=sargs, overwrite_output_dir=True)
        return an.load_pairwise_scores(f"s{k}")["all_modules"].double().numpy()
    kf = timed("compute_pairwise_scores", times, lambda: pairwise(0))
    kf2 = timed("compute_pairwise_scores (new queries)", times, lambda: pairwise(1))
    k_total = (times["covariance pass"] + times["eigendecomposition"]
               + times["eigenvalue (lambda) pass"] + times["compute_pairwise_scores"])

    # ---- infl ------------------------------------------------------------------------
    env = dict(os.environ)
    common = ["--batch-size", str(BATCH), "--device", a.device]
    print("infl:", flush=True)
    fdir, sdir = os.path.join(a.out, "factors"), os.path.join(a.out, "scores")
    infl([a.infl, "-q", "--threads", str(a.threads), "fit", "--model", model_dir, "--train", corpus,
          "--out", fdir, "--fisher", "empirical", "--max-len", str(cfg["seq_len"])] + common,
         times, "infl fit", env)
    infl([a.infl, "-q", "--threads", str(a.threads), "score", "--model", model_dir, "--factors",
          fdir, "--train", corpus, "--queries", qpaths[0], "--out", sdir, "--query-rank", "full",
          "--dense"] + common, times, "infl score (full rank)", env)
    i_total = times["infl fit"] + times["infl score (full rank)"]
    ours = _dense(os.path.join(sdir, "scores.safetensors"))

    # Re-scoring with a gradient store: written once by `fit --store`, then new queries.
    has_store = "--store-form" in subprocess.run([a.infl, "fit", "--help"], capture_output=True,
                                            text=True).stdout
    store = {}
    if has_store:
        fs = os.path.join(a.out, "factors-store")
        # bf16 in both forms (f32 doubles the disk; its accuracy is tested in tests/store.rs).
        for dtype, form in [("bf16", "smallest"), ("bf16", "rotated")]:
            name = f"{dtype}, {form}"
            infl([a.infl, "-q", "--threads", str(a.threads), "fit", "--model", model_dir, "--train",
                  corpus, "--out", fs, "--fisher", "empirical", "--max-len", str(cfg["seq_len"]),
                  "--store", "--store-dtype", dtype, "--store-form", form] + common, times,
                 f"infl fit --store ({name})", env)
            out = os.path.join(a.out, f"scores-store-{dtype}-{form}")
            label = f"infl score --store ({name}, new queries)"
            infl([a.infl, "-q", "--threads", str(a.threads), "score", "--model", model_dir,
                  "--factors", fs, "--train", corpus, "--queries", qpaths[1], "--out", out,
                  "--store", "--dense"] + common, times, label, env)
            got = _dense(os.path.join(out, "scores.safetensors"))
            meta = json.load(open(os.path.join(fs, "store", "store.json")))
            store[name] = dict(
                seconds=times[label],
                bytes=meta["bytes"], bytes_per_sequence=meta["bytes"] / meta["n_sequences"],
                ratio_vs_kronfluence_pairwise=times["compute_pairwise_scores (new queries)"]
                / times[label],
                **_agreement(kf2, got))

    # infl's passes against their GEMM-bound floor, on this job, in this run.
    floors = None
    if a.device == "cpu" and "--passes-only" in subprocess.run(
            [a.infl, "bench", "--help"], capture_output=True, text=True).stdout:
        out = subprocess.run(
            [a.infl, "-q", "--threads", str(a.threads), "bench", "--passes-only", "--model",
             model_dir, "--train", corpus, "--queries", qpaths[0], "--max-len",
             str(cfg["seq_len"]), "--batch-size", str(BATCH), "--fisher", "empirical", "--out",
             os.path.join(a.out, "passes")], capture_output=True, text=True, env=env, check=True)
        floors = out.stdout
        print(floors, flush=True)

    agree = _agreement(kf, ours)
    result = dict(scale=a.scale, job=cfg, threads=a.threads, device=a.device, versions=versions,
                  seconds=times,
                  kronfluence_total=k_total, infl_total=i_total,
                  end_to_end_ratio=k_total / i_total, agreement=agree, store=store,
                  passes_against_floor=floors, load_average=os.getloadavg())
    with open(os.path.join(a.out, "bench.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nend to end (fit + score): kronfluence {k_total:.1f} s, infl {i_total:.1f} s "
          f"-> {k_total / i_total:.2f}x")
    print(f"scores: per-query Pearson min {agree['pearson_min']:.6f}, "
          f"max |infl - kf| / max|kf| {agree['max_rel_diff']:.2e}")
    for dtype, s in store.items():
        print(f"re-scoring new queries from the {dtype} store ({s['bytes_per_sequence'] / 1024:.0f} KiB "
              f"per sequence): {s['seconds']:.1f} s vs kronfluence compute_pairwise_scores "
              f"{times['compute_pairwise_scores (new queries)']:.1f} s -> "
              f"{s['ratio_vs_kronfluence_pairwise']:.1f}x (Pearson min {s['pearson_min']:.6f})")
    if not has_store:
        print("this infl build has no --store-form: re-scoring not measured")
    print(f"load average during the run: {os.getloadavg()}")


def _dense(path):
    from safetensors.numpy import load_file
    return load_file(path)["scores"].astype(np.float64)


def _agreement(ref, got):
    rs = [float(np.corrcoef(ref[q], got[q])[0, 1]) for q in range(ref.shape[0])]
    return dict(pearson_min=min(rs), pearson=rs,
                max_rel_diff=float(np.abs(ref - got).max() / np.abs(ref).max()))


if __name__ == "__main__":
    main()
