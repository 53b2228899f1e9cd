"""Evaluation during training, gated checkpoint selection, and LoRA scaling.

DPO on a small model trades embedding quality against generation: STS rises for a while, then
perplexity on unseen text climbs. Rather than fixing the number of steps, ``train_dpo`` can probe the
policy every ``eval_every`` steps on a fixed, seeded subset of STS-B pairs (PromptEOL Spearman; the train
split by default, so that the dev scores reported afterwards are not the ones the selection maximised) and
on held-out text (perplexity and, with ``paraphrases``, the similarity of greedy paraphrases to their
sources), keep each probed adapter, and pick the best STS among the checkpoints that pass both gates
(perplexity ratio, paraphrase-similarity change against the base model). After training it can also
scale the LoRA update of the best-STS step (``B ← s·B``, so the weight change is ``s`` times the
trained one) at a few scales, which costs no training and maps the trade-off between the base model
(``s = 0``) and the trained adapter (``s = 1``); the scaled probes compete with the steps for the choice.

Every probe is a row of ``checkpoints.jsonl`` in the model folder:
``{"step", "scale", "sts_spearman", "perplexity", "paraphrase_similarity", "perplexity_ratio",
"paraphrase_delta", "passed", "sts_tasks"}``; step 0 is the base model and ``sts_tasks`` holds each probe task's
Spearman, whose mean is ``sts_spearman``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from transformers import TrainerCallback

from sempa_train.core.errors import RecordedFailure
from sempa_train.stages.embedding import PromptEOLEncoder, cosine
from sempa_train.stages.evaluation import spearman100
from sempa_train.stages.retention import held_out_texts, paraphrase_probe, perplexity
from sempa_train.stages.sts_data import STSSubset, load_senteval_task

log = logging.getLogger(__name__)


class NoPassingCheckpointError(RecordedFailure):
    """No probed checkpoint passed the selection gate."""


@dataclass(frozen=True)
class Probes:
    """The fixed inputs of every in-training probe."""

    sts: tuple[STSSubset, ...]  # the probe's STS score is the mean Spearman over these
    texts: list[str]
    paraphrase_sources: tuple[str, ...] = ()  # paraphrased greedily at each probe (empty: no paraphrase probe)
    template: str = "P1"
    chat: bool = True

    @classmethod
    def load(cls, senteval_dir: str | Path, pairs: int, text_file: str | Path, texts: int, seed: int = 0,
             split: str = "train", paraphrases: int = 0, template: str = "P1", chat: bool = True,
             offset: int = 0, tasks: Sequence[str] = ("STSBenchmark",), genre_mix: str | None = None) -> Probes:
        """A seeded subset of ``pairs`` pairs of each of ``tasks`` (their ``split``) and the first ``texts``
        held-out texts (of which the first ``paraphrases`` are paraphrased at each probe), after skipping
        ``offset`` texts. With ``genre_mix`` (a split name), a task whose file has genres draws its pairs in that
        split's genre proportions (only the genre column of that split is read, never its scores)."""
        rng = np.random.default_rng(seed)
        subsets = []
        for task in tasks:
            full = load_senteval_task(Path(senteval_dir), task, split)[0]
            if genre_mix is not None and full.genres:
                target = load_senteval_task(Path(senteval_dir), task, genre_mix)[0].genres
                idx = genre_matched_sample(full.genres, target, pairs, rng, f"{task} {split}")
            else:
                idx = np.sort(rng.choice(len(full), size=min(pairs, len(full)), replace=False))
            subsets.append(full.select(idx))
        held_out = held_out_texts(text_file, offset + max(texts, paraphrases))[offset:]
        return cls(sts=tuple(subsets), texts=held_out[:texts], paraphrase_sources=tuple(held_out[:paraphrases]),
                   template=template, chat=chat)


