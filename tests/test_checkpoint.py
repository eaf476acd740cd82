"""Checksummed checkpoints (esosae/run/checkpoint.py): the format, verification before torch.load,
falling back past a damaged checkpoint, and refusing one that belongs to another run."""

import json
import shutil
import zipfile

import pytest
import torch

from esosae.run import checkpoint
from esosae.cli import main
from esosae.config import TrainConfig
from esosae.sae.model import DualLayerSAE

TINY = ["--source", "synthetic", "--m1", "32", "--m2", "32", "--batch-size", "128", "--no-eval"]
EVERY_10 = ["--checkpoint-every", "10", "--keep-checkpoints", "5", "--log-every", "1"]

pytestmark = pytest.mark.usefixtures("one_thread")


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def flip_bytes(path, n=16):
    """Flip one bit in each of n bytes spread over the file, as a failing disk might."""
    data = bytearray(path.read_bytes())
    for i in range(n):
        data[(i + 1) * len(data) // (n + 2)] ^= 0x10
    path.write_bytes(bytes(data))


def err_lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.fixture
def small(tmp_path):
    """A tiny model and optimizer with one Adam step taken, and a config."""
    cfg = TrainConfig.from_dict({"data": {"source": "synthetic"}, "sae": {"m1": 32, "m2": 32}, "batch_size": 128})
    model = DualLayerSAE(cfg.sae, 16, scale=1.5)
    opt = torch.optim.Adam(model.parameters())
    model.W_enc1.sum().backward()
    opt.step()
    return cfg, model, opt


def test_file_is_torch_loadable_and_carries_its_checksum_in_the_zip_comment(tmp_path, small):
    cfg, model, opt = small
    path = checkpoint.save_checkpoint(tmp_path, 7, model, opt, cfg, keep=2)
    assert path == checkpoint.checkpoint_path(tmp_path, 7)
    state = torch.load(path, weights_only=True)  # a plain torch checkpoint to any reader
    assert set(state) == {*checkpoint.KEYS, "rng"} and state["step"] == 7 and state["scale"] == 1.5
    assert state["config"] == cfg.to_dict()
    comment = zipfile.ZipFile(path).comment
    assert comment.startswith(checkpoint.TRAILER_PREFIX) and len(comment) == checkpoint.TRAILER_LEN
    checkpoint.verify(path)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no sidecar, no temporary


@pytest.mark.parametrize("damage", ["first byte", "middle byte", "digest", "trailer gone", "truncated"])
def test_any_damage_is_found_before_torch_load(tmp_path, small, damage, monkeypatch):
    cfg, model, opt = small
    path = checkpoint.save_checkpoint(tmp_path, 1, model, opt, cfg, keep=2)
    data = bytearray(path.read_bytes())
    if damage == "first byte":
        data[0] ^= 1
    elif damage == "middle byte":
        data[len(data) // 2] ^= 1
    elif damage == "digest":
        data[-1] = ord("0") if data[-1] != ord("0") else ord("1")
    elif damage == "trailer gone":
        data = data[:-checkpoint.TRAILER_LEN]
    else:
        data = data[:len(data) // 2]
    path.write_bytes(bytes(data))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load read a damaged file"))
    with pytest.raises(checkpoint.Damaged):
        checkpoint.read_checkpoint(path)


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_damaged_last_checkpoint_falls_back_and_ends_as_the_uninterrupted_run(tmp_path, capsys, damage):
    run = tmp_path / "run"
    assert main([*TINY, *EVERY_10, "--steps", "30", "--seed", "2", "--out-dir", str(run)]) == 0
    last = checkpoint.checkpoint_path(run, 30)
    clean = weights(last)
    if damage == "flipped":
        flip_bytes(last)
    else:
        last.write_bytes(last.read_bytes()[:-100])  # torn at the end, as by a crash mid-write
    capsys.readouterr()
    assert main(["--resume", str(run)]) == 0
    err = capsys.readouterr().err
    assert "step_00000030.pt" in err and "corrupt" in err and "resuming from step_00000020.pt" in err
    resumed = weights(last)
    assert all(torch.equal(clean[k], resumed[k]) for k in clean)  # bit for bit, from step 20
    assert (run / "checkpoints" / "step_00000030.pt.corrupt").is_file()  # kept for a look, never resumed
    checkpoint.verify(last)
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == list(range(30))


def test_no_intact_checkpoint_is_one_line_exit_2_and_touches_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*TINY, *EVERY_10, "--steps", "20", "--out-dir", str(run)]) == 0
    for path in checkpoint.checkpoints(run):
        flip_bytes(path)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["--resume", str(run)]) == 2
    lines = err_lines(capsys)
    assert len(lines) == 1, lines
    assert "no intact checkpoint" in lines[0]
    assert "step_00000010.pt is corrupt" in lines[0] and "step_00000020.pt is corrupt" in lines[0]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_checkpoint_of_another_run_names_the_fields_that_differ(tmp_path, capsys):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    assert main([*TINY, "--steps", "10", "--out-dir", str(ours)]) == 0
    assert main([*TINY, "--steps", "10", "--seed", "3", "--lr", "0.002", "--schedule", "linear",
                 "--out-dir", str(theirs)]) == 0
    shutil.copy(checkpoint.checkpoint_path(theirs, 10), checkpoint.checkpoint_path(ours, 10))  # same shapes
    capsys.readouterr()
    assert main(["--resume", str(ours)]) == 2
    lines = err_lines(capsys)
    assert len(lines) == 1, lines
    line = lines[0]
    assert "other settings" in line
    assert "seed 3 (config.json: 0)" in line and "lr 0.002 (config.json: 0.001)" in line
    assert 'schedule "linear" (config.json: "exp")' in line


