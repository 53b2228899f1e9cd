"""The pipeline's one stage plan, and the executor every runner goes through.

    prepare ──triples──► sample ──candidates──► rank ──preferences──► train ──adapter, train_log──► evaluate
       └────triples, gold preferences────────────┘ (sample only when the strategy samples)      │
                                                            corpus file ──► embed ◄──adapter────┘
                                                                         (only when corpus.source is set)

Each ``Stage`` is declared once, below: its name, the config sections it reads, the artifacts it
needs (``inputs``) or may use (``optional``; the evaluation's report shows the preferences and the
training log when it has them), what it produces, and the library function that writes its folder.
Its *content key* hashes those config sections and the content hashes of its inputs (files the config
names, like the corpus to embed, are inputs too: their content is hashed), so two runs with equal inputs
land in the same folder, ``Store.stage_dir(stage, key)``. The evaluate stage keeps the adapter it
evaluated (scaled when ``eval.adapter_scale`` says so) with its model card in ``eval/adapter``; later
stages (embed) use that adapter.

``execute`` walks the plan for one ``RunConfig``: it skips stages the config does not need (``sample``
for the gold strategy), resolves each stage's inputs from earlier outputs or ``given`` artifacts,
computes the key and hands a ``Step`` to a runner. The three runners differ only in that callable:
``sempa run`` and ``sempa experiment`` call ``run_step`` in process; the Prefect flow wraps it in a task
whose cache key is the step's key (``pipelines/``). A step whose folder is complete is reused, so a
stopped run resumes at the first missing output and experiment arms share their common stages.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sempa_train.core.config import (
    ClusterConfig,
    CorpusConfig,
    EmbedConfig,
    EvalConfig,
    GateConfig,
    PolicyConfig,
    PrepareConfig,
    RankConfig,
    RetentionConfig,
    SampleConfig,
    TrainConfig,
)
from sempa_train.core.errors import RecordedFailure
from sempa_train.core.io import read_config_file, read_json, write_json
from sempa_train.core.models import adapter_sha256
from sempa_train.core.store import Store, content_key, dataset_hash

log = logging.getLogger(__name__)

SECTIONS = ("policy", "prepare", "sample", "rank", "train", "eval", "embed", "retention", "gates", "cluster",
            "corpus")
# The stage fields that the policy section owns in a run config (RunConfig.build fills them in).
POLICY_FIELDS: dict[str, tuple[str, ...]] = {
    "sample": ("model", "template", "chat_template"),
    "rank": ("model", "template", "chat_template"),
    "train": ("model", "chat_template"),
    "retention": ("chat_template",),
}


# Fields that may name local files or folders (checked by RunConfig.local_paths).
PATH_FIELDS: dict[str, tuple[str, ...]] = {
    "policy": ("model",),
    "prepare": ("source",),
    "rank": ("contamination_dir", "scorer_model", "judge"),
    "train": ("eval_senteval_dir", "eval_text_file"),
    "eval": ("senteval_dir",),
    "retention": ("text_file",),
    "corpus": ("source",),
    "cluster": ("tls_ca_file", "tls_cert", "tls_key"),
}


@dataclass(frozen=True)
class RunConfig:
    """The configs of every stage of a run; a YAML file has one section per stage (``SECTIONS``; ``train``
    may name a ``preset``) and a ``policy`` section (model, template, chat template) that ``build`` hands to
    every stage that runs the policy or writes its prompts (``POLICY_FIELDS``)."""

    policy: PolicyConfig = field(default_factory=PolicyConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    rank: RankConfig = field(default_factory=lambda: RankConfig(strategy="gold"))
    train: TrainConfig = field(default_factory=lambda: TrainConfig.preset("cpu"))
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(tasks=("STSBenchmark",), split="dev"))
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    gates: GateConfig = field(default_factory=GateConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)

    @classmethod
    def build(
        cls,
        config_file: Path | str | None = None,
        *,
        preset: str | None = None,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
        model: str | None = None,
    ) -> RunConfig:
        """Defaults, then the YAML file, then the train ``preset``, then per-section ``overrides``; ``model``
        sets the policy's model. The policy's fields are then given to the stages (``POLICY_FIELDS``; the policy
        scorer too); a stage section that sets one of them is refused."""
        values: dict[str, Any] = {}
        where = "overrides"
        if config_file is not None:
            values = read_config_file(config_file, "a run config must be a mapping of sections")
            where = str(config_file)
        unknown = sorted(set(values) - set(SECTIONS)) + sorted(set(overrides or {}) - set(SECTIONS))
        if unknown:
            raise ValueError(f"{where}: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
        merged = merge_sections(values, overrides or {})
        default = cls()
        train_preset = merged["train"].pop("preset", None) or preset
        for section, names in POLICY_FIELDS.items():
            owned = sorted(set(merged[section]) & set(names))
            if owned:
                raise ValueError(f"{where}: {', '.join(f'{section}.{n}' for n in owned)}: the policy's "
                                 f"{', '.join(owned)} is set once, in the policy section (or with --model)")
        if model is not None:
            merged["policy"]["model"] = model
        origin = " with overrides" if config_file is not None and any((overrides or {}).values()) else ""

        def build_section(name: str, config: Any, base: Any = None) -> Any:
            """One section's config (``base``: a config, or a function that makes one, so that an unknown preset
            is reported like a bad field); an error names the file (and overrides) and the section."""
            try:
                return config.from_dict(merged[name], base=base() if callable(base) else base)
            except ValueError as e:
                raise ValueError(f"{where}{origin}: {name}: {e}") from e

        policy = build_section("policy", PolicyConfig)
        for name, fields in POLICY_FIELDS.items():
            merged[name].update({field: getattr(policy, field) for field in fields})
        built = cls(
            policy=policy,
            prepare=build_section("prepare", PrepareConfig),
            sample=build_section("sample", SampleConfig),
            rank=build_section("rank", RankConfig, default.rank),
            train=build_section("train", TrainConfig,
                                lambda: TrainConfig.preset(train_preset) if train_preset else default.train),
            eval=build_section("eval", EvalConfig, default.eval),
            embed=build_section("embed", EmbedConfig),
            retention=build_section("retention", RetentionConfig),
            gates=build_section("gates", GateConfig),
            cluster=build_section("cluster", ClusterConfig),
            corpus=build_section("corpus", CorpusConfig),
        )
        if built.rank.scorer == "policy" and built.rank.scorer_model is None:
            built = replace(built, rank=built.rank.replace(scorer_model=policy.model))
        return built

    @property
    def policy_model(self) -> str:
        """The model that is trained and evaluated."""
        return self.policy.model

    def to_dict(self) -> dict[str, Any]:
        return {section: getattr(self, section).to_dict() for section in SECTIONS}

    def local_paths(self) -> dict[str, Path]:
        """Every field that names a local file or folder (``SECTION.FIELD`` → path): what a runner that serves other
        users checks before it reads or writes anything. Model names and Hub ids are not paths unless they exist
        here or start with ``/``, ``.`` or ``~``."""
        out: dict[str, Path] = {}
        for section, names in PATH_FIELDS.items():
            for name in names:
                value = getattr(getattr(self, section), name)
                if value and (Path(str(value)).expanduser().exists() or str(value).startswith(("/", ".", "~"))):
                    out[f"{section}.{name}"] = Path(str(value)).expanduser()
        return out


def merge_sections(*layers: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Section-wise merge of config layers (later layers win field by field)."""
    merged: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for layer in layers:
        for section in SECTIONS:
            merged[section].update(layer.get(section) or {})
    return merged


