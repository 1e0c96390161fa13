"""Compile every kernel with NVRTC for sm_80 and sm_90 (no GPU needed) and print ptxas' resource report.

    python scripts/kernel_report.py [--json docs/data/kernel_resources.json] [--markdown]

Registers, spill bytes, stack and static shared memory per kernel instance, as ptxas reports
them. The markdown table is what docs/kernels.md shows.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from llmq.cuda import loader

ARCHS = ("sm_80", "sm_90")


def collect() -> list[dict]:
    rows = []
    for name in loader.KERNEL_FILES:
        for arch in ARCHS:
            build = loader.compile_offline(name, arch)
            by_symbol = {r.symbol: r for r in loader.resource_report(build.log)}
            for expression in loader.instances(name):
                r = by_symbol[build.lowered[expression]]
                rows.append(
                    {
                        "file": name, "kernel": expression.removeprefix("llmq::"), "arch": arch,
                        "registers": r.registers, "spill_store_bytes": r.spill_store_bytes,
                        "spill_load_bytes": r.spill_load_bytes, "stack_bytes": r.stack_bytes,
                        "shared_bytes": r.shared_bytes,
                    }
                )  # fmt: skip
    return rows


def markdown(rows: list[dict]) -> str:
    by_kernel: dict[tuple[str, str], dict[str, dict]] = {}
    for row in rows:
        by_kernel.setdefault((row["file"], row["kernel"]), {})[row["arch"]] = row
    lines = [
        "| file | kernel | regs sm_80 / sm_90 | spill st/ld sm_80 | spill st/ld sm_90 | stack | smem |",
        "|---|---|---|---|---|---|---|",
    ]
    for (name, kernel), archs in by_kernel.items():
        a, b = archs["sm_80"], archs["sm_90"]
        lines.append(
            f"| {name} | `{kernel}` | {a['registers']} / {b['registers']} | "
            f"{a['spill_store_bytes']}/{a['spill_load_bytes']} | {b['spill_store_bytes']}/{b['spill_load_bytes']} | "
            f"{max(a['stack_bytes'], b['stack_bytes'])} | {a['shared_bytes']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table instead of JSON")
    args = parser.parse_args()
    rows = collect()
    if args.json:
        from cupy_backends.cuda.libs import nvrtc

        document = {
            "command": "python scripts/kernel_report.py --json " + str(args.json),
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()} {platform.system()}, no GPU (NVRTC only)",
            "nvrtc": ".".join(map(str, nvrtc.getVersion())),
            "kernels": rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=1) + "\n")
    print(markdown(rows) if args.markdown or args.json else json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
