"""Scorers: how well a candidate keeps the meaning of its premise (higher is better).

* ``EmbeddingScorer`` — cosine similarity of sentence embeddings; with a sentence-transformers
  encoder (default all-MiniLM-L6-v2) or with the policy's own PromptEOL encoder.
* ``NLIScorer`` — probability of the entailment label of an NLI cross-encoder
  (any sequence-classification model whose ``id2label`` names an entailment class).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from sempa_train.core.config import EmbedConfig, RankConfig
from sempa_train.core.models import resolve_device, resolve_model, weights_kwargs
from sempa_train.stages.embedding import Encoder, cosine, load_encoder

DEFAULT_SCORER_MODELS = {"embedding": "all-minilm-l6-v2", "policy": "smollm2-135m-instruct"}


class Scorer(Protocol):
    """Scores (premise, candidate) pairs."""

    name: str

    def score(self, premises: Sequence[str], candidates: Sequence[str]) -> np.ndarray: ...


class EmbeddingScorer:
    """Cosine similarity of premise and candidate embeddings (all texts encoded in one call)."""

    def __init__(self, encoder: Encoder, name: str = "") -> None:
        self.encoder = encoder
        self.name = name or f"embedding:{encoder.name}"

    def score(self, premises: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
        if len(premises) != len(candidates):
            raise ValueError(f"{len(premises)} premises but {len(candidates)} candidates")
        if not premises:
            return np.zeros(0, dtype=np.float64)
        vectors = self.encoder.encode([*premises, *candidates])
        n = len(premises)
        return cosine(vectors[:n], vectors[n:]).astype(np.float64)


def entailment_index(id2label: dict[int, str]) -> int:
    """The class index whose label names entailment."""
    for index, label in id2label.items():
        if "entail" in str(label).lower() and "not" not in str(label).lower():
            return int(index)
    raise ValueError(f"the NLI scorer model has no entailment label (labels: {list(id2label.values())})")


class NLIScorer:
    """P(entailment | premise, candidate) from a sequence-classification cross-encoder."""

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 32, name: str = "nli") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.entail = entailment_index(model.config.id2label)
        self.name = name

    @torch.inference_mode()
    def score(self, premises: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
        if len(premises) != len(candidates):
            raise ValueError(f"{len(premises)} premises but {len(candidates)} candidates")
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(premises), self.batch_size):
            batch = self.tokenizer(list(premises[start : start + self.batch_size]),
                                   list(candidates[start : start + self.batch_size]),
                                   padding=True, truncation=True, return_tensors="pt").to(device)
            probs = self.model(**batch).logits.float().softmax(-1)[:, self.entail]
            out.append(probs.cpu().numpy())
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0, dtype=np.float64)


def load_scorer(cfg: RankConfig, embed: EmbedConfig | None = None) -> Scorer:
    """Build the scorer ``cfg`` names (the models are loaded once here)."""
    embed = embed or EmbedConfig()
    model = cfg.scorer_model or DEFAULT_SCORER_MODELS.get(cfg.scorer)
    if cfg.scorer == "nli":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = resolve_model(str(model))
        clf = AutoModelForSequenceClassification.from_pretrained(path, **weights_kwargs(path))
        clf = clf.to(resolve_device(embed.device)).eval()
        return NLIScorer(clf, AutoTokenizer.from_pretrained(path), name=f"nli:{model}")
    kind = "prompteol" if cfg.scorer == "policy" else embed.embedding
    encoder = load_encoder(str(model), embed.replace(embedding=kind))
    return EmbeddingScorer(encoder, name=f"{cfg.scorer}:{model}")
