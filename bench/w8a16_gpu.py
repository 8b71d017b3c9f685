"""W8A16 GEMM (``kernels/w8a16_gemm.py``) on a GPU: correctness at the LLM decode shapes, then timing against bf16
``F.linear`` and ``torch.ops.aten._weight_int8pack_mm``.

Shapes (N, K) with M = 1, 8, 32: Llama-3-8B q/k/v stacked (6144, 4096), o_proj (4096, 4096), gate/up stacked
(28672, 4096) with swiglu, down_proj (4096, 14336), lm_head (128256, 4096); Qwen2-1.5B q/k/v stacked (2048,
1536), o_proj (1536, 1536), gate/up (17920, 1536) swiglu, down_proj (1536, 8960), lm_head (151936, 1536).

Timing: a CUDA graph of back-to-back launches cycling over enough copies of the weights (≥ 256 MB in all,
several times the L2) that every launch reads its weights from HBM, as consecutive layers of a decode step
do; µs per launch = graph replay time / launches. GB/s counts the weight bytes alone (int8: N·K; the bf16
``F.linear``: 2·N·K). Peak: 4.8 TB/s (H200) or 3.35 TB/s (H100 SXM), the datasheet HBM bandwidths.

    python bench/w8a16_gpu.py                      # correctness + table with the kernel's own config choice
    python bench/w8a16_gpu.py --sweep --out DIR    # also search launch configs per shape (for pick_config);
                                                   # the table then shows each case's winner
    python bench/w8a16_gpu.py --gemv-only --out DIR  # only: pick_config's (tl.dot) config against <= 12 GEMV
                                                   # configs per shape at M = 1 (--gemv-ms 1,2,4 for more rows)

GEMV (``W8A16Config.gemv``, M <= ``GEMV_MAX_M``): ``--sweep`` adds :func:`gemv_candidates` to its M = 1 cases (and
the M of ``--gemv-ms`` beyond MS, against pick_config's config) and logs each case's best tl.dot and best GEMV
config; ``--gemv-only`` runs just that comparison (plus each GEMV config's SQNR against float64) and prints
ready-made ``_GEMV_TUNED`` entries for the shapes where a GEMV config won by more than 3 %. Both stop starting
new cases once ``--budget`` seconds have passed since the start.

The configs are compiled in parallel processes first (Triton's on-disk cache is shared), so a sweep of ~100
specializations and ~650 timings took 23 s on an H200 host. Its results (sweep.jsonl) are what
``w8a16_gemm._TUNED`` and ``_rule`` were read from.
    TRITON_INTERPRET=1 python bench/w8a16_gpu.py --smoke   # the script's own logic on CPU, tiny shapes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# kernels/ straight from the checkout (it imports nothing of fxquant; installed, it is fxquant.kernels)
from kernels import w8a16_gemm as kw  # noqa: E402

LLAMA = [(6144, 4096, "none", "L3-8B qkv"), (4096, 4096, "none", "L3-8B o_proj"), (28672, 4096, "swiglu", "L3-8B gate_up"),
         (4096, 14336, "none", "L3-8B down"), (128256, 4096, "none", "L3-8B lm_head")]
QWEN = [(2048, 1536, "none", "Q2-1.5B qkv"), (1536, 1536, "none", "Q2-1.5B o_proj"), (17920, 1536, "swiglu", "Q2-1.5B gate_up"),
        (1536, 8960, "none", "Q2-1.5B down"), (151936, 1536, "none", "Q2-1.5B lm_head")]
SHAPES = LLAMA + QWEN
MS = (1, 8, 32)
ROTATE_BYTES = 256 << 20
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    noise = (ref - out).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(ref.pow(2).sum().item() / noise)


def make_weights(n, k, device, gen, copies=1):
    w = [torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device, generator=gen) for _ in range(copies)]
    s = torch.rand(n, 1, device=device, generator=gen) * 2e-3 + 1e-4
    return w, s


def f64_reference(x, w, s, bias, act):
    """(x · (w·s)ᵀ + b) in float64, then the activation (the SQNR reference)."""
    y = x.double() @ (w.double() * s.double()).T
    if bias is not None:
        y = y + bias.double()
    return kw.activation_torch(y, act)


# ------------------------------------------------------------------------------------------- timing
def graph_time_us(calls: list, replays: int = 0) -> float:
    """µs per call of a CUDA graph holding ``calls`` back to back (each a no-argument callable)."""
    for c in calls:  # warm: compiles, allocates the split-K counters outside the graph
        c()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=stream):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    g.replay()
    torch.cuda.synchronize()
    one = time.perf_counter() - t
    replays = replays or max(3, min(50, int(0.006 / max(one, 1e-6))))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    del g
    return start.elapsed_time(end) * 1e3 / (replays * len(calls))


def copies_for(nbytes: int) -> int:
    return max(1, math.ceil(ROTATE_BYTES / nbytes))


def launches_for(copies: int) -> int:
    return max(copies, 8)


# ------------------------------------------------------------------------------------------- checks
FAILS: list = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        FAILS.append(what)


def correctness(shapes, ms, device, cfg_fn=None, act_shapes=((4096, 14336), (2048, 1536))):
    """SQNR of the kernel against float64 at every shape and M (bf16 x, the decode case), plus fp16 / fp32 x,
    bias, every activation, graph replay == eager and split-K determinism on a subset."""
    gen = torch.Generator(device=device).manual_seed(0)
    for n_w, k, act, name in shapes:
        (w,), s = make_weights(n_w, k, device, gen)
        bias = torch.randn(n_w, device=device, generator=gen) * 0.1
        for m in ms:
            x = torch.randn(m, k, device=device, generator=gen).bfloat16()
            cfg = cfg_fn(m, n_w, k, act) if cfg_fn else None
            y = kw.w8a16_gemm(x, w, s, None, act, config=cfg)
            ref = f64_reference(x, w, s, None, act)
            q = sqnr_db(ref, y)
            r = kw.w8a16_gemm_reference(x, w, s, None, act)
            check(y.dtype == torch.bfloat16 and q >= 40 and sqnr_db(ref, r) - q < 3,
                  f"{name} M={m} bf16: SQNR {q:.1f} dB (reference's {sqnr_db(ref, r):.1f})")
            if m == 8 and (n_w, k) in ((4096, 14336), (28672, 4096), (1536, 8960)):
                y2 = kw.w8a16_gemm(x, w, s, None, act, config=cfg)
                check(torch.equal(y, y2), f"{name} M={m}: two launches bit-identical (split-K reduces in split order)")
                for xd, od in ((torch.float16, torch.float16), (torch.float32, torch.float32), (torch.bfloat16, torch.float32)):
                    xx = x.to(xd)
                    yy = kw.w8a16_gemm(xx, w, s, bias, act, od, config=cfg)
                    rr = f64_reference(xx, w, s, bias, act)
                    qq = sqnr_db(rr, yy)
                    want = {torch.float16: 55, torch.float32: 80, torch.bfloat16: 40}[od if xd != torch.bfloat16 else torch.bfloat16]
                    check(yy.dtype == od and qq >= want, f"{name} M={m} x {xd} -> {od} +bias: SQNR {qq:.1f} dB >= {want}")
    # every activation at one split-K shape and one plain one, graph replay against eager
    for n_w, k in act_shapes:
        (w,), s = make_weights(n_w, k, device, gen)
        bias = torch.randn(n_w, device=device, generator=gen) * 0.1
        x = torch.randn(3, k, device=device, generator=gen).bfloat16()
        for act in kw.ACTIVATIONS:
            y = kw.w8a16_gemm(x, w, s, bias, act)
            q = sqnr_db(f64_reference(x, w, s, bias, act), y)
            check(q >= 40, f"{n_w}x{k} M=3 {act} +bias: SQNR {q:.1f} dB")
        if device.type == "cuda":
            out = {}
            g = torch.cuda.CUDAGraph()
            kw.w8a16_gemm(x, w, s, bias, "silu")
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.graph(g, stream=stream):
                out["y"] = kw.w8a16_gemm(x, w, s, bias, "silu")
            x.copy_(torch.randn(3, k, device=device, generator=gen).bfloat16())
            for _ in range(3):
                g.replay()
            torch.cuda.synchronize()
            check(torch.equal(out["y"], kw.w8a16_gemm(x, w, s, bias, "silu")), f"{n_w}x{k} M=3: graph replay == eager")


# ------------------------------------------------------------------------------------------- table
def bench_case(n_w, k, act, m, device, gen, cfg=None, baselines=True):
    """{'ours': µs, 'linear': µs, 'int8pack': µs or None} at one shape."""
    copies = copies_for(n_w * k)
    ws, s = make_weights(n_w, k, device, gen, copies)
    x = torch.randn(m, k, device=device, generator=gen).bfloat16()
    L = launches_for(copies)
    res = {"ours": graph_time_us([lambda i=i: kw.w8a16_gemm(x, ws[i % copies], s, None, act, config=cfg) for i in range(L)])}
    if baselines:
        del ws
        bcopies = copies_for(2 * n_w * k)
        wb = [torch.randn(n_w, k, device=device, generator=gen).bfloat16() for _ in range(bcopies)]
        bL = launches_for(bcopies)
        res["linear"] = graph_time_us([lambda i=i: F.linear(x, wb[i % bcopies]) for i in range(bL)])
        del wb
        res["int8pack"] = None
        wq = [torch.randint(-127, 128, (n_w, k), dtype=torch.int8, device=device, generator=gen) for _ in range(copies)]
        sb = s.reshape(-1).bfloat16()
        try:
            torch.ops.aten._weight_int8pack_mm(x, wq[0], sb)
            res["int8pack"] = graph_time_us([lambda i=i: torch.ops.aten._weight_int8pack_mm(x, wq[i % copies], sb) for i in range(L)])
        except Exception as e:  # noqa: BLE001 - not every build has a CUDA kernel for it
            res["int8pack_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:90]}"
    return res


def table(device, peak, out_dir, cfg_fn=None, baselines=True):
    gen = torch.Generator(device=device).manual_seed(1)
    rows = []
    hdr = f"{'shape':<16} {'N x K':>13} {'M':>3} {'cfg':<26} {'us':>7} {'GB/s':>6} {'%peak':>6} {'linear us':>9} {'int8pack us':>11} {'vs linear':>9}"
    print(hdr)
    for n_w, k, act, name in SHAPES:
        for m in MS:
            cfg = cfg_fn(m, n_w, k, act) if cfg_fn else kw.pick_config(
                m, n_w // 2 if act == "swiglu" else n_w, k, act == "swiglu", kw._num_sms(device))
            r = bench_case(n_w, k, act, m, device, gen, cfg, baselines)
            gbs = n_w * k / r["ours"] / 1e3
            c = cfg_str(cfg)
            lin, i8 = r.get("linear"), r.get("int8pack")
            lin_s = "-" if lin is None else f"{lin:9.2f}"
            i8_s = "-" if i8 is None else f"{i8:11.2f}"
            ratio = "" if lin is None else f"{lin / r['ours']:8.2f}x"
            print(f"{name:<16} {f'{n_w}x{k}':>13} {m:>3} {c:<26} {r['ours']:7.2f} {gbs:6.0f} {100 * gbs / peak:5.1f}% "
                  f"{lin_s:>9} {i8_s:>11} {ratio:>9}", flush=True)
            rows.append(dict(name=name, n=n_w, k=k, act=act, m=m, cfg=cfg._asdict(), gbs=gbs, pct=100 * gbs / peak, **r))
    if out_dir:
        with open(os.path.join(out_dir, "table.json"), "w") as f:
            json.dump(rows, f)
    errs = {r.get("int8pack_error") for r in rows} - {None}
    if errs:
        print("_weight_int8pack_mm:", *errs)
    return rows


# ------------------------------------------------------------------------------------------- sweep
def candidates(m, n_w, k, gated, num_sms):
    """Launch configs to try at one case (split-K values where the tiles alone leave SMs idle)."""
    n = n_w // 2 if gated else n_w
    if gated:
        kinds = [(16, 256, 4, 4), (16, 512, 4, 4), (32, 256, 4, 4), (64, 256, 8, 4)]
    else:
        kinds = [(16, 512, 4, 4), (32, 256, 4, 4), (32, 512, 4, 4), (64, 256, 4, 4), (64, 512, 4, 4), (128, 256, 8, 4)]
    kinds = [kd + (False,) for kd in kinds]
    if m > 1:  # the transposed product with W tiles of 64 / 128 rows: W on the MMA's M side, where sm_90's
        # wgmma (64 rows a warpgroup) takes it from registers after the conversion; x rows are the MMA's N (8..32)
        kinds += [(64, 128, 4, 4, True), (64, 256, 4, 3, True), (128, 128, 4, 3, True), (128, 128, 8, 3, True)]
    if m > 8:  # M = 32: fewer stages (two programs an SM: 48 KB a stage gated at 64x256) and shorter K blocks
        kinds += ([(64, 256, 8, 2, False), (64, 256, 8, 3, False), (64, 128, 8, 4, False), (64, 128, 4, 3, False),
                   (128, 128, 8, 3, False)] if gated else
                  [(64, 256, 4, 2, False), (64, 256, 4, 3, False), (128, 256, 8, 3, False), (128, 128, 8, 4, False)])
        if not gated:  # wide W tiles with deep split-K: x [32, BLOCK_K] is re-read per W tile (as many bytes as a
            # 64-row int8 W tile), so wider tiles halve that traffic; split-K up to 16 keeps the SMs fed
            kinds += [(128, 128, 4, 3, False), (128, 64, 4, 4, False), (128, 128, 4, 4, False), (256, 64, 8, 3, False),
                      (256, 128, 8, 3, False), (256, 64, 8, 4, False), (64, 128, 4, 4, False), (128, 256, 4, 3, False)]
    splits = (1, 2, 3, 4, 6, 8, 12, 16) if m > 8 and not gated else (1, 2, 3, 4, 6, 8)
    out = []
    for bn, bk, w, st, swap in kinds:
        tiles = math.ceil(m / kw.block_m(m)) * math.ceil(n / bn)
        kblocks = math.ceil(k / bk)
        for split in splits:
            # gated: split-K only at M > 8 and against wave quantization (fewer than 2 tiles per SM)
            if split > 1 and (gated and (m <= 8 or split > 2) or tiles * split > 6 * num_sms or kblocks < 2 * split
                              or tiles >= 2 * num_sms):
                continue
            out.append(kw.W8A16Config(bn, bk, split, w, st, swap=swap, cvt=0))
    for bn, bk in ((16, 512), (32, 256)):  # the transposed product, against its plain twin above
        out.append(kw.W8A16Config(bn, bk, 1, 4, 5, swap=True, cvt=0))
    return out


def extra_candidates(m, n_w, k, gated):
    """A/B pairs: bit-pattern conversion (cvt=1) and split_mode 'reduce' (two kernels)."""
    out = [kw.W8A16Config(32, 256, 1, 4, 5, cvt=1, swap=False)]
    if not gated and n_w <= 6144:
        for bn in (32, 64):
            for mode in ("serial", "reduce"):
                out.append(kw.W8A16Config(bn, 256, 4, 4, 5, swap=False, cvt=0, split_mode=mode))
    return out


def cfg_str(cfg) -> str:
    """A config in a few characters: n, k, s(plit), w(arps), p(stages); T swap, c bit-pattern cvt, R split_mode
    reduce; G1 / G2 the GEMV kernel (per-block / deferred reduction), P its register prefetch."""
    g = f" G{int(cfg.gemv)}{'P' if cfg.prefetch else ''}" if cfg.gemv else ""
    return (f"n{cfg.block_n} k{cfg.block_k} s{cfg.split_k} w{cfg.num_warps} p{cfg.num_stages}{' T' if cfg.swap and not cfg.gemv else ''}"
            f"{' c' if cfg.cvt else ''}{' R' if cfg.split_mode == 'reduce' else ''}{g}")


def gemv_split(n, k, bn, bk, num_sms, per_sm=4):
    """Split-K of a GEMV config: enough programs for ``per_sm`` per SM (a GEMV program is light: ~40-120
    registers, little shared memory, so several share an SM and keep more W loads in flight), each split at
    least 2 K blocks where K has 4 or more."""
    tiles = math.ceil(n / bn)
    kblocks = math.ceil(k / bk)
    cap = kblocks // 2 if kblocks >= 4 else kblocks
    return max(1, min(math.ceil(per_sm * num_sms / tiles), cap, kw._COUNTER_SLOTS // tiles or 1))


# GEMV configs swept at M = 1: (block_n, block_k, num_warps, num_stages, gemv, prefetch). W bytes per K step: BLOCK_N ·
# BLOCK_K (twice that gated, whose BLOCK_N is halved). num_stages > 1 pipelines the K loop with cp.async (Triton 3.9
# for sm_90: no layout conversion left in the loop); prefetch double-buffers W in registers instead; gemv 2 keeps
# [BLOCK_N, BLOCK_K] fp32 partial products (BLOCK_K 1024: a warp's 512-byte row slice, no cross-warp reduction per
# step). Compiled with Triton 3.9 for sm_90 (ptxas): 40-160 registers, no spills.
GEMV_KINDS_M1 = [(16, 512, 4, 1, 1, False), (16, 512, 4, 1, 1, True), (16, 512, 4, 2, 1, False), (16, 512, 4, 3, 1, False),
                 (8, 512, 4, 4, 1, False), (32, 256, 4, 3, 1, False), (32, 256, 4, 1, 1, True), (8, 1024, 4, 1, 2, False),
                 (8, 1024, 4, 1, 2, True), (16, 1024, 8, 3, 2, False), (64, 256, 8, 1, 1, True)]
# M = 2..4 (one accumulator per row: gemv 2 would hold BLOCK_M [BLOCK_N, BLOCK_K] fp32 tiles and spill)
GEMV_KINDS_MN = [(16, 512, 4, 1, 1, True), (16, 512, 4, 2, 1, False), (16, 512, 4, 3, 1, False), (8, 512, 4, 4, 1, False),
                 (32, 256, 4, 3, 1, False)]


def gemv_candidates(m, n_w, k, gated, num_sms):
    """At most 12 GEMV configs for one case (M <= GEMV_MAX_M): the kinds above with the split-K of
    :func:`gemv_split`, plus, where that split is > 1, the pipelined 16x512 kind at twice the split."""
    n = n_w // 2 if gated else n_w
    out = []
    for bn, bk, w, st, g, pf in (GEMV_KINDS_M1 if m == 1 else GEMV_KINDS_MN):
        bn = max(4, bn // 2) if gated else bn
        split = gemv_split(n, k, bn, bk, num_sms)
        out.append(kw.W8A16Config(bn, bk, split, w, st, swap=False, cvt=1, gemv=g, prefetch=pf))
    twin = out[3] if m == 1 else out[2]
    more = gemv_split(n, k, twin.block_n, twin.block_k, num_sms, per_sm=8)
    if twin.split_k > 1 and more > twin.split_k:
        out.append(twin._replace(split_k=more))
    return out[:12]


def compile_key(n_w, k, act, m, cfg, xdtype):
    return (str(xdtype), m == 1, m % 16 == 0, kw.gemv_block_m(m) if cfg.gemv else kw.block_m(m), m % kw.gemv_block_m(m) == 0
            if cfg.gemv else 0, act, k % cfg.block_k == 0, cfg.split_k > 1, cfg.split_mode, cfg.block_n, cfg.block_k,
            cfg.num_warps, cfg.num_stages, cfg.swap, cfg.cvt, int(cfg.gemv), bool(cfg.prefetch), n_w % 16, k % 16)


def _precompile_worker(jobs):
    torch.cuda.set_device(0)
    gen = torch.Generator(device="cuda").manual_seed(0)
    cur, w, s = None, None, None
    done = 0
    for n_w, k, act, m, cfg, xd in jobs:
        if cur != (n_w, k):
            (w,), s = make_weights(n_w, k, torch.device("cuda"), gen)
            cur = (n_w, k)
        x = torch.randn(m, k, device="cuda", generator=gen).to(getattr(torch, xd))
        try:
            kw.w8a16_gemm(x, w, s, None, act, config=kw.W8A16Config(**cfg))
            done += 1
        except Exception as e:  # noqa: BLE001 - reported by the sweep when it measures this config
            print("compile failed", cfg, type(e).__name__, str(e)[:200], flush=True)
    torch.cuda.synchronize()
    return done


def precompile(jobs, procs):
    """Compile every distinct specialization in ``procs`` processes (Triton's on-disk cache is shared, so the
    sweep then loads each binary instead of compiling it)."""
    import multiprocessing as mp

    uniq = {}
    for j in jobs:
        uniq.setdefault(compile_key(*j[:5], j[5]), (j[0], j[1], j[2], j[3], j[4]._asdict(), str(j[5]).replace("torch.", "")))
    todo = sorted(uniq.values(), key=lambda j: (j[0], j[1]))
    chunks = [todo[i::procs] for i in range(procs)]
    log(f"precompiling {len(todo)} specializations in {procs} processes")
    with mp.get_context("spawn").Pool(procs) as pool:
        done = sum(pool.map(_precompile_worker, chunks))
    log(f"precompiled {done}")


def time_configs(n_w, k, act, m, cands, device, gen, peak, f=None, check_sqnr=False):
    """µs of each config at one case (weights streamed from HBM: enough copies, CUDA graph), as sweep records;
    ``check_sqnr``: also each config's SQNR against float64 (one eager launch; a FAIL line below 40 dB)."""
    copies = copies_for(n_w * k)
    ws, s = make_weights(n_w, k, device, gen, copies)
    x = torch.randn(m, k, device=device, generator=gen).bfloat16()
    L = launches_for(copies)
    ref = None
    if check_sqnr:  # float64 in row chunks (the lm_heads' would take 4 GB at once)
        ref = torch.cat([f64_reference(x, ws[0][i:i + 16384], s[i:i + 16384], None, "none") for i in range(0, n_w, 16384)], 1)
        if act != "none":
            ref = kw.activation_torch(ref, act)
    recs = []
    for cfg in cands:
        try:
            if ref is not None:
                q = sqnr_db(ref, kw.w8a16_gemm(x, ws[0], s, None, act, config=cfg))
                check(q >= 40, f"{n_w}x{k} {act} M={m} {cfg_str(cfg)}: SQNR {q:.1f} dB")
            us = graph_time_us([lambda i=i: kw.w8a16_gemm(x, ws[i % copies], s, None, act, config=cfg) for i in range(L)])
        except Exception as e:  # noqa: BLE001
            log("failed", n_w, k, m, cfg, type(e).__name__, str(e)[:160])
            continue
        rec = dict(n=n_w, k=k, act=act, m=m, cfg=cfg._asdict(), us=us, pct=100 * n_w * k / us / 1e3 / peak)
        recs.append(rec)
        if f:
            f.write(json.dumps(rec) + "\n")
    return recs  # the weight copies go with this frame, before the next case allocates its own


