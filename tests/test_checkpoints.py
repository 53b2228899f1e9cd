"""Checkpoint probes during training, gated selection and LoRA scaling."""

import json

import numpy as np
import pytest
import torch
from test_sts import make_senteval

from sempa_train.core.config import EmbedConfig, TrainConfig
from sempa_train.stages.checkpoints import (
    NoPassingCheckpointError,
    ProbeResult,
    SelectionGate,
    judge,
    lora_scaled,
    scale_adapter_file,
    select,
)
from sempa_train.stages.embedding import load_encoder
from sempa_train.stages.train import train_dpo

SENTENCES = ["A dog runs in the park.", "Two women are drinking coffee."]


def test_selection_takes_the_best_sts_within_the_gate():
    results = judge([ProbeResult(0, 1.0, 70.0, 100.0), ProbeResult(10, 1.0, 72.0, 103.0),
                     ProbeResult(20, 1.0, 75.0, 110.0), ProbeResult(30, 1.0, 71.0, 104.0),
                     ProbeResult(20, 0.5, 73.0, 104.5)], SelectionGate(max_perplexity_ratio=1.05))
    assert [r.passed for r in results] == [True, True, False, True, True]
    assert results[2].perplexity_ratio == pytest.approx(1.10)
    chosen = select(results, SelectionGate(1.05))
    assert (chosen.step, chosen.scale) == (20, 0.5)
    assert select(judge(results, SelectionGate()), SelectionGate()).step == 20  # no gate: the best STS


def test_selection_gates_on_paraphrase_similarity():
    gate = SelectionGate(max_perplexity_ratio=1.05, min_paraphrase_delta=-0.02)
    results = judge([ProbeResult(0, 1.0, 70.0, 100.0, 0.95), ProbeResult(10, 1.0, 72.0, 101.0, 0.94),
                     ProbeResult(20, 1.0, 75.0, 102.0, 0.90), ProbeResult(20, 0.5, 74.0, 101.0, 0.935)], gate)
    assert [r.passed for r in results] == [True, True, False, True]
    assert results[2].paraphrase_delta == pytest.approx(-0.05)
    assert (select(results, gate).step, select(results, gate).scale) == (20, 0.5)


def test_a_scaled_update_must_beat_the_unscaled_one_by_the_margin():
    gate = SelectionGate(max_perplexity_ratio=1.05)
    results = judge([ProbeResult(0, 1.0, 70.0, 100.0), ProbeResult(10, 1.0, 72.0, 101.0),
                     ProbeResult(20, 1.0, 74.0, 102.0), ProbeResult(20, 0.5, 74.3, 101.0),
                     ProbeResult(20, 1.5, 74.4, 104.0)], gate)
    assert (select(results, gate).step, select(results, gate).scale) == (20, 1.5)  # no margin: the best probe
    assert (select(results, gate, 0.5).step, select(results, gate, 0.5).scale) == (20, 1.0)  # a tie: as trained
    assert select(results, gate, 0.3).scale == 1.5  # 0.4 above the unscaled step: beyond a margin of 0.3
    # the unscaled step fails the gate: the margin compares with the best unscaled step that passes (step 10)
    failing = judge([ProbeResult(0, 1.0, 70.0, 100.0), ProbeResult(10, 1.0, 72.0, 101.0),
                     ProbeResult(20, 1.0, 74.0, 110.0), ProbeResult(20, 0.5, 73.0, 102.0)], gate)
    assert select(failing, gate, 0.5).scale == 0.5 and select(failing, gate, 1.5).step == 10


def test_selection_refuses_when_every_checkpoint_fails():
    gate = SelectionGate(max_perplexity_ratio=1.05)
    results = judge([ProbeResult(0, 1.0, 70.0, 100.0), ProbeResult(10, 1.0, 72.0, 108.0),
                     ProbeResult(20, 1.0, 75.0, 120.0)], gate)
    with pytest.raises(NoPassingCheckpointError, match=r"ratio <= 1.05.*lowest perplexity ratio was 1.080 at step 10"):
        select(results, gate)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, sample_prefs, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    senteval = make_senteval(root / "senteval")
    text = root / "heldout.txt"
    text.write_text("A man is playing a guitar.\nThe children are in the garden.\nA woman reads a book.\n")
    cfg = TrainConfig(model=str(tiny_model_dir), max_steps=3, batch_size=4, learning_rate=5e-2, bf16=False,
                      eval_every=2, eval_senteval_dir=str(senteval), eval_text_file=str(text), eval_texts=3,
                      select_max_perplexity_ratio=None, select_scales=(0.0, 0.5), save_merged=True)
    return cfg, train_dpo(cfg, sample_prefs, root / "model")


