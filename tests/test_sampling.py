import os
import subprocess
import sys

import polars as pl
import pytest
from conftest import kill_after_shards

from sempa_train.core.config import PrepareConfig, SampleConfig
from sempa_train.core.io import read_dataset
from sempa_train.core.models import load_tokenizer
from sempa_train.core.schemas import CANDIDATES_SCHEMA
from sempa_train.core.templates import PARAPHRASE_TEMPLATES
from sempa_train.core.text import clean_candidate, paraphrase_prompt
from sempa_train.stages.generation import Generation, TransformersBackend, VLLMBackend, build_backend, vllm_available
from sempa_train.stages.prepare import prepare
from sempa_train.stages.sampling import plan_shards, premise_seed, sample_candidates, work_dir_for

REQUIRE_VLLM = os.environ.get("SEMPA_REQUIRE_VLLM") == "1"  # set by .ci/run: no silent skip in CI


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("A dog is running in a park.", "A dog is running in a park."),
        ('"A dog is running in a park."', "A dog is running in a park."),
        ("Paraphrase: A dog runs.", "A dog runs."),
        ("Sure! Here's a paraphrase: “The dog runs.”", "The dog runs."),
        ("Rewritten sentence:\n\nThe dog runs.\nMore text here.", "The dog runs."),
        ("The dog runs.\nExplanation: I changed the verb.", "The dog runs."),
        ("  The   dog\truns.  ", "The dog runs."),
        ('"The dog runs.', "The dog runs."),
        ("The dog runs.\"", "The dog runs."),
        ("It's the dog's ball.", "It's the dog's ball."),
        ('The sentence has been rephrased as follows: "A girl blows out candles."', "A girl blows out candles."),
        ("Here is a reworded version of your sentence: A dog runs.", "A dog runs."),
        ("Note: the dog runs.", "Note: the dog runs."),  # a colon alone is not a lead-in
        ("\n\n", ""),
        ("Paraphrase:", ""),
    ],
)
def test_clean_candidate(raw, clean):
    assert clean_candidate(raw) == clean


