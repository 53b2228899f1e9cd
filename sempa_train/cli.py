"""The ``sempa`` command: one console script, one subcommand per stage.

    sempa run --senteval-dir ../shared/data/senteval          # the whole method on the built-in sample
    sempa prepare --source nli.jsonl --out outputs/data/snli  # NLI → triples + gold preferences
    sempa inspect outputs/data/snli/preferences               # polars summary of a dataset
    sempa sample --triples outputs/data/snli/triples --out outputs/data/snli/candidates
    sempa rank --triples outputs/data/snli/triples --candidates outputs/data/snli/candidates \
        --strategy sampled --out outputs/data/snli/sampled
    sempa train --data outputs/data/snli/preferences --out outputs/models/snli --preset cpu
    sempa eval --model smollm2-135m-instruct --adapter outputs/models/snli/adapter \\
        --senteval-dir ../shared/data/senteval --tasks STSBenchmark --split dev --out eval.json

``sempa SUBCOMMAND --help`` lists every option with its default.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sempa_train.core.config import (
    C,
    CorpusConfig,
    EmbedConfig,
    EvalConfig,
    PrepareConfig,
    RankConfig,
    SampleConfig,
    TrainConfig,
    add_arguments,
    config_from_args,
)

log = logging.getLogger("sempa")

# The default of `sempa run`: the recipe at the budget that finishes in about 15 minutes on 2 cores.
RECIPE = Path(__file__).resolve().parent / "configs" / "recipe_smollm2_quick.yaml"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show library logs too, and the traceback of an error")


def _stage_parser(sub: Any, name: str, cls: type, *, help: str, description: str,
                  inputs: dict[str, tuple[bool, str]] | None = None, out: str = "output folder") -> Any:
    """A stage's subcommand: its input folders (flag → (required, help)), --out, --config, one flag per config
    field, --overwrite and -v."""
    p = sub.add_parser(name, help=help, description=description)
    for flag, (required, text) in (inputs or {}).items():
        p.add_argument(f"--{flag}", type=Path, required=required, help=text)
    p.add_argument("--out", type=Path, required=True, help=out)
    p.add_argument("--config", type=Path, help=f"YAML/JSON file of {cls.__name__} fields")
    add_arguments(p, cls)
    _common(p)
    return p


def build_parser(extend: Callable[[Any], None] | None = None) -> argparse.ArgumentParser:
    """The ``sempa`` parser; ``extend(subparsers)`` may add subcommands."""
    parser = argparse.ArgumentParser(
        prog="sempa", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="the whole plan in this process: prepare, (sample,) rank, train, evaluate",
                       description="Run the pipeline's stage plan end to end on one machine. Default: the recipe "
                       f"at its 15-minute budget, {RECIPE.name} (SmolLM2-135M-Instruct on 400 SNLI-dev premises from "
                       "../shared/data, half its own paraphrases, half gold pairs, 50 DPO+SFT steps; see the file); "
                       "--config sempa_train/configs/recipe_smollm2.yaml is the full budget (1,000 premises, 125 "
                       "steps, about 30 minutes). Outputs go to --out (default outputs/run-<time>); running again with "
                       "the same --out reuses every finished stage.")
    run_flags: dict[str, dict[str, Any]] = {
        "--config": {"type": Path, "default": RECIPE,
                     "help": f"YAML run config (sections policy, prepare, sample, rank, train, eval, ...; default "
                             f"{RECIPE.relative_to(RECIPE.parents[2])})"},
        "--out": {"type": Path, "help": "output folder (default: outputs/run-<UTC time>)"},
        "--source": {"help": "NLI source (overrides the config)"},
        "--model": {"help": "policy model (overrides the config)"},
        "--preset": {"choices": ("cpu", "paper"), "help": "train preset (overrides the config)"},
        "--max-steps": {"type": int, "help": "stop training after N steps"},
        "--senteval-dir": {"help": "SentEval data folder for STS-B dev (default: the Hub, online only)"},
        "--tasks": {"help": "comma-separated STS tasks (default STSBenchmark)"},
        "--split": {"choices": ("dev", "test"), "help": "STS-B / SICK split (default dev)"},
        "--set": {"action": "append", "default": [], "metavar": "SECTION.FIELD=VALUE",
                  "help": "override one config field, value in YAML (repeatable), e.g. --set eval.adapter_scale=0.8"},
        "--stages": {"help": "comma-separated stages to run (default: all the config needs), e.g. evaluate"},
        "--adapter": {"type": Path, "help": "LoRA adapter folder to evaluate (with --stages evaluate)"},
    }
    for flag, kwargs in run_flags.items():
        p.add_argument(flag, **kwargs)
    _common(p)

    _stage_parser(sub, "prepare", PrepareConfig, help="NLI source → triples and gold preference datasets",
                  description="Read NLI pairs, group them by premise into (premise, entailment, contradiction) "
                  "triples, and build the paper's gold preference dataset. Writes OUT/triples and OUT/preferences "
                  "(Parquet + dataset card + manifest).")

    _stage_parser(sub, "sample", SampleConfig,
                  help="n paraphrase candidates per premise from the policy (vLLM or transformers)",
                  description="Sample paraphrase candidates for every premise of a triples dataset, in resumable "
                  "shards (a re-run skips finished shards). Backend auto: vLLM on a GPU or a CPU with AVX-512, "
                  "else transformers (the log says why). Writes a candidates dataset folder.",
                  inputs={"triples": (True, "triples dataset folder (from sempa prepare)")})

    _stage_parser(sub, "rank", RankConfig, help="candidates + triples → scored, filtered preference triples",
                  description="Build preference triples with a strategy (gold, sampled, hybrid) and a scorer "
                  "(embedding, policy, nli), filtering copies, empty/truncated candidates, length ratios, "
                  "duplicates, low margins and evaluation-set sentences; every drop is counted in the dataset card.",
                  inputs={"triples": (False, "triples dataset folder (gold pairs, contradictions)"),
                          "candidates": (False, "candidates dataset folder (from sempa sample)")})

    p = sub.add_parser("experiment", help="compare arms (preference strategies, objectives, ...) under one budget",
                       description="Run (or resume) an experiment: shared data preparation and sampling, then per "
                       "arm ranking, DPO training and evaluation against the untuned baseline. Writes "
                       "OUT/results.json, OUT/results.md and OUT/pareto.png.")
    p.add_argument("config", type=Path, help="experiment YAML (see sempa_train/configs/experiments/)")
    p.add_argument("--results-only", action="store_true",
                   help="run nothing: write the results table of the arms evaluated so far (of a stopped run)")
    p.add_argument("-v", "--verbose", action="store_true", help="show library logs too, and the traceback of an error")

    p = sub.add_parser("report", help="rebuild report.md and its plots from an evaluation folder",
                       description="Rebuild report.md and its PNG plots from the saved outputs of an evaluation "
                       "folder (OUT/eval of sempa run, or the eval folder of a flow run).")
    p.add_argument("path", type=Path, help="evaluation folder (holds summary.json), or a run folder with eval/")

    p = sub.add_parser("inspect", help="polars summary of a dataset folder or Parquet file")
    p.add_argument("path", type=Path)
    p.add_argument("--rows", type=int, default=5, help="rows to show (default 5)")
    p.add_argument("--worst", type=int, metavar="N",
                   help="instead: the N lowest-scoring chosen answers of a preference dataset, with their premises")

    p = _stage_parser(sub, "train", TrainConfig, help="DPO + LoRA on a preference dataset (TRL DPOTrainer)",
                      description="Train a LoRA adapter with DPO. Presets: cpu (default; batch 8, max_length 128, "
                      "bf16 only where the CPU has bf16 units, reference log-probs precomputed and cached, the "
                      "prompt run once per pair) and paper (effective batch 256, bf16, max_length 1024). With "
                      "--eval-every the best probed step within the perplexity gate is kept. Flags override the "
                      "preset and the --config file.",
                      inputs={"data": (True, "preference dataset folder or Parquet file")},
                      out="output folder (adapter, logs, manifest)")
    p.add_argument("--preset", default="cpu", choices=("cpu", "paper"), help="base settings (default cpu)")

    p = sub.add_parser("eval", help="STS evaluation (Spearman x 100 of cosine similarity)",
                       description="Evaluate sentence embeddings on STS tasks. A sentence-transformers folder "
                       "uses its own pooling; a causal LM uses PromptEOL (last token of the final layer); "
                       "--embedding forces one. Writes the results JSON to --out and prints a table.")
    p.add_argument("--model", required=True, help="built-in name, local folder or Hub id")
    p.add_argument("--adapter", type=Path, help="LoRA adapter folder to apply to --model")
    p.add_argument("--out", type=Path, help="results JSON file")
    add_arguments(p, EvalConfig)
    add_arguments(p, EmbedConfig)
    p.add_argument("-v", "--verbose", action="store_true", help="show library logs too, and the traceback of an error")

    p = sub.add_parser("embed", help="embed a corpus into a Parquet dataset (id, text, vector) for search and more",
                       description="Embed every distinct text of SOURCE (.txt: one text a line; .jsonl/.csv/.parquet: "
                       "--column) with a model and optionally a LoRA adapter (PromptEOL), in resumable shards: a "
                       "killed run started again keeps the finished shards. Writes a dataset folder (data.parquet with "
                       "id, text and vector as a fixed-size float32 list; README.md; manifest.json naming model, "
                       "adapter and embedding settings) that polars and datasets open.")
    p.add_argument("source", type=Path, help="corpus file (.txt, .jsonl, .csv or .parquet)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="built-in name, local folder or Hub id "
                   "(default smollm2-135m-instruct)")
    p.add_argument("--adapter", type=Path, help="LoRA adapter folder (e.g. OUT/eval/adapter of sempa run)")
    p.add_argument("--out", type=Path, required=True, help="output dataset folder")
    add_arguments(p, CorpusConfig, exclude=("source",))
    add_arguments(p, EmbedConfig)
    _common(p)

    p = sub.add_parser("search", help="the texts of an embedded corpus closest to a query (exact cosine)",
                       description="Embed QUERY the way INDEX was embedded (its manifest names model, adapter and "
                       "settings) and print the K most similar texts by exact cosine similarity. Small and exact: "
                       "for trying a model, not for serving millions of vectors.")
    p.add_argument("index", type=Path, help="embeddings dataset folder (from sempa embed)")
    p.add_argument("query", help="the query text")
    p.add_argument("-k", type=int, default=5, help="how many results (default 5)")
    p.add_argument("-v", "--verbose", action="store_true", help="show library logs too, and the traceback of an error")

    p = sub.add_parser("export", help="merge a LoRA adapter into its base model: one folder for any engine",
                       description="Write the base model with the adapter's update merged in (safetensors), its "
                       "tokenizer, a model card, and the PromptEOL settings under 'sempa_prompteol' in config.json. "
                       "load_encoder(OUT) and vLLM's pooling runner (vllm serve OUT --runner pooling --convert embed) "
                       "load it without peft.")
    p.add_argument("--model", default="smollm2-135m-instruct", help="base model (default smollm2-135m-instruct)")
    p.add_argument("--adapter", type=Path, required=True, help="LoRA adapter folder")
    p.add_argument("--out", type=Path, required=True, help="output model folder")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the saved weights (default float32)")
    _common(p)
    p = sub.add_parser("judge", help="build the offline NLI judge (sempa-nli-minilm) that rank --judge uses",
                       description="Fine-tune a sentence-transformers CrossEncoder from the shipped all-MiniLM-L6-v2 "
                       "weights on SICK train (entailment / neutral / contradiction), and with --snli-dev on the SNLI "
                       "dev pairs whose premises are not in the --exclude triples (the experiments it will judge), "
                       "and cache it as a model folder named sempa-nli-minilm; with --snli-test, write its accuracy "
                       "there into judge.json.")
    p.add_argument("action", choices=("build",))
    p.add_argument("--sick", type=Path, default=Path("../shared/data/senteval/SICK/SICK_train.txt"),
                   help="SICK train file (default ../shared/data/senteval/SICK/SICK_train.txt)")
    p.add_argument("--snli-test", type=Path, help="SNLI test JSONL to report accuracy on")
    p.add_argument("--snli-dev", type=Path, help="also train on the pairs of this SNLI dev JSONL whose premise is "
                   "in none of the --exclude triples")
    p.add_argument("--exclude", type=Path, action="append", default=[], metavar="TRIPLES",
                   help="triples dataset of an experiment the judge will judge: its premises are left out "
                   "(repeatable)")
    p.add_argument("--out", type=Path, help="model folder (default: $SEMPA_CACHE_DIR/models/sempa-nli-minilm)")
    p.add_argument("--epochs", type=int, default=3, help="training epochs (default 3)")
    p.add_argument("--minimal-pairs", action="store_true",
                   help="also train on minimal pairs of the --snli-dev premises (one number, colour or word changed, "
                   "an action dropped: not entailed; the premise itself: entailed), so the judge does not take a "
                   "near copy for a paraphrase (sempa_train/stages/minimal_pairs.py)")
    _common(p)
    if extend is not None:
        extend(sub)
    return parser


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    for name in ("sempa", "sempa_train"):
        logging.getLogger(name).setLevel(logging.INFO)
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # "Loading weights" bars; sempa's own progress bars stay


def _stage_config(cls: type[C], args: argparse.Namespace, *, base: C | None = None) -> C:
    """``base`` (or the defaults), then the ``--config`` file, then the flags given on the command line."""
    if args.config:
        base = cls.load(args.config, base=base)
    return config_from_args(cls, args, base=base)


def _cmd_prepare(args: argparse.Namespace) -> None:
    from sempa_train.stages.prepare import prepare

    cfg = _stage_config(PrepareConfig, args)
    result = prepare(cfg, args.out, overwrite=args.overwrite)
    print(f"triples:     {result.triples_dir} ({result.counts['triples']:,} rows)")
    print(f"preferences: {result.preferences_dir}")
    print("dropped:     " + (", ".join(f"{k}={v:,}" for k, v in result.drops.items()) or "nothing"))


def _cmd_sample(args: argparse.Namespace) -> None:
    from sempa_train.stages.sampling import sample_candidates

    cfg = _stage_config(SampleConfig, args)
    result = sample_candidates(cfg, args.triples, args.out, overwrite=args.overwrite)
    print(f"candidates: {result.out_dir} ({result.counts['candidates']:,} for {result.counts['premises']:,} premises)")


def _cmd_rank(args: argparse.Namespace) -> None:
    from sempa_train.stages.ranking import rank

    cfg = _stage_config(RankConfig, args)
    result = rank(cfg, args.out, triples=args.triples, candidates=args.candidates, overwrite=args.overwrite)
    print(f"preferences: {result.out_dir} ({result.counts['pairs']:,} pairs)")
    print("dropped:     " + (", ".join(f"{k}={v:,}" for k, v in result.drops.items()) or "nothing"))


def _cmd_experiment(args: argparse.Namespace) -> None:
    from sempa_train.experiment import results_table, run_experiment

    print(results_table(run_experiment(args.config, run=not args.results_only)))


def _cmd_report(args: argparse.Namespace) -> None:
    from sempa_train.stages.report import build_report

    folder = args.path / "eval" if (args.path / "eval" / "summary.json").is_file() else args.path
    print(f"report: {build_report(folder)}")


def _cmd_inspect(args: argparse.Namespace) -> None:
    from sempa_train.core.summary import describe, worst_chosen

    print(worst_chosen(args.path, args.worst) if args.worst else describe(args.path, rows=args.rows))


def _cmd_train(args: argparse.Namespace) -> None:
    from sempa_train.stages.train import train_dpo

    cfg = _stage_config(TrainConfig, args, base=TrainConfig.preset(args.preset))
    result = train_dpo(cfg, args.data, args.out, overwrite=args.overwrite)
    print(f"adapter: {result.adapter_dir}")
    print(f"log:     {result.out_dir / 'train_log.jsonl'}")


def _cmd_eval(args: argparse.Namespace) -> None:
    from sempa_train.stages.evaluation import format_table, run_sts_eval

    cfg = config_from_args(EvalConfig, args)
    embed = config_from_args(EmbedConfig, args)
    if cfg.split == "dev" and any(t.startswith("STS1") for t in cfg.tasks):
        log.warning("STS12-16 have no dev split: they are evaluated on their test data")
    results = run_sts_eval(args.model, cfg, embed, adapter=args.adapter, out=args.out)
    print(format_table(results))
    if args.out:
        print(f"results: {args.out}")


def _cmd_embed(args: argparse.Namespace) -> None:
    from sempa_train.stages.corpus import embed_corpus

    result = embed_corpus(args.source, args.out, model=args.model, adapter=args.adapter,
                          embed=config_from_args(EmbedConfig, args), corpus=config_from_args(CorpusConfig, args),
                          overwrite=args.overwrite)
    counts = result.counts
    print(f"embeddings: {result.out_dir} ({counts['distinct']:,} distinct texts of {counts['rows']:,} rows, "
          f"{counts['dim']} dimensions; {counts['duplicates']:,} repeats, {counts['empty']:,} empty)")


def _cmd_search(args: argparse.Namespace) -> None:
    from sempa_train.stages.corpus import search

    for row in search(args.index, args.query, args.k).iter_rows(named=True):
        print(f"{row['rank']:>3}  {row['score']:.4f}  {row['text']}")


def _cmd_export(args: argparse.Namespace) -> None:
    from sempa_train.stages.export import export_merged

    out = export_merged(args.model, args.adapter, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"merged model: {out}")


def _cmd_judge(args: argparse.Namespace) -> None:
    from sempa_train.stages.judge import build_judge, judge_folder

    record = build_judge(args.sick, args.out, epochs=args.epochs, snli_test=args.snli_test, snli_dev=args.snli_dev,
                         exclude=args.exclude, with_minimal_pairs=args.minimal_pairs, overwrite=args.overwrite)
    print(f"judge: {args.out or judge_folder()} (trained on {record['train']['pairs']:,} pairs: {record['split']})")
    if "snli_test" in record:
        print(f"SNLI test accuracy: {record['snli_test']['accuracy']:.4f} ({record['snli_test']['pairs']:,} pairs); "
              f"on their premises' minimal pairs: {record['snli_test_minimal_pairs']['accuracy']:.4f}")


def _cmd_run(args: argparse.Namespace) -> None:
    from datetime import UTC, datetime

    import yaml

    from sempa_train.plan import STAGE_NAMES, RunConfig
    from sempa_train.workflow import run_method

    overrides: dict[str, dict[str, Any]] = {
        "prepare": {"source": args.source} if args.source else {},
        "train": {"max_steps": args.max_steps} if args.max_steps is not None else {},
        "eval": {k: v for k, v in {"senteval_dir": args.senteval_dir, "tasks": args.tasks,
                                   "split": args.split}.items() if v is not None},
    }
    for item in args.set:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise ValueError(f"--set {item!r}: expected SECTION.FIELD=VALUE, e.g. eval.adapter_scale=0.8")
        overrides.setdefault(section, {})[name] = yaml.safe_load(value)
    cfg = RunConfig.build(args.config, preset=args.preset, overrides=overrides, model=args.model)
    out = args.out or Path("outputs") / f"run-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
    stages = [s.strip() for s in args.stages.split(",")] if args.stages else STAGE_NAMES
    summary = run_method(cfg, out, overwrite=args.overwrite, stages=stages,
                         given={"adapter": args.adapter} if args.adapter else None)
    if summary["sts"]:
        print(summary["sts"]["table"])
    compare = (summary.get("retention") or {}).get("compare")
    if compare:
        print(f"perplexity ratio (tuned / base): {compare['perplexity_ratio']:.3f}")
    print(f"\nfinished in {summary['wall_seconds']:.0f}s; outputs in {out}/")
    for name, path in summary["outputs"].items():
        print(f"  {name:<12} {path}")
    print(f"  {'summary':<12} {out / 'summary.json'}")


COMMANDS = {"run": _cmd_run, "prepare": _cmd_prepare, "sample": _cmd_sample, "rank": _cmd_rank,
            "inspect": _cmd_inspect, "train": _cmd_train, "eval": _cmd_eval,
            "report": _cmd_report, "experiment": _cmd_experiment, "embed": _cmd_embed, "search": _cmd_search,
            "export": _cmd_export, "judge": _cmd_judge}


def main(argv: Sequence[str] | None = None, *, extend: Callable[[Any], None] | None = None,
         commands: dict[str, Callable[[argparse.Namespace], None]] | None = None) -> int:
    """Parse ``argv`` and run the subcommand. ``extend`` and ``commands`` let a front end add subcommands
    (``pipelines.cli`` adds ``sempa prefect``) without the library importing it."""
    args = build_parser(extend).parse_args(argv)
    _configure_logging(getattr(args, "verbose", False))
    verbose = getattr(args, "verbose", False)
    try:
        {**COMMANDS, **(commands or {})}[args.command](args)
    except KeyboardInterrupt:
        print(f"sempa {args.command}: interrupted; completed outputs are kept, partial ones removed", file=sys.stderr)
        return 130
    except Exception as e:  # one line for the user; the traceback with -v
        if verbose:
            traceback.print_exc()
        if isinstance(e, (FileNotFoundError, FileExistsError, ValueError, RuntimeError)):  # our messages
            print(f"sempa {args.command}: error: {e}", file=sys.stderr)
        else:  # a library's: its first line, and where to see more
            first = (str(e).splitlines() or [""])[0]
            print(f"sempa {args.command}: error: {type(e).__name__}: {first}"
                  + ("" if verbose else " (-v shows the traceback)"), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
