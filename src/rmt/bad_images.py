"""One rule, in every training pipeline, for an image that cannot be loaded or augmented.

The error names the image, the step that failed (reading the file, or which transform) and the
cause. With ``--skip-bad-images`` the data set returns a :class:`SkippedImage` in the sample's place:
the collate functions drop it and the batches count and name it. Without, the error stops the run,
after the training loop has written a checkpoint to resume from.

Errors raised in DataLoader worker processes come back as the same type with the worker's
traceback in the message; :func:`bad_image_message` finds the line that matters again.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Set, Tuple

SKIP_HINT = "pass --skip-bad-images to count and skip such images"


class BadImageError(RuntimeError):
    """An image that cannot be read or augmented; the message names the image, the step and the cause.

    ``problem`` is the message without the advice (what a skipped image is reported with).
    """

    def __init__(self, message: str, problem: str | None = None):
        super().__init__(message)
        self.problem = problem or message


class StepError(Exception):
    """Raised by a named sub-step of a transform (e.g. one RandAugment op), so that the error can name it."""

    def __init__(self, step: str, cause: BaseException):
        super().__init__(f"{step}: {type(cause).__name__}: {cause}")
        self.step, self.cause = step, cause


@dataclass(frozen=True)
class SkippedImage:
    """Returned by a data set in place of a sample that could not be loaded (skipping on)."""
    image: str
    reason: str


def _cause(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def read_error(image: str, cause: BaseException) -> BadImageError:
    """The error for an image file that cannot be opened or decoded."""
    problem = f"cannot read image '{image}' ({_cause(cause)})"
    return BadImageError(f"{problem}; remove or replace it, or {SKIP_HINT}", problem)


def transform_error(image: str, step: str, cause: BaseException) -> BadImageError:
    """The error for an image that a transform (``step``) failed on."""
    problem = f"cannot augment image '{image}': {step} raised {_cause(cause)}"
    return BadImageError(f"{problem}; {SKIP_HINT}", problem)


def load_sample(image: str, skip: bool, load: Callable[[], Any]) -> Any:
    """``load()``, or a :class:`SkippedImage` when it fails and ``skip``; else the failure as a
    :class:`BadImageError` naming ``image`` (errors not raised as one are named as loading errors)."""
    try:
        return load()
    except BadImageError as e:
        error = e
    except Exception as e:  # anything else that went wrong with this one sample
        problem = f"cannot load image '{image}': {failed_step(e)} raised {_cause(e)}"
        error = BadImageError(f"{problem}; {SKIP_HINT}", problem)
        error.__cause__ = e
    if skip:
        return SkippedImage(image, error.problem)
    raise error


def apply_transform(transform: Callable, image: str, *inputs: Any) -> Any:
    """``transform(*inputs)``, any exception raised as :class:`BadImageError` naming ``image`` and the step.

    The steps of a torchvision ``Compose`` run one by one (as ``Compose`` itself runs them), so the
    error names the step that failed, and the op inside it when the step raised a :class:`StepError`.
    """
    steps = getattr(transform, "transforms", None)
    if not isinstance(steps, (list, tuple)):
        steps = [transform]
    out: Any = None
    for i, step in enumerate(steps):
        try:
            out = step(*inputs) if i == 0 else step(out)
        except BadImageError:
            raise
        except StepError as e:
            raise transform_error(image, f"{type(step).__name__} op {e.step}", e.cause) from e.cause
        except Exception as e:
            raise transform_error(image, type(step).__name__, e) from e
    return out


def failed_step(error: BaseException) -> str:
    """Where ``error`` was raised: the innermost function of this package in its traceback, and the
    innermost function overall when that is another library's (e.g. ``CocoInstances._mask``)."""
    frames = []
    tb = error.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    if not frames:
        return "loading"
    def name(frame) -> str:  # co_qualname from Python 3.11
        return getattr(frame.f_code, "co_qualname", frame.f_code.co_name)

    ours = [f for f in frames if f.f_globals.get("__name__", "").startswith(__package__ or "rmt")]
    if not ours:
        return name(frames[-1])
    return name(ours[-1]) if ours[-1] is frames[-1] else f"{name(ours[-1])} (in {name(frames[-1])})"


def bad_image_message(text: str) -> str | None:
    """The ``cannot read/augment/load image ...`` line inside an error re-raised from a worker process, if any."""
    found = re.findall(r"cannot (?:read|decode|augment|load) image .*", text)  # the last: the traceback quotes the source
    return found[-1] if found else None


def bad_image_problem(error: BaseException) -> str:
    """What went wrong with the image, without the advice (for messages that give their own)."""
    text = bad_image_message(str(error)) or str(error)
    for advice in (f"; remove or replace it, or {SKIP_HINT}", f"; {SKIP_HINT}"):
        if text.endswith(advice):
            return text[:-len(advice)]
    return text


def drop_skipped(batch: Sequence[Any]) -> Tuple[List[Any], List[SkippedImage]]:
    """The samples of a batch, and the :class:`SkippedImage` markers among them."""
    skipped = [b for b in batch if isinstance(b, SkippedImage)]
    return [b for b in batch if not isinstance(b, SkippedImage)], skipped


def gathered_names(report: Optional["SkipReport"]) -> List[str]:
    """The names of the images ``report`` (None: a source that skips none) skipped, over every
    process of a torchrun job (a collective: all call it)."""
    names = list(report.names) if report is not None else []
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: List[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, names)
        names = sorted({n for part in parts for n in part})
    return names


def shown_names(names: Sequence[str], limit: int = 5) -> str:
    """The first ``limit`` names, and how many more there are (all of them are in log.jsonl)."""
    more = f" and {len(names) - limit} more (see log.jsonl)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class SkipReport:
    """Counts skipped images and names each once on stderr as it is met (``names`` keeps them all)."""

    def __init__(self):
        self.count = 0
        self.names: List[str] = []
        self._seen: Set[str] = set()

    def add(self, skipped: Sequence[SkippedImage]) -> None:
        for s in skipped:
            self.count += 1
            if s.image not in self._seen:
                self._seen.add(s.image)
                self.names.append(s.image)
                from tqdm import tqdm
                tqdm.write(f"skipped: {s.reason}", file=sys.stderr)

    def summary(self) -> str:
        """``N images skipped: NAME, NAME`` (empty when none was)."""
        if not self.count:
            return ""
        return f"{self.count} image{'s' if self.count != 1 else ''} skipped: {', '.join(self.names)}"
