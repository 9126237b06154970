"""Training blocks replayed from CUDA graphs: an eager training step without most of its launch cost.

An eager RMT training step is bound by the host: on an H100 it spends about 104 ms per step of 128
images launching kernels, against about 60 ms of GPU work (BENCHMARKS.md, run P); with graphs RMT-S
trains at 2,028 img/s against 1,092 eager on the same H100, and at 2,198 against 1,095 on an H200
(run Q, peak 8.95 against 8.61 GiB). ``rmt train`` turns them on by default on CUDA. With
``model.set_block_graphs(True)`` each block records the kernels of
:func:`rmt.ops.block.block_forward` and :func:`rmt.ops.block.block_backward` once in two CUDA graphs
and from then on replays them: per block the host launches two graphs and two or three copies instead of
about a hundred kernels. Everything else (stem, downsampling, head, loss, optimizer, DDP's hooks)
stays eager, so the training loop and the numbers are unchanged.

A block replays its graphs when

* the same signature (input shape and dtype, the drop-path and layer-scale factors, which inputs want
  gradients, the parameters' addresses, the stage's position tables, autocast) came in more than
  ``rmt.config.fast_path.block_graph_warmup_calls`` consecutive calls and an eager backward has run since it first came (so every
  kernel is compiled before capture);
* the previous replay's backward has run or its autograd graph is gone: a second forward before the
  backward (two views through one model) runs eagerly;
* the caller is not capturing a CUDA graph itself (``rmt train --cuda-graph``) and no saved-tensor
  hooks are active (gradient checkpointing, ``save_on_cpu``).

Everything else runs the same kernels eagerly: an odd last batch, a changed shape, CPU tensors. The
saved activations live in one CUDA-graph memory pool per model and stay allocated between steps; each
block also keeps a static copy of its input (the eager block saves its input too) and its parameters'
gradients, and the blocks of one shape share their output and gradient buffers (see
:class:`ModelGraphs`). A backward whose forward was replayed over (``retain_graph=True``, then another
forward, then the old graph's backward) raises. Module switches of :mod:`rmt.ops` changed after
capture take effect after ``model.set_block_graphs(True)`` again. Not for FSDP, which moves parameters
between forward and backward (the backward then raises; ``rmt train`` leaves them off under ``--fsdp``).
"""
import gc
import warnings
import weakref
from typing import Dict, NamedTuple, Optional, Sequence

import torch

from ..config import fast_path
from .block import BlockSpec, block_backward, block_forward, output_dtype



class _Captured(NamedTuple):
    signature: tuple
    forward: "torch.cuda.CUDAGraph"
    backward: "torch.cuda.CUDAGraph"
    inputs: tuple           # static x, scale1, scale2 (None where absent)
    out: torch.Tensor
    grad: torch.Tensor      # static gradient of out
    grads: tuple            # static gradients, one per block_forward input (None where not wanted)
    keep: tuple             # spec, parameters and saved activations the graphs read by address


class _Token:
    """Alive as long as the autograd node of a replayed forward (held weakly by the block)."""
    __slots__ = ("__weakref__",)


