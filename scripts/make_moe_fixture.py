#!/usr/bin/env python3
"""Dev-time generator of tests/fixtures/moe/ (never a runtime dependency of infl).

Tiny randomly initialised mixture-of-experts checkpoints, one per layout infl reads
(config.json + model.safetensors with the per-expert tensor names real checkpoints use, and
`reference.json`: transformers' float32 logits of a few sequences):
  * mixtral: `block_sparse_moe.gate`, `experts.{i}.w1/w2/w3`, softmax → top-2 → renormalised;
  * qwen2_moe: `mlp.gate`, `mlp.experts.{i}.{gate,up,down}_proj`, a shared expert behind a
    sigmoid `shared_expert_gate`, top-k weights not renormalised; layer 1 a dense MLP
    (`mlp_only_layers`);
  * qwen3_moe: no shared expert, renormalised top-k, q/k RMSNorm per head;
  * mixtral.gguf: the Mixtral fixture as llama.cpp writes it (stacked `ffn_*_exps`), whose
    logits are mixtral/reference.json's (needs the `gguf` package, gguf==0.19.0);
  * qwen2_moe.gguf, qwen3_moe.gguf: the checked-in qwen2_moe / qwen3_moe fixtures as
    llama.cpp's convert_hf_to_gguf.py writes them (architectures `qwen2moe` / `qwen3moe`),
    whose logits are their reference.json's (`python scripts/make_moe_fixture.py gguf` writes
    only these two, from the files already in tests/fixtures/moe).

And `trained/`: a tiny Qwen2-MoE trained on `corpus_ids.jsonl` (so routing is no longer random),
`queries_ids.jsonl`, and `reference.safetensors`: pairwise EK-FAC and identity scores of the MLP
modules (router, experts, shared expert and its gate, layer 1's dense MLP) from an independent
float64 re-implementation: the model's forward written out here (its logits checked against
transformers), per-sequence gradients by autograd at batch size 1, and EK-FAC with
kronfluence's conventions (../shared/notes/kronfluence-conventions.md) per module. An expert's
A and S sum over the tokens routed to it; its per-sequence gradient sums over them too.

kronfluence itself cannot serve here: transformers 5 stores the experts as 3-D parameters
(`experts.gate_up_proj`), not `nn.Linear` modules, so kronfluence cannot track them at all; and
with per-expert `nn.Linear` modules the expert's input is the routed tokens flattened
([n_routed, d]), which kronfluence's per-sample gradient and Λ count read as n_routed separate
examples instead of summing them per sequence.

Run with /tmp/lora-venv (torch, transformers 5):  python scripts/make_moe_fixture.py [NAME…]
"""
import json
import os
import shutil

import numpy as np
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


# ---------------------------------------------------------------- the trained reference

def corpus(seed=21, n=24):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, 64, (int(torch.randint(6, 13, (1,), generator=g)),),
                          generator=g).tolist() for _ in range(n)]
    # A few queries copied from training sequences (their sources should score high).
    queries = []
    for i, src in enumerate([seqs[3], seqs[10], seqs[17]]):
        queries.append((src[:4], src[4:6]))
    queries.append(([5, 9, 12], [40]))
    return seqs, queries


