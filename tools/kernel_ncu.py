"""Nsight Compute's view of the fused kernels at RMT-S's shapes: registers, occupancy, DRAM and SM throughput.

    python tools/kernel_ncu.py --batch 256 --json OUT/kernel_ncu.json   # runs the workload under ncu
    python tools/kernel_ncu.py --workload --batch 256 --labels L.json   # the launches alone

The workload launches every Triton kernel of the fast path once per RMT-S stage (224x224: grids
56/28/14/7, widths 64/128/256/512, heads 4/4/8/16, decomposed MaSA in stages 1-3, full in stage 4) on
bf16 tensors, as autocast gives them: the depthwise convolutions' forward kernel (CPE 3x3 with its
residual, LePE 5x5 on ``v`` sliced from a qkv tensor, the FFN's 3x3 after GELU) and input-gradient
kernel, the LayerNorm forward and backward, the MaSA forward as inference runs it (LePE added inside)
and as training runs it (keeping the log-sum-exp), and the MaSA backward. It first runs everything
once to compile, then again between ``cudaProfilerStart`` and ``cudaProfilerStop``, recording a label
for each Triton launch of that pass. ``ncu --profile-from-start off`` profiles exactly those launches
(kernels matching :data:`KERNELS`), and the table pairs ncu's rows with the labels in launch order.

ncu collects the sections :data:`SECTIONS`; the columns are the raw metrics of :data:`METRICS` among
them (metric names differ between ncu releases: the first name present is used).
``theor occ``/``occ`` are the theoretical and achieved occupancy (active warps of the SM's maximum),
``blk/SM`` how many programs the registers allow per SM. Needs ``ncu`` (Nsight Compute) on the PATH
or under ``/usr/local/cuda/bin``, and permission to read GPU performance counters.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

KERNELS = "regex:^(_dwconv|_ln_|masa_)"   # ncu --kernel-name: the fast path's Triton kernels
SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats")  # ncu --section: whose raw metrics hold the columns
METRICS: List[Tuple[str, Tuple[str, ...]]] = [  # (column, ncu metric names, the first one present is used)
    ("regs", ("launch__registers_per_thread",)),
    ("blk/SM", ("launch__occupancy_limit_registers",)),
    ("theor occ %", ("sm__maximum_warps_per_active_cycle_pct",)),
    ("occ %", ("sm__warps_active.avg.pct_of_peak_sustained_active",)),
    ("DRAM %", ("gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",  # newer ncu releases
                "dram__throughput.avg.pct_of_peak_sustained_elapsed")),
    ("SM %", ("sm__throughput.avg.pct_of_peak_sustained_elapsed",)),
    ("us", ("gpu__time_duration.sum",)),
]
_TIME_UNITS = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3,
               "second": 1e6, "s": 1e6}
STAGES = [(56, 64, 4, "decomposed"), (28, 128, 4, "decomposed"), (14, 256, 8, "decomposed"), (7, 512, 16, "full")]


# --- the workload ---------------------------------------------------------------------------------

@contextlib.contextmanager
def _recording(labels: List[List[str]], current: List[Optional[str]]):
    """While active, every launch ``kernel[grid](...)`` of a fast-path kernel appends ``[label, kernel
    name]`` to ``labels`` when ``current[0]`` is set. Launches go through Triton's dispatch (the
    direct launcher is switched off), whose class (``JITFunction``, or ``InterpretedFunction`` under
    ``TRITON_INTERPRET=1``) gets a recording ``run``."""
    import rmt
    from rmt.ops import dwconv
    cls = type(dwconv._dwconv_nhwc_kernel)
    run = cls.run

    def recording_run(self, *args, **kwargs):
        if current[0]:
            labels.append([current[0], self.fn.__name__])
        return run(self, *args, **kwargs)
    cls.run = recording_run
    try:
        with rmt.fast_path_switches(direct_launch=False):
            yield
    finally:
        cls.run = run


def _stage_ops(batch: int, side: int, c: int, heads: int, form: str, device: torch.device):
    """``(label, fn)`` for each op of one stage (see the module docstring)."""
    from rmt.ops import dwconv, layernorm
    from rmt.ops.masa import head_decays, rotation_tables, triton_masa
    from rmt.ops.triton_support import eager_launch
    bf16 = dict(device=device, dtype=torch.bfloat16)
    x = torch.randn(batch, side, side, c, **bf16)
    qkv = torch.randn(batch, side, side, 3 * c, **bf16)
    v = qkv[..., 2 * c:]
    hidden = torch.randn(batch, side, side, 3 * c, **bf16)
    w3, w5, w3h = (torch.randn(ch, 1, ks, ks, device=device) * 0.1 for ch, ks in ((c, 3), (c, 5), (3 * c, 3)))
    b, bh = torch.randn(c, device=device), torch.randn(3 * c, device=device)
    ln_w, ln_b = torch.randn(c, device=device), torch.randn(c, device=device)
    d = c // heads
    shape = (batch, side, side, heads, d)
    q, k, vv = (t.reshape(shape) for t in qkv.split(c, dim=-1))
    sin, cos = rotation_tables(side, side, d, device=device)
    decay = head_decays(heads, 2.0, 4.0, device=device).float()
    lepe = torch.randn(shape, **bf16)
    _, mean, rstd = layernorm._forward(x.view(-1, c), ln_w, ln_b, 1e-6, x.dtype)
    out, state = triton_masa.attention_forward(q, k, vv, sin, cos, decay, d ** -0.5, form)
    grad = torch.randn_like(out)
    tag = f"{side}x{side}x{c}"
    return [
        (f"dwconv cpe 3x3 fwd {tag}", lambda: dwconv._forward(eager_launch, x, w3, b, True, False)),
        (f"dwconv lepe 5x5 fwd {tag}", lambda: dwconv._forward(eager_launch, v, w5, b, False, False)),
        (f"dwconv ffn 3x3 fwd {tag}x3", lambda: dwconv._forward(eager_launch, hidden, w3h, bh, True, True)),
        (f"dwconv cpe 3x3 dgrad {tag}", lambda: dwconv._backward(eager_launch, x, x, w3, True, False, True, False)),
        (f"dwconv lepe 5x5 dgrad {tag}", lambda: dwconv._backward(eager_launch, x, x, w5, False, False, True, False)),
        (f"dwconv ffn 3x3 dgrad {tag}x3",
         lambda: dwconv._backward(eager_launch, hidden, hidden, w3h, True, True, True, False)),
        (f"layernorm fwd {tag}", lambda: layernorm._forward(x.view(-1, c), ln_w, ln_b, 1e-6, x.dtype)),
        (f"layernorm bwd {tag}", lambda: layernorm._backward(x.view(-1, c), x.view(-1, c), ln_w, mean, rstd)),
        (f"masa infer {form} {tag}/{heads}",
         lambda: triton_masa.masa_triton(q, k, vv, sin, cos, decay, d ** -0.5, form, lepe)),
        (f"masa train fwd {form} {tag}/{heads}",
         lambda: triton_masa.attention_forward(q, k, vv, sin, cos, decay, d ** -0.5, form)),
        (f"masa bwd {form} {tag}/{heads}",
         lambda: triton_masa.attention_backward(grad, q, k, vv, state, sin, cos, decay, d ** -0.5, form)),
    ]


def run_workload(batch: int, labels_path: str, device: torch.device = torch.device("cuda"),
                 stages: Sequence[Tuple[int, int, int, str]] = STAGES) -> List[List[str]]:
    """Compile every op, then run each once between ``cudaProfilerStart`` and ``cudaProfilerStop`` (on
    CUDA), writing the labels of that pass's Triton launches to ``labels_path`` (JSON: ``[[label,
    kernel name], ...]``) and returning them. ``stages``: ``(grid side, width, heads, form)`` each."""
    labels: List[List[str]] = []
    current: List[Optional[str]] = [None]
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    with _recording(labels, current), torch.no_grad():
        ops = [op for st in stages for op in _stage_ops(batch, *st, device)]
        for _, fn in ops:  # compile and warm up, not profiled
            fn()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
        for label, fn in ops:
            current[0] = label
            fn()
        current[0] = None
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
    Path(labels_path).write_text(json.dumps(labels))
    return labels


# --- ncu and its CSV ------------------------------------------------------------------------------

def find_ncu() -> Optional[str]:
    """The ``ncu`` executable: on the PATH, or in CUDA's usual install directory."""
    found = shutil.which("ncu")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/ncu")
    return str(default) if default.exists() else None


