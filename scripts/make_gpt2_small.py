"""Dev-time check that infl loads a real-size GPT-2 (124M shapes) exactly as transformers does.

No network: the checkpoint is a randomly initialised GPT2LMHeadModel with the default
GPT2Config (12 layers, width 768, vocab 50257, 1024 positions) -- the shapes, names and layout of
the released `gpt2` checkpoint. Writes DIR/config.json, DIR/model.safetensors and
DIR/reference_logits.safetensors (logits of a fixed 64-token sequence, key `logits`, plus `ids` as f32).

    /work/venv-fixture/bin/python scripts/make_gpt2_small.py /tmp/gpt2-small
    INFL_GPT2_SMALL=/tmp/gpt2-small cargo test --release --test gpt2_small -- --ignored --nocapture
"""
import sys

import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

out = sys.argv[1]
torch.manual_seed(0)
torch.set_num_threads(2)
model = GPT2LMHeadModel(GPT2Config()).eval()
model.save_pretrained(out, safe_serialization=True)
ids = torch.arange(64) * 787 % 50257
with torch.no_grad():
    logits = model(ids[None]).logits[0].float().contiguous()
save_file({"logits": logits, "ids": ids.to(torch.float32)}, f"{out}/reference_logits.safetensors")
print(f"wrote {out}: {sum(p.numel() for p in model.parameters())} parameters")
