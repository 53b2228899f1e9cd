import json
import shutil

from conftest import SAMPLE_NLI
from test_sts import make_senteval

from sempa_train.cli import main


def test_experiment_compares_arms_and_resumes(tmp_path, tiny_model_dir, capsys):
    senteval = make_senteval(tmp_path / "senteval")
    config = tmp_path / "exp.yaml"
    out = tmp_path / "exp"
    config.write_text(f"""
name: tiny
out: {out}
model: {tiny_model_dir}
prepare: {{source: {SAMPLE_NLI}, max_premises: 8}}
sample: {{backend: transformers, n: 2, max_tokens: 12, shard_size: 4, dtype: float32}}
rank: {{min_length_ratio: 0.0, max_length_ratio: 100.0, drop_truncated: false}}
train: {{max_steps: 1, batch_size: 2}}
eval: {{senteval_dir: {senteval}, tasks: [STSBenchmark], split: dev}}
embed: {{dtype: float32}}
retention: {{max_texts: 6, paraphrases: 2}}
gates: {{max_perplexity_ratio: 0.5}}
strategies:
  gold: {{rank: {{strategy: gold}}}}
  sampled: {{rank: {{strategy: sampled}}}}
""")
    assert main(["experiment", str(config)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["rows"]) == ["baseline", "gold", "sampled"]
    assert results["rows"]["gold"]["steps"] == 1 and results["rows"]["sampled"]["pairs"] > 0
    assert results["rows"]["gold"]["gates"] == "failed"  # a perplexity ratio of at most 0.5 cannot be met
    from sempa_train.stages.assessment import Evaluation

    gold = Evaluation.load(out / "gold" / "eval")
    metrics = gold.metrics()
    assert metrics[Evaluation.PRIMARY] == results["rows"]["gold"]["sts_avg"] and not gold.gates_passed
    assert metrics["sts_avg_delta"] == gold.sts_avg - Evaluation.load(out / "baseline" / "eval").sts_avg
    table = (out / "results.md").read_text()
    assert table.splitlines()[0].startswith("| arm | STSBenchmark | Δ STSBenchmark (95% CI) | STS avg | Δ avg |")
    low, high = results["rows"]["gold"]["sts_delta_ci"]["STSBenchmark"]
    assert low <= high and f"[{low:+.2f}, {high:+.2f}]" in table
    assert "| sampled |" in capsys.readouterr().out
    assert (out / "pareto.png").stat().st_size > 0 and "(pareto.png)" in table

    stamp = (out / "gold" / "model" / "manifest.json").stat().st_mtime_ns
    assert main(["experiment", str(config)]) == 0  # resumes: nothing is retrained
    assert (out / "gold" / "model" / "manifest.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "results.json").read_text())["timings"] == {}

    # a stopped run: --results-only tabulates the arms evaluated so far and names the others
    sampled_eval = (out / "sampled" / "eval").resolve()
    shutil.rmtree(sampled_eval)
    assert main(["experiment", str(config), "--results-only"]) == 0
    partial = json.loads((out / "results.json").read_text())
    assert list(partial["rows"]) == ["baseline", "gold"] and partial["missing"] == ["sampled"]
    assert not sampled_eval.exists()  # nothing was run
    assert "Not evaluated yet: sampled." in (out / "results.md").read_text()


def tiny_experiment(tmp_path, model, body: str):
    """An experiment file on the tiny model and 8 premises of the NLI sample, with ``body`` (rank, train, arms)."""
    senteval = make_senteval(tmp_path / "senteval")
    config, out = tmp_path / "exp.yaml", tmp_path / "exp"
    config.write_text(f"""
out: {out}
model: {model}
prepare: {{source: {SAMPLE_NLI}, max_premises: 8}}
eval: {{senteval_dir: {senteval}, tasks: [STSBenchmark], split: dev}}
embed: {{dtype: float32}}
""" + body.format(senteval=senteval))
    return config, out


def test_arm_without_a_passing_checkpoint_is_recorded_and_skipped(tmp_path, tiny_model_dir):
    config, out = tiny_experiment(tmp_path, tiny_model_dir, """
rank: {{strategy: gold}}
train: {{max_steps: 2, batch_size: 2, eval_every: 1, eval_senteval_dir: {senteval}, eval_texts: 3,
         select_max_perplexity_ratio: 1.0e-6}}
strategies:
  strict: {{}}
""")
    assert main(["experiment", str(config)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["rows"]) == ["baseline"] and results["missing"] == []
    assert "no checkpoint passed the gate" in results["failed"]["strict"]
    assert "strict: no checkpoint passed the gate" in (out / "results.md").read_text()
    assert main(["experiment", str(config)]) == 0  # resumed: the failed arm is not trained again
    assert json.loads((out / "results.json").read_text())["timings"] == {}


def test_a_step_that_raises_is_still_timed(tmp_path):
    import pytest

    from sempa_train.core.store import Store
    from sempa_train.plan import Execution, RunConfig, execute
    from sempa_train.stages.assessment import GateError

    def failing_gate(step) -> None:
        raise GateError("quality gate failed")

    record = Execution()
    with pytest.raises(GateError):
        execute(RunConfig(), Store(tmp_path), stages=["evaluate"], runner=failing_gate, record=record)
    assert list(record.seconds) == ["evaluate"] and record.seconds["evaluate"] >= 0


def test_grid_expands_to_one_arm_per_combination(tmp_path):
    import pytest

    from sempa_train.experiment import expand_grid, load_experiment

    arms = expand_grid({"train.loss_type": ["sigmoid", "apo_zero"], "train.learning_rate": [1e-4, 3e-4]})
    assert list(arms)[0] == "loss_type=sigmoid,learning_rate=0.0001" and len(arms) == 4
    assert expand_grid({}) == {}
    assert arms["loss_type=apo_zero,learning_rate=0.0003"] == {"train": {"loss_type": "apo_zero",
                                                                         "learning_rate": 3e-4}}
    config = tmp_path / "sweep.yaml"
    config.write_text("out: x\nrank: {strategy: gold}\ngrid: {train.beta: [0.1, 0.5]}\n"
                      "strategies: {plain: {}}\n")
    _, _, _, configs = load_experiment(config)
    assert list(configs) == ["plain", "beta=0.1", "beta=0.5"] and configs["beta=0.5"].train.beta == 0.5
    with pytest.raises(ValueError, match="grid key 'beta' must be SECTION.FIELD"):
        expand_grid({"beta": [0.1]})

    run_config = tmp_path / "run.yaml"  # shared sections from a run config file, overridden by the experiment's
    run_config.write_text("rank: {strategy: gold}\ntrain: {beta: 0.3, max_steps: 7}\n")
    config.write_text(f"config: {run_config}\nout: x\ntrain: {{max_steps: 9}}\nstrategies: {{plain: {{}}}}\n")
    _, _, base, configs = load_experiment(config)
    assert (base.train.beta, base.train.max_steps, configs["plain"].train.max_steps) == (0.3, 9, 9)


def test_a_scale_sweep_reuses_the_trained_adapter(tmp_path, tiny_model_dir):
    import pytest

    from sempa_train.stages.assessment import Evaluation

    config, out = tiny_experiment(tmp_path, tiny_model_dir, """
rank: {{strategy: gold}}
train: {{max_steps: 2, batch_size: 2, learning_rate: 0.05}}
grid: {{eval.adapter_scale: [1.0, 0.0]}}
""")
    assert main(["experiment", str(config)]) == 0
    assert len(list((out / "stages" / "train").iterdir())) == 1  # one training, two evaluations
    zero = Evaluation.load(out / "adapter_scale=0.0" / "eval")
    assert zero.sts["STSBenchmark"] == pytest.approx(zero.sts_base["STSBenchmark"], abs=1e-6)  # scale 0: the base
    assert "x0 |" in (out / "adapter_scale=0.0" / "eval" / "adapter" / "README.md").read_text()  # the kept adapter
