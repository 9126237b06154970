"""The eager launcher of the Triton kernels (rmt.ops.triton_support.DirectLauncher): the same launches
as ``kernel[grid](...)``, with the compiled kernel called directly once a specialisation is known."""
import inspect

import pytest
import torch
import torch.nn.functional as F

from rmt.config import set_fast_path
from rmt.ops import triton_support
from rmt.ops.triton_support import HAS_TRITON, DirectLauncher, _specialisation

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
needs_cuda_triton = pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()),
                                       reason="compiled Triton launches need a CUDA device")


def test_specialisation_key_separates_what_triton_specialises_on():
    x = torch.zeros(64, dtype=torch.float32)
    assert _specialisation(x) == _specialisation(torch.ones(64))
    assert _specialisation(x) != _specialisation(x[1:])                    # 16-byte alignment
    assert _specialisation(x) != _specialisation(x.half())                 # dtype
    keys = {_specialisation(1), _specialisation(2), _specialisation(16), _specialisation(2 ** 40)}
    assert len(keys) == 4                                                   # ==1, %16, i32/i64
    assert _specialisation(3) == _specialisation(5) and _specialisation(0.5) == _specialisation(2.0)
    assert _specialisation(True) != _specialisation(1) != _specialisation(None)
    assert _specialisation(True) != _specialisation(False)
    with pytest.raises(triton_support._NotKeyed):
        _specialisation("text")


class _FakeCompiled:
    function, packed_metadata = "fn", "meta"

    def __init__(self, calls):
        self.calls = calls

    def _init_handles(self):
        self.calls.append(("load",))

    def run(self, *args):
        self.calls.append(("direct", args))


class _Param:
    def __init__(self, name, constexpr, default=inspect.Parameter.empty):
        self.name, self.is_constexpr, self.default = name, constexpr, default


class _FakeKernel:
    """Stands in for a ``@triton.jit`` function ``k(X, N, KS: constexpr, BLOCK: constexpr, FLAG: constexpr = 0)``."""
    params = [_Param("X", False), _Param("N", False), _Param("KS", True), _Param("BLOCK", True),
              _Param("FLAG", True, 0)]
    arg_names = [p.name for p in params]

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.calls.append(("jit", grid, args, meta))
            return _FakeCompiled(self.calls)
        return run


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(triton_support, "_raw_stream", lambda device: 7)
    monkeypatch.setattr(triton_support, "_launch_hooks", lambda: False)


@needs_triton
def test_direct_launch_passes_all_parameters_in_order_and_recompiles_per_specialisation(fake_cuda, monkeypatch):
    kernel = _FakeKernel()
    launcher = DirectLauncher(kernel)
    x = torch.zeros(32)
    launcher[(4,)](x, 32, 3, BLOCK=16, num_warps=4)          # compiles through Triton
    launcher[(5, 2)](x, 48, 3, BLOCK=16, num_warps=4)        # same specialisation: straight to the kernel
    assert [c[0] for c in kernel.calls] == ["jit", "load", "direct"]
    args = kernel.calls[2][1]
    # grid padded to three, the stream, the compiled function and metadata, no launch metadata or hooks,
    # then every parameter in order: the positional ones, BLOCK from meta and FLAG's default
    assert args == (5, 2, 1, 7, "fn", "meta", None, None, None, x, 48, 3, 16, 0)
    kernel.calls.clear()
    launcher[(4,)](x[1:], 32, 3, BLOCK=16, num_warps=4)      # misaligned: Triton again
    launcher[(4,)](x, 33, 3, BLOCK=16, num_warps=4)          # not divisible by 16: Triton again
    launcher[(4,)](x, 32, 3, BLOCK=32, num_warps=4)          # another constexpr by name: Triton again
    launcher[(4,)](x, 32, 5, BLOCK=16, num_warps=4)          # another constexpr by position: Triton again
    launcher[(4,)](x, 32, 3, BLOCK=16, num_warps=8)          # another launch option: Triton again
    assert [c[0] for c in kernel.calls if c[0] != "load"] == ["jit"] * 5
    kernel.calls.clear()
    set_fast_path(direct_launch=False)
    launcher[(4,)](x, 32, 3, BLOCK=16, num_warps=4)
    assert [c[0] for c in kernel.calls] == ["jit"]


@needs_triton
def test_direct_launch_never_caches_tensor_meta_or_unkeyed_arguments(fake_cuda, monkeypatch):
    kernel = _FakeKernel()
    launcher = DirectLauncher(kernel)
    x = torch.zeros(32)
    for _ in range(2):  # a tensor passed by name would be frozen into the cache entry: never cached
        launcher[(4,)](x, 32, 3, BLOCK=16, FLAG=torch.ones(1))
    for _ in range(2):  # an argument type the key does not know
        launcher[(4,)](x, "n", 3, BLOCK=16)
    assert [c[0] for c in kernel.calls if c[0] != "load"] == ["jit"] * 4
    kernel.calls.clear()
    launcher[(4,)](x, 32, 3, BLOCK=16)
    monkeypatch.setattr(triton_support, "_launch_hooks", lambda: True)  # Triton's profiler installed
    launcher[(4,)](x, 32, 3, BLOCK=16)
    assert [c[0] for c in kernel.calls if c[0] != "load"] == ["jit", "jit"]


@needs_cuda_triton
def test_direct_launches_compute_what_triton_dispatch_computes(monkeypatch):
    """The LayerNorm kernels through the direct path and through Triton's dispatch, with an aligned
    and a misaligned input and row counts of both divisibilities."""
    from rmt.ops.layernorm import layer_norm_triton
    outs = {}
    for direct in (True, False):
        set_fast_path(direct_launch=direct)
        torch.manual_seed(0)
        runs = []
        for rows in (64, 37, 64):
            buf = torch.randn(rows * 48 + 1, device="cuda")
            for x in (buf[:-1].view(rows, 48), buf[1:].view(rows, 48)):
                w = torch.randn(48, device="cuda")
                b = torch.randn(48, device="cuda")
                y = layer_norm_triton(x, w, b, 1e-6)
                assert (y - F.layer_norm(x, (48,), w, b, 1e-6)).abs().max().item() < 1e-5
                runs.append(y)
        outs[direct] = runs
    assert all(torch.equal(a, b) for a, b in zip(outs[True], outs[False]))