def rec_str(r) -> str:
    return f"{r['us']:.2f}us {r['pct']:.0f}% {cfg_str(kw.W8A16Config(**r['cfg'])).replace(' ', '')}"


def gemv_vs_dot(recs, default=None):
    """One log line: the best tl.dot config's time (or pick_config's, ``default``) against the best GEMV config's."""
    dot = sorted((r for r in recs if not r["cfg"]["gemv"]), key=lambda r: r["us"])
    gem = sorted((r for r in recs if r["cfg"]["gemv"]), key=lambda r: r["us"])
    if not dot or not gem:
        return "no GEMV / tl.dot pair measured"
    d = default if default is not None else dot[0]
    return (f"tl.dot {'default' if default is not None else 'best'} {rec_str(d)} | GEMV best {rec_str(gem[0])} "
            f"({d['us'] / gem[0]['us']:.2f}x) | next GEMV: " + ", ".join(rec_str(r) for r in gem[1:3]))


def tuned_entry(r, d) -> str:
    """A ready-made ``_GEMV_TUNED`` line for GEMV record ``r`` beating tl.dot record ``d``."""
    c = r["cfg"]
    gated = r["act"] == "swiglu"
    return (f"    ({r['n'] // 2 if gated else r['n']}, {r['k']}, {gated}, {r['m']}): W8A16Config({c['block_n']}, {c['block_k']}, "
            f"{c['split_k']}, {c['num_warps']}, {c['num_stages']}, swap=False, cvt={c['cvt']}, gemv={int(c['gemv'])}, "
            f"prefetch={bool(c['prefetch'])}),  # {r['us']:.1f} us {r['pct']:.0f} %; tl.dot {d['us']:.1f} us")