# --- the stages -------------------------------------------------------------------------------------------------

StageFn = Callable[..., None]


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline, declared once."""

    name: str
    sections: tuple[str, ...]  # config sections hashed into the key
    produces: Mapping[str, str]  # artifact -> path inside the stage folder ("" is the folder itself)
    run: StageFn  # run(cfg, inputs, out, **extras): writes the folder ``out`` (atomically)
    inputs: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    needed: Callable[[RunConfig], bool] = lambda cfg: True
    required_if: Callable[[RunConfig], tuple[str, ...]] = lambda cfg: ()  # optional inputs the config makes required
    files: Callable[[RunConfig], Mapping[str, str | None]] = lambda cfg: {}  # inputs that are files the config names
    done_file: str | None = None  # the stage is complete when this file exists (default: when its folder does)
    heavy: bool = False  # loads a model: runners may isolate it in a subprocess
    retries: int = 0  # transient failures worth a retry (reading sources, writing datasets)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled by name (a spawned process or a Prefect result looks the declaration up again)."""
        return stage, (self.name,)

    def key(self, cfg: RunConfig, inputs: Mapping[str, Path]) -> str:
        config = {section: getattr(cfg, section).to_dict() for section in self.sections}
        hashed = {name: artifact_hash(name, inputs[name]) for name in (*self.inputs, *self.optional)
                  if name in inputs}
        return content_key(self.name, config, hashed)


