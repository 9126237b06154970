"""The model against vectors produced by the released code (tests/data/rmt_mini.npz)."""
import pytest
import torch

from rmt.checkpoint import filter_state_dict
from rmt.model import RMT

from conftest import golden_model_kwargs, rel_err

FORMS = ["TTFF", "TTTT", "FFFF"]
INPUTS = ["x_64x96", "x_72x40"]
TOL = 1e-5


def _model(golden, form):
    cfg, sd, _ = golden
    model = RMT(**golden_model_kwargs(cfg), attn_forms=form, masa_impl="reference")
    model.load_state_dict(filter_state_dict(sd, model))
    return model


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("inp", INPUTS)
def test_eval_logits_and_stage_outputs(golden, form, inp):
    _, _, arrays = golden
    model = _model(golden, form).eval()
    x = arrays[f"input.{inp}"]
    with torch.no_grad():
        logits = model(x)
        intermediates = model.forward_intermediates(x, output_fmt="NHWC", intermediates_only=True)
    assert rel_err(logits, arrays[f"logits.{form}.{inp}"]) <= TOL
    for i, feat in enumerate(intermediates):
        ref = arrays[f"stage{i}_blocks_out.{form}.{inp}"]
        assert feat.shape == ref.shape
        assert rel_err(feat, ref) <= TOL, f"stage {i}"


@pytest.mark.parametrize("form", FORMS)
def test_train_mode_logits(golden, form):
    _, _, arrays = golden
    model = _model(golden, form).train()
    with torch.no_grad():
        logits = model(arrays["input.x_64x96"])
    assert rel_err(logits, arrays[f"logits_trainmode.{form}.x_64x96"]) <= TOL


def test_form_switch_on_built_model_matches_golden(golden):
    """One set of weights, three forms chosen after construction."""
    _, _, arrays = golden
    model = _model(golden, "TTFF").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = arrays["input.x_72x40"]
    for form in FORMS:
        model.set_attention_form(form)
        with torch.no_grad():
            assert rel_err(model(x), arrays[f"logits.{form}.x_72x40"]) <= TOL
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_forms_differ(golden):
    """The golden logits of different forms differ, so the comparisons above can fail."""
    _, _, arrays = golden
    assert rel_err(arrays["logits.TTTT.x_64x96"], arrays["logits.FFFF.x_64x96"]) > 1e-3
