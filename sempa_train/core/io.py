"""The one module that reads and writes the pipeline's files: Parquet tables and dataset folders.

Every write is atomic (a temporary file or folder beside the target, then a rename), so a crash
never leaves a half-written table and never replaces data that was already there. Every table is
checked against its schema on write and on read.

A *dataset folder* holds one table and what explains it::

    DIR/data.parquet    the table
    DIR/manifest.json   kind, rows, data hash, counts, drops by reason, config, parents, code version
    DIR/config.json     the resolved config that produced it
    DIR/README.md       the dataset card, rendered from the manifest

Open one with polars: ``pl.read_parquet("DIR/data.parquet")``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from sempa_train import __version__
from sempa_train.core.schemas import schema_for

DATA_FILE = "data.parquet"
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"


class SchemaError(ValueError):
    """A table does not have the columns or types its schema requires."""


def check_schema(df: pl.DataFrame, schema: pl.Schema, where: str) -> None:
    """Raise ``SchemaError`` naming ``where`` and every wrong column unless ``df`` matches ``schema``."""
    problems = []
    for name, dtype in schema.items():
        if name not in df.schema:
            problems.append(f"missing column {name!r} ({dtype})")
        elif df.schema[name] != dtype:
            problems.append(f"column {name!r} has type {df.schema[name]}, expected {dtype}")
    extra = [c for c in df.columns if c not in schema]
    if extra:
        problems.append(f"unexpected column(s) {', '.join(repr(c) for c in extra)}")
    if problems:
        raise SchemaError(f"{where}: " + "; ".join(problems))


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it onto ``target``.

    On error the temporary file is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        tmp.replace(target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (indented, UTF-8, non-JSON values stringified)."""
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def read_config_file(path: Path | str, must: str, *, allow_empty: bool = True) -> dict[str, Any]:
    """The mapping in a YAML (or, by its suffix, JSON) config file; ``must`` completes the error for a file that
    holds something else (``"a run config must be a mapping of sections"``)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot parse config ({e})") from e
    if values is None and allow_empty:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: {must}")
    return values


def read_json(path: Path) -> Any:
    """Read a JSON file, naming it in the error when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def write_parquet(df: pl.DataFrame, path: Path, schema: pl.Schema) -> None:
    """Check ``df`` against ``schema`` and write it to ``path`` atomically (zstd)."""
    path = Path(path)
    check_schema(df, schema, f"refusing to write {path}")
    with atomic_path(path) as tmp:
        df.select(list(schema)).write_parquet(tmp, compression="zstd")


def _load_parquet(path: Path) -> pl.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such Parquet file")
    try:
        return pl.read_parquet(path)
    except Exception as e:  # polars raises several types for a damaged file
        raise ValueError(f"{path}: cannot be read as Parquet ({e})") from e


def read_parquet(path: Path, schema: pl.Schema) -> pl.DataFrame:
    """Read a Parquet file and check it against ``schema`` (columns returned in schema order)."""
    path = Path(path)
    df = _load_parquet(path)
    check_schema(df, schema, str(path))
    return df.select(list(schema))


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def text_id(*parts: str) -> str:
    """A stable 16-hex-digit id of a tuple of strings (unit separator between parts)."""
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:16]


def code_version() -> str:
    """The package version plus the git commit of the source tree when there is one (``+dirty``)."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+g{commit}{'.dirty' if dirty else ''}"


def now_iso() -> str:
    """Current UTC time, ISO 8601, second precision."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def resolve_dataset_file(path: Path) -> Path:
    """The Parquet file of a dataset folder, or ``path`` itself when it is a Parquet file."""
    path = Path(path)
    if path.is_dir():
        data = path / DATA_FILE
        if not data.is_file():
            raise FileNotFoundError(f"{path}: a dataset folder must contain {DATA_FILE}")
        return data
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such dataset folder or Parquet file")
    return path


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a dataset folder (``{}`` for a bare Parquet file)."""
    path = Path(path)
    manifest = path / MANIFEST_FILE if path.is_dir() else path.parent / MANIFEST_FILE
    return read_json(manifest) if manifest.is_file() else {}


class IntegrityError(ValueError):
    """A dataset's data file does not match the hash its manifest records (changed, or copied incompletely)."""


def verify_dataset(path: Path) -> str:
    """The data hash of a dataset folder, after checking the file against its manifest (``IntegrityError``)."""
    path = Path(path)
    recorded = read_manifest(path).get("data_sha256")
    data = resolve_dataset_file(path)
    actual = file_sha256(data)
    if recorded and actual != recorded:
        raise IntegrityError(f"{data}: its content does not match the manifest (sha256 {actual[:16]}…, recorded "
                             f"{str(recorded)[:16]}…): the file was changed or copied incompletely; run the stage "
                             "that wrote it again, or restore the folder")
    return actual


