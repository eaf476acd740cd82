"""The experiment grid: calibration steps, run configs, resuming, failures and the report."""

import json
import math
import re
from pathlib import Path

import pytest

from esosae.experiments import calibrate

from esosae.experiments import runner as experiments

from esosae.experiments import report
from esosae.config import AUTO_DEFAULTS
from esosae.experiments.grid import METHOD_GRID, Variant, ablations, budgets, changes, full_method, select, train_config

FAST = ["--quick", "--sources", "easy", "--synthetic-steps", "30", "--jobs", "1"]  # in-process: monkeypatches apply
TRAIN_TRY = experiments.train_try


def power_law(knob, c=32.0, b=-2.4):
    return c * knob ** b


@pytest.mark.parametrize("knob_name, b, start", [("tau_scale", -2.4, 0.4), ("tau_scale", -1.2, 3.0),
                                                  ("l1_coeff", -0.6, 0.2)])
def test_calibration_reaches_the_band_of_a_power_law(knob_name, b, start):
    attempts = [calibrate.Attempt(start, power_law(start, b=b))]
    while not calibrate.in_band(attempts[-1].l0, 16.0):
        assert len(attempts) < 4, attempts
        k = calibrate.next_knob(knob_name, attempts, 16.0)
        attempts.append(calibrate.Attempt(k, power_law(k, b=b)))
    assert calibrate.best(attempts, 16.0) == len(attempts) - 1


def test_calibration_interpolates_between_bracketing_tries_and_bounds_its_steps():
    tries = [calibrate.Attempt(1.0, 64.0), calibrate.Attempt(4.0, 4.0), calibrate.Attempt(8.0, 1.0)]
    # the bracketing pair (1, 64) and (4, 4) has slope -2: L0 = 16 at knob 2
    assert calibrate.next_knob("tau_scale", tries, 16.0) == pytest.approx(2.0)
    silent = [calibrate.Attempt(1.0, 0.0)]
    assert calibrate.next_knob("tau_scale", silent, 16.0) == pytest.approx(1.0 / calibrate.MAX_STEP)
    flat = [calibrate.Attempt(1.0, 100.0), calibrate.Attempt(2.0, 100.0)]  # no response: the prior slope
    assert calibrate.next_knob("l1_coeff", flat, 25.0) == pytest.approx(2.0 * 4.0)


def test_a_near_flat_secant_steps_no_farther_than_a_quarter_of_the_prior_slope():
    """E-SOSAE v1's layer 2 on the language model (half the steps): τ₂ 0.878 → 0.976 moved its L0
    17.80 → 17.46 (a secant of -0.18), and the secant's step to 1.56 dropped it to 6.99 against 16."""
    tries = [calibrate.Attempt(0.7793, 20.08), calibrate.Attempt(0.8782, 17.80), calibrate.Attempt(0.9763, 17.46)]
    floor = calibrate.PRIOR_SLOPE["tau_scale"] / 4
    assert calibrate.next_knob("tau_scale", tries, 16.0) == pytest.approx(0.9763 * (16.0 / 17.46) ** (1 / floor))
    steep = [calibrate.Attempt(1.0, 20.0), calibrate.Attempt(1.1, 16.8)]  # a secant of -1.83: taken as it is
    secant = math.log(16.8 / 20.0) / math.log(1.1)
    assert calibrate.next_knob("tau_scale", steep, 16.0) == pytest.approx(1.1 * (16.0 / 16.8) ** (1 / secant))


