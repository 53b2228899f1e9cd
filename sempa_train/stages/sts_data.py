"""STS benchmark loaders: SentEval's folder layout on disk, or the MTEB copies on the Hugging Face Hub.

SentEval layout (``data/downstream``), the one SimCSE, PromptEOL and SemPA read::

    STS/STS12-en-test/STS.input.<subset>.txt   two tab-separated sentences a line
    STS/STS12-en-test/STS.gs.<subset>.txt      gold score 0-5 a line; an empty line = pair not scored
    ... STS13-en-test, STS14-en-test, STS15-en-test, STS16-en-test
    STS/STSBenchmark/sts-{train,dev,test}.csv  tab-separated: genre file year id score sentence1 sentence2
    SICK/SICK_{train,trial,test_annotated}.txt tab-separated with a header:
                                               pair_ID sentence_A sentence_B relatedness_score ...

Sentences are read as SentEval reads them: split on whitespace and joined with single spaces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

STS_SUBSETS: dict[str, tuple[str, ...]] = {
    "STS12": ("MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews"),
    "STS13": ("FNWN", "headlines", "OnWN"),
    "STS14": ("deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news"),
    "STS15": ("answers-forums", "answers-students", "belief", "headlines", "images"),
    "STS16": ("answer-answer", "headlines", "plagiarism", "postediting", "question-question"),
}
STSB_FILES = {"train": "sts-train.csv", "dev": "sts-dev.csv", "test": "sts-test.csv"}
SICK_FILES = {"train": "SICK_train.txt", "dev": "SICK_trial.txt", "test": "SICK_test_annotated.txt"}
MTEB_DATASETS = {
    "STS12": "mteb/sts12-sts", "STS13": "mteb/sts13-sts", "STS14": "mteb/sts14-sts", "STS15": "mteb/sts15-sts",
    "STS16": "mteb/sts16-sts", "STSBenchmark": "mteb/stsbenchmark-sts", "SICKRelatedness": "mteb/sickr-sts",
}


class STSDataError(ValueError):
    """An STS file that is missing or malformed (the message names the file and line)."""


@dataclass(frozen=True)
class STSSubset:
    """Scored sentence pairs of one task subset (STS12-16 have several; STS-B and SICK one)."""

    task: str
    name: str
    split: str
    sent1: list[str]
    sent2: list[str]
    scores: np.ndarray
    genres: tuple[str, ...] = ()  # each pair's genre where the file has one (STS-B: main-captions, ...), else empty
    sources: tuple[str, ...] = ()  # each pair's source corpus where the file names one (STS-B: MSRvid, ...)

    def __len__(self) -> int:
        return len(self.scores)

    def select(self, indices: Sequence[int]) -> STSSubset:
        """The pairs at ``indices``, in that order, with their genres and sources."""
        idx = list(indices)
        return STSSubset(self.task, self.name, self.split, [self.sent1[i] for i in idx], [self.sent2[i] for i in idx],
                         self.scores[idx], tuple(self.genres[i] for i in idx) if self.genres else (),
                         tuple(self.sources[i] for i in idx) if self.sources else ())


def task_split(task: str, split: str) -> str:
    """The split a task is evaluated on: STS12-16 only have test data."""
    return "test" if task in STS_SUBSETS else split


def _join(text: str) -> str:
    return " ".join(text.split())


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise STSDataError(f"{path}: missing (expected SentEval's data/downstream layout; see sempa eval --help)")
    return path.read_text(encoding="utf-8").splitlines()


def _score(text: str, path: Path, lineno: int) -> float:
    try:
        return float(text)
    except ValueError:
        raise STSDataError(f"{path}:{lineno}: score {text!r} is not a number") from None


def load_senteval_subset(folder: Path, task: str, subset: str) -> STSSubset:
    """One STS12-16 subset; pairs with an empty gold line are skipped, as SentEval does."""
    inputs = folder / f"STS.input.{subset}.txt"
    gold = folder / f"STS.gs.{subset}.txt"
    input_lines, gold_lines = _read_lines(inputs), _read_lines(gold)
    if len(input_lines) != len(gold_lines):
        raise STSDataError(f"{inputs}: {len(input_lines)} lines but {gold} has {len(gold_lines)}")
    sent1, sent2, scores = [], [], []
    for lineno, (pair, score) in enumerate(zip(input_lines, gold_lines, strict=True), 1):
        if not score.strip():
            continue
        parts = pair.split("\t")
        if len(parts) < 2:
            raise STSDataError(f"{inputs}:{lineno}: expected two tab-separated sentences")
        sent1.append(_join(parts[0]))
        sent2.append(_join(parts[1]))
        scores.append(_score(score.strip(), gold, lineno))
    return STSSubset(task, subset, "test", sent1, sent2, np.asarray(scores, dtype=np.float64))


# STS-B spells one genre two ways: main-forum in train, main-forums in dev.
GENRE_ALIASES = {"main-forums": "main-forum"}


def load_stsb(path: Path, split: str) -> STSSubset:
    """An STS Benchmark csv (no header; genre and source in columns 1-2, score, sentence1, sentence2 in 5-7)."""
    sent1, sent2, scores, genres, sources = [], [], [], [], []
    for lineno, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        parts = line.strip().split("\t")
        if len(parts) < 7:
            raise STSDataError(f"{path}:{lineno}: expected at least 7 tab-separated columns, got {len(parts)}")
        scores.append(_score(parts[4], path, lineno))
        sent1.append(_join(parts[5]))
        sent2.append(_join(parts[6]))
        genres.append(GENRE_ALIASES.get(parts[0], parts[0]))
        sources.append(parts[1])
    return STSSubset("STSBenchmark", split, split, sent1, sent2, np.asarray(scores, dtype=np.float64), tuple(genres),
                     tuple(sources))


def load_sick(path: Path, split: str) -> STSSubset:
    """A SICK file (header, then pair_ID, sentence_A, sentence_B, relatedness_score, ...)."""
    lines = _read_lines(path)
    header = lines[0].split("\t") if lines else []
    if header[:4] != ["pair_ID", "sentence_A", "sentence_B", "relatedness_score"]:
        raise STSDataError(f"{path}:1: expected the header pair_ID, sentence_A, sentence_B, relatedness_score")
    sent1, sent2, scores = [], [], []
    for lineno, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        parts = line.strip().split("\t")
        if len(parts) < 4:
            raise STSDataError(f"{path}:{lineno}: expected at least 4 tab-separated columns, got {len(parts)}")
        sent1.append(_join(parts[1]))
        sent2.append(_join(parts[2]))
        scores.append(_score(parts[3], path, lineno))
    return STSSubset("SICKRelatedness", split, split, sent1, sent2, np.asarray(scores, dtype=np.float64))


def load_senteval_task(senteval_dir: Path, task: str, split: str = "test") -> list[STSSubset]:
    """The subsets of ``task`` from a SentEval data folder."""
    root = Path(senteval_dir)
    if not root.is_dir():
        raise STSDataError(f"{root}: SentEval data folder does not exist")
    if task in STS_SUBSETS:
        folder = root / "STS" / f"{task}-en-test"
        return [load_senteval_subset(folder, task, subset) for subset in STS_SUBSETS[task]]
    if task == "STSBenchmark":
        return [load_stsb(root / "STS" / "STSBenchmark" / STSB_FILES[split], split)]
    if task == "SICKRelatedness":
        return [load_sick(root / "SICK" / SICK_FILES[split], split)]
    known = ", ".join([*STS_SUBSETS, "STSBenchmark", "SICKRelatedness"])
    raise STSDataError(f"unknown STS task {task!r}; known: {known}")


def load_mteb_task(task: str, split: str = "test") -> list[STSSubset]:
    """A task from its MTEB copy on the Hugging Face Hub (needs network or a datasets cache).

    The MTEB copies of STS12-16 are the concatenated subsets, so they give the pooled score directly.
    """
    import datasets

    hub_split = {"test": "test", "dev": "validation", "train": "train"}[task_split(task, split)]
    dataset_id = MTEB_DATASETS[task]
    try:
        ds = datasets.load_dataset(dataset_id, split=hub_split)
    except Exception as e:
        raise STSDataError(
            f"cannot load {task} ({dataset_id}, split {hub_split}) from the Hugging Face Hub "
            f"({e.__class__.__name__}); pass --senteval-dir with a local SentEval data folder"
        ) from e
    return [STSSubset(task, task_split(task, split), task_split(task, split),
                      [_join(s) for s in ds["sentence1"]], [_join(s) for s in ds["sentence2"]],
                      np.asarray(ds["score"], dtype=np.float64))]


def load_tasks(tasks: tuple[str, ...], split: str, senteval_dir: Path | str | None) -> dict[str, list[STSSubset]]:
    """Every requested task, from ``senteval_dir`` when given, else from the Hub."""
    if senteval_dir is None:
        return {task: load_mteb_task(task, split) for task in tasks}
    return {task: load_senteval_task(Path(senteval_dir), task, task_split(task, split)) for task in tasks}


def evaluation_sentences(senteval_dir: Path | str, tasks: tuple[str, ...]) -> set[str]:
    """Every sentence of the evaluation splits (dev and test) of ``tasks`` present in ``senteval_dir``.

    Used as a contamination guard: training pairs that contain one of these are dropped. Splits whose
    files are absent are skipped (the held-out test files are usually not on a development machine).
    """
    root = Path(senteval_dir)
    if not root.is_dir():
        raise STSDataError(f"{root}: SentEval data folder does not exist")
    sentences: set[str] = set()
    for task in tasks:
        splits = ("test",) if task in STS_SUBSETS else ("dev", "test")
        for split in splits:
            try:
                subsets = load_senteval_task(root, task, split)
            except STSDataError as e:
                if "missing" not in str(e):
                    raise
                continue
            for sub in subsets:
                sentences.update(sub.sent1)
                sentences.update(sub.sent2)
    return sentences
