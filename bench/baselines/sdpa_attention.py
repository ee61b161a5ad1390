"""PyTorch scaled_dot_product_attention, causal, bf16, at the shapes bench/attention.ts measures:
forward, backward and both, timed with CUDA events (median of --reps runs after warm-up), for the
flash backend (the issue's reference) and cuDNN where it runs. Grouped-query attention through
enable_gqa (no copies of K and V). Prints one JSON document on stdout.

    python bench/baselines/sdpa_attention.py --shapes 8,2048,32,8,64 8,2048,16,8,128 --reps 20
"""

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

p = argparse.ArgumentParser()
p.add_argument("--shapes", nargs="+", required=True, help="B,T,Hq,Hkv,hd")
p.add_argument("--reps", type=int, default=20)
a = p.parse_args()


def median_ms(fn, reps, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2]


rows = []
for spec in a.shapes:
    B, T, Hq, Hkv, hd = map(int, spec.split(","))
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda h: torch.randn(B, h, T, hd, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    q, k, v = mk(Hq), mk(Hkv), mk(Hkv)
    do = torch.randn(B, Hq, T, hd, device="cuda", dtype=torch.bfloat16, generator=g)
    for name, backend in [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)]:
        row = {"shape": [B, T, Hq, Hkv, hd], "backend": name}
        try:
            with sdpa_kernel(backend):
                fwd = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                out = fwd()
                bwd = lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True)

                def both():
                    o = fwd()
                    torch.autograd.grad(o, (q, k, v), do)

                row.update(forwardMs=median_ms(fwd, a.reps), backwardMs=median_ms(bwd, a.reps), bothMs=median_ms(both, a.reps))
        except Exception as e:  # a backend that refuses the shape shows as such
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append(row)
        torch.cuda.empty_cache()

print(json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name(0), "rows": rows}))