def test_run_configs_follow_method_section_8():
    b = budgets(quick=False)["lm"]
    auto = AUTO_DEFAULTS["lm"]
    cfgs = {v.run: train_config(v, b, 1.5 if v.knob == "tau_scale" else 7.0, seed=3, run_dir="x") for v in METHOD_GRID}
    assert {r: c.sae.arch for r, c in cfgs.items()} == {0: "relu", 1: "topk", **{r: "esosae" for r in range(2, 10)}}
    for r in (0, 1):
        assert (cfgs[r].sae.m1, cfgs[r].sae.m2, cfgs[r].sae.target_l0) == (2 * b.m, 0, b.target_l0)
    assert cfgs[0].sae.l1_coeff == 7.0 and cfgs[1].sae.k == 7
    for r in range(2, 10):
        c = cfgs[r]
        assert (c.sae.m1, c.sae.m2, c.sae.target_l0) == (b.m, b.m, b.target_l0 / 2)
        assert c.schedule.tau_final == pytest.approx(1.5 * auto["tau_final"])
        assert c.schedule.tau_final_2 == pytest.approx(1.5 * auto.get("tau_final2", auto["tau_final"]))
    assert [cfgs[r].schedule.schedule for r in (2, 3, 4)] == ["exp", "linear", "const"]
    assert (cfgs[5].sae.clamp_margins, cfgs[6].sae.margins) == (False, "fixed")
    assert (cfgs[7].schedule.gamma_warmup, cfgs[8].sae.gamma_max, cfgs[2].sae.gamma_max) == ("linear", 0.0, 1.0)
    assert {cfgs[r].seed for r in range(9)} == {3} and cfgs[9].seed == 4
    assert {(c.steps, c.batch_size, c.data.data_seed, c.eval) for c in cfgs.values()} == {(300, 1024, 0, False)}


def test_v2_grid_configs():
    """Every v2 variant is a valid run on every source; the single-layer ones get 2·m and their own knob."""
    from esosae.config import V1_METHOD, V1_TAU_FINAL
    from esosae.experiments.grid import V2_GRID

    for src, b in budgets(quick=True).items():
        cfgs = {v.name: train_config(v, b, 3.0, seed=0, run_dir="x") for v in V2_GRID}
        assert (cfgs["batchtopk"].sae.k, cfgs["batchtopk"].sae.m1) == (3, 2 * b.m)
        assert cfgs["jumprelu"].sae.l1_coeff == 3.0 and cfgs["jumprelu"].sae.sparsity == "l0"
        assert {k: getattr(cfgs["v1"].sae, k) for k in V1_METHOD} == V1_METHOD
        taus = (cfgs["v1"].schedule.tau_final, cfgs["v1"].schedule.tau_final_2)
        assert taus == pytest.approx(tuple(3.0 * t for t in V1_TAU_FINAL.get(src, (taus[0] / 3,) * 2)))
        assert (cfgs["learned_l0"].sae.margins, cfgs["auxk"].sae.aux_k, cfgs["orth_rows"].sae.orth_norm) == \
            ("learned", 64, "rows")
    assert full_method(V2_GRID).name == "esosae"


