"""Reads what scripts/gpu/interop.ts wrote with readers this project did not write (issue 6):

- tensorstore (zarr3 driver, crc32c codec) opens every array of the Magix checkpoint, float32 and
  bfloat16, and must get the fixture's weights bit for bit (bfloat16: round-to-nearest-even of them,
  as torch casts);
- transformers loads the float32 and bfloat16 `saveHuggingFace` exports: the weights must equal the
  fixture's (bf16: its cast), and the float32 logits must match Magix's and the fixture's reference.

    python scripts/gpu/interop.py /tmp/interop [out.json]
"""

import json
import os
import sys
from importlib.metadata import version

import numpy as np
import tensorstore as ts
import torch
import transformers
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

root = sys.argv[1]
out_json = sys.argv[2] if len(sys.argv) > 2 else os.path.join(root, "interop.json")
fixtures = os.path.join(os.path.dirname(__file__), "..", "..", "test", "fixtures", "hf")


def rel_err(a, b):
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def bf16_bits(x):
    return torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16).view(torch.int16).numpy()


rows = []
report = {"tensorstore": version("tensorstore"), "transformers": transformers.__version__, "families": {}}
for family in ["llama", "mistral", "gemma"]:
    d = os.path.join(root, family)
    magix = json.load(open(os.path.join(d, "magix.json")))
    weights = load_file(os.path.join(fixtures, family, "model.safetensors"))
    ref = load_file(os.path.join(fixtures, family, "reference.safetensors"))

    # tensorstore over the checkpoint
    arrays, chunks, mismatched = 0, 0, []
    for name, info in magix["arrays"].items():
        want = weights[name]
        for item in ["params", "bf16"]:
            path = os.path.join(d, "ckpt", "1", item, name)
            meta = json.load(open(os.path.join(path, "zarr.json")))
            grid = meta["chunk_grid"]["configuration"]["chunk_shape"]
            chunks += int(np.prod([-(-s // c) for s, c in zip(meta["shape"], grid)]))
            arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}, open=True).result()
            got = arr.read().result()
            arrays += 1
            if item == "params":
                same = got.dtype == np.float32 and np.array_equal(got.view(np.uint32), want.view(np.uint32))
            else:
                same = str(got.dtype) == "bfloat16" and np.array_equal(got.view(np.int16), bf16_bits(want))
            if not same or list(got.shape) != list(info["shape"]):
                mismatched.append(f"{item}/{name}")

    # transformers over the exports
    inputs = {
        "input_ids": torch.from_numpy(ref["input_ids"]).long(),
        "attention_mask": torch.from_numpy(ref["attention_mask"]).long(),
        "position_ids": torch.from_numpy(ref["position_ids"]).long(),
    }
    out = {}
    for dtype, tdtype in [("float32", torch.float32), ("bfloat16", torch.bfloat16)]:
        model = AutoModelForCausalLM.from_pretrained(
            os.path.join(d, f"hf-{dtype}"), dtype=tdtype, attn_implementation="eager"
        ).eval()
        sd = model.state_dict()
        differ = []
        for name, w in weights.items():
            t = sd[name]
            same = (
                t.dtype == torch.float32 and np.array_equal(t.numpy().view(np.uint32), w.view(np.uint32))
                if dtype == "float32"
                else t.dtype == torch.bfloat16 and np.array_equal(t.view(torch.int16).numpy(), bf16_bits(w))
            )
            if not same:
                differ.append(name)
        with torch.no_grad():
            logits = model(**inputs).logits.float().numpy()
        out[dtype] = {
            "weightsDiffer": differ,
            "logitsVsReference": rel_err(logits, ref["logits"]),
            "logitsVsMagix": rel_err(logits, np.array(magix["logits"], dtype=np.float32)),
        }
    ok = (
        not mismatched
        and not out["float32"]["weightsDiffer"]
        and not out["bfloat16"]["weightsDiffer"]
        and out["float32"]["logitsVsMagix"] < 1e-5
        and out["float32"]["logitsVsReference"] < 1e-5
        and out["bfloat16"]["logitsVsReference"] < 5e-2
    )
    report["families"][family] = {
        "tensorstore": {"arrays": arrays, "chunks": chunks, "mismatched": mismatched},
        "transformers": out,
        "ok": ok,
    }
    rows.append(
        (
            family,
            f"{arrays - len(mismatched)}/{arrays} ({chunks} chunks)",
            f"{out['float32']['logitsVsMagix']:.1e}",
            f"{out['float32']['logitsVsReference']:.1e}",
            f"{out['bfloat16']['logitsVsReference']:.1e}",
            "ok" if ok else "FAIL",
        )
    )

json.dump(report, open(out_json, "w"), indent=2)
head = ("family", "tensorstore bit-exact", "f32 vs magix", "f32 vs ref", "bf16 vs ref", "")
widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
for r in [head] + rows:
    print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))
print(f"tensorstore {report['tensorstore']}, transformers {transformers.__version__}; wrote {out_json}")
sys.exit(0 if all(f["ok"] for f in report["families"].values()) else 1)
