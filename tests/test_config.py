import pytest

from sempa_train.core.config import EvalConfig, PrepareConfig, TrainConfig, add_arguments, config_from_args


def test_bad_values_are_quoted():
    with pytest.raises(ValueError, match="beta must be > 0, got -0.5"):
        TrainConfig(beta=-0.5)
    with pytest.raises(ValueError, match="pairing must be one of one, all, got 'some'"):
        PrepareConfig(pairing="some")
    with pytest.raises(ValueError, match="task must be one of .* got 'STS99'"):
        EvalConfig(tasks=("STS99",))
    with pytest.raises(ValueError, match="exactly once"):
        PrepareConfig(template="no placeholder")


def test_presets_follow_the_paper():
    paper = TrainConfig.preset("paper")
    recipe = (paper.lora_r, paper.lora_alpha, paper.learning_rate, paper.beta, paper.loss_type)
    assert recipe == (8, 32, 1e-4, 0.1, "sigmoid")
    assert paper.effective_batch_size == 256 and paper.batch_size == 8 and paper.bf16 is True
    assert (paper.warmup_ratio, paper.lr_scheduler, paper.epochs, paper.max_length) == (0.05, "cosine", 1.0, 1024)
    with pytest.raises(ValueError, match="unknown train preset 'gpu'"):
        TrainConfig.preset("gpu")


def test_yaml_file_flags_and_unknown_keys(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("preset: paper\nbeta: 0.5\nlora_r: 16\n")
    cfg = TrainConfig.load(path)
    assert (cfg.beta, cfg.lora_r, cfg.effective_batch_size) == (0.5, 16, 256)

    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser, TrainConfig)
    args = parser.parse_args(["--beta", "0.2", "--bf16", "false"])
    flagged = config_from_args(TrainConfig, args, base=cfg)
    assert (flagged.beta, flagged.bf16, flagged.lora_r) == (0.2, False, 16)  # flags win, the rest is kept

    path.write_text("betta: 0.5\n")
    with pytest.raises(ValueError, match=r"train\.yaml: unknown TrainConfig field\(s\): betta"):
        TrainConfig.load(path)


def test_numbers_are_read_as_yaml_and_the_cli_give_them(tmp_path):
    from sempa_train.plan import RunConfig

    path = tmp_path / "train.yaml"
    # YAML reads 5e-4 (no dot) as text and 125.0 as a float
    path.write_text("learning_rate: 5e-4\nmax_steps: 125.0\nloss_type: sigmoid,sft\nloss_weights: [1, 2e-1]\n")
    cfg = TrainConfig.load(path)
    assert (cfg.learning_rate, cfg.max_steps, cfg.loss_weights) == (5e-4, 125, (1.0, 0.2))
    assert type(cfg.max_steps) is int and type(cfg.learning_rate) is float
    for values, message in [({"learning_rate": "fast"}, "learning_rate: expected a number, got 'fast'"),
                            ({"max_steps": 12.5}, "max_steps: expected an integer, got 12.5"),
                            ({"max_steps": True}, "max_steps: expected an integer, got True"),
                            ({"loss_weights": "1,x"}, "loss_weights: expected a number, got 'x'")]:
        with pytest.raises(ValueError, match=message):
            TrainConfig.from_dict(values)
    run = tmp_path / "run.yaml"
    run.write_text("train: {max_steps: 50}\n")
    with pytest.raises(ValueError, match=r"run.yaml with overrides: train: learning_rate: expected a number"):
        RunConfig.build(run, overrides={"train": {"learning_rate": "fast"}})
    with pytest.raises(ValueError, match=r"run.yaml: train: unknown train preset 'nope'"):
        RunConfig.build(run, preset="nope")


def test_tasks_accept_comma_strings():
    assert EvalConfig.from_dict({"tasks": "STS12, STSBenchmark"}).tasks == ("STS12", "STSBenchmark")


def test_the_policy_is_stated_once_for_a_run(tmp_path):
    from sempa_train.plan import RunConfig

    cfg = RunConfig.build(overrides={"policy": {"template": "P3", "chat_template": "off"}}, model="my-model")
    assert (cfg.sample.model, cfg.train.model, cfg.policy_model) == ("my-model",) * 3
    assert cfg.sample.template == cfg.rank.template == "P3"
    assert cfg.retention.template == cfg.train.eval_template == "P1"  # the paraphrase probes' fixed yardstick
    assert cfg.sample.chat_template == cfg.train.chat_template == cfg.retention.chat_template == "off"
    config = tmp_path / "run.yaml"
    config.write_text("sample: {model: other-model, n: 2}\n")
    with pytest.raises(ValueError, match=r"run.yaml: sample.model: the policy's model is set once, in the policy"):
        RunConfig.build(config)


def test_run_and_stage_config_files_share_one_reader(tmp_path):
    from sempa_train.plan import RunConfig, artifact_hash

    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="list.yaml: a run config must be a mapping of sections"):
        RunConfig.build(bad)
    with pytest.raises(ValueError, match="list.yaml: a config file must hold a mapping"):
        TrainConfig.load(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert RunConfig.build(empty) == RunConfig()  # an empty run config: the defaults
    with pytest.raises(ValueError, match="must hold a mapping"):
        TrainConfig.load(empty)  # an empty stage config file is refused, as before
    with pytest.raises(FileNotFoundError, match="not a LoRA adapter folder"):
        artifact_hash("adapter", tmp_path)


def test_a_plain_cluster_address_off_loopback_is_refused_unless_insecure():
    from sempa_train.core.config import ClusterConfig

    with pytest.raises(ValueError, match="plain connection to a non-loopback host"):
        ClusterConfig(address="tcp://10.0.0.5:8786")
    with pytest.raises(ValueError, match="plain connection"):
        ClusterConfig(address="tcp://0.0.0.0:8786")
    with pytest.raises(ValueError, match="plain connection"):
        ClusterConfig(address="10.0.0.5:8786")  # no scheme: Dask's default, tcp
    for ok in ("tcp://127.0.0.1:8786", "tcp://localhost:8786", "tcp://[::1]:8786", "127.0.0.1:8786"):
        assert ClusterConfig(address=ok).security is None
    assert ClusterConfig(address="tcp://10.0.0.5:8786", insecure=True).enabled
    with pytest.raises(ValueError, match="is TLS: give tls_ca_file"):
        ClusterConfig(address="tls://10.0.0.5:8786")
    with pytest.raises(ValueError, match="needs all of"):
        ClusterConfig(address="tls://10.0.0.5:8786", tls_ca_file="ca.pem")