def _number(text: str) -> float:
    """A value of ncu's CSV (``"1,234.5"`` style thousands separators allowed); NaN when not numeric."""
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return float("nan")


def parse_ncu_csv(lines: Iterable[str]) -> List[Dict[str, object]]:
    """The kernel rows of ``ncu --csv --page raw`` output (other lines, e.g. ``==PROF==`` messages,
    skipped): ``{"kernel", "grid", "block", <column of METRICS>: float}`` (NaN for a metric missing from
    the output), times converted to microseconds with the units row when there is one."""
    rows = list(csv.reader(line for line in lines if line.startswith('"')))
    if not rows:
        return []
    header, body = rows[0], rows[1:]
    units = {}
    if body and "ID" in header and body[0][header.index("ID")] == "":  # the units row
        units = dict(zip(header, body[0]))
        body = body[1:]
    out = []
    for row in body:
        cells = dict(zip(header, row))
        rec: Dict[str, object] = {"kernel": cells.get("Kernel Name", ""), "grid": cells.get("Grid Size", ""),
                                  "block": cells.get("Block Size", "")}
        for column, names in METRICS:
            metric = next((m for m in names if m in cells), names[0])
            value = _number(cells.get(metric, "nan"))
            if metric == "gpu__time_duration.sum":
                value *= _TIME_UNITS.get(units.get(metric, "nsecond"), 1.0)
            rec[column] = value
        out.append(rec)
    return out


