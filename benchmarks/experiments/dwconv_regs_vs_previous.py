"""Depthwise kernel: registers, spills and graph-timed us of this tree against a copy of the previous commit
(`git archive HEAD~1 src benchmarks | tar -x -C .bench_base/old`), batch 256, bf16, default tiles (and 8 warps)."""
import importlib.util, sys, torch
sys.path.insert(0, "src"); sys.path.insert(0, "benchmarks")
from kernel_tiles import _seconds
from rmt.ops import dwconv as new
spec = importlib.util.spec_from_file_location("old_dwconv", ".bench_base/old/src/rmt/ops/dwconv.py",
                                              submodule_search_locations=None)
# the old module imports its siblings relatively: load it as part of a package copy
sys.path.insert(0, ".bench_base/old/src")
import importlib
old_pkg_path = ".bench_base/old/src"
import types
def load_old():
    import importlib.machinery
    name = "oldrmt"
    loader = importlib.machinery.SourceFileLoader
    pkg = types.ModuleType(name); pkg.__path__ = [old_pkg_path + "/rmt"]; sys.modules[name] = pkg
    ops = types.ModuleType(name + ".ops"); ops.__path__ = [old_pkg_path + "/rmt/ops"]; sys.modules[name + ".ops"] = ops
    return importlib.import_module(name + ".ops.dwconv")
old = load_old()
sys.path.remove(".bench_base/old/src")

class Rec:
    def __init__(self): self.k = None
    def __call__(self, kern):
        rec = self
        class G:
            def __getitem__(self, grid):
                def run(*a, **kw):
                    rec.k = kern[grid](*a, **kw)
                    return rec.k
                return run
        return G()

B = 256
print(f"{'kernel':<22}{'shape':<20}{'tile':<18}{'old regs/spill':>15}{'old us':>9}{'new regs/spill':>15}{'new us':>9}{'new 8w us':>10}")
for side, c in [(56, 64), (28, 128), (14, 256), (7, 512)]:
    for name, ks, mult, res in [("cpe", 3, 1, True), ("lepe", 5, 1, False), ("ffn", 3, 3, True), ("ffn bwd", 3, 3, True)]:
        ch = c * mult
        wide = torch.randn(B, side, side, 3 * ch if name == "lepe" else ch, device="cuda", dtype=torch.bfloat16)
        x = wide[..., 2 * ch:] if name == "lepe" else wide
        w = torch.randn(ch, 1, ks, ks, device="cuda"); b = torch.randn(ch, device="cuda")
        dy = torch.randn(B, side, side, ch, device="cuda", dtype=torch.bfloat16)
        out = {}
        for tag, mod in (("old", old), ("new", new)):
            bwd = name.endswith("bwd")
            tile = mod._backward_blocks(side, ch, ks, True) if bwd else mod._blocks(side, ch, ks)
            tiles = [tile] + ([(tile[0], tile[1], 8, tile[3])] if tag == "new" else [])
            for t in tiles:
                rec = Rec()
                if bwd:
                    fn = lambda: mod._backward(rec, dy, x, w, True, True, True, False, True, tile=t)
                else:
                    fn = lambda: mod._forward(rec, x, w, b, res, False, t)
                fn()
                regs = f"{rec.k.n_regs}/{rec.k.n_spills}"
                out[(tag, t[2])] = (regs, _seconds(fn, torch.device("cuda"), 20) * 1e6)
        print(f"{name:<22}{f'{B}x{side}x{side}x{ch}':<20}{str(tile):<18}{out[('old', tile[2])][0]:>15}{out[('old', tile[2])][1]:>9.1f}"
              f"{out[('new', tile[2])][0]:>15}{out[('new', tile[2])][1]:>9.1f}{out[('new', 8)][1]:>10.1f}  8w regs {out[('new', 8)][0]}", flush=True)
