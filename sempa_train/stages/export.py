"""``sempa export``: one model folder with the LoRA update merged in, for engines that do not speak peft.

The folder holds the merged weights (safetensors), the tokenizer, a model card, and under the key
``sempa_prompteol`` of its ``config.json`` how sentences become vectors (template, layer, last-token
pooling, no normalisation). ``load_encoder(FOLDER)`` reads those settings back
(``sempa_train.core.models.prompteol_settings``), and vLLM's pooling runner loads the folder directly::

    vllm serve MERGED --runner pooling --convert embed \\
        --pooler-config '{"pooling_type": "LAST", "use_activation": false}'

vLLM pools the last token of the *final* layer and leaves the PromptEOL prompt to the client, which
must apply it (``sempa_train.core.templates.prompteol_prompt``) before sending text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sempa_train.core.io import atomic_dir, read_json, write_json, write_text
from sempa_train.core.models import PROMPTEOL_SETTINGS_KEY, adapter_sha256, cache_dir, load_causal_lm, resolve_dtype
from sempa_train.core.templates import PROMPTEOL_TEMPLATE

DTYPES = ("float32", "bfloat16", "float16")  # what the merged weights may be saved as


def export_merged(model: str, adapter: Path | str | None, out_dir: Path | str, *, dtype: str = "float32",
                  layer: int = -1, overwrite: bool = False) -> Path:
    """Merge ``adapter`` into ``model`` and write the folder ``out_dir`` (atomically); returns it."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass --overwrite to replace it")
    lm, tokenizer = load_causal_lm(model, adapter=adapter, dtype=resolve_dtype(dtype, torch.device("cpu")))
    settings = {"template": PROMPTEOL_TEMPLATE, "layer": layer, "pooling": "last", "normalize": False,
                "base_model": str(model), "adapter": None if adapter is None else str(adapter),
                "adapter_sha256": adapter_sha256(adapter)}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        lm.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        config = read_json(tmp / "config.json")
        write_json(tmp / "config.json", {**config, PROMPTEOL_SETTINGS_KEY: settings})
        write_text(tmp / "README.md", _card(settings, adapter))
    return out_dir


def merged_folder(model: str, adapter: Path | str) -> Path:
    """A merged copy of ``model`` + ``adapter`` in the cache (``$SEMPA_CACHE_DIR/merged``), made once per adapter's
    weights: what the vLLM backend loads when it is given an adapter."""
    target = cache_dir() / "merged" / f"{Path(str(model)).name}-{str(adapter_sha256(adapter))[:16]}"
    if not (target / "config.json").is_file():
        export_merged(model, adapter, target, overwrite=target.exists())
    return target


def _card(settings: dict[str, Any], adapter: Path | str | None) -> str:
    """The merged folder's card: the adapter's card when it has one, plus how to serve the folder."""
    card = Path(adapter) / "README.md" if adapter is not None else None
    body = card.read_text(encoding="utf-8") if card is not None and card.is_file() else \
        f"# {settings['base_model']} (PromptEOL embeddings)\n"
    body = body.replace("library_name: peft", "library_name: transformers", 1)
    return body + "\n## This folder\n\nThe base model with the adapter's update merged in (no peft needed). " \
        "Embedding settings (`config.json`, key `" + PROMPTEOL_SETTINGS_KEY + "`):\n\n```json\n" + \
        json.dumps(settings, indent=2) + "\n```\n\nServe it with vLLM's pooling runner:\n\n```\nvllm serve " \
        "THIS_FOLDER --runner pooling --convert embed --pooler-config '{\"pooling_type\": \"LAST\", " \
        "\"use_activation\": false}'\n```\n\nand send each sentence already inside the PromptEOL template.\n"
