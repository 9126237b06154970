"""A block at inference through rmt.ops.block_infer against the same block module by module."""
import pytest
import timm
import torch

from rmt.config import set_fast_path
from rmt.ops.masa import HAS_TRITON

from conftest import ONE_BLOCK_ARGS, SMALL_ARGS, rel_err

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="the fused inference block runs the Triton kernels")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _model(**kw):
    torch.manual_seed(0)
    model = timm.create_model("rmt_tiny", **dict(SMALL_ARGS, num_classes=5, masa_impl="triton", **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.2)  # biases away from zero, so a misplaced one shows
    return model.to(DEVICE).eval()


def _count_calls(monkeypatch):
    """Patch :func:`block_infer` to count its calls; returns the list it appends to."""
    from rmt.ops import block_infer
    calls, original = [], block_infer.block_infer

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)
    monkeypatch.setattr(block_infer, "block_infer", counted)
    return calls


def _both(model, x, monkeypatch, autocast: bool = False):
    """(fused output, module-by-module output, fused calls)."""
    from rmt.ops import block_infer
    calls = _count_calls(monkeypatch)
    outs = []
    for fused in (True, False):
        set_fast_path(fused_inference_block=fused)
        with torch.inference_mode(), torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            outs.append(model(x))
    return outs[0], outs[1], len(calls)


def test_inference_block_matches_modules_fp32(monkeypatch):
    """Without layer scale every block takes the fused inference path; outputs agree in float32.
    Odd grids (9x10 down to 2x2) and both attention forms."""
    model = _model(layerscales=(False,) * 4, depths=(1, 1, 1, 1))
    x = torch.randn(2, 3, 33, 40, device=DEVICE)
    fused, plain, calls = _both(model, x, monkeypatch)
    assert calls == 4
    assert fused.dtype == plain.dtype == torch.float32 and rel_err(fused, plain) <= 1e-5


def test_layer_scale_blocks_keep_the_module_path(monkeypatch):
    model = _model(depths=ONE_BLOCK_ARGS["depths"])   # layer scale in the last two stages
    x = torch.randn(1, 3, 32, 32, device=DEVICE)
    fused, plain, calls = _both(model, x, monkeypatch)
    assert calls == sum(d for d, ls in zip(ONE_BLOCK_ARGS["depths"], ONE_BLOCK_ARGS["layerscales"]) if not ls) == 2
    assert rel_err(fused, plain) <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 Triton kernels are checked on CUDA only")
def test_inference_block_under_bf16_autocast_as_accurate_as_modules(monkeypatch):
    """Under bf16 autocast the residual sums are rounded at other places (the GEMM adds fc2's product
    to the stream in float32): both paths are compared with the float32 result."""
    model = _model(layerscales=(False,) * 4)
    x = torch.randn(4, 3, 64, 64, device=DEVICE)
    with torch.inference_mode():
        exact = model(x)
    fused, plain, calls = _both(model, x, monkeypatch, autocast=True)
    assert calls == sum(SMALL_ARGS["depths"]) and fused.dtype == plain.dtype
    assert rel_err(fused.float(), exact) <= max(1.25 * rel_err(plain.float(), exact), 1e-3)


def test_training_hooks_and_active_drop_path_keep_other_paths(monkeypatch):
    """Gradients to record, a hooked layer or drop path that would drop samples (training mode under
    ``no_grad``, with the module path's random draws unchanged) bypass :func:`block_infer`."""
    calls = _count_calls(monkeypatch)
    model = _model(layerscales=(False,) * 4, drop_path_rate=0.5, depths=(1, 1, 1, 1))
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    model(x).sum()  # eval mode, gradients on: the training path
    assert calls == []
    handle = model.stages[0].blocks[0].mlp.fc2.register_forward_hook(lambda m, i, o: None)
    with torch.no_grad():
        model(x)
    assert len(calls) == 4 - 1
    handle.remove()
    calls.clear()
    model.train()
    outs = []
    from rmt.ops import block_infer
    for fused in (True, False):
        set_fast_path(fused_inference_block=fused)
        torch.manual_seed(5)
        with torch.no_grad():
            outs.append(model(x))
    no_drop = sum(type(blk.drop_path) is torch.nn.Identity for st in model.stages for blk in st.blocks)
    assert len(calls) == no_drop < 4 and rel_err(outs[0], outs[1]) <= 1e-5


