"""Finding image files for the ``predict`` commands."""
from pathlib import Path
from typing import List, Sequence, Union

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(paths: Sequence[Union[str, Path]]) -> List[Path]:
    """Image files named directly or found (non-recursively, sorted) in the folders given."""
    out: List[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"'{p}' is neither an image file nor a folder")
    if not out:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, paths))}")
    return out
