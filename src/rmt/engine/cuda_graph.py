"""A whole training step (forward, loss, backward, clipping, optimizer) captured in one CUDA graph.

An eager step launches thousands of small kernels; when the GPU finishes them faster than Python
issues them, the step waits on the CPU. Capturing the step once and replaying it removes that cost
for training runs whose batches all have one shape (``rmt train --cuda-graph``).

How it works: the first ``warmup`` steps run eagerly on a side stream (they are real training steps;
they also compile the Triton kernels and let cuDNN pick algorithms, neither of which may happen
during capture). The next step is captured with the batch copied into static input tensors and
then replayed; every later step copies its batch into those tensors and replays. The optimizer must
be ``capturable``; its learning rates become device tensors that are refreshed from the param
groups (which the scheduler keeps updating as floats) before each replay. Gradients live in the
graph's memory pool and are overwritten, never zeroed, by each replay.

Under DDP the all-reduces are captured too. DDP keeps the parameters' gradient-accumulation nodes
from its construction on, and those nodes run on the stream that was current then; DDP must
therefore be built on the stream that later captures (pass it as ``stream``), or the backward pass
makes the default stream wait on the capturing one and the capture fails.

:class:`GraphedInference` does the same for inference: one graph per input shape (``rmt eval
--cuda-graph``, ``rmt benchmark --impls graphs``), for hosts too slow to launch an eager forward
pass as fast as the GPU runs it.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.utils._pytree as pytree


class GraphedTrainStep:
    """``step(images, labels) -> loss`` (a device scalar) that captures itself after ``warmup`` steps."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable, optimizer: torch.optim.Optimizer,
                 amp_dtype: Optional[torch.dtype], clip_grad: Optional[float], warmup: int = 3,
                 stream: Optional[torch.cuda.Stream] = None):
        if not all(group.get("capturable", False) for group in optimizer.param_groups):
            raise ValueError("a CUDA-graph training step needs a capturable optimizer "
                             "(torch.optim.AdamW(..., capturable=True))")
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.amp_dtype, self.clip_grad, self.warmup = amp_dtype, clip_grad, warmup
        self.steps = 0
        # warm-up and capture run on this stream; DDP must be built under it too (see the module docstring)
        self.stream = stream if stream is not None else torch.cuda.Stream()
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.static_images = self.static_labels = self.static_loss = None
        self.lr_tensors: List[torch.Tensor] = []

    def _eager(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None,
                            cache_enabled=False):
            loss = self.loss_fn(self.model(images), labels)
        loss.backward()
        if self.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.optimizer.step()
        return loss.detach()

    def _refresh_lr(self) -> None:
        for tensor, group in zip(self.lr_tensors, self.optimizer.param_groups):
            tensor.fill_(float(group["lr"]))

    def _capture(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.static_images, self.static_labels = images.clone(), labels.clone()
        device = images.device
        floats = [float(group["lr"]) for group in self.optimizer.param_groups]
        self.lr_tensors = [torch.tensor(lr, dtype=torch.float32, device=device) for lr in floats]
        for group, tensor in zip(self.optimizer.param_groups, self.lr_tensors):
            group["lr"] = tensor               # the captured kernels read the rate from this memory
        self.optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph, stream=self.stream):
                self.static_loss = self._eager(self.static_images, self.static_labels)
        except RuntimeError as e:  # an operation of the step that a graph cannot hold
            self.graph = None
            raise RuntimeError(
                f"--cuda-graph: the training step could not be captured in a CUDA graph ({e}). Some "
                "operations cannot be captured, e.g. ones that read values back to the CPU or, on "
                "older PyTorch, the RNG bookkeeping of --grad-checkpointing; train without --cuda-graph") from e
        finally:
            for group, lr in zip(self.optimizer.param_groups, floats):
                group["lr"] = lr               # the scheduler goes on writing floats

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        if self.graph is None and self.steps <= self.warmup:
            side = self.stream
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss = self._eager(images, labels)
                self.optimizer.zero_grad(set_to_none=True)
            torch.cuda.current_stream().wait_stream(side)
            return loss
        if self.graph is None:
            self._capture(images, labels)
        elif images.shape != self.static_images.shape or labels.shape != self.static_labels.shape:
            raise RuntimeError(
                f"--cuda-graph needs every batch to have one shape; got images {tuple(images.shape)} and labels "
                f"{tuple(labels.shape)} after capturing {tuple(self.static_images.shape)} and "
                f"{tuple(self.static_labels.shape)} (drop the last incomplete batch, or train without --cuda-graph)")
        self.static_images.copy_(images)
        self.static_labels.copy_(labels)
        self._refresh_lr()
        self.graph.replay()
        return self.static_loss

    def release(self) -> None:
        """Free the captured graph (and with it the graph's hold on NCCL communicators) once training is over.

        A graph that still holds NCCL collectives makes ``destroy_process_group`` hang (pytorch
        issue 115388), so the trainer calls this before the process group is torn down, also after
        an error. Idempotent."""
        graph, self.graph = self.graph, None
        if graph is not None:
            try:
                torch.cuda.synchronize()
            finally:
                graph.reset()


