"""The end-of-run probing subset, ``--datasets`` presets, and the headline in summary.md and
at the end of ``train.py`` (esosae/evals/config.py, headline.py)."""

import contextlib
import functools
import io
import json
import re

import pytest

from esosae.cli import main as train_main
from esosae.config import ConfigError
from esosae.evals import run as evals_run
from esosae.evals import tasks
from esosae.evals.cli import build_parser
from esosae.evals.cli import main as eval_main
from esosae.evals.config import ALL_DATASETS, PRESETS, QUICK_DATASETS, EvalConfig
from esosae.evals.headline import COLUMNS, SECTION

pytestmark = pytest.mark.usefixtures("one_thread")

SYNTHETIC = ["--source", "synthetic", "--synthetic-d", "16", "--synthetic-atoms", "24", "--m1", "24", "--m2", "24",
             "--batch-size", "128", "--steps", "40", "--log-every", "5"]


# -- the subset and the presets ----------------------------------------------------------------


def test_quick_subset_spans_families_with_full_classes_at_a_fraction_of_the_texts():
    """Four families (topic, sentiment, language, gender), 11 tasks, every class at its full
    per-class size in both splits, and at most a sixth of the full set's text (characters
    of the first 128 tokens' worth, ~600 characters, as a proxy for model tokens)."""
    assert EvalConfig().datasets == QUICK_DATASETS and set(QUICK_DATASETS) < set(ALL_DATASETS)
    train, test = PRESETS["quick"][1:]
    built = [tasks.build(tasks.resolve(name), train, test, seed=42) for name in QUICK_DATASETS]
    assert sum(len(ds.tasks) for ds in built) == 11
    for ds in built:
        for t in ds.tasks:
            assert t.train_y.sum() == len(t.train) // 2 == train // 2, (ds.name, t.name)
            assert t.test_y.sum() == len(t.test) // 2 == test // 2, (ds.name, t.name)

    def chars(datasets, sizes):
        return sum(min(len(text), 600) for name in datasets
                   for text in tasks.build(tasks.resolve(name), *sizes, seed=42).texts)
    assert chars(QUICK_DATASETS, (train, test)) <= chars(ALL_DATASETS, PRESETS["all"][1:]) / 6


@pytest.mark.parametrize("given, datasets, sizes", [
    ({}, QUICK_DATASETS, (300, 150)),
    ({"datasets": ("all",)}, ALL_DATASETS, (1000, 400)),
    ({"datasets": ("sst2", "ag_news")}, ("sst2", "ag_news"), (1000, 400)),
    ({"datasets": ("all",), "train_size": 300, "test_size": 100}, ALL_DATASETS, (300, 100)),
])
def test_presets_expand_and_fill_the_auto_sizes(given, datasets, sizes):
    cfg = EvalConfig(**given)
    assert (cfg.datasets, cfg.train_size, cfg.test_size) == (datasets, *sizes)
    assert EvalConfig(**cfg.to_dict()).to_dict() == cfg.to_dict()  # stored settings read back the same


@pytest.mark.parametrize("datasets, message", [
    (("ag_nwes",), "unknown probing dataset 'ag_nwes'"),
    (("all", "sst2"), "--datasets all stands alone"),
    (("quick", "quick"), "--datasets quick stands alone"),
    ((), "at least one"),
])
def test_bad_dataset_lists_are_config_errors(datasets, message):
    with pytest.raises(ConfigError, match=message):
        EvalConfig(datasets=datasets)


@pytest.mark.parametrize("flag, datasets, sizes", [
    ("all", ALL_DATASETS, (1000, 400)),
    ("quick", QUICK_DATASETS, (300, 150)),
    ("sst2,europarl_language", ("sst2", "europarl_language"), (1000, 400)),
])
def test_datasets_flag_parses_presets_and_lists(flag, datasets, sizes):
    ns = vars(build_parser().parse_args(["RUN", "--datasets", flag]))
    del ns["run_dir"]
    cfg = EvalConfig(**ns)
    assert (cfg.datasets, cfg.train_size, cfg.test_size) == (datasets, *sizes)


@pytest.mark.parametrize("flag, message", [
    ("ag_nwes", "unknown probing dataset 'ag_nwes': use quick, all, a comma list of ag_news, sst2"),
    ("all,sst2", "--datasets all stands alone (got 'all,sst2')"),
])
def test_bad_datasets_flag_is_one_line_exit_2(tmp_path, capsys, flag, message):
    assert eval_main([str(tmp_path), "--datasets", flag]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m esosae.evals: error:") and err.count("\n") == 1 and message in err


# -- the headline --------------------------------------------------------------------------------


def table_row(summary, label):
    """The numbers of one row of summary.md's probing table."""
    row = next(line for line in summary.splitlines() if line.startswith(f"| {label} |"))
    return [float(v) for v in row.strip("|").split("|")[1:]]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny synthetic run through ``train.py`` with its evaluations (made small: 2 planted
    atoms, 40/20 texts, k = 1, 2), and what it printed."""
    run = tmp_path_factory.mktemp("headline") / "run"
    small = functools.partial(EvalConfig, planted_atoms=2, train_size=40, test_size=20, k_values=(1, 2))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evals_run, "EvalConfig", small)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert train_main([*SYNTHETIC, "--out-dir", str(run)]) == 0
    return run, out.getvalue()


def test_train_prints_and_summary_shows_the_probing_json_headline(trained):
    run, out = trained
    result = json.loads((run / "eval" / "sparse_probing.json").read_text())
    m = result["eval_result_metrics"]
    summary = (run / "summary.md").read_text()
    assert summary.startswith("# Run summary") and "| fvu |" in summary  # the training part stays
    assert summary.count(SECTION) == 1
    printed = [line for line in out.splitlines() if line.strip().startswith(("SAE features", "raw input"))]
    assert len(printed) == 2
    for who, label, line in zip(("sae", "llm"), ("SAE features", "raw input dimensions of x"), printed):
        want = [m[who][f"{who}_{key}"] for _, key in COLUMNS]
        assert table_row(summary, label) == pytest.approx(want, abs=5e-4)
        assert [float(v) for v in re.findall(r"\d\.\d{3}", line)] == pytest.approx(want, abs=5e-4)
    assert "--datasets all" in summary and "--datasets all" in out
    core = json.loads((run / "eval" / "core.json").read_text())["eval_result_metrics"]
    assert f"atom recovery: {core['planted']['atom_recovery']:.4f}" in summary


def test_a_later_evaluation_rewrites_only_the_evaluation_part(trained):
    run, _ = trained
    before = (run / "summary.md").read_text()
    assert eval_main([str(run), "--only", "probing", "--k-values", "1", "--train-size", "24",
                      "--test-size", "12", "--planted-atoms", "2", "--no-progress"]) == 0
    after = (run / "summary.md").read_text()
    assert after.split(SECTION)[0] == before.split(SECTION)[0] and after.count(SECTION) == 1
    assert after != before and "at most 12 train and 6 test texts per class" in after
    m = json.loads((run / "eval" / "sparse_probing.json").read_text())["eval_result_metrics"]
    assert table_row(after, "SAE features") == pytest.approx([m["sae"][f"sae_{k}"] for _, k in COLUMNS], abs=5e-4)
