"""The run schema: one validated config shared by YAML files and CLI flags.

Every field has a default, so an empty config is a valid run (the embedded dataset, an MLP, BP).
Unknown keys and bad values are errors that name what is allowed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticUndefined

from ..devices import DeviceName
from ..registry import DATASETS, MODELS, RULES

#: config keys that say where a run's work happens, not what it computes: a run resumes across them
PLACEMENT_KEYS = frozenset({"stages", "backend", "out", "jobs"})


def config_key(config: BaseModel) -> str:
    """8 hex digits of the config's hash: default folders of different runs differ.

    Hashes only the values that differ from the schema's defaults (less placement keys), so that an
    option added later, at its default, leaves the default folder of an older command unchanged and
    re-running that command resumes its run.
    """
    defaults = schema_defaults(type(config))
    values = {k: v for k, v in config.model_dump(mode="json").items()
              if k not in PLACEMENT_KEYS and (k not in defaults or v != defaults[k])}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]


class ConfigError(ValueError):
    """A config that does not validate; the message lists every problem."""


def registered(registry, name: str) -> str:
    if name not in registry:
        raise ValueError(registry.unknown_message(name))
    return name


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: str = Field("fashion-mnist-mini", description="dataset name (creditflow datasets)")
    data_dir: str | None = Field(None, description="folder holding the dataset files")
    download: bool = Field(True, description="download missing datasets (checksum-verified)")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of the training set held out for validation")
    augment: str = Field("none", description="batch augmentations, e.g. flip,crop,cutout (or none)")

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v):
        return registered(DATASETS, v)


class OptimConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(10, ge=1, description="training epochs")
    batch_size: int = Field(64, ge=1, description="training batch size")
    optimizer: Literal["adam", "sgd"] = Field("adam", description="optimizer")
    lr: float = Field(1e-4, gt=0, description="learning rate")
    local_lr: float | None = Field(None, gt=0, description="learning rate of rule-owned modules (LAS/LTAS modules, DTP inverses, AL label side); default: lr")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(0.0, ge=0, description="L2 weight decay")
    schedule: Literal["none", "cosine", "step"] = Field("none", description="learning-rate schedule")
    step_size: int = Field(30, ge=1, description="epochs between decays (schedule=step)")
    gamma: float = Field(0.1, gt=0, le=1, description="decay factor (schedule=step)")


class ParallelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    parallel: Literal["none", "ddp", "pipeline"] = Field(
        "none", description="none; ddp: data parallel over --nproc processes; pipeline: blocks/components over --stages")
    nproc: int = Field(2, ge=1, description="processes for --parallel ddp")
    stages: int = Field(2, ge=1, description="pipeline stages (processes) for --parallel pipeline")
    pipeline_schedule: Literal["sync", "async"] = Field(
        "sync", description="pipeline schedule: sync (equals single-process training) or async (stale errors, faster)")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="torch.distributed backend (auto: nccl on CUDA, else gloo)")


class RunConfig(DataConfig, OptimConfig, ParallelConfig):
    """One training run: a rule on a model and a dataset."""

    rule: str = Field("bp", description="credit-assignment rule (creditflow rules)")
    model: str = Field("mlp:784-1024-1024-10", description="model spec (creditflow models)")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="fp32; bf16: autocast to bfloat16; fp16: autocast to float16 with loss scaling (a GradScaler)")
    deterministic: bool = Field(False, description="deterministic algorithms, so that CUDA runs repeat (slower; an op "
                                "without a deterministic kernel fails by name)")
    compile: bool = Field(False, description="torch.compile the parts the rule's step runs (rule.compile(): inductor)")
    rule_options: dict[str, Any] = Field(default_factory=dict, description="extra rule arguments, key=value")
    model_options: dict[str, Any] = Field(default_factory=dict, description="extra model arguments, key=value")
    seed: int = Field(0, ge=0, description="seed for init, split, data order and augmentation")
    device: DeviceName = Field("auto", description="training device: auto, cpu, cuda or cuda:N")
    out: str | None = Field(None, description="output folder (default runs/<rule>-<dataset>-s<seed>-<hash of the config>)")
    eval_batch_size: int = Field(1000, ge=1, description="batch size for evaluation")
    test_every: Literal["epoch", "best"] = Field(
        "epoch", description="evaluate the test set every epoch, or only at a new best validation epoch and the "
        "last (the reported accuracy is the same; saves the test pass on other epochs)")
    max_steps_per_epoch: int | None = Field(None, ge=1, description="cap on training steps per epoch (smoke runs)")
    divergence_factor: float = Field(
        1e4, ge=0, description="stop the run when a step's loss exceeds this many times the first step's (0: off; "
                               "a NaN/Inf loss always stops it)")

    @model_validator(mode="after")
    def _precision_where_it_runs(self):
        if self.precision != "fp32" and self.parallel == "pipeline":
            raise ValueError(f"--precision {self.precision} runs with --parallel none or ddp; the pipeline's stages "
                             "train in fp32")
        return self


    @field_validator("rule")
    @classmethod
    def _rule(cls, v):
        return registered(RULES, v)

    @field_validator("model")
    @classmethod
    def _model(cls, v):
        registered(MODELS, v.partition(":")[0])
        return v

    def out_dir(self) -> Path:
        # the hash: two runs differing in anything but where they run (model, lr, epochs...) never share a folder
        return Path(self.out or f"runs/{self.rule}-{self.dataset}-s{self.seed}-{config_key(self)}")

    def rule_arguments(self) -> dict[str, Any]:
        """The rule's own options (``--rule-option key=value``), e.g. ``feedback_init=product``."""
        return dict(self.rule_options)


