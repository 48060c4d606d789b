"""The two inspection commands, ``memory`` and ``sharing``: their options (one schema each, as every
other command's) and what they compute."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..devices import DeviceName


class MemoryOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field("resnet18", description="model spec, or several comma-separated (one table each; --plot "
                       "then compares them)")
    rules: str = Field("bp,fa,dfa", description="comma-separated rules, options after colons "
                       "(asap:k=4:saved_norm=bfloat16)")
    batch_size: int = Field(64, ge=1, description="samples in the measured step")
    num_classes: int = Field(10, ge=1, description="size of the model's logits")
    device: DeviceName = Field("auto", description="where the step runs: auto, cpu, cuda or cuda:N (auto: cuda where "
                        "available)")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="the step under autocast, as train "
                                                       "--precision")
    plot: str | None = Field(None, description="write the access bar chart to this file (.png or .svg)")
    out: str | None = Field(None, description="output folder: memory.json (the rows) and memory.md (the tables)")
    model_options: dict[str, Any] = Field(default_factory=dict)


    @field_validator("plot")
    @classmethod
    def _plot(cls, v):
        if v is not None and not v.endswith((".png", ".svg")):
            raise ValueError(f"plot file must end in .png or .svg, got {v!r}")
        return v


def memory(opts: MemoryOptions) -> str:
    """Measure and model every rule on every model; write what ``opts`` asks for; the tables as text."""
    from ..devices import resolve_device
    from ..diagnostics.memory_model import memory_table, plot_access, plot_access_across, to_markdown
    from ..rules import parse_spec
    from ..train.checkpoint import write_json, write_text

    device = resolve_device(opts.device)  # a CUDA device on a CPU build: one line, before anything runs
    names = [n.strip() for n in opts.rules.split(",") if n.strip()]
    for name in names:
        parse_spec(name)  # an unknown rule or a bad option: one line before anything is measured
    models = [m.strip() for m in opts.model.split(",") if m.strip()]
    tables = {m: memory_table(m, names, opts.batch_size, opts.num_classes, device, opts.model_options,
                              precision=opts.precision) for m in models}
    text = "\n".join(to_markdown(tables[m], m, opts.batch_size) for m in models)
    if opts.plot and len(tables) == 1:
        plot_access(tables[models[0]], models[0], opts.plot)
    elif opts.plot:
        plot_access_across(tables, opts.plot)
    if opts.out:
        out = Path(opts.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "memory.json", tables[models[0]] if len(tables) == 1 else tables)
        write_text(out / "memory.md", text)
    return text


class SharingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field("resnet18", description="model spec")
    rule: str = Field("asap", description="an activation-sharing rule, options after colons (asap:k=4, "
                      "as:reading=group-input)")
    num_classes: int = Field(10, ge=1, description="size of the model's logits")
    model_options: dict[str, Any] = Field(default_factory=dict)


def sharing(opts: SharingOptions) -> str:
    """The sharing plan of ``opts.rule`` on ``opts.model``, as a table."""
    from .. import models
    from ..registry import RULES
    from ..rules import build_spec
    from ..rules.activation_sharing import format_plan

    rule = build_spec(opts.rule, models.build(opts.model, num_classes=opts.num_classes, **opts.model_options),
                      opts.num_classes)
    plan = getattr(rule, "sharing_plan", None)
    if plan is None:
        able = [n for n in RULES.available() if hasattr(RULES.get(n).builder, "sharing_plan")]
        raise ValueError(f"rule {opts.rule!r} shares no activations; rules that do: {', '.join(able)}")
    return format_plan(plan())


__all__ = ["MemoryOptions", "SharingOptions", "memory", "sharing"]
