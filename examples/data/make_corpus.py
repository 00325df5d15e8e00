"""Regenerates ``python_docs.txt``, the training corpus of the GPT-2 examples.

The text is the Zen of Python and the docstrings of a fixed list of standard
library modules (their classes, functions and methods, in source order), as
shipped with CPython: Copyright (c) 2001 Python Software Foundation, under the
PSF License Agreement (see ``NOTICE``, which also summarises the changes). The committed file was made with
CPython 3.11; another version gives slightly different text, which is why the
file itself, not this script, is what the examples read.

Usage: ``python examples/data/make_corpus.py``
"""
from __future__ import annotations

import codecs
import importlib
import inspect
import this
from pathlib import Path

MODULES = [
    "abc", "argparse", "ast", "asyncio.events", "asyncio.futures", "asyncio.locks", "asyncio.queues",
    "asyncio.streams", "asyncio.tasks", "base64", "bisect", "calendar", "cmd", "codecs", "collections",
    "concurrent.futures._base", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "doctest", "email.message", "email.utils", "enum", "filecmp", "fileinput",
    "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq",
    "hmac", "html.parser", "http.client", "http.cookiejar", "http.server", "imaplib", "inspect",
    "ipaddress", "json", "json.decoder", "json.encoder", "locale", "logging", "logging.handlers", "mailbox",
    "mimetypes", "multiprocessing.pool", "netrc", "numbers", "operator", "optparse", "os", "pathlib",
    "pdb", "pickle", "pkgutil", "platform", "plistlib", "poplib", "pprint", "queue", "quopri", "random",
    "re", "reprlib", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib", "socket",
    "socketserver", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tokenize", "trace", "traceback", "turtle", "typing", "unittest.case", "unittest.mock",
    "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref", "webbrowser", "zipfile",
]
LIMIT = 600_000  # bytes: enough for the examples, small enough to ship


def docstrings(module_name: str) -> list[str]:
    """The module's docstring, then those of its own classes, functions and methods."""
    module = importlib.import_module(module_name)
    texts = [inspect.getdoc(module) or ""]
    for _, obj in inspect.getmembers(module, lambda o: inspect.isclass(o) or inspect.isfunction(o)):
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        texts.append(inspect.getdoc(obj) or "")
        if inspect.isclass(obj):
            texts += [inspect.getdoc(m) or "" for _, m in vars(obj).items() if inspect.isfunction(m)]
    return [t for t in texts if len(t) > 40]


def main() -> None:
    parts = [codecs.decode(this.s, "rot13")]
    for name in MODULES:
        parts += docstrings(name)
    text = "\n\n".join(parts).encode("ascii", "ignore")[:LIMIT].decode("ascii")
    out = Path(__file__).with_name("python_docs.txt")
    out.write_text(text + "\n")
    print(f"{out}: {len(text)} bytes")


if __name__ == "__main__":
    main()
