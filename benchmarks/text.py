"""Text for the language-model benchmark: the Python standard library's own source files.

Every CPython installation ships the source of its standard library, so the
corpus is on every machine, is real text (code, comments, docstrings) and
was written by no one here. :data:`MODULES` is a fixed list of modules that
exist in every Python from 3.10 on; each resolves to ``name.py`` or
``name/__init__.py`` under ``sysconfig.get_paths()["stdlib"]`` (``pathlib``
and ``zipfile`` became packages in 3.12/3.13). Their content differs a
little between Python versions, so :func:`load` records each file's
relative path, size and SHA-256, and one SHA-256 over the whole corpus.

The split is deterministic: each file is cut into blocks of
:data:`BLOCK` bytes and every :data:`VAL_EVERY`-th block (the last of each
group of ten) goes to validation; the rest, in order, is the training
stream. Tokens are bytes (a vocabulary of 256).
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MODULES: tuple[str, ...] = (
    "argparse", "ast", "collections", "dataclasses", "difflib", "enum", "fractions",
    "functools", "inspect", "json.decoder", "logging", "pathlib", "pickle", "pprint",
    "shutil", "statistics", "subprocess", "tarfile", "textwrap", "threading", "typing",
    "unittest.case", "zipfile", "configparser",
)
"""The corpus: standard-library modules present in every Python >= 3.10."""

BLOCK = 4096
"""Bytes per block of the train/validation split."""
VAL_EVERY = 10
"""One block in this many goes to validation."""


@dataclass(frozen=True)
class Corpus:
    """The training and validation byte streams, and where they came from."""

    train: np.ndarray  # uint8
    val: np.ndarray  # uint8
    files: list[dict[str, Any]] = field(default_factory=list)
    sha256: str = ""

    def describe(self) -> dict[str, Any]:
        """What the report records: files, sizes and hashes."""
        return {"stdlib": sysconfig.get_paths()["stdlib"], "modules": list(MODULES),
                "files": self.files, "bytes": sum(f["bytes"] for f in self.files),
                "train_bytes": int(self.train.size), "val_bytes": int(self.val.size),
                "sha256": self.sha256, "block": BLOCK, "val_every": VAL_EVERY}


def source_file(module: str, root: Path | None = None) -> Path:
    """The source file of the standard-library ``module`` (``a.b`` -> ``a/b.py`` or package).

    Raises:
      FileNotFoundError: When this Python installation ships no source for it
        (some minimal installations ship only ``.pyc`` files).
    """
    base = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    rel = Path(*module.split("."))
    for path in (base / rel.with_suffix(".py"), base / rel / "__init__.py"):
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"The standard library's source of `{module}` is not under {base} (looked for "
        f"{rel.with_suffix('.py')} and {rel / '__init__.py'}); the language-model benchmark "
        "reads its text from there. Use a Python installation that ships its standard "
        "library's source (every CPython from python.org, pyenv, conda and the usual Linux "
        "packages does).")


def load(modules: tuple[str, ...] = MODULES, root: Path | None = None) -> Corpus:
    """Reads ``modules`` and splits them into training and validation streams."""
    base = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    train: list[bytes] = []
    val: list[bytes] = []
    files: list[dict[str, Any]] = []
    whole = hashlib.sha256()
    for module in modules:
        path = source_file(module, base)
        data = path.read_bytes()
        whole.update(data)
        files.append({"module": module, "path": path.relative_to(base).as_posix(),
                      "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        for i in range(0, len(data), BLOCK):
            (val if (i // BLOCK) % VAL_EVERY == VAL_EVERY - 1 else train).append(
                data[i:i + BLOCK])
    return Corpus(np.frombuffer(b"".join(train), np.uint8).copy(),
                  np.frombuffer(b"".join(val), np.uint8).copy(), files, whole.hexdigest())
