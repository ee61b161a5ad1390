"""PyTorch + transformers baseline for bench/train-throughput.ts: the same Llama-3.2-1B shape,
sequence, batch, bf16 autocast over float32 master weights, fused AdamW; eager or torch.compile.
   python3 bench/baselines/torch_train.py --batch 8 --seq 2048 --steps 10 [--compile] --out result.json
"""
import argparse, json, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM

p = argparse.ArgumentParser()
p.add_argument("--batch", type=int, default=8)
p.add_argument("--seq", type=int, default=2048)
p.add_argument("--steps", type=int, default=10)
p.add_argument("--layers", type=int, default=16)
p.add_argument("--compile", action="store_true")
p.add_argument("--out", default=None)
a = p.parse_args()

cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=a.layers,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                  rms_norm_eps=1e-5, tie_word_embeddings=True,
                  rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                                       high_freq_factor=4.0, original_max_position_embeddings=8192),
                  attn_implementation="sdpa")
torch.manual_seed(0)
model = LlamaForCausalLM(cfg).cuda()
opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)
step_model = torch.compile(model) if a.compile else model
ids = torch.randint(3, 128000, (a.batch, a.seq), device="cuda")

def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = step_model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

for _ in range(3):
    step()
torch.cuda.synchronize()
torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter()
for _ in range(a.steps):
    loss = step()
torch.cuda.synchronize()
ms = (time.perf_counter() - t0) / a.steps * 1000
n = sum(p.numel() for p in model.parameters())
tps = a.batch * a.seq / ms * 1000
flops = (6 * n + 12 * a.layers * 2048 * a.seq) * tps / 1e12
r = {"framework": "torch.compile" if a.compile else "pytorch eager", "batch": a.batch, "sequence": a.seq,
     "step ms": ms, "tokens/s": round(tps), "TFLOP/s": flops, "peak GiB": torch.cuda.max_memory_allocated() / 2**30,
     "loss": loss.item(), "device": torch.cuda.get_device_name(), "torch": torch.__version__}
print(json.dumps(r))
if a.out:
    json.dump(r, open(a.out, "w"))
