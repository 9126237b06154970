"""A/B: block-graph training of RMT-S, parameter gradients stolen from the static buffers (new) or copied (old)."""
import sys, torch
sys.path.insert(0, "src")
from rmt import benchmark as bm
from rmt.ops import block_graphs as bg

new_backward = bg._GraphedBlock.backward

def old_backward(ctx, grad):
    graphs, captured = ctx.graphs, ctx.captured
    if grad.data_ptr() != captured.grad.data_ptr():
        captured.grad.copy_(grad)
    captured.backward.replay()
    graphs.live = None
    g = captured.grads
    return (g[0], g[1], g[2], None, *g[4:])

dev = torch.device("cuda")
for rnd in range(2):
    for label, fn in (("old (copy)", old_backward), ("new (steal)", new_backward)):
        bg._GraphedBlock.backward = staticmethod(fn)
        r = bm.measure("rmt_small", "graphs", "train", 224, 128, dev)
        reserved = torch.cuda.max_memory_reserved() / 2**30
        print(f"round {rnd} {label:12s} {r.img_per_s:8.1f} img/s  peak {r.peak_gib:.3f} GiB  {r.note}", flush=True)
bg._GraphedBlock.backward = new_backward
