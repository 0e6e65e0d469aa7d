"""Generate the LoRA adapter fixture for `infl` (tests/fixtures/lora): PEFT adapters on the
tiny random Llama of tests/fixtures/families/llama, the logits of the merged models, and
kronfluence 1.0.1's EK-FAC and identity pairwise scores on one adapter's lora_A/lora_B modules.

Run from the repository root with a Python environment that has torch, transformers, peft,
kronfluence==1.0.1 and safetensors (see scripts/requirements-fixture.txt):

    python scripts/make_lora_fixture.py

Writes:
    tests/fixtures/lora/qvd/{adapter_config.json,adapter_model.safetensors}
        r=4, lora_alpha=8, target_modules q_proj, v_proj, down_proj.
    tests/fixtures/lora/rslora/{adapter_config.json,adapter_model.safetensors}
        r=2, lora_alpha=3, use_rslora, every linear layer of block 1 only
        (layers_to_transform=[1]).
    tests/fixtures/lora/reference.json
        the merged models' float32 logits (`merge_and_unload`) of a few sequences: each adapter
        on the safetensors base, and `qvd` on the same weights with default RoPE (what
        tests/fixtures/families/tiny_llama.gguf holds).
    tests/fixtures/lora/{corpus_ids.jsonl,queries_ids.jsonl}
    tests/fixtures/lora/reference.safetensors: scores.ekfac, scores.identity [queries, train]
        with use_empirical_fisher=True and the heuristic damping (damping_factor=None), the
        `qvd` adapter's lora_A and lora_B modules tracked, float32.
PEFT initialises B to zero; both A and B are replaced by random values so that the adapter
changes the logits and every module has a gradient.
"""

import json
import os
import random
import shutil
import sys
import tempfile

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixture import SeqDataset, collate, make_task  # noqa: E402

BASE = os.path.join(ROOT, "tests", "fixtures", "families", "llama")
OUT = os.path.join(ROOT, "tests", "fixtures", "lora")
SEQS = [[1, 5, 9, 33, 2, 60, 17, 8, 41, 12, 3], [7, 7, 50, 22, 31]]
SEED = 20261206
N_TRAIN, N_QUERIES = 14, 4
TRAIN_BATCH, QUERY_BATCH = 5, 3
torch.set_num_threads(2)

ADAPTERS = {
    "qvd": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rslora": dict(r=2, lora_alpha=3, use_rslora=True, layers_to_transform=[1],
                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                   "up_proj", "down_proj"]),
}


def load_base(default_rope=False):
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM.from_pretrained(BASE, attn_implementation="eager", dtype=torch.float32)
    if default_rope:
        from transformers import LlamaConfig

        cfg = LlamaConfig.from_dict(m.config.to_dict())
        cfg.rope_parameters = {"rope_type": "default", "rope_theta": 1000.0}
        m2 = LlamaForCausalLM(cfg)
        m2.load_state_dict(m.state_dict())
        m2.tie_weights()
        m = m2
    return m.eval()


