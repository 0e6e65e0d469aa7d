"""Random-weight checkpoints in real models' shapes, for `bench/inspect_accuracy.sh` (infl
inspect's memory estimate against the measured peak; docs/benchmarks.md).

    python bench/make_memmodels.py OUT_DIR NAME [NAME ...]

NAME: one of the keys of `specs` below. Needs torch and transformers; writes OUT_DIR/NAME.
"""
import sys, torch
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM
torch.manual_seed(0); torch.set_num_threads(1)
specs = {
 "gpt2-s": (GPT2LMHeadModel, GPT2Config(n_layer=6, n_embd=512, n_head=8)),
 "gpt2-124m": (GPT2LMHeadModel, GPT2Config()),
 "neox-70m": (GPTNeoXForCausalLM, GPTNeoXConfig(vocab_size=50304, hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048, rotary_pct=0.25, max_position_embeddings=2048, use_parallel_residual=True)),
 "neox-160m": (GPTNeoXForCausalLM, GPTNeoXConfig(vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, rotary_pct=0.25, max_position_embeddings=2048, use_parallel_residual=True)),
 "llama-135m": (LlamaForCausalLM, LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True)),
 "llama-360m": (LlamaForCausalLM, LlamaConfig(vocab_size=49152, hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5, max_position_embeddings=2048, tie_word_embeddings=True)),
}
out = sys.argv[1]
for name in sys.argv[2:]:
    cls, cfg = specs[name]
    m = cls(cfg)
    m.save_pretrained(f"{out}/{name}", safe_serialization=True)
    print(name, sum(p.numel() for p in m.parameters()))
