"""Inference replayed from CUDA graphs (`GraphedInference`, `rmt eval --cuda-graph`, `rmt benchmark --impls
graphs`): the same outputs as the eager forward pass, one graph per input shape, clear errors off CUDA."""
import pytest
import timm
import torch

from conftest import SMALL_ARGS
from rmt.classification.evaluate import evaluate
from rmt.engine.cuda_graph import GraphedInference

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def _model(**kw) -> torch.nn.Module:
    return timm.create_model("rmt_tiny", **dict(SMALL_ARGS, num_classes=7, **kw)).eval()


def test_cpu_inputs_and_bad_settings_are_refused_with_the_fix():
    runner = GraphedInference(_model())
    with pytest.raises(ValueError, match="needs CUDA inputs.*without --cuda-graph"):
        runner(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="max_graphs"):
        GraphedInference(_model(), max_graphs=0)
    batches = [(torch.randn(2, 3, 64, 64), torch.tensor([0, 1]))]
    with pytest.raises(ValueError, match="--cuda-graph needs a CUDA device"):
        evaluate(_model(), batches, torch.device("cpu"), 7, cuda_graph=True)


def test_benchmark_skips_graphed_inference_rows_on_cpu(capsys):
    from rmt.cli import main
    args = ["benchmark", "--device", "cpu", "--models", "rmt_tiny", "--peers", "", "--impls", "graphs,fast",
            "--modes", "infer", "--sizes", "", "--compiled", "", "--infer-batch", "1", "--warmup", "0",
            "--iters", "1"]
    assert main(args) == 0
    table = capsys.readouterr().out.split("\n\n")[-1]
    rows = [line.split()[1] for line in table.splitlines() if line.startswith("rmt_tiny")]
    assert rows == ["fast"]


@needs_cuda
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_replays_match_the_eager_forward_and_outputs_are_not_overwritten(amp):
    model = _model().cuda()
    runner = GraphedInference(model, amp)
    xs = [torch.randn(2, 3, 64, 64, device="cuda") for _ in range(3)]
    with torch.inference_mode(), torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
        want = [model(x) for x in xs]
    got = [runner(x) for x in xs]
    assert runner.captures == 1 and runner.replays == 3
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)  # earlier outputs survive later replays


@needs_cuda
def test_one_graph_per_shape_the_least_recently_used_freed_first():
    model = _model().cuda()
    runner = GraphedInference(model, max_graphs=2)
    a, b, c = (torch.randn(n, 3, s, s, device="cuda") for n, s in ((2, 64), (3, 64), (2, 96)))
    for x in (a, b, a, c, b):  # c evicts b (a was used after it); b is captured again
        out = runner(x)
        with torch.inference_mode():
            torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    assert runner.captures == 4 and len(runner.graphs) == 2
    runner.release()
    assert not runner.graphs


@needs_cuda
def test_features_only_outputs_and_graphed_evaluation():
    feats = timm.create_model("rmt_tiny", features_only=True, **SMALL_ARGS).eval().cuda()
    x = torch.randn(2, 3, 64, 64, device="cuda")
    got = GraphedInference(feats)(x)
    with torch.inference_mode():
        want = feats(x)
    assert isinstance(got, list) and len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    model = _model().cuda()
    batches = [(torch.randn(4, 3, 64, 64), torch.randint(0, 7, (4,))) for _ in range(3)]
    batches.append((torch.randn(1, 3, 64, 64), torch.tensor([3])))  # a last, smaller batch
    dev = torch.device("cuda")
    eager = evaluate(model, batches, dev, 7, confusion=True)
    graphed = evaluate(model, batches, dev, 7, confusion=True, cuda_graph=True)
    assert graphed["count"] == eager["count"] == 13
    assert graphed["top1"] == eager["top1"] and torch.equal(graphed["confusion"], eager["confusion"])
    assert abs(graphed["loss"] - eager["loss"]) <= 1e-5 * max(1.0, abs(eager["loss"]))
