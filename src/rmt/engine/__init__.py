"""Shared machinery of the training commands (classification, detection, segmentation).

* :mod:`.distributed` - torchrun/DDP set-up, per-rank seeds, rank-0-only side effects, the ranks'
  parameter agreement at the end of a run;
* :mod:`.state` - atomic checkpoints with every state a resumed run needs (RNG included);
* :mod:`.metrics_log` - a JSONL log per run and PNG plots of its curves.
"""
from .distributed import (DistInfo, cleanup_distributed, rank_param_disagreement, report_rank_agreement,
                          seed_everything, setup_distributed)
from .metrics_log import JsonlLogger, plot_curves
from .state import (CheckpointWriteError, capture_rng_state, load_checkpoint, remove_partial_writes,
                    restore_rng_state, save_checkpoint)

__all__ = ["DistInfo", "setup_distributed", "cleanup_distributed", "seed_everything", "rank_param_disagreement",
           "report_rank_agreement", "JsonlLogger",
           "plot_curves", "save_checkpoint", "load_checkpoint", "capture_rng_state", "restore_rng_state",
           "remove_partial_writes", "CheckpointWriteError"]
