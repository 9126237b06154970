"""Depthwise kernel, unrolled (static) against run-time row loop: registers/spills and graph-timed us, batch 256, bf16."""
import sys, torch
sys.path.insert(0, "src"); sys.path.insert(0, "benchmarks")
from kernel_tiles import _seconds
from rmt.ops import dwconv

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
dev = torch.device("cuda")
print(f"{'kernel':<10}{'shape':<20}{'tile':<18}{'static regs/spill':>18}{'us':>8}{'runtime regs/spill':>19}{'us':>8}", flush=True)
tot = [0.0, 0.0]
for side, c, nblk in [(56, 64, 3), (28, 128, 4), (14, 256, 18), (7, 512, 4)]:
    for name, ks, mult, res in [("cpe", 3, 1, True), ("lepe", 5, 1, False), ("ffn", 3, 3, True), ("ffn bwd", 3, 3, True), ("lepe bwd", 5, 1, False)]:
        ch = c * mult
        wide = torch.randn(B, side, side, 3 * ch if name.startswith("lepe") else ch, device=dev, dtype=torch.bfloat16)
        x = wide[..., 2 * ch:] if name.startswith("lepe") else wide
        w = torch.randn(ch, 1, ks, ks, device=dev); b = torch.randn(ch, device=dev)
        dy = torch.randn(B, side, side, ch, device=dev, dtype=torch.bfloat16)
        bwd = name.endswith("bwd")
        tile = dwconv._backward_blocks(side, ch, ks, name.startswith("ffn")) if bwd else dwconv._blocks(side, ch, ks)
        out = []
        for k, flag in enumerate((False, True)):
            dwconv.RUNTIME_ROWS = flag
            rec = Rec()
            if bwd:
                fn = lambda: dwconv._backward(rec, dy, x, w, res, name.startswith("ffn"), True, False, True, tile=tile)
            else:
                fn = lambda: dwconv._forward(rec, x, w, b, res, False, tile)
            fn()
            us = _seconds(fn, dev, 20) * 1e6
            tot[k] += us * nblk
            out.append((f"{rec.k.n_regs}/{rec.k.n_spills}", us))
        print(f"{name:<10}{f'{B}x{side}x{side}x{ch}':<20}{str(tile):<18}{out[0][0]:>18}{out[0][1]:>8.1f}{out[1][0]:>19}{out[1][1]:>8.1f}", flush=True)
print(f"sum over RMT-S's blocks (us per batch): static {tot[0]:.0f}, runtime {tot[1]:.0f}")