def genre_matched_sample(genres: Sequence[str], target: Sequence[str], pairs: int, rng: np.random.Generator,
                         name: str) -> np.ndarray:
    """Sorted indices of about ``pairs`` rows of ``genres``, drawn per genre in the proportions of ``target``
    (STS-B train is 57 % news and 8 % forums, dev 33 % and 25 %: a probe of train pairs drawn at random mostly
    reads news). Raises ``ValueError`` naming ``name`` when a genre of ``target`` has too few rows."""
    counts = Counter(target)
    by_genre: dict[str, list[int]] = {}
    for i, genre in enumerate(genres):
        by_genre.setdefault(genre, []).append(i)
    chosen = []
    for genre, count in sorted(counts.items()):
        want = round(pairs * count / len(target))
        have = by_genre.get(genre, [])
        if len(have) < want:
            raise ValueError(f"{name}: the probe needs {want} pairs of genre {genre!r} and the split has {len(have)}; "
                             "lower eval_sts_pairs or drop eval_sts_genre_mix")
        chosen.extend(rng.choice(have, size=want, replace=False).tolist())
    return np.sort(np.asarray(chosen, dtype=np.int64))


@dataclass(frozen=True)
class ProbeResult:
    step: int
    scale: float
    sts_spearman: float
    perplexity: float
    paraphrase_similarity: float | None = None
    perplexity_ratio: float = 1.0
    paraphrase_delta: float | None = None
    passed: bool = True
    sts_tasks: dict[str, float] | None = None  # Spearman x 100 of each probe task (sts_spearman is their mean)


class ProbeReading(NamedTuple):
    """What one probe measures of the model as it is now."""

    sts: float  # mean Spearman x 100 over the STS subsets
    perplexity: float
    paraphrase_similarity: float | None
    sts_tasks: dict[str, float]  # Spearman x 100 of each subset, by task


@functools.cache
def _similarity_encoder() -> Any:
    """The sentence encoder that scores paraphrases (the one retention uses), loaded once per process."""
    from sempa_train.stages.embedding import load_encoder
    from sempa_train.stages.retention import SIMILARITY_ENCODER

    return load_encoder(SIMILARITY_ENCODER, show_progress=False)


def sts_similarities(model: Any, tokenizer: Any, probes: Probes) -> list[np.ndarray]:
    """Per-pair PromptEOL cosine similarity of each STS subset of ``probes`` under ``model`` as it is now."""
    encoder = PromptEOLEncoder(model, tokenizer, show_progress=False)
    similarities = []
    for subset in probes.sts:
        vectors = encoder.encode(subset.sent1 + subset.sent2)
        similarities.append(cosine(vectors[:len(subset)], vectors[len(subset):]))
    return similarities


@torch.no_grad()
def probe(model: Any, tokenizer: Any, probes: Probes, *, bf16: bool = False) -> ProbeReading:
    """STS Spearman (mean and per task), held-out perplexity and greedy-paraphrase similarity (None without
    paraphrase sources) of a causal LM as it is now (adapter active)."""
    was_training = model.training
    model.eval()
    autocast = torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16, enabled=bf16)
    try:
        with autocast:
            scores = [float(spearman100(similarity, subset.scores)) for similarity, subset
                      in zip(sts_similarities(model, tokenizer, probes), probes.sts, strict=True)]
            ppl = perplexity(model, tokenizer, probes.texts)
            similarity = None
            if probes.paraphrase_sources:
                from sempa_train.stages.generation import TransformersBackend

                similarity = paraphrase_probe(TransformersBackend(model, tokenizer), tokenizer,
                                              list(probes.paraphrase_sources), _similarity_encoder(),
                                              template=probes.template, chat=probes.chat)["similarity_mean"]
    finally:
        model.train(was_training)
    return ProbeReading(float(np.mean(scores)), ppl, similarity,
                        {subset.task: score for subset, score in zip(probes.sts, scores, strict=True)})


def lora_b_weights(model: Any) -> list[torch.nn.Parameter]:
    """The LoRA ``B`` matrices of a peft model (the update is B·A, so scaling B scales the update)."""
    return [p for name, p in model.named_parameters() if "lora_B" in name]


