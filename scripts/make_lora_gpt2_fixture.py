"""Generate the GPT-2 LoRA fixture for `infl` (tests/fixtures/lora/gpt2*): a PEFT adapter on the
bundled tiny GPT-2 (assets/tiny-gpt2, Conv1D layers), the logits of the merged model, and
kronfluence 1.0.1's EK-FAC and identity pairwise scores on the adapter's lora_A/lora_B modules.

Run from the repository root with the environment of scripts/make_lora_fixture.py:

    python scripts/make_lora_gpt2_fixture.py

Writes:
    tests/fixtures/lora/gpt2/{adapter_config.json,adapter_model.safetensors}
        r=4, lora_alpha=6, target_modules c_attn, c_proj, c_fc (so both blocks' attn.c_attn,
        attn.c_proj, mlp.c_fc and mlp.c_proj). PEFT sets fan_in_fan_out=True for Conv1D.
    tests/fixtures/lora/gpt2_reference.json
        the merged model's (`merge_and_unload`) logits of SEQS computed in float64, and
        `peft_float32_error`, how far PEFT's float32 merged model is from them (~9e-6).
    tests/fixtures/lora/gpt2_reference.safetensors: scores.ekfac, scores.identity
        [queries, train] on tests/fixtures/lora/{corpus,queries}_ids.jsonl, with
        use_empirical_fisher=True and the heuristic damping, the adapter's modules tracked.
    tests/fixtures/lora/gpt2_meta.json: versions and settings.
A and B are random (PEFT initialises B to zero) so that the adapter changes the logits and
every module has a gradient.
"""

import json
import os
import shutil
import sys
import tempfile
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_lora_fixture import OUT, QUERY_BATCH, ROOT, TRAIN_BATCH, kronfluence_scores  # noqa: E402

BASE = os.path.join(ROOT, "assets", "tiny-gpt2")
ADAPTER = dict(r=4, lora_alpha=6, target_modules=["c_attn", "c_proj", "c_fc"])
SEED = 20261207
# Short: the logits of 12 positions × 512 tokens, twice, are most of the fixture's size.
SEQS = [[1, 5, 9, 33, 2, 60, 17, 8], [7, 7, 50, 22]]
# Large enough to move the logits by whole units, small enough that PEFT's merged and unmerged
# forwards agree to well inside 1e-5 in float32 (at 0.4 they differ by 3e-5).
LORA_STD = 0.15
torch.set_num_threads(2)


def load_base():
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(BASE, attn_implementation="eager",
                                           dtype=torch.float32).eval()


def make_adapter():
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        # PEFT warns that it sets fan_in_fan_out for Conv1D: that is the point.
        warnings.simplefilter("ignore")
        model = get_peft_model(load_base(), LoraConfig(lora_dropout=0.0, **ADAPTER))
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(LORA_STD * torch.randn(p.shape, generator=g))
    d = os.path.join(OUT, "gpt2")
    shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(d, safe_serialization=True)
    os.remove(os.path.join(d, "README.md"))
    path = os.path.join(d, "adapter_config.json")
    with open(path) as f:
        cfg = json.load(f)
    assert cfg["fan_in_fan_out"], "PEFT should set fan_in_fan_out for Conv1D"
    cfg["base_model_name_or_path"] = "assets/tiny-gpt2"
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
    return model.eval(), d


def peft_logits(adapter_dir):
    """The merged model's logits of SEQS (`merge_and_unload`: W + (B A)ᵀ · scaling for
    Conv1D) computed in float64, and how far PEFT's own float32 merged model is from them:
    this base's logits reach ~18, where float32 rounding alone is ~9e-6, so a float32
    reference would leave a 1e-5 parity no margin."""
    from peft import PeftModel

    def merged(dtype):
        model = PeftModel.from_pretrained(load_base().to(dtype), adapter_dir).to(dtype)
        m = model.eval().merge_and_unload()
        with torch.no_grad():
            return [m(torch.tensor([s])).logits[0].flatten().double() for s in SEQS]

    exact, f32 = merged(torch.float64), merged(torch.float32)
    error = max(float((a - b).abs().max()) for a, b in zip(exact, f32))
    # Seven decimals (5e-8 at most) keep the file small and far inside the 1e-5 parity.
    return [[round(x, 7) for x in t.tolist()] for t in exact], error


def read_jsonl(name):
    with open(os.path.join(OUT, name)) as f:
        return [json.loads(line) for line in f]


def main():
    import kronfluence
    import peft
    import transformers
    from safetensors.torch import save_file

    model, adapter_dir = make_adapter()
    with open(os.path.join(OUT, "gpt2_reference.json"), "w") as f:
        logits, f32_error = peft_logits(adapter_dir)
        print(f"PEFT's float32 merged model vs float64: max |diff| = {f32_error:.3g}")
        json.dump({"sequences": SEQS, "logits": logits, "peft_float32_error": f32_error}, f)

    train = [r["ids"] for r in read_jsonl("corpus_ids.jsonl")]
    queries = [(r["prompt_ids"], r["completion_ids"]) for r in read_jsonl("queries_ids.jsonl")]
    workdir = tempfile.mkdtemp(prefix="infl-lora-gpt2-kf-")
    try:
        names, scores = kronfluence_scores(model, train, queries, workdir, "infl_lora_gpt2")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    save_file(scores, os.path.join(OUT, "gpt2_reference.safetensors"))
    meta = {
        "generator": "scripts/make_lora_gpt2_fixture.py",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "kronfluence": kronfluence.__version__},
        "base": "assets/tiny-gpt2",
        "adapter": ADAPTER,
        "kronfluence": {"tracked_modules": names,
                        "factor_args": "FactorArguments(strategy, use_empirical_fisher=True)",
                        "score_args": "ScoreArguments(damping_factor=None)",
                        "train_batch": TRAIN_BATCH, "query_batch": QUERY_BATCH},
    }
    with open(os.path.join(OUT, "gpt2_meta.json"), "w") as f:
        json.dump(meta, f, indent=1)


if __name__ == "__main__":
    main()
