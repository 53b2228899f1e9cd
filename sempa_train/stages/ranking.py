"""The rank stage: preference triples (``prompt``, ``chosen``, ``rejected``) from NLI triples and candidates.

Strategies
    ``gold``     the paper's: chosen = entailment hypothesis, rejected = contradiction hypothesis.
    ``sampled``  chosen = the best-scored model candidate that survives the filters; rejected = the
                 premise's contradiction hypothesis (``rejected=contradiction``) or the worst-scored
                 surviving candidate (``rejected=worst``).
    ``hybrid``   a seeded ``hybrid_fraction`` of the premises get their sampled pair and the rest their
                 gold pair; a premise picked for sampling with no usable candidate falls back to gold.

Candidate filters (each counted in the dataset card): empty after cleaning, truncated (hit
max_tokens), copy of the premise (after normalisation), length ratio outside bounds, duplicate of an
earlier candidate; then the absolute checks of ``sempa_train.stages.quality`` that the config turns on
(another language, disfluent, not entailed both ways by the NLI judge of ``stages/judge.py``). Pair
filters: a chosen candidate below ``min_chosen_score`` (``chosen_below_floor``; a hybrid premise then
falls back to gold); score margin below ``min_margin``; contamination (premise, chosen or rejected
appears in a configured evaluation set).
"""

from __future__ import annotations

import functools
import logging
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from sempa_train.core.config import RankConfig
from sempa_train.core.io import read_dataset, read_manifest, write_dataset
from sempa_train.core.schemas import PREFERENCE_SCHEMA
from sempa_train.core.templates import resolve_template
from sempa_train.core.text import normalize_text
from sempa_train.stages.preferences import gold_row, preference_row
from sempa_train.stages.quality import (
    CandidateCheck,
    FluencyCheck,
    LanguageCheck,
    MetaAnswerCheck,
    NumberCheck,
    RepetitionCheck,
    RoleSwapCheck,
    SpellingCheck,
    apply_checks,
    plot_quality,
)
from sempa_train.stages.scoring import Scorer

log = logging.getLogger(__name__)

def filter_candidates(
    premise: str, candidates: list[tuple[str, str]], cfg: RankConfig
) -> tuple[list[str], Counter[str]]:
    """Keep the usable ``(text, finish_reason)`` candidates of one premise; count the others by reason."""
    drops: Counter[str] = Counter()
    kept: list[str] = []
    seen: set[str] = set()
    premise_norm = normalize_text(premise)
    premise_words = max(len(premise.split()), 1)
    for text, finish_reason in candidates:
        norm = normalize_text(text)
        ratio = len(text.split()) / premise_words
        if not norm:
            drops["candidate_empty"] += 1
        elif cfg.drop_truncated and finish_reason == "length":
            drops["candidate_truncated"] += 1
        elif norm == premise_norm:
            drops["candidate_copy"] += 1
        elif not cfg.min_length_ratio <= ratio <= cfg.max_length_ratio:
            drops["candidate_length_ratio"] += 1
        elif norm in seen:
            drops["candidate_duplicate"] += 1
        else:
            seen.add(norm)
            kept.append(text)
    return kept, drops


def pick_pair(scores: list[float]) -> tuple[int, int] | None:
    """Indices of the best and the worst score (first on ties), or None when they cannot differ."""
    if len(scores) < 2:
        return None
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    worst = min(range(len(scores)), key=lambda i: (scores[i], i))
    return None if scores[best] == scores[worst] else (best, worst)


@dataclass
class Ranked:
    """A preference table with its counts and drop reasons."""

    table: pl.DataFrame
    counts: dict[str, int]
    drops: dict[str, int]


