"""The ``sempa`` Prefect flow: prepare → sample → rank → publish → train → evaluate, as dependent tasks.

    prefect deployment run sempa/full        # the whole pipeline (deployments in flows.yaml)
    prefect deployment run sempa/refresh     # prepare + sample + rank → a new dataset version
    prefect deployment run sempa/evaluate -p model=smollm2-135m-instruct -p adapter=PATH

Run it without a server: ``python -m pipelines.flows`` (the built-in defaults).

Parameters: ``stages`` (which stages run), ``config`` (a YAML run config: sections prepare, sample,
rank, train, eval, embed, retention, gates, cluster), ``preset`` (train preset), one override mapping
per section, ``model`` (the policy everywhere), ``adapter`` (for evaluate-only runs), ``dataset``
(name of the versioned dataset) and ``root`` (the store folder, relative to the working directory).
The library validates them before any stage runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.runtime import flow_run

from pipelines.tasks import evaluate_task, prepare_task, rank_task, sample_task, train_task
from sempa_train.io import file_sha256
from sempa_train.store import Store, content_key, dataset_hash
from sempa_train.workflow import RunConfig

Stage = Literal["prepare", "sample", "rank", "train", "evaluate"]
ALL_STAGES: list[Stage] = ["prepare", "sample", "rank", "train", "evaluate"]


def _cached(task: Any, out: Path) -> Any:
    """The task, told to recompute when its output folder is missing (so a cache hit never points at nothing)."""
    return task.with_options(refresh_cache=not out.exists())


@flow(name="sempa", log_prints=True)
def sempa(
    stages: list[Stage] = ALL_STAGES,  # noqa: B006 - Prefect parameters are copied per run
    config: str | None = None,
    preset: Literal["cpu", "paper"] = "cpu",
    prepare: dict[str, Any] | None = None,
    sample: dict[str, Any] | None = None,
    rank: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    eval: dict[str, Any] | None = None,
    embed: dict[str, Any] | None = None,
    retention: dict[str, Any] | None = None,
    gates: dict[str, Any] | None = None,
    cluster: dict[str, Any] | None = None,
    model: str | None = None,
    adapter: str | None = None,
    dataset: str = "default",
    root: str = "outputs/pipeline",
) -> dict[str, Any]:
    """Run the selected stages; returns the paths it produced (and the STS summary when it evaluated)."""
    log = get_run_logger()
    overrides = {name: value for name, value in
                 {"prepare": prepare, "sample": sample, "rank": rank, "train": train, "eval": eval,
                  "embed": embed, "retention": retention, "gates": gates, "cluster": cluster}.items() if value}
    cfg = RunConfig.build(config, preset=preset, overrides=overrides, model=model)
    store = Store(root)
    outputs: dict[str, Any] = {"run_config": cfg.to_dict()}
    data_stages = [s for s in ("prepare", "sample", "rank") if s in stages]
    if data_stages and data_stages != ["prepare", "sample", "rank"][: len(data_stages)]:
        raise ValueError(f"stages {data_stages}: the data stages run as a prefix of prepare, sample, rank")

    preferences: Path | None = None
    if "prepare" in stages:
        source = Path(cfg.prepare.source)
        key = content_key("prepare", cfg.prepare.to_dict(),
                          {"source": file_sha256(source) if source.is_file() else cfg.prepare.source})
        out = store.stage_dir("prepare", key)
        prepared = Path(_cached(prepare_task, out)(cfg.prepare, str(out), key))
        outputs["triples"] = str(prepared / "triples")
        preferences = prepared / "preferences"
        parts = {"triples": prepared / "triples", "preferences": preferences}
        if "sample" in stages and cfg.rank.strategy != "gold":
            triples = prepared / "triples"
            key = content_key("sample", cfg.sample.to_dict(), {"triples": dataset_hash(triples)})
            out = store.stage_dir("sample", key)
            candidates = Path(_cached(sample_task, out)(cfg.sample, str(triples), str(out), key, cfg.cluster))
            parts["candidates"] = candidates
        if "rank" in stages:
            inputs = {name: dataset_hash(parts[name]) for name in ("triples", "candidates") if name in parts}
            key = content_key("rank", cfg.rank.to_dict(), inputs)
            out = store.stage_dir("rank", key)
            preferences = Path(_cached(rank_task, out)(cfg.rank, str(parts["triples"]),
                                                       str(parts["candidates"]) if "candidates" in parts else None,
                                                       str(out), key))
            parts["preferences"] = preferences
        version = store.publish(dataset, parts, {
            "config": cfg.to_dict(), "stages": data_stages,
            "flow_run": {"id": str(flow_run.get_id()), "name": flow_run.get_name()},
        })
        preferences = version / "preferences"
        outputs.update(dataset_version=str(version), preferences=str(preferences))
        log.info("published dataset %s %s", dataset, version.name)

    tuned_adapter = adapter
    if "train" in stages:
        if preferences is None:
            preferences = store.latest(dataset) / "preferences"
        key = content_key("train", cfg.train.to_dict(), {"data": dataset_hash(preferences)})
        out = store.root / "models" / f"{dataset}-{key}"  # same data and config: the same model, not retrained
        trained = Path(_cached(train_task, out)(cfg.train, str(preferences), str(out), key))
        tuned_adapter = str(trained / "adapter")
        outputs["model_dir"] = str(trained)

    if "evaluate" in stages:
        policy = model or cfg.train.model
        adapter_hash = {"adapter": file_sha256(Path(tuned_adapter) / "adapter_model.safetensors")} if tuned_adapter \
            else {}
        key = content_key("evaluate", {"model": policy, **{s: getattr(cfg, s).to_dict()
                                                          for s in ("eval", "embed", "retention", "gates")}},
                          adapter_hash)
        eval_dir = store.root / "eval" / key
        inputs = {k: v for k, v in {"preferences": str(preferences) if preferences else None,
                                    "train_log": str(Path(outputs["model_dir"]) / "train_log.jsonl")
                                    if "model_dir" in outputs else None}.items() if v}
        summary = evaluate_task(policy, tuned_adapter, cfg, str(eval_dir), inputs)
        outputs.update(eval_dir=str(eval_dir), report=str(eval_dir / "report.md"), sts=summary["sts"])
        print(summary["sts"]["table"])

    files = {k: v for k, v in outputs.items() if isinstance(v, str)}
    create_markdown_artifact(
        key="outputs", description="where this run's files are",
        markdown="## Outputs\n\n" + "\n".join(f"- **{k}**: [`{v}`]({Path(v).resolve().as_uri()})"
                                              for k, v in files.items()) + "\n",
    )
    for name in ("report", "dataset_version"):
        if name in files:
            create_link_artifact(link=Path(files[name]).resolve().as_uri(), link_text=name.replace("_", " "))
    return outputs


if __name__ == "__main__":
    sempa()