@contextlib.contextmanager
def lora_scaled(model: Any, scale: float) -> Iterator[None]:
    """Within the block the adapter's update is ``scale`` times the trained one."""
    weights = lora_b_weights(model)
    saved = [w.detach().clone() for w in weights]
    with torch.no_grad():
        for w in weights:
            w.mul_(scale)
    try:
        yield
    finally:
        with torch.no_grad():
            for w, original in zip(weights, saved, strict=True):
                w.copy_(original)


def scale_adapter_file(adapter_dir: Path, scale: float) -> None:
    """Scale the LoRA ``B`` matrices stored in ``adapter_dir/adapter_model.safetensors`` in place."""
    from safetensors.torch import load_file, save_file

    path = Path(adapter_dir) / "adapter_model.safetensors"
    weights = load_file(path)
    save_file({k: v * scale if "lora_B" in k else v for k, v in weights.items()}, path, metadata={"format": "pt"})


@dataclass(frozen=True)
class SelectionGate:
    """What a probed checkpoint must keep of the base model's generation (None: that gate is off)."""

    max_perplexity_ratio: float | None = None
    min_paraphrase_delta: float | None = None

    def __str__(self) -> str:
        parts = [f"perplexity_ratio <= {self.max_perplexity_ratio}" if self.max_perplexity_ratio is not None else "",
                 f"paraphrase_delta >= {self.min_paraphrase_delta:+}" if self.min_paraphrase_delta is not None else ""]
        return " and ".join(p for p in parts if p) or "no gate"


