"""Text for the evaluation tasks and haystacks, nothing downloaded: the named sources of TEXT_SOURCES (`pydoc`:
Python's documentation topics, `pydoc_data.topics`; `stdlib`: the docstrings of STDLIB_MODULES, held out from tuning),
a .txt / .jsonl file, and the tokenizer helpers every sample generator shares (kvtool.data, kvtool.tasks)."""

from __future__ import annotations

import importlib
import inspect
import json
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

from kvtool.errors import KvtoolError


@lru_cache(maxsize=1)
def haystack_text() -> str:
    """All pydoc topics, joined in sorted key order (deterministic for a given Python version)."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k].strip() for k in sorted(topics))


# Pure-Python (or C-accelerated) standard-library modules whose import has no side effect beyond defining names.
# Their docstrings are the `stdlib` text: prose the project never used before (not pydoc_data, not the filler).
STDLIB_MODULES: tuple[str, ...] = tuple(sorted("""
    argparse base64 bisect calendar cmd codecs collections concurrent.futures configparser contextlib copy csv
    dataclasses datetime decimal difflib doctest email.message email.parser email.utils enum filecmp fnmatch
    fractions ftplib functools getopt gettext glob gzip heapq hmac html.parser http.client http.cookiejar
    http.server imaplib inspect ipaddress json logging logging.handlers mailbox mimetypes numbers operator optparse
    pathlib pickle pkgutil platform plistlib pprint queue random sched secrets selectors shutil smtplib socketserver
    statistics string subprocess tarfile tempfile textwrap threading timeit tokenize traceback typing unittest.case
    unittest.mock urllib.parse urllib.request uuid warnings weakref xml.dom.minidom zipfile