def train(model, seqs, steps=150):
    """Full-batch Adam on the mean next-token loss (one right-padded batch, padding masked)."""
    n = max(len(s) for s in seqs)
    ids = torch.tensor([s + [0] * (n - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in seqs])
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
    model.eval()
    return loss.item()


class Reference:
    """Qwen2-MoE's forward in float64 from a state dict in checkpoint names, with every tracked
    linear computed explicitly so that its (a, g) and per-sequence gradient are at hand."""

    def __init__(self, sd, cfg):
        self.p = {k: v.double().clone().requires_grad_(True) for k, v in sd.items()}
        self.c = cfg
        self.records = {}

    def tracked(self):
        names = []
        for i in range(self.c["num_hidden_layers"]):
            m = f"model.layers.{i}.mlp"
            if i in self.c["mlp_only_layers"]:
                names += [f"{m}.gate_proj", f"{m}.up_proj", f"{m}.down_proj"]
                continue
            names.append(f"{m}.gate")
            for e in range(self.c["num_experts"]):
                names += [f"{m}.experts.{e}.{x}" for x in ["gate_proj", "up_proj", "down_proj"]]
            names += [f"{m}.shared_expert.{x}" for x in ["gate_proj", "up_proj", "down_proj"]]
            names.append(f"{m}.shared_expert_gate")
        return names

    def lin(self, name, x, rows=None):
        y = x @ self.p[name + ".weight"].T
        if name + ".bias" in self.p:
            y = y + self.p[name + ".bias"]
        if name in self.tracked_set and y.requires_grad:
            y.retain_grad()
            self.records.setdefault(name, []).append((x.detach(), y, rows))
        return y

    def mlp(self, m, x, rows=None):
        act = torch.nn.functional.silu
        h = act(self.lin(f"{m}.gate_proj", x, rows)) * self.lin(f"{m}.up_proj", x, rows)
        return self.lin(f"{m}.down_proj", h, rows)

    def forward(self, ids):
        c, p = self.c, self.p
        self.tracked_set = set(self.tracked())
        self.records = {}
        T = len(ids)
        d, h, kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
        hd = d // h
        eps = c["rms_norm_eps"]

        def rms(x, w):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

        theta = c["rope_parameters"]["rope_theta"]
        inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        f = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
        cos, sin = torch.cat([f, f], -1).cos(), torch.cat([f, f], -1).sin()

        def rope(x):  # [n, T, hd]
            x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
            return x * cos + torch.cat([-x2, x1], -1) * sin

        x = p["model.embed_tokens.weight"][torch.tensor(ids)]
        mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
        for i in range(c["num_hidden_layers"]):
            pre = f"model.layers.{i}"
            a = rms(x, p[f"{pre}.input_layernorm.weight"])
            q = self.lin(f"{pre}.self_attn.q_proj", a).view(T, h, hd).transpose(0, 1)
            k = self.lin(f"{pre}.self_attn.k_proj", a).view(T, kv, hd).transpose(0, 1)
            v = self.lin(f"{pre}.self_attn.v_proj", a).view(T, kv, hd).transpose(0, 1)
            q, k = rope(q), rope(k)
            k, v = k.repeat_interleave(h // kv, 0), v.repeat_interleave(h // kv, 0)
            att = torch.softmax(q @ k.transpose(1, 2) / hd ** 0.5 + mask, -1) @ v
            x = x + self.lin(f"{pre}.self_attn.o_proj", att.transpose(0, 1).reshape(T, d))
            a = rms(x, p[f"{pre}.post_attention_layernorm.weight"])
            m = f"{pre}.mlp"
            if i in c["mlp_only_layers"]:
                x = x + self.mlp(m, a)
                continue
            probs = torch.softmax(self.lin(f"{m}.gate", a), -1)
            top = torch.topk(probs, c["num_experts_per_tok"], -1)
            w = top.values
            if c["norm_topk_prob"]:
                w = w / w.sum(-1, keepdim=True)
            out = torch.zeros_like(x)
            for e in range(c["num_experts"]):
                tok, slot = torch.where(top.indices == e)
                if len(tok) == 0:
                    continue
                y = self.mlp(f"{m}.experts.{e}", a[tok], tok)
                out = out.index_add(0, tok, y * w[tok, slot, None])
            shared = self.mlp(f"{m}.shared_expert", a)
            out = out + torch.sigmoid(self.lin(f"{m}.shared_expert_gate", a)) * shared
            x = x + out
        x = rms(x, p["model.norm.weight"])
        return x @ p["lm_head.weight"].T

    def loss(self, ids, start):
        """Summed CE of the predictions of positions start.. (targets start+1..)."""
        logits = self.forward(ids)
        t = torch.tensor(ids[start + 1:])
        return torch.nn.functional.cross_entropy(logits[start:-1], t, reduction="sum")

    def per_sequence(self, ids, start=0):
        """Per tracked module: the sequence's gradient [out, in] and its per-token (a, g) rows."""
        for t in self.p.values():
            t.grad = None
        self.loss(ids, start).backward()
        grads, taps = {}, {}
        for name in self.tracked():
            w = self.p[name + ".weight"]
            # An expert no token of the sequence reached has no gradient: zero.
            grads[name] = torch.zeros_like(w) if w.grad is None else w.grad.clone()
            taps[name] = [(a, y.grad) for a, y, _ in self.records.get(name, [])]
        return grads, taps


def ekfac_scores(ref, seqs, queries):
    names = ref.tracked()
    A = {n: 0 for n in names}
    S = {n: 0 for n in names}
    train_grads = []
    for s in seqs:
        grads, taps = ref.per_sequence(s)
        train_grads.append(grads)
        for n in names:
            for a, g in taps[n]:
                A[n] = A[n] + a.T @ a
                S[n] = S[n] + g.T @ g
    n_tok = sum(len(s) for s in seqs)
    eig = {}
    for n in names:
        _, qa = torch.linalg.eigh(A[n] / n_tok)
        _, qs = torch.linalg.eigh(S[n] / n_tok)
        lam = sum((qs.T @ g[n] @ qa) ** 2 for g in train_grads) / len(seqs)
        eig[n] = (qa, qs, lam, 0.1 * lam.mean())
    query_grads = [ref.per_sequence(p + c, len(p) - 1)[0] for p, c in queries]
    ek = torch.zeros(len(queries), len(seqs), dtype=torch.float64)
    ident = torch.zeros_like(ek)
    for qi, gq in enumerate(query_grads):
        for ti, gt in enumerate(train_grads):
            for n in names:
                qa, qs, lam, damp = eig[n]
                pq = qs @ ((qs.T @ gq[n] @ qa) / (lam + damp)) @ qa.T
                ek[qi, ti] += (pq * gt[n]).sum()
                ident[qi, ti] += (gq[n] * gt[n]).sum()
    return ek, ident


def trained_fixture():
    from safetensors.torch import save_file

    seqs, queries = corpus()
    model = qwen2_moe(seed=31)
    final = train(model, seqs)
    d = dump("trained", model)
    with open(os.path.join(d, "corpus_ids.jsonl"), "w") as f:
        for s in seqs:
            f.write(json.dumps({"ids": s}) + "\n")
    with open(os.path.join(d, "queries_ids.jsonl"), "w") as f:
        for i, (p, c) in enumerate(queries):
            f.write(json.dumps({"id": f"q{i}", "prompt_ids": p, "completion_ids": c}) + "\n")
    cfg = json.load(open(os.path.join(d, "config.json")))
    ref = Reference(legacy_state_dict(model), cfg)
    with torch.no_grad():
        for s in SEQS:
            want = model(torch.tensor([s])).logits[0].double()
            got = ref.forward(s)
            assert (got - want).abs().max() < 1e-4, (got - want).abs().max()
    ek, ident = ekfac_scores(ref, seqs, queries)
    save_file({"scores.ekfac": ek.contiguous(), "scores.identity": ident.contiguous()},
              os.path.join(d, "reference.safetensors"))
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump({"generator": "scripts/make_moe_fixture.py", "final_train_loss": final,
                   "tracked_modules": ref.tracked(), "fisher": "empirical",
                   "damping": "0.1 * mean(Λ) per module"}, f, indent=1)
    print("trained: final loss", final, "ekfac scores\n", ek)


def mixtral_gguf(model):
    """The Mixtral fixture as llama.cpp's converter writes it: architecture `llama` with
    `expert_count` / `expert_used_count`, the router as `ffn_gate_inp`, the experts stacked into
    `ffn_{gate,up,down}_exps` ([n_expert, …] row-major), q/k rows permuted; F32 throughout, so
    its logits are the safetensors fixture's (`mixtral/reference.json`)."""
    import gguf

    cfg = model.config
    sd = {k: v.detach().float().numpy() for k, v in legacy_state_dict(model).items()}
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads

    def permute(w, n):  # convert_hf_to_gguf.py LlamaModel.permute
        return (w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2)
                .reshape(w.shape))

    w = gguf.GGUFWriter(os.path.join(OUT, "mixtral.gguf"), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // n_head)
    w.add_vocab_size(cfg.vocab_size)
    w.add_expert_count(cfg.num_local_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        m = p + "block_sparse_moe."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], n_head))
        w.add_tensor(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], n_kv))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate_inp.weight", sd[m + "gate.weight"])
        for gg, hf in [("gate", "w1"), ("up", "w3"), ("down", "w2")]:
            stacked = np.stack([sd[f"{m}experts.{e}.{hf}.weight"]
                                for e in range(cfg.num_local_experts)])
            w.add_tensor(f"blk.{i}.ffn_{gg}_exps.weight", stacked)
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def qwen_gguf(name):
    """The checked-in `name` fixture (qwen2_moe or qwen3_moe) as convert_hf_to_gguf.py's
    Qwen2MoeModel / Qwen3MoeModel write it: the metadata of TextModel.set_gguf_parameters plus
    `expert_feed_forward_length` and `expert_shared_feed_forward_length`; no q/k permutation
    (these architectures use NeoX-style RoPE, i.e. transformers' rotate_half); the router as
    `ffn_gate_inp`, experts stacked into `ffn_{gate,up,down}_exps` ([n_expert, out, in]
    row-major), the shared expert as `ffn_{gate,up,down}_shexp` and its gate as
    `ffn_gate_inp_shexp` with llama.cpp's shape {n_embd}; Qwen3's `attn_{q,k}_norm`. F32
    throughout. One departure: layer 1 of qwen2_moe is a dense MLP (`mlp_only_layers`), written
    as `ffn_{gate,up,down}` — llama.cpp's qwen2moe has no dense layers (its converter refuses
    such a checkpoint), infl reads a block by the tensors it holds."""
    import gguf
    from safetensors.numpy import load_file

    d = os.path.join(OUT, name)
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    sd = load_file(os.path.join(d, "model.safetensors"))
    arch = {"qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}[name]
    w = gguf.GGUFWriter(os.path.join(OUT, f"{name}.gguf"), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_expert_count(cfg["num_experts"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    if "head_dim" in cfg:
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    if "shared_expert_intermediate_size" in cfg:
        w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        m = p + "mlp."

        def put(gg, hf):
            if hf in sd:
                w.add_tensor(f"blk.{i}.{gg}", sd[hf])

        put("attn_norm.weight", p + "input_layernorm.weight")
        for gg, hf in [("q", "q"), ("k", "k"), ("v", "v"), ("output", "o")]:
            for kind in ["weight", "bias"]:
                put(f"attn_{gg}.{kind}", f"{p}self_attn.{hf}_proj.{kind}")
        put("attn_q_norm.weight", p + "self_attn.q_norm.weight")
        put("attn_k_norm.weight", p + "self_attn.k_norm.weight")
        put("ffn_norm.weight", p + "post_attention_layernorm.weight")
        if m + "gate.weight" not in sd:
            for gg in ["gate", "up", "down"]:
                put(f"ffn_{gg}.weight", f"{m}{gg}_proj.weight")
            continue
        put("ffn_gate_inp.weight", m + "gate.weight")
        for gg in ["gate", "up", "down"]:
            stacked = np.stack([sd[f"{m}experts.{e}.{gg}_proj.weight"]
                                for e in range(cfg["num_experts"])])
            w.add_tensor(f"blk.{i}.ffn_{gg}_exps.weight", stacked)
            put(f"ffn_{gg}_shexp.weight", f"{m}shared_expert.{gg}_proj.weight")
        if m + "shared_expert_gate.weight" in sd:
            w.add_tensor(f"blk.{i}.ffn_gate_inp_shexp.weight",
                         sd[m + "shared_expert_gate.weight"].reshape(-1))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    import sys

    os.makedirs(OUT, exist_ok=True)
    only = sys.argv[1:]
    for name, make in [("mixtral", mixtral), ("qwen2_moe", qwen2_moe), ("qwen3_moe", qwen3_moe)]:
        if not only or name in only:
            model = make()
            dump(name, model)
            if name == "mixtral":
                mixtral_gguf(model)
    if not only or "gguf" in only:
        qwen_gguf("qwen2_moe")
        qwen_gguf("qwen3_moe")
    if not only or "trained" in only:
        trained_fixture()


if __name__ == "__main__":
    main()