class CompareConfig(RunConfig):
    """Several rules on the same model, data and seeds."""

    rules: list[str] = Field(default_factory=lambda: ["bp", "shallow", "fa", "dfa"],
                             description="rules to compare, comma-separated, options after colons (asap:k=4)")
    seeds: int = Field(3, ge=1, description="number of seeds (seed, seed+1, ...)")
    jobs: int = Field(1, ge=1, description="runs side by side, one thread each (as reproduce --jobs)")

    @field_validator("rules", mode="before")
    @classmethod
    def _rules(cls, v):
        names = [s.strip() for s in v.split(",") if s.strip()] if isinstance(v, str) else list(v)
        if not names:
            raise ValueError("rules must name at least one rule")
        from ..rules import parse_spec  # (the rules package imports this module's neighbours)

        for spec in names:
            parse_spec(spec)  # an unknown rule or a malformed option: one line naming it
        if len(set(names)) < len(names):
            raise ValueError(f"rules names one twice: {names}")
        return names

    def out_dir(self) -> Path:
        return Path(self.out or f"runs/compare-{self.dataset}-{config_key(self)}")

    def run(self, spec: str, seed: int) -> RunConfig:
        """The run of one entry of ``rules`` (``"asap:k=4"``: its options over ``rule_options``)."""
        from ..rules import parse_spec

        name, options = parse_spec(spec)
        fields = self.model_dump(exclude={"rules", "seeds", "jobs", "out", "rule", "seed", "rule_options"})
        return RunConfig(**fields, rule=name, rule_options={**self.rule_options, **options}, seed=seed,
                         out=str(self.out_dir() / spec.replace(":", "-") / f"seed{seed}"))


def validate(schema: type[BaseModel], values: dict[str, Any]) -> BaseModel:
    """Validate ``values`` against ``schema``; errors become one ConfigError naming each bad key."""
    try:
        return schema.model_validate(values)
    except ValidationError as err:
        lines = []
        for problem in err.errors():
            key = ".".join(str(p) for p in problem["loc"]) or "config"
            if problem["type"] == "extra_forbidden":
                allowed = ", ".join(sorted(schema.model_fields))
                lines.append(f"unknown key {key!r}; allowed: {allowed}")
            else:
                msg = problem["msg"].removeprefix("Value error, ")
                lines.append(f"{key}: {msg} (got {problem.get('input')!r})")
        raise ConfigError("invalid config: " + "; ".join(lines)) from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as err:  # its str() is a multi-line drawing; the mark and the problem say it in one
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
    except OSError as err:  # a folder, a file we may not read
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def dump_yaml(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def schema_defaults(schema: type[BaseModel]) -> dict[str, Any]:
    """``{field: default}`` of a schema, in its JSON form (what a saved config.yaml would hold)."""
    out = {}
    for name, field in schema.model_fields.items():
        if field.default_factory is not None:
            out[name] = field.default_factory()
        elif field.default is not PydanticUndefined:
            out[name] = field.default
    return out