class ModelGraphs:
    """What the blocks of one model share: a CUDA-graph memory pool per device, and per block shape one
    output buffer and one gradient buffer.

    Sharing those buffers among the blocks of a stage is safe because a block's output is copied
    out right after its forward replay, and a block's backward reads its incoming gradient from the
    gradient buffer before writing its input gradient there, which is the incoming gradient of the
    block before it (so handing it on needs no copy). Where a float32 layer scale makes the output
    float32 under autocast, the bf16 input gradient goes to a third buffer, which autograd's cast to
    float32 reads before the block before it runs."""

    def __init__(self) -> None:
        self._pools: Dict[int, tuple] = {}
        # held by the captures that use them: a shape no block replays any more frees its buffers
        self._buffers: "weakref.WeakValueDictionary[tuple, torch.Tensor]" = weakref.WeakValueDictionary()

    def buffer(self, role: str, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The shared contiguous tensor for ``role`` ("out", "grad" or "input grad") of this shape and dtype."""
        key = (role, tuple(shape), dtype, device)
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = torch.empty(shape, dtype=dtype, device=device)
            self._buffers[key] = buffer
        return buffer

    def pool(self, device: torch.device) -> tuple:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._pools:
            self._pools[index] = torch.cuda.graph_pool_handle()
        return self._pools[index]


class BlockGraphs:
    """One block's graphs and the bookkeeping that decides when to replay them."""

    def __init__(self, shared: ModelGraphs) -> None:
        self.shared = shared
        self.captured: Optional[_Captured] = None
        self.candidate: Optional[tuple] = None
        self.count = 0                 # consecutive calls with ``candidate``
        self.eager_backwards = 0       # backward passes of the eager block so far
        self.backwards_at_first = 0    # ... when ``candidate`` first came
        self.generation = 0            # replayed forwards so far
        self.live: Optional[weakref.ref] = None
        self.failed: set = set()
        self.replays = 0               # forward replays, for tests and benchmarks
        self.captures = 0

    def pending(self) -> bool:
        """A replayed forward whose backward has not run and whose autograd graph still exists."""
        return self.live is not None and self.live() is not None

    def run(self, x: torch.Tensor, scale1: Optional[torch.Tensor], scale2: Optional[torch.Tensor],
            spec: BlockSpec, params: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
        """The block's output from the graphs, or ``None`` where the caller should run it eagerly."""
        if x.device.type != "cuda" or torch.cuda.is_current_stream_capturing() or _saving_through_hooks():
            return None
        needs = (x.requires_grad, _wants_grad(scale1), _wants_grad(scale2), False,
                 *(p.requires_grad for p in params))
        signature = _signature(x, scale1, scale2, spec, params, needs)
        captured = self.captured
        if captured is None or captured.signature != signature:
            if signature != self.candidate:
                self.candidate, self.count, self.backwards_at_first = signature, 0, self.eager_backwards
            self.count += 1
            if (self.count <= fast_path.block_graph_warmup_calls or self.eager_backwards == self.backwards_at_first
                    or self.pending() or signature in self.failed):
                return None
            captured = self._capture(signature, x, scale1, scale2, spec, params, needs)
            if captured is None:
                return None
        elif self.pending():
            return None
        self.candidate = None
        return _GraphedBlock.apply(x, scale1, scale2, self, *params)

    def _capture(self, signature: tuple, x: torch.Tensor, scale1: Optional[torch.Tensor],
                 scale2: Optional[torch.Tensor], spec: BlockSpec, params: Sequence[torch.Tensor],
                 needs: tuple) -> Optional[_Captured]:
        self.captured = None  # the previous graphs' buffers go back to the pool first
        pool = self.shared.pool(x.device)
        inputs = tuple(None if t is None else torch.empty_like(t).copy_(t.detach()) for t in (x, scale1, scale2))
        dtype = output_dtype(x, scale1, scale2)
        out = self.shared.buffer("out", x.shape, dtype, x.device)
        grad = self.shared.buffer("grad", x.shape, dtype, x.device)
        collecting = gc.isenabled()
        gc.disable()  # a garbage collection during capture could free another graph's memory: not allowed then
        try:
            forward, backward = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.graph(forward, pool=pool, capture_error_mode="thread_local"):
                out, state = block_forward(*inputs, spec, params, needs, out=out)
            # autograd runs a backward without autocast
            with torch.no_grad(), torch.autocast("cuda", enabled=False):
                with torch.cuda.graph(backward, pool=pool, capture_error_mode="thread_local"):
                    grads = block_backward(state, spec, needs, grad)
                    if grads[0] is not None:
                        # the input gradient is the previous block's incoming gradient: hand it on in place;
                        # in another dtype (a float32 layer scale under autocast) autograd casts it first
                        to = grad if grads[0].dtype == dtype else self.shared.buffer(
                            "input grad", x.shape, grads[0].dtype, x.device)
                        grads = (to.copy_(grads[0]), *grads[1:])
        except Exception as error:  # noqa: BLE001 - any capture failure: run this signature eagerly
            warnings.warn(f"RMT block graphs: capturing a block failed ({type(error).__name__}: {error}); "
                          "this input shape trains without them", RuntimeWarning, stacklevel=4)
            self.failed.add(signature)
            return None
        finally:
            if collecting:
                gc.enable()
        # the saved activations stay referenced: freed, the pool would hand their memory to other captures
        self.captured = _Captured(signature, forward, backward, inputs, out, grad, tuple(grads),
                                  (spec, tuple(params), state))
        self.captures += 1
        return self.captured


class _GraphedBlock(torch.autograd.Function):
    """``block_forward`` / ``block_backward`` as replays of the block's captured graphs."""

    @staticmethod
    def forward(ctx, x, scale1, scale2, graphs: BlockGraphs, *params):
        captured = graphs.captured
        for static, given in zip(captured.inputs, (x, scale1, scale2)):
            if static is not None:
                static.copy_(given)
        captured.forward.replay()
        graphs.generation += 1
        graphs.replays += 1
        ctx.graphs, ctx.captured, ctx.generation, ctx.params = graphs, captured, graphs.generation, params
        ctx.token = _Token()
        graphs.live = weakref.ref(ctx.token)
        return captured.out.clone()  # the static output is overwritten by the next replay

    @staticmethod
    def backward(ctx, grad):
        graphs, captured = ctx.graphs, ctx.captured
        if graphs.captured is not captured or graphs.generation != ctx.generation:
            raise RuntimeError(
                "RMT block graphs: this backward belongs to a forward whose saved activations a later "
                "forward of the same block has replaced (a backward with retain_graph=True, another "
                "forward, then this graph's backward again). Train that loop without block graphs: "
                "model.set_block_graphs(False).")
        if _moved(ctx.params, captured.signature):
            raise RuntimeError(
                "RMT block graphs: a block's parameters moved between its forward and its backward (FSDP "
                "resharding them?); the captured backward reads them where they were. Train without block "
                "graphs: model.set_block_graphs(False).")
        if grad.data_ptr() != captured.grad.data_ptr():  # (the next block's backward wrote it there)
            captured.grad.copy_(grad)
        captured.backward.replay()
        graphs.live = None
        g = captured.grads
        return (g[0], g[1], g[2], None, *g[4:])


def _saving_through_hooks() -> bool:
    """Saved-tensor hooks are active (non-reentrant gradient checkpointing, ``save_on_cpu``): they
    expect the block's saved tensors, which a replay keeps in its graph instead."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(True) is not None


def _moved(params: Sequence[torch.Tensor], signature: tuple) -> bool:
    """Whether any of ``params`` no longer lives where :func:`_signature` found it."""
    return any(p.data_ptr() != entry[0] for p, entry in zip(params, signature[_PARAMS]))


def _wants_grad(t: Optional[torch.Tensor]) -> bool:
    return t is not None and t.requires_grad


_PARAMS = 5  # where _signature keeps the parameters' addresses


def _signature(x: torch.Tensor, scale1: Optional[torch.Tensor], scale2: Optional[torch.Tensor],
               spec: BlockSpec, params: Sequence[torch.Tensor], needs: tuple) -> tuple:
    """What a captured graph depends on besides the values of its inputs."""
    def layout(t: Optional[torch.Tensor]):
        return None if t is None else (tuple(t.shape), t.stride(), t.dtype)
    return (x.device, layout(x), layout(scale1), layout(scale2), needs,
            tuple((p.data_ptr(), p.dtype, tuple(p.shape)) for p in params),  # index _PARAMS
            tuple((t.data_ptr(), tuple(t.shape)) for t in (spec.sin, spec.cos, spec.decay)),
            spec.num_heads, spec.scale, spec.form, spec.eps1, spec.eps2,
            torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None)


# the blocks of models with graphs on (weakly keyed: a copied model, e.g. an EMA, has none)
_BLOCKS: "weakref.WeakKeyDictionary[torch.nn.Module, BlockGraphs]" = weakref.WeakKeyDictionary()


def set_block_graphs(blocks: Sequence[torch.nn.Module], enable: bool) -> None:
    """Turn graph replay on (fresh state, one memory pool for all ``blocks``) or off."""
    shared = ModelGraphs()
    for block in blocks:
        if enable:
            _BLOCKS[block] = BlockGraphs(shared)
        else:
            _BLOCKS.pop(block, None)


def graphs_of(block: torch.nn.Module) -> Optional[BlockGraphs]:
    """The block's graph state, or ``None`` where graphs are off."""
    return _BLOCKS.get(block)
