"""One JSON object per line for every logged step/epoch, and PNG plots drawn from that log."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional


class JsonlLogger:
    """Append records to ``path`` (only when ``enabled``, i.e. on rank 0); each line is flushed."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=_jsonable) + "\n")


    def drop_after(self, step: int) -> int:
        """Remove the records of steps after ``step`` (those a resumed run logs again); returns how many.

        Records without a step stay; so does nothing else when the log is shorter.
        """
        if not (self.enabled and self.path.is_file()):
            return 0
        lines = self.path.read_text().splitlines()
        keep = []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line torn by the kill
                continue
            if not isinstance(record, dict) or not isinstance(record.get("step"), (int, float)) \
                    or record["step"] <= step:
                keep.append(line)
        if len(keep) < len(lines):
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            tmp.replace(self.path)
        return len(lines) - len(keep)


def read_jsonl(path: str | Path) -> List[Dict[str, Any]]:
    """All records of a JSONL log; a line torn by a crash at the end is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_curves(log_path: str | Path, out_png: str | Path, groups: Dict[str, Iterable[str]],
                x_key: str = "step", title: Optional[str] = None) -> Optional[Path]:
    """Draw one panel per group of keys (e.g. ``{"loss": ["train_loss"], "lr": ["lr"]}``).

    Records lacking a key are skipped for that curve. Returns the PNG path, or None when the log
    has nothing to draw.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl(log_path)
    panels = [(name, list(keys)) for name, keys in groups.items()
              if any(k in r for r in records for k in keys)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (name, keys) in zip(axes[0], panels):
        for key in keys:
            pts = [(r[x_key], r[key]) for r in records
                   if key in r and x_key in r and r[key] is not None and math.isfinite(r[key])]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, label=key)
        ax.set_title(name)
        ax.set_xlabel(x_key)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, out_png)


def save_figure(fig, path: str | Path) -> Path:
    """Save a matplotlib figure atomically (temporary file, then rename) at 110 dpi and close it."""
    import matplotlib.pyplot as plt
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def _jsonable(x: Any) -> Any:
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)
