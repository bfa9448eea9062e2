"""Calibration text for GPTQ: a mix of kinds of English found offline on this machine.

GPTQ fits each layer's rounding to the activations of its calibration text, so a model calibrated on one kind of
text only (the standard library's docstrings, edgelm's first default) is best on text like it and loses more on
text of other kinds.  The mix takes equal shares of several kinds, each read from files every Python installation
(or the conversion's own dependencies) ships:

- ``docstrings``: the standard library's docstrings (technical reference prose, code in it);
- ``manuals``: prose the standard library ships as files: IDLE's user manual, its change logs and read-me files;
- ``readmes``: the project descriptions (mostly Markdown) of the installed distributions;
- ``licences``: the licence files of the installed distributions and Python's own LICENSE.txt, less any of the
  GNU family (GPL-3 is the out-of-domain text edgelm measures int4 on).

Deterministic: sources are read in sorted order and cut to fixed shares, so one environment gives one text.  Held
out: any paragraph that shares a run of :data:`SHINGLE` words with an evaluation text (the built-in one, or texts
passed as ``held_out``) is left out, so a perplexity measured on those texts is never measured on calibration text.
"""

from __future__ import annotations

import html.parser
import importlib
import inspect
import re
import sysconfig
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator

# modules whose docstrings make the docstring share (the evaluation text comes from pydoc_data instead)
DOCSTRING_MODULES = ("os", "re", "json", "collections", "itertools", "functools", "pathlib", "subprocess",
                     "argparse", "logging", "threading", "asyncio", "typing", "dataclasses", "random", "statistics",
                     "datetime", "email", "http.client", "urllib.request", "unittest", "csv", "sqlite3", "zipfile",
                     "tarfile", "shutil", "tempfile", "textwrap", "string", "decimal")
KINDS = ("docstrings", "manuals", "readmes", "licences")
DEFAULT_KINDS = KINDS
SHINGLE = 8  # words: a paragraph sharing this many consecutive words with a held-out text is left out
# licences of the GNU family are left out whole: edgelm's out-of-domain measurement (benchmarks/bench_int4_quality.py)
# is the GPL-3 text, and some distributions bundle it in their licence files
GNU = re.compile(r"GNU (?:(?:LESSER|LIBRARY|AFFERO) )?GENERAL PUBLIC LICENSE\s+Version|GNU Free Documentation "
                 r"License\s+Version")  # a licence's own title, not a mention of it
_WORD = re.compile(r"\w+")


def docstrings() -> Iterator[str]:
    """Docstrings over 200 characters of the modules in DOCSTRING_MODULES, each once."""
    seen: set[str] = set()
    with warnings.catch_warnings():  # some members are deprecated aliases (typing.re, ...): reading them warns
        warnings.simplefilter("ignore")
        for name in DOCSTRING_MODULES:
            module = importlib.import_module(name)
            for _, obj in inspect.getmembers(module):
                doc = inspect.getdoc(obj)
                if doc and len(doc) > 200 and doc not in seen:
                    seen.add(doc)
                    yield doc


def manuals() -> Iterator[str]:
    """IDLE's user manual (help.html as text) and the read-me / change-log files next to it, when the Python
    installation has idlelib (some Linux distributions package it apart)."""
    idle = Path(sysconfig.get_paths()["stdlib"]) / "idlelib"
    page = idle / "help.html"
    if page.is_file():
        yield html_to_text(page.read_text(encoding="utf-8", errors="replace"))
    for name in ("README.txt", "NEWS.txt", "HISTORY.txt", "TODO.txt", "extend.txt", "NEWS2x.txt", "CREDITS.txt"):
        if (idle / name).is_file():
            yield (idle / name).read_text(encoding="utf-8", errors="replace")


def readmes() -> Iterator[str]:
    """The long descriptions of the installed distributions (their PyPI page, mostly Markdown), sorted by name,
    with HTML, images and badge links taken out."""
    for dist in _distributions():
        body = dist.metadata.get_payload() if hasattr(dist.metadata, "get_payload") else None
        body = body or dist.metadata.get("Description") or ""
        if len(body) > 500:
            yield markdown_to_text(body)


