"""Where does the 7B fp16 engine's error come from? Engine vs HF fp16 vs HF fp32, same weights.

Run on the GPU machine after scripts/gpu/run.sh installed the wheels:
  PYTHONPATH=/tmp/site:$PWD python3 scripts/gpu/diag_precision.py
"""

import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from gpu.test_cuda import GPU_DIR, _fused, random_7b_reference  # noqa: E402

from mistral_compile.runtime import Engine  # noqa: E402


def main() -> None:
    """Print the error table."""
    ref = random_7b_reference()
    lib = sys.argv[1] if len(sys.argv) > 1 else "7b-window"
    eng = Engine(GPU_DIR / lib, GPU_DIR / lib / "lib.so", device="cuda",
                 params=_fused(GPU_DIR / lib, ref.state_dict()))
    rows = {}
    prompts = {n: np.random.default_rng(7).integers(3, 32000, n).tolist() for n in (1000, 6144)}
    for n, ids in prompts.items():
        eng.reset()
        rows[n] = {"engine": eng.prefill(ids)}
        with torch.no_grad():
            rows[n]["hf16"] = ref(torch.tensor([ids], device="cuda"),
                                  logits_to_keep=1).logits[0, -1].float().cpu().numpy()
    ref.float()
    for n, ids in prompts.items():
        with torch.no_grad():
            rows[n]["hf32"] = ref(torch.tensor([ids], device="cuda"),
                                  logits_to_keep=1).logits[0, -1].float().cpu().numpy()
    for n, r in rows.items():
        d = {f"{a} vs {b}": float(np.abs(r[a] - r[b]).max())
             for a, b in (("engine", "hf16"), ("engine", "hf32"), ("hf16", "hf32"))}
        tops = {k: int(np.argmax(v)) for k, v in r.items()}
        print(f"DIAG {lib} prompt {n}: " + ", ".join(f"{k} {v:.3f}" for k, v in d.items())
              + f"; top-1 {tops}; hf32 logit std {float(r['hf32'].std()):.3f}")


if __name__ == "__main__":
    main()