def test_settings_that_do_not_change_the_result_may_differ(tmp_path):
    run = tmp_path / "run"
    assert main([*TINY, *EVERY_10, "--steps", "20", "--out-dir", str(run)]) == 0
    cfg = json.loads((run / "config.json").read_text())
    cfg.update(log_every=3, checkpoint_every=7, keep_checkpoints=1, eval=False, backend="torch", device="cpu")
    cfg["data"]["harvest_batch"] = 4
    cfg["model"]["cache_dir"] = str(tmp_path / "elsewhere")
    (run / "config.json").write_text(json.dumps(cfg))
    checkpoint.checkpoint_path(run, 20).unlink()
    assert main(["--resume", str(run)]) == 0
    assert [p.name for p in checkpoint.checkpoints(run)] == ["step_00000020.pt"]


def test_other_widths_in_config_json_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*TINY, "--steps", "10", "--out-dir", str(run)]) == 0
    cfg = json.loads((run / "config.json").read_text())
    cfg["sae"]["m2"] = 16
    (run / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert main(["--resume", str(run)]) == 2
    lines = err_lines(capsys)
    assert len(lines) == 1 and "m2 32 (config.json: 16)" in lines[0], lines


def test_tensors_that_do_not_fit_the_model_are_one_line(tmp_path, small):
    cfg, model, opt = small
    checkpoint.save_checkpoint(tmp_path, 5, model, opt, cfg, keep=2)
    other = TrainConfig.from_dict({**cfg.to_dict(), "sae": {**cfg.to_dict()["sae"], "m2": 64}})
    narrow = DualLayerSAE(other.sae, 16)
    with pytest.raises(checkpoint.CheckpointError) as e:  # same stored config, other tensors
        checkpoint.resume_checkpoint(tmp_path, cfg, narrow, torch.optim.Adam(narrow.parameters()), say=None)
    msg = str(e.value)
    assert "\n" not in msg and "does not fit this run's model" in msg and "(32, 16) (this run: (64, 16))" in msg


def test_orphaned_temporary_files_are_removed_on_resume(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*TINY, *EVERY_10, "--steps", "20", "--out-dir", str(run)]) == 0
    orphans = [run / "checkpoints" / ".step_00000030.pt.k1ll3d.tmp", run / ".metrics.jsonl.x8a2.tmp",
               run / "sae" / ".cfg.json.q0q0.tmp"]
    for path in orphans:
        path.write_bytes(b"half a write")
    (run / ".sae.z9z9.tmp").mkdir()
    (run / ".sae.z9z9.tmp" / "sae.safetensors").write_bytes(b"half")
    keep = [run / "checkpoints" / "step_00000020.pt", run / "config.json", run / "sae" / "cfg.json"]
    assert main(["--resume", str(run)]) == 0
    assert not any(p.exists() for p in [*orphans, run / ".sae.z9z9.tmp"])
    assert all(p.is_file() for p in keep)
    assert not list(run.rglob("*.tmp"))
