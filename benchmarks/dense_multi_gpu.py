"""Multi-process dense prediction: `rmt detect train` and `rmt segment train` under torchrun.

    python benchmarks/dense_multi_gpu.py                      # CUDA: NCCL on 2 GPUs; else CPU, gloo
    python benchmarks/dense_multi_gpu.py --tasks upernet --steps 6

For each task (Mask R-CNN and Cascade Mask R-CNN on rmt_tiny with the built-in shapes data in
COCO format; UperNet on rmt_small with the built-in synthetic ADE20K-layout data) it runs the
training command as a subprocess and reports:

(a) one process at total batch 2B against 2 processes (torchrun) at batch B, same seed and
    steps: both loss curves and their largest difference;
(b) the largest parameter difference between the 2 ranks after the last step (the
    ``{"event": "ranks"}`` record the engines log);
(c) kill -9 of rank 1 once a checkpoint was written (``--save-every`` / ``--checkpoint-interval``),
    then ``--resume`` from it: final loss and weights against the uninterrupted 2-process run;
(d) CUDA only: training img/s of 2 processes against 1, at batch 2 per GPU (target >= 1.85x).

Without CUDA it runs on CPU with gloo at small sizes (images 128 px, crops 64 px, few steps,
light RoI heads); with CUDA, NCCL with NVLink multicast off (NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1) at 800 px images and 512 px crops. Prints one markdown
table and writes OUT/dense_multi_gpu.json with the curves.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from rmt.benchmark import environment  # noqa: E402
from rmt.engine.metrics_log import read_jsonl  # noqa: E402

TASKS = ("mask_rcnn", "cascade_mask_rcnn", "upernet")
# cheap RoI heads for CPU: few proposals and sampled RoIs
LIGHT_HEADS = dict(rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=300,
                   rpn_post_nms_top_n_test=100, box_batch_size_per_image=64)


def settings_for(device: str, args: argparse.Namespace) -> Dict[str, Any]:
    """Sizes and run lengths: small on CPU, the paper's image sizes on CUDA (flags override)."""
    cpu = device == "cpu"
    s = dict(device=device, image_size=128 if cpu else 800, crop=64 if cpu else 512, steps=4 if cpu else 20,
             batch=1 if cpu else 2, workers=0 if cpu else 4, num_images=16 if cpu else 64,
             det_model="rmt_tiny", seg_model="rmt_small", seg_head="upernet", backbone_kwargs={},
             detector_kwargs=LIGHT_HEADS if cpu else {}, scaling_steps=None if cpu else 40)
    for key in ("image_size", "crop", "steps", "batch", "workers", "num_images", "det_model", "seg_model",
                "seg_head", "scaling_steps"):
        if getattr(args, key, None) is not None:
            s[key] = getattr(args, key)
    if args.backbone_kwargs:
        s["backbone_kwargs"] = json.loads(args.backbone_kwargs)
    s["save_every"] = max(1, s["steps"] // 2)
    return s


# ------------------------------------------------------------------------------------------------
# launching runs
# ------------------------------------------------------------------------------------------------

def run_env(device: str) -> Dict[str, str]:
    """The subprocesses' environment: this checkout's sources first, NVLink multicast off."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]),
               NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", PYTHONUNBUFFERED="1")
    if device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    return env


def launcher(processes: int) -> List[str]:
    """``python -m rmt`` for one process, torchrun (standalone, a free port) for several."""
    if processes == 1:
        return [sys.executable, "-m", "rmt"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            "-m", "rmt"]


def train_args(task: str, s: Dict[str, Any], data: Path, out: Path, processes: int, batch: int,
               steps: int) -> List[str]:
    """Arguments of a fresh training run of ``task`` with ``batch`` images per process."""
    common = ["--device", s["device"], "--workers", str(s["workers"]), "--out", str(out), "--seed", "0"]
    if s["backbone_kwargs"]:
        common += ["--backbone-kwargs", json.dumps(s["backbone_kwargs"])]
    if task == "upernet":
        return ["segment", "train", "--data", str(data), "--model", s["seg_model"], "--head", s["seg_head"],
                "--iters", str(steps), "--batch-size", str(batch * processes), "--lr", "1e-4",
                "--warmup-iters", "1", "--crop-size", str(s["crop"]), "--log-interval", "1",
                "--checkpoint-interval", str(s["save_every"]), "--eval-interval", str(10 ** 9), *common]
    size = str(s["image_size"])
    return ["detect", "train", "--data", str(data), "--model", s["det_model"], "--detector", task,
            "--batch-size", str(batch), "--max-steps", str(steps), "--lr", "1e-4", "--warmup-iters", "2",
            "--min-size", size, "--max-size", size, "--log-every", "1", "--save-every", str(s["save_every"]),
            "--eval-every", "0", "--detector-kwargs", json.dumps(s["detector_kwargs"]), *common]


def resume_args(task: str, s: Dict[str, Any], out: Path, steps: int) -> List[str]:
    """Arguments continuing the run in ``out`` from its last checkpoint."""
    common = ["--device", s["device"], "--workers", str(s["workers"]), "--out", str(out)]
    if task == "upernet":
        return ["segment", "train", "--resume", *common]
    return ["detect", "train", "--resume", str(out / "last.pth"), "--max-steps", str(steps), *common]


def checkpoint_of(task: str, out: Path) -> Path:
    return out / ("last.pt" if task == "upernet" else "last.pth")


def launch(cmd: Sequence[str], env: Dict[str, str], log: Path, timeout: float) -> int:
    """Run ``cmd`` to the end with its output in ``log``; raise with the log's tail if it fails."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:  # leave no worker behind
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {rc}:\n{log.read_text()[-3000:]}")
    return rc


def rank_pid(root_pid: int, rank: int) -> Optional[int]:
    """The pid of the torchrun worker with ``RANK=rank`` among the descendants of ``root_pid`` (Linux)."""
    children: Dict[int, List[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    todo = list(children.get(root_pid, []))
    while todo:
        pid = todo.pop()
        try:
            environ = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
        todo.extend(children.get(pid, []))
    return None


def kill_rank_after_checkpoint(cmd: Sequence[str], env: Dict[str, str], checkpoint: Path, step_key: str,
                               at_least: int, log: Path, rank: int = 1, timeout: float = 600) -> Dict[str, Any]:
    """Start ``cmd`` (torchrun), SIGKILL rank ``rank`` as soon as ``checkpoint`` holds step >= ``at_least``.

    Returns ``{"killed": bool, "checkpoint_step": int | None, "returncode": int}``.
    """
    seen, step, killed = None, None, False
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                stamp = checkpoint.stat().st_mtime_ns if checkpoint.exists() else None
                if stamp is not None and stamp != seen:
                    seen = stamp
                    step = int(torch.load(checkpoint, map_location="cpu", weights_only=True)[step_key])
                    pid = rank_pid(proc.pid, rank) if step >= at_least else None
                    if pid is not None:
                        os.kill(pid, signal.SIGKILL)
                        killed = True
                        break
                time.sleep(0.1)
            rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return dict(killed=killed, checkpoint_step=step, returncode=rc)


# ------------------------------------------------------------------------------------------------
# reading runs
# ------------------------------------------------------------------------------------------------

def loss_curve(out: Path) -> Dict[int, float]:
    """Step -> logged training loss (the mean over ranks) of the run in ``out``."""
    curve = {}
    for r in read_jsonl(out / "log.jsonl"):
        value = r.get("loss", r.get("train_loss"))
        if isinstance(r.get("step"), int) and isinstance(value, float):
            curve[r["step"]] = value
    return curve


def logged_rank_diff(out: Path) -> Optional[float]:
    """The last ``rank_max_param_diff`` the run in ``out`` logged (None for one process)."""
    values = [r["rank_max_param_diff"] for r in read_jsonl(out / "log.jsonl") if r.get("event") == "ranks"]
    return values[-1] if values else None


def median_img_per_s(out: Path) -> Optional[float]:
    """Median of the logged img/s windows after the first (warm-up and compilation excluded)."""
    values = [r["img_per_s"] for r in read_jsonl(out / "log.jsonl") if r.get("img_per_s")]
    return statistics.median(values[1:] or values) if values else None


def max_curve_diff(a: Dict[int, float], b: Dict[int, float]) -> Optional[float]:
    common = sorted(set(a) & set(b))
    return max(abs(a[s] - b[s]) for s in common) if common else None


def max_weight_diff(task: str, out_a: Path, out_b: Path) -> float:
    """Largest absolute difference of any floating-point model tensor between two checkpoints."""
    a = torch.load(checkpoint_of(task, out_a), map_location="cpu", weights_only=True)["model"]
    b = torch.load(checkpoint_of(task, out_b), map_location="cpu", weights_only=True)["model"]
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point())


# ------------------------------------------------------------------------------------------------
# one task
# ------------------------------------------------------------------------------------------------

def prepare_data(task: str, s: Dict[str, Any], root: Path) -> Path:
    if task == "upernet":
        from rmt.segmentation.synthetic import make_synthetic_dataset
        short = s["crop"]
        return make_synthetic_dataset(root / f"seg{short}", num_train=s["num_images"], num_val=1,
                                      size=(short, short * 5 // 4))
    from rmt.detection.shapes import write_shapes_dataset
    return write_shapes_dataset(root / f"shapes{s['image_size']}", num_train=s["num_images"], num_val=2,
                                image_size=s["image_size"])


def run_task(task: str, s: Dict[str, Any], work: Path, kill: bool = True, timeout: float = 1800) -> Dict[str, Any]:
    """(a)-(d) for one task; every run writes into ``work/TASK/NAME``."""
    env, steps, batch = run_env(s["device"]), s["steps"], s["batch"]
    if task == "upernet" and s["seg_head"] == "upernet" and batch < 2:
        batch = 2  # the pooling branch's BatchNorm sees one value per channel at batch 1 without SyncBN
    data = prepare_data(task, s, work / "data")
    base = work / task
    base.mkdir(parents=True, exist_ok=True)
    one, two = base / "one_process", base / "two_processes"

    def fresh(out: Path, processes: int, per_process: int, n: int) -> None:
        launch(launcher(processes) + train_args(task, s, data, out, processes, per_process, n), env,
               out.with_suffix(".log"), timeout)

    fresh(one, 1, 2 * batch, steps)
    fresh(two, 2, batch, steps)
    curve_one, curve_two = loss_curve(one), loss_curve(two)
    result: Dict[str, Any] = dict(
        task=task, model=f"{s['seg_model']} ({s['seg_head']})" if task == "upernet" else s["det_model"], steps=steps, batch_per_process=batch,
        total_batch=2 * batch, curves=dict(steps=sorted(curve_one), one_process=[curve_one[k] for k in sorted(curve_one)],
                                           two_processes=[curve_two.get(k) for k in sorted(curve_one)]),
        loss_max_diff=max_curve_diff(curve_one, curve_two), rank_max_param_diff=logged_rank_diff(two))

    if kill:
        killed = base / "killed"
        cmd = launcher(2) + train_args(task, s, data, killed, 2, batch, steps)
        k = kill_rank_after_checkpoint(cmd, env, checkpoint_of(task, killed),
                                       "iteration" if task == "upernet" else "step", s["save_every"],
                                       killed.with_suffix(".log"), timeout=timeout)
        if not k["killed"]:
            raise RuntimeError(f"{task}: the run ended before rank 1 could be killed after a checkpoint; "
                               f"use more --steps ({killed.with_suffix('.log')})")
        launch(launcher(2) + resume_args(task, s, killed, steps), env, base / "resumed.log", timeout)
        curve_resumed = loss_curve(killed)
        last = max(curve_two)
        result["kill"] = dict(
            checkpoint_step=k["checkpoint_step"], torchrun_returncode=k["returncode"],
            final_loss_uninterrupted=curve_two[last], final_loss_resumed=curve_resumed.get(last),
            loss_max_diff=max_curve_diff(curve_two, curve_resumed),
            weights_max_diff=max_weight_diff(task, two, killed), rank_max_param_diff=logged_rank_diff(killed))

    if s["scaling_steps"] and s["device"] == "cuda":
        single, double = base / "scaling_one", base / "scaling_two"
        fresh(single, 1, 2, s["scaling_steps"])
        fresh(double, 2, 2, s["scaling_steps"])
        one_rate, two_rate = median_img_per_s(single), median_img_per_s(double)
        result["scaling"] = dict(batch_per_gpu=2, img_per_s_one=one_rate, img_per_s_two=two_rate,
                                 ratio=two_rate / one_rate if one_rate and two_rate else None)
    return result


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------

def _g(x: Optional[float], fmt: str = ".3g") -> str:
    return "-" if x is None else format(x, fmt)


def markdown_table(results: Sequence[Dict[str, Any]]) -> str:
    head = ("| task | model | steps | 1 proc x batch 2B: final loss | 2 proc x batch B: final loss | "
            "loss curve max diff | ranks' max param diff | kill -9 after ckpt step | resumed final loss diff | "
            "resumed weights max diff | img/s 1 -> 2 GPUs |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        c = r["curves"]
        k = r.get("kill") or {}
        final_diff = (abs(k["final_loss_resumed"] - k["final_loss_uninterrupted"])
                      if k.get("final_loss_resumed") is not None else None)
        sc = r.get("scaling")
        scaling = (f"{sc['img_per_s_one']:.1f} -> {sc['img_per_s_two']:.1f} ({sc['ratio']:.2f}x)"
                   if sc and sc.get("ratio") else "not run (CPU)")
        rows.append(f"| {r['task']} | {r['model']} | {r['steps']} | {_g(c['one_process'][-1], '.4f')} | "
                    f"{_g(c['two_processes'][-1], '.4f')} | {_g(r['loss_max_diff'])} | {_g(r['rank_max_param_diff'])} | "
                    f"{k.get('checkpoint_step', '-')} | {_g(final_diff)} | {_g(k.get('weights_max_diff'))} | {scaling} |")
    return "\n".join(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {', '.join(TASKS)}")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 4 CPU, 20 CUDA)")
    p.add_argument("--batch", type=int, default=None, help="B, images per process of the 2-process runs "
                                                           "(default 1 CPU, 2 CUDA)")
    p.add_argument("--image-size", type=int, default=None, help="detection image side (default 128 CPU, 800 CUDA)")
    p.add_argument("--crop", type=int, default=None, help="segmentation crop (default 64 CPU, 512 CUDA)")
    p.add_argument("--num-images", type=int, default=None, help="training images of the built-in datasets")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--det-model", default=None)
    p.add_argument("--seg-model", default=None)
    p.add_argument("--seg-head", default=None, choices=("upernet", "fpn"))
    p.add_argument("--backbone-kwargs", default=None, help="JSON passed to every run (e.g. a tiny backbone)")
    p.add_argument("--scaling-steps", type=int, default=None, help="steps of the CUDA scaling runs (default 40)")
    p.add_argument("--no-kill", action="store_true", help="skip (c), the kill -9 and resume")
    p.add_argument("--out", default=os.environ.get("OUT", "benchmark-output/dense_multi_gpu"))
    args = p.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and torch.cuda.device_count() < 2:
        print("fewer than 2 CUDA devices: nothing to compare (use --device cpu for gloo on CPU)")
        return 1
    s = settings_for(device, args)
    out = Path(args.out)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = set(tasks) - set(TASKS)
    if unknown:
        p.error(f"unknown task(s) {', '.join(sorted(unknown))}; choose from {', '.join(TASKS)}")
    results = []
    for task in tasks:
        t0 = time.perf_counter()
        results.append(run_task(task, s, out, kill=not args.no_kill))
        results[-1]["wall_s"] = round(time.perf_counter() - t0, 1)
    import torchvision
    meta = dict(environment(torch.device(device)), backend="nccl" if device == "cuda" else "gloo",
                torchvision=torchvision.__version__, settings=s)
    table = markdown_table(results)
    print(f"device {meta['device']} ({meta['backend']}), torch {meta['torch']}, torchvision "
          f"{meta['torchvision']}, timm {meta['timm']}")
    print(table)
    for r in results:
        c = r["curves"]
        print(f"{r['task']} loss per step (1 proc | 2 procs): " + ", ".join(
            f"{st}: {a:.4f} | {_g(b, '.4f')}" for st, a, b in zip(c["steps"], c["one_process"], c["two_processes"])))
    (out / "dense_multi_gpu.json").write_text(json.dumps(dict(meta, results=results, table=table), indent=2))
    print(f"wrote {out / 'dense_multi_gpu.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
