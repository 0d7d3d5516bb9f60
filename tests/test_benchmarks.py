"""The benchmark suite (benchmarks/suite.py): a --quick run of the cheapest benchmark into a
temporary file, and the GPU section's rendering from made-up results (no GPU here)."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "benchmarks" / "suite.py"


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("benchmark_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def table_rows(markdown: str, first_cell: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in markdown.splitlines()
            if line.startswith(f"| {first_cell} |")]


def as_number(cell: str) -> float:
    """'7.74M', '96,812', '86.5' -> a float."""
    scale = 1e6 if cell.endswith("M") else 1.0
    return float(cell.rstrip("M").replace(",", "")) * scale


def test_quick_run_writes_machine_versions_and_a_table(tmp_path):
    results = REPO / "benchmarks" / "RESULTS.md"
    before = results.read_bytes() if results.exists() else None
    output = tmp_path / "bench.md"
    done = subprocess.run([sys.executable, str(SUITE), "--quick", "--only", "env", "--output", str(output)],
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert done.returncode == 0, done.stdout
    markdown = output.read_text()
    for heading in ("## Machine", "## Versions", "## Command", "## GPU"):
        assert heading in markdown
    assert re.search(r"^\| CPU \| .+ logical cores usable", markdown, re.M)
    assert f"| jax | {jax.__version__} |" in markdown
    assert "--quick --only env" in markdown
    rows = table_rows(markdown, "gridworld-pinpad")
    assert {row[1] for row in rows} == {"VmapAutoReset", "vmap(AutoReset)"}
    for row in rows:
        assert int(row[2]) > 0 and as_number(row[-1]) > 0  # batch, steps/s
    if jax.default_backend() != "gpu":
        assert "No GPU was available" in markdown
    assert (results.read_bytes() if results.exists() else None) == before  # --quick leaves RESULTS.md alone


def test_only_a_full_run_of_everything_defaults_to_results_md(suite):
    assert suite.parse_args([]).output == str(suite.DEFAULT_OUTPUT)
    assert suite.parse_args(["--quick"]).output is None
    assert suite.parse_args(["--only", "env,rl"]).output is None
    assert suite.parse_args(["--quick", "--output", "x.md"]).output == "x.md"
    with pytest.raises(SystemExit):
        suite.parse_args(["--only", "nonsense"])


def test_gpu_section_and_failures_render(suite):
    ant = suite.BY_NAME["ant"]
    rows = [{"name": "ant-pinpad MJX scan(VmapAutoReset)", "batch": 4096, "steps": 100, "compile_s": 20.0,
             "best_run_s": 0.5, "steps_per_s": 819200.0},
            {"name": "gymnasium Ant-v5 SyncVectorEnv(8)", "batch": 8, "steps": 500, "compile_s": 0.0,
             "best_run_s": 1.0, "steps_per_s": 4000.0}]
    context = {"command": "python benchmarks/suite.py", "date": "today", "minutes": 1.0, "quick": False,
               "devices": {"backend": "gpu", "count": 1, "kinds": ["Some GPU"], "memory_bytes": 80 * 2**30},
               "versions": {"python": "3", "jax": "0"}, "notes": "# Title\n\n## A note\n\ntext\n",
               "machine": {"cpu": "cpu", "cores": 2, "cores_usable": 2, "memory_gib": 8.0, "system": "os",
                           "load_start": 0.1, "load_end": 0.2, "commit": "abc"}}
    cpu = [suite.Outcome(ant, ant.full, "JAX_PLATFORMS=cpu ", 3.0, error="exit status 1; boom")]
    gpu = [suite.Outcome(ant, ant.gpu, "", 5.0, result={"results": rows})]
    markdown = suite.render(context, cpu, gpu, ["scaling (needs 2 GPUs, this machine has 1)"])
    cpu_part, gpu_part = markdown.split("## GPU\n")
    assert "**Failed**" in cpu_part and "boom" in cpu_part
    assert "1 x Some GPU (80 GiB usable each)" in gpu_part and "### Ant throughput" in gpu_part
    assert "| ant-pinpad MJX scan(VmapAutoReset) | 4096 | 20.0 | 0.50 | 819,200 |" in gpu_part
    assert "204.80x" in gpu_part and "Not run on this GPU: scaling" in gpu_part
    assert "### A note" in gpu_part and "# Title" not in markdown  # NOTES.md, headings one level down
