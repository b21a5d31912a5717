"""Smoke test of `nord bench decentralized --quick`: every merge path runs, bytes and replicas are checked."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from nord.errors import ConfigError

BENCH = Path(__file__).resolve().parent.parent / "bench" / "decentralized.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_decentralized", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_unknown_setup_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown setup 'nope'"):
        _bench().main(["--quick", "--jobs", "1", "--setups", "nope", "--out", str(tmp_path / "r.json")])


def test_any_warmup_setup_name_is_parsed_into_densities_per_chunk():
    bench = _bench()
    low = bench.warmup_setup("wu16-0.39-from6.25")
    assert (low.density, low.warmup_density, low.warmup_rounds) == (16 / 4096, 256 / 4096, 16)
    assert low.mean == "damped" and low.kind == "nord" and low.outer_lr == 1.0
    assert bench.warmup_setup("wu16-0.39-from6.25-lr1.5").outer_lr == 1.5
    shared = bench.warmup_setup("wu0-2.44-shared")
    assert (shared.mask, shared.warmup_rounds, shared.density) == ("shared", 0, 100 / 4096)
    assert low.mask == "topk" and (low.ef_decay, low.value_bits) == (1.0, 4)
    coarse = bench.warmup_setup("wu8-0.78-from6.25-ef0.95-2bit")
    assert (coarse.ef_decay, coarse.value_bits, coarse.density) == (0.95, 2, 32 / 4096)
    assert bench.warmup_setup("wu8-1.56") == bench.all_setups("1.56")["wu8-1.56"]  # the run default's row
    assert bench.warmup_setup("wu8-1.56").warmup_density == 0.25 and bench.warmup_setup("dense") is None
    with pytest.raises(ConfigError, match="densities must be in"):
        bench.warmup_setup("wu4-0.001")
    with pytest.raises(ConfigError, match="decay must be in"):
        bench.warmup_setup("wu4-1.56-ef1.5")


def test_bytes_only_measures_each_rounds_envelope_without_training(tmp_path):
    out = tmp_path / "plan.json"
    setups = ["central", "nord-1.56", "wu2-1.56", "wu0-1.56-shared"]
    argv = ["--bytes-only", "--rounds", "3", "--setups", *setups, "--out", str(out)]
    assert _bench().main(argv) == 0
    rows = {r["setup"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == setups[1:]  # only Nord setups send envelopes
    # the same 1.56% of values without their indices: ~4.25 of ~13.25 bits per kept value, plus the header
    assert rows["wu0-1.56-shared"]["bytes_per_peer_round"] < 0.4 * rows["nord-1.56"]["bytes_per_peer_round"]
    flat, warm = rows["nord-1.56"]["first_rounds"], rows["wu2-1.56"]["first_rounds"]
    assert flat[0] == flat[1] == flat[2] and warm[0] > warm[1] > warm[2] == flat[2]  # 25%, 3.1%, then 1.56%
    assert rows["nord-1.56"]["byte_ratio_vs_dense"] > 100 > rows["wu2-1.56"]["byte_ratio_vs_dense"]


@pytest.mark.slow
def test_quick_run_trains_every_merge_path_and_counts_bytes(tmp_path):
    setups = ["central", "dense-nesterov", "nord-1.56", "1.56-damped", "wu4-1.56", "wu2-1.56-shared"]
    out = tmp_path / "r.json"
    assert _bench().main(["--quick", "--jobs", "1", "--setups", *setups, "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = {r["setup"]: r for r in doc["rows"]}
    assert list(rows) == setups
    rounds = doc["shape"]["rounds"]
    for run in doc["runs"]:
        curve = run["curve"]
        assert len(curve["val_loss"]) == rounds + 1 and all(math.isfinite(v) for v in curve["val_loss"])
        assert curve["val_loss"][-1] < curve["val_loss"][0], f"{run['setup']['name']} did not learn"
        assert 0 < run["firing_rate"] < 1
    assert rows["central"]["bytes_per_peer_round"] == 0
    params = doc["runs"][0]["params"]
    assert rows["dense-nesterov"]["bytes_per_peer_round"] == 4 * params
    for name in setups[2:4]:
        # 64 of every 4096 values at ~9 bits of index + 4 bits of value: far under fp32
        assert rows[name]["byte_ratio_vs_dense"] > 25
    # replica-merged setups: a second replica fed the bytes in reverse order accepted every seal
    assert rows["nord-1.56"]["verified_rounds"] == rows["wu2-1.56-shared"]["verified_rounds"] == rounds
    assert not rows["1.56-damped"]["bench_side"]  # MergeConfig.damping, through the replicas
    assert not rows["nord-1.56"]["bench_side"]
    # density warm-up: round 0 at 25%, round 1 at 12.5%, both above the 1.56% of no warm-up
    by_name = {run["setup"]["name"]: run["bytes_per_peer_by_round"] for run in doc["runs"]}
    warm, flat = by_name["wu4-1.56"], by_name["nord-1.56"]
    assert warm[0] > warm[1] > 2 * max(flat)
    assert rows["wu4-1.56"]["bytes_per_peer_total"] == pytest.approx(sum(warm))
    for png in doc["plots"]:
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --combine: the same runs read back give the same table (a file's runs replace the same setup and
    # seed of an earlier file, so reading it twice counts each seed once)
    combined = tmp_path / "c.json"
    assert _bench().main(["--combine", str(out), str(out), "--out", str(combined)]) == 0
    again = {r["setup"]: r for r in json.loads(combined.read_text())["rows"]}
    assert (
        again["nord-1.56"]["seeds"] == 1 and again["nord-1.56"]["val_loss"] == rows["nord-1.56"]["val_loss"]
    )


def test_combine_refuses_runs_of_another_shape(tmp_path):
    paths = []
    for rounds in (24, 120):
        path = tmp_path / f"r{rounds}.json"
        path.write_text(json.dumps({"shape": {"rounds": rounds}, "runs": []}))
        paths.append(str(path))
    with pytest.raises(ConfigError, match="another run shape"):
        _bench().main(["--combine", *paths, "--out", str(tmp_path / "c.json")])


def test_combine_keeps_the_rounds_every_run_evaluated_and_the_latest_run_of_a_seed(tmp_path):
    _bench()  # puts bench/ on sys.path
    import _decentralized_report as report

    paths = []
    for every, seeds in ((6, (0, 1)), (12, (0,))):
        rounds = list(range(0, 25, every))
        curve = {"round": rounds, "val_loss": [every] * len(rounds)}
        runs = [{"setup": {"name": "dense"}, "seed": seed, "curve": curve} for seed in seeds]
        path = tmp_path / f"e{every}.json"
        path.write_text(json.dumps({"shape": {"rounds": 24, "eval_every": every}, "runs": runs}))
        paths.append(str(path))
    shape, runs = report.combined_runs(paths)
    assert shape == {"rounds": 24, "eval_every": 12}
    by_seed = {run["seed"]: run["curve"] for run in runs}
    assert by_seed == {
        0: {"round": [0, 12, 24], "val_loss": [12] * 3},
        1: {"round": [0, 12, 24], "val_loss": [6] * 3},
    }


def test_partial_report_reads_progress_lines_and_logs_of_unfinished_runs(tmp_path):
    _bench()  # puts bench/ on sys.path
    import _decentralized_report as report

    progress = tmp_path / "p.jsonl"
    lines = [
        {"setup": "dense", "seed": 0, "round": 6, "val_loss": 5.0, "bytes_per_peer_total": 2400.0},
        {"setup": "wu0-1.56-shared", "seed": 0, "round": 6, "val_loss": 5.1, "bytes_per_peer_total": 24.0},
        {"setup": "wu0-1.56-shared", "seed": 0, "round": 12, "val_loss": 4.9, "bytes_per_peer_total": 48.0},
    ]
    progress.write_text("".join(json.dumps(line) + "\n" for line in lines))
    log = tmp_path / "run.log"
    log.write_text(
        "02:09:19 central seed 0 round 6: val 4.5000\nsetups: 50%\n02:09:25 dense seed 0 round 6: val 9.9\n"
    )
    finished = tmp_path / "r.json"  # a finished run's --out file: its curve, bytes summed to each round
    run = {"setup": {"name": "nord-1.56"}, "seed": 0, "bytes_per_peer_by_round": [2.0] * 6,
           "curve": {"round": [0, 3, 6], "val_loss": [9.0, 6.0, 5.5]}}  # fmt: skip
    finished.write_text(json.dumps({"runs": [run]}))
    points = report.progress_points([str(progress), str(log), str(finished)])
    assert len(points) == 6  # the log's dense point repeats the progress file's and is dropped
    out = tmp_path / "partial.json"
    report.partial_report(points, dense_bytes=400.0, out=out)
    rows = {row["round"]: row for row in json.loads(out.read_text())["rows"]}
    shared = rows[6]["wu0-1.56-shared"]
    assert shared["vs_dense"] == pytest.approx(0.02) and shared["byte_ratio_vs_dense"] == pytest.approx(100)
    assert rows[6]["central"]["vs_dense"] == pytest.approx(-0.1)
    assert "vs_dense" not in rows[12]["wu0-1.56-shared"]  # no dense point at round 12
    assert rows[6]["nord-1.56"]["byte_ratio_vs_dense"] == pytest.approx(200)
