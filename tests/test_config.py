"""rmt.config: one surface for every fast-path switch, read by the ops at call time."""
import ast
import re
from pathlib import Path

import pytest
import torch

import rmt
from rmt.config import SWITCHES, describe, fast_path, fast_path_switches, reset_fast_path, set_fast_path
from rmt.ops.masa import cpu as masa_cpu

SRC = Path(rmt.__file__).parent


def test_every_switch_has_a_default_a_place_and_a_docstring_and_is_read_by_the_package():
    sources = "\n".join(p.read_text() for p in SRC.rglob("*.py") if p.name != "config.py")
    for name, switch in SWITCHES.items():
        assert switch.doc and switch.where and getattr(fast_path, name) == switch.default, name
        assert re.search(rf"fast_path\.{name}\b", sources), f"no module reads switch {name}"
        assert name in describe() and name in type(fast_path).__doc__
    # no module-level switch left behind: UPPERCASE booleans of the ops read at call time
    leftovers = [f"{p.relative_to(SRC)}: {m.group(0)}" for p in SRC.rglob("*.py")
                 for m in re.finditer(r"^[A-Z][A-Z0-9_]* = (True|False)\b", p.read_text(), re.M)]
    assert not leftovers, leftovers


def test_set_fast_path_checks_everything_before_setting_anything():
    with pytest.raises(AttributeError, match="unknown fast-path switch 'gelu'.*gelu_epilogue"):
        set_fast_path(gelu=False)
    with pytest.raises(TypeError, match="True or False"):
        set_fast_path(cpu_pad_keys=False, gelu_epilogue="no")
    assert fast_path.cpu_pad_keys is True            # nothing was set
    with pytest.raises(TypeError, match="integer >= 0"):
        fast_path.cpu_chunk_logit_bytes = -1
    with pytest.raises(AttributeError, match="unknown fast-path switch"):
        fast_path.not_a_switch = True
    previous = rmt.set_fast_path(gelu_epilogue=False, fold_conv_bias_devices=["cuda", "cpu"])
    assert previous == {"gelu_epilogue": True, "fold_conv_bias_devices": ("cuda",)}
    assert fast_path.fold_conv_bias_devices == ("cuda", "cpu") and "(now False)" in describe()
    assert "gelu_epilogue=False" in repr(fast_path)
    reset_fast_path()
    assert fast_path.values() == {name: s.default for name, s in SWITCHES.items()}


def test_context_manager_restores_on_exit_and_on_error():
    with rmt.fast_path_switches(cpu_pad_keys=False, cpu_chunk_logit_bytes=0):
        assert fast_path.cpu_pad_keys is False and fast_path.cpu_chunk_logit_bytes == 0
    assert fast_path.cpu_pad_keys is True and fast_path.cpu_chunk_logit_bytes == 4 << 20
    with pytest.raises(RuntimeError):
        with fast_path_switches(cpu_pad_keys=False):
            raise RuntimeError
    assert fast_path.cpu_pad_keys is True


def test_ops_read_the_switch_at_call_time():
    """The CPU path pads 14-key rows to 16 with ``cpu_pad_keys`` on, not with it off; the grouping of
    images follows ``cpu_chunk_logit_bytes`` (0: the whole batch)."""
    assert masa_cpu._key_padding(14) == 2
    with fast_path_switches(cpu_pad_keys=False):
        assert masa_cpu._key_padding(14) == 0
    with torch.no_grad():
        assert masa_cpu._image_group(8, 4, 56, 56, 56, 4) < 8
        with fast_path_switches(cpu_chunk_logit_bytes=0):
            assert masa_cpu._image_group(8, 4, 56, 56, 56, 4) == 8


def test_compiled_code_follows_a_changed_switch():
    """torch.compile guards on the switches it read: a change recompiles instead of going stale."""
    def f(x):
        return x + 1 if fast_path.cpu_pad_keys else x - 1
    compiled = torch.compile(f, backend="eager", fullgraph=True)
    x = torch.zeros(2)
    assert compiled(x).tolist() == [1, 1]
    with fast_path_switches(cpu_pad_keys=False):
        assert compiled(x).tolist() == [-1, -1]
    assert compiled(x).tolist() == [1, 1]


def test_docs_table_lists_every_switch_with_its_default():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "fast-paths.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| `([^`]+)` \|", doc, re.M))
    assert set(rows) == set(SWITCHES)
    for name, switch in SWITCHES.items():
        assert ast.literal_eval(rows[name]) == switch.default, name
