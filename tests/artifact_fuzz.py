"""Mutations of a real artifact for the reader fuzzer (``tests/test_fuzz_artifact.py``).

A hostile artifact is controlled entirely by its author, so after most mutations the manifest's
sizes and checksums are recomputed ("re-signed"): the reader's structural checks, not only the
checksums, must catch the damage.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

from hypothesis import strategies as st

FAMILIES = (
    "shard_bytes", "shard_header", "manifest_value", "manifest_key", "layout", "truncate", "delete", "symlink",
)  # fmt: skip

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63),
    st.sampled_from([-1, 0, 1, 2**31, 2**40, 2**62]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.lists(st.integers(-5, 5), max_size=5),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    st.integers(1, 3000).map(lambda depth: "DEEP:" + str(depth)),  # replaced by nested lists on write
)


def manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def write_manifest(root: Path, raw) -> None:
    text = json.dumps(raw)
    while '"DEEP:' in text:  # deep nesting, which json.dumps itself could not produce
        start = text.index('"DEEP:')
        end = text.index('"', start + 1)
        depth = int(text[start + 6 : end])
        text = text[:start] + "[" * depth + "]" * depth + text[end + 1 :]
    (root / "manifest.json").write_text(text)


def resign(root: Path) -> None:
    """Recompute every listed file's size and SHA-256 (files that are gone are left as listed)."""
    raw = manifest(root)
    for name, info in raw.get("files", {}).items():
        path = root / name
        if path.is_file() and isinstance(info, dict):
            info["bytes"] = path.stat().st_size
            info["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    write_manifest(root, raw)


def _paths(node, prefix=()):
    """Every (path, value) in a JSON tree."""
    yield prefix, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, (*prefix, i))


def _set(node, path, value):
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def _shards(root: Path) -> list[Path]:
    return sorted(root.glob("*.safetensors"))


def _read_header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _write_header(path: Path, header, body: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


@st.composite
def mutations(draw, families=FAMILIES):
    """A function ``apply(root, outside)`` that damages the artifact at ``root``, and its description."""
    family = draw(st.sampled_from(families))
    choice = draw(st.integers(0, 10**6))
    resigned = draw(st.booleans())
    if family == "shard_bytes":
        flips = draw(
            st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=8)
        )

        def apply(root, outside):
            shard = _shards(root)[choice % len(_shards(root))]
            data = bytearray(shard.read_bytes())
            for where, xor in flips:
                data[int(where * len(data))] ^= xor
            shard.write_bytes(bytes(data))
            if resigned:
                resign(root)
    elif family == "shard_header":
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "delete", "add", "garbage"]))
        value = draw(
            {
                "dtype": st.sampled_from(["F16", "F32", "I32", "U8", "BF16", "I64", "BOOL", "F8_E4M3", "XYZ"]),
                "shape": st.lists(st.integers(-2, 2**40), max_size=4),
                "data_offsets": st.lists(st.integers(-(2**10), 2**40), min_size=2, max_size=2),
                "delete": st.none(),
                "add": st.none(),
                "garbage": st.binary(max_size=40),
            }[field]
        )

        def apply(root, outside):
            shard = _shards(root)[choice % len(_shards(root))]
            header, body = _read_header(shard)
            names = sorted(k for k in header if k != "__metadata__")
            name = names[choice % len(names)]
            if field == "delete":
                del header[name]
            elif field == "add":
                header["extra.tensor"] = dict(header[name])
            elif field == "garbage":
                header = value
            else:
                header[name][field] = value
            _write_header(shard, header, body)
            resign(root)
    elif family in ("manifest_value", "manifest_key"):
        value = draw(JUNK)
        key = draw(st.text(min_size=1, max_size=8))

        def apply(root, outside):
            raw = manifest(root)
            paths = [p for p, _ in _paths(raw) if p]
            path = paths[choice % len(paths)]
            if family == "manifest_value":
                _set(raw, path, value)
            else:
                parents = [p for p, v in _paths(raw) if isinstance(v, dict)]
                parent = parents[choice % len(parents)]
                node = raw
                for k in parent:
                    node = node[k]
                if node and choice % 2:
                    del node[sorted(node)[choice % len(node)]]
                else:
                    node[key] = value
            write_manifest(root, raw)
    elif family == "layout":
        field = draw(
            st.sampled_from(["out_features", "in_features", "k4", "g1", "g2", "g4", "scale_bits", "n_outliers"])
        )
        value = draw(st.integers(0, 4096))

        def apply(root, outside):
            raw = manifest(root)
            names = sorted(raw["linears"])
            raw["linears"][names[choice % len(names)]]["layout"][field] = value
            write_manifest(root, raw)
    elif family == "truncate":
        keep = draw(st.floats(0, 1, exclude_max=True))

        def apply(root, outside):
            files = sorted(p for p in root.iterdir() if p.is_file())
            path = files[choice % len(files)]
            data = path.read_bytes()
            path.write_bytes(data[: int(keep * len(data))])
            if resigned and path.name != "manifest.json":
                resign(root)
    elif family == "delete":

        def apply(root, outside):
            files = sorted(p for p in root.iterdir() if p.is_file())
            files[choice % len(files)].unlink()
    else:  # symlink: the same bytes, but through a link that leaves the artifact

        def apply(root, outside):
            files = sorted(p for p in root.iterdir() if p.is_file() and p.name != "manifest.json")
            path = files[choice % len(files)]
            target = outside / path.name
            target.write_bytes(path.read_bytes())
            path.unlink()
            os.symlink(target, path)

    return family, apply
