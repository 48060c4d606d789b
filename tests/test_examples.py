"""The examples users copy: a plain loop with label smoothing, accumulation and clipping
(examples/accumulate_and_clip.py) trains above chance on the embedded data. The Lightning
example runs in the integrations stage (tests/integrations/test_lightning.py)."""

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_accumulate_and_clip_trains_above_chance():
    acc = load_example("accumulate_and_clip").train("dfa", epochs=1)
    assert acc > 0.5  # chance is 0.1 on the ten classes
