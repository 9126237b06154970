"""Run directories that a failed start leaves behind: nothing in them but a config, so removed."""
from __future__ import annotations

from pathlib import Path
from typing import Optional


def first_missing_folder(path: Path) -> Optional[Path]:
    """The outermost of ``path`` and its parents that does not exist yet (None when ``path`` exists)."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    return missing[-1] if missing else None


def remove_unused_run_dir(run_dir: Path, created: Optional[Path]) -> None:
    """Remove a run directory that a failed start left with nothing in it but its config, and the
    empty folders above it up to ``created`` (the outermost one this start created)."""
    if not run_dir.is_dir() or any(p.name != "config.yaml" for p in run_dir.iterdir()):
        return
    (run_dir / "config.yaml").unlink(missing_ok=True)
    run_dir.rmdir()
    for folder in run_dir.parents:
        if created is None or not (folder == created or created in folder.parents) or any(folder.iterdir()):
            break
        folder.rmdir()
