"""Every benchmark in one command: runs each script in its own Python, collects the JSON each one
writes, and rewrites benchmarks/RESULTS.md (machine, versions, command, one table per benchmark,
a GPU section) from scratch.

    python benchmarks/suite.py                                  # everything -> benchmarks/RESULTS.md
    python benchmarks/suite.py --quick --output /tmp/bench.md   # tiny sizes: a smoke test of the suite
    python benchmarks/suite.py --only env,ant --output /tmp/bench.md

Why one process per benchmark: the scaling benchmark must set XLA_FLAGS before jax starts, the
MJX and peer benchmarks should not share compilation caches or memory with the others, and a
benchmark that fails leaves the rest running (its section says what failed; the exit status is 1).

CPU and GPU. The main tables run on the CPU (JAX_PLATFORMS=cpu), so that they compare across
machines whatever accelerator is present. When JAX's default backend is a GPU, the GPU section
runs the same scripts again on it at GPU sizes (paper presets, batch 4096 for the ant); otherwise
it says that no GPU was available.

What is generated and what is not: RESULTS.md is entirely generated (do not edit it by hand; a
rerun replaces it). Findings that outlive one run (why a figure is what it is, history, targets)
are hand-written in benchmarks/NOTES.md, which the suite copies verbatim to the end of the file.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO = BENCHMARKS_DIR.parent
DEFAULT_OUTPUT = BENCHMARKS_DIR / "RESULTS.md"
NOTES = BENCHMARKS_DIR / "NOTES.md"
VERSIONED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "mujoco", "mujoco-mjx", "gymnasium", "numpy",
             "navix", "xminigrid", "jax-cuda12-plugin", "jax-cuda12-pjrt")

# --quick: a base model, batches and horizon small enough that compilation dominates (seconds).
# Any layout: with solvable_only, a 20-step horizon would redraw the post-training task forever.
TINY_GRID = ("env.horizon=20", "env.solvable_only=false", "model.max_len=20", "model.num_layers=1", "model.width=16", "model.num_heads=2",
             "model.mlp_width=32")
TINY_RL = ("internal_rl.batch_size=8", "internal_rl.policy_width=16", "grpo.batch_size=8")


# --- formatting


def rate(value: float) -> str:
    """A rate with the precision that matters: 7.74M, 96,812, 86.5, 0.412."""
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e3:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def seconds(value: float) -> str:
    return f"{value:.2f}" if value >= 0.1 else f"{value:.4f}"


def table(header: list[str], rows: list[list[Any]], numeric_from: int = 1) -> list[str]:
    """A markdown table; columns from `numeric_from` on are right-aligned."""
    align = ["---" if i < numeric_from else "---:" for i in range(len(header))]
    return ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|",
            *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)]


# --- one table per benchmark (input: the JSON the script wrote)


def env_table(report: dict) -> list[str]:
    results = report["results"]
    lines = table(["environment", "auto-reset", "batch", "first call s (compile + run)", "best run s", "steps/s"],
                  [[r["env"], r["autoreset"], r["batch"], seconds(r["first_call_s"]), seconds(r["best_run_s"]),
                    rate(r["steps_per_s"])] for r in results], numeric_from=2)
    ours = {r["batch"]: r["steps_per_s"] for r in results if r["autoreset"] == "VmapAutoReset"}
    lines.append("")
    others = [("`vmap(AutoReset)`", lambda r: r["autoreset"] == "vmap(AutoReset)")]
    others += [(peer, lambda r, peer=peer: r["env"].startswith(peer)) for peer in ("xminigrid", "navix")]
    for name, matches in others:
        theirs = {r["batch"]: r["steps_per_s"] for r in results if matches(r)}
        shared = sorted(ours.keys() & theirs.keys())
        if shared:
            ratios = ", ".join(f"{ours[b] / theirs[b]:.2f}x at {b}" for b in shared)
            lines.append(f"- gridworld-pinpad (`VmapAutoReset`) / {name}: {ratios}.")
    for contender, why in report.get("skipped", {}).items():
        lines.append(f"- Not measured: `{contender}` ({why}; install the `[bench]` extra).")
    return lines


def ant_table(report: dict) -> list[str]:
    results = report["results"]
    lines = table(["contender", "batch", "compile s", "best run s", "env steps/s"],
                  [[r["name"], r["batch"], f"{r['compile_s']:.1f}" if r["compile_s"] else "-", seconds(r["best_run_s"]),
                    rate(r["steps_per_s"])] for r in results])
    reference = next((r for r in results if "SyncVectorEnv" in r["name"]), None)
    if reference:
        lines.append("")
        lines += [f"- {r['name']} / {reference['name']}: {r['steps_per_s'] / reference['steps_per_s']:.2f}x."
                  for r in results if r["name"].startswith("ant-pinpad")]
    return lines


def train_table(result: dict) -> list[str]:
    model = result["model"]
    return table(["preset (model)", "batch x steps", "compile s", "updates/s", "tokens/s", "GFLOP/update",
                  "achieved GFLOP/s", "matmul peak GFLOP/s", "fraction of peak"],
                 [[f"{result['preset']} ({model['num_layers']} block{'s' if model['num_layers'] != 1 else ''}, "
                   f"width {model['width']}, MLP {model['mlp_width']})",
                   f"{result['batch_episodes']} x {result['sequence_length']}", f"{result['compile_s']:.2f}",
                   rate(result["updates_per_s"]), rate(result["tokens_per_s"]), f"{result['gflop_per_update']:.3g}",
                   rate(result["achieved_gflop_per_s"]), rate(result["matmul_peak_gflop_per_s"]),
                   f"{result['fraction_of_peak']:.1%}"]])


def stages_table(results: list[dict]) -> list[str]:
    return table(["stage", "preset", "compile s", "updates per call", "best call s", "updates/s",
                  "samples per update", "samples/s"],
                 [[r["stage"], r["preset"], f"{r['compile_s']:.2f}", r["updates_per_call"], seconds(r["best_call_s"]),
                   rate(r["updates_per_s"]), f"{r['samples_per_update']} {r['sample']}", rate(r["samples_per_s"])]
                  for r in results], numeric_from=2)


def crl_table(results: list[dict]) -> list[str]:
    lines = table(["preset", "depth", "width", "batch", "compile s", "gradient steps/s", "matmul GFLOP/step",
                   "achieved GFLOP/s", "matmul peak GFLOP/s", "fraction of peak"],
                  [[r["preset"], r["depth"], r["width"], r["batch_size"], f"{r['compile_s']:.1f}",
                    rate(r["gradient_steps_per_s"]), f"{r['matmul_gflop_per_step']:.3g}", rate(r["achieved_gflop_per_s"]),
                    rate(r["matmul_peak_gflop_per_s"]), f"{r['fraction_of_peak']:.1%}"] for r in results])
    if len(results) > 1:
        low, high = results[0], results[-1]
        lines += ["", f"- Depth {high['depth']} takes {low['gradient_steps_per_s'] / high['gradient_steps_per_s']:.1f}x "
                      f"the time of depth {low['depth']} per gradient step, for "
                      f"{high['matmul_gflop_per_step'] / low['matmul_gflop_per_step']:.1f}x the matmul FLOPs."]
    return lines


def rl_table(rows: list[dict]) -> list[str]:
    return table(["stage", "preset", "batch", "epochs x minibatches", "compile + first chunk s", "updates per chunk",
                  "best chunk s", "episodes/s", "env steps/s"],
                 [[r["stage"], r["preset"], r["batch_size"], f"{r['epochs']} x {r['minibatches']}",
                   f"{r['compile_and_first_s']:.1f}", r["updates"], seconds(r["chunk_s"]), rate(r["episodes_per_s"]),
                   rate(r["env_steps_per_s"])] for r in rows], numeric_from=2)


def scaling_table(rows: list[dict]) -> list[str]:
    counts = sorted({r["devices"] for r in rows})
    units = {"pretrain": "tokens_per_s", "internal_rl": "episodes_per_s"}
    body = []
    for stage, unit in units.items():
        by_count = {r["devices"]: r for r in rows if r["stage"] == stage}
        if not by_count:
            continue
        base = by_count.get(counts[0])
        cells = [rate(by_count[n][unit]) if n in by_count else "-" for n in counts]
        speedups = [f"{by_count[n][unit] / base[unit]:.2f}x" if base and n in by_count else "-" for n in counts[1:]]
        body.append([stage, unit.replace("_per_s", "/s"), *cells, *speedups])
    header = ["stage", "rate", *(f"{n} device{'s' if n > 1 else ''}" for n in counts),
              *(f"{n} / {counts[0]}" for n in counts[1:])]
    lines = table(header, body, numeric_from=2)
    lines += ["", "Compile + first call, seconds: " + "; ".join(
        f"{r['stage']} on {r['devices']}: {r['first_call_s']:.1f}" for r in rows) + "."]
    return lines


# --- the benchmarks


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    script: str
    full: tuple[str, ...]  # arguments of the full run (CPU)
    quick: tuple[str, ...]  # --quick: tiny sizes, few iterations
    render: Callable[[Any], list[str]]
    about: str  # how to read the table
    gpu: tuple[str, ...] | None = None  # arguments on a GPU; None: not run there
    gpu_needs_devices: int = 1  # GPU devices the GPU run needs


BENCHMARKS = (
    Benchmark(
        "env", "Environment throughput: gridworld-pinpad against JAX gridworld peers", "env_throughput.py",
        full=("--batch-sizes", "256,1024,4096,16384", "--steps", "100", "--repeats", "5"),
        quick=("--batch-sizes", "64", "--steps", "10", "--repeats", "1"),
        gpu=("--batch-sizes", "4096,65536,262144", "--steps", "100", "--repeats", "5"),
        render=env_table,
        about="""Random-policy environment steps per second. The same protocol for every row: reset a batch of