class GraphedInference:
    """``run(images) -> model(images)`` under ``torch.inference_mode`` (and autocast to ``amp_dtype``),
    replayed from a CUDA graph captured for each input shape, dtype and memory layout.

    The first call with a new shape runs the model ``warmup`` times eagerly on a side stream (Triton
    compiles, cuDNN picks its algorithms), then captures one call with the input copied into a
    static tensor. Later calls with that shape copy their input in and replay. The output (a
    tensor, or lists, tuples and dicts of them, as ``features_only`` models return) is cloned, so
    the next replay does not overwrite it; outputs are inference tensors. At most ``max_graphs``
    graphs are kept; the least recently used is freed first.

    Put the model in eval mode first: the graph holds whatever the captured call did (dropout and
    batch statistics included). Weights may be updated in place between calls, since the graph
    reads them from the same memory; replacing parameters or modules needs a new runner. An RMT
    model's block graphs replay training kernels only, so they play no part here.
    """

    def __init__(self, model: torch.nn.Module, amp_dtype: Optional[torch.dtype] = None, warmup: int = 2,
                 max_graphs: int = 4):
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be at least 1, got {max_graphs}")
        self.model, self.amp_dtype, self.warmup, self.max_graphs = model, amp_dtype, warmup, max_graphs
        self.graphs: "OrderedDict[Tuple, Tuple[torch.cuda.CUDAGraph, torch.Tensor, Any]]" = OrderedDict()
        self.captures = self.replays = 0

    def _eager(self, images: torch.Tensor) -> Any:
        amp = (torch.autocast("cuda", dtype=self.amp_dtype, cache_enabled=False) if self.amp_dtype is not None
               else contextlib.nullcontext())
        with torch.inference_mode(), amp:
            return self.model(images)

    def _capture(self, images: torch.Tensor) -> Tuple["torch.cuda.CUDAGraph", torch.Tensor, Any]:
        static = images.clone()  # keeps the memory format
        side = torch.cuda.Stream(images.device)
        side.wait_stream(torch.cuda.current_stream(images.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self._eager(static)
        torch.cuda.current_stream(images.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                out = self._eager(static)
        except RuntimeError as e:
            raise RuntimeError(
                f"CUDA-graph inference: the model's forward pass could not be captured ({e}). Operations "
                "that read values back to the CPU or change shape with the data cannot be captured; run "
                "without --cuda-graph") from e
        self.captures += 1
        return graph, static, out

    def __call__(self, images: torch.Tensor) -> Any:
        if not images.is_cuda:
            raise ValueError(f"CUDA-graph inference needs CUDA inputs, got a {images.device.type} tensor: "
                             "move the model and the images to a GPU, or run without --cuda-graph")
        key = (tuple(images.shape), images.stride(), images.dtype, images.device)
        with torch.inference_mode():  # the static tensors are inference tensors whatever the caller's mode
            entry = self.graphs.get(key)
            if entry is None:
                while len(self.graphs) >= self.max_graphs:
                    self.graphs.popitem(last=False)[1][0].reset()
                entry = self.graphs[key] = self._capture(images)
            else:
                self.graphs.move_to_end(key)
            graph, static, out = entry
            static.copy_(images)
            graph.replay()
            self.replays += 1
            return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)

    def release(self) -> None:
        """Free every captured graph (and its memory pool). Idempotent."""
        while self.graphs:
            self.graphs.popitem(last=False)[1][0].reset()