def read_dataset(path: Path, kind: str) -> pl.DataFrame:
    """Read the table of a dataset folder (or a Parquet file), verified against its manifest's hash and checked
    against ``kind``'s schema."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest and manifest.get("kind") != kind:
        raise SchemaError(f"{path}: holds a {manifest.get('kind')!r} table, expected {kind!r}")
    if manifest:
        verify_dataset(path)
    return read_parquet(resolve_dataset_file(path), schema_for(kind))


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A new folder in ``parent`` with the permissions of any folder the user makes (``mkdtemp`` makes them 0700,
    and the folder keeps them once renamed into place)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    return tmp


@contextlib.contextmanager
def atomic_dir(target: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; on success rename it onto ``target``.

    Readers never see a partial folder. An existing ``target`` is an error unless ``overwrite``; then
    it is replaced only after the new folder is complete. On error the temporary folder is removed.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass --overwrite to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(target.parent, f".{target.name}.tmp-")
    try:
        yield tmp
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_any(path: Path) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Read a dataset folder or Parquet file of any kind, unchecked (for inspection), with its manifest."""
    return _load_parquet(resolve_dataset_file(Path(path))), read_manifest(Path(path))


def write_dataset(
    out_dir: Path,
    df: pl.DataFrame,
    *,
    kind: str,
    config: Mapping[str, Any],
    source: str,
    counts: Mapping[str, int] | None = None,
    drops: Mapping[str, int] | None = None,
    parents: Mapping[str, str] | None = None,
    description: str = "",
    overwrite: bool = False,
    schema: pl.Schema | None = None,
    quality: Mapping[str, Any] | None = None,
    attachments: Mapping[str, Callable[[Path], None]] | None = None,
) -> dict[str, Any]:
    """Write ``df`` as a dataset folder at ``out_dir`` atomically and return its manifest (``schema``: for kinds
    whose schema has a parameter, e.g. the vector size of ``embeddings``; ``quality``: measures for the card's
    quality section; ``attachments``: file name → a function that writes it, e.g. a plot the card shows)."""
    with atomic_dir(Path(out_dir), overwrite=overwrite) as tmp:
        write_parquet(df, tmp / DATA_FILE, schema or schema_for(kind))
        manifest = {
            "kind": kind,
            "rows": df.height,
            "data_sha256": file_sha256(tmp / DATA_FILE),
            "source": source,
            "counts": dict(counts or {}),
            "drops": dict(drops or {}),
            "parents": dict(parents or {}),
            "config": dict(config),
            "code_version": code_version(),
            "created_at": now_iso(),
            "description": description,
            **({"quality": dict(quality)} if quality else {}),
            **({"attachments": sorted(attachments)} if attachments else {}),
        }
        for name, write in (attachments or {}).items():
            write(tmp / name)
        write_json(tmp / MANIFEST_FILE, manifest)
        write_json(tmp / CONFIG_FILE, dict(config))
        write_text(tmp / CARD_FILE, render_card(manifest, df))
    return manifest


def replace_dir(new: Path, target: Path) -> None:
    """Put folder ``new`` in place of ``target`` with no moment where ``target`` is missing or partial.

    On Linux both folders are swapped in one step (``renameat2`` with ``RENAME_EXCHANGE``) and the old content
    is removed afterwards; where the system cannot swap, the old folder is moved aside first (a brief gap)."""
    if not target.exists():
        new.replace(target)
        return
    if _exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)  # ``new`` now holds the old content
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    target.replace(old)
    new.replace(target)
    shutil.rmtree(old, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux ``renameat2``); False where the C library or file system cannot."""
    import ctypes
    import errno

    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _markdown_table(rows: Mapping[str, Any], key: str, value: str) -> list[str]:
    lines = [f"| {key} | {value} |", "|---|---:|"]
    lines += [f"| {k} | {v:,} |" if isinstance(v, int) else f"| {k} | {v} |" for k, v in rows.items()]
    return lines


def render_card(manifest: Mapping[str, Any], df: pl.DataFrame) -> str:
    """The dataset card (markdown) of a dataset folder."""
    kind = manifest["kind"]
    lines = [f"# SemPA {kind} dataset", ""]
    if manifest.get("description"):
        lines += [manifest["description"], ""]
    lines += [
        f"- rows: {manifest['rows']:,}",
        f"- source: `{manifest['source']}`",
        f"- created: {manifest['created_at']} by sempa {manifest['code_version']}",
        f"- data: `{DATA_FILE}` (sha256 `{manifest['data_sha256'][:16]}…`)",
    ]
    for name, ref in manifest.get("parents", {}).items():
        lines.append(f"- {name}: `{ref}`")
    if manifest.get("counts"):
        lines += ["", "## Counts", "", *_markdown_table(manifest["counts"], "what", "count")]
    if manifest.get("quality"):
        lines += ["", "## Quality", "", *_markdown_table(manifest["quality"], "measure", "value")]
        lines += [f"\n![{name}]({name})" for name in manifest.get("attachments", []) if name.endswith(".png")]
    lines += ["", "## Dropped, by reason", ""]
    if manifest.get("drops"):
        lines += _markdown_table(manifest["drops"], "reason", "count")
    else:
        lines.append("Nothing was dropped.")
    lines += ["", "## Columns", "", "| column | type |", "|---|---|"]
    lines += [f"| `{c}` | {t} |" for c, t in df.schema.items()]
    lines += ["", "## Config", "", "```json", json.dumps(manifest["config"], indent=2, default=str), "```"]
    lines += ["", "## Load", "", "```python", "import polars as pl", f'df = pl.read_parquet("{DATA_FILE}")', "```"]
    return "\n".join(lines) + "\n"