def rank_preferences(
    cfg: RankConfig,
    *,
    triples: pl.DataFrame | None,
    candidates: pl.DataFrame | None,
    scorer: Scorer | None,
    contamination: frozenset[str] = frozenset(),
    source: str = "",
    checks: Sequence[CandidateCheck] = (),
) -> Ranked:
    """Build the preference table for ``cfg.strategy`` (pure: the scorer and the checks are built by the
    caller)."""
    needs_candidates = cfg.strategy in ("sampled", "hybrid")
    needs_triples = cfg.strategy in ("gold", "hybrid") or cfg.rejected == "contradiction"
    if needs_candidates and (candidates is None or scorer is None):
        raise ValueError(f"strategy {cfg.strategy!r} needs a candidates table and a scorer")
    if needs_triples and triples is None:
        raise ValueError(f"strategy {cfg.strategy!r} with rejected={cfg.rejected!r} needs the triples table")
    drops: Counter[str] = Counter()
    gold = {t["premise_id"]: t for t in triples.iter_rows(named=True)} if triples is not None else {}

    # Which premises take the sampled pair.
    if cfg.strategy == "gold":
        order, sampled_ids = list(gold), set()
    elif cfg.strategy == "sampled":
        order = candidates["premise_id"].unique(maintain_order=True).to_list()
        sampled_ids = set(order)
    else:
        order = list(gold)
        rng = random.Random(cfg.seed)
        sampled_ids = {pid for pid in order if rng.random() < cfg.hybrid_fraction}

    # Filter candidates and collect every text pair to score, for one scorer call.
    kept: dict[str, list[str]] = {}
    if needs_candidates:
        wanted = candidates.filter(pl.col("premise_id").is_in(list(sampled_ids)))
        for (pid,), group in wanted.group_by("premise_id", maintain_order=True):
            texts, reasons = filter_candidates(group["premise"][0], list(zip(group["text"], group["finish_reason"],
                                                                              strict=True)), cfg)
            drops.update(reasons)
            kept[str(pid)] = texts
    checked_kept = 0
    if checks and kept:
        kept = _apply_checks(checks, kept, candidates, drops)
        checked_kept = sum(map(len, kept.values()))
    premise_of = {pid: t["premise"] for pid, t in gold.items()}
    if candidates is not None:
        premise_of.update(zip(candidates["premise_id"], candidates["premise"], strict=True))
    pairs: list[tuple[str, str]] = []
    for pid in order:
        pairs += [(premise_of[pid], text) for text in kept.get(pid, [])]
        if pid in gold and scorer is not None:
            pairs += [(premise_of[pid], gold[pid]["entailment"]), (premise_of[pid], gold[pid]["contradiction"])]
    scores: dict[tuple[str, str], float] = {}
    if scorer is not None and pairs:
        unique_pairs = list(dict.fromkeys(pairs))
        values = scorer.score([p for p, _ in unique_pairs], [c for _, c in unique_pairs])
        scores = dict(zip(unique_pairs, map(float, values), strict=True))

    rows = []
    for pid in order:
        premise = premise_of[pid]
        triple = gold.get(pid)
        row = None
        if pid in sampled_ids:
            row = _sampled_row(cfg, pid, premise, kept.get(pid, []), triple, scores, drops, source)
            if row is None and cfg.strategy == "hybrid" and triple is not None:
                drops["hybrid_fallback_to_gold"] += 1
        if row is None and triple is not None and cfg.strategy != "sampled":
            row = gold_row(triple, template=cfg.gold_template or cfg.template, strategy=cfg.strategy, scores=scores)
        if row is None:
            continue
        if cfg.min_margin is not None and row["margin"] is not None and row["margin"] < cfg.min_margin:
            drops["pair_margin"] += 1
            continue
        if contamination and {normalize_text(row[k]) for k in ("premise", "chosen", "rejected")} & contamination:
            drops["pair_contamination"] += 1
            continue
        rows.append(row)

    table = pl.DataFrame(rows, schema=PREFERENCE_SCHEMA)
    counts = {"premises": len(order), "pairs": table.height,
              "chosen_sampled": int((table["chosen_origin"] == "sampled").sum()),
              "chosen_gold": int((table["chosen_origin"] == "gold").sum())}
    if candidates is not None:
        counts["candidates"] = candidates.height
    if checks:
        counts["checked_kept"] = checked_kept  # candidates that passed every absolute check
    return Ranked(table=table, counts=counts, drops=dict(sorted(drops.items())))


