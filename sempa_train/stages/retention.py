"""Generation retention: does the tuned model still write like the base model?

Three probes, run on the base model and on base + adapter with the same inputs:

* ``perplexity`` of held-out natural text (default: SNLI test premises, which training never saw;
  or any text file, one passage a line) — the mean token negative log-likelihood, exponentiated;
* ``paraphrase`` behaviour: greedy paraphrases of held-out sentences (the training prompt), scored by
  the MiniLM encoder for similarity to the source, plus the copy rate and the empty rate;
* ``lm-eval`` (lm-evaluation-harness), the paper's benchmarks, only when the package is installed
  and its data reachable; otherwise the result says it was skipped and why.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sempa_train.core.config import GenerationParams, RetentionConfig
from sempa_train.core.io import file_sha256, read_json, write_json
from sempa_train.core.models import load_causal_lm, resolve_device, resolve_dtype, use_chat_template
from sempa_train.core.result_cache import lookup, model_fingerprint, result_key, store
from sempa_train.core.templates import resolve_template
from sempa_train.core.text import clean_candidate, normalize_text, paraphrase_prompt
from sempa_train.core.threads import follow_load
from sempa_train.stages.embedding import Encoder, cosine
from sempa_train.stages.generation import TransformersBackend
from sempa_train.stages.sources import clean_text

SIMILARITY_ENCODER = "all-minilm-l6-v2"  # scores a paraphrase's similarity to its source (not the policy itself)


def held_out_texts(path: str | Path, limit: int) -> list[str]:
    """Distinct texts from a ``.jsonl`` NLI file (its premises) or a plain text file (its lines)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: held-out text file does not exist")
    texts: list[str] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.suffix in (".jsonl", ".json"):
                try:
                    text = json.loads(line)["premise"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{lineno}: expected a JSON object with a 'premise' ({e})") from e
            else:
                text = line
            texts.append(clean_text(str(text)))
    unique = [t for t in dict.fromkeys(texts) if t]
    if not unique:
        raise ValueError(f"{path}: no text")
    return unique[:limit]


# Part of the base-result cache key: raise it when the probes compute something different for the same model
# (2: perplexity's cross-entropy over (token, vocabulary) rows, which agrees with float64 where 1's did not).
PROBES_VERSION = 2


@torch.inference_mode()
def perplexity(
    model: Any, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 16, max_length: int = 256
) -> float:
    """exp(mean negative log-likelihood per predicted token) over ``texts``: batches of similar length (right
    padding, pads ignored), so little of the work is spent on padding."""
    device = next(model.parameters()).device
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(order), batch_size):
        if device.type == "cpu":
            follow_load()  # threads fitted to the cores other processes leave free
        batch = tokenizer.pad({"input_ids": [ids[i] for i in order[start : start + batch_size]]},
                              padding_side="right", return_tensors="pt").to(device)
        logits = model(**batch).logits[:, :-1].float()
        mask = batch["attention_mask"][:, 1:].bool()
        nll = torch.nn.functional.cross_entropy(logits[mask], batch["input_ids"][:, 1:][mask], reduction="sum")
        total_nll += float(nll)
        total_tokens += int(mask.sum())
    return math.exp(total_nll / max(total_tokens, 1))


def paraphrase_probe(backend: TransformersBackend, tokenizer: Any, sentences: Sequence[str], encoder: Encoder,
                     *, template: str = "P1", chat: bool = True, max_tokens: int = 64) -> dict[str, Any]:
    """Greedy paraphrases of ``sentences``: similarity to the source, copy rate, empty rate, examples."""
    _, template_text = resolve_template(template)
    prompts = tokenizer([paraphrase_prompt(s, template_text, tokenizer, chat=chat) for s in sentences],
                        add_special_tokens=False)["input_ids"]
    greedy = GenerationParams(n=1, temperature=0.0, max_tokens=max_tokens, batch_size=16)
    outputs = [clean_candidate(g[0].text) for g in backend.generate(prompts, [0] * len(prompts), greedy)]
    kept = [(s, o) for s, o in zip(sentences, outputs, strict=True) if o]
    similarity = (cosine(encoder.encode([s for s, _ in kept]), encoder.encode([o for _, o in kept]))
                  if kept else np.zeros(0))
    copies = sum(normalize_text(s) == normalize_text(o) for s, o in zip(sentences, outputs, strict=True))
    return {
        "n": len(sentences),
        "similarity_mean": float(similarity.mean()) if len(similarity) else 0.0,
        "copy_rate": copies / len(sentences),
        "empty_rate": sum(not o for o in outputs) / len(sentences),
        "mean_words": float(np.mean([len(o.split()) for o in outputs])),
        "examples": [{"source": s, "paraphrase": o} for s, o in zip(sentences[:5], outputs[:5], strict=True)],
    }