def write_scaled_adapter(source: Path, target: Path, scale: float) -> Path:
    """Copy the adapter folder ``source`` to ``target`` (replacing it) with its LoRA update scaled by ``scale``."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    if scale != 1.0:
        scale_adapter_file(target, scale)
    return target


def judge(results: Sequence[ProbeResult], gate: SelectionGate) -> list[ProbeResult]:
    """The results with ``perplexity_ratio`` and ``paraphrase_delta`` against step 0 (the base model) and
    ``passed`` filled in."""
    base = next(r for r in results if r.step == 0)
    out = []
    for r in results:
        ratio = r.perplexity / base.perplexity
        delta = None if r.paraphrase_similarity is None or base.paraphrase_similarity is None \
            else r.paraphrase_similarity - base.paraphrase_similarity
        passed = (gate.max_perplexity_ratio is None or ratio <= gate.max_perplexity_ratio) and (
            gate.min_paraphrase_delta is None or delta is None or delta >= gate.min_paraphrase_delta)
        out.append(replace(r, perplexity_ratio=ratio, paraphrase_delta=delta, passed=passed))
    return out


def select(results: Sequence[ProbeResult], gate: SelectionGate, scale_margin: float = 0.0) -> ProbeResult:
    """The trained checkpoint with the best STS among those that pass ``gate``; a scaled update is taken over the
    best passing unscaled one only when its STS beats it by more than ``scale_margin`` (the probe's noise)."""
    candidates = [r for r in results if r.step > 0 and r.passed]
    if not candidates:
        tried = [r for r in results if r.step > 0]
        closest = min(tried, key=lambda r: r.perplexity_ratio, default=None)
        detail = "" if closest is None else (
            f"; the lowest perplexity ratio was {closest.perplexity_ratio:.3f} at step {closest.step}, scale "
            f"{closest.scale}" + ("" if closest.paraphrase_delta is None
                                  else f" (paraphrase similarity {closest.paraphrase_delta:+.3f})"))
        raise NoPassingCheckpointError(
            f"no checkpoint passed the gate {gate}{detail}: lower the learning rate, probe earlier steps "
            "(eval_every), add scales below 1 (select_scales), or loosen select_max_perplexity_ratio / "
            "select_min_paraphrase_delta")

    def rank(r: ProbeResult) -> tuple[float, int, float]:
        return r.sts_spearman, -r.step, r.scale

    best = max(candidates, key=rank)
    unscaled = [r for r in candidates if r.scale == 1.0]
    if best.scale != 1.0 and unscaled:
        best_unscaled = max(unscaled, key=rank)
        if best.sts_spearman - best_unscaled.sts_spearman <= scale_margin:
            log.info("train: step %d x%g beats step %d as trained by %.2f on the STS probe, within the margin %g: "
                     "keeping step %d as trained", best.step, best.scale, best_unscaled.step,
                     best.sts_spearman - best_unscaled.sts_spearman, scale_margin, best_unscaled.step)
            return best_unscaled
    return best


def _by_task(tasks: dict[str, float]) -> str:
    return ", ".join(f"{task} {value:.2f}" for task, value in tasks.items())


class CheckpointProbe(TrainerCallback):
    """Probe the base model when training starts and the policy every ``every`` steps (and at the end); save the
    adapter of each probed step under ``checkpoint_dir/step-N``."""

    def __init__(self, tokenizer: Any, probes: Probes, every: int, checkpoint_dir: Path, *, bf16: bool) -> None:
        self.tokenizer = tokenizer
        self.probes = probes
        self.every = every
        self.checkpoint_dir = Path(checkpoint_dir)
        self.bf16 = bf16
        self.results: list[ProbeResult] = []

    def _probe(self, model: Any, step: int) -> None:
        base = model.get_base_model()
        sts, ppl, para, tasks = probe(base, self.tokenizer, self.probes, bf16=self.bf16)
        self.results.append(ProbeResult(step, 1.0, sts, ppl, para, sts_tasks=tasks))
        log.info("train: step %d: STS probe %.2f (%s), held-out perplexity %.2f%s", step, sts, _by_task(tasks), ppl,
                 "" if para is None else f", paraphrase similarity {para:.3f}")

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        with model.disable_adapter():
            self._probe(model, 0)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        step = state.global_step
        if step % self.every == 0 or step == state.max_steps:
            self._probe(model, step)
            model.save_pretrained(self.checkpoint_dir / f"step-{step}")

    def probe_scales(self, model: Any, step: int, scales: Sequence[float]) -> None:
        """Probe the adapter now loaded in ``model`` (the one of ``step``) at each of ``scales``."""
        for scale in scales:
            if scale == 1.0:
                continue
            with lora_scaled(model, scale):
                sts, ppl, para, tasks = probe(model.get_base_model(), self.tokenizer, self.probes, bf16=self.bf16)
            self.results.append(ProbeResult(step, scale, sts, ppl, para, sts_tasks=tasks))
            log.info("train: step %d at scale %.2f: STS probe %.2f (%s), perplexity %.2f%s", step, scale, sts,
                     _by_task(tasks), ppl, "" if para is None else f", paraphrase similarity {para:.3f}")


def select_and_install(callback: CheckpointProbe, model: Any, out_dir: Path, *, gate: SelectionGate,
                       scales: Sequence[float], scale_margin: float = 0.0) -> tuple[ProbeResult, list[dict[str, Any]]]:
    """Probe the adapter of the best-STS step at ``scales`` (whether or not that step passed the gate: scaling the
    update down is how a step that moved too far can come back within it), pick the best passing probe of all (a
    scaled one only beyond ``scale_margin``, see ``select``), and write its adapter to ``out_dir/adapter`` (scaled
    when a scale other than 1 won) and load it into ``model``. Returns the choice and every probe as dicts; raises
    ``NoPassingCheckpointError`` when no probe passed."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if scales:
        best = max((r for r in callback.results if r.step > 0), key=lambda r: r.sts_spearman)
        state = load_file(callback.checkpoint_dir / f"step-{best.step}" / "adapter_model.safetensors")
        set_peft_model_state_dict(model, state)
        callback.probe_scales(model, best.step, scales)
    results = judge(callback.results, gate)
    chosen = select(results, gate, scale_margin)
    adapter = write_scaled_adapter(callback.checkpoint_dir / f"step-{chosen.step}", Path(out_dir) / "adapter",
                                   chosen.scale)
    set_peft_model_state_dict(model, load_file(adapter / "adapter_model.safetensors"))  # the model = the choice
    return chosen, [asdict(r) for r in results]
