"""glibc malloc tuning for CPU runs: the thresholds take effect, and the CLI applies them on CPU only."""
import argparse
import platform
import subprocess
import sys
import textwrap

import pytest

from rmt import cli
from rmt.host_memory import keep_freed_memory

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the thresholds are glibc's")

# mallinfo2 (glibc >= 2.33): hblkhd is the number of bytes in blocks served by mmap
_PROBE = textwrap.dedent("""
    import ctypes, sys, torch
    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    if sys.argv[1] == "keep":
        from rmt.host_memory import keep_freed_memory
        assert keep_freed_memory()
    before = libc.mallinfo2().hblkhd
    t = torch.ones(16 << 20)  # 64 MiB of float32, above glibc's largest dynamic mmap threshold (32 MiB)
    print(libc.mallinfo2().hblkhd - before >= t.numel() * 4)
""")


@glibc_only
@pytest.mark.parametrize("setting,mapped", [("default", "True"), ("keep", "False")])
def test_large_tensors_come_from_the_heap_once_kept(setting, mapped):
    if not hasattr(__import__("ctypes").CDLL("libc.so.6"), "mallinfo2"):
        pytest.skip("mallinfo2 needs glibc 2.33 or newer")
    out = subprocess.run([sys.executable, "-c", _PROBE, setting], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == mapped


@glibc_only
def test_keep_freed_memory_is_accepted_and_validates_its_argument():
    assert keep_freed_memory() is True
    assert keep_freed_memory(64 << 20) is True
    with pytest.raises(ValueError, match="between 1 and 2"):
        keep_freed_memory(1 << 31)
    assert keep_freed_memory() is True  # this process keeps what the CLI would set


@pytest.mark.parametrize("device,cuda,expected", [("cpu", True, True), ("cuda", False, False), ("cuda:1", True, False),
                                                  (None, False, True), (None, True, False), ("cpu:0", True, True)])
def test_runs_on_cpu(device, cuda, expected, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert cli.runs_on_cpu(argparse.Namespace(device=device)) is expected


def test_cli_keeps_freed_memory_when_it_runs_on_cpu(monkeypatch, capsys):
    import torch
    import rmt.host_memory
    calls = []
    monkeypatch.setattr(rmt.host_memory, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["info", "rmt_tiny"]) == 0
    assert calls == [1]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cli.main(["info", "rmt_tiny"]) == 0
    assert calls == [1]
    capsys.readouterr()