def artifact_hash(name: str, path: Path) -> str:
    """The content hash of an artifact: a dataset's data hash, an adapter's weights, a file's bytes."""
    path = Path(path)
    if name == "adapter":
        return str(adapter_sha256(path))
    return dataset_hash(path)


def _prepare(cfg: RunConfig, inputs: Mapping[str, Path], out: Path) -> None:
    from sempa_train.stages.prepare import prepare

    prepare(cfg.prepare, out, overwrite=True)


def _sample(cfg: RunConfig, inputs: Mapping[str, Path], out: Path, *, shard_runner: Any = None,
            show_progress: bool | None = None) -> None:
    from sempa_train.stages.sampling import sample_candidates

    sample_candidates(cfg.sample, inputs["triples"], out, shard_runner=shard_runner, show_progress=show_progress)


def _rank(cfg: RunConfig, inputs: Mapping[str, Path], out: Path) -> None:
    from sempa_train.stages.ranking import rank

    rank(cfg.rank, out, triples=inputs["triples"], candidates=inputs.get("candidates"), overwrite=True)


def _train(cfg: RunConfig, inputs: Mapping[str, Path], out: Path) -> None:
    from sempa_train.stages.train import train_dpo

    train_dpo(cfg.train, inputs["preferences"], out, overwrite=True)


def _evaluate(cfg: RunConfig, inputs: Mapping[str, Path], out: Path) -> None:
    from sempa_train.stages.assessment import assess
    from sempa_train.stages.checkpoints import write_scaled_adapter
    from sempa_train.stages.model_card import write_model_card

    adapter = inputs.get("adapter")
    if adapter is not None:  # the evaluated adapter (scaled by eval.adapter_scale) is kept with its card
        adapter = write_scaled_adapter(adapter, out / "adapter", cfg.eval.adapter_scale)
    try:
        assess(cfg.policy_model, adapter, out, eval_cfg=cfg.eval, embed=cfg.embed,
               retention=cfg.retention, gates=cfg.gates,
               inputs={name: str(inputs[name]) for name in ("preferences", "train_log", "adapter") if name in inputs})
    finally:  # a card with the results, also when a gate failed
        if adapter is not None and (out / "summary.json").is_file():
            write_model_card(adapter, inputs["adapter"].parent, evaluation=out, scale=cfg.eval.adapter_scale,
                             base_model=cfg.policy_model)


def _embed(cfg: RunConfig, inputs: Mapping[str, Path], out: Path, *, shard_runner: Any = None,
           show_progress: bool | None = None) -> None:
    from sempa_train.stages.corpus import embed_corpus

    embed_corpus(inputs["corpus"], out, model=cfg.policy_model, adapter=inputs.get("adapter"), embed=cfg.embed,
                 corpus=cfg.corpus, shard_runner=shard_runner, show_progress=show_progress)


