"""Command line: argument handling only; training logic lives in ``creditflow.train``.

Flags are generated from the run schema, so a YAML key and a flag are the same thing
(``lr:`` in a file, ``--lr`` on the command line); flags override the file.

One error path: :class:`Main` turns every failure of a command into one line on stderr and a
non-zero exit (2 for bad input: a config error or any ValueError, whose message names what is allowed;
1 for the rest); ``--debug`` or ``CREDITFLOW_DEBUG=1`` shows the
traceback instead.
"""

from __future__ import annotations

import logging
import os
import sys
import types
import typing
from typing import Any

import click
from pydantic import BaseModel

from .jobs.align import AlignConfig
from .jobs.analyze import AnalyzeOptions
from .jobs.inspect import MemoryOptions, SharingOptions
from .jobs.reproduce import ReproduceOptions
from .registry import DATASETS, MODELS, RULES
from .train.config import CompareConfig, ConfigError, RunConfig
from .train.preemption import Preempted

SKIP = {"rule_options", "model_options"}


#: what ``--help`` lists first, in this order (the rest follow in the schema's order)
FIRST = ("rule", "rules", "model", "dataset", "data_dir", "epochs", "batch_size", "optimizer", "lr", "seed", "seeds",
         "device", "out")


def schema_options(schema: type[BaseModel], exclude: set[str] = frozenset()):
    """Click options for every schema field; defaults stay None so we know what was given. The most
    used come first (:data:`FIRST`)."""

    def decorate(command):
        fields = list(schema.model_fields.items())
        fields.sort(key=lambda f: FIRST.index(f[0]) if f[0] in FIRST else len(FIRST))  # stable
        for name, field in reversed(fields):
            if name in SKIP or name in exclude:
                continue
            flag = "--" + name.replace("_", "-")
            annotation = field.annotation
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
                annotation = args[0]  # Optional[int] -> int
            kwargs: dict[str, Any] = {"default": None, "help": field.description,
                                      "show_default": shown_default(field)}
            if typing.get_origin(annotation) is typing.Literal:
                kwargs["type"] = click.Choice(typing.get_args(annotation))
            elif annotation is bool:
                flag = f"{flag}/--no-{name.replace('_', '-')}"
            elif annotation in (int, float):
                kwargs["type"] = annotation
            elif typing.get_origin(annotation) is list:
                kwargs["type"] = str
            command = click.option(flag, name, **kwargs)(command)
        return command

    return decorate


def shown_default(field) -> str | bool:
    """What ``--help`` shows as a flag's default: the schema's (the flag's own default stays None)."""
    value = field.get_default(call_default_factory=True)
    if value is None:
        return False
    if isinstance(value, bool):
        return "true" if value else "false"
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def key_values(pairs: tuple[str, ...], flag: str) -> dict[str, Any]:
    """``("feedback_scale=0.5",)`` -> ``{"feedback_scale": 0.5}``; values parsed as YAML scalars."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected key=value, got {pair!r}", param_hint=flag)
        out[key.replace("-", "_")] = yaml.safe_load(value)
    return out


def resolve(schema, config_file, flags: dict[str, Any], rule_option=(), model_option=()):
    """Defaults < YAML file < flags, validated once by the schema."""
    from .train.config import load_yaml, validate

    values = load_yaml(config_file) if config_file else {}
    values.update({k: v for k, v in flags.items() if v is not None})
    for key, pairs, flag in (("rule_options", rule_option, "--rule-option"),
                             ("model_options", model_option, "--model-option")):
        if pairs:
            values[key] = {**values.get(key, {}), **key_values(pairs, flag)}
    return validate(schema, values)  # ConfigError: bad input, exit code 2 (Main)


def common(command):
    command = click.option("--restart", is_flag=True,
                           help="start the run in --out over (the same command otherwise resumes it)")(command)
    command = click.option("--resume", is_flag=True,
                           help="continue the run in --out from its checkpoint (the default where it has one)")(command)
    return job_options(command)


def training(command):
    """``train``'s own flags besides :func:`common`."""
    return click.option("--extend", is_flag=True,
                        help="continue a finished run with more --epochs, the rest of its config unchanged")(command)


def job_options(command):
    """What every job command takes besides its schema: a config file, quiet, rule and model options."""
    command = click.option("--config", "config_file", type=click.Path(dir_okay=False),
                           help="YAML file with any of these options")(command)
    command = click.option("--quiet", is_flag=True, help="no progress bar or epoch log")(command)
    command = click.option("--overwrite", is_flag=True,
                           help="replace the run in --out even if its config differs")(command)
    command = click.option("--rule-option", multiple=True, metavar="KEY=VALUE",
                           help="extra rule argument, e.g. feedback_scale=0.5")(command)
    command = click.option("--model-option", multiple=True, metavar="KEY=VALUE",
                           help="extra model argument, e.g. activation=tanh")(command)
    return command


def main_rank() -> bool:
    """False in a torchrun launch's ranks but 0: they train and stay quiet (rank 0 reports)."""
    return int(os.environ.get("RANK", "0")) == 0