def test_replaced_layers_keep_the_module_path(monkeypatch):
    """Blocks whose norm, attention or Linear layer was swapped for another module (PyTorch's
    LayerNorm, a wrapper) run module by module with that module, and the other blocks stay fused."""
    model = _model(layerscales=(False,) * 4, depths=ONE_BLOCK_ARGS["depths"])
    x = torch.randn(1, 3, 32, 32, device=DEVICE)
    blocks = [blk for st in model.stages for blk in st.blocks]
    with torch.no_grad():
        want = model(x)
        norm = blocks[0].norm1
        plain = torch.nn.LayerNorm(norm.normalized_shape, eps=norm.eps).to(DEVICE)
        plain.load_state_dict(norm.state_dict())
        blocks[0].norm1 = plain
        blocks[1].attn.proj = torch.nn.Sequential(blocks[1].attn.proj)
        calls = _count_calls(monkeypatch)
        got = model(x)
    assert len(calls) == len(blocks) - 2 and rel_err(got, want) <= 1e-5


def test_add_layer_norm_kernel_matches_torch(monkeypatch):
    from rmt.ops import layernorm
    torch.manual_seed(0)
    for shape, dtype in (((3, 5, 7, 48), torch.float32), ((37, 40), torch.float16)):
        x, r = (torch.randn(shape, device=DEVICE, dtype=dtype) for _ in range(2))
        c = shape[-1]
        shift, w, b = torch.randn(c, device=DEVICE), torch.randn(c, device=DEVICE), torch.randn(c, device=DEVICE)
        s, y = layernorm.add_layer_norm(x, r, shift.to(dtype), w, b, 1e-6)
        total = (x + r).float()
        want_y = torch.nn.functional.layer_norm(total, (c,), w, b, 1e-6)
        assert s.dtype == y.dtype == dtype and s.shape == y.shape == x.shape
        tol = 1e-6 if dtype == torch.float32 else 2e-3
        assert rel_err(s.float(), total + shift.to(dtype).float()) <= tol and rel_err(y.float(), want_y) <= tol
        set_fast_path(layernorm_kernels=False)   # the PyTorch composition
        s2, y2 = layernorm.add_layer_norm(x, r, shift.to(dtype), w, b, 1e-6)
        set_fast_path(layernorm_kernels=True)
        assert rel_err(s2.float(), s.float()) <= tol and rel_err(y2.float(), y.float()) <= tol
        s3, y3 = layernorm.add_layer_norm_op(x, r, shift.to(dtype), w, b, 1e-6)   # under torch.compile
        assert torch.equal(s3, s) and torch.equal(y3, y)


def test_accumulating_linear_op_adds_in_place_under_compile():
    """The custom op fc2 adds through: in place eagerly, and under ``torch.compile`` the returned
    stream holds the sum (aot_eager runs the functionalised graph Inductor would get)."""
    from rmt.ops.block_infer import accumulate_linear_
    torch.manual_seed(0)
    acc, x, w = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 24), torch.randn(8, 24)
    want = acc + x @ w.t()

    def f(acc, x, w):
        acc = acc * 1.0
        accumulate_linear_(acc, x, w)
        return acc
    got = acc.clone()
    accumulate_linear_(got, x, w)
    assert rel_err(got, want) <= 1e-6
    torch._dynamo.reset()
    assert rel_err(torch.compile(f, fullgraph=True, backend="aot_eager")(acc, x, w), want) <= 1e-6


