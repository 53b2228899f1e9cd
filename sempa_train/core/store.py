"""The on-disk store of a pipeline: content-addressed stage outputs and immutable dataset versions.

Layout under ``root``::

    stages/<stage>/<key>/          one stage output (datasets, a trained adapter, an evaluation); <key>
                                   hashes the stage config and the content hashes of its inputs, so a
                                   re-run with the same inputs finds it (``sempa_train.plan``)
    datasets/<name>/v0001/         an immutable dataset version: triples/, candidates/, preferences/
                                   and a manifest (stage keys, config, code version, creating run)
    datasets/<name>/latest.json    pointer to the newest version (and a ``latest`` symlink)

Versions are published under a file lock: a version number is taken and the folder renamed into
place in one step, so two refresh runs at once get two versions and neither sees a partial one. Data that
a version already holds (same parts, same content hashes) is never published a second time.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from sempa_train import __version__
from sempa_train.core.io import (
    code_version,
    file_sha256,
    make_temp_dir,
    now_iso,
    read_json,
    read_manifest,
    verify_dataset,
    write_json,
)

log = logging.getLogger(__name__)

_VERSION = re.compile(r"^v(\d{4,})$")


def content_key(stage: str, config: Mapping[str, Any], inputs: Mapping[str, str]) -> str:
    """A 20-hex-digit key of a stage run: its name, config and input *content* hashes (never paths)."""
    payload = json.dumps({"stage": stage, "config": config, "inputs": dict(sorted(inputs.items())),
                          "sempa": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def dataset_hash(path: Path | str) -> str:
    """The content hash of a dataset folder (its manifest's data hash, verified against the file) or of a plain
    file."""
    path = Path(path)
    if path.is_dir():
        if not read_manifest(path).get("data_sha256"):
            raise ValueError(f"{path}: no data_sha256 in its manifest; not a sempa dataset folder")
        return verify_dataset(path)  # the recorded hash, once the file is checked against it
    return file_sha256(path)


class Store:
    """Stage outputs and dataset versions under one root folder."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def stage_dir(self, stage: str, key: str) -> Path:
        return self.root / "stages" / stage / key

    def dataset_dir(self, name: str) -> Path:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ValueError(f"dataset name must be letters, digits, '.', '_' or '-', got {name!r}")
        return self.root / "datasets" / name

    def versions(self, name: str) -> list[str]:
        """The published versions of ``name``, oldest first."""
        folder = self.dataset_dir(name)
        found = [p.name for p in folder.iterdir() if _VERSION.match(p.name)] if folder.is_dir() else []
        return sorted(found, key=lambda v: int(v[1:]))

    def latest(self, name: str) -> Path:
        """The newest version folder of ``name``."""
        pointer = self.dataset_dir(name) / "latest.json"
        if not pointer.is_file():
            raise FileNotFoundError(f"dataset {name!r} has no published version under {self.root}")
        return self.dataset_dir(name) / read_json(pointer)["version"]

    @contextlib.contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        folder = self.dataset_dir(name)
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / ".lock").open("w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def publish(self, name: str, parts: Mapping[str, Path], manifest: Mapping[str, Any]) -> Path:
        """Copy the dataset folders ``parts`` into a new immutable version of ``name`` and point ``latest`` at it.

        Data already published is not published twice: when a version holds the same parts with the same content
        hashes (a resumed run, a refresh whose data did not change), that version is returned and nothing moves."""
        folder = self.dataset_dir(name)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_dir(folder, ".publish-")
        try:
            for part, source in parts.items():
                _link_or_copy_tree(Path(source), tmp / part)
            hashes = {part: dataset_hash(tmp / part) for part in parts}
            with self._lock(name):
                existing = self.versions(name)
                same = self._version_with(name, hashes, existing)
                if same is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
                    log.info("publish: %s/%s already holds this data; not published again", name, same)
                    return folder / same
                version = f"v{(int(existing[-1][1:]) + 1) if existing else 1:04d}"
                write_json(tmp / "manifest.json", {
                    "dataset": name, "version": version, "created_at": now_iso(), "code_version": code_version(),
                    "parts": {part: {"data_sha256": hashes[part], "from": str(source)}
                              for part, source in parts.items()},
                    **manifest,
                })
                target = folder / version
                tmp.replace(target)
                write_json(folder / "latest.json", {"version": version, "path": str(target)})
                link = folder / f".latest-{os.getpid()}"
                link.unlink(missing_ok=True)
                link.symlink_to(version)
                link.replace(folder / "latest")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    def _version_with(self, name: str, hashes: Mapping[str, str], versions: list[str]) -> str | None:
        """The newest of ``versions`` whose parts are exactly ``hashes`` (part name -> data hash), if any."""
        for version in reversed(versions):
            parts = read_json(self.dataset_dir(name) / version / "manifest.json").get("parts", {})
            if {part: entry.get("data_sha256") for part, entry in parts.items()} == dict(hashes):
                return version
        return None


def _link_or_copy_tree(source: Path, target: Path) -> None:
    """Hard-link the files of ``source`` into ``target`` (copy where links are not possible)."""
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such dataset folder")

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link)