def setup_logging(quiet: bool) -> bool:
    quiet = quiet or not main_rank()
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    return not quiet and sys.stderr.isatty()


class OneLineUsageError(click.ClickException):
    """Bad input (a flag value, a config file): one line and exit code 2, without click's usage block."""

    exit_code = 2


def debugging(ctx: click.Context | None = None) -> bool:
    if os.environ.get("CREDITFLOW_DEBUG", "").strip() not in ("", "0"):
        return True
    return bool(ctx is not None and ctx.meta.get("creditflow.debug"))


def _set_debug(ctx, param, value):
    if value:
        ctx.meta["creditflow.debug"] = True  # meta is shared by the group's and the command's contexts


def debug_option() -> click.Option:
    return click.Option(["--debug"], is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
                        help="show the traceback of a failure instead of one line (or CREDITFLOW_DEBUG=1)")


def expected_errors() -> tuple[type[BaseException], ...]:
    """Failures that are the input's or the machine's, not the program's: their message is the whole story."""
    from .parallel.launch import WorkerFailed
    from .train import Diverged

    return (ValueError, OSError, ImportError, Diverged, WorkerFailed)


def one_line(err: BaseException) -> str:
    """The first line of ``err``'s message (a worker's failure carries its traceback after it)."""
    if isinstance(err, OSError) and err.strerror:
        text = f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    else:
        text = str(err)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


class Main(click.Group):
    """The ``creditflow`` group: every command gets ``--debug``, and every failure becomes one line."""

    def add_command(self, cmd, name=None):
        cmd.params.append(debug_option())
        super().add_command(cmd, name)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.Abort, OneLineUsageError):
            raise
        except click.UsageError as err:  # a bad flag of a command: its message names what is allowed
            if debugging(ctx):
                raise
            command = f"{ctx.command_path} {err.ctx.info_name}" if err.ctx and err.ctx is not ctx else ctx.command_path
            raise OneLineUsageError(f"{err.format_message()} ({command} --help lists the options)") from None
        except click.ClickException:
            raise
        except Preempted as err:  # a signal stopped the run after a checkpoint: say where, exit 128 + signal
            click.echo(one_line(err), err=True)
            ctx.exit(err.exit_code)
        except Exception as err:  # noqa: BLE001  (the one error path; --debug shows the traceback)
            if debugging(ctx):
                raise
            if isinstance(err, (ConfigError, ValueError)):  # the input's fault: its message says what is allowed
                raise OneLineUsageError(one_line(err)) from None
            if isinstance(err, expected_errors()):
                raise click.ClickException(one_line(err)) from None
            raise click.ClickException(f"internal error, {type(err).__name__}: {one_line(err)} (rerun with "
                                       "--debug for the traceback, and please report it)") from None


@click.group(cls=Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="creditflow")
def main():
    """creditflow: train neural networks with credit-assignment rules beyond backpropagation."""


main.params.append(debug_option())  # `creditflow --debug train ...` as well as `creditflow train --debug`


def run_job(schema, job, config_file, quiet, rule_option, model_option, flags, **how):
    """Resolve the config and run ``job(cfg, progress=, **how)`` (failures: :class:`Main`)."""
    cfg = resolve(schema, config_file, flags, rule_option, model_option)
    progress = setup_logging(quiet)
    return cfg, job(cfg, progress=progress, **how)


@main.command()
@schema_options(RunConfig)
@common
@training
def train(config_file, resume, restart, extend, overwrite, quiet, rule_option, model_option, **flags):
    """Train one rule on one model and dataset; writes config, metrics, checkpoint, summary."""
    from .train import train as run_train

    cfg, summary = run_job(RunConfig, run_train, config_file, quiet, rule_option, model_option, flags,
                           resume=resume, restart=restart, extend=extend, overwrite=overwrite)
    if summary is None or not main_rank():  # a non-zero rank of a torchrun launch: rank 0 reports
        return
    click.echo(f"{cfg.rule}: test accuracy {summary['test_acc']:.4f} at best validation epoch "
               f"{summary['best_epoch']} ({summary['selection']}); results in {cfg.out_dir()}")


@main.command()
@schema_options(CompareConfig, exclude={"rule"})
@common
def compare(config_file, resume, restart, overwrite, quiet, rule_option, model_option, **flags):
    """Compare rules on the same model, data and seeds (default: BP, Shallow, FA, DFA on the embedded data)."""
    from .jobs.compare import compare as run_compare
    from .jobs.compare import to_markdown

    cfg, rows = run_job(CompareConfig, run_compare, config_file, quiet, rule_option, model_option, flags,
                        resume=resume, restart=restart, overwrite=overwrite)
    click.echo(to_markdown(rows, cfg))
    click.echo(f"results in {cfg.out_dir()}/results.md, results.csv, results.json")


