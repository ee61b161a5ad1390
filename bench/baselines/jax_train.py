"""JAX baseline for bench/train-throughput.ts: the same Llama-3.2-1B shape (vocabulary 128256,
16 layers, width 2048, 32 heads / 8 KV heads of 64, tied embeddings, llama3 RoPE scaling), bf16
compute over float32 master weights, cuDNN flash attention (jax.nn.dot_product_attention),
AdamW with global-norm clipping, one jitted step with donated buffers, layers under lax.scan.
Plain JAX (no flax/optax), so it runs wherever jax[cuda] does. The batch is the fixed structured
one of the Magix benchmark's shape (random ids: throughput does not depend on the values).
   python3 bench/baselines/jax_train.py --batch 8 --seq 2048 --steps 10 --out result.json
"""
import argparse, json, math, os, time
import numpy as np

# The default 75% preallocation is too little for batch 8; let XLA use the GPU as the others do.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
import jax
import jax.numpy as jnp

p = argparse.ArgumentParser()
p.add_argument("--batch", type=int, default=8)
p.add_argument("--seq", type=int, default=2048)
p.add_argument("--steps", type=int, default=10)
p.add_argument("--layers", type=int, default=16)
p.add_argument("--out", default=None)
a = p.parse_args()
B, T, L = a.batch, a.seq, a.layers
V, D, F, H, KV, HD = 128256, 2048, 8192, 32, 8, 64
f32, bf16 = jnp.float32, jnp.bfloat16


def inv_freq():
    # Llama 3.x rope_scaling (factor 32, low 1, high 4, original 8192), as transformers computes it.
    inv = 1.0 / (500000.0 ** (np.arange(0, HD, 2) / HD))
    factor, low, high, old = 32.0, 1.0, 4.0, 8192.0
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return np.where(medium, smoothed, scaled)


ang = np.arange(T)[:, None] * inv_freq()[None, :]
COS = jnp.asarray(np.cos(np.concatenate([ang, ang], -1)), f32)[None, :, None, :]
SIN = jnp.asarray(np.sin(np.concatenate([ang, ang], -1)), f32)[None, :, None, :]


def rope(x):
    x32 = x.astype(f32)
    half = jnp.concatenate([-x32[..., HD // 2:], x32[..., :HD // 2]], -1)
    return (x32 * COS + half * SIN).astype(bf16)


def rms(x, w):
    x32 = x.astype(f32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-5) * w).astype(bf16)


def init(key):
    ks = jax.random.split(key, 8)
    n = lambda k, shape: 0.02 * jax.random.normal(k, shape, f32)
    return {
        "embed": n(ks[0], (V, D)),
        "norm": jnp.ones((D,), f32),
        "layers": {
            "ln1": jnp.ones((L, D), f32), "ln2": jnp.ones((L, D), f32),
            "wq": n(ks[1], (L, D, H * HD)), "wk": n(ks[2], (L, D, KV * HD)), "wv": n(ks[3], (L, D, KV * HD)),
            "wo": n(ks[4], (L, H * HD, D)), "wg": n(ks[5], (L, D, F)), "wu": n(ks[6], (L, D, F)),
            "wd": n(ks[7], (L, F, D)),
        },
    }


def layer(h, w):
    c = lambda x: x.astype(bf16)
    x = rms(h, w["ln1"])
    q = rope((x @ c(w["wq"])).reshape(B, T, H, HD))
    k = rope((x @ c(w["wk"])).reshape(B, T, KV, HD))
    v = (x @ c(w["wv"])).reshape(B, T, KV, HD)
    o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    h = h + (o.reshape(B, T, H * HD) @ c(w["wo"])).astype(f32)
    x = rms(h, w["ln2"])
    g = jax.nn.silu(x @ c(w["wg"])) * (x @ c(w["wu"]))
    return h + (g @ c(w["wd"])).astype(f32), None


def loss_fn(params, ids, targets):
    h = params["embed"][ids]
    h, _ = jax.lax.scan(layer, h, params["layers"])
    x = rms(h, params["norm"])
    logits = (x @ params["embed"].astype(bf16).T).astype(f32)
    lse = jax.nn.logsumexp(logits, -1)
    picked = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return jnp.mean(lse - picked)


LR, B1, B2, EPS, WD, CLIP = 3e-4, 0.9, 0.999, 1e-8, 0.1, 1.0


def step(params, m, v, count, ids, targets):
    loss, grads = jax.value_and_grad(loss_fn)(params, ids, targets)
    norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
    scale = jnp.minimum(1.0, CLIP / (norm + 1e-6))
    count = count + 1
    m = jax.tree.map(lambda m, g: B1 * m + (1 - B1) * g * scale, m, grads)
    v = jax.tree.map(lambda v, g: B2 * v + (1 - B2) * (g * scale) ** 2, v, grads)
    bc1, bc2 = 1 - B1 ** count, 1 - B2 ** count
    params = jax.tree.map(lambda p, m, v: p - LR * ((m / bc1) / (jnp.sqrt(v / bc2) + EPS) + WD * p), params, m, v)
    return params, m, v, count, loss


step = jax.jit(step, donate_argnums=(0, 1, 2, 3))
params = init(jax.random.PRNGKey(0))
m = jax.tree.map(jnp.zeros_like, params)
v = jax.tree.map(jnp.zeros_like, params)
count = jnp.zeros((), f32)
ids = jax.random.randint(jax.random.PRNGKey(1), (B, T), 3, 128000)
targets = jnp.roll(ids, -1, axis=1)
t0 = time.perf_counter()
for _ in range(3):
    params, m, v, count, loss = step(params, m, v, count, ids, targets)
loss.block_until_ready()
compile_s = time.perf_counter() - t0
t0 = time.perf_counter()
for _ in range(a.steps):
    params, m, v, count, loss = step(params, m, v, count, ids, targets)
loss.block_until_ready()
ms = (time.perf_counter() - t0) / a.steps * 1000
n = sum(x.size for x in jax.tree.leaves(params))
tps = B * T / ms * 1000
stats = jax.devices()[0].memory_stats() or {}
r = {"framework": "jax (cudnn attention)", "batch": B, "sequence": T, "step ms": ms, "tokens/s": round(tps),
     "TFLOP/s": (6 * n + 12 * L * D * T) * tps / 1e12, "peak GiB": stats.get("peak_bytes_in_use", 0) / 2**30,
     "loss": float(loss), "warmup s": compile_s, "device": jax.devices()[0].device_kind, "jax": jax.__version__}
print(json.dumps(r))
if a.out:
    json.dump(r, open(a.out, "w"))
