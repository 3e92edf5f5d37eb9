"""benchmarks/report.py's cost table: memory as bytes over bytes, time against SlimGPT, and the size fit."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPORT = Path(__file__).resolve().parents[1] / "benchmarks" / "report.py"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("report", REPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(model: str, method: str, params: int, seconds: float, peak_mib: float) -> dict:
    return {"row": {"model": model, "method": method, "ratio": 0.2}, "params_before": params,
            "prune_seconds": seconds, "peak_rss_mb": peak_mib}


def test_cost_table_divides_bytes_by_bytes_and_fits_growth_in_parameters(report):
    """hywia.json records MiB: 3,072 MiB against float32 weights of exactly 1 GiB is 3.00x and 3.2 GB, not 2.8x; a size
    fit needs three sizes."""
    gib_of_weights = 2**30 // 4
    records = [row("small", "slimgpt", gib_of_weights, 100, 2048), row("small", "hywia-adaptive", gib_of_weights, 250, 3072),
               row("large", "slimgpt", 4 * gib_of_weights, 800, 8192), row("large", "hywia-adaptive", 4 * gib_of_weights, 2000, 9216),
               row("largest", "hywia-adaptive", 16 * gib_of_weights, 16000, 30000)]
    lines = report.cost_by_size_table(records).splitlines()
    small = next(line for line in lines if line.startswith("| small |") and "hywia-adaptive" in line).strip(" |").split(" | ")
    assert small[4:8] == ["250", "2.50", "3.2", "3.00"]
    large = next(line for line in lines if line.startswith("| large |") and "hywia-adaptive" in line).strip(" |").split(" | ")
    assert large[6:8] == ["9.7", "2.25"]
    largest = next(line for line in lines if line.startswith("| largest |")).strip(" |").split(" | ")
    assert largest[5] == "-"  # no SlimGPT row on that model: no ratio, not nan
    fit = next(line for line in lines if line.startswith("| hywia-adaptive | 20% | 3 |"))
    assert "k = 1.50" in fit  # 250 s -> 2,000 s -> 16,000 s, each over 4x the parameters: 8 = 4^1.5
    assert not any(line.startswith("| slimgpt | 20% |") for line in lines)  # two sizes: a slope, no fit



def test_a_cost_row_with_more_flags_is_its_own_method_against_plain_slimgpt(report):
    """`--extra` flags (a faster split, a lighter store) name the row's method, keep it out of the plain method's size
    fit, and its multiple is of SlimGPT's plain row on the same model."""
    records = [row(m, "hywia-adaptive", p, 4 * s, 1000) for m, p, s in (("a", 10**8, 100), ("b", 4 * 10**8, 400), ("c", 16 * 10**8, 1600))]
    records += [row(m, "slimgpt", p, s, 1000) for m, p, s in (("a", 10**8, 100), ("b", 4 * 10**8, 400))]
    fast = row("a", "hywia-adaptive", 10**8, 150, 1000)
    fast["row"]["extra"] = ["--kind-split", "evidence"]
    lines = report.cost_by_size_table(records + [fast]).splitlines()
    assert any(line.startswith("| a | 100 M | hywia-adaptive --kind-split evidence | 20% | 150 | 1.50 |") for line in lines)
    assert any(line.startswith("| a | 100 M | hywia-adaptive | 20% | 400 | 4.00 |") for line in lines)
    fit = next(line for line in lines if line.startswith("| hywia-adaptive | 20% |"))
    assert "| 3 | k = 1.00 |" in fit  # the fast row is not a fourth point of the default's fit
    assert not any(line.startswith("| hywia-adaptive --kind-split evidence | 20% | ") and "k =" in line for line in lines)

def test_cost_tables_compare_seconds_within_one_machine(report):
    """SlimGPT's multiple is taken against SlimGPT on the same machine: rows of two machines make two tables."""
    records = [{**row("m", "slimgpt", 10**8, 100, 1000), "machine": "Intel Xeon"},
               {**row("m", "hywia-adaptive", 10**8, 300, 1000), "machine": "Intel Xeon"},
               {**row("m", "slimgpt", 10**8, 200, 1000), "machine": "AMD EPYC"},
               {**row("m", "hywia-adaptive", 10**8, 300, 1000), "machine": "AMD EPYC"}]
    text = report.cost_by_machine(records)
    xeon, epyc = text.split("AMD EPYC)")
    assert "Intel Xeon)" in xeon and "| 300 | 3.00 |" in xeon and "| 300 | 1.50 |" in epyc
    assert "1.50" not in xeon and "3.00" not in epyc


