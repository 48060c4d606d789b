"""The README's promises: its rules table lists every rule, and its Python example runs."""

import re
from pathlib import Path

import creditflow as cf

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_rules_table_lists_every_registered_rule():
    table = re.search(r"## Rules\n(.*?)\n\n`creditflow rules`", README, re.S).group(1)
    names = re.findall(r"^\| `([a-z0-9-]+)` \|", table, re.M)
    assert sorted(names) == cf.rules.available()


def test_python_example_runs():
    code = re.search(r"## Python API\n\n.*?```python\n(.*?)```", README, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["logits"].shape == (10, 10)


def test_ci_runs_the_readme_test_command():
    ci = (Path(__file__).parents[1] / ".ci" / "run").read_text()
    command = next(line for line in README.splitlines() if line.startswith("pip install torch==2.13.0 && pip install -e \".[test]\""))
    assert "python -m pytest" in command
    assert 'grep -m1 -E \'^pip install torch==2\\.13\\.0 && pip install -e "\\.\\[test\\]"\'' in ci
