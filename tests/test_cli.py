import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from conftest import SAMPLE_NLI, SHARED_DATA
from test_sts import make_senteval

from sempa_train.cli import main


def test_prepare_writes_datasets_with_cards(tmp_path, capsys):
    out = tmp_path / "prep"
    assert main(["prepare", "--source", str(SAMPLE_NLI), "--out", str(out), "--template", "P3"]) == 0
    prefs = pl.read_parquet(out / "preferences" / "data.parquet")
    assert prefs.height == 64 and set(prefs["template_id"]) == {"P3"}
    assert prefs["prompt"][0].startswith('Keep the main meaning of this sentence: "')
    card = (out / "preferences" / "README.md").read_text()
    assert "| no_gold_label | 2 |" in card and "| neutral_unused | 64 |" in card
    assert "preferences:" in capsys.readouterr().out

    assert main(["inspect", str(out / "preferences")]) == 0
    shown = capsys.readouterr().out
    assert "64 rows x 16 columns (preferences)" in shown and "chars_mean" in shown and "no_gold_label=2" in shown


def test_prepare_errors_name_the_file_and_leave_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"premise": "a", "hypothesis": "b", "label": 0}\n{"premise": \n')
    out = tmp_path / "out"
    assert main(["prepare", "--source", str(bad), "--out", str(out)]) == 2
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]

    with pytest.raises(SystemExit) as e:
        main(["prepare", "--source", str(SAMPLE_NLI), "--out", str(out), "--pairing", "few"])
    assert e.value.code == 2 and "invalid choice: 'few'" in capsys.readouterr().err
    assert main(["prepare", "--source", str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err


def test_eval_contract_with_sentence_transformers(tmp_path, capsys):
    root = make_senteval(tmp_path / "senteval")
    out = tmp_path / "eval.json"
    code = main(["eval", "--model", "all-minilm-l6-v2", "--senteval-dir", str(root), "--tasks", "STSBenchmark,STS12",
                 "--split", "dev", "--out", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    assert results["model"] == "all-minilm-l6-v2" and results["embedding"] == "sentence-transformers"
    assert set(results["tasks"]) == {"STSBenchmark", "STS12"}
    assert results["tasks"]["STSBenchmark"]["n"] == 2 and results["tasks"]["STSBenchmark"]["split"] == "dev"
    assert results["tasks"]["STS12"]["split"] == "test" and "wmean" in results["tasks"]["STS12"]
    assert "STSBenchmark" in capsys.readouterr().out


def test_eval_missing_data_is_a_clear_error(tmp_path, capsys):
    code = main(["eval", "--model", "all-minilm-l6-v2", "--senteval-dir", str(tmp_path), "--tasks", "STSBenchmark",
                 "--split", "dev"])
    assert code == 2
    assert "sts-dev.csv: missing" in capsys.readouterr().err


def test_run_whole_method_on_tiny_model(tmp_path, tiny_model_dir, capsys):
    root = make_senteval(tmp_path / "senteval")
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text("retention: {max_texts: 8, paraphrases: 3}\nembed: {dtype: float32}\n")
    code = main(["run", "--config", str(config), "--model", str(tiny_model_dir), "--senteval-dir", str(root),
                 "--max-steps", "1", "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    for path in summary["outputs"].values():
        assert Path(path).exists(), path
    assert summary["train"]["global_steps"] == 1 and summary["data"]["counts"]["triples"] == 64
    tuned = json.loads((out / "eval" / "tuned.json").read_text())
    assert tuned["adapter"].endswith("adapter") and "STSBenchmark" in tuned["tasks"]
    printed = capsys.readouterr().out
    assert "outputs in" in printed and "summary.json" in printed and "perplexity ratio" in printed
    report = (out / "eval" / "report.md").read_text()
    assert "sts_bars.png" in report and "training.png" in report and "not scored (gold strategy)" in report
    for name in ("sts_bars.png", "stsb_scatter.png", "training.png"):
        assert (out / "eval" / name).stat().st_size > 1000
    (out / "eval" / "report.md").unlink()
    (out / "eval" / "sts_bars.png").unlink()
    assert main(["report", str(out)]) == 0  # rebuilt from saved outputs only
    assert (out / "eval" / "report.md").read_text() == report and (out / "eval" / "sts_bars.png").is_file()

    # evaluate only, a given adapter at another scale (scale 0: the base model)
    code = main(["run", "--config", str(config), "--model", str(tiny_model_dir), "--senteval-dir", str(root),
                 "--stages", "evaluate", "--adapter", str(out / "model" / "adapter"), "--set", "eval.adapter_scale=0",
                 "--out", str(tmp_path / "scaled")])
    assert code == 0
    scaled = json.loads((tmp_path / "scaled" / "summary.json").read_text())
    assert list(scaled["stages"]) == ["evaluate"] and scaled["train"] is None
    assert scaled["sts"]["tuned"] == pytest.approx(scaled["sts"]["base"], abs=1e-6)
    assert main(["run", "--config", str(config), "--set", "evalsplit=dev"]) == 2  # a malformed --set is refused


def test_help_explains_every_subcommand():
    result = subprocess.run([sys.executable, "-m", "sempa_train.cli", "train", "--help"], capture_output=True,
                            text=True, check=True)
    assert "--lora-r" in result.stdout and "LoRA rank" in result.stdout and "(default: 8)" in result.stdout


@pytest.mark.skipif(not (SHARED_DATA / "senteval").is_dir(), reason="needs ../shared/data")
def test_minilm_on_real_stsb_dev_offline(tmp_path):
    out = tmp_path / "minilm.json"
    assert main(["eval", "--model", "all-minilm-l6-v2", "--senteval-dir", str(SHARED_DATA / "senteval"),
                 "--tasks", "STSBenchmark", "--split", "dev", "--out", str(out)]) == 0
    r = json.loads(out.read_text())["tasks"]["STSBenchmark"]
    assert r["n"] == 1500
    assert 80 < r["spearman"] < 92  # all-MiniLM-L6-v2 is a strong encoder; a broken pipeline lands far lower


@pytest.mark.skipif(not (SHARED_DATA / "nli").is_dir(), reason="needs ../shared/data")
def test_prepare_real_snli_counts_premises_with_both_labels(tmp_path):
    source = SHARED_DATA / "nli" / "snli" / "validation.jsonl"
    labels: dict[str, set[int]] = {}
    for line in source.read_text().splitlines():
        row = json.loads(line)
        labels.setdefault(" ".join(row["premise"].split()), set()).add(row["label"])
    expected = sum(1 for s in labels.values() if {0, 2} <= s)
    assert main(["prepare", "--source", str(source), "--out", str(tmp_path / "snli")]) == 0
    assert pl.read_parquet(tmp_path / "snli" / "preferences" / "data.parquet").height == expected
    manifest = json.loads((tmp_path / "snli" / "preferences" / "manifest.json").read_text())
    assert manifest["drops"]["premise_without_contradiction"] > 0


def test_a_library_error_is_one_line_and_v_shows_the_traceback(tiny_model_dir, tmp_path, capsys):
    """A corrupt adapter file fails inside safetensors: one line naming the error type, the traceback with -v."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sempa_train.cli import main

    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                   LoraConfig(r=2, target_modules="all-linear")).save_pretrained(adapter)
    (adapter / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    args = ["export", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--out", str(tmp_path / "m")]
    assert main(args) == 2
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if "error" in line]
    assert line.startswith("sempa export: error: SafetensorError: ") and line.endswith("(-v shows the traceback)")
    assert "Traceback" not in err
    assert not (tmp_path / "m").exists()
    assert main([*args, "-v"]) == 2
    assert "Traceback (most recent call last)" in capsys.readouterr().err
