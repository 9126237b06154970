#!/usr/bin/env bash
# The main job: sets up .venv when needed, then shows every variant and runs a forward pass.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
rmt info all
python - <<'PY'
import time, timm, torch, rmt
model = timm.create_model("rmt_tiny").eval()
x = torch.randn(2, 3, 224, 224)
t = time.perf_counter()
with torch.no_grad():
    logits = model(x)
print(f"rmt_tiny forward: input {tuple(x.shape)} -> logits {tuple(logits.shape)} in {time.perf_counter() - t:.2f}s")
PY
