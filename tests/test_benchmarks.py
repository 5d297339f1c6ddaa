"""The benchmark harness's memory measurement reads a known allocation correctly."""

from __future__ import annotations

import re
import subprocess
import types
from pathlib import Path

import pytest

from benchmarks.memory import measure_memory

pytestmark = pytest.mark.cpu_only  # the CPU benchmark harness (RSS probes, subprocesses)


@pytest.mark.slow
@pytest.mark.parametrize("mib", [16, 48])
def test_peak_memory_of_a_known_allocation(mib):
    # the worker first runs the probe at "length" 64 (64 MiB, freed) then measures mib MiB:
    # freed memory kept by the allocator would make this read far less than mib
    result = measure_memory("benchmarks.memory", "allocate_mib", mib, timeout=120)
    assert "error" not in result, result
    assert mib - 1 <= result["peak_bytes"] / 2**20 <= mib + 4


def test_optional_contender_modules_are_skipped_and_names_unique(monkeypatch):
    from benchmarks import attention

    monkeypatch.setattr(attention, "MODULES",
                        ("benchmarks.contenders_softmax", "benchmarks.contenders_absent"))
    modules = attention.load_modules()
    assert [m.__name__ for m in modules] == ["benchmarks.contenders_softmax"]
    table = attention.all_contenders(modules)
    assert {"SoftmaxAttention", "nn.MultiheadAttention", "F.sdpa"} <= set(table)
    twin = types.ModuleType("benchmarks.twin")
    twin.contenders = lambda: {"SoftmaxAttention": None}
    with pytest.raises(ValueError, match="'SoftmaxAttention' defined by"):
        attention.all_contenders([*modules, twin])


def test_target_verdict():
    from benchmarks.attention import check_target

    def res(*times):
        return {n: {"times_s": [t, 2 * t]} for n, t in zip((512, 1024), times, strict=True)}

    met = check_target({"SoftmaxAttention": res(1.0, 2.0), "nn.MultiheadAttention": res(1.0, 2.0)},
                       [512, 1024])
    assert met is not None and ": met (512: 1.00x, 1024: 1.00x)" in met
    missed = check_target({"SoftmaxAttention": res(1.0, 2.2),
                           "nn.MultiheadAttention": res(1.0, 2.0)}, [512, 1024])
    assert missed is not None and "MISSED" in missed and "1024: 1.10x" in missed


# -- where the scripts write: untracked by default, the committed results only on request ----

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"

#: (module, its OUTPUT name) of every script that writes JSON / tables / plots
SCRIPTS = [
    ("benchmarks.attention", "attention.json"),
    ("benchmarks.contenders_performer", "performer_errors.md"),
    ("benchmarks.generation", "generation.json"),
    ("benchmarks.interop_zero_shot", "interop_zero_shot.json"),
    ("benchmarks.nystrom_conditioning", "nystrom_conditioning.json"),
    ("benchmarks.nystrom_errors", "nystrom_errors.json"),
    ("benchmarks.positional", "positional.json"),
    ("benchmarks.rdrop_two_pass", "rdrop_two_pass.json"),
    ("benchmarks.sdpa_kernels", "sdpa_kernels.json"),
    ("benchmarks.whitening_minilm", "whitening_minilm.json"),
]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize(("module", "name"), SCRIPTS)
def test_default_output_is_untracked_and_update_results_selects_the_committed_file(
    module, name, tmp_path
):
    import importlib

    from benchmarks import outputs

    script = importlib.import_module(module)
    assert script.OUTPUT == name
    default = outputs.output_path(script.parse_args([]), script.OUTPUT)
    assert default == outputs.RUNS / name and not outputs.is_committed_location(default)
    chosen = outputs.output_path(script.parse_args(["--out", str(tmp_path / "x.json")]), name)
    assert chosen == tmp_path / "x.json"
    committed = outputs.output_path(script.parse_args(["--update-results"]), script.OUTPUT)
    assert committed == outputs.RESULTS / name
    with pytest.raises(SystemExit, match="--update-results"):  # --out into results/ is refused
        outputs.output_path(script.parse_args(["--out", str(outputs.RESULTS / name)]), name)
    with pytest.raises(SystemExit):  # one or the other
        script.parse_args(["--update-results", "--out", str(tmp_path / "x.json")])


