"""llmq where POSIX-only modules do not exist (Windows has neither ``resource`` nor ``fcntl``).

A child process sets ``sys.modules[...] = None`` for both, which makes their import raise
ImportError as it would there, and then imports every llmq module and uses what needed them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from test_model_card import ENTRY

import llmq
from llmq.runtime.format import artifact as A
from llmq.runtime.format import card as C

CHILD = """
import importlib, json, logging, pkgutil, sys
sys.modules["resource"] = None
sys.modules["fcntl"] = None
warnings = []
class Keep(logging.Handler):
    def emit(self, record):
        warnings.append(record.getMessage())
logging.getLogger("llmq").addHandler(Keep())
import llmq
from llmq.runtime.format import card
from llmq.runtime.sources import memory
failed = {}
for module in pkgutil.walk_packages(llmq.__path__, "llmq."):
    if module.name.endswith("__main__"):
        continue
    try:
        importlib.import_module(module.name)
    except Exception as err:
        failed[module.name] = repr(err)
record = card.record_perplexity(sys.argv[1], json.loads(sys.argv[2]))
print(json.dumps({"failed": failed, "peak": memory.peak_rss_bytes(), "current": memory.current_rss_bytes(),
                  "ppl": record.ppl, "warnings": warnings}))
"""


def test_every_module_imports_and_a_card_records_without_resource_or_fcntl(tiny_artifact, tmp_path):
    artifact = Path(shutil.copytree(tiny_artifact, tmp_path / "tiny.llmq"))
    child = subprocess.run([sys.executable, "-c", CHILD, str(artifact), json.dumps(ENTRY)], capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert child.returncode == 0, child.stderr
    seen = json.loads(child.stdout.splitlines()[-1])
    assert seen["failed"] == {}
    assert seen["peak"] is None  # no resource module: the peak is unknown, not made up
    assert seen["current"] > 10 * 2**20  # /proc still answers: a Python process with torch is well above 10 MiB
    assert seen["ppl"] == ENTRY["ppl"]
    assert any("no file locking" in w for w in seen["warnings"]), seen["warnings"]
    card = artifact / A.CARD
    assert [r.ppl for r in C.read_records(card.read_text(encoding="utf-8"), card)] == [ENTRY["ppl"]]
    assert llmq.verify(artifact).ok  # manifest and card agree