def licences() -> Iterator[str]:
    """Python's LICENSE.txt, then the licence files of the installed distributions, sorted by name."""
    python = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if python.is_file() and not GNU.search(text := python.read_text(encoding="utf-8", errors="replace")):
        yield text
    for dist in _distributions():
        for f in sorted(dist.files or (), key=str):
            name = f.name.upper()
            if name.startswith(("LICENSE", "LICENCE", "COPYING")) and not name.endswith((".PY", ".PYC")):
                try:
                    text = Path(dist.locate_file(f)).read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError):
                    continue
                if len(text) > 500 and not GNU.search(text):
                    yield text


SOURCES: dict[str, Callable[[], Iterable[str]]] = {"docstrings": docstrings, "manuals": manuals,
                                                    "readmes": readmes, "licences": licences}


def calibration_mix(kinds: Iterable[str] = DEFAULT_KINDS, *, chars_per_kind: int = 120_000,
                    held_out: Iterable[str] = ()) -> str:
    """Equal shares (up to ``chars_per_kind`` characters) of each kind of text, one kind after another, so that
    windows spread evenly over the result draw evenly from every kind.  Paragraphs overlapping the built-in
    evaluation text or any ``held_out`` text are left out; so are repeats."""
    from edgelm.quality import eval_text

    kinds = list(kinds)
    unknown = [k for k in kinds if k not in SOURCES]
    if unknown or not kinds:
        raise ValueError(f"unknown calibration kind {unknown[0] if unknown else None!r}: use some of {', '.join(KINDS)}")
    banned = shingles(eval_text())
    for text in held_out:
        banned |= shingles(text)
    seen: set[str] = set()
    shares: list[str] = []
    for kind in kinds:
        share: list[str] = []
        size = 0
        for document in SOURCES[kind]():
            for paragraph in _paragraphs(document):
                if size >= chars_per_kind:
                    break
                key = " ".join(_WORD.findall(paragraph.lower()))
                if not key or key in seen or shingles(paragraph) & banned:
                    continue
                seen.add(key)
                share.append(paragraph)
                size += len(paragraph) + 2
            if size >= chars_per_kind:
                break
        shares.append("\n\n".join(share))
    return "\n\n".join(s for s in shares if s)


def shingles(text: str, n: int = SHINGLE) -> set[int]:
    """Hashes of every run of ``n`` consecutive words (lower case, punctuation ignored) of ``text``."""
    words = _WORD.findall(text.lower())
    return {hash(tuple(words[i:i + n])) for i in range(len(words) - n + 1)}


def _paragraphs(text: str) -> Iterator[str]:
    for paragraph in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        paragraph = paragraph.strip("\n")
        if len(paragraph.strip()) >= 40:
            yield paragraph


def _distributions() -> list:
    from importlib import metadata

    found: dict[str, object] = {}
    for dist in metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower().replace("_", "-")
        if name and name not in found and name != "edgelm":
            found[name] = dist
    return [found[name] for name in sorted(found)]


class _Text(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in ("script", "style"):
            self.skip += 1
        elif tag in ("p", "div", "li", "h1", "h2", "h3", "h4", "pre", "dt", "dd", "tr", "br", "section"):
            self.parts.append("\n\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style") and self.skip:
            self.skip -= 1

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.parts.append(data)


def html_to_text(page: str) -> str:
    parser = _Text()
    parser.feed(page)
    text = "".join(parser.parts)
    text = re.sub(r"[ \t]*\n[ \t]*(?=\S)", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text)


def markdown_to_text(body: str) -> str:
    """Markdown as a reader sees it, roughly: no HTML tags or comments, no images or badges, links as their text."""
    body = re.sub(r"<!--.*?-->", "", body, flags=re.S)
    body = re.sub(r"\[!\[[^\]]*\]\([^)]*\)\]\([^)]*\)", "", body)  # badges: [![alt](img)](link)
    body = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", body)  # images
    body = re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", body)  # links: keep the text
    body = re.sub(r"</?[a-zA-Z][^>]*>", "", body)  # HTML tags
    return re.sub(r"\n{3,}", "\n\n", body)
