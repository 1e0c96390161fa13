"""Text sources shared by evaluation and calibration.

Each source has two splits, kept apart so a model is never evaluated on its calibration text:

=============  ==================================  ==================================
source         ``eval`` split                      ``calib`` split
=============  ==================================  ==================================
``mix``        (none: calibration only)            prose, technical text, code (embedded)
``austen``     *Persuasion* (embedded)             *Pride and Prejudice* (embedded)
``wikitext2``  wikitext-2-raw-v1 ``test``          wikitext-2-raw-v1 ``train``
file           the whole file                      the whole file
=============  ==================================  ==================================

``mix``, the default calibration text, joins three registers, cut at paragraph ends: the first
500,000 characters of *Pride and Prejudice* (two thirds of the mix), then about 125,000 each of
the Python Language Reference's topics and of pure-Python CPython standard library modules (both
PSF License; ``scripts/build_calib_mix.py`` made them and ``data/mix.json`` records their provenance).

The Austen novels are public domain, extracted from Debian's ``r-cran-janeaustenr`` by
``scripts/extract_austen.py``. wikitext2 is read through ``datasets`` (network or its cache)
and joined with blank lines between rows, the preparation GPTQ and AWQ use for their
published numbers. ``datasets`` is imported only when wikitext2 is asked for.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from llmq.errors import TextSourceError, UsageError


class Dataset(str, enum.Enum):
    mix = "mix"
    austen = "austen"
    wikitext2 = "wikitext2"


class Split(str, enum.Enum):
    eval = "eval"
    calib = "calib"


@dataclass(frozen=True)
class Text:
    """A loaded text. ``source`` names it exactly enough to reproduce a number."""

    source: str
    text: str


_AUSTEN_FILES = {Split.eval: "austen-persuasion.txt", Split.calib: "austen-pride-and-prejudice.txt"}
_MIX_FILES = ("mix-technical.txt", "mix-code.txt")  # after the prose, each about 250,000 characters
# label -> characters kept of the prose, and of each of _MIX_FILES (None: all of it). Two thirds of
# the mix is prose: most of what language models read and write is natural language, and it
# measured best on the worse of two unlike texts (docs/method.md, "The built-in calibration set").
# The first mix, a third prose, stays loadable for the stats files that name it.
_MIX_LABEL = "mix:prose-two-thirds+technical+code"  # what --calib-data mix loads now
_MIXES = {_MIX_LABEL: (500_000, 125_000), "mix:prose+technical+code": (250_000, None)}
_WIKITEXT = ("Salesforce/wikitext", "wikitext-2-raw-v1")
_WIKITEXT_SPLITS = {Split.eval: "test", Split.calib: "train"}


@dataclass(frozen=True)
class TextRequest:
    """Which text to read: one of the datasets or a UTF-8 file; neither means the command's default."""

    dataset: Dataset | None = None
    file: Path | None = None

    def __post_init__(self) -> None:
        if self.dataset is not None and self.file is not None:
            raise UsageError("give either --dataset or --text-file, not both")

    def is_local(self, default: Dataset | None) -> bool:
        """True unless reading it may go to the network (wikitext2 through ``datasets``)."""
        return self.file is not None or (self.dataset or default) in (Dataset.austen, Dataset.mix)

    def load(self, split: Split, default: Dataset | None = None) -> Text:
        if self.file is not None:
            return _load_file(self.file)
        dataset = self.dataset or default
        if dataset == Dataset.austen:
            return _load_austen(split)
        if dataset == Dataset.mix:
            return _load_mix(split)
        if dataset == Dataset.wikitext2:
            return _load_wikitext2(split)
        raise UsageError("give --dataset or --text-file")


# What the Python API accepts as a text: a dataset (or its name), a file path, a request, or a Text.
TextSpec = Dataset | str | os.PathLike | TextRequest | Text


def request(spec: TextSpec | None) -> TextRequest | Text:
    """``"mix"``, ``"austen"`` and ``"wikitext2"`` name datasets; any other string or path is a text file."""
    if spec is None:
        return TextRequest()
    if isinstance(spec, TextRequest | Text):
        return spec
    if isinstance(spec, Dataset):
        return TextRequest(dataset=spec)
    names = {d.value: d for d in Dataset}
    if isinstance(spec, str) and spec in names:
        return TextRequest(dataset=names[spec])
    if isinstance(spec, str | os.PathLike):
        return TextRequest(file=Path(spec))
    raise UsageError(f"a text is a dataset name ({', '.join(names)}), a file path or a Text, not {type(spec).__name__}")


def load(spec: TextSpec | None, split: Split, default: Dataset | None) -> Text:
    """The text ``spec`` names (its ``split`` for a dataset; ``default`` when it names none)."""
    wanted = request(spec)
    return wanted if isinstance(wanted, Text) else wanted.load(split, default)


