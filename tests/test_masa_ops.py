"""Fast MaSA implementations against the reference: values and gradients, both forms, odd shapes.

On CUDA the Triton kernels run natively; without CUDA they run in Triton's interpreter
(TRITON_INTERPRET=1, set in conftest.py) at small sizes.
"""
import pytest
import timm
import torch

from rmt.config import set_fast_path
from rmt.ops.masa import HAS_TRITON, masa, masa_reference, rotation_tables, head_decays

from conftest import ONE_BLOCK_ARGS, SMALL_ARGS, golden_model_kwargs, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16/fp16 kernels are checked on CUDA only")

# (b, h, w, n, d): one-token rows and columns, non-square, odd, multi-block full form, widths 16 and 32
SHAPES = [(2, 5, 7, 2, 16), (1, 1, 9, 2, 32), (1, 11, 1, 1, 16), (1, 13, 9, 2, 32), (2, 3, 3, 4, 16)]


def _inputs(shape, dtype=torch.float32, device=DEVICE, add=True):
    b, h, w, n, d = shape
    qkv = torch.randn(b, h, w, 3, n, d, dtype=dtype, device=device, requires_grad=True)
    q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]   # strided views, as in the model
    extra = torch.randn(b, h, w, n, d, dtype=dtype, device=device, requires_grad=True) if add else None
    sin, cos = rotation_tables(h, w, d, device=device)
    decay = head_decays(n, 2.0, 5.0, device=device)
    return qkv, (q, k, v, sin, cos, decay, d ** -0.5), extra


def _check(impl, shape, form, dtype=torch.float32, out_tol=1e-5, grad_tol=1e-4):
    qkv, args, extra = _inputs(shape, dtype)
    ref_args = [a.float() if a.is_floating_point() else a for a in args[:6]] + [args[6]]
    ref = masa_reference(*ref_args, form, add=extra.float())
    out = masa(*args, form=form, impl=impl, add=extra)
    assert out.shape == ref.shape and out.dtype == dtype and out.is_contiguous()
    assert rel_err(out.float(), ref) <= out_tol
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (qkv, extra), g)
    grads = torch.autograd.grad(out, (qkv, extra), g.to(dtype))
    for got, want in zip(grads, ref_grads):
        assert rel_err(got.float(), want) <= grad_tol
    with torch.no_grad():   # inference path: LePE addition fused into the kernel
        assert rel_err(masa(*args, form=form, impl=impl, add=extra).float(), ref) <= out_tol


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("form", ["decomposed", "full"])
def test_cpu_path_matches_reference(shape, form):
    if DEVICE != "cpu":
        pytest.skip("CPU path")
    _check("cpu", shape, form, out_tol=1e-6, grad_tol=1e-6)


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("form", ["decomposed", "full"])
def test_triton_matches_reference_fp32(shape, form):
    _check("triton", shape, form)


@needs_triton
@pytest.mark.parametrize("single_tile", [True, False])
@pytest.mark.parametrize("form", ["decomposed", "full"])
def test_triton_backward_single_tile_and_two_kernel_paths(single_tile, form, monkeypatch):
    """Short sequences take one backward kernel (dq, dk, dv from one tile) unless switched off;
    both paths match the reference."""
    from rmt.ops.masa import triton_masa
    set_fast_path(masa_single_tile_backward=single_tile)
    launched = []
    launcher = triton_masa.eager_launch
    monkeypatch.setattr(triton_masa, "eager_launch",
                        lambda kernel: launched.append(kernel.fn.__name__) or launcher(kernel))
    _check("triton", (2, 6, 7, 2, 16), form)
    backward = [name for name in launched if "bwd" in name]
    assert backward and all(("tile" in name) == single_tile for name in backward)