def _apply_checks(checks: Sequence[CandidateCheck], kept: dict[str, list[str]], candidates: pl.DataFrame,
                  drops: Counter[str]) -> dict[str, list[str]]:
    """The kept candidates that pass every check (one batched call per check); failures counted by reason."""
    premise_of = dict(zip(candidates["premise_id"], candidates["premise"], strict=True))
    flat = [(pid, text) for pid, texts in kept.items() for text in texts]
    reasons = apply_checks(checks, [premise_of[pid] for pid, _ in flat], [text for _, text in flat])
    survivors: dict[str, list[str]] = {pid: [] for pid in kept}
    for (pid, text), reason in zip(flat, reasons, strict=True):
        if reason is None:
            survivors[pid].append(text)
        else:
            drops[reason] += 1
    return survivors


def _sampled_row(
    cfg: RankConfig, pid: str, premise: str, texts: list[str], triple: dict[str, Any] | None,
    scores: dict[tuple[str, str], float], drops: Counter[str], source: str,
) -> dict[str, object] | None:
    """The sampled pair of one premise, or None (counted) when it has none."""
    candidate_scores = [scores[(premise, t)] for t in texts]
    if cfg.rejected == "worst":
        picked = pick_pair(candidate_scores)
        if picked is None:
            drops["premise_too_few_candidates"] += 1
            return None
        best, worst = picked
        if cfg.min_chosen_score is not None and candidate_scores[best] < cfg.min_chosen_score:
            drops["chosen_below_floor"] += 1
            return None
        rejected, rejected_score, rejected_origin, rejected_row = texts[worst], candidate_scores[worst], "sampled", None
    else:
        if not texts:
            drops["premise_no_valid_candidate"] += 1
            return None
        if triple is None:
            drops["premise_without_contradiction"] += 1
            return None
        best = max(range(len(texts)), key=lambda i: (candidate_scores[i], -i))
        if cfg.min_chosen_score is not None and candidate_scores[best] < cfg.min_chosen_score:
            drops["chosen_below_floor"] += 1
            return None
        rejected, rejected_origin, rejected_row = triple["contradiction"], "gold", triple["contradiction_row"]
        rejected_score = scores.get((premise, rejected))
    return preference_row(
        premise_id=pid, premise=premise, template=cfg.template, chosen=texts[best], rejected=rejected,
        chosen_origin="sampled", rejected_origin=rejected_origin, strategy=cfg.strategy,
        source=triple["source"] if triple is not None else source,
        chosen_score=candidate_scores[best], rejected_score=rejected_score, rejected_row=rejected_row,
    )


def sampled_chosen_scores(table: pl.DataFrame) -> pl.Series:
    """The scores of the sampled chosen answers of a preference table (gold rows carry no choice to judge)."""
    return table.filter(pl.col("chosen_origin") == "sampled")["chosen_score"].drop_nulls()


def quality_measures(ranked: Ranked, sampled: pl.Series) -> dict[str, Any]:
    """What the card's quality section shows: the distribution of ``sampled`` (``sampled_chosen_scores``) and the
    share of checked candidates each absolute check dropped."""
    out: dict[str, Any] = {"sampled chosen answers": sampled.len()}
    if sampled.len():
        for q in (0.01, 0.05, 0.25, 0.5):
            out[f"chosen score, {q:.0%} quantile"] = round(float(sampled.quantile(q, "nearest")), 3)
    checked = sum(v for k, v in ranked.drops.items() if k in CHECK_REASONS) + ranked.counts.get("checked_kept", 0)
    for reason in CHECK_REASONS:
        if reason in ranked.drops and checked:
            out[f"{reason} (share of checked candidates)"] = round(ranked.drops[reason] / checked, 4)
    return out


CHECK_REASONS = ("candidate_meta_answer", "candidate_not_english", "candidate_unknown_word",
                 "candidate_changed_number", "candidate_repeats", "candidate_swapped_roles", "candidate_disfluent",
                 "candidate_not_entailed")


def build_checks(cfg: RankConfig) -> list[CandidateCheck]:
    """The absolute checks ``cfg`` turns on, cheapest first (each sees only what passed the ones before)."""
    checks: list[CandidateCheck] = [MetaAnswerCheck()] if cfg.drop_meta_answers else []
    if cfg.language is not None:
        checks.append(LanguageCheck(cfg.language))
    if cfg.drop_unknown_words:
        checks.append(SpellingCheck(cfg.language or "en"))
    if cfg.drop_number_changes:
        checks.append(NumberCheck())
    if cfg.drop_repetitions:
        checks.append(RepetitionCheck())
    if cfg.drop_swapped_roles:
        checks.append(RoleSwapCheck())
    if cfg.min_fluency is not None:
        checks.append(FluencyCheck.load(cfg.model, template=cfg.template, min_logprob=cfg.min_fluency,
                                        chat_template=cfg.chat_template))
    if cfg.judge is not None:
        from sempa_train.stages.judge import JudgeCheck, NLIJudge

        checks.append(JudgeCheck(NLIJudge.load(cfg.judge), cfg.min_entailment))
    return checks