def gemv_ms(spec: str) -> tuple:
    ms = tuple(int(v) for v in spec.split(",") if v.strip())
    if not ms or any(not 1 <= v <= kw.GEMV_MAX_M for v in ms):
        raise SystemExit(f"--gemv-ms: values in 1..{kw.GEMV_MAX_M}, got {spec!r}")
    return ms


def default_cfg(m, n_w, k, act, num_sms):
    return kw.pick_config(m, n_w // 2 if act == "swiglu" else n_w, k, act == "swiglu", num_sms)


def gemv_compare(device, peak, out_dir, budget_s, ms=(1,)):
    """--gemv-only: at every shape and M in ``ms``, pick_config's config against :func:`gemv_candidates`, each
    GEMV config's SQNR checked; prints the comparison and ``_GEMV_TUNED`` entries for GEMV wins > 3 %."""
    num_sms = kw._num_sms(device)
    plans = {}
    for n_w, k, act, _ in SHAPES:
        for m in ms:
            plans[(n_w, k, act, m)] = [default_cfg(m, n_w, k, act, num_sms)] + gemv_candidates(m, n_w, k, act == "swiglu", num_sms)
    precompile([(*case, c, torch.bfloat16) for case, cands in plans.items() for c in cands], max(1, min(15, (os.cpu_count() or 2) - 1)))
    gen = torch.Generator(device=device).manual_seed(5)
    f = open(os.path.join(out_dir, "gemv.jsonl"), "w") if out_dir else None
    wins, lines = [], []
    for (n_w, k, act, m), cands in plans.items():
        if time.time() - T0 > budget_s:
            log("gemv: time budget spent, stopping")
            break
        recs = time_configs(n_w, k, act, m, cands, device, gen, peak, f, check_sqnr=True)
        default = next((r for r in recs if not r["cfg"]["gemv"]), None)
        line = f"{n_w}x{k} {act} M={m}: " + gemv_vs_dot(recs, default)
        log(line)
        lines.append(line)
        gem = min((r for r in recs if r["cfg"]["gemv"]), key=lambda r: r["us"], default=None)
        if default and gem and gem["us"] < 0.97 * default["us"]:
            wins.append(tuned_entry(gem, default))
    if f:
        f.close()
    print("\nGEMV against pick_config's tl.dot config (bf16 x, weights from HBM, µs per launch; % of the datasheet HBM peak):")
    print("\n".join(lines))
    print("\n_GEMV_TUNED entries (GEMV > 3 % faster):" if wins else "\nno GEMV config beat the tl.dot default by > 3 %")
    print("\n".join(wins))


def sweep(device, peak, out_dir, budget_s, ms_gemv=(1,)):
    num_sms = kw._num_sms(device)
    cases = [(n_w, k, act, m) for n_w, k, act, _ in SHAPES for m in MS]
    cases += [(n_w, k, act, m) for n_w, k, act, _ in SHAPES for m in ms_gemv if m not in MS]  # GEMV-only rows
    plans = {}
    jobs = []
    for n_w, k, act, m in cases:
        gated = act == "swiglu"
        if m in MS:
            cands = candidates(m, n_w, k, gated, num_sms) + extra_candidates(m, n_w, k, gated)
        else:  # an M the tl.dot sweep does not cover: pick_config's config as the reference
            cands = [default_cfg(m, n_w, k, act, num_sms)]
        if m in ms_gemv:
            cands = cands + gemv_candidates(m, n_w, k, gated, num_sms)
        plans[(n_w, k, act, m)] = cands
        jobs += [(n_w, k, act, m, c, torch.bfloat16) for c in cands]
    for n_w, k, act, m in cases[1:2]:  # fp16 x: cast vs bit-pattern conversion
        for cvt in (0, 1):
            jobs.append((n_w, k, act, m, kw.W8A16Config(32, 256, 1, 4, 5, cvt=cvt), torch.float16))
        for c in ((32, 64, 1, 4, 5, False, 0), (64, 64, 1, 4, 5, False, 0), (32, 128, 1, 4, 4, False, 0), (32, 64, 1, 4, 5, False, 1)):
            jobs.append((n_w, k, act, m, kw.W8A16Config(*c), torch.float32))
    precompile(jobs, max(1, min(15, (os.cpu_count() or 2) - 1)))
    gen = torch.Generator(device=device).manual_seed(3)
    results = []
    f = open(os.path.join(out_dir, "sweep.jsonl"), "w") if out_dir else None
    for (n_w, k, act, m), cands in plans.items():
        if time.time() - T0 > budget_s:
            log("sweep: time budget spent, stopping")
            break
        best = time_configs(n_w, k, act, m, cands, device, gen, peak, f)
        results += best
        best.sort(key=lambda r: r["us"])
        log(f"{n_w}x{k} {act} M={m}: " + " | ".join(rec_str(r) for r in best[:6]))
        if m in ms_gemv:
            log(f"    {n_w}x{k} M={m}: " + gemv_vs_dot(best, None if m in MS else next((r for r in best if not r["cfg"]["gemv"]), None)))
    # fp16 cvt A/B
    for n_w, k, act, m in cases[1:2]:
        (w,), s = make_weights(n_w, k, device, gen)
        x = torch.randn(m, k, device=device, generator=gen).half()
        t = [graph_time_us([lambda: kw.w8a16_gemm(x, w, s, None, act, config=kw.W8A16Config(32, 256, 1, 4, 5, cvt=cvt))] * 16)
             for cvt in (0, 1)]
        log(f"fp16 x {n_w}x{k} M={m}: cast {t[0]:.2f} us, bit-pattern {t[1]:.2f} us (L2-warm)")
        x = x.float()
        fp32 = [kw.W8A16Config(32, 64, 1, 4, 5, swap=False, cvt=0), kw.W8A16Config(64, 64, 1, 4, 5, swap=False, cvt=0),
                kw.W8A16Config(32, 128, 1, 4, 4, swap=False, cvt=0), kw.W8A16Config(32, 64, 1, 4, 5, swap=False, cvt=1)]
        t = []
        for cfg in fp32:
            try:
                t.append(graph_time_us([lambda: kw.w8a16_gemm(x, w, s, None, act, config=cfg)] * 16))
            except Exception as e:  # noqa: BLE001
                t.append(float("nan"))
                log("fp32 failed", cfg, type(e).__name__, str(e)[:120])
        log(f"fp32 x {n_w}x{k} M={m}: " + ", ".join(f"n{c.block_n}k{c.block_k}p{c.num_stages}c{c.cvt} {u:.2f} us" for c, u in zip(fp32, t)))
    if f:
        f.close()
    return results


def gemv_smoke(ms):
    """--smoke: every GEMV candidate config the GPU sweep would time (for 4 SMs, so that split-K happens), on
    small shapes whose K is one 1024 block and a tail, against float64."""
    cpu = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    for n_w, k, act in ((48, 1100, "none"), (64, 1100, "swiglu")):
        (w,), s = make_weights(n_w, k, cpu, gen)
        for m in ms:
            x = torch.randn(m, k, generator=gen).bfloat16()
            ref = f64_reference(x, w, s, None, act)
            for cfg in gemv_candidates(m, n_w, k, act == "swiglu", 4):
                q = sqnr_db(ref, kw.w8a16_gemm(x, w, s, None, act, config=cfg))
                check(q >= 40, f"{n_w}x{k} {act} M={m} {cfg_str(cfg)}: SQNR {q:.1f} dB")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU + TRITON_INTERPRET=1: the checks on tiny shapes")
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    ap.add_argument("--budget", type=float, default=400.0, help="seconds after which the sweep stops")
    ap.add_argument("--no-table", action="store_true")
    ap.add_argument("--gemv-only", action="store_true", help="only pick_config's config against the GEMV configs")
    ap.add_argument("--gemv-ms", default="1", help="M values (<= GEMV_MAX_M) given GEMV candidates, e.g. 1,2,4")
    ap.add_argument("--ms", default=None, help="M values of the tl.dot sweep and table (default 1,8,32)")
    ap.add_argument("--shapes", default=None, help="only the shapes whose label contains this text (e.g. L3-8B)")
    args = ap.parse_args()
    global MS, SHAPES
    if args.ms:
        MS = tuple(int(v) for v in args.ms.split(","))
    if args.shapes:
        SHAPES = [s for s in SHAPES if args.shapes in s[3]]
    ms_gemv = gemv_ms(args.gemv_ms)
    if args.smoke:
        SHAPES, MS = [(48, 40, "none", "tiny"), (64, 96, "swiglu", "tiny gated")], (1, 8)
        correctness(SHAPES, MS, torch.device("cpu"), act_shapes=((40, 100),))
        gemv_smoke(ms_gemv)
        print("FAILED:" if FAILS else "all checks passed", *FAILS)
        return 1 if FAILS else 0
    device = torch.device("cuda")
    import triton

    name = torch.cuda.get_device_name()
    peak = 4800.0 if "H200" in name else 3350.0
    props = torch.cuda.get_device_properties(0)
    log(f"{name}, {props.multi_processor_count} SMs, L2 {props.L2_cache_size >> 20} MB; torch {torch.__version__}, "
        f"triton {triton.__version__}; peak used {peak:.0f} GB/s")
    if args.gemv_only:
        gemv_compare(device, peak, args.out, args.budget, ms_gemv)
        log("done")
        print("FAILED:" if FAILS else "all checks passed", *FAILS)
        return 1 if FAILS else 0
    cfg_fn = None  # the table's configs: pick_config's, or the sweep's winners
    if args.sweep:
        results = sweep(device, peak, args.out, args.budget, ms_gemv)
        best = {}
        for r in results:
            key = (r["m"], r["n"], r["k"], r["act"])
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = r

        def best_cfg(m, n_w, k, act):  # the sweep's winner where it measured the case, else pick_config's
            r = best.get((m, n_w, k, act))
            return kw.W8A16Config(**r["cfg"]) if r else kw.pick_config(
                m, n_w // 2 if act == "swiglu" else n_w, k, act == "swiglu", kw._num_sms(device))
        cfg_fn = best_cfg
    correctness(SHAPES, MS, device, cfg_fn)
    if not args.no_table:
        table(device, peak, args.out, cfg_fn)
    print("FAILED:" if FAILS else "all checks passed", *FAILS)
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