def make_adapter(name, seed):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_base(), LoraConfig(lora_dropout=0.0, **ADAPTERS[name]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(0.4 * torch.randn(p.shape, generator=g))
    d = os.path.join(OUT, name)
    shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(d, safe_serialization=True)
    # No absolute path of this machine in the fixture, and no model card.
    os.remove(os.path.join(d, "README.md"))
    path = os.path.join(d, "adapter_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["base_model_name_or_path"] = "tests/fixtures/families/llama"
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
    return model.eval(), d


def merged_logits(adapter_dir, default_rope=False):
    from peft import PeftModel

    merged = PeftModel.from_pretrained(load_base(default_rope), adapter_dir).merge_and_unload()
    with torch.no_grad():
        return [merged(torch.tensor([s])).logits[0].flatten().tolist() for s in SEQS]


def kronfluence_scores(model, train, queries, workdir, analysis_name="infl_lora"):
    """kronfluence's EK-FAC and identity pairwise scores on `model`'s lora_A/lora_B modules
    (empirical Fisher, heuristic damping): (the module names, {"scores.STRATEGY": tensor})."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    names = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and (".lora_A." in n or ".lora_B." in n)]
    task = make_task(names)
    model = prepare_model(model, task)
    analyzer = Analyzer(analysis_name=analysis_name, model=model, task=task, cpu=True,
                        disable_tqdm=True, output_dir=workdir, disable_model_save=True)
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0, collate_fn=collate))
    train_ds = SeqDataset([(s, None) for s in train])
    query_ds = SeqDataset([(p + c, [False] * len(p) + [True] * len(c)) for p, c in queries])
    scores = {}
    for strat in ["ekfac", "identity"]:
        analyzer.fit_all_factors(factors_name=strat, dataset=train_ds,
                                 factor_args=FactorArguments(strategy=strat,
                                                             use_empirical_fisher=True),
                                 per_device_batch_size=TRAIN_BATCH, overwrite_output_dir=True)
        analyzer.compute_pairwise_scores(
            scores_name=strat, factors_name=strat, query_dataset=query_ds,
            train_dataset=train_ds, per_device_query_batch_size=QUERY_BATCH,
            per_device_train_batch_size=TRAIN_BATCH,
            score_args=ScoreArguments(damping_factor=None), overwrite_output_dir=True)
        sc = analyzer.load_pairwise_scores(strat)["all_modules"]
        scores[f"scores.{strat}"] = sc.detach().to(torch.float32).contiguous()
        print(f"kronfluence {strat}: {tuple(sc.shape)}, range "
              f"[{float(sc.min()):.4g}, {float(sc.max()):.4g}]")
    return names, scores


def main():
    import kronfluence
    import peft
    import transformers
    from safetensors.torch import save_file

    os.makedirs(OUT, exist_ok=True)
    qvd, qvd_dir = make_adapter("qvd", SEED)
    _, rs_dir = make_adapter("rslora", SEED + 1)
    reference = {
        "sequences": SEQS,
        "logits": {"qvd": merged_logits(qvd_dir), "rslora": merged_logits(rs_dir)},
        "logits_default_rope": {"qvd": merged_logits(qvd_dir, default_rope=True)},
    }
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(reference, f)

    rng = random.Random(SEED)
    train = [[rng.randrange(64) for _ in range(rng.randint(5, 14))] for _ in range(N_TRAIN)]
    queries = [([rng.randrange(64) for _ in range(rng.randint(2, 5))],
                [rng.randrange(64) for _ in range(rng.randint(1, 4))]) for _ in range(N_QUERIES)]
    with open(os.path.join(OUT, "corpus_ids.jsonl"), "w") as f:
        for s in train:
            f.write(json.dumps({"ids": s}) + "\n")
    with open(os.path.join(OUT, "queries_ids.jsonl"), "w") as f:
        for i, (p, c) in enumerate(queries):
            f.write(json.dumps({"id": f"q{i}", "prompt_ids": p, "completion_ids": c}) + "\n")

    workdir = tempfile.mkdtemp(prefix="infl-lora-kf-")
    try:
        names, scores = kronfluence_scores(qvd, train, queries, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    save_file(scores, os.path.join(OUT, "reference.safetensors"))
    meta = {
        "generator": "scripts/make_lora_fixture.py",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "kronfluence": kronfluence.__version__},
        "base": "tests/fixtures/families/llama",
        "adapters": ADAPTERS,
        "kronfluence": {"adapter": "qvd", "tracked_modules": names,
                        "factor_args": "FactorArguments(strategy, use_empirical_fisher=True)",
                        "score_args": "ScoreArguments(damping_factor=None)",
                        "train_batch": TRAIN_BATCH, "query_batch": QUERY_BATCH},
    }
    with open(os.path.join(OUT, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)


if __name__ == "__main__":
    main()
