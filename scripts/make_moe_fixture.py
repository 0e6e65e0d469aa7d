#!/usr/bin/env python3
"""Dev-time generator of tests/fixtures/moe/ (never a runtime dependency of infl).

Tiny randomly initialised mixture-of-experts checkpoints, one per layout infl reads
(config.json + model.safetensors with the per-expert tensor names real checkpoints use, and
`reference.json`: transformers' float32 logits of a few sequences):
  * mixtral: `block_sparse_moe.gate`, `experts.{i}.w1/w2/w3`, softmax → top-2 → renormalised;
  * qwen2_moe: `mlp.gate`, `mlp.experts.{i}.{gate,up,down}_proj`, a shared expert behind a
    sigmoid `shared_expert_gate`, top-k weights not renormalised; layer 1 a dense MLP
    (`mlp_only_layers`);
  * qwen3_moe: no shared expert, renormalised top-k, q/k RMSNorm per head.

Run with /tmp/lora-venv (torch, transformers 5):  python scripts/make_moe_fixture.py
"""
import json
import os
import shutil

import torch

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "moe")
torch.set_num_threads(2)

SEQS = [[1, 5, 9, 33, 2, 60, 17, 8, 41, 12, 3], [7, 7, 50, 22, 31]]
COMMON = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
              tie_word_embeddings=False, attn_implementation="eager")


def randomize(model, seed):
    """Weights large enough that logits and routing are far from uniform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def legacy_state_dict(model):
    """The checkpoint names real MoE checkpoints use: transformers 5 fuses the experts into
    `experts.gate_up_proj` [E, 2I, D] / `experts.down_proj` [E, D, I]; split them back."""
    mixtral = model.config.model_type == "mixtral"
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach().contiguous().clone()
        if mixtral:
            k = k.replace(".mlp.", ".block_sparse_moe.")
        if k.endswith("experts.gate_up_proj"):
            p = k[: -len("gate_up_proj")]
            inter = v.shape[1] // 2
            for e in range(v.shape[0]):
                g, u = v[e, :inter].contiguous(), v[e, inter:].contiguous()
                names = ("w1", "w3") if mixtral else ("gate_proj", "up_proj")
                out[f"{p}{e}.{names[0]}.weight"] = g
                out[f"{p}{e}.{names[1]}.weight"] = u
        elif k.endswith("experts.down_proj"):
            p = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[f"{p}{e}.{'w2' if mixtral else 'down_proj'}.weight"] = v[e].contiguous()
        elif k.endswith(".gate.weight") and ("block_sparse_moe" in k or ".mlp.gate." in k):
            out[k] = v
        else:
            out[k] = v
    return out


def dump(name, model, seqs=SEQS):
    from safetensors.torch import save_file

    d = os.path.join(OUT, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    model.eval()
    cfg = model.config.to_dict()
    for k in ["transformers_version", "dtype", "torch_dtype", "architectures"]:
        cfg.pop(k, None)
    cfg["architectures"] = [type(model).__name__]
    if cfg["model_type"].startswith("qwen") and "num_local_experts" in cfg:
        # Released Qwen MoE configs spell it num_experts.
        cfg["num_experts"] = cfg.pop("num_local_experts")
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    save_file(legacy_state_dict(model), os.path.join(d, "model.safetensors"))
    logits = []
    with torch.no_grad():
        for s in seqs:
            logits.append(model(torch.tensor([s])).logits[0].float().flatten().tolist())
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump({"sequences": seqs, "logits": logits}, f)
    # The checkpoint must load back into transformers (its converters re-fuse the experts)
    # to the same logits: the split above is the layout transformers reads.
    reloaded = type(model).from_pretrained(d, attn_implementation="eager").eval()
    with torch.no_grad():
        for s, want in zip(seqs, logits):
            got = reloaded(torch.tensor([s])).logits[0].float().flatten()
            assert torch.allclose(got, torch.tensor(want), atol=1e-6), name
    return d


def mixtral(seed=11):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(**COMMON, intermediate_size=24, num_local_experts=4,
                        num_experts_per_tok=2, rope_theta=10000.0, sliding_window=None)
    torch.manual_seed(seed)
    m = MixtralForCausalLM(cfg)
    randomize(m, seed)
    return m


def qwen2_moe(seed=12):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(**COMMON, intermediate_size=20, moe_intermediate_size=12,
                         shared_expert_intermediate_size=20, num_experts=4,
                         num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1,
                         mlp_only_layers=[1], qkv_bias=True, rope_theta=10000.0)
    torch.manual_seed(seed)
    m = Qwen2MoeForCausalLM(cfg)
    randomize(m, seed)
    return m


def qwen3_moe(seed=13):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(**COMMON, intermediate_size=20, moe_intermediate_size=12,
                         num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                         head_dim=8, attention_bias=False, rope_theta=10000.0)
    torch.manual_seed(seed)
    m = Qwen3MoeForCausalLM(cfg)
    randomize(m, seed)
    return m


def main():
    os.makedirs(OUT, exist_ok=True)
    dump("mixtral", mixtral())
    dump("qwen2_moe", qwen2_moe())
    dump("qwen3_moe", qwen3_moe())


if __name__ == "__main__":
    main()