def test_compiled_blocks_take_the_inference_path_where_dynamo_misreports_export(monkeypatch):
    """Under ``torch.compile`` the blocks trace through :func:`block_infer`, also on torch < 2.14,
    whose Dynamo folded ``torch.compiler.is_exporting()`` to ``True`` under compile (emulated here);
    the export paths stay for ``torch.export``. The Triton ops, which do not trace in the CPU
    interpreter, are swapped for their references (the routing is what is checked)."""
    from rmt import compat
    from rmt.ops import block_infer
    import rmt.norm
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: torch.compiler.is_compiling())
    set_fast_path(dwconv_kernels=False, layernorm_kernels=False, stem_kernel=False)
    monkeypatch.setattr(rmt.norm, "triton_layer_norm_supported", lambda *args: False)
    masa = block_infer.masa
    monkeypatch.setattr(block_infer, "masa", lambda *args: masa(*args[:8], "reference", *args[9:]))
    model = _model(layerscales=(False,) * 4)
    calls = _count_calls(monkeypatch)
    seen = []

    def probe(x):
        seen.append(compat.is_exporting())
        return x + 1.0
    torch._dynamo.reset()
    x = torch.randn(1, 3, 40, 36, device=DEVICE)
    with torch.no_grad():
        got, want = torch.compile(model, fullgraph=True, backend="eager")(x), model(x)
        torch.compile(probe, fullgraph=True, backend="eager")(x)
    assert len(calls) == 2 * sum(SMALL_ARGS["depths"]) and rel_err(got, want) <= 1e-5
    assert seen == [False]

    class Probe(torch.nn.Module):
        def forward(self, x):
            return x + 1.0 if compat.is_exporting() else x - 1.0
    program = torch.export.export(Probe(), (x,))
    assert torch.equal(program.module()(x), x + 1.0) and torch.equal(Probe()(x), x - 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="Triton's ops trace under torch.compile on CUDA only (not in the interpreter)")
def test_inference_block_under_torch_compile_fullgraph(monkeypatch):
    """The fused inference blocks compile into one graph with the eager model's outputs (the first
    LayerNorm as PyTorch's on both sides, as under compile; the add+LayerNorm through the Triton
    kernel on both sides, as the op ``rmt::add_layer_norm`` under compile)."""
    import rmt.norm
    monkeypatch.setattr(rmt.norm, "triton_layer_norm_supported", lambda *args: False)
    model = _model(layerscales=(False,) * 4)
    calls = _count_calls(monkeypatch)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(1, 3, 40, 36, device=DEVICE)
    with torch.no_grad():
        got, want = compiled(x), model(x)
    assert len(calls) == 2 * sum(SMALL_ARGS["depths"]) and rel_err(got, want) <= 1e-6


class _PeakStorageBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of the storages that the ops run under it create, at most alive at once (storages an op
    was handed, parameters and inputs among them, are not counted)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref
        for t in torch.utils._pytree.tree_leaves((args, kwargs)):  # storages that existed before
            if isinstance(t, torch.Tensor):
                t.untyped_storage()._counted = True
            elif isinstance(t, torch.UntypedStorage):
                t._counted = True
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t._base is None and t.untyped_storage().nbytes():
                storage = t.untyped_storage()
                if not hasattr(storage, "_counted"):
                    storage._counted = True
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, storage.nbytes())
        return out


def test_inference_block_holds_no_more_memory_than_modules(monkeypatch):
    """The fused block releases its intermediates as the modules do: the peak of the storages it
    allocates is no larger than the module-by-module block's."""
    from rmt.ops import block_infer
    from rmt.ops.masa.positions import stage_positions
    model = _model(layerscales=(False,) * 4)
    stage = model.stages[1]
    sin, cos, decay = stage_positions(6, 5, stage.head_dim, stage.num_heads, stage.init_value,
                                      stage.heads_range, torch.device(DEVICE))
    x = torch.randn(2, 6, 5, 32, device=DEVICE)
    peaks = []
    for fused in (True, False):
        set_fast_path(fused_inference_block=fused)
        with torch.inference_mode(), _PeakStorageBytes() as mode:
            stage.blocks[0](x, sin, cos, decay)
        peaks.append(mode.peak)
    assert 0 < peaks[0] <= peaks[1]
