"""Training where users train, in one process and one table: RMT beside its peers, row by row.

    python benchmarks/training_table.py                       # every row, one GPU
    python benchmarks/training_table.py --rows compiled --json OUT/compiled.json
    python benchmarks/training_table.py --rows eager,blockgraphs,backbone,maskrcnn,upernet --json OUT/rest.json

(compiling RMT-S takes minutes: the second form splits the table where one command must stay short).

Rows (each RMT measurement beside its peer, built and timed in this process; bf16 autocast, fused
AdamW, timings as ``rmt benchmark`` takes them):

* ``compiled``    - ``torch.compile(model)`` training at 224, batch 128: RMT-S against Swin-T compiled
  (img/s, peak GiB, compile-and-first-step seconds);
* ``eager``       - the plain eager loop (no block graphs): RMT-S against Swin-T eager;
* ``blockgraphs`` - eager with ``model.set_block_graphs(True)``: RMT-S against Swin-T eager;
* ``backbone``    - ``features_only`` forward+backward at 1344x800, batch 2: RMT-S against ConvNeXt-T;
* ``maskrcnn``    - a Mask R-CNN training step at 1333x800, batch 2 (torchvision's detector, the same
  FPN on every backbone): RMT-T and RMT-S against ConvNeXt-T;
* ``upernet``     - UperNet at 512x512, batch 16: RMT-S against ConvNeXt-T.

"speed" is RMT's throughput over the peer's (above 1: RMT is faster); "target" is the speed the
row is held to and "met" whether this run reaches it. Without CUDA the script says so and exits.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from rmt.benchmark import environment, save_rows, time_step  # noqa: E402

SWIN = "swin_tiny_patch4_window7_224"


class Row(NamedTuple):
    """One line of the table: what is measured, and the bar it is held to."""
    key: str
    what: str
    ours: str          # the RMT model
    peer: str
    unit: str          # "img/s" (higher is better) or "ms" / "s/step" (lower is better)
    target: float      # the least acceptable speed (RMT throughput / peer throughput)
    peer_key: str      # rows with the same peer_key share one peer measurement


ROWS = [
    Row("compiled", "torch.compile training, 224, batch 128", "rmt_small", SWIN + " (compiled)", "img/s", 1.0,
        "swin-compiled"),
    Row("eager", "eager training loop, 224, batch 128", "rmt_small", SWIN, "img/s", 1.0, "swin-eager"),
    Row("blockgraphs", "eager with block graphs, 224, batch 128", "rmt_small", SWIN, "img/s", 1.0, "swin-eager"),
    Row("backbone", "backbone fwd+bwd, features_only, 1344x800, batch 2", "rmt_small", "convnext_tiny", "ms",
        1 / 1.5, "convnext-backbone"),
    Row("maskrcnn_t", "Mask R-CNN training step, 1333x800, batch 2", "rmt_tiny", "convnext_tiny", "s/step", 1.0,
        "convnext-maskrcnn"),
    Row("maskrcnn_s", "Mask R-CNN training step, 1333x800, batch 2", "rmt_small", "convnext_tiny", "s/step", 0.9,
        "convnext-maskrcnn"),
    Row("upernet", "UperNet training, 512x512, batch 16", "rmt_small", "convnext_tiny", "img/s", 1.0,
        "convnext-upernet"),
]
ROWS_BY_KEY = {r.key: r for r in ROWS}
GROUPS = {"compiled": ["compiled"], "eager": ["eager"], "blockgraphs": ["blockgraphs"], "backbone": ["backbone"],
          "maskrcnn": ["maskrcnn_t", "maskrcnn_s"], "upernet": ["upernet"]}


def speed(row: Row, ours: Optional[float], peer: Optional[float]) -> Optional[float]:
    """RMT's throughput over the peer's, from two measurements in ``row.unit`` (None if one failed)."""
    if not ours or not peer:
        return None
    return ours / peer if row.unit == "img/s" else peer / ours


def format_table(results: List[Dict[str, Any]]) -> str:
    """Markdown table of ``results`` (dicts with the fields of :class:`Row` plus ``ours_value``,
    ``peer_value`` and optional ``ours_note`` / ``peer_note``)."""
    lines = ["| what | RMT | RMT value | peer | peer value | unit | speed | target | met |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        row = ROWS_BY_KEY[r["key"]]
        s = speed(row, r.get("ours_value"), r.get("peer_value"))
        value = lambda v, note: note or ("-" if v is None else f"{v:,.3f}" if row.unit == "s/step" else f"{v:,.1f}")
        lines.append(f"| {row.what} | {row.ours} | {value(r.get('ours_value'), r.get('ours_note'))} | {row.peer} | "
                     f"{value(r.get('peer_value'), r.get('peer_note'))} | {row.unit} | "
                     f"{'-' if s is None else f'{s:.2f}x'} | >= {row.target:.2f}x | "
                     f"{'-' if s is None else 'yes' if s >= row.target else 'no'} |")
    return "\n".join(lines)



def _backbone_ms(name: str, device: torch.device, warmup: int, steps: int, size=(800, 1344)) -> Dict[str, Any]:
    """Milliseconds of a ``features_only`` forward+backward at ``size`` (H, W), batch 2, bf16 autocast."""
    import timm
    model = timm.create_model(name, features_only=True, pretrained=False).to(device).train()
    x = torch.randn(2, 3, *size, device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            feats = model(x)
        sum(f.float().mean() for f in feats).backward()
    return dict(value=1e3 * time_step(step, device, warmup, steps))


def measure_row(row: Row, device: torch.device, warmup: int, steps: int, cache: Dict[str, Dict[str, Any]]
                ) -> Dict[str, Any]:
    """Both measurements of ``row`` (a peer measured for an earlier row is reused)."""
    import detection
    import segmentation
    import training_step

    def classification(name: str, mode: str) -> Callable[[], Dict[str, Any]]:
        def run() -> Dict[str, Any]:
            got = training_step.measure(name, mode, 128, device, warmup, steps)
            return dict(value=got["img_per_s"], note=got["note"], peak_gib=got["peak_gib"], setup_s=got["setup_s"])
        return run

    def maskrcnn(name: str) -> Callable[[], Dict[str, Any]]:
        def run() -> Dict[str, Any]:
            got = detection.bench_one(name, "mask_rcnn", device, 800, 1333, 2, steps, warmup)
            return dict(value=got["train_s_step"], peak_gib=round((got["train_peak_mib"] or 0) / 1024, 2))
        return run

    def upernet(name: str) -> Callable[[], Dict[str, Any]]:
        def run() -> Dict[str, Any]:
            got = segmentation.bench_one(name, "upernet", device, 512, 16, 16, steps, warmup)
            return dict(value=got["train_img_s"], peak_gib=got.get("train_peak_gib"))
        return run

    plans = {
        "compiled": (classification("rmt_small", "compiled"), classification(SWIN, "compiled")),
        "eager": (classification("rmt_small", "eager"), classification(SWIN, "eager")),
        "blockgraphs": (classification("rmt_small", "eager-blockgraphs"), classification(SWIN, "eager")),
        "backbone": (lambda: _backbone_ms("rmt_small", device, warmup, steps),
                     lambda: _backbone_ms("convnext_tiny", device, warmup, steps)),
        "maskrcnn_t": (maskrcnn("rmt_tiny"), maskrcnn("convnext_tiny")),
        "maskrcnn_s": (maskrcnn("rmt_small"), maskrcnn("convnext_tiny")),
        "upernet": (upernet("rmt_small"), upernet("convnext_tiny")),
    }
    result: Dict[str, Any] = dict(row._asdict())
    for side, plan in zip(("ours", "peer"), plans[row.key]):
        cache_key = row.key if side == "ours" else row.peer_key
        if cache_key not in cache:
            t0 = time.perf_counter()
            try:
                cache[cache_key] = plan()
            except Exception as e:  # keep the table going
                cache[cache_key] = dict(value=None, note=f"{type(e).__name__}: {str(e).splitlines()[0][:80]}")
            cache[cache_key]["seconds"] = round(time.perf_counter() - t0, 1)
            torch.cuda.empty_cache()
        got = cache[cache_key]
        result.update({f"{side}_value": got.get("value"), f"{side}_note": got.get("note") or "",
                       f"{side}_peak_gib": got.get("peak_gib"), f"{side}_setup_s": got.get("setup_s")})
    return result


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=",".join(GROUPS), help=f"comma-separated, from {', '.join(GROUPS)}")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    p.add_argument("--json", default="benchmarks/results/training_table.json")
    args = p.parse_args(argv)
    unknown = [g for g in args.rows.split(",") if g not in GROUPS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {', '.join(GROUPS)}")
    if not torch.cuda.is_available():
        print("skipped: no CUDA device (this table times GPU training; the CPU is not where users train)")
        return 0
    device = torch.device("cuda")
    env = environment(device)
    print(" ".join(f"{k} {v}" for k, v in env.items()))
    cache: Dict[str, Dict[str, Any]] = {}
    results = []
    for group in args.rows.split(","):
        for key in GROUPS[group]:
            results.append(measure_row(ROWS_BY_KEY[key], device, args.warmup, args.steps, cache))
            print(format_table(results[-1:]).splitlines()[-1], flush=True)
    print("\n" + format_table(results))
    compiled = [r for r in results if r["key"] == "compiled"]
    if compiled:
        r = compiled[0]
        print(f"\ncompile and first step: RMT-S {r['ours_setup_s']} s, Swin-T {r['peer_setup_s']} s; peak "
              f"{r['ours_peak_gib']} / {r['peer_peak_gib']} GiB")
    save_rows(args.json, env, vars(args), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