@needs_triton
@pytest.mark.parametrize("single_tile", [True, False])
@pytest.mark.parametrize("form", ["decomposed", "full"])
def test_backward_writes_into_slices_of_the_qkv_gradient(single_tile, form, monkeypatch):
    """``attention_backward(..., grads)`` writes dq, dk and dv into the three slices of one
    ``(b, h, w, 3c)`` gradient (as the fused block's backward does) with the same values as into
    tensors of their own, and leaves nothing else of that buffer written."""
    from rmt.ops.masa import triton_masa
    set_fast_path(masa_single_tile_backward=single_tile)
    b, h, w, n, d = 2, 5, 7, 2, 16
    c = n * d
    qkv = torch.randn(b, h, w, 3 * c, device=DEVICE)
    q, k, v = (t.view(b, h, w, n, d) for t in qkv.split(c, dim=-1))
    sin, cos = rotation_tables(h, w, d, device=DEVICE)
    decay = head_decays(n, 2.0, 4.0, device=DEVICE)
    out, state = triton_masa.attention_forward(q, k, v, sin, cos, decay, d ** -0.5, form)
    grad = torch.randn_like(out)
    want = triton_masa.attention_backward(grad, q, k, v, state, sin, cos, decay, d ** -0.5, form)
    buffer = torch.full((b, h, w, 3 * c), float("nan"), device=DEVICE)
    views = tuple(t.view(b, h, w, n, d) for t in buffer.split(c, dim=-1))
    got = triton_masa.attention_backward(grad, q, k, v, state, sin, cos, decay, d ** -0.5, form, views)
    for name, g, v_, e in zip("qkv", got, views, want):
        assert g.data_ptr() == v_.data_ptr(), name
        assert rel_err(v_, e) <= 1e-6, name
    assert not buffer.isnan().any()


@needs_triton
@pytest.mark.parametrize("seqs", [1, 2, 8])
@pytest.mark.parametrize("mode", ["row", "col"])
def test_triton_forward_several_sequences_per_program(seqs, mode):
    """The batched forward kernel (whole rows or columns, ``seqs`` per program, the last group
    partly empty) writes what the one-sequence kernel writes, LePE addition and LSE included."""
    from rmt.ops.masa import head_decays, rotation_tables, triton_masa
    from rmt.ops.triton_support import eager_launch
    b, h, w, n, d = 2, 7, 5, 2, 16
    q, k, v, add = (torch.randn(b, h, w, n, d, device=DEVICE) for _ in range(4))
    sin, cos = rotation_tables(h, w, d, device=DEVICE)
    decay = head_decays(n, 2.0, 4.0, device=DEVICE).float()
    m = triton_masa.MODE_ROW if mode == "row" else triton_masa.MODE_COL
    launched = []

    def launch(kernel):
        launched.append(kernel.fn.__name__)
        return eager_launch(kernel)
    one = triton_masa._attend(launch, q, k, v, sin, cos, decay, add, d ** -0.5, m, True, seqs=0)
    many = triton_masa._attend(launch, q, k, v, sin, cos, decay, add, d ** -0.5, m, True, seqs=seqs)
    assert launched == ["masa_fwd_kernel", "masa_fwd_seqs_kernel"]
    assert rel_err(many[0], one[0]) <= 1e-6 and rel_err(many[1], one[1]) <= 1e-6


@needs_triton
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", ["decomposed", "full"])
def test_triton_low_precision_against_fp32_reference(dtype, form):
    _check("triton", (4, 14, 10, 4, 32), form, dtype=dtype, out_tol=1e-2, grad_tol=2e-2)


@needs_triton
@pytest.mark.parametrize("shape,form,tiles", [((1, 2, 300, 1, 16), "decomposed", (128, 64, 4)),
                                              ((1, 33, 32, 1, 32), "full", (128, 128, 4))])
def test_triton_forward_long_sequence_tiles(shape, form, tiles):
    """Sequences of 256 tokens and more take wide forward tiles, with masked tails."""
    from rmt.ops.masa import triton_masa
    seq = shape[1] * shape[2] if form == "full" else max(shape[1], shape[2])
    assert triton_masa._forward_config(seq, shape[-1]) == tiles
    _, args, extra = _inputs(shape)
    with torch.no_grad():
        ref = masa_reference(*args, form, add=extra)
        assert rel_err(masa(*args, form=form, impl="triton", add=extra), ref) <= 1e-5


@needs_triton
def test_triton_full_form_many_blocks():
    """More tokens than one 64-wide tile in both directions, with a masked tail."""
    _check("triton", (1, 12, 11, 1, 16), "full")


@needs_triton
def test_model_with_triton_kernels_matches_golden(golden):
    from rmt.checkpoint import filter_state_dict
    from rmt.model import RMT
    cfg, sd, arrays = golden
    model = RMT(**golden_model_kwargs(cfg), attn_forms="TTFF", masa_impl="triton").eval()
    model.load_state_dict(filter_state_dict(sd, model))
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        logits = model.to(DEVICE)(arrays["input.x_72x40"].to(DEVICE))
    assert rel_err(logits.cpu(), arrays["logits.TTFF.x_72x40"]) <= 1e-5