def test_training_probes_steps_and_scales_and_keeps_the_choice(trained):
    cfg, result = trained
    rows = [json.loads(line) for line in (result.out_dir / "checkpoints.jsonl").read_text().splitlines()]
    assert [(r["step"], r["scale"]) for r in rows if r["scale"] == 1.0] == [(0, 1.0), (2, 1.0), (3, 1.0)]
    chosen_step = result.metrics["selected_step"]
    assert chosen_step in (2, 3)
    assert {r["scale"] for r in rows if r["step"] == chosen_step} == {0.0, 0.5, 1.0}
    best = max((r for r in rows if r["step"] > 0), key=lambda r: r["sts_spearman"])
    assert result.metrics["selected_sts_spearman"] == best["sts_spearman"]
    assert not (result.out_dir / "checkpoints").exists()
    base = next(r for r in rows if r["step"] == 0)
    zero = next(r for r in rows if r["scale"] == 0.0)
    assert zero["perplexity"] == pytest.approx(base["perplexity"], rel=1e-4)  # scale 0 is the base model
    assert zero["paraphrase_similarity"] == pytest.approx(base["paraphrase_similarity"], abs=1e-4)
    assert all(r["paraphrase_delta"] is not None for r in rows)
    assert all(list(r["sts_tasks"]) == ["STSBenchmark"] and r["sts_tasks"]["STSBenchmark"] == r["sts_spearman"]
               for r in rows)  # one probe task: its score is the mean


def test_all_failing_run_is_refused(tiny_model_dir, sample_prefs, trained, tmp_path):
    cfg, _ = trained
    impossible = cfg.replace(select_max_perplexity_ratio=1e-6, select_scales=())
    with pytest.raises(NoPassingCheckpointError, match="no checkpoint passed the gate"):
        train_dpo(impossible, sample_prefs, tmp_path / "model")
    assert not (tmp_path / "model").exists() and not list(tmp_path.glob(".model.partial*"))


def test_adapter_scaling_at_one_is_the_adapter_and_at_zero_the_base_model(tiny_model_dir, trained, tmp_path):
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, result = trained
    embed = EmbedConfig(dtype="float32")
    base = load_encoder(tiny_model_dir, embed, show_progress=False).encode(SENTENCES)
    tuned = load_encoder(tiny_model_dir, embed, adapter=result.adapter_dir, show_progress=False).encode(SENTENCES)
    merged = load_encoder(result.out_dir / "merged", embed, show_progress=False).encode(SENTENCES)
    np.testing.assert_allclose(merged, tuned, rtol=1e-4, atol=1e-4)  # the merged model is the chosen adapter
    for scale, expected in ((1.0, tuned), (0.0, base)):
        scaled = tmp_path / f"x{scale}"
        shutil.copytree(result.adapter_dir, scaled)
        scale_adapter_file(scaled, scale)
        got = load_encoder(tiny_model_dir, embed, adapter=scaled, show_progress=False).encode(SENTENCES)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), result.adapter_dir).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        full = model(input_ids=ids).logits
        with lora_scaled(model, 0.0):
            zero = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
    torch.testing.assert_close(zero, plain)
    torch.testing.assert_close(again, full)  # the context restores the trained weights


def test_checkpoint_plot_has_a_panel_per_probe(trained, tmp_path):
    import matplotlib.pyplot as plt

    from sempa_train.stages.report import plot_checkpoints

    _, result = trained
    assert plot_checkpoints(result.out_dir / "checkpoints.jsonl", tmp_path / "c.png")
    assert plt.imread(tmp_path / "c.png").shape[1] == 3 * 5 * 110  # STS, perplexity ratio, paraphrase change


def test_probes_can_skip_the_texts_the_final_retention_reads(tmp_path):
    from test_sts import make_senteval

    from sempa_train.stages.checkpoints import Probes

    text = tmp_path / "held.txt"
    text.write_text("".join(f"Sentence number {i}.\n" for i in range(10)))
    probes = Probes.load(make_senteval(tmp_path / "s"), 4, text, 3, paraphrases=2, offset=5)
    assert probes.texts == ["Sentence number 5.", "Sentence number 6.", "Sentence number 7."]
    assert probes.paraphrase_sources == ("Sentence number 5.", "Sentence number 6.")