environments once, then one jitted call runs the batched steps in `lax.scan` with uniform random
actions and the environment's own auto-reset; the observations stay in the scan carry, so XLA
computes them every step. "First call" is compilation plus one run; "best run" is the fastest of
the later calls, each continuing from the previous call's states; steps/s = batch x steps / best
run. Every environment ends episodes after at most 100 steps (xminigrid's default for this map is
256; the benchmark sets 100). `VmapAutoReset` resets only the environments whose episode ended;
`vmap(AutoReset)` computes a reset for every environment at every step. navix resets on the next
step, xminigrid in the same step. The peers come from the `[bench]` extra.""",
    ),
    Benchmark(
        "ant", "Ant throughput: ant-pinpad on MJX against gymnasium's Ant-v5", "ant_throughput.py",
        full=("--batch", "512", "--steps", "100", "--repeats", "3", "--gym-envs", "8", "--gym-steps", "500"),
        quick=("--batch", "8", "--steps", "5", "--repeats", "1", "--forms", "scan", "--gym-envs", "2",
               "--gym-steps", "10"),
        gpu=("--batch", "4096", "--steps", "100", "--repeats", "3", "--gym-envs", "8", "--gym-steps", "500"),
        render=ant_table,
        about="""Random torques, one env step = 5 physics steps in both, every environment auto-resetting.
