"""Sparse probing (esosae/evals/probing.py, tasks.py, probe_cache.py, planted.py)."""

import json
import math
import os
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from lm_helpers import TINY, WORDS, register_tiny, write_txt
from test_manifest import DAMAGED_META, EDITED, flip_digit, write_meta

from esosae import cli

from esosae.run import manifest

from esosae.data import models
from esosae.sae.backend import TORCH
from esosae.config import DataConfig, ModelConfig, SAEConfig, TrainConfig
from esosae.evals import probe_cache, probing, tasks
from esosae.evals.cli import main as eval_main
from esosae.evals.config import EvalConfig
from esosae.evals.planted import planted_probing
from esosae.evals.run import run_all
from esosae.sae.model import DualLayerSAE
from esosae.data.sources import PRESETS, SyntheticSource, spec_from_config
from esosae.training.loop import build, train_step

SMALL = EvalConfig(train_size=60, test_size=24, k_values=(1, 2, 50), context_size=12)


pytestmark = pytest.mark.usefixtures("one_thread")


def write_probe_file(path, n_per_class=(40, 30, 20), seed=0, split=False):
    """Word texts whose class decides which third of the vocabulary they use."""
    rng = random.Random(seed)
    rows = []
    for c, n in enumerate(n_per_class):
        for i in range(n):
            words = [rng.choice(WORDS[c * 40:(c + 1) * 40]) for _ in range(rng.randint(2, 16))]
            row = {"text": " ".join(words), "label": "abc"[c]}
            if split:
                row["split"] = "test" if i % 4 == 0 else "train"
            rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- tasks ---------------------------------------------------------------------------------


def test_one_vs_rest_tasks_are_balanced_disjoint_and_capped(tmp_path):
    ds = tasks.build(tasks.resolve(str(write_probe_file(tmp_path / "p.jsonl", split=True))), 40, 16, seed=3)
    assert [t.name for t in ds.tasks] == ["a", "b", "c"]
    labels = {text: lab for lab, text in [(json.loads(r)["label"], json.loads(r)["text"])
                                           for r in (tmp_path / "p.jsonl").read_text().splitlines()]}
    for t in ds.tasks:
        for idx, y, cap in ((t.train, t.train_y, 20), (t.test, t.test_y, 8)):
            assert y.sum() == len(y) - y.sum() <= cap  # balanced, at most half the size per class
            assert all((labels[ds.texts[i]] == t.name) == bool(yi) for i, yi in zip(idx, y))
        assert not set(t.train) & set(t.test)
    c = ds.tasks[2]  # class c: 15 train rows → 15 positives, negatives ceil(15 / 2) = 8 from a and from b
    neg_classes = [labels[ds.texts[i]] for i, y in zip(c.train, c.train_y) if not y]
    assert c.train_y.sum() == 15 and sorted(set(neg_classes)) == ["a", "b"]
    assert max(neg_classes.count("a"), neg_classes.count("b")) <= math.ceil(15 / 2)


def test_builtin_datasets_cover_every_probing_file():
    used = {f.path for spec in tasks.BUILTIN.values() for f in spec.files}
    folder = tasks.data_dir() / "probing"
    assert used == {p.name for p in folder.glob("*.jsonl")}
    assert set(tasks.BUILTIN) == set(EvalConfig(datasets=("all",)).datasets)


def test_every_builtin_file_reads():
    for name, spec in tasks.BUILTIN.items():
        assert len(tasks.read_rows(spec).texts) > 0, name


def test_unicode_line_separators_stay_inside_a_row(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"text": f"w{i} \u2028 x\x85y \u2029 z", "label": "ab"[i % 2]} for i in range(8)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert tasks.read_rows(tasks.resolve(str(path))).texts == [r["text"] for r in rows]


