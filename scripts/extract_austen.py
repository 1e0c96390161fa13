#!/usr/bin/env python3
"""Regenerate llmq's embedded Austen texts from Debian's r-cran-janeaustenr package.

    python scripts/extract_austen.py            # apt-get download + extract into runtime/sources/data/
    python scripts/extract_austen.py --deb F    # use an already downloaded .deb

Needs ``apt-get``/``dpkg-deb`` and the PyPI package ``rdata``. The package stores each novel as an
R character vector (one element per printed line) in ``data/Rdata.rdb``, indexed by the
gzip-compressed ``Rdata.rdx``; each .rdb entry is a 4-byte big-endian length and a zlib stream.
Lines are joined with newlines, exactly as printed in the source edition.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import subprocess
import tempfile
import zlib
from pathlib import Path

NOVELS = {"persuasion": "austen-persuasion.txt", "prideprejudice": "austen-pride-and-prejudice.txt"}
OUT = Path(__file__).resolve().parent.parent / "runtime" / "sources" / "data"
DATA_DIR = "usr/lib/R/site-library/janeaustenr/data"


def _r_object(raw: bytes):
    import rdata

    return rdata.conversion.convert(rdata.parser.parse_data(raw, extension=".rds"))


def extract(deb: Path, workdir: Path) -> dict[str, str]:
    subprocess.run(["dpkg-deb", "-x", str(deb), str(workdir)], check=True)
    data = workdir / DATA_DIR
    index = _r_object(gzip.decompress((data / "Rdata.rdx").read_bytes()))
    rdb = (data / "Rdata.rdb").read_bytes()
    texts = {}
    for name, (offset, length) in index["variables"].items():
        if str(name) not in NOVELS:
            continue
        entry = rdb[int(offset) : int(offset) + int(length)]
        lines = _r_object(zlib.decompress(entry[4:]))
        texts[str(name)] = "\n".join(str(line) for line in lines) + "\n"
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deb", type=Path, help="an already downloaded r-cran-janeaustenr .deb")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        deb = args.deb
        if deb is None:
            subprocess.run(["apt-get", "download", "r-cran-janeaustenr"], check=True, cwd=tmpdir)
            deb = next(tmpdir.glob("r-cran-janeaustenr_*.deb"))
        texts = extract(deb, tmpdir / "x")
        version = deb.name.split("_")[1]
    files = {}
    for name, filename in NOVELS.items():
        data = texts[name].encode("utf-8")
        (OUT / filename).write_bytes(data)
        files[filename] = {"novel": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    meta = {
        "source": f"Debian package r-cran-janeaustenr {version} (public domain texts)",
        "regenerate": "python scripts/extract_austen.py",
        "files": files,
    }
    (OUT / "austen.json").write_text(json.dumps(meta, indent=2) + "\n")
    for filename, info in files.items():
        print(f"{filename}: {info['bytes']} bytes, sha256 {info['sha256'][:16]}")


if __name__ == "__main__":
    main()
