"""benchmarks/bench_models.py on the CPU: its --dry-run (tiny models, eager and rtxjit under the
Triton interpreter, one process per case), a case whose package is missing, the --time-limit stop
and --resume, and the ratios against compile_graph that the markdown reports (issue 18)."""

from __future__ import annotations

import importlib.util
import json
import math

from benchmarks import bench_models as bm


def _report(out):
    return json.loads((out / "bench_models_dryrun.json").read_text())


def test_dry_run_one_process_per_case(tmp_path):
    cases = ["tiny_cnn_b1", "tiny_gpt2_s16_b1", "tiny_swin_t"]
    assert bm.main(["--dry-run", "--out", str(tmp_path), "--cases", ",".join(cases)]) == 0
    report = _report(tmp_path)
    assert report["settings"]["isolate"] and [c["case"] for c in report["cases"]] == cases
    info = {c["case"]: c for c in report["cases"]}
    assert all("process_s" in c and "incomplete" not in c for c in info.values())
    if importlib.util.find_spec("torchvision") is None:
        assert info["tiny_swin_t"]["skipped"] == "needs torchvision (not installed)"
        assert "- tiny_swin_t: needs torchvision (not installed)" in (tmp_path / "bench_models_dryrun.md").read_text()
    for case in cases[:2]:
        records = {r["system"]: r for r in report["results"] if r["case"] == case}
        assert set(records) == {"eager", "rtxjit"}  # the torch.compile systems are GPU-only
        assert not any("error" in r for r in records.values()), records
        rt = records["rtxjit"]
        assert rt["rel_err_ok"] and rt["launches"] > 0 and rt["plan_bytes"] > 0 and rt["plan_flops"] > 0
        assert rt["speedup_vs_eager"] > 0 and "roofline" not in rt  # no measured ceilings on a CPU
        assert 0 < rt["first_output_s"] <= rt["setup_s"] and rt["specialize_wait_s"] >= 0
        # an fp32 copy of the model judges both; eager and rtxjit are about as far from it
        assert 0 < info[case]["eager_vs_fp32"] <= 1e-2 and rt["err_vs_fp32"] <= 1e-2


def test_time_limit_stops_a_case_and_resume_reruns_it(tmp_path):
    args = bm.parse_args(["--dry-run", "--out", str(tmp_path)])
    case = next(c for c in bm.DRY_RUN_CASES if c.name == "tiny_cnn_b1")
    systems = [s for s in bm.SYSTEMS if not s.gpu_only]
    info, records = bm.run_isolated(case, args, systems, tmp_path, timeout=0.1)
    assert info["incomplete"].startswith("stopped by --time-limit")
    assert [r["system"] for r in records] == ["eager", "rtxjit"]
    assert all(r["error"].startswith("not measured: stopped by --time-limit") for r in records)
    report = {"cases": [info, {"case": "tiny_cnn_b4"}], "results": records}
    (tmp_path / "bench_models_dryrun.json").write_text(json.dumps(report))
    assert bm._complete(tmp_path / "bench_models_dryrun.json") == {"tiny_cnn_b4"}
    # too little time left for any case: none starts, all are listed to resume
    assert bm.main(["--dry-run", "--out", str(tmp_path), "--resume", "--time-limit", "1",
                    "--cases", "tiny_cnn_b1,tiny_cnn_b4"]) == 0
    report = _report(tmp_path)
    assert report["not_run"] == ["tiny_cnn_b1"]  # tiny_cnn_b4 was complete: kept, not rerun
    assert [c["case"] for c in report["cases"]] == ["tiny_cnn_b4"]


def _rec(case, system, ms):
    return {"case": case, "system": system, "median_ms": ms}