def test_store_table_names_each_statistics_store_and_its_calibrate_peak(report):
    """The per-weight and per-group rows of one method side by side; the calibrate stage's peak in GB (10^9 bytes)."""
    gib_of_weights = 2**30 // 4
    plain = {**row("m", "hywia-adaptive", gib_of_weights, 300, 4096), "stages": {"calibrate": {"peak_rss_mb": 4096}}}
    plain["row"]["extra"] = []
    lean = {**row("m", "hywia-adaptive", gib_of_weights, 290, 2048), "stages": {"calibrate": {"peak_rss_mb": 1024}}}
    lean["row"] = {**lean["row"], "extra": ["--stats-store", "groups"]}
    lines = report.store_table([lean, plain]).splitlines()[2:]
    assert [line.split(" | ")[3] for line in lines] == ["per-weight", "per-group totals"]
    assert lines[0].strip(" |").split(" | ")[4:8] == ["300", "4.29", "4.00", "4.29"]
    assert lines[1].strip(" |").split(" | ")[4:8] == ["290", "2.15", "2.00", "1.07"]


def test_pairs_table_pairs_neighbouring_rows_of_one_model_and_ratio(report):
    """A pair is the two methods' neighbouring rows at one model and ratio, as they ran back to back: the same model
    at two ratios is two pairs, each multiple against its own SlimGPT row, and a pair run across two commits names
    both; the default's split and build stages ride in brackets, each side's peak is bytes over the float32 weights."""
    def tagged(method: str, ratio: float, seconds: float, commit: str = "abc1234") -> dict:
        r = {**row("m", method, 2**28, seconds, 3072 if method == "slimgpt" else 2048), "commit": commit,
             "stages": {"split": {"seconds": 10.0}, "build": {"seconds": 20.0}} if method == "hywia-adaptive" else {}}
        r["row"] = {**r["row"], "ratio": ratio}
        return r
    records = [tagged("hywia-adaptive", 0.2, 300), tagged("slimgpt", 0.2, 100),
               tagged("slimgpt", 0.5, 400), tagged("hywia-adaptive", 0.5, 600), tagged("slimgpt", 0.2, 50, "def5678"),
               tagged("hywia-adaptive", 0.2, 200, "def5678"), tagged("slimgpt", 0.2, 80, "0123abc"),
               tagged("hywia-adaptive", 0.2, 320, "4567def")]
    lines = [line.strip(" |").split(" | ") for line in report.pairs_table(records).splitlines()[2:]]
    assert [(line[1], line[2], line[5]) for line in lines] == [("20%", "abc1234", "3.00"), ("50%", "abc1234", "1.50"),
                                                              ("20%", "def5678", "4.00"), ("20%", "0123abc / 4567def", "4.00")]
    assert lines[1][3:5] == ["600 (split 10, build 20)", "400"] and lines[1][6] == "2.00, 3.00"
    alone = report.pairs_table([tagged("slimgpt", 0.2, 3000, "0123abc")]).splitlines()[-1]
    assert alone == "| m | 20% | 0123abc | - | 3,000 | - | -, 3.00 |"  # the default did not finish: its cells read "-"


def test_judges_table_puts_the_two_judges_of_one_cell_side_by_side(report):
    """One line a model, ratio and seed: the built and the screened judge's differences per text with the share each
    kept, whether their kept groups match (by digest), and the three prunes' seconds; a cell without a SlimGPT row
    reads "-" there, a cell whose judges kept different groups reads "no"."""
    def judged(extra: list, seed: int, seconds: float, kept: float, digest: str, wiki: float) -> dict:
        texts = {"wikitext2": {"difference": wiki, "standard_error": 0.005}, "c4": {"difference": -0.02, "standard_error": 0.008}}
        r = {**row("m", "hywia-adaptive", 2**28, seconds, 2048), "kept_digest": digest,
             "kind_split_evidence": {"attention_share": kept, "judge": {"texts": texts},
                                     "screened": {"masked": {"attention_share": 0.0}, "refit": {"attention_share": 0.1}}}}
        r["row"] = {**r["row"], "seed": seed, "extra": extra}
        return r
    slim = {**row("m", "slimgpt", 2**28, 100, 2048)}
    slim["row"] = {**slim["row"], "seed": 0, "extra": []}
    records = [judged(["--kind-split", "evidence-both"], 0, 350, 0.1, "aaa", -0.0334), slim, judged([], 0, 450, 0.1, "aaa", -0.035),
               judged(["--kind-split", "evidence-best"], 1, 900, 0.1, "bbb", -0.04), judged(["--kind-split", "evidence-both"], 1, 600, 0.0, "ccc", -0.001)]
    lines = [line.strip(" |").split(" | ") for line in report.judges_table(records).splitlines()[2:]]
    assert lines[0] == ["m", "20%", "0", "0, 0.1", "wikitext2 -0.035 ± 0.005; c4 -0.020 ± 0.008 → 0.1",
                        "wikitext2 -0.033 ± 0.005; c4 -0.020 ± 0.008 → 0.1", "yes", "450, 350, 100"]
    assert lines[1][2] == "1" and lines[1][5].endswith("→ 0") and lines[1][6:] == ["no", "900, 600, -"]
    agreed = judged([], 2, 500, 0.1, "ddd", 0.0)
    agreed["kind_split_evidence"].pop("judge")
    assert report.judges_table([agreed]).splitlines()[-1].split(" | ")[4] == "none (screens agree) → 0.1"


