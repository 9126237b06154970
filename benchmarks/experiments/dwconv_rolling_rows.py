"""Experiment (not used by the model): a depthwise-conv forward kernel that walks down the token rows
of its column strip in a loop, with one accumulator per output row in reach of the current input row
(3 for 3x3, 5 for 5x5), passed down after each row, so each input row is loaded KS times (its
horizontal shifts) instead of (ROWS + KS - 1) * KS / ROWS times. Checks it against the reference,
sweeps its tiles at the RMT-S shapes against rmt.ops.dwconv's kernel, then times eager RMT-S with the
best tiles patched in (BENCHMARKS.md, run U: slower at every shape, 8.50 against 6.09 ms per batch).

    python benchmarks/experiments/dwconv_rolling_rows.py          # CUDA
    TRITON_INTERPRET=1 python -c "import dwconv_rolling_rows as m; m.check('cpu')"   # in this folder
"""
import itertools
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from rmt.ops import dwconv  # noqa: E402
from rmt.ops.triton_support import cdiv, eager_launch, next_power_of_2  # noqa: E402
from kernel_tiles import _seconds  # noqa: E402


@triton.jit
def _row_taps(acc, x0, x1, x2, x3, x4, WT, w_off, TR: tl.constexpr, KS: tl.constexpr,
              RESIDUAL: tl.constexpr, w_sh, w_sw, mask_c):
    w = WT + w_off + TR * w_sh
    for dx in tl.static_range(KS):
        wv = tl.load(w + dx * w_sw, mask=mask_c, other=0.0).to(tl.float32)
        if RESIDUAL:
            if TR == KS // 2:
                if dx == KS // 2:
                    wv += 1.0
        if dx == 0:
            acc += x0 * wv[None, :]
        elif dx == 1:
            acc += x1 * wv[None, :]
        elif dx == 2:
            acc += x2 * wv[None, :]
        elif dx == 3:
            acc += x3 * wv[None, :]
        else:
            acc += x4 * wv[None, :]
    return acc


