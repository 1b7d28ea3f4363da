"""The floor of CARVE's forward walk in Triton: how long one chunk of CARVE's sequential chain takes on
one GPU when the walk does nothing but the steps that depend on Delta (docs/KERNEL_NOTES.md, version 11).

CARVE's erase gate in chunk c depends on Delta_c = U D m_(c-1) (SPEC section 2), so chunk c + 1 cannot
start before chunk c's output mean is known. Everything that does not depend on Delta can be computed
in parallel beforehand; what is left, per chunk, with P = S D^T [K, r] carried:

    b = sigmoid(logit + Delta)           Bk = b * kg
    T = strictly_lower(Bk ki^T)          RD = (I + T)^-1 (ZD - Bk P)
    md = ms^T RD + qs^T P                Delta' = U md           P' = gc * P + ke^T RD

The tiles kg, ki, ke hold the keys with their decays folded in (without the overflow-safe factoring a
real walk needs), and every product is tf32: a real walk does at least this much, on the critical path.

LEVEL (each adds to the one before):
  0  the loads, and a trivial chain through them
  1  + the gate and Bk, reduced into the next Delta
  2  + the products, with the solve cut to its first term (I - T): less than the chain needs
  3  + the whole solve, as the nilpotent product (I - T)(I + T^2)(I + T^4)(I + T^8)(I + T^16)(I + T^32)

    python scripts/chain_floor.py            # the table; each configuration runs in its own process,
                                             # since a miscompiled one can fault and end its CUDA context
    python scripts/chain_floor.py 16 512 3 4 0   # one: walks, chunks, level, warps, DISABLE_MMA_V3
"""
import itertools
import os
import subprocess
import sys

import torch
import triton
import triton.language as tl

C, K, R = 64, 128, 16


@triton.jit
def chain_floor_kernel(logit, kg, ki, ke, zd, ms, qs, gc, U, delta_out, NT,
                       C: tl.constexpr, K: tl.constexpr, R: tl.constexpr, LEVEL: tl.constexpr):
    i = tl.program_id(0)
    rc = tl.arange(0, C)
    rk = tl.arange(0, K)
    rr = tl.arange(0, R)
    u = tl.load(U + i * K * R + rk[:, None] * R + rr[None, :])
    delta = tl.zeros([K], tl.float32)
    P = tl.zeros([K, R], tl.float32)
    lower = rc[:, None] > rc[None, :]
    for c in range(NT):
        chunk = i * NT + c
        tile = chunk * C * K + rc[:, None] * K + rk[None, :]
        lg = tl.load(logit + tile).to(tl.float32)
        kg_c = tl.load(kg + tile).to(tl.float32)
        ki_c = tl.load(ki + tile).to(tl.float32)
        ke_c = tl.load(ke + tile).to(tl.float32)
        zd_c = tl.load(zd + chunk * C * R + rc[:, None] * R + rr[None, :])
        ms_c = tl.load(ms + chunk * C + rc)
        qs_c = tl.load(qs + chunk * K + rk)
        gc_c = tl.load(gc + chunk * K + rk)
        if LEVEL == 0:
            delta = (0.5 * delta + 1e-3 * (tl.sum(lg + kg_c + ki_c + ke_c, 0) + qs_c + gc_c)
                     + tl.sum(zd_c) + tl.sum(ms_c))
        elif LEVEL == 1:
            Bk = tl.sigmoid(lg + delta[None, :]) * kg_c
            delta = 1e-3 * (tl.sum(Bk + ki_c + ke_c, 0) + qs_c + gc_c) + tl.sum(zd_c) + tl.sum(ms_c)
        else:
            Bk = tl.sigmoid(lg + delta[None, :]) * kg_c
            T = tl.where(lower, tl.dot(Bk, tl.trans(ki_c)), 0.0)
            X = zd_c - tl.dot(Bk, P)
            X = X - tl.dot(T, X)
            if LEVEL == 3:
                # (I + T)^-1 = (I - T)(I + T^2)(I + T^4)...: T is strictly lower of size 64, so T^64 = 0
                Tp = T
                for _ in tl.static_range(5):
                    Tp = tl.dot(Tp, Tp)
                    X = X + tl.dot(Tp, X)
            md = tl.sum(ms_c[:, None] * X, 0) + tl.sum(qs_c[:, None] * P, 0)
            delta = tl.sum(u * md[None, :], 1)
            P = gc_c[:, None] * P + tl.dot(tl.trans(ke_c), X)
        tl.store(delta_out + chunk * K + rk, delta)


