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