def test_stage_table_gives_each_stages_peak_and_marks_stages_a_method_skips(report):
    """One row a prune: its options, the whole peak as a multiple of the float32 weights, then each stage's own peak
    in GB; a stage the method has no use for (SlimGPT builds nothing aside) reads "-"."""
    gib_of_weights = 2**30 // 4
    default = {**row("m", "hywia-adaptive", gib_of_weights, 400, 3072),
               "stages": {s: {"peak_rss_mb": 1024 * (i + 1) / 2} for i, s in enumerate(report.STAGES)}}
    default["row"] = {**default["row"], "extra": ["--stats-store", "groups"]}
    slim = {**row("m", "slimgpt", gib_of_weights, 100, 2048), "stages": {"before": {"peak_rss_mb": 512}, "build": {"peak_rss_mb": 2048}}}
    slim["row"]["extra"] = []
    lines = report.stage_table([slim, default]).splitlines()[2:]
    first, second = (line.strip(" |").split(" | ") for line in lines)
    assert first[1:7] == ["hywia-adaptive", "20%", "--stats-store groups", "400", "3.22", "3.00"]
    assert first[7:] == ["0.54", "1.07", "1.61", "2.15", "2.68", "3.22"]
    assert second[3] == "-" and second[7:] == ["0.54", "-", "-", "-", "-", "2.15"]


def test_a_row_run_under_an_allocator_setting_records_it_and_the_stage_table_names_it(report, monkeypatch):
    """glibc's MALLOC_*_ settings change a prune's peak and time without changing its flags: the row records them
    (only those, and nothing when none is set) and the stage table shows them beside the flags."""
    from hywia.bench import allocator_env
    for name in [k for k in os.environ if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"]:
        monkeypatch.delenv(name)
    assert allocator_env() == {}
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    monkeypatch.setenv("HYWIA_DATA_DIR", "elsewhere")
    assert allocator_env() == {"MALLOC_MMAP_THRESHOLD_": "1048576"}
    record = {**row("m", "hywia-adaptive", 2**28, 500, 2048), "stages": {}, "env": allocator_env()}
    record["row"] = {**record["row"], "extra": ["--stats-store", "groups"]}
    line = report.stage_table([record]).splitlines()[2].strip(" |").split(" | ")
    assert line[3] == "--stats-store groups MALLOC_MMAP_THRESHOLD_=1048576"


def test_a_grid_says_up_front_and_after_each_step_that_this_cpu_emulates_its_half_type(monkeypatch, capsys):
    """A benchmark step's own warnings reach the grid's log (its stderr is captured), and a grid that will evaluate or
    recover in bfloat16 on a CPU that emulates it says so before its first step, not an hour into it."""
    import subprocess

    from hywia import bench, io
    said = "hywia: warning: this CPU has no native bfloat16 matrix products"
    done = subprocess.CompletedProcess([], 0, stdout='{"ok": 1}\n', stderr=f"{said}\nprogress\n{said}\n")
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: done)
    assert bench._hywia("eval", "ppl") == {"ok": 1}
    assert capsys.readouterr().err.splitlines() == [said]  # once, however often the step said it
    for native, dtype, device, warned in [(False, "bfloat16", "cpu", True), (True, "bfloat16", "cpu", False),
                                          (None, "bfloat16", "cpu", False), (False, "float32", "cpu", False),
                                          (False, "bfloat16", "cuda", False)]:
        monkeypatch.setattr(io, "native_half", lambda _, native=native: native)
        bench.warn_emulated(dtype, device)
        err = capsys.readouterr().err
        assert ("emulates bfloat16" in err) == warned, (native, dtype, device, err)
