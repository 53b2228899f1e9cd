"""The README's commands are the ones CI and users run."""

from conftest import REPO


def readme_commands() -> list[str]:
    lines = (REPO / "README.md").read_text().splitlines()
    return [line.strip() for line in lines if line.strip().startswith("python3 -m venv .venv")]


def test_ci_runs_the_readme_test_command():
    commands = readme_commands()
    assert len(commands) == 2, "README must open with exactly two set-up commands"
    test_command = next(c for c in commands if c.endswith("pytest"))
    assert test_command in (REPO / ".ci" / "run").read_text().splitlines()


def test_install_pins_cpu_torch_in_the_same_command():
    for command in readme_commands():
        assert "pip install torch==2.13.0 -e " in command


def test_the_library_never_imports_prefect_or_the_pipelines():
    import ast

    for path in (REPO / "sempa_train").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert name.split(".")[0] not in ("prefect", "prefect_dask", "pipelines"), f"{path}: imports {name}"


def test_the_default_recipe_is_a_valid_run_config():
    import yaml

    from sempa_train.cli import RECIPE
    from sempa_train.plan import RunConfig

    cfg = RunConfig.build(RECIPE)
    assert cfg.train.eval_every and cfg.train.select_min_paraphrase_delta is not None
    assert cfg.eval.split == "dev"  # tuned on dev only
    full = next(d for d in yaml.safe_load((REPO / "flows.yaml").read_text())["deployments"] if d["name"] == "full")
    assert (REPO / full["parameters"]["config"]).resolve() == RECIPE


def test_the_quick_recipe_is_the_full_recipe_at_a_smaller_budget():
    """The default run (recipe_smollm2_quick.yaml) differs from the full recipe only in budget and scale search."""
    from sempa_train.plan import RunConfig

    configs = REPO / "sempa_train" / "configs"
    quick = RunConfig.build(configs / "recipe_smollm2_quick.yaml").to_dict()
    full = RunConfig.build(configs / "recipe_smollm2.yaml").to_dict()
    differs = {(section, name) for section in quick for name in quick[section]
               if quick[section][name] != full[section][name]}
    assert differs == {("prepare", "max_premises"), ("sample", "shard_size"), ("train", "max_steps"),
                       ("train", "select_scales")}
