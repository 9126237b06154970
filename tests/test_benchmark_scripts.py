"""The GPU benchmark and kernel-tool scripts' code paths (benchmarks/, tools/), run at a tiny size on CPU
(Triton's interpreter)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rmt.config import fast_path
from rmt.ops.triton_support import HAS_TRITON

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_kernel_tiles_smoke_run_writes_a_row_per_kernel(tmp_path):
    out = tmp_path / "tiles.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(TOOLS / "kernel_tiles.py"), "--device", "cpu",
                           "--batch", "1", "--smoke", "--iters", "1", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    kernels = [r["kernel"] for r in rows]
    assert kernels == ["dwconv cpe 3x3", "dwconv lepe 5x5", "dwconv ffn 3x3", "layernorm forward",
                       "layernorm backward", "masa fwd row pass", "masa fwd full"]
    assert all(r["default_us"] > 0 and r["best_us"] <= r["default_us"] for r in rows)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_kernel_tiles_weight_gradient_sweep_has_a_cudnn_baseline(tmp_path):
    out = tmp_path / "wgrad.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(TOOLS / "kernel_tiles.py"), "--device", "cpu",
                           "--batch", "1", "--smoke", "--iters", "1", "--kernels", "dwconv_wgrad",
                           "--json", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert [r["kernel"] for r in rows] == ["dwconv wgrad cpe 3x3", "dwconv wgrad lepe 5x5", "dwconv wgrad ffn 3x3"]
    assert all(r["default_us"] > 0 and r["baseline_us"] > 0 for r in rows)


def _load(name: str):
    """The kernel tool ``tools/<name>.py`` as a module."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ncu --csv --page raw: a header row, a units row, one row per profiled kernel, among ncu's own messages
NCU_CSV = '''==PROF== Connected to process 123
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","dram__throughput.avg.pct_of_peak_sustained_elapsed","gpu__time_duration.sum","launch__occupancy_limit_registers","launch__registers_per_thread","sm__maximum_warps_per_active_cycle_pct","sm__throughput.avg.pct_of_peak_sustained_elapsed","sm__warps_active.avg.pct_of_peak_sustained_active"
"","","","","","","","","","","","%","nsecond","block","register/thread","%","%","%"
"0","77","python3","127.0.0.1","_dwconv_nhwc_kernel","1","7","(128, 1, 1)","(3584, 2, 1)","0","9.0","52.12","111,552","2","255","12.50","56.50","11.91"
"1","77","python3","127.0.0.1","cublas_gemv_kernel","1","7","(256, 1, 1)","(8, 1, 1)","0","9.0","10.0","5,000","8","32","100","10","90"
"2","77","python3","127.0.0.1","_ln_fwd_kernel","1","7","(128, 1, 1)","(100, 1, 1)","0","9.0","80.5","20,000","4","96","50","30.5","45.0"
==PROF== Disconnected from process 123
'''