def test_listops_writes_to_runs_by_default_and_to_results_only_with_the_flag(tmp_path):
    from benchmarks import outputs
    from benchmarks.listops.__main__ import CACHE, output_folder, parse_args

    assert output_folder(parse_args([])) == outputs.RUNS / "listops"
    assert output_folder(parse_args(["--smoke"])) == outputs.RUNS / "listops-smoke"
    assert output_folder(parse_args(["--out", str(tmp_path)])) == tmp_path
    assert output_folder(parse_args(["--update-results"])) == outputs.RESULTS
    assert not outputs.is_committed_location(CACHE)
    with pytest.raises(SystemExit):
        parse_args(["--smoke", "--update-results"])  # smoke numbers are never committed
    with pytest.raises(SystemExit, match="--update-results"):
        output_folder(parse_args(["--out", str(outputs.RESULTS)]))


def test_reliability_table_rewrites_the_docs_page_only_with_the_flag(tmp_path):
    from benchmarks import outputs
    from benchmarks import reliability_table as rt

    assert rt.output_file(rt.parse_args([])) == outputs.RUNS / "reliability_table.md"
    assert rt.output_file(rt.parse_args(["--out", str(tmp_path / "t.md")])) == tmp_path / "t.md"
    assert rt.output_file(rt.parse_args(["--update-results"])) == REPO / "docs/reliability.md"
    with pytest.raises(SystemExit, match="--update-results"):
        rt.output_file(rt.parse_args(["--out", str(REPO / "docs/reliability.md")]))


REPORT_ONLY = [
    ("benchmarks.listops.__main__", ["listops/listops.json", "listops/listops.md",
                                     "listops/listops.png"]),
    ("benchmarks.nystrom_errors", ["nystrom_errors.md", "nystrom_errors.png"]),
    ("benchmarks.generation", ["generation.md", "generation.png"]),
    ("benchmarks.interop_zero_shot", ["interop_zero_shot.md"]),
    ("benchmarks.positional", ["positional_rope.md", "positional_bias.md"]),
    ("benchmarks.rdrop_two_pass", ["rdrop_two_pass.md"]),
    ("benchmarks.whitening_minilm", ["whitening_minilm.md"]),
]


@pytest.mark.parametrize(("module", "written"), REPORT_ONLY)
def test_report_only_reads_the_committed_json_and_leaves_results_untouched(
    module, written, tmp_path, monkeypatch
):
    """What a user's ``--report-only`` run does end to end: the committed files stay byte for
    byte as they were; the re-rendered ones land in ``benchmarks/runs/`` (here: a tmp dir)."""
    import importlib

    from benchmarks import outputs

    monkeypatch.setattr(outputs, "RUNS", tmp_path)
    before = _snapshot(outputs.RESULTS)
    importlib.import_module(module).main(["--report-only"])
    assert _snapshot(outputs.RESULTS) == before
    for name in written:
        assert (tmp_path / name).stat().st_size > 0, name


def test_no_script_builds_a_path_into_results_except_through_outputs():
    """Scripts reach ``benchmarks/results/`` only through ``benchmarks.outputs`` (whose
    ``output_path`` allows it only with ``--update-results``)."""
    offenders = []
    for path in sorted(BENCHMARKS.rglob("*.py")):
        if path.name in ("outputs.py", "docs_hooks.py"):
            continue
        source = path.read_text()
        if re.search(r"/\s*[\"']results[\"']|Path\(\s*[\"'](benchmarks/)?results", source):
            offenders.append(str(path.relative_to(REPO)))
    assert offenders == []


