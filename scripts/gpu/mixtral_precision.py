"""Mixtral-8x7B at full depth (32 layers), fp16: the engine and HF fp16, each against HF float32.

Random weights on the GPU. HF float32 of the whole model (187 GB) does not fit the H200, so it
runs each decoder layer in float32 in turn (upcast on entry, back to float16 after: exact), with
the embeddings, final norm and head in float32. Prints, per prompt length, max |dlogit| and the
top-1 of each, with the router as drawn and scaled by 10 (decisive routing). Run on the GPU
machine after scripts/gpu/setup.sh: python3 -P scripts/gpu/mixtral_precision.py
(needs dist-gpu/mixtral-8x7b from prepare.py --mixtral).
"""

import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from gpu.test_cuda import GPU_DIR, _fused, random_mixtral_reference  # noqa: E402

from mistral_compile.runtime import Engine  # noqa: E402

LENGTHS = (1, 2, 17, 300, 2100)


def float32_logits(model, ids):
    """HF's last-position logits with every layer computed in float32, one layer at a time."""
    outer = [model.model.embed_tokens, model.model.norm, model.lm_head]

    def up(mod, args):  # a hook that returns something replaces the arguments (or output)
        mod.float()

    def down(mod, args, out):
        mod.half()

    hooks = []
    for layer in model.model.layers:
        hooks += [layer.register_forward_pre_hook(up), layer.register_forward_hook(down)]
    for mod in outer:
        mod.float()
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids], device="cuda"), logits_to_keep=1).logits[0, -1]
        return logits.float().cpu().numpy()
    finally:
        for h in hooks:
            h.remove()
        for mod in outer:
            mod.half()


def main() -> None:
    """Print the table."""
    root = GPU_DIR / "mixtral-8x7b"
    ref = random_mixtral_reference(torch.float16)
    ids = np.random.default_rng(7).integers(3, 32000, max(LENGTHS)).tolist()
    for scale in (1, 10):
        if scale != 1:
            with torch.no_grad():
                for layer in ref.model.layers:
                    layer.mlp.gate.weight.mul_(scale)
        refs = {}  # before the engine: the float32 pass replaces the model's tensors
        for n in LENGTHS:
            with torch.no_grad():
                w16 = ref(torch.tensor([ids[:n]], device="cuda"), logits_to_keep=1).logits[0, -1]
            refs[n] = (float32_logits(ref, ids[:n]), w16.float().cpu().numpy())
        eng = Engine(root, root / "lib.so", device="cuda", params=_fused(root, ref.state_dict()))
        for n, (w32, w16) in refs.items():
            eng.reset()
            got = eng.prefill(ids[:n])
            print(f"router x{scale:<2d} prompt {n:5d}: engine vs HF float32 max|d| "
                  f"{float(np.abs(got - w32).max()):.3f}, top-1 {int(np.argmax(got))}/"
                  f"{int(np.argmax(w32))}; HF float16 vs float32 "
                  f"{float(np.abs(w16 - w32).max()):.3f}, top-1 {int(np.argmax(w16))}", flush=True)
        del eng
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
