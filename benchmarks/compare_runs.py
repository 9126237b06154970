"""Compare runs written by benchmarks/multi_gpu.py: scaling of img/s and the training-loss curves.

    python benchmarks/compare_runs.py BASE.json OTHER.json [OTHER.json ...]

For each OTHER: the img/s ratio to BASE, the ranks' largest parameter difference, and, at the
steps both logged, the mean and largest absolute difference of the training loss (the curves
match "within noise" when these are small beside the loss's own step-to-step change, printed too).
"""
import json
import statistics
import sys


def main(paths):
    base, *others = [json.load(open(p)) for p in paths]
    base_loss = dict(map(tuple, base["losses"]))
    steps = sorted(base_loss)
    noise = statistics.mean(abs(base_loss[a] - base_loss[b]) for a, b in zip(steps, steps[1:])) if len(steps) > 1 else 0.0
    print(f"base {base['tag']}: {base['world_size']} GPU(s), global batch {base['global_batch']}, "
          f"{base['img_per_s']:.0f} img/s, loss step-to-step change {noise:.4f}")
    for run in others:
        loss = dict(map(tuple, run["losses"]))
        common = sorted(set(loss) & set(base_loss))
        diffs = [abs(loss[s] - base_loss[s]) for s in common]
        line = (f"{run['tag']}: {run['world_size']} GPU(s), global batch {run['global_batch']}, "
                f"{run['img_per_s']:.0f} img/s = {run['img_per_s'] / base['img_per_s']:.2f}x base, "
                f"ranks' max parameter difference {run['rank_max_abs_diff']:.3g}")
        if diffs:
            line += f", loss |diff| mean {statistics.mean(diffs):.4f} max {max(diffs):.4f} over {len(diffs)} points"
        print(line)


if __name__ == "__main__":
    main(sys.argv[1:])
