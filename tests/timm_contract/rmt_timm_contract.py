"""pytest plugin that points timm's own ``tests/test_models.py`` at the models ``import rmt`` registers.

Loaded with ``-p rmt_timm_contract`` before timm's test module is imported (see
``tests/test_timm_contract.py``, which fetches that file from the installed timm release's sdist):

* ``import rmt`` registers the models;
* ``timm.list_models`` / ``timm.list_pretrained``, which the test module calls at import time to
  parametrise its per-model tests, list only the models named in ``RMT_TIMM_CONTRACT_MODELS``
  (comma-separated, default: every model rmt registers);
* tests that are not about those models (timm's own regression tests of named timm models) are
  deselected; the tests themselves run unchanged;
* TorchScript tests of the plug-in models (``rmt_deit_small``, ``rmt_swin_tiny``) are skipped: they
  are not scriptable (``torch.compile``, ``torch.export`` and ONNX export cover them). The RMT
  variants script and run those tests.
* timm's markers are registered, so that its ``@pytest.mark.base`` etc. do not warn.
"""
import os

import pytest
import timm

import rmt  # noqa: F401  (registers the models)
from rmt.plugin_models import default_cfgs as _plugin_cfgs

PLUGIN_MODELS = tuple(sorted({name.split(".")[0] for name in _plugin_cfgs}))
RMT_MODELS = tuple(sorted(set(timm.list_models("rmt_*"))))
TIMM_MARKERS = ("base", "forward", "backward", "cfg", "cfg_nonstd", "torchscript", "features",
                "fxforward", "fxbackward", "timeout(seconds)")


def _chosen() -> tuple:
    spec = os.environ.get("RMT_TIMM_CONTRACT_MODELS", "")
    names = [n.strip() for n in spec.split(",") if n.strip()] or list(RMT_MODELS)
    unknown = [n for n in names if n not in RMT_MODELS]
    if unknown:
        raise pytest.UsageError(f"RMT_TIMM_CONTRACT_MODELS names {unknown}, not models rmt registers {RMT_MODELS}")
    return tuple(names)


CHOSEN = _chosen()
_list_models, _list_pretrained = timm.list_models, timm.list_pretrained


def _only_chosen(names):
    return [n for n in names if n.split(".")[0] in CHOSEN]


def list_models(*args, **kwargs):
    """``timm.list_models`` restricted to the chosen rmt models."""
    return _only_chosen(_list_models(*args, **kwargs))


def list_pretrained(*args, **kwargs):
    """``timm.list_pretrained`` restricted to the chosen rmt models."""
    return _only_chosen(_list_pretrained(*args, **kwargs))


timm.list_models, timm.list_pretrained = list_models, list_pretrained


def pytest_configure(config):
    for marker in TIMM_MARKERS:
        config.addinivalue_line("markers", f"{marker}: timm's test marker")


def _model_of(item):
    params = getattr(getattr(item, "callspec", None), "params", {})
    name = params.get("model_name")
    return name.split(".")[0] if isinstance(name, str) else None


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        (keep if _model_of(item) in CHOSEN else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    for item in items:
        if _model_of(item) in PLUGIN_MODELS and "torchscript" in item.name:
            item.add_marker(pytest.mark.skip(
                reason="TorchScript is not supported by the plug-in models (MaSALayer does not script); "
                       "use torch.compile, torch.export or ONNX export"))
