"""The eager launcher of the Triton kernels (rmt.ops.triton_support.eager_launch): same launches as
``kernel[grid](...)``, with the compiled kernel reused per specialisation."""
import pytest
import torch
import torch.nn.functional as F

from rmt.ops import triton_support
from rmt.ops.triton_support import HAS_TRITON, _arg_key, _CachedLauncher

needs_cuda_triton = pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()),
                                       reason="compiled Triton launches need a CUDA device")


def test_specialisation_key_separates_what_triton_specialises_on():
    x = torch.zeros(64, dtype=torch.float32)
    assert _arg_key(x) == _arg_key(torch.ones(64))
    assert _arg_key(x) != _arg_key(x[1:])                    # 16-byte alignment
    assert _arg_key(x) != _arg_key(x.half())                 # dtype
    assert len({_arg_key(1), _arg_key(2), _arg_key(16), _arg_key(2 ** 40)}) == 4  # ==1, %16, i32/i64
    assert _arg_key(3) == _arg_key(5) and _arg_key(0.5) == _arg_key(2.0)
    assert _arg_key(True) != _arg_key(1) and _arg_key(None) is None
    with pytest.raises(triton_support._Unsupported):
        _arg_key("text")


class _FakeCompiled:
    function, packed_metadata = "fn", "meta"

    def __init__(self, calls):
        self.calls = calls

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *args):
        self.calls.append(("cached", args))


class _FakeKernel:
    """Stands in for a ``@triton.jit`` function ``k(X, N, BLOCK: constexpr)``."""
    arg_names = ["X", "N", "BLOCK"]

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.calls.append(("jit", grid, args, meta))
            return _FakeCompiled(self.calls)
        return run


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_cached_launch_passes_all_parameters_in_order_and_recompiles_per_specialisation(monkeypatch):
    monkeypatch.setattr(triton_support, "INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: type("S", (), {"cuda_stream": 7})())
    kernel = _FakeKernel()
    launcher = _CachedLauncher(kernel)
    if not launcher.usable:
        pytest.skip("this Triton has no launch hooks in triton.knobs: every launch goes through Triton")
    x = torch.zeros(32)
    launcher[(4,)](x, 32, BLOCK=16, num_warps=4)            # compiles through Triton
    launcher[(5, 2)](x, 48, BLOCK=16, num_warps=4)          # same specialisation: straight to the kernel
    assert [c[0] for c in kernel.calls] == ["jit", "cached"]
    args = kernel.calls[1][1]
    assert args[:4] == (5, 2, 1, 7) and args[4:6] == ("fn", "meta") and args[9:] == (x, 48, 16)
    launcher[(4,)](x[1:], 32, BLOCK=16, num_warps=4)        # misaligned: Triton again
    launcher[(4,)](x, 33, BLOCK=16, num_warps=4)            # not divisible by 16: Triton again
    launcher[(4,)](x, 32, BLOCK=32, num_warps=4)            # another constexpr: Triton again
    assert [c[0] for c in kernel.calls[2:]] == ["jit", "jit", "jit"]
    monkeypatch.setattr(triton_support, "FAST_LAUNCH", False)
    launcher[(4,)](x, 32, BLOCK=16, num_warps=4)
    assert kernel.calls[-1][0] == "jit"


@needs_cuda_triton
def test_cached_launches_compute_what_triton_dispatch_computes(monkeypatch):
    """The LayerNorm kernels through the cached path and through Triton's dispatch, with an aligned
    and a misaligned input and row counts of both divisibilities."""
    from rmt.ops.layernorm import layer_norm_triton
    outs = {}
    for fast in (True, False):
        monkeypatch.setattr(triton_support, "FAST_LAUNCH", fast)
        runs = []
        for rows in (64, 37, 64):
            buf = torch.randn(rows * 48 + 1, device="cuda")
            for x in (buf[:-1].view(rows, 48), buf[1:].view(rows, 48)):
                w = torch.randn(48, device="cuda")
                b = torch.randn(48, device="cuda")
                y = layer_norm_triton(x, w, b, 1e-6)
                assert (y - F.layer_norm(x, (48,), w, b, 1e-6)).abs().max().item() < 1e-5
                runs.append(y)
        outs[fast] = runs
    assert all(torch.equal(a, b) for a, b in zip(outs[True], outs[False]))