ant-pinpad runs in two batched forms: `jit(vmap(scan(step)))` (each environment scans its own
steps of `AutoReset(AntPinpad())`, so a reset is computed at every step under vmap) and
`scan(VmapAutoReset)` (one scan of batched steps that resets only the ended environments: how the
trainers step). Compilation is timed apart (`jit(...).lower().compile()`); env steps/s = batch x
steps / the best call. gymnasium's `Ant-v5` (MuJoCo C) runs in a `SyncVectorEnv` and alone, in the
same process right after. MJX uses every core, Ant-v5 one: load from other jobs costs MJX more.""",
    ),
    Benchmark(
        "train", "Training throughput: the base model's pretraining update", "train_throughput.py",
        full=("--preset", "gridworld/quick", "--updates", "20", "--repeats", "3"),
        quick=("--preset", "gridworld/quick", "--updates", "2", "--repeats", "1", "pretrain.batch_size=4", *TINY_GRID),
        gpu=("--preset", "gridworld/paper", "--updates", "10", "--repeats", "3"),
        render=train_table,
        about="""A jitted `lax.scan` of AdamW updates at the preset's model and batch sizes on full-horizon
episodes of a synthetic dataset of D's shapes (no padding cropped: the worst case), compile timed
apart, best of the later calls; tokens/s = episodes x time steps per update x updates/s. FLOPs from
XLA's cost analysis of one update's gradient; the peak is a 2048x2048 float32 matmul measured in
the same run, so the fraction of peak is comparable between machines and loads.""",
    ),
    Benchmark(
        "stages", "Training throughput: the other training stages", "stage_throughput.py",
        full=("--preset", "gridworld/quick", "--ant-preset", "ant/quick", "--updates", "10", "--repeats", "3"),
        quick=("--preset", "gridworld/quick", "--updates", "2", "--repeats", "1",
               "--stages", "bc,probe,controllers,discovery", "bc.batch_size=16", "probe.batch_size=4",
               "controllers.batch_size=4", "controllers.data=dataset", "discovery.batch_size=4",
               "discovery.data=dataset", "discovery.alphas=[0.0]", "discovery.kl_warmup_updates=0", *TINY_GRID),
        gpu=("--preset", "gridworld/paper", "--ant-preset", "ant/paper", "--updates", "5", "--repeats", "3"),
        render=stages_table,
        about="""Every training stage that the other tables leave out (pretraining: above; internal RL and
GRPO, CRL: below), each its own jitted `train_chunk` at the preset's sizes on freshly initialised
networks (a fresh base model where the stage reads the pretrained one: the work per update is fixed
by the shapes), compiled ahead of time as the training loop does, best of the later calls. Batches
come from where the preset says: fresh expert episodes inside the update (`data: online`), or a
synthetic dataset of D's shapes whose episodes last the whole horizon. A sample is what one update
consumes: a step for BC's MLP, an episode for the sequence stages (discovery: for every alpha of
its sweep at once), an environment step for the ant expert's PPO (an update there is one
iteration: an unroll of every environment, then its epochs). `discovery_cotrained` also trains
the base model.""",
    ),
    Benchmark(
        "crl", "CRL: gradient steps per second against network depth", "crl_throughput.py",
        full=("--preset", "gridworld/crl_goal_paper", "--depths", "4,16,64", "--updates", "20", "--repeats", "3"),
        quick=("--preset", "gridworld/crl_goal_quick", "--depths", "4", "--updates", "2", "--repeats", "1",
               "crl.batch_size=16", "crl.num_envs=4", "crl.sa_encoder.width=16", "crl.goal_encoder.width=16",
               "crl.actor.width=16"),
        gpu=("--preset", "gridworld/crl_goal_paper", "--depths", "4,16,64,256", "--updates", "20", "--repeats", "3"),
        render=crl_table,
        about="""The preset's CRL state with the actor and both encoders at depth d, a prefilled on-device
