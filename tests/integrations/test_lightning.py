"""A rule inside PyTorch Lightning, manual optimization (examples/lightning_module.py), on the
embedded data. Skipped where lightning is not installed (the integrations stage of .ci/run
installs it beside torch==2.13.0)."""

import pytest

pytest.importorskip("lightning")

from tests.test_examples import load_example  # noqa: E402


@pytest.mark.parametrize("rule", ["dfa", "las"])
def test_lightning_module_trains_above_chance(rule):
    acc = load_example("lightning_module").train(rule, epochs=1)
    assert acc > 0.5  # chance is 0.1