def test_ratios_against_compile_graph_and_the_issue_18_summary():
    info = {"case": "m"}
    records = [_rec("m", "eager", 8.0), _rec("m", "compile_graph", 2.0), _rec("m", "rtxjit", 1.0),
               {"case": "m", "system": "compile", "error": "boom"}]
    records[2]["floor_ms"] = 0.5
    bm.derive(info, records)
    eager, graph, rt = records[:3]
    assert info["floor_ms"] == 0.5
    assert rt["ratio_vs_compile_graph"] == 0.5 and rt["speedup_vs_eager"] == 8.0 and rt["roofline"] == 0.5
    assert graph["ratio_vs_compile_graph"] == 1.0 and eager["roofline"] == 0.5 / 8.0
    assert "ratio_vs_compile_graph" not in records[3]
    ratios = [0.5] * 11 + [1.2]
    results = [dict(_rec(f"c{i}", "rtxjit", x), ratio_vs_compile_graph=x) for i, x in enumerate(ratios)]
    total = bm.summary(results)
    assert total["cases"] == 12 and math.isclose(total["geomean_ratio"], math.exp(sum(map(math.log, ratios)) / 12))
    assert total["worst_case"] == "c11" and total["over_1_1"] == ["c11"] and not total["meets_issue_18"]
    assert bm.summary(results[:11] + [dict(results[11], ratio_vs_compile_graph=1.0)])["meets_issue_18"]


def test_jobs_set_up_cases_at_once_and_time_them_one_at_a_time(tmp_path):
    cases = ["tiny_cnn_b1", "tiny_cnn_b4", "tiny_gpt2_s16_b1"]
    assert bm.main(["--dry-run", "--out", str(tmp_path), "--cases", ",".join(cases), "--jobs", "3"]) == 0
    report = _report(tmp_path)
    assert report["settings"]["jobs"] == 3 and sorted(c["case"] for c in report["cases"]) == sorted(cases)
    spans = []
    for info in report["cases"]:
        assert "incomplete" not in info and info["gate_wait_s"] >= 0
        spans.append((info["timed_from"], info["timed_until"]))
        records = {r["system"]: r for r in report["results"] if r["case"] == info["case"]}
        assert set(records) == {"eager", "rtxjit"} and not any("error" in r for r in records.values()), records
        assert records["rtxjit"]["rel_err_ok"] and records["rtxjit"]["median_ms"] > 0
        assert all("_resident" not in r for r in records.values())
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans  # no two cases timed at once
    assert "3 set up at once" in (tmp_path / "bench_models_dryrun.md").read_text()


def test_jobs_stop_cases_at_the_time_limit_and_start_none_without_time(tmp_path, monkeypatch):
    """--jobs with a time limit: a case still running at the limit is marked incomplete, its systems
    'not measured'; with less than MIN_CASE_S left, no case starts and all are listed not run."""
    import time

    args = bm.parse_args(["--dry-run", "--out", str(tmp_path), "--jobs", "2", "--time-limit", "1"])
    cases = [c for c in bm.DRY_RUN_CASES if c.name in ("tiny_cnn_b1", "tiny_cnn_b4")]
    systems = [s for s in bm.SYSTEMS if not s.gpu_only]
    got = []
    assert bm.run_parallel(cases, args, systems, tmp_path, time.perf_counter(), got.append) == \
        ["tiny_cnn_b1", "tiny_cnn_b4"] and got == []  # 1 s left < MIN_CASE_S
    monkeypatch.setattr(bm, "MIN_CASE_S", 0)
    assert bm.run_parallel(cases, args, systems, tmp_path, time.perf_counter(),
                           lambda info, records: got.append((info, records))) == []
    assert sorted(info["case"] for info, _ in got) == ["tiny_cnn_b1", "tiny_cnn_b4"]
    for info, records in got:  # a dry-run case takes well over a second (imports, interpreter)
        assert info["incomplete"].startswith("stopped by --time-limit")
        assert {r["system"] for r in records} == {"eager", "rtxjit"}
        assert all(r["error"].startswith("not measured") for r in records)
