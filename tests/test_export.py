"""``python -m esosae.export RUN_DIR --format saelens OUT`` (esosae/export/).

Three tiny runs on a random Llama's activations (the run's own activation cache, held-out
rows): E-SOSAE with two layers, ReLU and TopK. Each export is loaded by SAELens itself
(``SAE.load_from_disk``, in the sae-lens environment, as a subprocess: sae-lens needs
TransformerLens < 4) and its encode and decode must equal ours to fp32 tolerance. The
embedded SmolLM2 would cost a ~20 s dequantization and a harvest per test run; the tiny
Llama's activations go through the same harvest, cache and folded-scale save.
"""

import importlib.util
import json
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from lm_helpers import TINY, register_tiny, write_txt
from safetensors.torch import load_file, save_file

from esosae import cli
from esosae.data import models
from esosae.export import cli as export_cli
from esosae.export import saelens
from esosae.run.layout import SAE_DIR
from esosae.sae.model import DualLayerSAE

pytestmark = pytest.mark.usefixtures("one_thread")
WORKER = Path(__file__).with_name("saelens_worker.py")
_SPEC = importlib.util.spec_from_file_location("peers_env", Path(__file__).parent.parent / "bench" / "peers_env.py")
peers_env = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(peers_env)  # the sae-lens environment, shared with the peer race
PEERS_PYTHON, peer_problem = peers_env.PEERS_PYTHON, peers_env.peer_problem
ARCHS = {"esosae": ["--m1", "32", "--m2", "24"], "relu": ["--arch", "relu", "--m1", "32"],
         "topk": ["--arch", "topk", "--m1", "32", "--k", "5"], "jumprelu": ["--arch", "jumprelu", "--m1", "32"],
         "batchtopk": ["--arch", "batchtopk", "--m1", "32", "--k", "5"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{arch: run directory} of finished tiny runs, one per architecture, sharing one activation cache."""
    tmp = tmp_path_factory.mktemp("export")
    text = write_txt(tmp / "text.txt", 150)
    with pytest.MonkeyPatch.context() as mp:
        register_tiny(mp)
        mp.setattr(models, "hub_unavailable", lambda: "cannot reach huggingface.co: test")
        base = ["--model", TINY, "--hook", "blocks.1.hook_out", "--dataset", str(text),
                "--cache-dir", str(tmp / "cache"), "--context-size", "16", "--harvest-tokens", "400",
                "--eval-tokens", "200", "--steps", "8", "--batch-size", "64", "--no-eval"]
        for arch, flags in ARCHS.items():
            assert cli.main(base + flags + ["--out-dir", str(tmp / arch)]) == 0
    return {arch: tmp / arch for arch in ARCHS}


def heldout(run: Path) -> torch.Tensor:
    """The run's held-out activations (N, d), raw, from its activation cache."""
    from esosae.config import TrainConfig
    from esosae.data.activations import ensure_cache

    return ensure_cache(TrainConfig.from_json(run / "config.json"), progress=False).heldout.float()


def test_each_arch_is_written_as_its_saelens_architecture(runs, tmp_path):
    for arch, want in (("esosae", ["jumprelu", "jumprelu"]), ("relu", ["standard"]), ("topk", ["topk"]),
                       ("jumprelu", ["jumprelu"]), ("batchtopk", ["jumprelu"])):
        out = tmp_path / arch
        assert export_cli.main([str(runs[arch]), "--format", "saelens", str(out)]) == 0
        dirs = [out] if len(want) == 1 else [out / "layer1", out / "layer2"]
        cfgs = [json.loads((d / "cfg.json").read_text()) for d in dirs]
        assert [c["architecture"] for c in cfgs] == want
        for c in cfgs:
            assert c["normalize_activations"] == "none" and c["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
            assert c["metadata"]["model_name"] == TINY and c["metadata"]["prepend_bos"] is True
        weights = load_file(str(dirs[0] / saelens.WEIGHTS))
        assert set(weights) == {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if want[0] == "jumprelu" else set())
    assert json.loads((tmp_path / "topk" / "cfg.json").read_text())["k"] == 5
    assert (load_file(str(tmp_path / "esosae" / "layer2" / saelens.WEIGHTS))["b_dec"] == 0).all()
    assert export_cli.main([str(runs["relu"]), "--format", "saelens", str(tmp_path / "esosae"), "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "esosae").iterdir()) == ["cfg.json", saelens.WEIGHTS]  # replaced whole


def test_exports_load_in_saelens_and_match_ours(runs, tmp_path):
    problem = peer_problem()
    if problem:
        pytest.skip(problem)
    classes = saelens_matches_ours(runs, tmp_path)
    assert classes == ["JumpReLUSAE", "JumpReLUSAE", "StandardSAE", "TopKSAE", "JumpReLUSAE", "JumpReLUSAE"]


@pytest.mark.slow
def test_an_esosae_on_smollm2_loads_in_saelens_and_matches_ours(tmp_path):
    """The embedded SmolLM2 at the default hook (its dequantized copy in the default cache, as
    the quick grid uses it), a short E-SOSAE run on the data dir's text, both layers checked."""
    problem = peer_problem()
    if problem:
        pytest.skip(problem)
    run = tmp_path / "run"
    assert cli.main(["--harvest-tokens", "4096", "--eval-tokens", "512", "--steps", "30", "--batch-size", "256",
                     "--m1", "256", "--m2", "256", "--no-eval", "--out-dir", str(run)]) == 0
    assert saelens_matches_ours({"esosae": run}, tmp_path) == ["JumpReLUSAE", "JumpReLUSAE"]


def saelens_matches_ours(runs: dict[str, Path], tmp_path: Path) -> list[str]:
    """Export each run, encode and decode its held-out activations with SAELens and with our
    saved SAE, assert they match to fp32 tolerance; returns SAELens's class names in order."""
    dirs, xs, want = [], {}, []
    for arch, run in runs.items():
        export_cli.export(run, "saelens", tmp_path / arch)
        sae = DualLayerSAE.load(run / SAE_DIR).eval()
        x = heldout(run)  # (N, d) raw: the export maps raw activations, as the saved SAE does
        with torch.no_grad():
            out = sae(x)
            x_hat1 = out["f1"] @ sae.W_dec1 + sae.b_dec  # (N, d): layer 1 alone
        xs[f"x{len(dirs)}"] = x
        dirs.append(tmp_path / arch / ("layer1" if sae.layers == 2 else ""))
        want.append((out["f1"], x_hat1))
        if sae.layers == 2:  # layer 2 reads layer 1's residual and returns its reconstruction
            xs[f"x{len(dirs)}"] = x - x_hat1
            dirs.append(tmp_path / arch / "layer2")
            want.append((out["f2"], out["x_hat"] - x_hat1))
            pre = (x - sae.b_dec) @ sae.W_enc1 + sae.b_enc1  # (N, m1)
            assert 0 < (out["f1"] > 0).float().mean() < (pre > 0).float().mean()  # θ1 cuts some a > 0
    acts, got = tmp_path / "acts.safetensors", tmp_path / "got.safetensors"
    save_file(xs, str(acts))
    r = subprocess.run([str(PEERS_PYTHON), "-P", str(WORKER), str(acts), str(got), *map(str, dirs)],
                       capture_output=True, text=True, cwd=tempfile.gettempdir(), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got_t = load_file(str(got))
    for i, (f, dec) in enumerate(want):
        assert (f > 0).any(), f"SAE {dirs[i]} has no active feature on real activations"
        torch.testing.assert_close(got_t[f"enc{i}"], f, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_t[f"dec{i}"], dec, rtol=1e-5, atol=1e-5)
    return list(json.loads(r.stdout.strip().splitlines()[-1]).values())


@pytest.mark.parametrize("case, message", [
    ("unfinished", "has no saved SAE"),
    ("not_a_run", "is not a run directory"),
    ("out_not_empty", "is not empty"),
    ("out_holds_run", "holds the run directory"),
    ("bad_format", "invalid choice: 'hf'"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(runs, tmp_path, capsys, case, message):
    import shutil

    run, out = tmp_path / "run", tmp_path / "out"
    shutil.copytree(runs["relu"], run)
    args = [str(run), "--format", "saelens", str(out)]
    if case == "unfinished":
        shutil.rmtree(run / SAE_DIR)
    elif case == "not_a_run":
        args[0] = str(tmp_path)
    elif case == "out_not_empty":
        out.mkdir()
        (out / "keep.txt").write_text("x")
    elif case == "out_holds_run":
        args[-1] = str(tmp_path)
    else:
        args[2] = "hf"
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert export_cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m esosae.export: error:") and "\n" not in err and message in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_single_layer_esosae_on_a_planted_source_is_one_jumprelu(tmp_path):
    run, out = tmp_path / "run", tmp_path / "out"
    assert cli.main(["--source", "synthetic", "--steps", "4", "--batch-size", "64", "--m1", "32", "--m2", "0",
                     "--eval-tokens", "64", "--no-eval", "--out-dir", str(run)]) == 0
    assert export_cli.main([str(run), "--format", "saelens", str(out)]) == 0
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["d_sae"] == 32 and cfg["d_in"] == 128
    assert cfg["metadata"]["model_name"] is None and cfg["metadata"]["dataset_path"] == "synthetic:easy"
    sae = DualLayerSAE.load(run / SAE_DIR)
    torch.testing.assert_close(load_file(str(out / saelens.WEIGHTS))["threshold"], sae.theta1, rtol=0, atol=0)
    assert not (out / "layer1").exists()