def _tracked(prefix: str) -> set[str]:
    proc = subprocess.run(["git", "ls-files", prefix], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip("not a git checkout")
    return set(proc.stdout.split())


def test_docs_include_only_committed_results():
    """Every results table or plot the docs and README include is a committed file (a user's
    run writes elsewhere, so the site never publishes it as the committed numbers)."""
    tracked = _tracked("benchmarks/results")
    pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    included = set()
    for page in pages:
        text = page.read_text()
        included |= set(re.findall(r'--8<--\s+"(benchmarks/[^"]+?)(?::[\w-]+)?"', text))
        included |= {f"benchmarks/{m}" for m in re.findall(r"\]\((results/[^)\s]+)\)", text)}
    assert included, "no included results found: the patterns are stale"
    assert all(path.startswith("benchmarks/results/") for path in included), included
    assert sorted(included - tracked) == []
    from benchmarks import docs_hooks

    assert docs_hooks.RESULTS == BENCHMARKS / "results"


# -- the attention benchmark's progress bar counts every step it waits on ---------------------


class FakeClock:
    """``time`` for benchmarks.attention: every perf_counter() call is 10 ms later."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 0.01
        return self.now


class FakeBar:
    """tqdm's interface as the harness uses it; records (n, total) after every change."""

    instances: list[FakeBar] = []

    def __init__(self, total: int = 0, **_: object) -> None:
        self.n, self.total, self.history = 0, total, []
        FakeBar.instances.append(self)

    def update(self, k: int = 1) -> None:
        self.n += k
        self.history.append((self.n, self.total))

    def refresh(self) -> None:
        self.history.append((self.n, self.total))

    def set_postfix_str(self, *_: object) -> None:
        pass

    def __enter__(self) -> FakeBar:
        return self

    def __exit__(self, *_: object) -> None:
        self.history.append(("closed", self.n, self.total))


def _assert_honest(history: list, closed: bool = False) -> None:
    if closed:
        assert history[-1][0] == "closed"
        history = history[:-1]
    n, total = history[-1]
    assert n == total  # ends at 100 %
    assert all(n < total for n, total in history[:-1])  # and never reads 100 % before the end


def test_round_robin_bar_counts_the_extra_rounds(monkeypatch):
    from benchmarks import attention

    monkeypatch.setattr(attention, "time", FakeClock())
    monkeypatch.setattr(attention, "fwd_bwd", lambda step: None)

    def broken(n, device=None):
        raise RuntimeError("cannot build")

    factories = {"a": lambda n, device=None: (lambda: None),
                 "b": lambda n, device=None: (lambda: None), "broken": broken}
    repeats = 3
    bar = FakeBar(total=len(factories) * repeats)
    out = attention.time_round_robin(factories, 64, repeats, bar.update, min_seconds=0.2,
                                     grow=lambda k: setattr(bar, "total", bar.total + k))
    rounds = len(out["a"]["times_s"])
    assert rounds > repeats  # --min-seconds added rounds (each step reads 10 ms here) ...
    assert rounds == len(out["b"]["times_s"]) and "error" in out["broken"]
    assert bar.n == 2 * rounds + repeats  # ... and the bar counted each of their steps
    _assert_honest(bar.history)


def test_attention_main_bar_reaches_100_percent_only_at_the_end(monkeypatch, tmp_path):
    """The whole harness with fake contenders, clock, memory probe and bar: a contender that
    fails to build, one whose memory run fails, extra rounds at short lengths."""
    import tqdm

    from benchmarks import attention

    module = types.ModuleType("benchmarks.fake_contenders")

    def broken(n, device=None):
        raise RuntimeError("cannot build")

    module.contenders = lambda: {"fast": lambda n, device=None: (lambda: None),
                                 "broken": broken,
                                 "memfail": lambda n, device=None: (lambda: None)}
    monkeypatch.setattr(attention, "load_modules", lambda: [module])
    monkeypatch.setattr(attention, "time", FakeClock())
    monkeypatch.setattr(attention, "fwd_bwd", lambda step: None)
    monkeypatch.setattr(attention, "plot", lambda *a, **k: None)
    monkeypatch.setattr(
        attention, "measure_memory",
        lambda mod, name, n, **kw: {"error": "killed"} if name == "memfail" else
        {"peak_bytes": 1, "memory_method": "fake"})
    monkeypatch.setattr(tqdm, "tqdm", FakeBar)
    FakeBar.instances.clear()
    report = attention.main(["--lengths", "64", "128", "--repeats", "2", "--min-seconds", "0.15",
                             "--error-lengths", "--out", str(tmp_path / "a.json")])
    (bar,) = FakeBar.instances
    assert len(report["results"]["fast"]["64"]["times_s"]) > 2  # extra rounds ran
    _assert_honest(bar.history, closed=True)
