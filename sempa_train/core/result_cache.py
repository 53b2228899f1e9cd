"""Results of the untuned model, cached by content so no run or experiment arm computes them twice.

The base model's STS scores and retention probes depend only on its weights, the evaluation data and
the settings; every run and every arm of an experiment used to recompute them. A cache entry is a
folder ``$SEMPA_CACHE_DIR/results/<kind>/<key>/`` holding the files of one result, where
``key`` hashes the model's weights (not its name or path), the data's content and the settings.
Entries are written atomically and never changed.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sempa_train.core.io import atomic_dir, file_sha256
from sempa_train.core.models import cache_dir, resolve_model

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.gguf", "config.json")


def model_fingerprint(model: str | Path) -> str:
    """sha256 over the weight and config files of a model folder (built-in name, folder or Hub id)."""
    path = resolve_model(model)
    files = sorted(f for pattern in WEIGHT_FILES for f in path.glob(pattern) if f.is_file())
    if not files:
        raise FileNotFoundError(f"{path}: no weight files to fingerprint")
    return _fingerprint(tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


@functools.lru_cache(maxsize=32)
def _fingerprint(files: tuple[tuple[str, int, int], ...]) -> str:
    """Keyed on (path, size, mtime) so a process hashes a model's files once."""
    digest = hashlib.sha256()
    for name, _, _ in files:
        digest.update(Path(name).name.encode() + file_sha256(Path(name)).encode())
    return digest.hexdigest()


def result_key(kind: str, parts: Mapping[str, Any]) -> str:
    """A short hash of ``kind`` and JSON-serialisable ``parts``."""
    text = json.dumps({"kind": kind, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _entry(kind: str, key: str) -> Path:
    return cache_dir() / "results" / kind / key


def lookup(kind: str, key: str) -> Path | None:
    """The folder of a complete cache entry, or None."""
    entry = _entry(kind, key)
    return entry if entry.is_dir() else None


def store(kind: str, key: str, write: Callable[[Path], None]) -> None:
    """Create the entry ``kind/key`` with ``write(folder)``, atomically; an existing entry is kept."""
    entry = _entry(kind, key)
    if entry.exists():
        return
    try:
        with atomic_dir(entry) as tmp:
            write(tmp)
    except FileExistsError:  # another process stored it first
        pass