def test_kernel_ncu_parses_raw_csv_and_pairs_rows_with_launch_labels():
    ncu = _load("kernel_ncu")
    rows = ncu.parse_ncu_csv(NCU_CSV.splitlines())
    assert [r["kernel"] for r in rows] == ["_dwconv_nhwc_kernel", "cublas_gemv_kernel", "_ln_fwd_kernel"]
    first = rows[0]
    assert first["regs"] == 255 and first["blk/SM"] == 2 and first["grid"] == "(3584, 2, 1)"
    assert first["theor occ %"] == 12.5 and first["occ %"] == 11.91 and first["DRAM %"] == 52.12
    assert first["us"] == pytest.approx(111.552)  # nanoseconds with a thousands separator
    labels = [["cpe fwd", "_dwconv_nhwc_kernel"], ["ln fwd", "_ln_fwd_kernel"], ["ln bwd", "_ln_bwd_kernel"]]
    paired = ncu.pair_with_labels(rows, labels)
    assert [(p["op"], p["kernel"]) for p in paired] == [("cpe fwd", "_dwconv_nhwc_kernel"),
                                                        ("ln fwd", "_ln_fwd_kernel"), ("ln bwd", "_ln_bwd_kernel")]
    assert paired[1]["us"] == pytest.approx(20.0) and "us" not in paired[2]  # no row profiled for it
    table = ncu.format_table(paired).splitlines()
    assert len(table) == 4 and "255.0" in table[1] and table[3].split()[-1] == "-"
    # newer ncu releases name the DRAM throughput gpu__dram_throughput; a metric absent from both is NaN
    renamed = ncu.parse_ncu_csv(NCU_CSV.replace('"dram__throughput', '"gpu__dram_throughput')
                                .replace(',"launch__occupancy_limit_registers"', ',"other"').splitlines())
    assert renamed[2]["DRAM %"] == 80.5 and renamed[0]["blk/SM"] != renamed[0]["blk/SM"]


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_kernel_ncu_workload_labels_each_triton_launch(tmp_path):
    """The workload's ops run (Triton's interpreter here) and each Triton launch of the profiled pass
    gets its op's label: one per depthwise and LayerNorm op, two per decomposed MaSA forward (row and
    column passes), one for the full form."""
    import torch
    ncu = _load("kernel_ncu")
    labels = ncu.run_workload(1, str(tmp_path / "labels.json"), torch.device("cpu"),
                              [(5, 32, 2, "decomposed"), (3, 32, 2, "full")])
    assert json.loads((tmp_path / "labels.json").read_text()) == labels
    assert fast_path.direct_launch  # restored
    ops = [op for op, _ in labels]
    assert ops.count("dwconv lepe 5x5 fwd 5x5x32") == 1 and ops.count("layernorm bwd 3x3x32") == 1
    assert ops.count("masa infer decomposed 5x5x32/2") == 2 and ops.count("masa infer full 3x3x32/2") == 1
    assert {name for _, name in labels} >= {"_dwconv_nhwc_kernel", "_ln_fwd_kernel", "_ln_bwd_kernel",
                                              "masa_fwd_seqs_kernel"}
    assert all(name.startswith(("_dwconv", "_ln_", "masa_")) for _, name in labels)  # what KERNELS matches


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_kernel_ab_compares_a_revision_with_itself(tmp_path):
    """``kernel_ab.py --old src`` imports this tree a second time as the old revision: every kernel
    call of the smoke stage appears once, with identical outputs on both sides."""
    out = tmp_path / "ab.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(TOOLS / "kernel_ab.py"), "--old", str(ROOT / "src"),
                           "--device", "cpu", "--smoke", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert [r["kernel"] for r in rows] == [
        f"dwconv {name} {direction}" for name in ("cpe 3x3", "lepe 5x5", "ffn 3x3") for direction in ("fwd", "dgrad")
    ] + [f"masa {mode} {what}" for mode in ("row", "col") for what in ("fwd", "fwd+lse", "bwd")]
    assert all(r["max_rel_diff"] == 0.0 and r["old_us"] > 0 and r["new_us"] > 0 for r in rows)
    assert "summed over RMT-S's blocks" in proc.stdout