def load_local_first(spec: TextSpec | None, split: Split, default: Dataset | None) -> Text | None:
    """The text now if it is on this machine (so a bad file fails before any model is built or
    fetched), else None: a dataset that may need the network waits until the model resolved."""
    wanted = request(spec)
    local = isinstance(wanted, Text) or wanted.is_local(default)
    return load(wanted, split, default) if local else None


def from_source(label: str) -> Text:
    """The text a :attr:`Text.source` label names, loaded again (a stats file records only the label)."""
    kind, _, rest = label.partition(":")
    if kind == "file":
        return _load_file(Path(rest))
    austen = {f"{name.removeprefix('austen-').removesuffix('.txt')}": split for split, name in _AUSTEN_FILES.items()}
    wikitext = {f"{_WIKITEXT[1]}:{name}": split for split, name in _WIKITEXT_SPLITS.items()}
    if label in _MIXES:
        return _load_mix(Split.calib, label)
    if kind == Dataset.austen.value and rest in austen:
        return _load_austen(austen[rest])
    if kind == Dataset.wikitext2.value and rest in wikitext:
        return _load_wikitext2(wikitext[rest])
    raise TextSourceError(f"the calibration text {label!r} is not one llmq can load again; calibrate with --calib-data")


def load_text(dataset: Dataset | None, text_file: Path | None, split: Split, default: Dataset | None = None) -> Text:
    """Load exactly one of ``dataset`` or ``text_file``; ``default`` when neither is given."""
    return TextRequest(dataset, text_file).load(split, default)


def _load_file(path: Path) -> Text:
    if not path.exists():
        raise TextSourceError(f"text file {path} does not exist")
    if not path.is_file():
        raise TextSourceError(f"text file {path} is not a regular file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise TextSourceError(f"text file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    if not text.strip():
        raise TextSourceError(f"text file {path} is empty")
    return Text(f"file:{path}", text)


def _load_austen(split: Split) -> Text:
    name = _AUSTEN_FILES[split]
    return Text(f"austen:{name.removeprefix('austen-').removesuffix('.txt')}", _embedded(name, "austen.json"))


def _load_mix(split: Split, label: str = _MIX_LABEL) -> Text:
    if split != Split.calib:
        raise TextSourceError("the built-in mix is calibration text only; evaluate on austen, wikitext2 or a text file")
    prose_chars, other_chars = _MIXES[label]
    prose = cut_at_paragraph(_embedded(_AUSTEN_FILES[Split.calib], "austen.json"), prose_chars)
    registers = [prose] + [cut_at_paragraph(_embedded(name, "mix.json"), other_chars) for name in _MIX_FILES]
    return Text(label, "\n\n\n".join(registers))


def cut_at_paragraph(text: str, chars: int | None) -> str:
    """``text`` up to ``chars`` characters (None: all of it), ending at a blank line if one comes
    before; ``scripts/build_calib_mix.py`` cuts the registers it writes with it too."""
    if chars is None or len(text) <= chars:
        return text
    end = text.rfind("\n\n", 0, chars)
    return text[: end if end > 0 else chars]


def _embedded(name: str, record: str) -> str:
    """An embedded text file, checked against the sha256 its provenance record holds."""
    data = resources.files("llmq.runtime.sources").joinpath("data")
    raw = data.joinpath(name).read_bytes()
    expected = json.loads(data.joinpath(record).read_text())["files"][name]["sha256"]
    if hashlib.sha256(raw).hexdigest() != expected:
        raise TextSourceError(f"the embedded text {name} does not match its checksum; reinstall llmq")
    return raw.decode("utf-8")


def _load_wikitext2(split: Split) -> Text:
    try:
        import datasets
    except ImportError as err:
        raise TextSourceError("--dataset wikitext2 needs the `datasets` package: pip install datasets") from err
    hf_split = _WIKITEXT_SPLITS[split]
    try:
        rows = datasets.load_dataset(*_WIKITEXT, split=hf_split)
    except Exception as err:  # datasets raises many types for "no network / not cached"; all mean the same here
        raise TextSourceError(
            f"could not load wikitext2 ({_WIKITEXT[0]}, {hf_split}) through `datasets`: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. Without network, use "
            "--dataset austen (embedded) or --text-file PATH"
        ) from err
    return Text(f"wikitext2:{_WIKITEXT[1]}:{hf_split}", join_wikitext_rows(rows["text"]))


def join_wikitext_rows(rows: list[str]) -> str:
    """GPTQ/AWQ's wikitext2 preparation: the raw rows joined with a blank line between them."""
    return "\n\n".join(rows)