@pytest.mark.parametrize("content, message", [
    ('{"text": "w1 w2", "label": "a"}\n{"text": "w3", "label": \n', "line 2: not valid JSON"),
    ('{"text": "w1 w2", "label": "a"}\n{"text": "w3"}\n', "line 2: no field 'label'"),
    ('["w1", "a"]\n', "line 1: needs a JSON object with a string 'text'"),
    ("".join(f'{{"text": "w{i}", "label": "a"}}\n' for i in range(20)), "every row has label 'a'"),
    ('{"text": "w1", "label": "a"}\n{"text": "w2", "label": "b"}\n', "texts per class (need >= 2)"),
    (b'{"text": "caf\xe9", "label": "a"}\n', "cannot be read as UTF-8 text"),
])
def test_bad_probing_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    with pytest.raises(tasks.ProbingDataError, match="bad.jsonl|'bad'") as e:
        tasks.build(tasks.resolve(str(tmp_path / "bad.jsonl")), 40, 16, seed=0)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_hub_dataset_offline_is_one_line_error(monkeypatch):
    monkeypatch.setattr(tasks, "hub_unavailable", lambda: "cannot reach huggingface.co: test")
    with pytest.raises(tasks.ProbingDataError, match="needs the Hugging Face hub, which is unavailable"):
        tasks.resolve("hub:fancyzhx/ag_news")
    with pytest.raises(tasks.ProbingDataError, match="unknown probing dataset 'ag-news'"):
        tasks.resolve("ag-news")


def test_length_batches_cover_every_text_longest_first_within_the_budget():
    lengths = np.array([5, 30, 2, 2, 17, 60, 2])
    batches = probe_cache.length_batches(lengths, 64)
    assert [b.tolist() for b in batches] == [[5], [1, 4], [0, 2, 3, 6]]  # 61 tokens; 2 x 31; 4 x 6
    assert all(len(b) * (lengths[b].max() + 1) <= 64 for b in batches)


# -- the probing cache ---------------------------------------------------------------------


@pytest.fixture
def probing_cache(tmp_path, monkeypatch):
    """``ensure`` for a small probing file on the tiny Llama: returns (build, folder, model loads),
    where build() returns the opened cache's arrays."""
    register_tiny(monkeypatch)
    ds = tasks.build(tasks.resolve(str(write_probe_file(tmp_path / "p.jsonl"))), 40, 16, seed=0)
    wanted = probe_cache.settings(ds, TINY, "blocks.1.hook_out", 12, (40, 16), seed=0)
    root, loads = tmp_path / "cache", []

    def get_model():
        loads.append(1)
        return models.load_model(ModelConfig(model=TINY, cache_dir=str(root)))

    def build():
        acts = probe_cache.ensure(ds, wanted, root, get_model, "blocks.1.hook_out", 256, progress=False)
        return [np.array(acts.rows), acts.offsets, acts.pooled]

    return build, probe_cache.cache_folder(root, wanted), loads


def test_probing_cache_is_reused_hashing_each_file_once(probing_cache, monkeypatch, capsys):
    build, folder, loads = probing_cache
    first = build()
    real_sha, hashed = manifest.file_sha256, []
    monkeypatch.setattr(manifest, "file_sha256", lambda path: (hashed.append(path.name), real_sha(path))[1])
    again = build()
    assert loads == [1] and "rebuilding" not in capsys.readouterr().err
    assert sorted(hashed) == sorted(probe_cache.FILES)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))


def test_two_runs_wanting_one_probing_cache_build_it_once(probing_cache):
    """Two runs side by side on a fresh machine (a grid's --jobs 2): the second waits for the
    first's cache instead of building its own."""
    build, folder, loads = probing_cache
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(lambda _: build(), range(2))
    assert loads == [1]
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


def test_probing_cache_settings_follow_the_bytes_not_the_mtime(tmp_path):
    path = write_probe_file(tmp_path / "p.jsonl")
    spec = tasks.resolve(str(path))
    before = tasks.describe(spec)
    os.utime(path, ns=(1, 1))
    assert tasks.describe(spec) == before
    with open(path, "a") as fh:
        fh.write(json.dumps({"text": "one more", "label": "a"}) + "\n")
    assert tasks.describe(spec) != before