""".split()))
MIN_DOCSTRING = 80          # characters; shorter docstrings ("Return self.") are left out


def _defined_in(obj, module: str) -> bool:
    """Defined by `module`, one of its submodules, or its C accelerator (_heapq for heapq): not a re-export."""
    where = getattr(obj, "__module__", None) or ""
    return where == module or where.startswith(module + ".") or where == "_" + module.rsplit(".", 1)[-1]


def _member_of(cls: type, value) -> bool:
    """A method / property written in `cls`'s own body (its qualified name says so), not one another package set on
    the class at run time (transformers adds `warning_once` to logging.Logger) and not a nested class."""
    func = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
    if not (inspect.isroutine(func) or isinstance(value, property)):
        return False
    qualname = getattr(func, "__qualname__", None)
    return isinstance(qualname, str) and qualname.startswith(cls.__qualname__ + ".")


def _module_docstrings(module: str) -> Iterator[str]:
    """The module's docstring, then each public class / function defined there (sorted by name), a class followed by
    its own public methods and properties (sorted; inherited ones are not repeated)."""
    mod = importlib.import_module(module)
    yield inspect.getdoc(mod) or ""
    names = vars(mod)
    for name in sorted(names):
        obj = names[name]
        if name.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)) or not _defined_in(obj, module):
            continue
        yield inspect.getdoc(obj) or ""
        if inspect.isclass(obj):
            members = vars(obj)
            for attr in sorted(members):
                if not attr.startswith("_") and _member_of(obj, members[attr]):
                    yield inspect.getdoc(members[attr]) or ""


@lru_cache(maxsize=1)
def stdlib_text() -> str:
    """The docstrings of STDLIB_MODULES (in that sorted order), each one once, those of MIN_DOCSTRING characters or
    more, joined by blank lines: deterministic for a given Python version, nothing downloaded."""
    seen, docs = set(), []
    with warnings.catch_warnings():                # reading typing.io's docstring warns that it is deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        texts = [doc for module in STDLIB_MODULES for doc in _module_docstrings(module)]
    for doc in texts:
        doc = doc.strip()
        if len(doc) >= MIN_DOCSTRING and doc not in seen:
            seen.add(doc)
            docs.append(doc)
    return "\n\n".join(docs)


# Named built-in texts for the evaluation tasks (NLL windows, pass-key haystacks): name -> (text, what it is).
TEXT_SOURCES: dict[str, tuple[Callable[[], str], str]] = {
    "pydoc": (haystack_text, "Python's documentation topics (pydoc_data.topics)"),
    "stdlib": (stdlib_text, f"docstrings of {len(STDLIB_MODULES)} standard-library modules (held out)"),
}
FILLER_NAME = "filler"      # the pass-key haystack of repeated sentences (FILLER): a haystack, not a text source


def text_sources_help(passkey: bool = True) -> str:
    """The names a --text option takes, for help and errors."""
    names = list(TEXT_SOURCES) + ([FILLER_NAME] if passkey else [])
    return ", ".join(names) + " or a .txt / .jsonl file"


@lru_cache(maxsize=8)
def _file_text(path: str, resolved: str, mtime_ns: int, size: int) -> str:
    return _read_text(Path(path), "\n\n")    # keyed by where it is, mtime and size: an edited file is read again


def source_text(source: str) -> str:
    """The whole text of a source: a name of TEXT_SOURCES, or a path to a .txt / .jsonl file (read once per process
    while it is unchanged)."""
    if source in TEXT_SOURCES:
        return TEXT_SOURCES[source][0]()
    path = Path(source)
    if not path.exists():
        raise KvtoolError(f"no text source or file named {source!r}; give {text_sources_help(False)}")
    try:
        st = path.stat()
    except OSError as e:
        raise KvtoolError(f"cannot read text file {path}: {e.strerror or e}; check that it is a readable file")
    return _file_text(source, str(path.resolve()), st.st_mtime_ns, st.st_size)


def check_text_source(source: str, *, passkey: bool, need_tokens: int = 0, flag: str = "--text") -> None:
    """Refuse, without a tokenizer (before any model is loaded), a source that is not a known name or a readable
    .txt / .jsonl file with text, "filler" outside a pass-key haystack, and a text with fewer bytes than
    `need_tokens` (a token holds at least one byte of text; the exact count is checked when the text is cut)."""
    if source == FILLER_NAME:
        if not passkey:
            raise KvtoolError(f"{flag} filler (repeated sentences) is only a numeric pass-key haystack; "
                              f"give {text_sources_help(False)}")
        return
    if source not in TEXT_SOURCES and not Path(source).exists():
        raise KvtoolError(f"{flag} {source!r}: no such text source or file; give {text_sources_help(passkey)}")
    text = source_text(source)
    if not text.strip():
        raise KvtoolError(f"{flag} {source}: the file has no text; give a .txt file or .jsonl lines of "
                          "{\"text\": ...}")
    size = len(text.encode("utf-8"))
    if size < need_tokens:
        raise KvtoolError(f"{flag} {source} has only {size} bytes of text, fewer than the {need_tokens} tokens asked "
                          "for; ask for fewer or shorter samples, or give a longer text")


def text_ids(source: str, tokenizer, need: int, *, tile: bool = True) -> list[int]:
    """Token ids of a text source (a TEXT_SOURCES name or a .txt / .jsonl path): its first max(8 x need, 200k)
    characters, tokenised. tile: repeat the ids when even that is shorter than `need` (a haystack); otherwise the
    caller checks the length (NLL windows must not repeat text)."""
    text = source_text(source)
    ids = _encode(tokenizer, text[:max(8 * need, 200_000)])
    while tile and ids and len(ids) < max(need, 1):
        ids = ids + ids
    if tile and not ids:
        raise KvtoolError(f"text source {source} gives no tokens; give a text with some words in it")
    return ids


def _encode(tokenizer, text: str) -> list[int]:
    return [int(t) for t in tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]]


def _bos(tokenizer) -> list[int]:
    bos = getattr(tokenizer, "bos_token_id", None)
    return [int(bos)] if bos is not None else []


def _jsonl_text(raw: str, path: Path, sep: str) -> str:
    docs = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise KvtoolError(f"{path} line {n} is not valid JSON ({e.msg}); write one {{\"text\": ...}} object per line")
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise KvtoolError(f"{path} line {n} has no string \"text\" field; write one {{\"text\": ...}} object per line")
        docs.append(obj["text"])
    return sep.join(docs)


def _read_text(path: Path, sep: str) -> str:
    if not path.exists():
        raise KvtoolError(f"no such data file: {path}; give 'passkey' or an existing .txt / .jsonl file")
    if path.is_dir():
        raise KvtoolError(f"cannot read data file {path}: it is a directory; give a .txt or .jsonl file")
    ext = path.suffix.lower()
    if ext not in (".txt", ".jsonl"):
        raise KvtoolError(f"unsupported data file type '{path.suffix}' ({path}); use a .txt or .jsonl file")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise KvtoolError(f"cannot read data file {path}: not UTF-8 text (bad byte at {e.start}); save it as UTF-8")
    except OSError as e:
        raise KvtoolError(f"cannot read data file {path}: {e.strerror or e}; check that it is a readable file")
    return raw if ext == ".txt" else _jsonl_text(raw, path, sep)
