"""Configs: validation names the field, JSON round trip, auto defaults, a doc line per field."""

import dataclasses

import pytest

from esosae.config import (
    SECTIONS, ConfigError, DataConfig, SAEConfig, ScheduleConfig, TrainConfig, field_docs,
)


def test_json_round_trip(tmp_path):
    cfg = TrainConfig(sae=SAEConfig(m1=64, m2=32, mu_max=3.0), schedule=ScheduleConfig(schedule="linear"),
                      data=DataConfig(source="synthetic"), steps=7, seed=3)
    cfg.to_json(tmp_path / "c.json")
    assert TrainConfig.from_json(tmp_path / "c.json") == cfg


def test_auto_defaults_follow_source_and_arch():
    easy = TrainConfig(data=DataConfig(source="synthetic", synthetic="easy"))
    assert (easy.sae.m1, easy.sae.m2, easy.sae.target_l0) == (256, 256, 4.0)
    topk = TrainConfig(data=DataConfig(source="synthetic", synthetic="hard"), sae=SAEConfig(arch="topk"))
    assert (topk.sae.m1, topk.sae.m2, topk.sae.k, topk.lr) == (2048, 0, 8, 5e-3)
    explicit = TrainConfig(sae=SAEConfig(m1=100, l1_coeff=0.5), schedule=ScheduleConfig(tau_final=0.3))
    assert (explicit.sae.m1, explicit.sae.m2, explicit.sae.l1_coeff, explicit.schedule.tau_final) == (100, 100, 0.5, 0.3)


@pytest.mark.parametrize("make, words", [
    (lambda: SAEConfig(m1=-1), "m1"),
    (lambda: SAEConfig(m2=-2), "m2"),
    (lambda: SAEConfig(mu_min=2.0), "mu_min"),
    (lambda: SAEConfig(mu_max=0.5), "mu_max"),
    (lambda: SAEConfig(arch="relu", m2=10), "single-layer"),
    (lambda: SAEConfig(arch="topk", m1=4, k=8), "exceeds"),
    (lambda: SAEConfig(orth_block_fraction=0.0), "orth_block_fraction"),
    (lambda: ScheduleConfig(schedule="exp", tau_0=0.5, tau_final=0.5), "tau_0"),
    (lambda: ScheduleConfig(schedule="exp", tau_0=0.0, tau_final=0.5), "tau_0"),
    (lambda: ScheduleConfig(schedule="bogus"), "schedule"),
    (lambda: DataConfig(context_size=0), "context_size"),
    (lambda: TrainConfig(steps=0), "steps"),
    (lambda: TrainConfig(lr_warmup_fraction=0.6, lr_decay_fraction=0.6), "lr_warmup_fraction"),
])
def test_validation_names_the_field(make, words):
    with pytest.raises(ConfigError, match=words):
        make()


def test_unknown_and_malformed_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        TrainConfig.from_json(bad)
    unknown = tmp_path / "unknown.json"
    unknown.write_text('{"sae": {"width": 3}}')
    with pytest.raises(ConfigError, match="width"):
        TrainConfig.from_json(unknown)
    with pytest.raises(ConfigError, match="cannot read"):
        TrainConfig.from_json(tmp_path / "missing.json")


@pytest.mark.parametrize("cls", [*SECTIONS.values(), TrainConfig])
def test_every_field_has_a_doc_line(cls):
    docs = field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in docs and f.name not in SECTIONS]
    assert not missing


def test_cli_flags_resolve_auto_fields_against_the_final_source(tmp_path):
    from esosae.cli import build_parser, config_from_args

    parse = lambda argv: config_from_args(build_parser().parse_args(argv))  # noqa: E731
    easy = parse(["--source", "synthetic"])
    assert (easy.sae.m1, easy.sae.l1_coeff) == (256, 0.05)
    file = tmp_path / "c.json"
    file.write_text('{"data": {"source": "synthetic", "synthetic": "hard"}, "sae": {"arch": "topk"}}')
    hard = parse(["--config", str(file), "--k", "6"])
    assert (hard.sae.m1, hard.sae.m2, hard.sae.k) == (2048, 0, 6)