PROBE_META_EDITS = {  # what is done to meta.json → why the cache is rebuilt
    "n_tokens": (lambda t: flip_digit(t, "n_tokens"), EDITED),
    "file checksum": (lambda t: flip_digit(t, "sha256"), EDITED),
    "setting": (lambda t: flip_digit(t, "context_size"), EDITED),
    **DAMAGED_META,
}


@pytest.mark.parametrize("edit", PROBE_META_EDITS)
def test_edited_or_damaged_probing_meta_json_is_rebuilt(probing_cache, capsys, edit):
    change, reason = PROBE_META_EDITS[edit]
    build, folder, loads = probing_cache
    first = build()
    path = folder / manifest.META
    write_meta(path, change(path.read_text()))
    capsys.readouterr()
    again = build()
    assert f"probing cache {folder}: {reason}; rebuilding it" in capsys.readouterr().err and loads == [1, 1]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))


# -- probes --------------------------------------------------------------------------------


def test_top_k_ranks_by_absolute_mean_difference():
    X = np.array([[0.0, 5, 1, 1, 9], [0.0, 5, 1, 3, 9], [2.0, 1, 1, 1, 9], [2.0, 1, 1, 3, 9]])
    y = np.array([1, 1, 0, 0])  # |Δmean| = 2, 4, 0, 0, 0
    assert probing.top_k(X, y, 2).tolist() == [1, 0]
    assert probing.top_k(X, y, 4).tolist() == [1, 0, 2, 3]  # ties: lower index first


