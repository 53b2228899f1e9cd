"""The ``sempa`` Prefect flow: the library's stage plan with one task per stage.

    prefect deployment run sempa/full        # the whole pipeline (deployments in flows.yaml)
    prefect deployment run sempa/refresh     # prepare + sample + rank → a new dataset version
    prefect deployment run sempa/evaluate -p model=smollm2-135m-instruct -p adapter=PATH
    prefect deployment run sempa/embed -p source=corpus.txt -p adapter=PATH   # an embedded corpus
    prefect deployment run sempa-experiment/sweep -p config=sempa_train/configs/experiments/FILE.yaml

Run it without a server: ``python -m pipelines.flows`` (the built-in defaults).

Parameters: ``stages`` (which stages run), ``config`` (a YAML run config: sections policy, prepare,
sample, rank, train, eval, embed, retention, gates, cluster), ``preset`` (train preset), one override
mapping per section, ``model`` (the policy's model), ``adapter`` (for evaluate- or embed-only runs),
``source`` (a corpus file to embed: sets ``corpus.source``, which turns the embed stage on), ``seed`` (one
seed for prepare, sample, rank and train; ``per-run`` derives it from the flow run's id, so each scheduled
refresh draws new premises and samples: the seed is in the dataset version's manifest), ``dataset``
(name of the versioned dataset) and ``root`` (the store folder, relative to the working directory).
A dataset version is published once per distinct content: a run resumed after a crash reuses it.
The library validates them before any stage runs, and every parameter or config field that names a
local path must lie under the worker's allowed folders (``SEMPA_ALLOWED_PATHS``; by default the
working directory and ``../shared``). The stage sequence, the content keys and the
folder layout are the library's (``sempa_train.plan``); this module only says how a step runs.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Literal

from prefect import flow
from prefect.runtime import flow_run

from pipelines.tasks import outputs_artifact, published, run_in_prefect
from sempa_train.core.io import read_json
from sempa_train.core.store import Store
from sempa_train.plan import DATA_STAGES, STAGE_NAMES, RunConfig, execute

Stage = Literal[STAGE_NAMES]  # type: ignore[valid-type] - the plan's stage names, for Prefect's parameter schema


SEEDED = ("prepare", "sample", "rank", "train")  # the config sections with a seed


def run_seed() -> int:
    """A seed of this flow run (from its id; random outside a run): each run of a schedule gets another."""
    run_id = flow_run.get_id()
    return int(uuid.UUID(str(run_id)).hex[:7], 16) if run_id else int.from_bytes(os.urandom(3), "big")


def allowed_roots() -> list[Path] | None:
    """Where a flow run may read and write: ``$SEMPA_ALLOWED_PATHS`` (folders separated by ``:``; ``*``: anywhere),
    else the working directory (the project, where the worker runs) and ``../shared`` beside it."""
    value = os.environ.get("SEMPA_ALLOWED_PATHS")
    if value == "*":
        return None
    folders = value.split(":") if value else [".", "../shared"]
    return [Path(folder).expanduser().resolve() for folder in folders if folder]


def check_allowed_paths(paths: dict[str, Path]) -> None:
    """Refuse, before any stage runs, a parameter that names a path outside ``allowed_roots()``: on a shared server
    another user's run must not read or write the worker's other files."""
    roots = allowed_roots()
    if roots is None:
        return
    for name, path in paths.items():
        resolved = path.expanduser().resolve()
        if not any(resolved.is_relative_to(root) for root in roots):
            raise ValueError(f"{name} = {path} lies outside the folders this worker may use "
                             f"({', '.join(map(str, roots))}); set SEMPA_ALLOWED_PATHS on the worker to allow it")


@flow(name="sempa", log_prints=True)
def sempa(
    stages: list[Stage] = list(STAGE_NAMES),  # noqa: B006, B008 - Prefect copies parameters per run
    config: str | None = None,
    preset: Literal["cpu", "paper"] = "cpu",
    policy: dict[str, Any] | None = None,
    prepare: dict[str, Any] | None = None,
    sample: dict[str, Any] | None = None,
    rank: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    eval: dict[str, Any] | None = None,
    embed: dict[str, Any] | None = None,
    retention: dict[str, Any] | None = None,
    gates: dict[str, Any] | None = None,
    cluster: dict[str, Any] | None = None,
    corpus: dict[str, Any] | None = None,
    model: str | None = None,
    adapter: str | None = None,
    source: str | None = None,
    seed: int | Literal["per-run"] | None = None,
    dataset: str = "default",
    root: str = "outputs/pipeline",
) -> dict[str, Any]:
    """Run the selected stages; returns the paths it produced (and the STS summary when it evaluated)."""
    sections = {"policy": policy, "prepare": prepare, "sample": sample, "rank": rank, "train": train, "eval": eval,
                "embed": embed, "retention": retention, "gates": gates, "cluster": cluster,
                "corpus": {**(corpus or {}), **({"source": source} if source else {})}}
    if seed is not None:
        value = run_seed() if seed == "per-run" else seed
        print(f"seed {value}" + (" (from the flow run's id)" if seed == "per-run" else ""))
        sections.update({name: {**(sections[name] or {}), "seed": value} for name in SEEDED})
    cfg = RunConfig.build(config, preset=preset, overrides={k: v for k, v in sections.items() if v}, model=model)
    check_allowed_paths({**cfg.local_paths(), "root": Path(root), **({"adapter": Path(adapter)} if adapter else {}),
                         **({"config": Path(config)} if config else {})})
    store = Store(root)
    store.dataset_dir(dataset)  # a bad dataset name fails here, before any stage runs
    given = {"adapter": Path(adapter)} if adapter else {}
    if "train" in stages and not set(stages) & set(DATA_STAGES):
        given["preferences"] = store.latest(dataset) / "preferences"  # train on the newest published version
    run = execute(cfg, store, stages=stages, given=given, runner=run_in_prefect,
                  after_data=published(root, dataset, cfg))
    outputs: dict[str, Any] = {"run_config": cfg.to_dict(), **{
        name: str(run.artifacts[artifact]) for name, artifact in
        (("triples", "triples"), ("dataset_version", "dataset_version"), ("preferences", "preferences"),
         ("model_dir", "model"), ("eval_dir", "evaluation"), ("embeddings", "embeddings"))
        if artifact in run.artifacts}}
    if "eval_dir" in outputs:
        outputs.update(report=str(Path(outputs["eval_dir"]) / "report.md"),
                       sts=read_json(Path(outputs["eval_dir"]) / "summary.json")["sts"])
        print(outputs["sts"]["table"])
    outputs_artifact({k: v for k, v in outputs.items() if isinstance(v, str)})
    return outputs


@flow(name="sempa-experiment", log_prints=True)
def experiment(config: str, results_only: bool = False) -> dict[str, Any]:
    """Run (or resume) an experiment or sweep YAML (``sempa experiment``'s format): every arm is the stage plan
    with one task per stage, so arms share the stages whose keys are equal and a stopped sweep resumes."""
    from sempa_train.experiment import results_table, run_experiment

    results = run_experiment(Path(config), run=not results_only, runner=run_in_prefect)
    print(results_table(results))
    return {"rows": results["rows"], "missing": results["missing"], "failed": results["failed"]}


if __name__ == "__main__":
    sempa()
