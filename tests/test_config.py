"""Configs: strict types and ranges, validation names the field, JSON round trip, auto defaults,
a doc line per field, each choice set declared once."""

import ast
import dataclasses
import json
import re
import typing
from pathlib import Path

import pytest

from esosae import config
from esosae.config import (
    AUTO_DEFAULTS, SECTIONS, SYNTHETIC_PRESETS, ConfigError, DataConfig, SAEConfig, ScheduleConfig,
    Synthetic, TrainConfig, choices, convert, field_docs, field_specs,
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


# -- strict types and ranges (issue 13): JSON values are converted, never coerced ----------

BAD_JSON = [
    ({"eval": "no"}, 'invalid eval "no": must be true or false'),
    ({"steps": 20.5}, "invalid steps 20.5: must be an integer > 0"),
    ({"steps": "20"}, 'invalid steps "20": must be an integer > 0'),
    ({"steps": True}, "invalid steps true: must be an integer > 0"),
    ({"sae": {"m1": "64"}}, 'invalid sae.m1 "64": must be an integer > 0 or null (auto)'),
    ({"sae": {"clamp_margins": 1}}, "invalid sae.clamp_margins 1: must be true or false"),
    ({"schedule": {"schedule": 3}}, "invalid schedule.schedule 3: must be one of exp, linear, const"),
    ({"model": {"hook": ["blocks.6.hook_out"]}}, 'invalid model.hook ["blocks.6.hook_out"]: must be a non-empty string'),
    ({"data": {"dataset": {}}}, "invalid data.dataset {}: must be a non-empty string"),
    ({"data": {"dataset": "  "}}, 'invalid data.dataset "  ": must be a non-empty string'),
    ({"out_dir": "runs/a\x00b"}, "invalid out_dir"),
    ({"lr": float("nan")}, "invalid lr NaN: must be a finite number > 0 or null (auto)"),
    ({"lr": float("inf")}, "invalid lr Infinity: must be a finite number > 0"),
    ({"lr": 10**400}, "invalid lr <a 1329-bit integer>: must be a finite number > 0"),
    ({"lr": -1e-3}, "lr must be > 0 (got -0.001)"),
    ({"sae": {"gamma_max": float("inf")}}, "invalid sae.gamma_max Infinity: must be a finite number >= 0"),
    ({"schedule": {"tau_final": float("-inf")}}, "invalid schedule.tau_final -Infinity"),
    ({"seed": 2**64}, "seed must be an integer >= 0 and fit in 64 bits (got <a 65-bit integer>)"),
    ({"sae": {"freq_ema": 1.0}}, "sae.freq_ema must be in [0, 1) (got 1.0)"),
    ({"sae": {"mu_min": 0}}, "sae.mu_min must be in (0, 1] (got 0)"),
    ({"sae": 5}, "config section 'sae' must be an object of SAEConfig fields (got 5)"),
    ({"width": 3}, 'unknown top-level config field(s) "width"; TrainConfig has steps,'),
    ({"sae": {"width": 3}}, 'unknown sae config field(s) "width"; SAEConfig has arch, m1,'),
    # rules between fields
    ({"sae": {"target_l0": 2000}}, "target_l0 2000 exceeds m1=1152"),
    ({"sae": {"m1": 64, "m2": 8, "target_l0": 10}}, "target_l0 10 exceeds m2=8"),
    ({"sae": {"m1": 8}}, "target_l0 16 exceeds m1=8"),
    ({"sae": {"arch": "topk", "m1": 64, "k": 65, "target_l0": 8}}, "k=65 exceeds m1=64"),
    ({"sae": {"arch": "relu", "m2": 4}}, "arch=relu is single-layer: set m2=0 (got m2=4)"),
    ({"schedule": {"tau_0": 1.3}}, "schedule exp needs 0 < tau_0 < tau_final (got tau_0=1.3, tau_final=0.5)"),
    ({"schedule": {"schedule": "linear", "tau_final2": 1e-4}}, "schedule linear needs tau_0 <= tau_final2"),
    ({"lr_warmup_fraction": 0.5, "lr_decay_fraction": 0.6}, "lr_warmup_fraction + lr_decay_fraction must be <= 1"),
    # the planted source
    ({"data": {"synthetic_l0": 300}}, "synthetic_l0 300 exceeds synthetic_atoms 256 (the easy preset)"),
    ({"data": {"synthetic_atoms": 3}}, "synthetic_l0 4 (the easy preset) exceeds synthetic_atoms 3"),
    ({"data": {"synthetic": "hard", "synthetic_atoms": 10, "synthetic_l0": 11}}, "synthetic_l0 11 exceeds synthetic_atoms 10"),
    ({"data": {"synthetic_noise": float("nan")}}, "invalid data.synthetic_noise NaN"),
    ({"data": {"synthetic_d": 0}}, "data.synthetic_d must be > 0 (got 0)"),
    ({"data": {"eval_tokens": 1}}, "data.eval_tokens must be >= 2 (got 1)"),
    ({"batch_size": 1}, "batch_size must be >= 2 (got 1)"),
]


@pytest.mark.parametrize("d, words", BAD_JSON)
def test_json_values_are_converted_strictly(d, words):
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict(d)
    assert words in str(e.value) and len(str(e.value).splitlines()) == 1


def test_numbers_are_converted_not_coerced():
    cfg = TrainConfig.from_dict({"lr": 1, "sae": {"target_l0": 4, "m1": 64}, "schedule": {"tau_final": 1}})
    assert (cfg.lr, cfg.sae.target_l0, cfg.schedule.tau_final) == (1.0, 4.0, 1.0)
    assert type(cfg.lr) is type(cfg.sae.target_l0) is float and type(cfg.sae.m1) is int
    with pytest.raises(ConfigError, match="invalid m1 64.0"):  # the constructors convert the same way
        SAEConfig(m1=64.0)
    with pytest.raises(ConfigError, match='invalid eval "false"'):
        TrainConfig(eval="false")


@pytest.mark.parametrize("text, words", [
    ('{"lr": NaN}', "invalid lr NaN"),
    ('{"steps": 1e400}', "invalid steps Infinity"),
    ('{"seed": ' + "9" * 5000 + "}", "not usable JSON"),
    ("[" * 100_000, "not usable JSON"),
])
def test_json_files_with_non_finite_or_unreadable_numbers(tmp_path, text, words):
    path = tmp_path / "c.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(words)):
        TrainConfig.from_json(path)


@pytest.mark.parametrize("d, words", [
    ({"eval": "no"}, "eval"), ({"steps": 20.5}, "steps"), ({"steps": "20"}, "steps"),
    ({"sae": {"m1": [64]}}, "sae.m1"), ({"lr": float("nan")}, "lr"), ({"sae": {"target_l0": 5000}}, "target_l0"),
    ({"data": {"source": "synthetic", "synthetic_l0": 300}}, "synthetic_l0"), ({"sae": {"widht": 3}}, "widht"),
])
def test_bad_config_file_is_one_line_exit_2_before_anything_is_written(tmp_path, monkeypatch, capsys, d, words):
    from esosae.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.json").write_text(json.dumps(d))
    before = set(tmp_path.rglob("*"))
    assert main(["--config", "c.json", "--out-dir", "run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: ") and err.count("\n") == 1 and words in err
    assert set(tmp_path.rglob("*")) == before


def test_synthetic_presets_match_the_sources():
    from esosae.data.sources import PRESETS

    assert set(SYNTHETIC_PRESETS) == set(PRESETS) == set(choices(Synthetic))
    for name, p in PRESETS.items():
        assert SYNTHETIC_PRESETS[name] == {"d": p.d, "atoms": p.atoms, "l0": p.l0}
    assert set(AUTO_DEFAULTS) == {"lm", *choices(Synthetic)}


@pytest.mark.parametrize("cls", [*SECTIONS.values(), TrainConfig])
def test_every_field_declares_a_type_the_converter_knows(cls):
    specs = field_specs(cls)
    for f in dataclasses.fields(cls):
        spec = specs[f.name]
        if f.default is not dataclasses.MISSING:  # the default passes its own declaration
            assert convert(spec, f.default, f.name) == f.default
        if spec.kind is float:
            assert spec.range is not None and spec.range.finite, f"{f.name}: say its range"
        if spec.kind is int:
            assert spec.range is not None, f"{f.name}: say its range"


def _string_tuples(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(node.elts) >= 2 and all(
                isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
            yield node.lineno, frozenset(e.value for e in node.elts)


def test_each_choice_set_is_declared_once():
    """No module spells out a config choice set again: it imports the Literal (esosae.config)."""
    sets = {frozenset(choices(a)): name for name, a in vars(config).items()
            if typing.get_origin(a) is typing.Literal}
    root = Path(config.__file__).parents[1]
    copies = []
    for path in sorted((root / "esosae").rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel == "esosae/config.py":
            continue
        for line, values in _string_tuples(ast.parse(path.read_text())):
            if values in sets:
                copies.append(f"{rel}:{line} repeats {sets[values]}")
    assert not copies