def test_probe_task_reports_every_key_and_separates_a_clean_feature():
    rng = np.random.default_rng(0)
    n = 200
    y = np.repeat([1, 0], n // 2)
    X = rng.normal(size=(n, 30))
    X[:, 7] += 3 * y  # one informative column
    task = tasks.Task("t", np.arange(0, n, 2), y[::2], np.arange(1, n, 2), y[1::2])
    out = probing.probe_task(X, task, SMALL, "sae")
    assert set(probing.metric_keys("sae", SMALL.k_values)) < out.keys()
    assert out["sae_top_1_test_accuracy"] >= 0.9 and out["sae_top_1_test_auc"] >= 0.95
    noise = rng.permutation(task.train_y)
    shuffled = probing.probe_task(X, tasks.Task("t", task.train, noise, task.test, task.test_y), SMALL, "sae")
    assert abs(shuffled["sae_top_1_test_accuracy"] - 0.5) < 0.15  # train labels carry no signal


def test_pooled_sae_features_are_per_text_means(tmp_path):
    cfg = TrainConfig(data=DataConfig(source="synthetic"), sae=SAEConfig(m1=24, m2=16))
    sae = DualLayerSAE(cfg.sae, 8)
    sae.init_weights(torch.Generator().manual_seed(1))
    lengths = [3, 1, 7, 0, 5]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    rows = np.random.default_rng(0).normal(size=(offsets[-1], 8)).astype(np.float16)
    acts = probe_cache.ProbeActivations(tmp_path, rows, offsets, np.zeros((5, 8), np.float32))
    got = probing.pooled_sae_features(sae, acts, batch_tokens=4)  # forces several chunks
    out = sae(torch.from_numpy(rows.astype(np.float32)), TORCH)
    f = torch.cat([out["f1"], out["f2"]], 1).detach().numpy()  # (n_tok, 40)
    want = np.stack([f[a:b].mean(0) if b > a else np.zeros(40) for a, b in zip(offsets[:-1], offsets[1:])])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# -- planted features ----------------------------------------------------------------------


PLANTED = TrainConfig(
    data=DataConfig(source="synthetic", synthetic_d=512, synthetic_atoms=64, synthetic_l0=16, data_seed=1),
    sae=SAEConfig(arch="topk", m1=64, m2=0, target_l0=16), steps=400, batch_size=512, lr=4e-3)


def test_planted_atom_is_found_by_top1_probe_of_trained_sae_only():
    """Positives have planted atom j active. Training isolates each atom in one feature; an
    untrained SAE's features are random projections, whose best one sees atom j against
    the other ~15 active atoms (planted.py's estimate: Φ(½·sqrt(2 ln 64 / 16)) ≈ 0.66)."""
    source = SyntheticSource(spec_from_config(PLANTED.data), seed=PLANTED.data.data_seed)
    model, opt = build(PLANTED, source, torch.device("cpu"))
    cfg = EvalConfig(k_values=(1,), train_size=1000, test_size=400)
    untrained = planted_probing(model, source, cfg)["planted_atoms"]
    for step in range(PLANTED.steps):
        train_step(model, opt, TORCH, source.batch(step, PLANTED.batch_size) * model.scale, PLANTED, step)
    trained = planted_probing(model, source, cfg)["planted_atoms"]
    top1 = {name: np.mean([r["sae_top_1_test_accuracy"] for r in res.values()])
            for name, res in (("trained", trained), ("untrained", untrained))}
    assert len(trained) == cfg.planted_atoms and all(r["n_test"] == 400 for r in trained.values())
    assert top1["trained"] >= 0.95, top1
    assert top1["untrained"] <= 0.65, top1


def test_power_law_source_probes_only_atoms_with_negatives():
    """The hard preset's first atom is in every sample; the probed atoms are the first ones
    active in at most half of the samples, and every task is balanced."""
    source = SyntheticSource(PRESETS["hard"], seed=0)
    model, _ = build(TrainConfig.from_dict({"data": {"source": "synthetic", "synthetic": "hard"},
                                            "sae": {"m1": 16, "m2": 16}}), source, torch.device("cpu"))
    res = planted_probing(model, source, EvalConfig(k_values=(1,), train_size=40, test_size=20,
                                                    planted_atoms=3))["planted_atoms"]
    expected = [j for j in range(512) if 0 < source.freqs[j] <= 0.5][:3]
    assert list(res) == [f"atom_{j}" for j in expected] and expected[0] > 0
    assert all(r["n_train"] == 40 and r["n_test"] == 20 for r in res.values())


# -- a language-model run end to end -------------------------------------------------------


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A 4-step run on the tiny Llama (hub off), and a 3-class probing file."""
    tmp = tmp_path_factory.mktemp("lm")
    with pytest.MonkeyPatch.context() as mp:
        register_tiny(mp)
        mp.setattr(models, "hub_unavailable", lambda: "cannot reach huggingface.co: test")
        text = write_txt(tmp / "text.txt", 150)
        argv = ["--model", TINY, "--hook", "blocks.1.hook_out", "--dataset", str(text),
                "--cache-dir", str(tmp / "cache"), "--out-dir", str(tmp / "run"), "--context-size", "16",
                "--harvest-tokens", "400", "--eval-tokens", "100", "--steps", "4", "--batch-size", "64",
                "--m1", "32", "--m2", "32", "--no-eval"]
        assert cli.main(argv) == 0
    return tmp / "run", write_probe_file(tmp / "probe.jsonl"), tmp / "cache"


@pytest.fixture
def tiny_model(monkeypatch):
    register_tiny(monkeypatch)


def probing_json(run_dir, probe_file):
    cfg = EvalConfig(datasets=(str(probe_file),), train_size=60, test_size=24, k_values=(1, 2, 50), context_size=12)
    return run_all(run_dir, only=["probing"], progress=False, config=cfg)["sparse_probing"]


def test_lm_probing_json_has_saebench_shape(lm_run, tiny_model):
    run_dir, probe_file, _ = lm_run
    out = probing_json(run_dir, probe_file)
    assert json.loads((run_dir / "eval" / "sparse_probing.json").read_text())["eval_id"] == out["eval_id"]
    assert out["eval_type_id"] == "sparse_probing" and isinstance(out["datetime_epoch_millis"], int)
    assert {"dataset_names", "model_name", "k_values", "probe_train_set_size", "probe_test_set_size",
            "random_seed", "context_length"} <= out["eval_config"].keys()
    assert out["eval_config"]["dataset_names"] == ["probe"] and out["eval_config"]["k_values"] == [1, 2, 50]
    m = out["eval_result_metrics"]
    assert list(m["llm"]) == probing.metric_keys("llm", (1, 2, 50))
    assert list(m["sae"]) == probing.metric_keys("sae", (1, 2, 50))
    assert all(0 <= v <= 1 for section in m.values() for v in section.values())
    per_task = out["eval_result_unstructured"]["probe"]
    assert m["consistency"]["sae_top_1_test_auc_task_std"] == pytest.approx(
        np.std([t["sae_top_1_test_auc"] for t in per_task.values()]))
    (detail,) = out["eval_result_details"]
    assert detail["dataset_name"] == "probe" and detail["sae_top_1_test_auc"] == m["sae"]["sae_top_1_test_auc"]
    assert list(per_task) == ["a", "b", "c"]
    assert np.mean([t["llm_test_accuracy"] for t in per_task.values()]) == pytest.approx(detail["llm_test_accuracy"])
    cfg_dict = out["sae_cfg_dict"]
    assert (cfg_dict["d_in"], cfg_dict["d_sae"], cfg_dict["hook_name"]) == (48, 64, "blocks.1.hook_out")
    assert (run_dir / "plots" / "sparse_probing.png").stat().st_size > 10_000


def test_second_sae_reuses_cached_activations_and_a_damaged_cache_is_rebuilt(lm_run, tiny_model, monkeypatch, capsys):
    run_dir, probe_file, cache = lm_run
    first = probing_json(run_dir, probe_file)["eval_result_metrics"]
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded again"))
    monkeypatch.setattr("esosae.evals.run.load_model", lambda *a, **k: pytest.fail("the model was loaded again"))
    assert probing_json(run_dir, probe_file)["eval_result_metrics"] == first
    monkeypatch.undo()
    register_tiny(monkeypatch)
    (rows_file,) = cache.glob("probing/*/rows.npy")
    with open(rows_file, "r+b") as fh:
        fh.seek(-8, 2)
        fh.write(b"\x00" * 8)
    capsys.readouterr()
    assert probing_json(run_dir, probe_file)["eval_result_metrics"] == first
    assert "rows.npy does not match its checksum; rebuilding it" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ('{"text": "w1 w2", "label": "a"}\n{"oops"\n', "line 2: not valid JSON"),
    ("".join(f'{{"text": "w{i} w{i + 1}", "label": "a"}}\n' for i in range(30)), "every row has label 'a'"),
])
def test_cli_bad_probing_file_is_one_line_exit_2(lm_run, tiny_model, tmp_path, capsys, content, message):
    run_dir, _, _ = lm_run
    (tmp_path / "bad.jsonl").write_text(content)
    rc = eval_main([str(run_dir), "--only", "probing", "--datasets", str(tmp_path / "bad.jsonl")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("python -m esosae.evals: error:") and "\n" not in err and message in err


def test_hub_dataset_makes_one_vs_rest_tasks(monkeypatch):
    """A hub dataset (here an in-memory stand-in) with train/test splits and its own column names."""
    import datasets

    rng = random.Random(0)

    def split(n):
        labels = [i % 3 for i in range(n)]
        return datasets.Dataset.from_dict({"body": [" ".join(rng.choice(WORDS) for _ in range(5)) for _ in labels],
                                           "topic": labels})
    monkeypatch.setattr(tasks, "hub_unavailable", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", lambda name: datasets.DatasetDict(train=split(60), test=split(30)))
    ds = tasks.build(tasks.resolve("hub:someone/topics:topic:body"), 20, 8, seed=0)
    assert ds.source == {"name": "hub:someone/topics:topic:body", "hub": "someone/topics", "label": "topic",
                         "text": "body"}
    assert [t.name for t in ds.tasks] == ["0", "1", "2"]
    assert all(len(t.train) == 20 and len(t.test) == 8 for t in ds.tasks)
    with pytest.raises(tasks.ProbingDataError, match="has no column label"):
        tasks.build(tasks.resolve("hub:someone/topics"), 20, 8, seed=0)