def pair_with_labels(rows: Sequence[Dict[str, object]], labels: Sequence[Sequence[str]]) -> List[Dict[str, object]]:
    """Attach each label to the next ncu row of the same kernel name, in launch order (rows of kernels
    the workload did not label are dropped; a label without a row is kept with empty metrics)."""
    paired, i = [], 0
    for label, name in labels:
        j = i
        while j < len(rows) and not str(rows[j]["kernel"]).startswith(name):
            j += 1
        if j < len(rows):
            paired.append({"op": label, **rows[j]})
            i = j + 1
        else:
            paired.append({"op": label, "kernel": name})
    return paired


def format_table(rows: Sequence[Dict[str, object]]) -> str:
    """One line per profiled launch: op, kernel, grid, then the METRICS columns."""
    cols = [c for c, _ in METRICS]
    lines = [f"{'op':<40} {'kernel':<22} {'grid':<16} " + " ".join(f"{c:>11}" for c in cols)]
    for r in rows:
        vals = " ".join(f"{r[c]:>11.1f}" if isinstance(r.get(c), float) else f"{'-':>11}" for c in cols)
        op, kernel, grid = str(r["op"])[:40], str(r.get("kernel", ""))[:22], str(r.get("grid", ""))[:16]
        lines.append(f"{op:<40} {kernel:<22} {grid:<16} {vals}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workload", action="store_true", help="only run the launches (what ncu profiles)")
    p.add_argument("--labels", default="", help="with --workload: where to write the launch labels")
    p.add_argument("--ncu", default="", help="the ncu executable (default: found on the PATH)")
    p.add_argument("--json", default="")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("kernel_ncu.py profiles CUDA kernels; no CUDA device here", file=sys.stderr)
        return 2
    if args.workload:
        run_workload(args.batch, args.labels or os.devnull)
        return 0
    ncu = args.ncu or find_ncu()
    if not ncu:
        print("ncu (Nsight Compute) not found: put it on the PATH or pass --ncu", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        labels_path = str(Path(tmp) / "labels.json")
        cmd = [ncu, "--csv", "--page", "raw", "--profile-from-start", "off", "--kernel-name", KERNELS,
               *[arg for section in SECTIONS for arg in ("--section", section)],
               sys.executable, str(Path(__file__).resolve()), "--workload", "--batch", str(args.batch),
               "--labels", labels_path]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not Path(labels_path).exists():
            print(f"ncu failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}", file=sys.stderr)
            return 1
        labels = json.loads(Path(labels_path).read_text())
    rows = pair_with_labels(parse_ncu_csv(done.stdout.splitlines()), labels)
    print(format_table(rows))
    if args.json:
        from rmt.benchmark import environment, save_rows
        save_rows(args.json, environment(torch.device("cuda")), vars(args), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