STAGES: tuple[Stage, ...] = (
    Stage("prepare", ("prepare",), {"triples": "triples", "preferences": "preferences"}, _prepare, retries=2),
    Stage("sample", ("sample",), {"candidates": ""}, _sample, inputs=("triples",),
          needed=lambda cfg: cfg.rank.strategy != "gold", heavy=True, retries=1),
    Stage("rank", ("rank",), {"preferences": ""}, _rank, inputs=("triples",), optional=("candidates",),
          required_if=lambda cfg: ("candidates",) if cfg.rank.strategy != "gold" else (), heavy=True, retries=2),
    Stage("train", ("train",), {"model": "", "adapter": "adapter", "train_log": "train_log.jsonl"}, _train,
          inputs=("preferences",), heavy=True),
    Stage("evaluate", ("policy", "eval", "embed", "retention", "gates"), {"evaluation": "", "adapter": "adapter"},
          _evaluate, optional=("adapter", "preferences", "train_log"), done_file="summary.json", heavy=True),
    Stage("embed", ("policy", "embed", "corpus"), {"embeddings": ""}, _embed, inputs=("corpus",),
          optional=("adapter",), needed=lambda cfg: cfg.corpus.source is not None,
          files=lambda cfg: {"corpus": cfg.corpus.source}, heavy=True),
)
STAGE_NAMES: tuple[str, ...] = tuple(stage.name for stage in STAGES)
# Readable names of the runners' links to a run's stage folders (``sempa run`` OUT/, an experiment's OUT/ARM/).
OUTPUT_LINKS = {"prepare": "data", "sample": "candidates", "rank": "preferences", "train": "model",
                "evaluate": "eval", "embed": "embeddings"}
DATA_STAGES: tuple[str, ...] = ("prepare", "sample", "rank")  # their outputs make up a dataset version


def stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise ValueError(f"unknown stage {name!r}; known: {', '.join(STAGE_NAMES)}")


# --- the executor -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One stage of one run: what a runner needs to run (or reuse) it."""

    stage: Stage
    cfg: RunConfig
    inputs: Mapping[str, Path]
    out: Path
    key: str

    @property
    def done(self) -> bool:
        return (self.out / self.stage.done_file).is_file() if self.stage.done_file else self.out.is_dir()

    @property
    def failure_file(self) -> Path:
        """Where a ``RecordedFailure`` of this step is kept, so that a resumed run does not repeat it."""
        return self.out.parent / f"{self.out.name}.failed.json"


Runner = Callable[[Step], None]


def raise_recorded(step: Step) -> None:
    """Raise the ``RecordedFailure`` an earlier run of ``step`` wrote down, if any."""
    if step.failure_file.is_file():
        raise RecordedFailure(f"{read_json(step.failure_file)['error']} (recorded in {step.failure_file}; delete "
                              "it to try again)")


def run_step(step: Step, **extras: Any) -> None:
    """Run a step in this process unless its output is complete; a ``RecordedFailure`` is written down and raised
    again, without running, by later calls."""
    raise_recorded(step)
    if step.done:
        check_reused(step)
        return
    try:
        step.stage.run(step.cfg, step.inputs, step.out, **extras)
    except RecordedFailure as e:
        write_json(step.failure_file, {"stage": step.stage.name, "key": step.key, "error": str(e)})
        raise


def check_reused(step: Step) -> None:
    """A reused evaluation whose gates failed fails again (a gate is a verdict, not a cache miss)."""
    if step.stage.name == "evaluate":
        from sempa_train.stages.assessment import GateError

        gates = read_json(step.out / "summary.json").get("gates", {})
        if not gates.get("passed", True):
            raise GateError("quality gate failed: " + "; ".join(gates.get("failures", []))
                            + f" (report: {step.out / 'report.md'})")


@dataclass
class Execution:
    """What ``execute`` produced: artifact paths, and per stage its key, folder, seconds and whether it was reused."""

    artifacts: dict[str, Path] = field(default_factory=dict)
    steps: dict[str, Step] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    reused: dict[str, bool] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # with run=False: stages whose output does not exist yet


