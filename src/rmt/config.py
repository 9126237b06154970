"""The fast path's switches, in one place.

Every piece of the fast path (fused Triton kernels on CUDA, the reorganised CPU path) can be switched
off, or tuned, through :data:`fast_path`; the ops read it at call time, so a change applies to the
next call (a ``torch.compile``'d model recompiles when a switch it read changes)::

    import rmt
    rmt.set_fast_path(gelu_epilogue=False)            # from now on
    with rmt.fast_path_switches(dwconv_kernels=False):  # for a block of code, then restored
        out = model(x)
    print(rmt.config.describe())                      # every switch: default, current value, what it does

Every switch defaults to the fastest setting measured (BENCHMARKS.md); all of them give the same
results up to float rounding (the tanh GELU of ``gelu_epilogue`` is the one approximation). They are
for comparing and debugging: a model's ``masa_impl="reference"`` takes the plain PyTorch path as a
whole. See docs/fast-paths.md.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Tuple

__all__ = ["Switch", "SWITCHES", "FastPath", "fast_path", "set_fast_path", "fast_path_switches",
           "reset_fast_path", "describe"]


@dataclass(frozen=True)
class Switch:
    """One fast-path switch: its name, default, where it acts and what it does."""
    name: str
    default: Any
    where: str
    doc: str


SWITCHES: Dict[str, Switch] = {s.name: s for s in (
    # --- CUDA (Triton kernels), training and inference ------------------------------------------
    Switch("dwconv_kernels", True, "CUDA",
           "The three depthwise convs of each block (CPE, LePE, FFN) with their bias, residual and GELU "
           "as fused Triton kernels; False: F.conv2d (cuDNN) and separate element-wise ops everywhere."),
    Switch("dwconv_training_kernels", True, "CUDA training",
           "The depthwise-conv kernels in training too (forward and input gradient; the FFN keeps only "
           "fc1's output); False: training through F.conv2d and autograd, inference keeps the kernels."),
    Switch("dwconv_triton_weight_grad", False, "CUDA training",
           "The depthwise weight gradients from a Triton kernel instead of cuDNN. Off: on an H200 it takes "
           "3.2x cuDNN's GPU time (14.0 against 4.4 ms per RMT-S step at batch 128), which costs a "
           "CUDA-graph step 14%, while an eager step bound by the host's launch rate gains 6%."),
    Switch("layernorm_kernels", True, "CUDA",
           "The block LayerNorms as multi-row Triton kernels in eager mode; False: PyTorch's LayerNorm."),
    Switch("layernorm_training_kernels", True, "CUDA training",
           "The LayerNorm kernels in training too (the backward adds the residual gradient); False: "
           "PyTorch's LayerNorm and autograd in training, inference keeps the kernels."),
    Switch("layernorm_compiled_kernels", True, "CUDA, torch.compile",
           "Under torch.compile the inference blocks' residual sum and LayerNorm run the eager kernel as "
           "the op rmt::add_layer_norm; False: left to Inductor."),
    Switch("masa_sequences_per_program", True, "CUDA",
           "Rows and columns that fit one tile take their MaSA forward pass from the kernel that batches "
           "several of them per program; False: one sequence per program."),
    Switch("masa_single_tile_backward", True, "CUDA training",
           "Sequences that fit one tile (rows and columns up to 64 tokens, full-form grids up to 64 "
           "tokens) take their whole MaSA backward pass from one kernel; False: the dq and dk/dv kernels."),
    Switch("fused_training_block", True, "CUDA training",
           "In eager training each block is one autograd node that runs the block's kernels "
           "(rmt.ops.block); False: blocks train module by module."),
    Switch("ffn_derivative_with_gelu", True, "CUDA training",
           "The FFN backward recomputes GELU and its derivative in one kernel; False: GELU alone, and the "
           "input-gradient kernel evaluates the derivative itself."),
    Switch("fused_inference_block", True, "CUDA inference",
           "Without gradients, blocks without layer scale run through rmt.ops.block_infer (the attention "
           "branch's residual sum fused with the next LayerNorm, fc2's GEMM adding into the residual "
           "stream; compiled, the Linear weights cast in one kernel); False: module by module."),
    Switch("gelu_epilogue", True, "CUDA inference, bf16/fp16",
           "fc1's GELU in cuBLASLt's GEMM epilogue (its tanh approximation, within 4.8e-4 of the exact "
           "GELU, below half-precision rounding); False: the exact GELU as its own op."),
    Switch("stem_kernel", True, "CUDA inference",
           "The stem's first conv, BatchNorm and GELU as one Triton kernel (rmt.ops.stem_conv); False: "
           "the modules."),
    Switch("fold_conv_bias", True, "CUDA",
           "The other stem and downsampling convs hand their bias to the BatchNorm after them (one pass "
           "less per conv; rmt.stem); False: conv and BatchNorm as modules."),
    Switch("fold_conv_bias_devices", ("cuda",), "device types",
           "Device types where fold_conv_bias applies (on CPU oneDNN adds a conv bias inside the conv, and "
           "the fold measured slower)."),
    Switch("position_table_op", True, "CUDA, torch.compile",
           "Compiled models take each stage's rotation tables and decays from the op rmt::stage_positions "
           "(computed once per stage) instead of recomputing them in every attention kernel."),
    Switch("compiled_training_opaque_ops", True, "CUDA training, torch.compile",
           "In compiled training graphs MaSA and the depthwise convs run from opaque ops "
           "(rmt::masa_attend_train, rmt::dwconv_nhwc_train) that launch the kernels at run time with "
           "the strides they are given; False: traced through as triton_ops, whose launches keep the "
           "traced strides (compiled training of RMT-S then stopped with an illegal memory access)."),
    Switch("direct_launch", True, "CUDA",
           "Eager launches of a Triton kernel's already-compiled specialisation go straight to the compiled "
           "kernel (rmt.ops.triton_support.DirectLauncher); False: every launch through Triton's dispatch."),
    Switch("block_graph_warmup_calls", 2, "CUDA training, block graphs",
           "Calls with one signature that a block runs eagerly before set_block_graphs captures it."),
    # --- CPU --------------------------------------------------------------------------------------
    Switch("cpu_fold_residual", True, "CPU",
           "The CPE's and FFN's residual folded into the depthwise kernel (a one at its centre tap): one "
           "pass over the activations less; False: the residual in its own pass."),
    Switch("cpu_pad_keys", True, "CPU",
           "MaSA rows of 8-15 keys padded to 16 (zero keys, -inf bias), so that the softmax vectorises "
           "(RMT-S stage 3's decomposed pass 4.5 -> 2.3 ms at batch 8); False: no padding."),
    Switch("cpu_chunk_logit_bytes", 4 << 20, "CPU inference",
           "At inference the decomposed MaSA takes the images in groups whose logits of one axis fit in "
           "this many bytes, so they stay in the cache between the products, the bias and the softmax; "
           "0: the whole batch at once."),
    Switch("cpu_onednn_linear", True, "CPU inference, float32",
           "The Linear layers through oneDNN's matmul instead of F.linear's MKL sgemm (1.5x on the thin "
           "stage-1 products of a 2-vCPU AMD EPYC); False: F.linear."),
)}


def _check(name: str, value: Any) -> Any:
    switch = SWITCHES.get(name)
    if switch is None:
        raise AttributeError(f"unknown fast-path switch {name!r}; the switches are: {', '.join(SWITCHES)}")
    kind = type(switch.default)
    if kind is bool and not isinstance(value, bool):
        raise TypeError(f"fast-path switch {name!r} takes True or False, got {value!r}")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise TypeError(f"fast-path switch {name!r} takes an integer >= 0, got {value!r}")
    if kind is tuple:
        if not (isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value)):
            raise TypeError(f"fast-path switch {name!r} takes a tuple of device types, got {value!r}")
        value = tuple(value)
    return value


class FastPath:
    """The current value of every switch in :data:`SWITCHES`, as attributes (``fast_path.gelu_epilogue``).

    Assignments are checked (unknown names and wrong types raise); :func:`set_fast_path` and
    :func:`fast_path_switches` set several at once.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Every switch back to its default."""
        for switch in SWITCHES.values():
            object.__setattr__(self, switch.name, switch.default)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, _check(name, value))

    def values(self) -> Dict[str, Any]:
        """``{name: current value}`` of every switch."""
        return {name: getattr(self, name) for name in SWITCHES}

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.values().items() if v != SWITCHES[k].default}
        return f"FastPath({', '.join(f'{k}={v!r}' for k, v in changed.items()) or 'defaults'})"


fast_path = FastPath()


def set_fast_path(**switches: Any) -> Dict[str, Any]:
    """Set the named switches (all checked before any is set); returns their previous values."""
    checked = {name: _check(name, value) for name, value in switches.items()}
    previous = {name: getattr(fast_path, name) for name in checked}
    for name, value in checked.items():
        object.__setattr__(fast_path, name, value)
    return previous


def reset_fast_path() -> None:
    """Every switch back to its default."""
    fast_path.reset()


@contextlib.contextmanager
def fast_path_switches(**switches: Any) -> Iterator[Any]:
    """``with fast_path_switches(gelu_epilogue=False): ...`` sets the switches for the block, then
    restores their previous values (also on an exception)."""
    previous = set_fast_path(**switches)
    try:
        yield fast_path
    finally:
        set_fast_path(**previous)


def describe() -> str:
    """A table of every switch: name, default, current value (where changed), where it acts, what it does."""
    lines = []
    for s in SWITCHES.values():
        now = getattr(fast_path, s.name)
        value = repr(s.default) + ("" if now == s.default else f" (now {now!r})")
        lines.append(f"{s.name:<28} {value:<14} {s.where}\n    {s.doc}")
    return "\n".join(lines)


def _table_rows() -> Tuple[str, ...]:
    return tuple(f"* ``{s.name}`` (default ``{s.default!r}``, {s.where}): {s.doc}" for s in SWITCHES.values())


FastPath.__doc__ += "\n\nSwitches:\n\n" + "\n".join(_table_rows())