def test_auto_picks_cpu_path_on_cpu_and_reference_switch_matches():
    model = timm.create_model("rmt_tiny", **SMALL_ARGS).eval()
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        fast = model(x)
        model.set_masa_impl("reference")
        ref = model(x)
    assert rel_err(fast, ref) <= 1e-5
    with pytest.raises(ValueError, match="masa_impl"):
        model.set_masa_impl("magic")


@pytest.mark.parametrize("impl", ["reference", "cpu"] + (["triton"] if HAS_TRITON and DEVICE == "cuda" else []))
def test_torch_compile_fullgraph_has_no_graph_breaks(impl, monkeypatch):
    """Dynamo captures the whole model in one graph (backend 'eager' keeps the test fast) and
    computes what the eager model computes.

    Under compile the LayerNorms run as PyTorch's (Inductor fuses them itself); the eager model is
    made to use the same here, so the comparison is of the same kernels (test_layernorm.py checks the
    Triton LayerNorm against PyTorch's). Likewise the stem's conv-bias fold, which compile skips
    (with the bias cuDNN may pick another TF32 algorithm; test_stem_conv.py checks the fold).
    """
    import rmt.norm
    import rmt.stem
    monkeypatch.setattr(rmt.norm, "triton_layer_norm_supported", lambda *args: False)
    set_fast_path(fold_conv_bias=False)
    torch._dynamo.reset()
    model = timm.create_model("rmt_tiny", masa_impl=impl, num_classes=0, **SMALL_ARGS).to(DEVICE).eval()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x = torch.randn(1, 3, 64, 64, device=DEVICE)
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) <= 1e-6


@needs_triton
@pytest.mark.parametrize("form", ["decomposed", "full"])
def test_custom_op_path_used_by_compile_matches_eager_path(form):
    """The torch.library ops (taken under torch.compile) and the eager Function agree exactly."""
    from rmt.ops.masa import triton_masa
    qkv, (q, k, v, sin, cos, decay, scale), _ = _inputs((1, 6, 5, 2, 16), add=False)
    mode = triton_masa.MODE_FULL if form == "full" else triton_masa.MODE_ROW
    via_op, lse = triton_masa.masa_attend(q, k, v, sin, cos, decay, None, scale, mode, True)
    via_fn = triton_masa._MasaAttend.apply(q, k, v, sin, cos, decay, None, scale, mode, True)
    assert torch.equal(via_op, via_fn) and lse.shape == (1, 6, 5, 2)
    g = torch.randn_like(via_op)
    assert torch.equal(torch.autograd.grad(via_op, qkv, g)[0], torch.autograd.grad(via_fn, qkv, g)[0])


def test_layer_norm_keeps_autocast_dtype_and_matches_float32():
    from rmt.model import LayerNorm
    ln = LayerNorm(32, eps=1e-6)
    with torch.no_grad():
        ln.weight.normal_(), ln.bias.normal_()
    x = torch.randn(4, 7, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ln(x)
    assert y.dtype == torch.bfloat16
    assert rel_err(y.float(), ln(x)) < 1e-2
    assert torch.equal(ln(x), torch.nn.functional.layer_norm(x, (32,), ln.weight, ln.bias, 1e-6))


@needs_triton
def test_model_training_gradients_fused_path_match_reference():
    """Whole model, fp32: every parameter's gradient through the Triton MaSA, depthwise-conv and
    FFN-tail kernels matches the reference path."""
    torch.manual_seed(0)
    fast = timm.create_model("rmt_tiny", num_classes=5, masa_impl="triton", **ONE_BLOCK_ARGS).to(DEVICE)
    ref = timm.create_model("rmt_tiny", num_classes=5, masa_impl="reference", **ONE_BLOCK_ARGS).to(DEVICE)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, 3, 40, 36, device=DEVICE)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        out_fast, out_ref = fast(x), ref(x)
        g = torch.randn_like(out_ref)
        out_fast.backward(g)
        out_ref.backward(g)
    assert rel_err(out_fast, out_ref) <= 1e-5
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        if q.grad.norm() < 1e-6:   # conv biases ahead of BatchNorm: zero up to rounding in both
            assert p.grad.norm() < 1e-6, name
        else:
            assert rel_err(p.grad, q.grad) <= 1e-4, name


