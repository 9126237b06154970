"""timm's own model tests pass on the models ``import rmt`` registers.

timm's ``tests/test_models.py`` (Apache-2.0, from the sdist of the installed timm release; fetched
with ``pip download`` on first use and cached, not copied into this repository) runs in a
subprocess with the plugin ``tests/timm_contract/rmt_timm_contract.py``, which restricts its
per-model tests to rmt's models and skips TorchScript for the two plug-in models (documented as
unsupported). By default the small variants run (``rmt_tiny``, ``rmt_deit_small``,
``rmt_swin_tiny``: about two minutes on two CPU cores); ``RMT_TIMM_CONTRACT_MODELS=all`` runs every
registered model, or give a comma-separated list. ``RMT_TIMM_TESTS=path/to/test_models.py`` uses a
local copy (offline); without one and without network access the test is skipped, saying so.
"""
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
import timm

HERE = Path(__file__).parent
SMALL_MODELS = "rmt_tiny,rmt_deit_small,rmt_swin_tiny"
CACHE = Path(os.environ.get("RMT_CACHE", Path.home() / ".cache" / "rmt")) / "timm-tests" / timm.__version__


def _fetch_timm_tests() -> Path:
    """timm's ``tests/test_models.py`` for the installed timm version (cached after the first fetch)."""
    local = os.environ.get("RMT_TIMM_TESTS")
    if local:
        return Path(local)
    target = CACHE / "test_models.py"
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               f"timm=={timm.__version__}", "-d", tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            pytest.skip("pip download of timm's sdist timed out; set RMT_TIMM_TESTS to a local test_models.py")
        sdists = list(Path(tmp).glob("timm-*.tar.gz"))
        if done.returncode or not sdists:
            pytest.skip(f"could not fetch timm {timm.__version__}'s sdist (offline?): {done.stderr.strip()[-300:]}; "
                        "set RMT_TIMM_TESTS to a local copy of its tests/test_models.py")
        with tarfile.open(sdists[0]) as tar:
            member = tar.getmember(f"timm-{timm.__version__}/tests/test_models.py")
            data = tar.extractfile(member).read()
            license_text = tar.extractfile(tar.getmember(f"timm-{timm.__version__}/LICENSE")).read()
    assert b"Apache License" in license_text and b"Version 2.0" in license_text, "timm's license changed"
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / "LICENSE").write_bytes(license_text)
    partial = target.with_suffix(".part")
    partial.write_bytes(data)
    os.replace(partial, target)   # an interrupted fetch leaves no half-written test file
    return target


def test_timm_test_models_pass_on_rmt_models():
    test_file = _fetch_timm_tests()
    models = os.environ.get("RMT_TIMM_CONTRACT_MODELS", SMALL_MODELS)
    env = dict(os.environ, RMT_TIMM_CONTRACT_MODELS="" if models == "all" else models,
               PYTHONPATH=os.pathsep.join([str(HERE / "timm_contract"), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)   # the models as a CPU user runs them
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "rmt_timm_contract", "-p", "no:cacheprovider",
           "-o", "addopts=", "--rootdir", str(test_file.parent), str(test_file), "-rfEs"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=test_file.parent, timeout=1800)
    summary = done.stdout[-4000:]
    assert done.returncode == 0, summary + done.stderr[-2000:]
    assert " passed" in summary and "failed" not in summary, summary
