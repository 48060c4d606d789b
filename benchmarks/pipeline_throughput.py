"""Pipeline throughput: measured at S = 1, 2 stages, modelled at S = 1..8, against the ideal S x line.

    PYTHONPATH=src python benchmarks/pipeline_throughput.py                  # cpu (2 stages at most here)
    PYTHONPATH=src python benchmarks/pipeline_throughput.py --device cuda --stages 1,2,4,8

For each case (a rule on a model, at a schedule):

1. **single process**: ``rule.step(x, y); opt.step(); opt.zero_grad()`` over the same batches, in
   this process (the S = 1 point and the base of the ideal ``S x`` line).
2. **measured pipelines** at each S of ``--stages`` that the machine has room for (S processes;
   on CPU at most the core count): :func:`creditflow.parallel.pipeline.fit` over ``--steps``
   micro-batches, including the pipeline's fill and drain; samples/s from the first stage's first
   step to the last stage's end.
3. **model** for every S up to ``--model-max``: per-unit forward and update times measured in one
   process (the pipeline's own stage code, one unit per stage, each timestamp after a CUDA
   synchronize), units split by :func:`~creditflow.parallel.stages.partition` on those times, and the
   communication cost ``a + b * bytes`` fitted to a gloo/NCCL ping-pong between two processes.
   Period per micro-batch: pipelined schedules (AL; DRTP; async direct rules)
   ``max_s (F_s + U_s + comm in + comm out)``; sync direct rules
   ``sum_s F_s + sum comm + max_s U_s`` (forwards in turn, updates at once).

Writes ``pipeline_<device>.{json,md,png}`` under ``--out``. Timings on a shared machine are noisy:
the JSON keeps the machine's load average beside them.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # step_time.py beside this file
from step_time import steady_malloc  # noqa: E402  (glibc thresholds, inherited by spawned workers)

import creditflow as cf  # noqa: E402
from creditflow.parallel.launch import launch  # noqa: E402
from creditflow.parallel.pipeline import fit  # noqa: E402
from creditflow.parallel.stages import Stage, make_plan, partition  # noqa: E402

#: name -> (rule, model spec, schedule); batch size, classes and input shape from the options
CASES = {
    "al-2": ("al", "al-mlp:784-512-512-10", "sync"),
    "al-4": ("al", "al-mlp:784-512-512-512-512-10", "sync"),
    "al-8": ("al", "al-mlp:784-512-512-512-512-512-512-512-512-10", "sync"),
    "dfa-sync": ("dfa", "mlp:784-1024-1024-1024-1024-10", "sync"),
    "dfa-async": ("dfa", "mlp:784-1024-1024-1024-1024-10", "async"),
    "drtp": ("drtp", "mlp:784-1024-1024-1024-1024-10", "sync"),
}
DEPTH_CASES = ("al-2", "al-4", "al-8")


def optimizer(params):
    return torch.optim.Adam(params, lr=1e-4)


def build(case: str, seed: int = 0):
    rule_name, spec, schedule = CASES[case]
    torch.manual_seed(seed)
    model = cf.models.build(spec, input_shape=(784,), num_classes=10)
    return cf.rules.build(rule_name, model, 10), schedule


def make_batches(n: int, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 784, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(n)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def single_process(case: str, batches, device, warmup: int) -> float:
    rule, _ = build(case)
    rule.to(device)
    opt = optimizer(rule.param_groups())
    data = [(x.to(device), y.to(device)) for x, y in batches]
    for x, y in data[:warmup]:
        rule.step(x, y)
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    start = time.perf_counter()
    for x, y in data[warmup:]:
        rule.step(x, y)
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    return sum(len(y) for _, y in data[warmup:]) / (time.perf_counter() - start)


def unit_times(case: str, batch: int, device, repeats: int) -> dict:
    """Per unit: forward seconds, update seconds (backward + optimizer step), bytes sent on."""
    rule, _ = build(case)
    n_units = len(make_plan(rule, 1).costs)
    plan = make_plan(rule, n_units)  # one unit per stage
    stages = [Stage(rule, plan, i).to(device) for i in range(n_units)]
    opts = [optimizer(s.param_groups()) if s.param_groups() else None for s in stages]
    x, y = make_batches(1, batch)[0]
    x, y = x.to(device), y.to(device)
    fwd = [[] for _ in stages]
    upd = [[] for _ in stages]
    sent = [0] * n_units
    for r in range(repeats + 1):  # the first round warms up
        inputs = rule.first_inputs(x, y)
        records = []
        for i, s in enumerate(stages):
            sync(device)
            t0 = time.perf_counter()
            record, pairs, send = s.forward(inputs, y)
            sync(device)
            if r:
                fwd[i].append(time.perf_counter() - t0)
            records.append((record, pairs))
            sent[i] = sum(t.numel() * t.element_size() for t in send)
            inputs = send
        error = rule.output_error(records[-1][0])
        for i, (s, (rec, pairs)) in enumerate(zip(stages, records)):
            sync(device)
            t0 = time.perf_counter()
            s.update(rec, pairs, error if s.needs_output or s.is_last else None)
            if opts[i] is not None:
                opts[i].step()
                opts[i].zero_grad(set_to_none=True)
            sync(device)
            if r:
                upd[i].append(time.perf_counter() - t0)
    med = statistics.median
    return {"forward_s": [med(t) for t in fwd], "update_s": [med(t) for t in upd], "sent_bytes": sent,
            "needs_output": any(s.needs_output for s in stages),
            "header_bytes": 8 * (2 + batch), "error_bytes": 4 * batch * 20}


def _pingpong(rank, world, sizes, repeats):
    import torch.distributed as dist

    from creditflow.parallel.launch import worker_device

    dev = worker_device() if dist.get_backend() == "nccl" else torch.device("cpu")
    out = []
    for n in sizes:
        buf = torch.zeros(max(1, n // 4), device=dev)
        times = []
        for r in range(repeats + 2):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            else:
                dist.recv(buf, 0)
                dist.send(buf, 0)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if r >= 2:
                times.append((time.perf_counter() - t0) / 2)
        out.append(statistics.median(times))
    return out


def comm_cost(device: str, backend: str) -> dict:
    """One-way time of a message of b bytes, ``a + slope * b``, from a ping-pong between two processes."""
    sizes = [4 * 2 ** k for k in range(0, 23, 2)]  # 4 B .. 16 MiB
    times = launch(_pingpong, 2, (sizes, 20), backend=backend, device=device, role="rank")[0]
    # latency: the smallest message; bandwidth: the two largest (a least-squares fit lets a noisy
    # large message swamp the latency)
    latency = times[0]
    slope = max((times[-1] - times[-2]) / (sizes[-1] - sizes[-2]), (times[-1] - latency) / sizes[-1], 0.0)
    return {"latency_s": latency, "seconds_per_byte": slope, "sizes": sizes, "times_s": times}


def model_period(units: dict, S: int, comm: dict, schedule: str, batch: int) -> tuple[float, list[range]]:
    """Modelled seconds per micro-batch of an S-stage pipeline (see the module docstring)."""
    F, U, sent = units["forward_s"], units["update_s"], units["sent_bytes"]
    parts = partition([f + u for f, u in zip(F, U)], S)

    def msg(b):
        return comm["latency_s"] + comm["seconds_per_byte"] * b

    cross = [msg(units["header_bytes"]) + msg(sent[r.stop - 1]) for r in parts[:-1]]  # boundary s -> s+1
    err = msg(units["error_bytes"]) if units["needs_output"] and S > 1 else 0.0
    Fs = [sum(F[i] for i in r) for r in parts]
    Us = [sum(U[i] for i in r) for r in parts]
    if units["needs_output"] and schedule == "sync":
        return sum(Fs) + sum(cross) + err + max(Us), parts
    stage = [Fs[s] + Us[s] + (cross[s - 1] if s else 0) + (cross[s] if s < S - 1 else 0)
             + (err * (S - 1) if s == S - 1 else err) for s in range(S)]
    return max(stage), parts


@click.command()
@click.option("--device", default="cpu", type=click.Choice(["cpu", "cuda"]))
@click.option("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
@click.option("--stages", "stage_list", default="1,2",
              help="S to measure; skipped above the core count (CPU) or the GPU count (NCCL)")
@click.option("--model-max", default=8, help="model S = 1..this")
@click.option("--batch", default=128)
@click.option("--steps", default=40, help="micro-batches per measured pipeline run")
@click.option("--warmup", default=5)
@click.option("--repeats", default=10, help="repeats of the per-unit timing")
@click.option("--out", default="benchmarks/results/pipeline", type=click.Path())
def main(device, cases, stage_list, model_max, batch, steps, warmup, repeats, out):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    malloc = "steady" if steady_malloc() else "default"
    dev = torch.device(device)
    cases = [c.strip() for c in cases.split(",") if c.strip()]
    measured_S = [int(s) for s in stage_list.split(",")]
    backend = "nccl" if device == "cuda" and torch.cuda.device_count() >= 2 else "gloo"
    # processes we can measure: one per GPU with NCCL; one GPU shared by 2 (gloo through host memory); cores
    room = torch.cuda.device_count() if backend == "nccl" else 2 if device == "cuda" else (os.cpu_count() or 1)
    comm = comm_cost(device, backend)
    print(f"comm ({backend}): latency {comm['latency_s'] * 1e6:.0f} us, {gbps(comm)}", file=sys.stderr)
    batches = make_batches(steps, batch)
    results = []
    for case in cases:
        rule_name, spec, schedule = CASES[case]
        single = single_process(case, batches, dev, warmup)
        units = unit_times(case, batch, dev, repeats)
        n_units = len(units["forward_s"])
        row = {"case": case, "rule": rule_name, "network": spec, "schedule": schedule, "batch": batch,
               "units": n_units, "single_samples_per_s": single, "unit_times": units, "measured": {}, "model": {}}
        base_period = sum(units["forward_s"]) + sum(units["update_s"])
        for S in range(1, min(model_max, n_units) + 1):
            period, parts = model_period(units, S, comm, schedule, batch)
            row["model"][S] = {"samples_per_s": batch / period, "speedup": base_period / period,
                               "plan": [[r.start, r.stop] for r in parts]}
        for S in measured_S:
            if S > n_units or S > room:
                continue
            rule, _ = build(case)
            stats = fit(rule, batches, stages=S, schedule=schedule, optimizer=optimizer, balance="time",
                        backend=backend if S > 1 else "gloo", device=device, timeout_s=300, warmup=warmup)
            row["measured"][S] = {"samples_per_s": stats["samples_per_second"], "plan": stats["plan"],
                                  "stage_busy_s": stats["stage_busy_s"], "stage_wait_s": stats["stage_wait_s"]}
            print(f"{case} S={S}: {stats['samples_per_second']:.0f} samples/s (single process {single:.0f})",
                  file=sys.stderr)
        results.append(row)
    meta = {"device": device, "backend": backend, "malloc": malloc, "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "load_average": os.getloadavg(), "threads_per_process": 1,
            "time_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "comm": comm,
            "command": " ".join(["python", *sys.argv])}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"pipeline_{device}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    md = markdown(meta, results, model_max)
    (out / f"{stem}.md").write_text(md)
    plot(results, out / f"{stem}.png", model_max, device)
    print(md)


def gbps(comm) -> str:
    return f"{1 / comm['seconds_per_byte'] / 1e9:.2f} GB/s" if comm["seconds_per_byte"] > 0 else "unbounded"


def markdown(meta, results, model_max) -> str:
    load = ", ".join(f"{v:.1f}" for v in meta["load_average"])
    lines = [f"Pipeline throughput, {meta['device']} ({meta['backend']}), {meta['time_utc']} UTC; load average "
             f"{load} on {meta['cpu_count']} cores (a shared machine: noisy); one thread per process; batch "
             f"{results[0]['batch'] if results else '-'}.",
             f"Communication (ping-pong): {meta['comm']['latency_s'] * 1e6:.0f} us + bytes at {gbps(meta['comm'])}.",
             "", "Samples/s (speed-up over one process). *1 process*: plain `rule.step` loop; *S=k run*: the "
             "pipeline measured; *S=k model*: per-unit times + communication (speed-up over the summed "
             "unit times).", ""]
    Ss = list(range(2, model_max + 1))
    head = ["case", "units", "1 process", "S=1 run", "S=2 run", *(f"S={s} model" for s in Ss)]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        one = r["single_samples_per_s"]

        def cell(m):
            return f"{m['samples_per_s']:.0f} ({m['samples_per_s'] / one:.2f}x)" if m else "-"

        def modelled(m):  # speed-up over the modelled one process (the sum of the unit times)
            return f"{m['samples_per_s']:.0f} ({m['speedup']:.2f}x)" if m else "-"

        row = [f"{r['case']} ({r['schedule']})", str(r["units"]), f"{one:.0f}", cell(r["measured"].get(1)),
               cell(r["measured"].get(2)), *(modelled(r["model"].get(s)) for s in Ss)]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"Command: `{meta['command']}`", ""]
    return "\n".join(lines)


def plot(results, path: Path, model_max: int, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    Smax = model_max
    a.plot([1, Smax], [1, Smax], "k--", lw=1, label="ideal (S x)")
    for r in results:
        ms = sorted(r["model"])
        base = r["single_samples_per_s"]
        line, = a.plot(ms, [r["model"][s]["speedup"] for s in ms], "-", lw=1.2, label=f"{r['case']} model")
        pts = sorted(s for s in r["measured"] if s > 1)
        a.plot([1, *pts], [1.0, *[r["measured"][s]["samples_per_s"] / base for s in pts]], "o",
               color=line.get_color(), label=f"{r['case']} measured")
    a.set_xlabel("stages S")
    a.set_ylabel("speed-up over one process")
    a.set_title(f"throughput vs stages ({device})")
    a.legend(fontsize=7, ncol=2)
    depth = [r for r in results if r["case"] in DEPTH_CASES]
    if depth:
        L = [r["units"] for r in depth]
        b.plot(L, [r["single_samples_per_s"] for r in depth], "o-", label="1 process")
        m2 = [(r["units"], r["measured"].get(2)) for r in depth]
        b.plot([u for u, m in m2 if m], [m["samples_per_s"] for u, m in m2 if m], "s-", label="2 stages, measured")
        full = [(r["units"], r["model"].get(min(r["units"], model_max))) for r in depth]
        b.plot([u for u, m in full if m], [m["samples_per_s"] for u, m in full if m], "^--",
               label="S = components, model")
        b.plot(L, [depth[0]["single_samples_per_s"] * L[0] / l for l in L], "k:", lw=1, label="1 process, ideal 1/L")
        b.set_xscale("log", base=2)
        b.set_xticks(L, [str(l) for l in L])
        b.set_xlabel("AL components L")
        b.set_ylabel("samples / s")
        b.set_title("AL throughput vs depth")
        b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