def inputs(walks, NT, device, seed=0):
    """Random tiles at the scale of unit keys (so that I + T is well conditioned), bf16 where a walk
    would read bf16."""
    gen = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: 0.1 * torch.randn(*s, device=device, generator=gen)  # noqa: E731
    operand = torch.bfloat16 if device == "cuda" else torch.float32
    return dict(logit=r(walks, NT, C, K).to(operand), kg=r(walks, NT, C, K).to(operand),
                ki=r(walks, NT, C, K).to(operand), ke=r(walks, NT, C, K).to(operand), zd=r(walks, NT, C, R),
                ms=r(walks, NT, C), qs=r(walks, NT, K), gc=torch.rand(walks, NT, K, device=device, generator=gen),
                U=r(walks, K, R))


def walk(x, level, num_warps=4):
    """Delta after every chunk, [walks, NT, K], from the kernel at `level`."""
    walks, NT = x["zd"].shape[:2]
    delta = torch.full((walks, NT, K), float("nan"), device=x["zd"].device)
    tiles = [x[n] for n in ("logit", "kg", "ki", "ke", "zd", "ms", "qs", "gc", "U")]
    chain_floor_kernel[(walks,)](*tiles, delta, NT, C=C, K=K, R=R, LEVEL=level, num_warps=num_warps, num_stages=1)
    return delta


def reference(x):
    """The same chain in fp32 torch, with a triangular solve: what walk computes at level 3."""
    walks, NT = x["zd"].shape[:2]
    out = torch.empty(walks, NT, K)
    eye = torch.eye(C)
    for i in range(walks):
        delta, P = torch.zeros(K), torch.zeros(K, R)
        for c in range(NT):
            t = {n: x[n][i, c].float().cpu() for n in ("logit", "kg", "ki", "ke", "zd", "ms", "qs", "gc")}
            Bk = torch.sigmoid(t["logit"] + delta) * t["kg"]
            T = torch.tril(Bk @ t["ki"].T, -1)
            RD = torch.linalg.solve_triangular(eye + T, t["zd"] - Bk @ P, upper=False)
            md = t["ms"] @ RD + t["qs"] @ P
            delta = x["U"][i].float().cpu() @ md
            P = t["gc"][:, None] * P + t["ke"].T @ RD
            out[i, c] = delta
    return out


def time_one(walks, NT, level, num_warps):
    x = inputs(walks, NT, "cuda")
    walk(x, level, num_warps)
    torch.cuda.synchronize()
    return triton.testing.do_bench(lambda: walk(x, level, num_warps), warmup=25, rep=200,
                                   return_mode="median")


def row_start(walks, NT, level, warps, no_wgmma):
    """The table row's cells that name the configuration."""
    return f"| {walks} x {NT} | {level} | {warps} | {'mma.sync' if no_wgmma else 'wgmma'} | "


def main():
    if len(sys.argv) == 6:
        walks, NT, level, warps, no_wgmma = map(int, sys.argv[1:])
        ms = time_one(walks, NT, level, warps)
        print(f"{row_start(walks, NT, level, warps, no_wgmma)}{ms:.3f} | {1e3 * ms / NT:.2f} |", flush=True)
        return
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"C = {C}, K = {K}, r = {R}; median of do_bench")
    print("| walks x chunks | level | warps | products | ms | us a chunk |\n|---|---|---|---|---|---|", flush=True)
    configs = [(16, 512, level, warps, 0) for level, warps in itertools.product(range(4), (4, 8))]
    configs += [(16, 512, level, 4, 1) for level in (2, 3)] + [(32, 128, 3, 4, 0), (32, 128, 3, 4, 1)]
    for walks, NT, level, warps, no_wgmma in configs:
        env = dict(os.environ, DISABLE_MMA_V3="1" if no_wgmma else "0")
        run = subprocess.run([sys.executable, __file__, str(walks), str(NT), str(level), str(warps), str(no_wgmma)],
                             env=env, capture_output=True, text=True, timeout=300)
        row = [line for line in run.stdout.splitlines() if line.startswith("|")]
        print(row[0] if row else f"{row_start(walks, NT, level, warps, no_wgmma)}"
              f"failed: {(run.stderr.strip().splitlines() or ['?'])[-1][:80]} | |", flush=True)


if __name__ == "__main__":
    main()