def plan_stages(cfg: RunConfig, stages: Sequence[str], given: Mapping[str, Path] = ()) -> list[Stage]:
    """The stages of ``stages`` that ``cfg`` needs, in plan order; fails before anything runs when one of them
    needs an artifact that no earlier selected stage produces and that is not ``given``."""
    unknown = sorted(set(stages) - set(STAGE_NAMES))
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}; known: {', '.join(STAGE_NAMES)}")
    selected = [s for s in STAGES if s.name in stages and s.needed(cfg)]
    available = set(given)
    for s in selected:
        available |= {name for name, path in s.files(cfg).items() if path}
        missing = [name for name in (*s.inputs, *s.required_if(cfg)) if name not in available]
        if missing:
            raise ValueError(f"stage {s.name} needs {', '.join(missing)}: select the stage that produces it "
                             f"({', '.join(_producer(m) for m in missing)}) or give it")
        available |= set(s.produces)
    return selected


def _producer(artifact: str) -> str:
    return next((s.name for s in STAGES if artifact in s.produces), "?")


def execute(cfg: RunConfig, store: Store, *, stages: Sequence[str] = STAGE_NAMES,
            given: Mapping[str, Path] | None = None, runner: Runner = run_step, run: bool = True,
            after_data: Callable[[dict[str, Path]], Mapping[str, Path]] | None = None,
            record: Execution | None = None) -> Execution:
    """Run (or reuse) the selected stages of the plan for ``cfg`` with outputs under ``store``.

    ``given`` artifacts stand in for stages that are not run (an adapter to evaluate, a published
    dataset to train on). ``after_data`` is called once after the data stages with the artifacts so far
    and may replace some (the Prefect flow publishes a dataset version there). ``run=False`` runs nothing:
    it resolves the outputs that already exist and lists the first missing stage in ``missing``. ``record``
    (returned) is filled in as the stages go, so a caller still has the timings of a run that raised."""
    given = {name: Path(path) for name, path in (given or {}).items()}
    selected = plan_stages(cfg, stages, given)
    result = record if record is not None else Execution()
    result.artifacts.update(given)
    for position, s in enumerate(selected):
        result.artifacts.update({name: Path(path) for name, path in s.files(cfg).items() if path})
        inputs = {name: result.artifacts[name] for name in (*s.inputs, *s.optional)
                  if name in result.artifacts}
        key = s.key(cfg, inputs)
        step = Step(s, cfg, inputs, store.stage_dir(s.name, key), key)
        result.steps[s.name] = step
        if not run:
            raise_recorded(step)
        if not run and not step.done:
            result.missing = [t.name for t in selected[position:]]
            return result
        reused = step.done or step.failure_file.is_file()  # a recorded failure is reported, not repeated
        started = time.perf_counter()
        try:
            if run:
                runner(step)
        finally:
            result.seconds[s.name] = round(time.perf_counter() - started, 1)
            result.reused[s.name] = reused
        log.info("plan: %s %s (%s)", s.name, "reused" if reused else f"ran in {result.seconds[s.name]:.0f}s",
                 step.out)
        produced = {name: step.out / sub if sub else step.out for name, sub in s.produces.items()}
        result.artifacts.update({name: path for name, path in produced.items() if path.exists()})
        if after_data is not None and s.name in DATA_STAGES and not any(t.name in DATA_STAGES
                                                                        for t in selected[position + 1:]):
            result.artifacts.update(after_data(dict(result.artifacts)))
    return result


def link_outputs(run: Execution, folder: Path) -> None:
    """Links ``folder/<OUTPUT_LINKS[stage]>`` to the complete stage folders of ``run``."""
    for name, step in run.steps.items():
        if step.done:
            replace_link(folder / OUTPUT_LINKS[name], step.out)


def replace_link(link: Path, target: Path) -> None:
    """Point the symlink ``link`` at ``target`` (a relative link), replacing an older link."""
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.parent / f".{link.name}.link"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(os.path.relpath(target, link.parent))
    if link.is_dir() and not link.is_symlink():
        raise FileExistsError(f"{link} is a folder, not a link to a stage output; move it away or pass --overwrite")
    tmp.replace(link)
