"""Write docs/models.md: the coverage matrix of decoder families, each run through every step.

    python scripts/family_matrix.py            # runs the matrix (about a minute), writes docs/models.md

The steps are tests/family_models.py's ``check_family``, the same ones tests/test_families.py
runs in CI: tiny random models built from each family's transformers config, quantized with
round-to-nearest, with inline calibration and at 4 bits, verified, evaluated, generated with, and
their logits checked against the source model and the exact reference decode.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the family definitions and the in-process CLI runner

HEADER = """# Model families

Which decoder families llmq quantizes, calibrates, verifies and runs, as measured by
`python scripts/family_matrix.py` (which wrote this file) and checked in CI by
`tests/test_families.py`. Each family is a tiny random model built offline from its
`transformers` config (2 decoder layers, hidden 80, MLP 144, a 400-token vocabulary; widths that
are multiples of no group size llmq uses) and goes through:

1. `llmq quantize` with round-to-nearest (default preset, `--g4 16`), with inline calibration
   (`--calib-data austen`: Hessian-ranked stripes and GPTQ) and at `--preset 4bit`;
2. `llmq verify` of all three artifacts;
3. `llmq eval ppl` (Austen, 4 windows of 64 tokens) and `llmq generate` (8 tokens) with the calibrated one;
4. logits: the 2-bit artifacts run by llmq equal the source model run by transformers with every
   tensor replaced by the artifact's (quantized ones decoded by the exact reference), to float32
   rounding of the two runtimes' operation order (at most 1e-5; bit-equal on an Intel Xeon, up to
   1.2e-6 apart on an AMD EPYC for Falcon's and the MoE families' modules); the 4-bit artifact's
   logits differ from the source model's by at most 1.5 times what independent noise of 4-bit
   rounding size does (relative RMS 0.068 per matrix; the column gives the measured ratio).

The architecture table (`runtime/sources/families.py`) says where each family keeps its decoder
layers, how its checkpoint names tensors and how its experts are stored; bits per weight count
every code, scale, zero, padding bit and permutation index (small matrices pay more for them).
Perplexities are of random models on real text: they show the path runs, not quality.

"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "models.md")
    args = parser.parse_args()
    from family_models import FAMILIES, check_family

    from llmq.runtime.sources.text import Dataset, Split, load_text

    from conftest import _train_tokenizer, run_cli

    tokenizer = _train_tokenizer([load_text(Dataset.austen, None, Split.calib).text[:200_000]])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for number, label in enumerate(FAMILIES):
            work = Path(tmp) / str(number)
            work.mkdir()
            result = check_family(label, work, tokenizer, lambda *a: _run(run_cli, *a))
            rows.append(result)
            print(f"{label}: ok", file=sys.stderr)
    columns = "| family | model_type | exercises | matrices | bpw RTN | bpw GPTQ | bpw 4-bit | ppl | 4-bit/noise |"
    lines = [HEADER.rstrip() + "\n", columns, "|---" * 9 + "|"]
    for r in rows:
        lines.append(
            f"| {r['family']} | `{r['model_type']}` | {r['exercises']} | {r['linears']} | {r['bpw_rtn']:.3f} | "
            f"{r['bpw_gptq']:.3f} | {r['bpw_4bit']:.3f} | {r['ppl_gptq']:.1f} | {r['logits_4bit_vs_noise']:.2f} |"
        )
    import torch
    import transformers

    lines.append(
        f"\nMeasured {datetime.date.today().isoformat()} on {platform.machine()} (CPU, "
        f"{torch.get_num_threads()} threads), torch {torch.__version__}, transformers {transformers.__version__}."
    )
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)


def _run(run_cli, *args):
    result = run_cli(*args)
    return result.code, result.stdout, result.stderr


if __name__ == "__main__":
    main()