def lm_eval_probe(model_path: Path, adapter: Path | None, tasks: Sequence[str], limit: int | None) -> dict[str, Any]:
    """The paper's lm-eval tasks through lm-evaluation-harness, or ``{"skipped": reason}``."""
    if not tasks:
        return {"skipped": "no lm-eval tasks configured"}
    try:
        import lm_eval
    except ImportError:
        return {"skipped": "lm-eval is not installed (pip install lm-eval)"}
    args = f"pretrained={model_path}" + (f",peft={adapter}" if adapter else "")
    try:
        out = lm_eval.simple_evaluate(model="hf", model_args=args, tasks=list(tasks), limit=limit)
    except Exception as e:  # task data not reachable offline, unknown task, ...
        return {"skipped": f"lm-eval failed: {type(e).__name__}: {e}"[:500]}
    return {"results": out.get("results", {})}


def run_retention(model: str, adapter: str | Path | None, cfg: RetentionConfig, encoder: Encoder, *,
                  cache: bool = False) -> dict[str, Any]:
    """All probes for one model (+ adapter); with ``cache`` and no adapter, through the result cache (keyed by the
    model's weights, the probe settings, the held-out text's content and the similarity encoder)."""
    if not cache or adapter is not None:
        return _run_probes(model, adapter, cfg, encoder)
    settings = {k: v for k, v in cfg.to_dict().items() if k != "text_file"}
    key = result_key("retention", {"model": model_fingerprint(model), "config": settings, "encoder": encoder.name,
                                   "text": file_sha256(Path(cfg.text_file)), "probes": PROBES_VERSION})
    entry = lookup("retention", key)
    if entry is not None:
        return {**read_json(entry / "retention.json"), "text_file": cfg.text_file}
    result = _run_probes(model, adapter, cfg, encoder)
    store("retention", key, lambda folder: write_json(folder / "retention.json", result))
    return result


def _run_probes(model: str, adapter: str | Path | None, cfg: RetentionConfig, encoder: Encoder) -> dict[str, Any]:
    device = resolve_device(cfg.device)
    lm, tokenizer = load_causal_lm(model, adapter=adapter, dtype=resolve_dtype(cfg.dtype, device), device=device)
    texts = held_out_texts(cfg.text_file, cfg.max_texts)
    result: dict[str, Any] = {
        "perplexity": perplexity(lm, tokenizer, texts, max_length=cfg.max_length),
        "perplexity_texts": len(texts),
        "text_file": cfg.text_file,
    }
    if cfg.paraphrases > 0:
        chat = use_chat_template(cfg.chat_template, tokenizer)
        result["paraphrase"] = paraphrase_probe(TransformersBackend(lm, tokenizer), tokenizer,
                                                texts[: cfg.paraphrases], encoder, template=cfg.template, chat=chat)
    from sempa_train.core.models import resolve_model

    result["lm_eval"] = lm_eval_probe(resolve_model(model), Path(adapter) if adapter else None,
                                      cfg.lm_eval_tasks, cfg.lm_eval_limit)
    return result


def compare(base: dict[str, Any], tuned: dict[str, Any]) -> dict[str, float]:
    """Tuned against base: perplexity ratio and paraphrase deltas."""
    out = {"perplexity_ratio": tuned["perplexity"] / base["perplexity"]}
    if "paraphrase" in base and "paraphrase" in tuned:
        for key in ("similarity_mean", "copy_rate", "empty_rate"):
            out[f"paraphrase_{key}_delta"] = tuned["paraphrase"][key] - base["paraphrase"][key]
    return out