def test_a_probe_of_two_tasks_scores_their_mean_spearman(tiny_model_dir, tmp_path):
    from test_sts import make_senteval

    from sempa_train.core.models import load_causal_lm
    from sempa_train.stages.checkpoints import Probes, probe

    senteval, text = make_senteval(tmp_path / "s"), tmp_path / "held.txt"
    text.write_text("A first held-out sentence.\nA second one.\n")
    model, tokenizer = load_causal_lm(tiny_model_dir)
    both = Probes.load(senteval, 4, text, 2, tasks=("STSBenchmark", "SICKRelatedness"))
    assert [s.task for s in both.sts] == ["STSBenchmark", "SICKRelatedness"] and both.sts[0].split == "train"
    alone = [probe(model, tokenizer, Probes.load(senteval, 4, text, 2, tasks=(task,)))[0]
             for task in ("STSBenchmark", "SICKRelatedness")]
    reading = probe(model, tokenizer, both)
    assert reading.sts == pytest.approx(sum(alone) / 2)
    assert reading.sts_tasks == pytest.approx({"STSBenchmark": alone[0], "SICKRelatedness": alone[1]})


def test_checkpoint_plot_draws_each_probe_task_beside_the_mean():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sempa_train.stages.report import _plot_probe_tasks

    steps = [{"step": s, "sts_tasks": {"STSBenchmark": 70.0 + s, "SICKRelatedness": 60.0 - s}} for s in (0, 25, 50)]
    fig, ax = plt.subplots()
    _plot_probe_tasks(ax, steps)
    assert {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()} == {
        "STSBenchmark": [70.0, 95.0, 120.0], "SICKRelatedness": [60.0, 35.0, 10.0]}
    ax.clear()
    _plot_probe_tasks(ax, [{"step": 0, "sts_tasks": {"STSBenchmark": 70.0}}, {"step": 25}])  # one task, old rows
    assert not ax.get_lines()
    plt.close(fig)


def test_genre_matched_probe_follows_the_target_split_proportions():
    from sempa_train.stages.checkpoints import genre_matched_sample

    source = ["news"] * 60 + ["captions"] * 30 + ["forum"] * 10
    target = ["news"] * 2 + ["captions"] * 1 + ["forum"] * 1  # 50 % / 25 % / 25 %
    idx = genre_matched_sample(source, target, 20, np.random.default_rng(0), "STSBenchmark train")
    picked = [source[i] for i in idx]
    assert (picked.count("news"), picked.count("captions"), picked.count("forum")) == (10, 5, 5)
    assert len(set(idx.tolist())) == 20 and list(idx) == sorted(idx)
    with pytest.raises(ValueError, match=r"STSBenchmark train: the probe needs 15 pairs of genre 'forum'"):
        genre_matched_sample(source, target, 60, np.random.default_rng(0), "STSBenchmark train")


def test_probe_with_a_genre_mix_reads_the_genres_of_stsb_and_leaves_sick_at_random(tmp_path):
    from test_sts import make_senteval

    from sempa_train.stages.checkpoints import Probes

    senteval, text = make_senteval(tmp_path / "s"), tmp_path / "held.txt"
    text.write_text("A held-out sentence.\n")
    stsb = senteval / "STS" / "STSBenchmark"
    with (stsb / "sts-train.csv").open("a") as f:
        f.write("main-forum\tdeft-forum\t2014\t0003\t3.000\tA post.\tA reply.\n")
    # dev: forums only, spelt as the real dev file spells them (main-forums; train says main-forum)
    (stsb / "sts-dev.csv").write_text("main-forums\tanswers-forums\t2015\t0001\t5.000\tA.\tB.\n" * 3)
    probes = Probes.load(senteval, 1, text, 1, tasks=("STSBenchmark", "SICKRelatedness"), genre_mix="dev")
    assert probes.sts[0].genres == ("main-forum",) and probes.sts[0].sent1 == ["A post."]
    assert len(probes.sts[1]) == 1 and probes.sts[1].genres == ()
    with pytest.raises(ValueError, match="eval_sts_genre_mix must be"):
        TrainConfig(eval_sts_genre_mix="validation")