@pytest.mark.parametrize("argv, message", [
    (["--runs", "3,12"], "--runs 12: the method grid has runs 0–9"),
    (["--sources", "lm,tiny"], "--sources takes a comma list of lm, easy, hard"),
    (["--grid", "other"], "--grid 'other' is unknown"),
    (["--tokens", "100"], "--tokens must be at least one batch"),
    (["--jobs", "0"], "--jobs must be >= 1"),
])
def test_bad_flags_are_one_line_exit_2(tmp_path, capsys, argv, message):
    assert experiments.main([*argv, "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "g").exists()


def count_training(monkeypatch, fail_run=None, interrupt_run=None):
    """Wrap train_try: record each call; make one run fail, or another one be interrupted."""
    calls = []

    def wrapped(v, *args):
        calls.append(v.run)
        if v.run == fail_run:
            raise RuntimeError("injected failure")
        if v.run == interrupt_run:
            raise KeyboardInterrupt
        return TRAIN_TRY(v, *args)

    monkeypatch.setattr(experiments, "train_try", wrapped)
    return calls


def chosen_dir(vdir):
    cal = json.loads((vdir / "calibration.json").read_text())
    return vdir / cal["attempts"][cal["chosen"]]["try"]


def core_rows(text):
    """{run: [cells]} of the first core-metrics table in a report."""
    block = text.split("### Core metrics (held-out)")[1].split("###")[0]
    rows = {}
    for line in block.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if cells and cells[0].isdigit():
            rows[int(cells[0])] = cells
    return rows


def test_grid_resumes_reports_failures_and_its_report_matches_the_json(tmp_path, monkeypatch, capsys):
    out = tmp_path / "g"
    argv = [*FAST, "--runs", "1,2,5,8,9", "--out", str(out)]
    calls = count_training(monkeypatch, fail_run=1, interrupt_run=5)
    assert experiments.main(argv) == 130  # run 1 fails, run 2 trains, run 5 is interrupted
    assert calls[0] == 1 and set(calls) == {1, 2, 5} and calls.count(5) == 1
    assert json.loads((out / "easy/run02_esosae/calibration.json").read_text())["status"] == "done"
    cal5 = json.loads((out / "easy/run05_unclamped/calibration.json").read_text())
    assert cal5["status"] == "training" and cal5["attempts"] == [] and cal5["pending"]["try"] == "try0"

    calls = count_training(monkeypatch)
    assert experiments.main(argv) == 1  # a failed run makes the exit status 1
    assert 1 not in calls and 2 not in calls and {5, 8, 9} <= set(calls)
    assert "failed earlier, skipped" in capsys.readouterr().out

    calls = count_training(monkeypatch)
    (out / "report.md").unlink()
    assert experiments.main(argv) == 1 and calls == []  # nothing left to train; the report is rewritten
    text = (out / "report.md").read_text()
    assert "**failed**: RuntimeError: injected failure" in text

    rows = core_rows(text)
    head = [c.strip() for c in re.split(r"(?<!\\)\|", text.split("### Core metrics (held-out)")[1].split("\n")[2])[1:-1]]
    for run, slug in ((2, "run02_esosae"), (5, "run05_unclamped"), (8, "run08_no_orth"), (9, "run09_esosae_seed1")):
        cal = json.loads((out / "easy" / slug / "calibration.json").read_text())
        core = json.loads((chosen_dir(out / "easy" / slug) / "eval/core.json").read_text())["eval_result_metrics"]
        cells = dict(zip(head, rows[run]))
        assert cells["FVU"] == report.fmt(core["reconstruction_quality"]["fvu"])
        assert cells["L0₁"] == report.fmt(core["sparsity"]["l0_1"])
        assert cells["atom rec."] == report.fmt(core["planted"]["atom_recovery"])
        assert cells["max \\|cos\\|"] == report.fmt(core["cross_layer"]["cos_max"])
        assert cells["L0 (in ±20%)"].startswith(report.fmt(core["sparsity"]["l0"]))
        assert cells["knob"] == f"tau_scale = {report.fmt(cal['attempts'][cal['chosen']]['knob'])}"
    sp2, sp9 = (json.loads((chosen_dir(out / "easy" / s) / "eval/sparse_probing.json").read_text())
                for s in ("run02_esosae", "run09_esosae_seed1"))
    a, b = sp2["eval_result_metrics"]["sae"]["sae_top_1_test_auc"], sp9["eval_result_metrics"]["sae"]["sae_top_1_test_auc"]
    seeds = text.split("Across the two seeds of runs 2 and 9")[1].split("\n")
    mean_row = next(line for line in seeds if line.startswith("| std of the mean AUC"))
    assert mean_row.split("|")[2].strip() == report.fmt(abs(a - b) / math.sqrt(2))
    assert "with seed 0 (run 9: seed + 1)." in text
    for name in ("curves", "probing", "margins", "cosines", "fvu_l0"):
        assert (out / "plots" / f"easy_{name}.png").stat().st_size > 1000
        assert f"plots/easy_{name}.png" in text
    assert json.loads((out / "grid.json").read_text())["invocations"][-1]["wall_s"] is not None


def test_same_folder_with_other_settings_is_refused(tmp_path, monkeypatch, capsys):
    out = tmp_path / "g"
    count_training(monkeypatch, fail_run=2)
    assert experiments.main([*FAST, "--runs", "2", "--out", str(out)]) == 1
    assert experiments.main(["--quick", "--sources", "easy", "--synthetic-steps", "40", "--runs", "2",
                             "--out", str(out)]) == 2
    assert "holds a grid run with other settings (budgets.easy)" in capsys.readouterr().err
    # hard has no run in the folder yet, so it takes the new budget (recorded for the next invocation)
    calls = count_training(monkeypatch, fail_run=2)
    assert experiments.main(["--quick", "--sources", "hard", "--synthetic-steps", "40", "--runs", "2", "--jobs", "1",
                             "--out", str(out)]) == 1 and calls == [2]
    budgets = json.loads((out / "grid.json").read_text())["budgets"]
    assert (budgets["easy"]["steps"], budgets["hard"]["steps"]) == (30, 40)
    assert experiments.main([*FAST, "--sources", "hard", "--runs", "2", "--out", str(out)]) == 2


def test_the_reports_roles_come_from_the_variants_settings():
    """Which run is the full method and which ablates what: read from the settings, so a
    renumbered or reordered grid cannot make the report compare the wrong runs."""
    assert full_method(METHOD_GRID).run == 2 and changes(full_method(METHOD_GRID)) == set()
    assert {s: [v.run for v in ablations(s, METHOD_GRID)] for s in
            ("schedule", "clamp_margins", "margins", "gamma_warmup", "orthogonality", "seed_offset", "arch")} == {
        "schedule": [3, 4], "clamp_margins": [5], "margins": [6], "gamma_warmup": [7], "orthogonality": [8],
        "seed_offset": [9], "arch": [0, 1]}
    renumbered = (Variant(7, "no_orth", orthogonality=False), Variant(3, "both", clamp_margins=False, seed_offset=1),
                  Variant(4, "full"), Variant(1, "unclamped", clamp_margins=False))
    assert full_method(renumbered).run == 4
    assert [v.run for v in ablations("clamp_margins", renumbered)] == [1]  # not 3, which changes two settings
    assert ablations("seed_offset", renumbered) == ()
    runs = [report.GridRun("easy", f"run{n:02d}", {"run": n, "status": "done"}, dir=Path("x")) for n in (1, 3, 4, 7)]
    grid = report.Grid(renumbered, (1, 2))
    assert [r.run for r in grid.compared(runs, "clamp_margins")] == [1, 4]
    assert [r.run for r in grid.compared(runs, "orthogonality")] == [4, 7]
    assert [r.run for r in grid.compared(runs, "seed_offset")] == [4]
    with pytest.raises(ValueError, match="runs 4, 5 all have the default settings"):
        full_method((*renumbered, Variant(5, "again")))
    with pytest.raises(ValueError, match="'note' is not a setting"):
        ablations("note", METHOD_GRID)


def test_select_keeps_grid_order():
    assert [v.run for v in select("method", [9, 0, 2])] == [0, 2, 9]


@pytest.mark.slow
def test_quick_grid_two_runs_on_the_embedded_model(tmp_path, capsys):
    """A 2-run subset of ``--quick`` end to end: SmolLM2 activations, calibration, the evals."""
    out = tmp_path / "q"
    assert experiments.main(["--quick", "--runs", "1,2", "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    rows = core_rows(text)
    assert sorted(rows) == [1, 2]
    for slug in ("run01_topk", "run02_esosae"):
        core = json.loads((chosen_dir(out / "lm" / slug) / "eval/core.json").read_text())["eval_result_metrics"]
        ce = core["model_performance_preservation"]["ce_loss_score"]
        assert 0 < ce <= 1.05 and report.fmt(ce) in text
    assert "| llm | the model's own units |" in text
    assert "2 done, 0 failed" in capsys.readouterr().out


def test_parallel_jobs_start_later_runs_from_run_2s_knob(tmp_path):
    out = tmp_path / "g"
    assert experiments.main([*FAST, "--runs", "2,3", "--jobs", "2", "--out", str(out)]) == 0
    run2 = json.loads((out / "easy/run02_esosae/calibration.json").read_text())
    run3 = json.loads((out / "easy/run03_linear/calibration.json").read_text())
    assert run2["status"] == run3["status"] == "done"
    assert run3["start"] == run2["attempts"][run2["chosen"]]["knob"]