def test_prompts_use_the_chat_template(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    chat = paraphrase_prompt("A cat sleeps.", PARAPHRASE_TEMPLATES["P1"], tokenizer, chat=True)
    assert chat == ('<|im_start|>user\nKeep the same meaning of this sentence: "A cat sleeps.", while making some '
                    "changes.<|im_end|>\n<|im_start|>assistant\n")
    assert paraphrase_prompt("A cat sleeps.", "Say {sentence}", tokenizer, chat=False) == "Say A cat sleeps.\n"


def test_premise_seed_is_stable_and_distinct():
    assert premise_seed(0, "abc") == premise_seed(0, "abc")
    assert len({premise_seed(0, "abc"), premise_seed(1, "abc"), premise_seed(0, "abd")}) == 3


@pytest.fixture(scope="module")
def tiny_triples(tiny_model_dir, tmp_path_factory):
    from conftest import SAMPLE_NLI

    out = tmp_path_factory.mktemp("triples") / "sample"
    return prepare(PrepareConfig(source=str(SAMPLE_NLI)), out).triples_dir


def cfg_for(model_dir, **kw) -> SampleConfig:
    base = {"model": str(model_dir), "backend": "transformers", "n": 3, "max_tokens": 12, "shard_size": 8,
            "dtype": "float32"}
    return SampleConfig(**{**base, **kw})


def check_contract(backend, tokenizer, cfg):
    prompts = tokenizer(["<|im_start|>user\nA dog runs.<|im_end|>\n<|im_start|>assistant\n", "Hi there.\n"],
                        add_special_tokens=False)["input_ids"]
    out = backend.generate(prompts, [1, 2], cfg.generation)
    assert len(out) == 2 and all(len(gens) == cfg.n for gens in out)
    for g in (g for gens in out for g in gens):
        assert isinstance(g, Generation) and isinstance(g.text, str)
        assert 1 <= g.completion_tokens <= cfg.max_tokens and g.finish_reason in ("stop", "length")
        assert g.finish_reason == "stop" or g.completion_tokens == cfg.max_tokens
    assert backend.generate(prompts, [1, 2], cfg.generation) == out  # seeded: reproducible
    return out


def test_transformers_backend_contract(tiny_model_dir):
    cfg = cfg_for(tiny_model_dir)
    backend = build_backend(cfg, tiny_model_dir, "transformers")
    assert isinstance(backend, TransformersBackend)
    check_contract(backend, load_tokenizer(tiny_model_dir), cfg)


@pytest.mark.vllm
@pytest.mark.skipif(not vllm_available() and not REQUIRE_VLLM, reason="vLLM not installed")
def test_vllm_backend_contract_and_sample(tiny_model_dir, tiny_triples, tmp_path):
    cfg = cfg_for(tiny_model_dir, backend="vllm", max_model_len=256)
    backend = build_backend(cfg, tiny_model_dir, "vllm")
    assert isinstance(backend, VLLMBackend)
    out = check_contract(backend, load_tokenizer(tiny_model_dir), cfg)
    # per-request seeds: a prompt's output does not depend on its batch
    alone = backend.generate(load_tokenizer(tiny_model_dir)(["Hi there.\n"], add_special_tokens=False)["input_ids"],
                             [2], cfg.generation)
    assert alone[0] == out[1]
    backend.close()
    # the stage itself, engine in a child process
    result = sample_candidates(cfg.replace(max_premises=8), tiny_triples, tmp_path / "cand", show_progress=False)
    table = read_dataset(result.out_dir, "candidates")
    assert table.height == 8 * 3 and set(table["backend"]) == {"vllm"}


def test_sample_writes_candidates_with_metadata(tiny_model_dir, tiny_triples, tmp_path):
    cfg = cfg_for(tiny_model_dir, max_premises=20)
    result = sample_candidates(cfg, tiny_triples, tmp_path / "cand", show_progress=False)
    table = read_dataset(result.out_dir, "candidates")
    assert table.schema == CANDIDATES_SCHEMA
    assert table.height == 20 * 3 and table["premise_id"].n_unique() == 20
    assert table.group_by("premise_id").len()["len"].to_list() == [3] * 20
    assert set(table["backend"]) == {"transformers"} and set(table["max_tokens"]) == {12}
    assert result.counts["shards"] == 3
    assert not work_dir_for(result.out_dir).exists()  # shards removed once assembled
    assert "truncated" in (result.out_dir / "README.md").read_text()
    with pytest.raises(FileExistsError):
        sample_candidates(cfg, tiny_triples, tmp_path / "cand")


def test_resume_after_failure_skips_finished_shards(tiny_model_dir, tiny_triples, tmp_path):
    cfg = cfg_for(tiny_model_dir, max_premises=24)
    reference = read_dataset(sample_candidates(cfg, tiny_triples, tmp_path / "ref", show_progress=False).out_dir,
                             "candidates")
    out = tmp_path / "cand"

    def crash_after_two(one_shard, pending):
        for index in pending[:2]:
            one_shard(index)
        raise RuntimeError("worker died")

    with pytest.raises(RuntimeError, match="worker died"):
        sample_candidates(cfg, tiny_triples, out, shard_runner=crash_after_two)
    plan = plan_shards(cfg, tiny_triples, out)
    assert plan.pending() == [2]
    before = {i: plan.shard_path(i).stat().st_mtime_ns for i in (0, 1)}
    calls = []

    def record(one_shard, pending):
        calls.append(list(pending))
        for index in pending:
            one_shard(index)
        assert all(plan.shard_path(i).stat().st_mtime_ns == before[i] for i in (0, 1))

    table = read_dataset(sample_candidates(cfg, tiny_triples, out, shard_runner=record).out_dir, "candidates")
    assert calls == [[2]]
    assert table.equals(reference)


def test_changed_config_does_not_mix_shards(tiny_model_dir, tiny_triples, tmp_path):
    out = tmp_path / "cand"
    plan = plan_shards(cfg_for(tiny_model_dir), tiny_triples, out)
    plan.shard_path(0).write_bytes(b"a finished shard")
    with pytest.raises(ValueError, match="another config"):
        plan_shards(cfg_for(tiny_model_dir, n=5), tiny_triples, out)
    # --overwrite starts over: the other run's shards are dropped, not mixed in
    result = sample_candidates(cfg_for(tiny_model_dir, n=1, max_premises=4), tiny_triples, out, overwrite=True,
                               show_progress=False)
    assert result.counts["candidates"] == 4


def test_a_failed_start_does_not_block_the_corrected_rerun(tiny_model_dir, tiny_triples, tmp_path):
    """A mistyped model name fails before any shard exists; the rerun with the right name is not refused."""
    out = tmp_path / "cand"
    with pytest.raises(FileNotFoundError):
        sample_candidates(cfg_for(tmp_path / "no-such-model", max_premises=4), tiny_triples, out, show_progress=False)
    assert (work_dir_for(out) / "plan.json").is_file() and not list(work_dir_for(out).glob("shard-*"))
    result = sample_candidates(cfg_for(tiny_model_dir, n=1, max_premises=4), tiny_triples, out, show_progress=False)
    assert result.counts["candidates"] == 4


def test_kill_9_midway_then_resume(tiny_model_dir, tiny_triples, tmp_path):
    """A real ``sempa sample`` process killed with SIGKILL loses at most its current shard."""
    out = tmp_path / "cand"
    args = [sys.executable, "-m", "sempa_train.cli", "sample", "--triples", str(tiny_triples), "--out", str(out),
            "--model", str(tiny_model_dir), "--backend", "transformers", "--n", "2", "--max-tokens", "48",
            "--shard-size", "2", "--batch-size", "1", "--dtype", "float32"]
    work = work_dir_for(out)
    finished = kill_after_shards(args, work)
    assert 0 < finished < 32, "the run should have been killed halfway"

    result = subprocess.run(args, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"resuming, {finished} of 32 shards already done" in result.stderr
    table = pl.read_parquet(out / "data.parquet")
    uninterrupted = sample_candidates(
        SampleConfig(model=str(tiny_model_dir), backend="transformers", n=2, max_tokens=48, shard_size=2,
                     batch_size=1, dtype="float32"),
        tiny_triples, tmp_path / "ref", show_progress=False)
    reference = pl.read_parquet(uninterrupted.out_dir / "data.parquet")
    assert table["premise_id"].to_list() == reference["premise_id"].to_list()
    assert table.equals(reference)


def test_auto_backend_follows_the_measurements(monkeypatch):
    import sempa_train.stages.generation as sampling

    monkeypatch.setattr(sampling, "vllm_available", lambda: True)
    monkeypatch.setattr(sampling.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sampling, "busy_cores", lambda: 1.0)
    monkeypatch.setattr(sampling, "cpu_has_avx512", lambda: True)
    backend, reason = sampling.choose_backend("auto")
    assert backend == "vllm" and "CPU with AVX-512" in reason and "1.0 cores busy" in reason
    monkeypatch.setattr(sampling, "cpu_has_avx512", lambda: False)
    backend, reason = sampling.choose_backend("auto")
    assert backend == "transformers" and reason.startswith("CPU without AVX-512")
    assert sampling.choose_backend("vllm") == ("vllm", "asked for")  # an explicit choice is kept
    monkeypatch.setattr(sampling.torch.cuda, "is_available", lambda: True)
    assert sampling.choose_backend("auto") == ("vllm", "CUDA GPU")
    monkeypatch.setattr(sampling, "vllm_available", lambda: False)
    assert sampling.choose_backend("auto") == ("transformers", "vLLM is not installed")
    with pytest.raises(RuntimeError, match="vLLM is not installed"):
        sampling.choose_backend("vllm")


def test_an_isa_cap_below_avx512_hides_the_avx512_and_amx_flags():
    from sempa_train.core.models import usable_flags

    zen4 = frozenset({"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni"})
    assert usable_flags(zen4, {}) == zen4
    assert usable_flags(zen4, {"ONEDNN_MAX_CPU_ISA": "AVX2"}) == {"avx2", "fma"}
    assert usable_flags(zen4, {"ATEN_CPU_CAPABILITY": "default"}) == {"avx2", "fma"}
    assert usable_flags(zen4, {"ATEN_CPU_CAPABILITY": "avx512"}) == zen4
    assert usable_flags(zen4, {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}) == zen4  # MKL alone does not steer the choices


def test_sampling_sets_torch_threads_back_when_it_ends():
    import torch

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        TransformersBackend(None, None, restore_threads=3).close()  # sampling over: the count from before it
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)


def test_stop_at_newline_ends_candidates_at_their_first_line(tiny_model_dir, monkeypatch):
    import torch

    tokenizer = load_tokenizer(tiny_model_dir)
    cfg = cfg_for(tiny_model_dir, n=1, max_tokens=6)
    backend = build_backend(cfg, tiny_model_dir, "transformers")
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    words = tokenizer(" a dog runs fast", add_special_tokens=False)["input_ids"][:4]
    answer = [words[0], words[1], newline, words[2], words[3], words[0]]  # hits max_tokens without a stop
    calls = []

    def fake_generate(input_ids, **kwargs):  # the model as it would sample: a line, then more text
        calls.append(kwargs)
        return torch.cat([input_ids, torch.tensor([answer] * len(input_ids))], dim=1)

    monkeypatch.setattr(backend.model, "generate", fake_generate)
    prompt = tokenizer(["Say it.\n"], add_special_tokens=False)["input_ids"]
    free = backend.generate(prompt, [0], cfg.generation)[0][0]
    assert (free.completion_tokens, free.finish_reason) == (6, "length") and "\n" in free.text.strip()
    stopped = backend.generate(prompt, [0], cfg.replace(stop_at_newline=True).generation)[0][0]
    assert (stopped.completion_tokens, stopped.finish_reason) == (3, "stop")
    assert stopped.text == tokenizer.decode(answer[:3], skip_special_tokens=True)
    assert "stop_strings" not in calls[0] and calls[1]["stop_strings"] == ["\n"]  # transformers stops early too


def test_a_prompt_too_long_for_the_engine_is_a_counted_skip(tiny_model_dir, tiny_triples, tmp_path):
    from sempa_train.core.models import load_tokenizer
    from sempa_train.core.templates import PARAPHRASE_TEMPLATES
    from sempa_train.core.text import paraphrase_prompt

    table = pl.read_parquet(tiny_triples / "data.parquet").head(8)
    tok = load_tokenizer(tiny_model_dir)
    lengths = [len(tok(paraphrase_prompt(p, PARAPHRASE_TEMPLATES["P1"], tok, chat=True),
                       add_special_tokens=False)["input_ids"]) for p in table["premise"]]
    limit = sorted(lengths)[3] + 4  # the four longest prompts leave fewer than max_tokens=5
    cfg = cfg_for(tiny_model_dir, max_premises=8, n=1, max_tokens=5, max_model_len=limit)
    result = sample_candidates(cfg, tiny_triples, tmp_path / "cand", show_progress=False)
    kept = sum(n + 5 <= limit for n in lengths)
    assert result.counts["skipped_prompt_too_long"] == 8 - kept and result.counts["candidates"] == kept
