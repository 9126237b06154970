"""Training blocks replayed from CUDA graphs (rmt.ops.block_graphs) against the same model without them.

Capture and replay need CUDA; on CPU the tests check that the setting changes nothing and the state
it keeps (the block then runs eagerly, under Triton's interpreter).
"""
import copy
import warnings

import pytest
import timm
import torch

from rmt.config import set_fast_path
from rmt.ops.masa import HAS_TRITON

from conftest import SMALL_ARGS, rel_err

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="block graphs replay the Triton training kernels")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@pytest.fixture(autouse=True)
def _no_tf32(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # (PyTorch's matmuls: off by default)


def _twins(**kw):
    """Two identical models (drop path on, layer scale in the last two stages), the first with block graphs."""
    args = dict(SMALL_ARGS, num_classes=5, masa_impl="triton", drop_path_rate=0.3)
    torch.manual_seed(0)
    model = timm.create_model("rmt_tiny", **dict(args, **kw)).to(DEVICE).train()
    for name, p in model.named_parameters():
        if name.endswith("gamma"):
            torch.nn.init.normal_(p)
    twin = copy.deepcopy(model)
    model.set_block_graphs(True)
    return model, twin


def _blocks(model):
    return [blk for s in model.stages for blk in s.blocks]


def _stats(model):
    from rmt.ops.block_graphs import graphs_of
    states = [graphs_of(blk) for blk in _blocks(model)]
    return sum(g.captures for g in states), sum(g.replays for g in states)


def _step(model, x, seed, autocast=False):
    """Loss and gradients of one step (drop-path masks from ``seed``); gradients are cleared first."""
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    _loss(out).backward()
    return out.detach().float(), _grads(model)


def _loss(out):
    """A loss whose gradient differs per output element."""
    return (out.float() * torch.linspace(-1, 1, out.numel(), device=DEVICE).view_as(out)).sum()


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _captured(model) -> torch.Tensor:
    """Three steps on one batch: two eager warm-up steps, then every block captured (and replayed once);
    returns the batch."""
    x = torch.randn(2, 3, 48, 40, device=DEVICE)
    for seed in range(3):
        _step(model, x, seed)
    assert _stats(model) == (len(_blocks(model)),) * 2
    return x


def _assert_same(got, want, tol):
    (out_g, grads_g), (out_w, grads_w) = got, want
    assert rel_err(out_g, out_w) <= tol
    _assert_same_grads(grads_g, grads_w, tol)


def _assert_same_grads(got, want, tol):
    assert got.keys() == want.keys()
    for name in want:
        if want[name].norm() > 1e-6:  # conv biases ahead of BatchNorm: rounding noise
            assert rel_err(got[name], want[name]) <= tol, name


def test_block_graphs_setting_is_per_model_and_survives_copies():
    from rmt.ops.block_graphs import graphs_of
    model, twin = _twins()
    assert all(graphs_of(b) is not None for b in _blocks(model))
    assert all(graphs_of(b) is None for b in _blocks(twin))
    ema = copy.deepcopy(model)  # e.g. timm's ModelEmaV3: the copy trains no graphs
    assert all(graphs_of(b) is None for b in _blocks(ema))
    model.set_block_graphs(False)
    assert all(graphs_of(b) is None for b in _blocks(model))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback")
def test_block_graphs_on_cpu_train_eagerly_with_the_same_numbers():
    from rmt.ops.block_graphs import graphs_of
    set_fast_path(block_graph_warmup_calls=0)  # on CUDA the second step would capture
    model, twin = _twins(depths=(1, 1, 1, 1))
    x = torch.randn(1, 3, 32, 36)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (an attempted capture that failed would warn)
        _assert_same(_step(model, x, 0), _step(twin, x, 0), 1e-6)   # with no warm-up, CUDA would capture
    assert _stats(model) == (0, 0)
    assert all(graphs_of(b).eager_backwards == 1 for b in _blocks(model))


@needs_cuda
@pytest.mark.parametrize("autocast", [False, True])
def test_replayed_steps_match_eager_steps_while_weights_change(autocast):
    """Five optimizer steps: the first two eager (warm-up), then each block captured once and replayed;
    outputs and every gradient equal those of the twin without graphs at every step."""
    model, twin = _twins()
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (model, twin)]
    tol = 2e-2 if autocast else 1e-5
    for seed in range(5):
        x = torch.randn(2, 3, 48, 40, device=DEVICE)
        _assert_same(_step(model, x, seed, autocast), _step(twin, x, seed, autocast), tol)
        for opt in opts:
            opt.step()
    blocks = len(_blocks(model))
    assert _stats(model) == (blocks, 3 * blocks)
    from rmt.ops.block_graphs import graphs_of
    for stage in model.stages:  # the blocks of a stage share one output, gradient and input-gradient buffer
        captured = [graphs_of(b).captured for b in stage.blocks]
        assert len({c.out.data_ptr() for c in captured}) == 1
        assert len({c.grad.data_ptr() for c in captured}) == 1
        assert len({c.grads[0].data_ptr() for c in captured}) == 1
        # the input gradient is the gradient buffer itself where the dtypes agree (not where a float32
        # layer scale promoted the output of a bf16 block: the last two stages under autocast)
        same_dtype = captured[0].grads[0].dtype == captured[0].grad.dtype
        assert (captured[0].grads[0].data_ptr() == captured[0].grad.data_ptr()) == same_dtype