def test_kernel_ab_names_a_missing_old_tree(tmp_path):
    proc = subprocess.run([sys.executable, str(TOOLS / "kernel_ab.py"), "--old", str(tmp_path),
                           "--device", "cpu", "--smoke"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "no rmt/ops/dwconv.py" in proc.stderr


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_inference_pieces_smoke_run_prints_every_piece():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(TOOLS / "inference_pieces.py"), "--device", "cpu",
                           "--batch", "1", "--size", "32", "--iters", "1"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    fc1 = [line for line in lines if line.startswith("fc1 ")]
    assert len(fc1) == 4 and any(line.startswith("per RMT-S batch (29 blocks)") for line in lines)
    stem = [line for line in lines if line.startswith("stem conv+bn+gelu 1x3x32x32")]
    assert len(stem) == 1 and float(stem[0].split()[-1]) <= 1e-4   # kernel against the modules
    bad = subprocess.run([sys.executable, str(TOOLS / "inference_pieces.py"), "--device", "cpu",
                          "--parts", "gemm"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode != 0 and "unknown parts ['gemm']" in bad.stderr


def test_step_breakdown_books_each_kernel_to_its_innermost_range():
    """Kernels go to the innermost labelled range around them (per piece and token grid), device
    copies of the ranges themselves are not counted, unlabelled kernels are listed as such; the
    wrappers are installed and removed again."""
    from types import SimpleNamespace as Event

    step_breakdown = _load("step_breakdown")
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def event(name, start, end, device):
        return Event(name=name, time_range=Event(start=start, end=end), device_type=device)
    events = [event("rmt/block fwd other|56x56", 0, 100, cpu), event("rmt/cpe fwd|56x56", 10, 30, cpu),
              event("rmt/cpe fwd|56x56", 10, 31, cuda),          # the range's own device-side copy
              event("aten::add", 40, 45, cpu),
              event("_dwconv_nhwc_kernel", 12, 20, cuda), event("add_kernel", 40, 50, cuda),
              event("rmt/masa bwd|28x28", 200, 300, cpu), event("masa_bwd_tile_kernel", 210, 290, cuda),
              event("stray_kernel", 400, 404, cuda)]
    table = step_breakdown._table(events, 2)
    rows = {line.split()[0] + " " + line.split()[1]: line.split() for line in table.splitlines()[2:6]}
    assert table.splitlines()[0].startswith("GPU time of one step: 0.10 ms in 4 kernels")
    assert rows["masa bwd"][2:6] == ["0.000", "0.080", "0.000", "0.080"]   # 56x56, 28x28, -, total
    assert rows["cpe fwd"][2:6] == ["0.008", "0.000", "0.000", "0.008"]
    assert rows["block fwd"][3] == "0.010"                               # the add outside the cpe range
    assert "unlabelled: stray_kernel 0.004" in table
    from rmt.ops import dwconv
    original = dwconv._forward
    saved = step_breakdown.install()
    assert dwconv._forward is not original
    for owner, attr, fn in saved:
        setattr(owner, attr, fn)
    assert dwconv._forward is original


def test_inference_switches_parses_modes_into_switches():
    tool = _load("inference_switches")
    assert tool.parse_mode("eager") == ("eager", {}, [])
    assert tool.parse_mode("compiled-convref-cpu_chunk-reference") == (
        "compiled", {"dwconv_kernels": False, "cpu_chunk_logit_bytes": 0}, ["reference"])
    assert tool.parse_mode("eager-fold_conv_bias_devices-gelu_epilogue") == (
        "eager", {"fold_conv_bias_devices": (), "gelu_epilogue": False}, [])
    with pytest.raises(SystemExit, match="unknown part 'convrf'"):
        tool.parse_mode("eager-convrf")
    with pytest.raises(SystemExit, match="starts with eager or compiled"):
        tool.parse_mode("graphed")


def test_inference_switches_alternates_the_order_and_sets_malloc_thresholds_on_cpu(monkeypatch):
    """``--switch X`` times eager and eager-X, then eager-X and eager, ...; each CPU mode sets glibc's
    thresholds (raised as the rmt commands do, initial for ``malloc``) and the switch is on afterwards."""
    from types import SimpleNamespace
    tool = _load("inference_switches")
    for switch in ("cpu_pad", "malloc"):
        seen, kept = [], []
        monkeypatch.setattr(tool, "keep_freed_memory", lambda threshold=tool.DEFAULT_THRESHOLD: kept.append(threshold))

        def measure(*args, **kwargs):
            seen.append(fast_path.cpu_pad_keys if switch == "cpu_pad" else kept[-1] == tool.DEFAULT_THRESHOLD)
            return SimpleNamespace(img_per_s=1.0 + len(seen))
        monkeypatch.setattr(tool.bm, "measure", measure)
        monkeypatch.setattr(tool.bm, "format_row", lambda row: "")
        monkeypatch.setattr(sys, "argv", ["inference_switches.py", "--device", "cpu", "--switch", switch,
                                          "--repeats", "3", "--batch", "1", "--size", "32", "--iters", "1"])
        assert tool.main() == 0
        assert seen == [True, False, False, True, True, False]
        assert kept[-1] == tool.DEFAULT_THRESHOLD and len(kept) == 7   # one per run, then left raised
    assert fast_path.cpu_pad_keys is True