@pytest.mark.parametrize("impl", ["cpu"] + (["triton"] if HAS_TRITON and DEVICE == "cuda" else []))
def test_torch_compile_fullgraph_training_step(impl, monkeypatch):
    """Training mode (drop path, layer scale, the fused residual branches, the Linear layers of the
    fast path) also compiles into one graph, with the eager model's outputs and gradients.

    TF32 is off for cuDNN: eager training runs each block as one autograd node and the compiled
    graph module by module, so their convolutions differ and TF32 rounding moved gradients by up to
    2e-3 on CUDA (1e-6 outputs, 3e-6 gradients without it)."""
    import rmt.norm
    monkeypatch.setattr(rmt.norm, "triton_layer_norm_supported", lambda *args: False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch._dynamo.reset()
    model = timm.create_model("rmt_tiny", masa_impl=impl, num_classes=4,
                              **dict(SMALL_ARGS, drop_path_rate=0.3)).to(DEVICE).train()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x = torch.randn(2, 3, 48, 40, device=DEVICE)
    results = []
    for run in (compiled, model):
        torch.manual_seed(3)
        model.zero_grad()
        out = run(x)
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    (out_c, grads_c), (out_e, grads_e) = results
    assert rel_err(out_c, out_e) <= 1e-6
    for (name, _), gc, ge in zip(model.named_parameters(), grads_c, grads_e):
        if ge.norm() < 1e-6:  # conv biases ahead of BatchNorm: zero up to rounding in both
            assert gc.norm() < 1e-6, name
        else:
            assert rel_err(gc, ge) <= 1e-5, name


@pytest.mark.parametrize("shape,form", [((2, 9, 14, 2, 16), "decomposed"), ((1, 8, 15, 1, 8), "decomposed"),
                                        ((2, 3, 4, 2, 16), "full"), ((1, 5, 20, 2, 8), "decomposed")])
def test_cpu_path_pads_short_key_rows_without_changing_results(shape, form, monkeypatch):
    """Rows of 8-15 keys run padded to 16 (zero keys, -inf bias) on the CPU path: same values and
    gradients as the reference, and as the unpadded CPU path."""
    from rmt.ops.masa import cpu as masa_cpu
    assert masa_cpu._key_padding(14) == 2 and masa_cpu._key_padding(16) == 0 and masa_cpu._key_padding(4) == 0
    _check("cpu", shape, form)
    _, args, extra = _inputs(shape, device="cpu")
    padded = masa(*args, form=form, impl="cpu", add=extra)
    set_fast_path(cpu_pad_keys=False)
    assert masa_cpu._key_padding(14) == 0
    assert rel_err(padded, masa(*args, form=form, impl="cpu", add=extra)) <= 1e-6


@pytest.mark.parametrize("shape", [(5, 9, 14, 2, 16), (3, 8, 7, 1, 8)])
def test_cpu_path_takes_images_in_groups_at_inference_with_the_same_results(shape, monkeypatch):
    """With logits above ``fast_path.cpu_chunk_logit_bytes`` the decomposed form runs image groups (an uneven
    last group included): the same values as the whole batch at once and as the reference; training
    keeps the whole batch."""
    from rmt.ops.masa import cpu as masa_cpu
    _, args, extra = _inputs(shape, device="cpu")
    b, h, w, n, _ = shape
    with torch.no_grad():
        whole = masa(*args, form="decomposed", impl="cpu", add=extra)
        keys = max(w + masa_cpu._key_padding(w), h + masa_cpu._key_padding(h))
        set_fast_path(cpu_chunk_logit_bytes=2 * n * h * w * keys * 4)
        assert masa_cpu._image_group(b, n, h, w, keys, 4) == 2   # what masa below uses
        grouped = masa(*args, form="decomposed", impl="cpu", add=extra)
        ref = masa_reference(*args, "decomposed", add=extra)
    assert rel_err(grouped, whole) <= 1e-6 and rel_err(grouped, ref) <= 1e-6
    assert masa_cpu._image_group(b, n, h, w, keys, 4) == b   # gradients enabled: one group


@pytest.mark.parametrize("impl,shape", [("reference", (2, 4, 16, 2, 16)), ("cpu", (2, 4, 16, 2, 16)),
                                        ("cpu", (1, 9, 14, 2, 16))])
def test_decomposed_form_compiles_with_inductor_on_cpu(impl, shape):
    """Inductor itself (not only the tracing backends) compiles the decomposed form's 5-D attention
    on the reference and CPU paths: its attention-fusion pass used to match it and then fail to
    build a 4-D replacement. Rows of 14 and 9 keys make the CPU path pad its keys."""
    _, args, extra = _inputs(shape, device="cpu")
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]

    def run(*inputs):
        return masa(*inputs, form="decomposed", impl=impl, add=extra.detach())
    torch._dynamo.reset()
    with torch.no_grad():
        got, want = torch.compile(run, fullgraph=True)(*args), run(*args)
    assert rel_err(got, want) <= 1e-5
