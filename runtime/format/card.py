"""The artifact's model card, ``README.md``: hub metadata as YAML front matter, then a short description.

``llmq quantize`` writes the card (:func:`render_card`, a pure function of the manifest) before the
manifest's checksums are taken, so ``llmq verify`` covers it like every other file.
:func:`record_perplexity` adds a measured perplexity later and rewrites the card and the manifest's
record of it. The front matter follows the hub's model-card metadata (``docs/format.md``):

* ``base_model`` (only for a hub source: the hub wants a repo id there) with
  ``base_model_relation: quantized``, ``library_name: llmq``, ``pipeline_tag``, ``tags``;
* ``quantization``: method, format, bits per weight (the manifest's accounting), group sizes,
  the settings that shaped the result, and the calibration's provenance;
* ``llmq_results``: every recorded perplexity with its exact protocol, one entry per line,
  each line a JSON object (which is also a YAML flow mapping): llmq reads these back;
* ``model-index``: the same results in the hub's evaluation-results form, rendered from them.

The YAML is written by hand, without a YAML library: keys are fixed identifiers, strings are
JSON strings (valid YAML double-quoted scalars) with the characters YAML 1.1 treats as line
breaks or forbids escaped, and floats always carry a ``.`` so YAML 1.1 parsers read them as floats.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import os
import re
import signal
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from llmq import __version__
from llmq.errors import ArtifactError, ArtifactWriteError, UsageError
from llmq.runtime.format import artifact as A
from llmq.runtime.format.manifest import FORMAT_NAME, FORMAT_VERSION, MANIFEST, FileRecord, Manifest

log = logging.getLogger("llmq")

CARD = A.CARD
METHOD = "llmq range-aware mixed 2/4-bit"
RESULTS_KEY = "llmq_results"
# Left by a record_perplexity killed (or failing) between its two renames; the next one finishes
# or discards them. Hidden names: the manifest never lists them.
PENDING_CARD = f".{CARD}.llmq-new"
PENDING_MANIFEST = f".{MANIFEST}.llmq-new"
_PATH = "path/to/artifact"  # the card's examples: the artifact's folder is not part of its content
_WIKITEXT = re.compile(r"wikitext2:(?P<config>[^:]+):(?P<split>[^:]+)")  # llmq's wikitext2 label


@dataclass(frozen=True)
class PerplexityRecord:
    """One measured perplexity of the artifact, with the protocol that makes it comparable.

    text          the eval text's label (``austen:persuasion``, ``wikitext2:wikitext-2-raw-v1:test``, a file)
    seq_len       window length in tokens
    stride        a window starts every ``stride`` tokens
    max_tokens    only the text's first ``max_tokens`` tokens were used; None: the whole text
    ppl           perplexity, finite and >= 1
    ppl_stderr    its standard error (docs/eval.md), or None
    tokens_scored tokens whose loss was averaged, or None
    dtype         activations' dtype (``fp32``, ``fp16``, ``bf16``), or None
    backend       quantized matmuls' backend (``torch``, ``cuda``), or None
    date          when it was measured, ISO ``YYYY-MM-DD`` (UTC)
    llmq_version  the llmq that measured it
    """

    text: str
    seq_len: int
    stride: int
    max_tokens: int | None
    ppl: float
    ppl_stderr: float | None
    tokens_scored: int | None
    dtype: str | None
    backend: str | None
    date: str
    llmq_version: str

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def same_run_as(self, other: PerplexityRecord) -> bool:
        """Measured on the same text with the same protocol, dtype and backend: a newer one replaces it."""
        keys = ("text", "seq_len", "stride", "max_tokens", "dtype", "backend")
        return all(getattr(self, k) == getattr(other, k) for k in keys)

    @classmethod
    def from_json(cls, raw: Any, where: str, error: type[Exception] = UsageError) -> PerplexityRecord:
        """Check ``raw`` (a dict with :class:`PerplexityRecord`'s keys; ``date`` and ``llmq_version``
        may be left out: today and this llmq) and build the record; a problem raises ``error``
        naming ``where`` and the key."""

        def fail(message: str) -> None:
            raise error(f"{where}: {message}")

        if not isinstance(raw, dict):
            fail(f"a perplexity record must be an object, not {type(raw).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(map(str, set(raw) - set(known)))
        if unknown:
            fail(f"unknown key(s) {unknown}; a perplexity record has {known}")
        for key in ("text", "seq_len", "stride", "max_tokens", "ppl"):
            if key not in raw:
                fail(f"a perplexity record needs {key!r}")
        values = {"ppl_stderr": None, "tokens_scored": None, "dtype": None, "backend": None} | raw
        values.setdefault("date", datetime.datetime.now(datetime.timezone.utc).date().isoformat())
        values.setdefault("llmq_version", __version__)
        for key in ("text", "date", "llmq_version"):
            if not isinstance(values[key], str) or not values[key]:
                fail(f"{key!r} must be a non-empty string, got {values[key]!r}")
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", values["date"]):
            fail(f"'date' must be YYYY-MM-DD, got {values['date']!r}")
        for key, optional in (("seq_len", False), ("stride", False), ("max_tokens", True), ("tokens_scored", True)):
            value = values.get(key)
            if not (optional and value is None) and not (_is_int(value) and value > 0):
                fail(f"{key!r} must be a positive integer{' or null' if optional else ''}, got {value!r}")
        for key, optional in (("ppl", False), ("ppl_stderr", True)):
            value = values.get(key)
            if optional and value is None:
                continue
            if not (_is_number(value) and math.isfinite(value) and value >= 0):
                fail(f"{key!r} must be a finite number >= 0{' or null' if optional else ''}, got {value!r}")
            values[key] = float(value)
        if values["ppl"] < 1:
            fail(f"'ppl' must be at least 1 (it is exp of a mean loss), got {values['ppl']!r}")
        for key in ("dtype", "backend"):
            if values.get(key) is not None and not isinstance(values[key], str):
                fail(f"{key!r} must be a string or null, got {values[key]!r}")
        return cls(**values)


def perplexity_entry(document: dict[str, Any]) -> dict[str, Any]:
    """The record :func:`record_perplexity` takes, from ``PerplexityReport.to_json()`` (the
    ``llmq eval ppl --json`` document); ``date`` and ``llmq_version`` are filled in when recorded."""
    protocol, result = document["protocol"], document["result"]
    return {
        "text": document["text"]["source"],
        "seq_len": protocol["seq_len"],
        "stride": protocol["stride"],
        "max_tokens": protocol["max_tokens"],
        "ppl": result["ppl"],
        "ppl_stderr": result["ppl_stderr"],
        "tokens_scored": result["tokens_scored"],
        "dtype": document["dtype"],
        "backend": document["backend"],
    }


# -- rendering ------------------------------------------------------------------------------------


def render_card(manifest: Manifest, records: list[PerplexityRecord] | tuple = ()) -> str:
    """``README.md`` for the artifact ``manifest`` describes, with the perplexities ``records``
    (oldest first). A function of these alone: no clock, no environment, not even the artifact's
    folder name, so the same run writes the same bytes whatever the output is called."""
    name = model_name(manifest)
    front = _front_matter(manifest, name, list(records))
    return "---\n" + "\n".join(_block(front, 0)) + "\n---\n\n" + _body(manifest, name, list(records))


def model_name(manifest: Manifest) -> str:
    """The card's title and ``model-index`` name: the source's last path part (a hub repo's name, a
    folder's name) with ``-llmq``."""
    spec = manifest.source.spec if manifest.source else "model"
    return f"{spec.rstrip('/').rpartition('/')[2] or 'model'}-llmq"


def _front_matter(manifest: Manifest, name: str, records: list[PerplexityRecord]) -> dict[str, Any]:
    source = manifest.source
    front: dict[str, Any] = {}
    if source is not None and source.kind == "hub":
        front["base_model"] = source.spec
        front["base_model_relation"] = "quantized"
    front["library_name"] = "llmq"
    front["pipeline_tag"] = "text-generation"
    layouts = [entry.layout for entry in manifest.linears.values()]
    tags = ["llmq", "quantized"]
    tags += ["2-bit"] if any(lay.k2 > 0 for lay in layouts) else []
    tags += ["4-bit"] if any(lay.k4 > 0 for lay in layouts) else []
    tags += ["mixed-precision"] if any(lay.k2 > 0 and lay.k4 > 0 for lay in layouts) else []
    front["tags"] = tags
    front["quantization"] = _quantization(manifest, layouts)
    if records:
        front[RESULTS_KEY] = [_Flow(r.to_json()) for r in records]
        front["model-index"] = [{"name": name, "results": [_hub_result(r) for r in records]}]
    return front


def _quantization(manifest: Manifest, layouts: list) -> dict[str, Any]:
    accounting = manifest.accounting_record or manifest.accounting().to_json()
    block: dict[str, Any] = {"method": METHOD, "format": FORMAT_NAME, "format_version": FORMAT_VERSION}
    if manifest.llmq_version is not None:
        block["llmq_version"] = manifest.llmq_version
    if manifest.source is not None:
        block["source"] = manifest.source.label
        block["source_spec"] = manifest.source.spec
        if manifest.source.revision is not None:
            block["source_revision"] = manifest.source.revision
    block["bits_per_weight"] = accounting["bits_per_weight"]
    block["model_bits_per_param"] = accounting["model_bits_per_param"]
    block["quantized_linears"] = len(layouts)
    for key in ("g1", "g2", "g4", "scale_bits"):  # as stored: the layouts, whatever the config said
        values = sorted({getattr(lay, key) for lay in layouts})
        block[key] = values[0] if len(values) == 1 else values
    config = manifest.quantization or {}
    for key in ("stripe_fraction", "target_bits", "outlier_fraction", "rounding", "selection", "refine"):
        if config.get(key) is not None:
            block[key] = config[key]
    calibration = manifest.calibration
    if calibration is None:
        block["calibration"] = None  # round to nearest (or an artifact that does not say)
    else:
        keys = ("dataset", "samples", "seq_len", "seed", "tokens")
        block["calibration"] = {k: calibration[k] for k in keys if calibration.get(k) is not None}
    return block


def _hub_result(record: PerplexityRecord) -> dict[str, Any]:
    """One entry of ``model-index[0].results``, the hub's evaluation-results schema."""
    wikitext = _WIKITEXT.fullmatch(record.text)
    if wikitext:
        dataset = {"type": "Salesforce/wikitext", "name": "wikitext2", "config": wikitext["config"],
                   "split": wikitext["split"]}  # fmt: skip
    else:
        dataset = {"type": record.text, "name": record.text}
    args = {"seq_len": record.seq_len, "stride": record.stride, "max_tokens": record.max_tokens}
    metric = {"type": "perplexity", "value": record.ppl, "name": f"perplexity ({_protocol(record)})", "args": args}
    return {"task": {"type": "text-generation", "name": "Text Generation"}, "dataset": dataset, "metrics": [metric]}


def _protocol(record: PerplexityRecord) -> str:
    tokens = "whole text" if record.max_tokens is None else f"first {record.max_tokens} tokens"
    return f"seq_len {record.seq_len}, stride {record.stride}, {tokens}"


def _body(manifest: Manifest, name: str, records: list[PerplexityRecord]) -> str:
    accounting = manifest.accounting_record or manifest.accounting().to_json()
    source = manifest.source.label if manifest.source else "A model whose source was not recorded"
    calibration = manifest.calibration
    if calibration is None:
        how = "Its weights were rounded to nearest, without calibration data."
    else:
        how = (
            f"It was calibrated on `{_md(str(calibration.get('dataset')))}`: {calibration.get('samples')} windows "
            f"of {calibration.get('seq_len')} tokens, seed {calibration.get('seed')}."
        )
    lines = [
        f"# {_md(name)}",
        "",
        f"{_capitalized(_md(source))}, quantized by llmq to {_weights(manifest)}. The {len(manifest.linears)} "
        f"quantized Linears take {accounting['bits_per_weight']:.4f} bits per weight, counting every scale, zero, "
        f"index and padding bit; the whole model {accounting['model_bits_per_param']:.4f} bits per parameter with "
        f"its dense tensors. {how}",
        "",
        "## Use",
        "",
        "```python",
        "import llmq",
        "",
        f"model = llmq.load({_PATH!r})  # a transformers model whose quantized Linears are llmq modules",
        "```",
        "",
        "With transformers, once `llmq` is imported (which registers the `llmq` quantization method):",
        "",
        "```python",
        "import llmq  # noqa: F401",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"model = AutoModelForCausalLM.from_pretrained({_PATH!r})",
        f"tokenizer = AutoTokenizer.from_pretrained({_PATH!r})",
        "```",
        "",
        f'From the shell: `llmq generate {_PATH} -p "..."`, `llmq eval ppl {_PATH}`. `{_PATH}` is this folder, '
        "on a local disk (download a hub copy first: `hf download ORG/NAME --local-dir DIR`).",
        "",
        "## Perplexity",
        "",
    ]
    if records:
        lines += ["| text | protocol | ppl | ± | dtype | backend | date | llmq |", "|---|---|---|---|---|---|---|---|"]
        for r in records:
            stderr = "" if r.ppl_stderr is None else f"{r.ppl_stderr:.4g}"
            cells = [f"`{_md(r.text)}`", _protocol(r), f"{r.ppl:.4f}", stderr, _md(r.dtype or ""),
                     _md(r.backend or ""), r.date, _md(r.llmq_version)]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Measured with `llmq eval ppl` (protocol: llmq's docs/eval.md); compare only equal protocols."]
    else:
        lines.append("None recorded yet; `llmq eval ppl ARTIFACT --record` measures one and adds it here.")
    lines += [
        "",
        "## Files",
        "",
        "`manifest.json` records the source, the full quantization config, the calibration, every tensor's "
        f"layout and the SHA-256 of every file, this card included; `llmq verify {_PATH}` checks them all.",
        "",
    ]
    return "\n".join(lines)


def _weights(manifest: Manifest) -> str:
    """What the quantized Linears hold, in words."""
    layouts = [entry.layout for entry in manifest.linears.values()]
    two, four = any(lay.k2 > 0 for lay in layouts), any(lay.k4 > 0 for lay in layouts)
    if two and four:
        words = (
            "range-aware mixed 2/4-bit weights: most weight groups are stored in 2 bits with quantized scales, "
            "and the input channels with the largest range or sensitivity as whole 4-bit stripes"
        )
    elif four:
        words = "4-bit weights"
    else:
        words = "2-bit weights with quantized group scales"
    if any(lay.n_outliers > 0 for lay in layouts):
        words += ", plus a sparse set of fp16 outliers"
    return words


def _capitalized(text: str) -> str:
    return text[:1].upper() + text[1:]


def _md(text: str) -> str:
    """``text`` safe inside one Markdown line or table cell."""
    return " ".join(text.split()).replace("|", "\\|").replace("`", "'")


class _Flow(dict):
    """A mapping written on one line as a JSON object (a YAML flow mapping)."""


def _block(value: Any, indent: int) -> list[str]:
    """Block-style YAML lines for a dict or list at ``indent`` spaces."""
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if _is_scalar(item) or isinstance(item, _Flow) or item in ({}, []):
                lines.append(f"{pad}{_key(key)}: {_inline(item)}")
            else:
                lines.append(f"{pad}{_key(key)}:")
                lines += _block(item, indent if isinstance(item, list) else indent + 2)
        return lines
    for item in value:  # a list
        if isinstance(item, dict) and not isinstance(item, _Flow) and item:
            nested = _block(item, indent + 2)
            lines.append(f"{pad}- {nested[0][indent + 2 :]}")
            lines += nested[1:]
        else:
            lines.append(f"{pad}- {_inline(item)}")
    return lines


def _inline(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_string(str(k))}: {_inline(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_inline(v) for v in value) + "]"
    return _scalar(value)


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", key) else _string(key)


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _float(value)
    if isinstance(value, str):
        return _string(value)
    raise TypeError(f"cannot write {type(value).__name__} {value!r} into the card's YAML")


def _float(value: float) -> str:
    """A finite float as text both JSON and YAML 1.1 read as a float (YAML 1.1 needs a ``.``)."""
    if not math.isfinite(value):
        raise ValueError(f"cannot write {value!r} into the card: not finite")
    text = repr(value)
    if "e" in text and "." not in text:
        mantissa, _, exponent = text.partition("e")
        text = f"{mantissa}.0e{exponent}"
    elif "." not in text:
        text += ".0"
    return text


# Characters a YAML parser forbids in a document or (YAML 1.1) reads as a line break; JSON
# escapes only C0 controls, quotes and backslashes, so these get \uXXXX (valid in both).
_YAML_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029\ufeff\ufffe\uffff\ud800-\udfff]")


def _string(text: str) -> str:
    """A YAML double-quoted scalar that is also a JSON string."""
    return _YAML_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(text, ensure_ascii=False))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# -- reading the records back -------------------------------------------------------------------


def read_records(text: str, where: Path) -> list[PerplexityRecord]:
    """The ``llmq_results`` of a card llmq wrote (its text); none when it has none. A card whose
    front matter or records llmq cannot read raises :class:`ArtifactError` naming ``where``."""
    if not text.startswith("---\n") or "\n---\n" not in text[3:]:
        raise ArtifactError(f"{where}: no YAML front matter between '---' lines; this is not a card llmq wrote")
    front = text[4 : text.index("\n---\n", 3)].split("\n")
    if f"{RESULTS_KEY}:" not in front:
        return []
    records = []
    for line in front[front.index(f"{RESULTS_KEY}:") + 1 :]:
        if not line.startswith("- "):
            break
        try:
            raw = json.loads(line[2:])
        except json.JSONDecodeError as err:
            raise ArtifactError(f"{where}: a {RESULTS_KEY} entry is not one JSON object per line ({err})") from err
        records.append(PerplexityRecord.from_json(raw, f"{where} ({RESULTS_KEY})", ArtifactError))
    return records


# -- recording a perplexity -----------------------------------------------------------------------


def record_perplexity(artifact_path: str | os.PathLike, entry: dict[str, Any]) -> PerplexityRecord:
    """Add a measured perplexity to the artifact's card and return it as recorded.

    ``entry`` has :class:`PerplexityRecord`'s keys (:func:`perplexity_entry` builds it from an
    ``eval ppl`` report); ``date`` defaults to today (UTC), ``llmq_version`` to this llmq. A record
    of the same text, protocol, dtype and backend replaces the older one. An artifact written
    before llmq wrote cards gets one. ``README.md`` must be the one llmq wrote (its checksum is
    checked; a card edited by hand is refused); the other files are not re-checked here.

    ``README.md`` and ``manifest.json`` are each replaced atomically (temporary file, fsync,
    rename), the manifest first; concurrent calls on one artifact are serialized by a lock on the
    directory. SIGINT and SIGTERM are held back between the two renames and act as soon as both
    are done. Anything else that stops the process there (SIGKILL, power loss, an error from the
    second rename) leaves the previous card against the new manifest (``llmq verify`` then reports
    README.md's checksum) and the new card as ``.README.md.llmq-new``; the next call finishes that
    rename before doing its own.
    """
    path = Path(artifact_path)
    record = PerplexityRecord.from_json(entry, "perplexity record")
    manifest = A.read_manifest(path)
    with _writing(path), _exclusive(path):
        manifest = A.read_manifest(path)  # again, under the lock: another call may have just written it
        _finish_interrupted(path, manifest)
        records = [r for r in _current_records(path, manifest) if not r.same_run_as(record)] + [record]
        card = render_card(manifest, records).encode("utf-8")
        files = dict(manifest.files)
        files[CARD] = FileRecord(_sha256(card), len(card))
        updated = replace(manifest, files=dict(sorted(files.items())))
        _write_synced(path / PENDING_CARD, card)
        _write_synced(path / PENDING_MANIFEST, updated.to_text().encode("utf-8"))
        with _stop_signals_deferred():
            os.replace(path / PENDING_MANIFEST, path / MANIFEST)
            _put_card(path)
        A.fsync_folder(path)
    return record


def _current_records(path: Path, manifest: Manifest) -> list[PerplexityRecord]:
    card = path / CARD
    listed = manifest.files.get(CARD)
    if listed is None:
        if card.exists():
            raise ArtifactError(
                f"{card} exists but the manifest does not list it (llmq did not write it); "
                "move it out of the artifact to let llmq write its card"
            )
        return []
    problem = A.file_problem(card, listed)
    if problem:
        raise ArtifactError(f"{card}: {problem}; llmq records results only in the card it wrote")
    return read_records(card.read_text(encoding="utf-8"), card)


def _finish_interrupted(path: Path, manifest: Manifest) -> None:
    """Complete or discard what an interrupted :func:`record_perplexity` left behind."""
    (path / PENDING_MANIFEST).unlink(missing_ok=True)  # not renamed: the manifest in force is the old one
    pending, listed = path / PENDING_CARD, manifest.files.get(CARD)
    if not pending.exists():
        return
    if listed is not None and A.file_problem(path / CARD, listed) and not A.file_problem(pending, listed):
        _put_card(path)  # the manifest was renamed into place, the card not yet
    else:
        pending.unlink()


@contextmanager
def _stop_signals_deferred():
    """Hold SIGINT and SIGTERM back for the length of the block: a stop between two renames that
    must happen together then comes after both, never between them.

    Python runs a signal's handler in the main thread whichever thread the system gave the signal
    to, so masking the signal in this thread does not hold it back once the process has other
    threads (torch's pool); replacing the handlers for the block does. Off the main thread nothing
    is needed: no handler can run in this thread.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, lambda signum, frame: caught.append(signum)) for signum in held}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if caught:
            signal.raise_signal(caught[0])  # now to the handler the process had: it acts as it would have


def _put_card(path: Path) -> None:
    os.replace(path / PENDING_CARD, path / CARD)


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def _exclusive(path: Path):
    """Hold the lock that serializes the card's writers on one artifact while the block runs.

    POSIX: ``flock`` on the artifact's folder. Windows, which cannot open a folder: a byte lock on a
    file in the temporary directory named after the folder's resolved path. The system drops either
    when the process dies, so a killed writer never leaves the artifact locked. Where neither exists,
    the record is written unlocked, with a warning that two at once on one artifact may lose one.
    """
    try:
        import fcntl
    except ImportError:
        fcntl = None
    if fcntl is not None:
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock
        return
    try:
        import msvcrt
    except ImportError:
        log.warning("no file locking on this platform (neither fcntl nor msvcrt): two records written to %s "
                    "at the same moment may lose one", path)  # fmt: skip
        yield
        return
    name = _sha256(str(path.resolve()).encode("utf-8"))[:32]
    with open(Path(tempfile.gettempdir()) / f"llmq-card-{name}.lock", "a+b") as lock:
        while True:
            try:
                msvcrt.locking(lock.fileno(), msvcrt.LK_LOCK, 1)  # blocks up to 10 s, then raises
                break
            except OSError:
                continue
        try:
            yield
        finally:
            lock.seek(0)
            msvcrt.locking(lock.fileno(), msvcrt.LK_UNLCK, 1)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextmanager
def _writing(path: Path):
    """Turn an OSError while rewriting the card (a read-only artifact, a full disk) into
    :class:`ArtifactWriteError` naming the artifact."""
    try:
        yield
    except OSError as err:
        reason = os.strerror(err.errno) if err.errno else str(err)
        raise ArtifactWriteError(
            f"recording a result in {path / CARD} failed: {reason}; the artifact is as it was, or, if this "
            "came between the manifest's rename and the card's, the next record_perplexity completes the card"
        ) from err
