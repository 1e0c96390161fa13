#!/usr/bin/env python3
"""Build the *test* evaluation texts, offline, and record the dev/test split in docs/data/texts.json.

Defaults, learning rates, step counts and mixes are chosen on the *dev* texts only: *Persuasion*
(``--dataset austen``) and the licence texts (``docs/data/eval-licenses.txt``, written by
build_calib_mix.py), on which llmq's past choices were already measured. The *test* texts, unlike
Austen and unlike every text anything was tuned on, are only ever reported:

* ``docs/data/test-kjv-acts.txt``: the Book of Acts in the King James Version (1611; public domain,
  its copyright expired, as Debian's ``bible-kjv-text`` states), read with the ``bible`` program of
  Debian's ``bible-kjv`` from that package's data: archaic narrative prose, one verse per line.
* ``docs/data/test-code.txt``: pure-Python CPython standard library modules (PSF License, see
  ``runtime/sources/data/LICENSE-PSF.txt``) that the calibration mix's code does not contain.

    python scripts/build_eval_texts.py     # needs apt-get (Debian's archive) and CPython 3.11

Both files are cut at a paragraph near their budget; their sha256 is recorded, so a rebuild
that differs is visible.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from build_calib_mix import CODE_MODULES, code, sha256_of

from llmq.runtime.sources.text import cut_at_paragraph

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "docs" / "data"
BUDGET = 120_000  # characters per text: about 30,000 tokens of prose, more of code
TEST_CODE_MODULES = (
    "pathlib", "shutil", "zipfile", "logging", "subprocess", "inspect", "tarfile", "ftplib", "smtplib", "imaplib",
)  # fmt: skip
KJV_PACKAGES = ("bible-kjv", "bible-kjv-text")


def kjv_acts() -> str:
    """Acts 1-28 (KJV), a chapter heading and then one verse per line, verse numbers dropped."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run(["apt-get", "download", *KJV_PACKAGES], cwd=work, check=True, capture_output=True)
        for deb in work.glob("*.deb"):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "root")], check=True)
        root = work / "root" / "usr"
        listing = subprocess.run([str(root / "bin" / "bible"), "-p", str(root / "lib"), "-l10000", "Acts 1:1-28:31"],
                                 check=True, capture_output=True, text=True).stdout  # fmt: skip
    chapters, lines = [], []
    for line in listing.splitlines():
        if re.fullmatch(r"Acts \d+", line.strip()):
            if lines:
                chapters.append("\n".join(lines))
            lines = [line.strip()]
        elif verse := re.fullmatch(r"\s*\d+ (.+)", line):
            lines.append(verse.group(1).strip())
    chapters.append("\n".join(lines))
    if len(chapters) != 28:
        raise SystemExit(f"expected the 28 chapters of Acts, read {len(chapters)}")
    return cut_at_paragraph("\n\n".join(chapters), BUDGET)


def test_code() -> str:
    overlap = set(TEST_CODE_MODULES) & set(CODE_MODULES)
    if overlap:
        raise SystemExit(f"{sorted(overlap)} are in the calibration mix as well")
    return code(TEST_CODE_MODULES, BUDGET)


def _entry(path: Path, source: str, licence: str) -> dict:
    text = path.read_text(encoding="utf-8")
    return {"path": str(path.relative_to(ROOT)), "source": source, "license": licence, "chars": len(text),
            "sha256": sha256_of(text)}  # fmt: skip


def main() -> None:
    python = f"CPython {sys.version.split()[0]}"
    written = {
        "kjv-acts": (DATA / "test-kjv-acts.txt", kjv_acts(),
                     "the Book of Acts, King James Version, from Debian bible-kjv-text 4.38", "public domain"),
        "code": (DATA / "test-code.txt", test_code(),
                 f"{python} standard library: {', '.join(TEST_CODE_MODULES)}", "PSF-2.0"),
    }  # fmt: skip
    for path, text, _, _ in written.values():
        path.write_text(text, encoding="utf-8")
    split = {
        "rule": "choose methods, defaults, rates, steps and mixes on dev texts only; report on test texts",
        "dev": {
            "persuasion": {"option": "--dataset austen", "source": "Jane Austen, Persuasion (eval split)",
                           "license": "public domain"},
            "licences": {"option": "--text-file docs/data/eval-licenses.txt",
                         **_entry(DATA / "eval-licenses.txt", "Debian /usr/share/common-licenses", "verbatim copies")},
        },
        "test": {name: {"option": f"--text-file {path.relative_to(ROOT)}", **_entry(path, source, licence)}
                 for name, (path, _, source, licence) in written.items()},
    }  # fmt: skip
    (DATA / "texts.json").write_text(json.dumps(split, indent=2) + "\n", encoding="utf-8")
    for name, entry in split["test"].items():
        print(f"{name}: {entry['path']}, {entry['chars']} characters, sha256 {entry['sha256']}")


if __name__ == "__main__":
    main()