@triton.jit
def _dwconv_roll_kernel(X, WT, B, Y, H, W, C, x_sb, x_sh, x_sw, y_sb, y_sh, y_sw, w_sc, w_sh, w_sw,
                        KS: tl.constexpr, HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr, ROWS: tl.constexpr,
                        BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, STAGES: tl.constexpr):
    pid = tl.program_id(0)
    chunks = (H + ROWS - 1) // ROWS
    b = (pid // chunks).to(tl.int64)
    r0 = (pid % chunks) * ROWS
    r_end = tl.minimum(r0 + ROWS, H)
    offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    w_off = offs_c * w_sc
    a0 = tl.zeros([BLOCK_W, BLOCK_C], tl.float32)
    a1 = tl.zeros([BLOCK_W, BLOCK_C], tl.float32)
    a2 = tl.zeros([BLOCK_W, BLOCK_C], tl.float32)
    a3 = tl.zeros([BLOCK_W, BLOCK_C], tl.float32)
    a4 = tl.zeros([BLOCK_W, BLOCK_C], tl.float32)
    if HAS_BIAS:
        bias = tl.load(B + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    xb = X + b * x_sb + offs_c[None, :]
    yb = Y + b * y_sb + offs_w[:, None] * y_sw + offs_c[None, :]
    out_mask = (offs_w < W)[:, None] & mask_c[None, :]
    P: tl.constexpr = KS // 2
    for i in tl.range(r0 - P, r_end + P, num_stages=STAGES):
        row_ok = (i >= 0) & (i < H)
        s0 = offs_w - P
        x0 = tl.load(xb + i * x_sh + s0[:, None] * x_sw, mask=(row_ok & (s0 >= 0) & (s0 < W))[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
        s1 = offs_w + 1 - P
        x1 = tl.load(xb + i * x_sh + s1[:, None] * x_sw, mask=(row_ok & (s1 >= 0) & (s1 < W))[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
        s2 = offs_w + 2 - P
        x2 = tl.load(xb + i * x_sh + s2[:, None] * x_sw, mask=(row_ok & (s2 >= 0) & (s2 < W))[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
        if KS > 3:
            s3 = offs_w + 3 - P
            x3 = tl.load(xb + i * x_sh + s3[:, None] * x_sw, mask=(row_ok & (s3 >= 0) & (s3 < W))[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
            s4 = offs_w + 4 - P
            x4 = tl.load(xb + i * x_sh + s4[:, None] * x_sw, mask=(row_ok & (s4 >= 0) & (s4 < W))[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
        else:
            x3 = x2
            x4 = x2
        a0 = _row_taps(a0, x0, x1, x2, x3, x4, WT, w_off, KS - 1, KS, RESIDUAL, w_sh, w_sw, mask_c)
        a1 = _row_taps(a1, x0, x1, x2, x3, x4, WT, w_off, KS - 2, KS, RESIDUAL, w_sh, w_sw, mask_c)
        a2 = _row_taps(a2, x0, x1, x2, x3, x4, WT, w_off, KS - 3, KS, RESIDUAL, w_sh, w_sw, mask_c)
        if KS > 3:
            a3 = _row_taps(a3, x0, x1, x2, x3, x4, WT, w_off, 1, KS, RESIDUAL, w_sh, w_sw, mask_c)
            a4 = _row_taps(a4, x0, x1, x2, x3, x4, WT, w_off, 0, KS, RESIDUAL, w_sh, w_sw, mask_c)
        o = i - P
        out = a0
        if HAS_BIAS:
            out += bias[None, :]
        tl.store(yb + o * y_sh, out.to(Y.dtype.element_ty), mask=out_mask & (o >= r0) & (o < r_end))
        a0 = a1
        a1 = a2
        if KS > 3:
            a2 = a3
            a3 = a4
            a4 = tl.zeros([BLOCK_W, BLOCK_C], tl.float32)
        else:
            a2 = tl.zeros([BLOCK_W, BLOCK_C], tl.float32)


def roll_forward(x, weight, bias, residual, tile):
    bw, bc, nw, rows, stages = tile
    b, h, w, c = x.shape
    y = torch.empty_like(x)
    rows = min(rows, h)
    eager_launch(_dwconv_roll_kernel)[(b * cdiv(h, rows), cdiv(w, bw), cdiv(c, bc))](
        x, weight, bias if bias is not None else weight, y, h, w, c, x.stride(0), x.stride(1), x.stride(2),
        y.stride(0), y.stride(1), y.stride(2), weight.stride(0), weight.stride(2), weight.stride(3),
        KS=weight.shape[-1], HAS_BIAS=bias is not None, RESIDUAL=residual, ROWS=rows, BLOCK_W=bw, BLOCK_C=bc,
        STAGES=stages, num_warps=nw)
    return y


def check(device):
    torch.manual_seed(0)
    worst = 0.0
    for (h, w, c, ks, res, bw, bc, rows) in [(7, 9, 20, 3, True, 8, 16, 3), (5, 5, 33, 5, False, 4, 32, 2),
                                              (9, 6, 16, 3, True, 4, 16, 4), (1, 1, 8, 5, True, 2, 8, 1),
                                              (6, 11, 40, 5, True, 16, 32, 6), (4, 3, 7, 3, False, 4, 8, 5)]:
        x = torch.randn(2, h, w, c, device=device)
        wt = torch.randn(c, 1, ks, ks, device=device)
        bs = torch.randn(c, device=device)
        for bias in (bs, None):
            ref = dwconv.dwconv_nhwc_reference(x, wt, bias, res)
            got = roll_forward(x, wt, bias, res, (bw, bc, 1 if device == "cpu" else 4, rows, 1))
            err = ((got - ref).abs().max() / ref.abs().max()).item()
            worst = max(worst, err)
            assert err < 1e-5, (h, w, c, ks, res, err)
            # strided slice input (LePE's v)
        xs = torch.randn(2, h, w, 3 * c, device=device)[..., c:2 * c]
        ref = dwconv.dwconv_nhwc_reference(xs, wt, bs, res)
        got = roll_forward(xs, wt, bs, res, (bw, bc, 4, rows, 1))
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-5, err
        worst = max(worst, err)
    print("roll kernel matches reference, worst rel err", worst)



BATCH = int(os.environ.get("BATCH", 256))
STAGES = [(56, 64, 3), (28, 128, 4), (14, 256, 18), (7, 512, 4)]
CONVS = [("cpe", 3, 1, True), ("lepe", 5, 1, False), ("ffn", 3, 3, True)]


def shapes():
    for (side, c, depth), (name, ks, mult, res) in itertools.product(STAGES, CONVS):
        yield side, c, depth, name, ks, mult, res


def configs(side, ch):
    out = []
    for bw, bc, rows in itertools.product((8, 16, 32, 64), (32, 64, 128), (8, 16, 28, 56)):
        if bw > next_power_of_2(side) or bc > next_power_of_2(ch):
            continue
        rows = min(rows, side)
        for nw in ((2, 4) if bw * bc <= 1024 else (4, 8)):
            for st in (1, 2):
                out.append((bw, bc, nw, rows, st))
    return sorted(set(out))


def make(side, c, name, ks, mult, res, device="cuda"):
    ch = c * mult
    g = torch.Generator(device="cpu").manual_seed(0)
    if name == "lepe":
        x = torch.randn(BATCH, side, side, 3 * c, generator=g).to(device, torch.bfloat16)[..., 2 * c:]
    else:
        x = torch.randn(BATCH, side, side, ch, generator=g).to(device, torch.bfloat16)
    w = torch.randn(ch, 1, ks, ks, generator=g).to(device)
    b = torch.randn(ch, generator=g).to(device)
    return x, w, b


def compile_shape(args):
    side, c, depth, name, ks, mult, res = args
    x, w, b = make(side, c, name, ks, mult, res)
    ref = dwconv._forward(eager_launch, x, w, b, res, False).float()
    bad = []
    for cfg in configs(side, c * mult):
        try:
            y = roll_forward(x, w, b, res, cfg).float()
            torch.cuda.synchronize()
            err = ((y - ref).abs().max() / ref.abs().max()).item()
            if err > 2e-2:
                bad.append((cfg, err))
        except Exception as e:  # noqa
            bad.append((cfg, repr(e)[:200]))
    return name, side, bad


def main():
    check("cuda")
    t0 = time.time()
    with ProcessPoolExecutor(12, mp_context=multiprocessing.get_context("spawn")) as ex:
        results = list(ex.map(compile_shape, list(shapes())))
    bad = {(n, s): b for n, s, b in results}
    print(f"compiled all in {time.time() - t0:.0f}s; failures:", {k: v[:3] for k, v in bad.items() if v}, flush=True)
    rows = []
    tot_old = tot_new = tot_copy = 0.0
    for side, c, depth, name, ks, mult, res in shapes():
        x, w, b = make(side, c, name, ks, mult, res)
        badcfg = {tuple(cf) for cf, _ in bad[(name, side)]}
        old = _seconds(lambda: dwconv._forward(eager_launch, x, w, b, res, False), torch.device("cuda"), 20)
        y = torch.empty_like(x)
        cp = _seconds(lambda: y.copy_(x), torch.device("cuda"), 20)
        timed = {}
        for cfg in configs(side, c * mult):
            if cfg in badcfg:
                continue
            timed[cfg] = _seconds(lambda: roll_forward(x, w, b, res, cfg), torch.device("cuda"), 20)
        best = min(timed, key=timed.get)
        top = sorted(timed, key=timed.get)[:4]
        moved = x.numel() * 4
        row = dict(conv=name, shape=f"{BATCH}x{side}x{side}x{c * mult}", old_us=old * 1e6, best=best,
                   best_us=timed[best] * 1e6, copy_us=cp * 1e6, best_gbs=moved / timed[best] / 1e9,
                   old_gbs=moved / old / 1e9, top=[(t, round(timed[t] * 1e6, 1)) for t in top],
                   old_tile=dwconv._blocks(side, c * mult, ks))
        print(json.dumps(row), flush=True)
        rows.append(row)
        tot_old += old * depth; tot_new += timed[best] * depth; tot_copy += cp * depth
    print(f"model sum (forward, per batch {BATCH}): old {tot_old*1e3:.3f} ms  roll {tot_new*1e3:.3f} ms  copy {tot_copy*1e3:.3f} ms")
    json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "roll_sweep.json"), "w"), indent=1)




def model_compare(rows):
    import torch.nn.functional as F
    import inference_modes as im
    best = {}
    for r in rows:
        side = int(r["shape"].split("x")[1]); ch = int(r["shape"].split("x")[3])
        if r["best_us"] < r["old_us"]:
            best[(r["conv"] == "lepe", side, ch)] = tuple(r["best"])
    orig = dwconv._forward

    def patched(launch, x, weight, bias, residual, gelu, tile=None):
        key = (weight.shape[-1] == 5, x.shape[1], x.shape[3])
        if tile is None and launch is eager_launch and key in best:
            if gelu:
                x = F.gelu(x)
            return roll_forward(x, weight, bias, residual, best[key])
        return orig(launch, x, weight, bias, residual, gelu, tile)
    print("roll configs used:", best, flush=True)
    dev = torch.device("cuda")
    for rep in range(2):
        for name, fn in (("old", orig), ("roll", patched)):
            dwconv._forward = fn
            row = im.run_mode("rmt_small", "eager", 224, 256, dev, 5, 20, 12 if rep == 1 else 0)
            print(name, json.dumps(row), flush=True)
    dwconv._forward = orig


if __name__ == "__main__":
    main()
    model_compare(json.load(open(os.path.join(os.environ.get("OUT", "."), "roll_sweep.json"))))
