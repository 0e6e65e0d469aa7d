#!/usr/bin/env python3
"""Dev-time generator of tests/fixtures/families/ (never a runtime dependency of infl).

For each architecture family a tiny randomly initialised Hugging Face checkpoint directory
(config.json + model.safetensors) and `reference.json`: the transformers float32 logits of a few
sequences. Some configs are rewritten into the legacy key style real checkpoints use
(`rotary_pct`/`rotary_emb_base` for Pythia, `rope_theta`/`rope_scaling` for Llama) so that both
parsers are exercised.

GGUF fixtures (written with the `gguf` package, gguf-py):
  * quant.gguf + quant_reference.safetensors: one tensor per quantisation type with random blocks,
    and the float32 values gguf-py's own `quants.dequantize` gives for them;
  * tiny_llama.gguf: the tiny Llama checkpoint converted the way llama.cpp's convert_hf_to_gguf.py
    does it (rows of attn_q / attn_k permuted for ggml's rotary layout), with a small byte-level
    BPE tokenizer in the metadata; its reference logits are those of the HF Llama fixture.

Run with the environment of scripts/requirements-fixture.txt (gguf==0.19.0 included):
    python scripts/make_family_fixtures.py
"""
import json
import os
import shutil

import numpy as np
import torch
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "families")
torch.set_num_threads(2)

SEQS = [[1, 5, 9, 33, 2, 60, 17, 8, 41, 12, 3], [7, 7, 50, 22, 31]]


def randomize(model, seed):
    """Weights large enough that logits are far from uniform (a parity check with teeth)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or "layernorm" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def dump(name, model, config_edit=None):
    d = os.path.join(OUT, name)
    shutil.rmtree(d, ignore_errors=True)
    model.eval()
    model.save_pretrained(d, safe_serialization=True)
    if config_edit is not None:
        path = os.path.join(d, "config.json")
        with open(path) as f:
            cfg = json.load(f)
        config_edit(cfg)
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2)
    logits = []
    with torch.no_grad():
        for s in SEQS:
            out = model(torch.tensor([s])).logits[0]
            logits.append(out.float().flatten().tolist())
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump({"sequences": SEQS, "logits": logits}, f)
    return d


def neox(parallel, seed):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=40, rotary_pct=0.5, rotary_emb_base=500.0, max_position_embeddings=32,
        use_parallel_residual=parallel, layer_norm_eps=1e-5, hidden_act="gelu",
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    m = GPTNeoXForCausalLM(cfg)
    randomize(m, seed)
    return m


def legacy_neox(cfg):
    rp = cfg.pop("rope_parameters")
    cfg["rotary_pct"] = rp["partial_rotary_factor"]
    cfg["rotary_emb_base"] = rp["rope_theta"]


def legacy_llama(cfg):
    rp = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rp.pop("rope_theta")
    if rp.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = rp


def main():
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)

    os.makedirs(OUT, exist_ok=True)
    dump("gpt_neox_parallel", neox(True, 1), legacy_neox)
    dump("gpt_neox_sequential", neox(False, 2))

    llama_cfg = LlamaConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=24, tie_word_embeddings=True, rms_norm_eps=1e-5,
        max_position_embeddings=64, rope_theta=1000.0,
        rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 2.0, "original_max_position_embeddings": 8},
        attn_implementation="eager",
    )
    torch.manual_seed(3)
    llama = LlamaForCausalLM(llama_cfg)
    randomize(llama, 3)
    llama.tie_weights()
    dump("llama", llama, legacy_llama)

    lin_cfg = LlamaConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=24, tie_word_embeddings=False,
        max_position_embeddings=64, rope_theta=10000.0,
        rope_scaling={"rope_type": "linear", "factor": 2.0}, attn_implementation="eager",
    )
    torch.manual_seed(4)
    lin = LlamaForCausalLM(lin_cfg)
    randomize(lin, 4)
    dump("llama_linear_rope", lin)

    qwen_cfg = Qwen2Config(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, intermediate_size=24, tie_word_embeddings=False, rms_norm_eps=1e-6,
        max_position_embeddings=64, rope_theta=10000.0, attn_implementation="eager",
    )
    torch.manual_seed(5)
    qwen = Qwen2ForCausalLM(qwen_cfg)
    randomize(qwen, 5)
    dump("qwen2", qwen, legacy_llama)

    mistral_cfg = MistralConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=24, tie_word_embeddings=False,
        max_position_embeddings=64, rope_theta=10000.0, sliding_window=None,
        attn_implementation="eager",
    )
    torch.manual_seed(6)
    mistral = MistralForCausalLM(mistral_cfg)
    randomize(mistral, 6)
    dump("mistral", mistral)

    quant_fixture()
    tiny_llama_gguf(llama, llama_cfg)


def quant_fixture():
    import gguf
    from gguf import GGMLQuantizationType as T

    rng = np.random.default_rng(7)
    w = gguf.GGUFWriter(os.path.join(OUT, "quant.gguf"), "llama")
    ref = {}
    for qt in [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q6_K]:
        block, nbytes = gguf.GGML_QUANT_SIZES[qt]
        rows, cols = 3, 512
        n_blocks = rows * cols // block
        if qt == T.F32:
            raw = rng.standard_normal((rows, cols)).astype(np.float32)
        elif qt == T.F16:
            raw = rng.standard_normal((rows, cols)).astype(np.float16)
        elif qt == T.BF16:
            raw = gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qt)
        else:
            raw = rng.integers(0, 256, size=(n_blocks, nbytes), dtype=np.uint8)
            # Overwrite the fp16 scales with finite values of moderate size.
            scales = {T.Q8_0: [0], T.Q4_0: [0], T.Q4_1: [0, 2], T.Q4_K: [0, 2],
                      T.Q6_K: [nbytes - 2]}[qt]
            for off in scales:
                v = (rng.uniform(0.01, 0.5, n_blocks) * rng.choice([-1, 1], n_blocks))
                raw[:, off:off + 2] = v.astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
            raw = raw.reshape(rows, cols // block * nbytes)
        name = f"t_{qt.name.lower()}"
        deq = gguf.quants.dequantize(raw, qt).astype(np.float32).reshape(rows, cols)
        assert np.isfinite(deq).all()
        ref[name] = torch.from_numpy(deq.copy())
        w.add_tensor(name, raw, raw_shape=raw.shape if qt in (T.F32, T.F16) else None,
                     raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    save_file(ref, os.path.join(OUT, "quant_reference.safetensors"))


def byte_vocab():
    """GPT-2's byte→unicode table, a 64-token byte-level BPE vocab and its merges."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    b2u = {b: chr(c) for b, c in zip(bs, cs)}
    singles = [b2u[b] for b in b" abcdefghijklmnopqrstuvwxyzTHE.,"]
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("a", "t"), ("Ġ", "c"), ("Ġc", "at"),
              ("i", "n"), ("Ġ", "s")]
    tokens = ["<|endoftext|>", "<|im_start|>"] + singles + ["".join(m) for m in merges]
    while len(tokens) < 64:
        tokens.append(f"<extra_{len(tokens)}>")
    return tokens, [f"{a} {b}" for a, b in merges]