@dataclass(frozen=True)
class RankResult:
    out_dir: Path
    counts: dict[str, int]
    drops: dict[str, int]


def check_template(candidates: pl.DataFrame, where: Path | None, template: str) -> None:
    """The candidates answer the prompt the preference rows will carry: their template is ``template``."""
    expected = resolve_template(template)[0]
    found = sorted(set(candidates["template_id"].to_list()))
    if found != [expected]:
        raise ValueError(f"{where}: candidates were sampled with template {', '.join(found)} but rank.template is "
                         f"{expected}: the preference prompts would not be the ones the candidates answer; use one "
                         "template for sample and rank")


def rank(
    cfg: RankConfig,
    out_dir: Path,
    *,
    triples: Path | None = None,
    candidates: Path | None = None,
    scorer: Scorer | None = None,
    overwrite: bool = False,
) -> RankResult:
    """Read the inputs, rank, and write the preference dataset folder ``out_dir``.

    ``scorer`` is built from ``cfg`` when not given (none for a gold run without filters that need one).
    """
    from sempa_train.stages.sts_data import evaluation_sentences

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass --overwrite to replace it")
    if cfg.strategy in ("sampled", "hybrid") and candidates is None:
        raise ValueError(f"strategy {cfg.strategy!r} needs --candidates (the output of sempa sample)")
    if (cfg.strategy in ("gold", "hybrid") or cfg.rejected == "contradiction") and triples is None:
        raise ValueError(f"strategy {cfg.strategy!r} with rejected={cfg.rejected!r} needs --triples")
    triples_df = read_dataset(triples, "triples") if triples is not None else None
    candidates_df = read_dataset(candidates, "candidates") if candidates is not None else None
    if candidates_df is not None:
        check_template(candidates_df, candidates, cfg.template)
    contamination = frozenset(normalize_text(s) for s in evaluation_sentences(cfg.contamination_dir,
                                                                               cfg.contamination_tasks)) \
        if cfg.contamination_dir else frozenset()
    if scorer is None and (cfg.strategy != "gold" or cfg.min_margin is not None):
        from sempa_train.stages.scoring import load_scorer

        scorer = load_scorer(cfg)
    ranked = rank_preferences(cfg, triples=triples_df, candidates=candidates_df, scorer=scorer,
                              contamination=contamination, source=str(candidates or triples),
                              checks=build_checks(cfg) if candidates_df is not None else ())
    if ranked.table.is_empty():
        raise ValueError(f"rank: no preference pair survived (dropped: {ranked.drops}); nothing written")
    parents = {name: read_manifest(path).get("data_sha256", "")
               for name, path in (("triples_sha256", triples), ("candidates_sha256", candidates)) if path is not None}
    sampled_scores = sampled_chosen_scores(ranked.table)
    plot = {"quality.png": functools.partial(plot_quality, sampled_scores.to_list(), ranked.drops,
                                             floor=cfg.min_chosen_score)} if sampled_scores.len() else {}
    write_dataset(
        out_dir, ranked.table, kind="preferences", quality=quality_measures(ranked, sampled_scores), attachments=plot,
        config={**cfg.to_dict(), "scorer_used": getattr(scorer, "name", None)},
        source=str(candidates or triples), counts=ranked.counts, drops=ranked.drops, parents=parents,
        overwrite=overwrite,
        description=f"Preference triples, strategy {cfg.strategy!r}"
        + (f", scored by {scorer.name}" if scorer is not None else "") + ".",
    )
    log.info("rank: %s pairs kept of %s premises; dropped %s", f"{ranked.table.height:,}",
             f"{ranked.counts['premises']:,}", " ".join(f"{k}={v:,}" for k, v in ranked.drops.items()) or "none")
    return RankResult(out_dir=out_dir, counts=ranked.counts, drops=ranked.drops)