@needs_cuda
def test_two_forwards_before_backward_an_odd_batch_and_checkpointing_run_eagerly():
    model, twin = _twins()
    x = _captured(model)
    captures, replays = _stats(model)
    # two views through the model before one backward: the second forward runs eagerly
    x2 = torch.randn(2, 3, 48, 40, device=DEVICE)
    results = []
    for m in (model, twin):
        torch.manual_seed(7)
        m.zero_grad(set_to_none=True)
        (m(x).square().sum() + m(x2).abs().sum()).backward()
        results.append(_grads(m))
    _assert_same_grads(*results, 1e-5)
    assert _stats(model) == (captures, replays + len(_blocks(model)))
    # an odd batch (e.g. the last of an epoch) trains eagerly and keeps the graphs
    odd = torch.randn(3, 3, 48, 40, device=DEVICE)
    _assert_same(_step(model, odd, 9), _step(twin, odd, 9), 1e-5)
    assert _stats(model)[0] == captures
    # gradient checkpointing keeps saved tensors through hooks: no replay
    model.set_grad_checkpointing(True)
    twin.set_grad_checkpointing(True)
    before = _stats(model)
    _assert_same(_step(model, x, 11), _step(twin, x, 11), 1e-5)
    assert _stats(model) == before


@needs_cuda
def test_backward_of_a_replaced_forward_raises():
    model, _ = _twins()
    x = _captured(model)
    loss = model(x).sum()
    loss.backward(retain_graph=True)
    model(x).sum().backward()  # replays over the first forward's saved activations
    with pytest.raises(RuntimeError, match="set_block_graphs"):
        loss.backward()


@needs_cuda
def test_replayed_backward_passes_accumulate_gradients():
    """Two replayed backward passes without clearing in between (gradient accumulation), and clearing
    with ``set_to_none=False``, give the twin's gradients: a parameter's ``.grad`` must not be the
    static buffer that the next replay overwrites (nor memory another block's replay reuses)."""
    model, twin = _twins()
    _captured(model)
    xs = [torch.randn(2, 3, 48, 40, device=DEVICE) for _ in range(2)]
    for set_to_none in (True, False):
        results = []
        for m in (model, twin):
            m.zero_grad(set_to_none=set_to_none)
            for seed, xi in enumerate(xs):
                torch.manual_seed(seed)
                _loss(m(xi)).backward()
            results.append(_grads(m))
        _assert_same_grads(*results, 1e-5)


def test_signature_records_where_the_parameters_live():
    """A replayed backward reads the parameters where the capture found them; one that moved
    (FSDP's resharding) is detected instead of read."""
    from rmt.ops import block_graphs
    from rmt.ops.block import BlockSpec
    params = [torch.randn(3, 4) for _ in range(18)]
    table = torch.zeros(4, 4)
    spec = BlockSpec(table, table, torch.zeros(2), 2, 0.5, "full", 1e-6, 1e-6)
    x = torch.randn(1, 2, 2, 4)
    signature = block_graphs._signature(x, None, None, spec, params, (True,) * 22)
    assert not block_graphs._moved(params, signature)
    assert block_graphs._signature(x, None, None, spec, params, (True,) * 22) == signature
    params[7] = params[7].clone()
    assert block_graphs._moved(params, signature)
    assert block_graphs._signature(x, None, None, spec, params, (True,) * 22) != signature


@needs_cuda
def test_capture_survives_a_garbage_collection_that_frees_another_models_graphs():
    """A model dropped in a reference cycle is freed by the garbage collector at any allocation; its
    graphs must not go while another model captures (freeing memory during a capture invalidates it)."""
    import gc
    old, _ = _twins()
    _captured(old)
    cycle = [old]
    cycle.append(cycle)
    del old, cycle
    model, twin = _twins()
    threshold = gc.get_threshold()
    gc.set_threshold(1)  # a collection at nearly every allocation
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a failed capture warns
            x = _captured(model)
    finally:
        gc.set_threshold(*threshold)
    _assert_same(_step(model, x, 5), _step(twin, x, 5), 1e-5)


def test_shared_buffers_live_as_long_as_a_capture_holds_them():
    """Blocks of one shape get one buffer per role; a shape no capture holds any more frees its buffers
    (training on many shapes must not keep one set per shape ever seen)."""
    import gc
    from rmt.ops.block_graphs import ModelGraphs
    shared = ModelGraphs()
    held = shared.buffer("out", torch.Size((2, 3, 4, 8)), torch.float32, torch.device("cpu"))
    assert shared.buffer("out", torch.Size((2, 3, 4, 8)), torch.float32, torch.device("cpu")) is held
    assert shared.buffer("grad", torch.Size((2, 3, 4, 8)), torch.float32, torch.device("cpu")) is not held
    assert shared.buffer("out", torch.Size((2, 3, 4, 8)), torch.bfloat16, torch.device("cpu")) is not held
    assert len(shared._buffers) == 1  # the other two went with their last reference
    del held
    gc.collect()
    assert len(shared._buffers) == 0
