"""Golden bytes: a tiny artifact built from fixed integer codes must serialize to exactly these bytes.

If this fails, the on-disk format changed. That needs a new ``format_version``, a note in
docs/format.md, and new hashes here, never a silent update.
"""

from __future__ import annotations

import hashlib
import json

import torch

from llmq.quant.writer import ArtifactWriter
from llmq.runtime.format import artifact as A
from llmq.runtime.format import layout as L
from llmq.runtime.format.manifest import LinearEntry, Manifest

GOLDEN = {
    "shard-00000.safetensors": "eef3321cecc0479687cc1147f5aa49074c182d65ba72c03819ba9107cc3fcfbc",
    "manifest.json": "98350f6a32215151bb3f3014b86f144c9302752dfabafdfb7cabc046e1fcbbdd",
}


def _golden_tensors() -> tuple[L.LinearLayout, dict[str, torch.Tensor]]:
    lay = L.LinearLayout(2, 40, 8, g1=16, g2=2, g4=8, scale_bits=6, n_outliers=1)
    n = lay.out_features
    codes2 = torch.arange(n * lay.k2_padded).reshape(n, -1) % 4
    codes4 = torch.arange(n * lay.k4).reshape(n, -1) % 16
    t = {
        "perm": torch.tensor(list(range(39, -1, -1)), dtype=torch.int32),
        "qweight2": L.pack_codes(codes2, 2),
        "meta2": L.pack_meta2(torch.tensor([[0, 1], [2, 3]]), torch.tensor([[1, 2], [62, 63]])),
        "scale2": torch.tensor([[0.5], [0.25]], dtype=torch.float16),
        "szero2": torch.tensor([[0], [15]], dtype=torch.uint8),
        "qweight4": L.pack_codes(codes4, 4),
        "scale4": torch.tensor([[0.125], [2.0]], dtype=torch.float16),
        "zero4": torch.tensor([[8], [0]], dtype=torch.uint8),
        "outlier_rowptr": torch.tensor([0, 0, 1], dtype=torch.int32),
        "outlier_col": torch.tensor([31], dtype=torch.int32),
        "outlier_val": torch.tensor([1.5], dtype=torch.float16),
    }
    return lay, t


def test_golden_artifact_bytes(tmp_path):
    lay, packed = _golden_tensors()
    out = tmp_path / "golden.llmq"
    writer = ArtifactWriter(out, force=False)
    writer.write_shard(0, {f"proj.{k}": v for k, v in packed.items()})
    writer.commit(
        Manifest(
            linears={"proj": LinearEntry("shard-00000.safetensors", lay, None)},
            dense={},
            files={},
            llmq_version="golden",
        )
    )
    hashes = {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in GOLDEN}
    assert hashes == GOLDEN, json.dumps(hashes, indent=2)

    loaded = A.load_tensors(A.open_artifact(out))
    weight = L.dequantize({k.removeprefix("proj."): v for k, v in loaded.items()}, lay)
    # Hand-decoded corners: packed column 0 is channel 39, row 0 group 0: scale 0.5*(1+0), zero 0, code 0.
    assert float(weight[0, 39]) == 0.0
    # Row 1, packed column 1 (channel 38): code 1 (arange % 4 continues from row 0's 32 codes),
    # group 0 has zero 2 and scale 0.25 * (62 + 15).
    assert float(weight[1, 38]) == 0.25 * 77 * (1 - 2)
    # The outlier adds 1.5 at row 1, packed column 31 (channel 8).
    codes2 = (torch.arange(2 * 32).reshape(2, -1) % 4)[1, 31]
    assert float(weight[1, 8]) == 0.25 * (63 + 15) * (int(codes2) - 3) + 1.5
    # 4-bit stripe: packed column 32 is channel 7; row 0: 0.125 * (0 - 8).
    assert float(weight[0, 7]) == 0.125 * (0 - 8)