buffer, a jitted `lax.scan` of gradient steps, each sampling a hindsight-relabelled batch and
updating critic, actor and temperature; no environment steps. Compile timed apart, best of the
later calls. Matmul FLOPs are counted by hand (XLA's cost analysis counts the scanned residual
blocks once); the peak is a 2048x2048 float32 matmul in the same run. Compilation does not grow
with depth: the residual blocks are stacked and run in one `lax.scan`.""",
    ),
    Benchmark(
        "rl", "RL throughput: internal RL and raw-action GRPO, rollouts and updates", "rl_throughput.py",
        full=("--preset", "gridworld/quick", "--updates", "5", "--repeats", "3"),
        quick=("--preset", "gridworld/quick", "--updates", "1", "--repeats", "2", *TINY_GRID, *TINY_RL),
        gpu=("--preset", "gridworld/paper", "--updates", "2", "--repeats", "3"),
        render=rl_table,
        about="""Each stage's jitted `train_chunk` at the preset's sizes on freshly initialised networks (the work
per episode is fixed by the shapes: both rollouts scan the whole horizon), the first call
(compile + run) timed apart from the best of the later calls. An update is a batch of episodes on
the post-training task, then epochs x minibatches of clipped updates. Internal RL: the base model
steered at its middle layer by the metacontroller's decoder, the switching unit and a policy of
one Hawk block consulted at every raw step. GRPO: the same base model sampling raw actions, with
its full forward pass in the update.""",
    ),
    Benchmark(
        "scaling", "Scaling: 1 vs 2 devices", "scaling.py",
        full=("--preset", "gridworld/quick", "--devices", "1", "2", "--pretrain-updates", "10", "--rl-updates", "2",
              "--repeats", "2"),
        quick=("--preset", "gridworld/quick", "--devices", "1", "2", "--pretrain-updates", "2", "--repeats", "1",
               "--stages", "pretrain", "pretrain.batch_size=4", *TINY_GRID),
        gpu=("--preset", "gridworld/paper", "--devices", "1", "2", "--pretrain-updates", "10", "--rl-updates", "2",
             "--repeats", "2", "pretrain.data=online"),
        gpu_needs_devices=2,
        render=scaling_table,
        about="""One fresh Python per device count (on the CPU, XLA_FLAGS
`--xla_force_host_platform_device_count=N` before jax starts) runs the preset's real
`train_chunk`s with the batch sharded over a one-axis mesh (one device: no mesh, exactly the
single-device program): pretraining on its own online batches, and internal RL. First call
(compile + run) apart, best of the later calls. On a CPU the N "devices" share the same cores:
this measures the sharded program's overhead and whatever parallelism XLA finds, not N real
devices.""",
    ),
)
BY_NAME = {bench.name: bench for bench in BENCHMARKS}


# --- running


@dataclass
class Outcome:
    bench: Benchmark
    args: tuple[str, ...]
    env_prefix: str  # shown in front of the command: how the platform was chosen
    seconds: float
    result: Any = None
    error: str | None = None

    @property
    def command(self) -> str:
        return shlex.join(["python", f"benchmarks/{self.bench.script}", *self.args])


def run_benchmark(bench: Benchmark, args: tuple[str, ...], env: dict[str, str], env_prefix: str, workdir: Path,
                  tag: str, timeout: float | None) -> Outcome:
    output = workdir / f"{bench.name}-{tag}.json"
    command = [sys.executable, str(BENCHMARKS_DIR / bench.script), *args, "--output", str(output)]
    print(f"[suite] {bench.name} ({tag}): {shlex.join(command[1:])}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    status, log = run_in_own_group(command, env, timeout)
    elapsed = time.perf_counter() - start
    outcome = Outcome(bench, args, env_prefix, elapsed)
    if status or not output.exists():
        tail = "\n".join(log.strip().splitlines()[-15:])
        outcome.error = f"{status or 'no results written'}; last lines of its output:\n{tail}"
        print(f"[suite] {bench.name} ({tag}) FAILED after {elapsed:.0f} s:\n{tail}", file=sys.stderr, flush=True)
    else:
        outcome.result = json.loads(output.read_text())
        print(f"[suite] {bench.name} ({tag}) done in {elapsed:.0f} s", file=sys.stderr, flush=True)
    return outcome


def run_in_own_group(command: list[str], env: dict[str, str], timeout: float | None) -> tuple[str, str]:
    """("" or what went wrong, stdout and stderr). The benchmark gets a process group of its own, so
    that a timeout or Ctrl-C also ends the Pythons it started (the scaling benchmark's workers)."""
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        log, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        log, _ = process.communicate()
        return f"timed out after {timeout:.0f} s (--timeout)", log
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    return ("" if process.returncode == 0 else f"exit status {process.returncode}"), log


PROBE = """
import json, jax
devices = jax.devices()
try:
    memory = devices[0].memory_stats().get("bytes_limit")
except Exception:
    memory = None
print(json.dumps({"backend": jax.default_backend(), "count": len(devices), "kinds": sorted({d.device_kind for d in devices}),
                  "memory_bytes": memory}))
"""


def probe_devices() -> dict:
    """JAX's default backend and devices, asked in a separate Python (this one never imports jax:
    on a GPU, it would hold device memory while the benchmarks run)."""
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
    if done.returncode != 0:
        return {"backend": "unknown", "count": 0, "kinds": [], "memory_bytes": None,
                "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the machine


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            if name not in ("jax-cuda12-plugin", "jax-cuda12-pjrt"):
                found[name] = "not installed"
    return found


def git_commit() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    head = git("rev-parse", "--short", "HEAD")
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return head.stdout.strip() + (" with uncommitted changes" if dirty else "")


# --- the file


def demoted(markdown: str) -> list[str]:
    """NOTES.md's text under a level-2 heading of RESULTS.md: its title dropped, headings one level down."""
    lines, fenced = [], False
    for index, line in enumerate(markdown.strip().splitlines()):
        fenced ^= line.startswith("```")
        if index == 0 and line.startswith("# "):
            continue
        lines.append("#" + line if line.startswith("#") and not fenced else line)
    while lines and not lines[0].strip():
        lines.pop(0)
    return lines


def section(outcome: Outcome, heading: str) -> list[str]:
    lines = [f"{heading} {outcome.bench.title}", "", outcome.bench.about, "", "```",
             f"{outcome.env_prefix}{outcome.command}", "```", ""]
    if outcome.error:
        lines += ["**Failed** in this run, so no figures:", "", "```", outcome.error, "```"]
    else:
        lines += outcome.bench.render(outcome.result)
    lines += ["", f"Took {outcome.seconds:.0f} s (processes started, compilations and measurements).", ""]
    return lines


def render(context: dict, cpu: list[Outcome], gpu: list[Outcome] | None, gpu_skipped: list[str]) -> str:
    devices, machine = context["devices"], context["machine"]
    lines = ["# Benchmark results", "",
             "<!-- Generated by benchmarks/suite.py: rerun it rather than editing this file. Hand-written notes "
             "belong in benchmarks/NOTES.md, which the suite copies to the end. -->", "",
             f"Written by `{context['command']}` on {context['date']} in {context['minutes']:.1f} minutes.", ""]
    if context["quick"]:
        lines += ["**Quick run** (`--quick`): tiny sizes and few iterations, a smoke test of the suite. These figures "
                  "measure compilation and overheads, not throughput: do not compare them.", ""]
    gpu_line = (f"{devices['count']} x {', '.join(devices['kinds'])}"
                + (f" ({devices['memory_bytes'] / 2**30:.0f} GiB usable each)" if devices.get("memory_bytes") else "")
                if devices["backend"] == "gpu" else f"none (JAX's default backend here: `{devices['backend']}`)")
    memory = f"{machine['memory_gib']:.1f} GiB" if machine["memory_gib"] else "unknown"
    lines += ["## Machine", "", *table(["part", "description"], [
        ["CPU", f"`{machine['cpu']}`, {machine['cores_usable']} logical cores usable of {machine['cores']}"],
        ["memory", memory],
        ["GPU", gpu_line],
        ["system", machine["system"]],
        ["load average (1 min)", f"{machine['load_start']:.2f} at the start, {machine['load_end']:.2f} at the end"],
        ["code", f"commit {machine['commit']}"],
    ], numeric_from=2), "",
        "Timings are only as good as the machine was quiet: a load average near or above the core count "
        "means other work shared the cores, and the figures are low.", ""]
    lines += ["## Versions", "", *table(["package", "version"], [[k, v] for k, v in context["versions"].items()],
                                         numeric_from=2), ""]
    lines += ["## Command", "", "```", context["command"], "```", "",
              "Each benchmark runs in its own Python, on the CPU (`JAX_PLATFORMS=cpu`) for the tables below and on "
              "the GPU for the GPU section. The command under each table reruns that benchmark alone; "
              "`--output FILE.json` saves its raw results.", ""]
    for outcome in cpu:
        lines += section(outcome, "##")
    lines += ["## GPU", ""]
    if gpu is None:
        lines += [f"No GPU was available on the machine that wrote this file (JAX's default backend: "
                  f"`{devices['backend']}`), so there are no GPU figures. Run the same command on a machine with a GPU "
                  "(`pip install -e '.[gpu]'`) to fill this section.", ""]
    else:
        lines += [f"The same scripts on {gpu_line}, with JAX's default backend and GPU sizes (paper presets, larger "
                  "batches).", ""]
        lines += [f"- Not run on this GPU: {why}." for why in gpu_skipped] + ([""] if gpu_skipped else [])
        for outcome in gpu:
            lines += section(outcome, "###")
    if context["notes"]:
        lines += ["## Notes", "", "Hand-written, from `benchmarks/NOTES.md` (not regenerated).", "",
                  *demoted(context["notes"]), ""]
    return "\n".join(lines).rstrip() + "\n"


# --- the command


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=f"benchmarks: {', '.join(BY_NAME)}")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and few iterations (a smoke test); writes a file only with --output")
    parser.add_argument("--only", help="comma-separated benchmarks to run (default: all); writes a file only "
                                       "with --output")
    parser.add_argument("--output", help="the markdown file to write (default: benchmarks/RESULTS.md for a full run "
                                         "of every benchmark; otherwise the markdown goes to stdout)")
    parser.add_argument("--json", help="also write every benchmark's raw results as one JSON file here")
    parser.add_argument("--no-gpu", action="store_true", help="skip the GPU section's runs even if a GPU is present")
    parser.add_argument("--timeout", type=float, help="seconds one benchmark may take before it counts as failed "
                                                      "(default: 600 with --quick, 3600 otherwise)")
    args = parser.parse_args(argv)
    args.names = list(BY_NAME) if args.only is None else [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in args.names if name not in BY_NAME]
    if unknown or not args.names:
        parser.error(f"--only: unknown benchmarks {unknown}; choose from {', '.join(BY_NAME)}")
    if args.timeout is None:
        args.timeout = 600.0 if args.quick else 3600.0
    if args.output is None and not args.quick and args.only is None:
        args.output = str(DEFAULT_OUTPUT)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    devices = probe_devices()
    benches = [BY_NAME[name] for name in args.names]
    cpu_env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    with tempfile.TemporaryDirectory(prefix="hrl-bench-") as workdir:
        cpu = [run_benchmark(b, b.quick if args.quick else b.full, cpu_env, "JAX_PLATFORMS=cpu ", Path(workdir), "cpu",
                             args.timeout) for b in benches]
        gpu, gpu_skipped = None, []
        if devices["backend"] == "gpu" and not args.no_gpu:
            gpu = []
            for bench in benches:
                if bench.gpu is None or devices["count"] < bench.gpu_needs_devices:
                    gpu_skipped.append(f"{bench.name} (needs {bench.gpu_needs_devices} GPUs, this machine has "
                                       f"{devices['count']})" if bench.gpu is not None else bench.name)
                    continue
                gpu.append(run_benchmark(bench, bench.quick if args.quick else bench.gpu, dict(os.environ), "",
                                         Path(workdir), "gpu", args.timeout))
    context = {
        "command": shlex.join(["python", *sys.argv]) if argv is None else shlex.join(
            ["python", "benchmarks/suite.py", *argv]),
        "date": date, "minutes": (time.perf_counter() - started) / 60, "quick": args.quick, "devices": devices,
        "versions": versions(), "notes": NOTES.read_text() if NOTES.exists() else "",
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "cores_usable": usable_cores(),
                    "memory_gib": memory_gib(), "system": platform.platform(), "load_start": load_start,
                    "load_end": os.getloadavg()[0], "commit": git_commit()},
    }
    markdown = render(context, cpu, gpu, gpu_skipped)
    if args.output:
        Path(args.output).write_text(markdown)
        print(f"[suite] wrote {args.output} ({context['minutes']:.1f} minutes)", file=sys.stderr)
    else:
        print(markdown)
    if args.json:
        raw = {"context": context, "results": [{"benchmark": o.bench.name, "platform": platform_name, "command": o.command,
                                                "seconds": o.seconds, "result": o.result, "error": o.error}
                                               for platform_name, outcomes in (("cpu", cpu), ("gpu", gpu or []))
                                               for o in outcomes]}
        Path(args.json).write_text(json.dumps(raw, indent=2))
    failed = [o.bench.name for o in cpu + (gpu or []) if o.error]
    if failed:
        print(f"[suite] failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
