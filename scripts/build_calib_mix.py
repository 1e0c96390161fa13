"""Build the texts of llmq's built-in calibration mix, and the legal-text evaluation file, offline.

The mix (``llmq.runtime.sources.text``, dataset ``mix``) is three registers; the loader takes two
thirds of it from the prose and a sixth from each file written here (the first mix, which stats
files may still name, took a third of each):

* narrative and dialogue prose: the start of *Pride and Prejudice*, already embedded for ``austen``;
* expository, technical text: the Python Language Reference's topics as shipped in CPython's
  ``pydoc_data/topics.py`` (PSF License), written here to ``mix-technical.txt``;
* code: a fixed list of pure-Python CPython standard library modules (PSF License), written to
  ``mix-code.txt``.

``mix.json`` records each file's sha256, source, licence and the Python version it was read from;
CPython's licence travels with them as ``LICENSE-PSF.txt``. The evaluation text "unlike any
calibration source", legal prose, is the GNU, Apache, Mozilla and Artistic licence texts from
Debian's ``/usr/share/common-licenses`` (each licence permits verbatim copies), written to
``docs/data/eval-licenses.txt``.

    python scripts/build_calib_mix.py     # rewrites the files; commit them with mix.json
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

from llmq.runtime.sources.text import cut_at_paragraph

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "runtime" / "sources" / "data"
BUDGET = 250_000  # characters per register

CODE_MODULES = (
    "argparse", "dataclasses", "textwrap", "heapq", "bisect", "fractions", "statistics", "csv", "configparser",
    "json.decoder", "json.encoder", "shlex", "difflib", "string", "calendar", "functools", "contextlib", "enum",
    "ipaddress", "queue", "sched", "graphlib", "colorsys", "pprint", "fnmatch", "glob", "tempfile", "gettext",
)  # fmt: skip
LICENSES = ("Apache-2.0", "GPL-3", "MPL-2.0", "LGPL-2.1", "GFDL-1.3", "Artistic")


def technical() -> str:
    from pydoc_data import topics

    return cut_at_paragraph("\n\n".join(topics.topics[key].strip() for key in sorted(topics.topics)), BUDGET)


def code(modules: tuple[str, ...] = CODE_MODULES, budget: int = BUDGET) -> str:
    """The modules' sources in order, each under a ``# path.py`` line, cut at a paragraph near ``budget``."""
    parts = []
    for name in modules:
        spec = importlib.util.find_spec(name)
        source = Path(spec.origin).read_text(encoding="utf-8")
        parts.append(f"# {name.replace('.', '/')}.py\n{source.strip()}")
    return cut_at_paragraph("\n\n\n".join(parts), budget)


def licenses() -> str:
    folder = Path("/usr/share/common-licenses")
    return "\n\n\n".join((folder / name).read_text(encoding="utf-8").strip() for name in LICENSES)


def sha256_of(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def main() -> None:
    python = f"CPython {sys.version.split()[0]}"
    files = {
        "mix-technical.txt": (technical(), f"{python} pydoc_data/topics.py (Language Reference topics)", "PSF-2.0"),
        "mix-code.txt": (code(), f"{python} standard library: {', '.join(CODE_MODULES)}", "PSF-2.0"),
    }
    record = {}
    for name, (text, source, licence) in files.items():
        (DATA / name).write_text(text, encoding="utf-8")
        record[name] = {"sha256": sha256_of(text), "chars": len(text), "source": source, "license": licence}
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    licence_text = Path(sys.base_prefix) / "lib" / version / "LICENSE.txt"
    (DATA / "LICENSE-PSF.txt").write_text(licence_text.read_text(encoding="utf-8"), encoding="utf-8")
    (DATA / "mix.json").write_text(json.dumps({"files": record}, indent=2) + "\n", encoding="utf-8")
    legal = licenses()
    (ROOT / "docs" / "data" / "eval-licenses.txt").write_text(legal, encoding="utf-8")
    for name, info in record.items():
        print(f"{name}: {info['chars']} characters, {info['source']}")
    print(f"docs/data/eval-licenses.txt: {len(legal)} characters ({', '.join(LICENSES)}), sha256 {sha256_of(legal)}")


if __name__ == "__main__":
    main()
