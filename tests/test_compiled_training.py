"""Compiled training: the fast kernels inside torch.compile's training graphs.

On CPU the Triton kernels run in Triton's interpreter and the graphs are traced with AOTAutograd
(``backend="aot_eager"``: fake-tensor tracing, the joint forward/backward graph and its partition, as
Inductor gets them); on CUDA the same checks run through Inductor itself, and a real variant at the
batch and size that used to fault ("an illegal memory access") trains compiled beside eager.
"""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

from rmt.ops.masa import HAS_TRITON

from conftest import ONE_BLOCK_ARGS, SMALL_ARGS, rel_err

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")


def _ops_in_graph(model, x):
    """Names of the rmt custom ops in the graph Dynamo captures for one training step."""
    names = set()

    def backend(gm, example_inputs):
        for node in gm.graph.nodes:
            if node.op == "call_function" and "rmt" in str(node.target):
                names.add(str(node.target))
        return gm.forward
    torch._dynamo.reset()
    torch.compile(model, backend=backend, fullgraph=True)(x).sum().backward()
    return names


def _step(run, model, x, y):
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(run(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@needs_triton
def test_training_graph_takes_the_opaque_kernel_ops():
    """A compiled training step launches MaSA and the depthwise convolutions from the opaque ops
    (strides read at run time); inference keeps the traced-through ops."""
    model = timm.create_model("rmt_tiny", masa_impl="triton", num_classes=3, **ONE_BLOCK_ARGS).to(DEVICE).train()
    x = torch.randn(1, 3, 40, 36, device=DEVICE)
    names = _ops_in_graph(model, x)
    assert any("masa_attend_train" in n for n in names), names
    assert any("dwconv_nhwc_train" in n for n in names), names
    assert not any(n.endswith("masa_attend.default") or "dwconv_nhwc.default" in n for n in names), names


@needs_triton
@pytest.mark.parametrize("size", [(40, 36)] + ([(72, 40), (224, 160)] if CUDA else []))
def test_compiled_training_step_matches_eager(size, monkeypatch):
    """Loss and every parameter's gradient of a compiled step equal the eager step's (float32,
    non-square sizes, a size not divisible by 32)."""
    import rmt.norm
    monkeypatch.setattr(rmt.norm, "triton_layer_norm_supported", lambda *args: False)  # as under compile
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    model = timm.create_model("rmt_tiny", masa_impl="triton", num_classes=5,
                              **(SMALL_ARGS if CUDA else ONE_BLOCK_ARGS)).to(DEVICE).train()
    x = torch.randn(2, 3, *size, device=DEVICE)
    y = torch.tensor([1, 4], device=DEVICE)
    eager = copy.deepcopy(model)
    if not CUDA:   # the oracle on the reference ops: Triton's interpreter takes seconds a block
        eager.set_masa_impl("reference")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="inductor" if CUDA else "aot_eager")
    loss_c, grads_c = _step(compiled, model, x, y)
    loss_e, grads_e = _step(eager, eager, x, y)
    assert rel_err(loss_c, loss_e) <= 1e-5
    assert grads_c.keys() == grads_e.keys()
    for name, g in grads_e.items():
        if g.norm() < 1e-6:   # conv biases ahead of BatchNorm: zero up to rounding in both
            assert grads_c[name].norm() < 1e-6, name
        else:
            assert rel_err(grads_c[name], g) <= 1e-4, name


@needs_triton
def test_opaque_ops_take_any_strides():
    """The ops copy inputs whose channels are not unit-strided instead of reading them wrongly, and
    give what the reference gives."""
    from rmt.ops.dwconv import dwconv_nhwc_reference, dwconv_train_op
    from rmt.ops.masa import masa_reference, rotation_tables, head_decays
    from rmt.ops.masa.triton_masa import MODE_FULL, masa_attend_train
    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 6, device=DEVICE).permute(0, 2, 3, 1)       # channels stride h*w
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8).to(DEVICE)
    got = dwconv_train_op(x, conv.weight, conv.bias, True, False)
    assert rel_err(got, dwconv_nhwc_reference(x, conv.weight, conv.bias, True)) <= 1e-6
    b, h, w, n, d = 1, 3, 4, 2, 8
    q, k, v = (torch.randn(b, n, d, h, w, device=DEVICE).permute(0, 3, 4, 1, 2) for _ in range(3))
    sin, cos = rotation_tables(h, w, d, device=DEVICE)
    decay = head_decays(n, 2.0, 4.0).to(DEVICE)
    out, lse = masa_attend_train(q, k, v, sin, cos, decay, d ** -0.5, MODE_FULL)
    assert lse.shape == (b, h, w, n)
    assert rel_err(out, masa_reference(q, k, v, sin, cos, decay, d ** -0.5, "full")) <= 1e-5


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_compiled_training_of_rmt_small_at_the_batch_that_faulted():
    """rmt_small, batch 128 at 224x224, bf16 autocast, fused AdamW: the compiled steps run (they used
    to stop with "an illegal memory access") and their losses stay within bf16 noise of eager."""
    torch.manual_seed(0)
    model = timm.create_model("rmt_small").cuda().train()
    eager = timm.create_model("rmt_small").cuda().train()
    eager.load_state_dict(model.state_dict())
    x = torch.randn(128, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (128,), device="cuda")
    losses = []
    for net, run in ((model, torch.compile(model)), (eager, eager)):
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
        curve = []
        for _ in range(4):
            torch.manual_seed(1)   # the same drop-path masks in both
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(run(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            curve.append(loss.item())
        losses.append(curve)
    torch.cuda.synchronize()
    compiled_curve, eager_curve = losses
    assert all(abs(a - b) <= 0.02 * abs(b) for a, b in zip(compiled_curve, eager_curve)), losses