def tiny_llama_gguf(model, cfg):
    """The tiny Llama as llama.cpp's converter writes it: q/k rows permuted, tied embeddings
    (no output.weight), F32 norms, F16 for one matrix, the rest F32."""
    import gguf

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads

    def permute(w, n):  # convert_hf_to_gguf.py LlamaModel.permute
        return (w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2)
                .reshape(w.shape))

    path = os.path.join(OUT, "tiny_llama.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(1000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // n_head)
    w.add_rope_scaling_type(gguf.RopeScalingType.NONE)
    w.add_vocab_size(64)
    tokens, merges = byte_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3, 3] + [1] * (len(tokens) - 2))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(0)
    w.add_add_bos_token(False)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], n_head))
        w.add_tensor(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], n_kv))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    # Reference logits of the GGUF model: the Llama fixture without rope scaling (GGUF says none).
    from transformers import LlamaForCausalLM
    c2 = type(cfg).from_dict(cfg.to_dict())
    c2.rope_parameters = {"rope_type": "default", "rope_theta": 1000.0}
    m2 = LlamaForCausalLM(c2)
    m2.load_state_dict(model.state_dict())
    m2.tie_weights()
    m2.eval()
    logits = []
    with torch.no_grad():
        for s in SEQS:
            logits.append(m2(torch.tensor([s])).logits[0].flatten().tolist())
    # Reference tokenisation: tokenizers' own byte-level BPE from the same vocab and merges.
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                               merges=[tuple(m.split(" ")) for m in merges]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    texts = ["the cat sat in the hat.", "THE cats, then this"]
    with open(os.path.join(OUT, "tiny_llama_gguf_reference.json"), "w") as f:
        json.dump({"sequences": SEQS, "logits": logits, "texts": texts,
                   "ids": [tok.encode(t).ids for t in texts]}, f)


if __name__ == "__main__":
    main()