@main.command()
@schema_options(AlignConfig, exclude={"rule"})
@job_options
def align(config_file, overwrite, quiet, rule_option, model_option, **flags):
    """Train rules from one initialisation; measure each block's signal against BP's gradient (cosine)."""
    from .jobs.align import align as run_align
    from .jobs.align import to_markdown

    cfg, summary = run_job(AlignConfig, run_align, config_file, quiet, rule_option, model_option, flags,
                           overwrite=overwrite)  # the same command again resumes each rule's run
    click.echo(to_markdown(summary))
    plots = ", alignment.png, alignment.svg" if cfg.plot else ""
    click.echo(f"results in {cfg.out_dir()}/alignment.jsonl, alignment.csv, summary.json{plots}")


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, metavar="RUN_DIR...")
@click.option("--quiet", is_flag=True, help="no progress bar or log")
@schema_options(AnalyzeOptions)
def analyze(run_dirs, quiet, **flags):
    """Class distances and t-SNE of each layer of finished runs, and their metric families (AL paper Sec. 5.3-5.4)."""
    from .jobs.analyze import analyze as run_analyze
    from .jobs.analyze import runs_markdown, to_markdown

    opts = resolve(AnalyzeOptions, None, flags)
    progress = setup_logging(quiet)
    results = []
    for run_dir in run_dirs:
        results.append(run_analyze(run_dir, opts, progress=progress))
        click.echo(to_markdown(results[-1]))
        click.echo(f"results in {run_dir.rstrip('/')}/analysis/")
    if len(results) > 1:
        click.echo(runs_markdown(results))


@main.command()
@click.argument("preset", required=False)
@click.option("--list", "list_presets", is_flag=True, help="list the presets, their budgets and run times, and exit")
@click.option("--quiet", is_flag=True, help="no progress bar or epoch log")
@schema_options(ReproduceOptions)
def reproduce(preset, list_presets, quiet, **flags):
    """Reproduce a paper table (PRESET: a name from --list, or a preset .yaml); --budget quick|cpu|full."""
    from .jobs.reproduce import listing
    from .jobs.reproduce import reproduce as run_reproduce

    if list_presets:
        click.echo(listing())
        return
    if preset is None:
        raise click.UsageError("name a PRESET (see --list)")
    opts = resolve(ReproduceOptions, None, flags)
    progress = setup_logging(quiet)
    results = run_reproduce(preset, opts, progress=progress)  # failures: Main's one error path
    click.echo(results["report"])
    click.echo(f"results in {results['out']}/report.md, results.json")


@main.command()
@schema_options(MemoryOptions, exclude={"model_options"})
@click.option("--model-option", multiple=True, metavar="KEY=VALUE", help="extra model argument, e.g. width=16")
def memory(model_option, **flags):
    """Memory per rule: bytes saved for backward (measured) and external memory accesses (modelled)."""
    from .jobs.inspect import memory as run_memory

    click.echo(run_memory(resolve(MemoryOptions, None, flags, model_option=model_option)))


@main.command()
@schema_options(SharingOptions, exclude={"model_options"})
@click.option("--model-option", multiple=True, metavar="KEY=VALUE", help="extra model argument, e.g. width=16")
def sharing(model_option, **flags):
    """Which activation every layer's weight (and B) gradient reads under activation sharing."""
    from .jobs.inspect import sharing as run_sharing

    click.echo(run_sharing(resolve(SharingOptions, None, flags, model_option=model_option)))


def listing(registry):
    width = max(len(n) for n in registry.entries)
    for name in registry.available():
        entry = registry.entries[name]
        paper = f"  [{entry.paper}]" if entry.paper else ""
        click.echo(f"{name:<{width}}  {entry.summary}{paper}")


@main.command()
def rules():
    """List the credit-assignment rules."""
    listing(RULES)


@main.command()
def models():
    """List the model families."""
    listing(MODELS)


@main.command()
@click.option("--data-dir", help="also look here (as train --data-dir: only here, for the datasets it holds)")
def datasets(data_dir):
    """List the datasets, and which are present on this machine and where."""
    from .data.sources import LOCATABLE, find_local

    listing(DATASETS)
    click.echo("")
    width = max(len(n) for n in DATASETS.entries)
    for name in DATASETS.available():
        if name not in LOCATABLE:  # shipped inside the package
            click.echo(f"{name:<{width}}  present: embedded in the package")
            continue
        found = find_local(name, data_dir)
        elsewhere = find_local(name) if found is None and data_dir is not None else None
        if found is not None:
            click.echo(f"{name:<{width}}  present: {found[0]} ({found[1]})")
        elif elsewhere is not None:  # --data-dir is strict: a run given it would not read this copy
            click.echo(f"{name:<{width}}  not in --data-dir; present at {elsewhere[0]} ({elsewhere[1]}), which runs "
                       "read when --data-dir is left out")
        else:
            where = LOCATABLE[name][0]
            how = "downloaded on first use" if where.resources else "no download"
            click.echo(f"{name:<{width}}  absent ({how}); to get it: {where.how_to}")


if __name__ == "__main__":  # pragma: no cover
    main()
