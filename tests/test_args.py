"""The dataclass → argparse builder (esosae.args) and the strict converter it shares with
``--config`` JSON: random values into every field never raise anything but a one-line
ConfigError naming the field; flags and JSON agree; negative numbers; the README's table."""

import json
import math
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esosae import cli

from esosae.experiments import runner as experiments

from esosae.sae import precision
from esosae.args import OneLineParser, add_fields
from esosae.config import (
    SECTIONS, ConfigError, Dtype, Schedule, TrainConfig, choices, field_specs,
)
from esosae.errors import UserError
from esosae.evals import cli as evals_cli

REPO = Path(__file__).resolve().parents[1]
PROPERTY = settings(max_examples=300, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

LEAVES = [(section, name) for section, cls in [*SECTIONS.items(), (None, TrainConfig)]
          for name, spec in field_specs(cls).items() if section is not None or name not in SECTIONS]
"""(section or None, field) of every leaf field of TrainConfig."""
SPECS = {name: field_specs(SECTIONS[section] if section else TrainConfig)[name] for section, name in LEAVES}

scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
"""Any JSON value: null, bools, ints of any size, floats with NaN and ±inf, strings, lists, objects."""
near_valid = st.sampled_from([0, 1, 2, -1, 0.0, 0.5, 1.0, 1e-3, 4.0, 16.0, 2000, 1e9, 1e300, -1e300, 5e-324, 2**63, -0.0,
                              "", "auto",
                              *{c for spec in SPECS.values() for c in spec.choices}])
"""Values close to what some field accepts, so that valid configs and the rules between fields come up."""
values = json_values | near_valid


def nest(assignments):
    d = {}
    for (section, name), value in assignments:
        (d.setdefault(section, {}) if section else d)[name] = value
    return d


def assert_one_line_naming(err, names):
    msg = str(err)
    assert msg and len(msg.splitlines()) == 1 and "\n" not in msg, msg
    assert any(n in msg for n in names), f"{msg!r} names none of {names}"


@pytest.mark.parametrize("leaf", LEAVES, ids=lambda leaf: leaf[1])
@settings(PROPERTY, max_examples=80)
@given(value=values)
def test_any_json_value_in_any_field_is_a_config_or_a_one_line_error_naming_it(leaf, value):
    try:
        cfg = TrainConfig.from_dict(nest([(leaf, value)]))
    except UserError as e:  # ConfigError is one; any other exception fails the test
        assert_one_line_naming(e, [leaf[1]])
        return
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # a valid config round-trips


@PROPERTY
@given(assignments=st.lists(st.tuples(st.sampled_from(LEAVES), values), min_size=2, max_size=5,
                            unique_by=lambda a: a[0]))
def test_a_few_fields_at_once(assignments):
    try:
        TrainConfig.from_dict(nest(assignments))
    except UserError as e:
        assert_one_line_naming(e, [name for (_, name), _ in assignments])


@PROPERTY
@given(section=st.sampled_from(list(SECTIONS)), value=json_values)
def test_any_json_value_as_a_section(section, value):
    try:
        TrainConfig.from_dict({section: value})
    except UserError as e:
        assert_one_line_naming(e, [section])


FLAG_LEAVES = [leaf for leaf in LEAVES if SPECS[leaf[1]].kind is not bool]
flag_texts = st.text(max_size=12) | st.sampled_from(
    ["-1", "-1e-3", "-inf", "nan", "inf", "1e400", "20.5", "0", "2", "auto", "--", "-h", "--steps", "1,2", " 3 "])


@PROPERTY
@given(leaf=st.sampled_from(FLAG_LEAVES), text=flag_texts)
def test_any_text_for_any_flag_is_a_config_or_a_one_line_error_naming_it(leaf, text):
    flag = "--" + leaf[1].replace("_", "-")
    try:
        cfg = cli.config_from_args(cli.build_parser().parse_args([flag, text]))
    except UserError as e:
        assert_one_line_naming(e, [flag, leaf[1]])
        return
    assert isinstance(cfg, TrainConfig)


words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._/", min_size=1, max_size=8)
numbers = (st.integers(-10**6, 10**20) | st.floats(allow_nan=True, allow_infinity=True)
           | st.sampled_from([0, 1, 2, -1, 0.5, 1e-3, 16.0, 2000, 2**63]))


@PROPERTY
@given(leaf=st.sampled_from(FLAG_LEAVES), data=st.data())
def test_a_flag_and_the_same_value_in_json_agree(leaf, data):
    """A number for a numeric field, a word for a text field: the flag's text and the JSON
    value meet the same converter, so both give the same config or both fail."""
    spec = SPECS[leaf[1]]
    if spec.kind in (int, float):
        value = data.draw(numbers)
    else:
        value = data.draw(st.sampled_from(spec.choices) | words if spec.choices else words)
        if spec.optional and value in ("auto", "none"):
            return  # auto on the command line is None, in JSON a name
    text = repr(value) if isinstance(value, float) else str(value)
    results = []
    for build in (lambda: TrainConfig.from_dict(nest([(leaf, value)])),
                  lambda: parse(["--" + leaf[1], text])):
        try:
            results.append(build())
        except ConfigError as e:
            results.append(type(e))
    assert results[0] == results[1]


# -- the builder -----------------------------------------------------------------------------


def parse(argv):
    return cli.config_from_args(cli.build_parser().parse_args(argv))


@pytest.mark.parametrize("argv, message", [
    (["--lr", "-1e-3"], "--lr must be > 0 (got -1e-3)"),
    (["--lr=-1e-3"], "--lr must be > 0 (got -1e-3)"),
    (["--tau-0", "-.5"], "--tau-0 must be >= 0 (got -.5)"),
    (["--m1", "-4"], "--m1 must be > 0 (got -4)"),
    (["--lr", "nan"], "invalid --lr nan: must be a finite number > 0 or auto"),
    (["--lr", "-inf"], "invalid --lr -inf: must be a finite number > 0 or auto"),
    (["--gamma-max", "inf"], "invalid --gamma-max inf: must be a finite number >= 0"),
    (["--tau-final", "NaN"], "invalid --tau-final NaN: must be a finite number >= 0 or auto"),
    (["--steps", "20.5"], "invalid --steps 20.5: must be an integer > 0"),
    (["--steps", "1e3"], "invalid --steps 1e3: must be an integer > 0"),
    (["--schedule", "bogus"], "invalid --schedule bogus: must be one of exp, linear, const"),
    (["--model", ""], 'invalid --model "": must be a non-empty string'),
    (["--target-l0", "5000"], "target_l0 5000 exceeds m1=1152"),
    (["--arch", "topk", "--m1", "8", "--k", "9", "--target-l0", "4"], "k=9 exceeds m1=8"),
    (["--source", "synthetic", "--synthetic-l0", "300"], "synthetic_l0 300 exceeds synthetic_atoms 256"),
    (["--synthetic-atoms", "2"], "synthetic_l0 4 (the easy preset) exceeds synthetic_atoms 2"),
    (["--synthetic-noise", "nan"], "invalid --synthetic-noise nan"),
    (["--lr", "--steps", "3"], "argument --lr: expected one argument"),
])
def test_bad_flags_name_the_flag_and_what_it_takes(argv, message):
    with pytest.raises(ConfigError) as e:
        parse(argv)
    assert message in str(e.value) and len(str(e.value).splitlines()) == 1


@pytest.mark.parametrize("argv", [
    ["--lr", "-1e-3"], ["--gamma-max", "inf"], ["--tau-final", "nan"], ["--target-l0", "5000"],
    ["--synthetic-l0", "1000"], ["--steps", "20.5"],
])
def test_bad_flags_exit_2_with_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys, argv):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--source", "synthetic", *argv, "--out-dir", "run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: ") and err.count("\n") == 1
    assert not any(tmp_path.iterdir())


def test_flags_override_the_config_file_and_both_convert_the_same_way(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"steps": 7, "sae": {"m1": 64, "target_l0": 2}, "schedule": {"tau_final": 0.5}}')
    cfg = parse(["--config", str(path), "--m1", "32", "--tau_final", "0.25", "--lr", "2e-3", "--no-eval"])
    assert (cfg.steps, cfg.sae.m1, cfg.sae.target_l0, cfg.schedule.tau_final, cfg.lr, cfg.eval) == (
        7, 32, 2.0, 0.25, 2e-3, False)
    assert parse(["--m1", "auto"]).sae.m1 == 1152  # auto: None, resolved from the source


def test_choices_come_from_the_config_declarations():
    parser = cli.build_parser()
    action = next(a for a in parser._actions if "--schedule" in a.option_strings)
    assert action.metavar == "{" + ",".join(choices(Schedule)) + "}"
    assert precision.CHOICES == choices(Dtype)
    assert not hasattr(cli, "CHOICES")
    assert "{exp,linear,const}" in parser.format_help()


def test_the_builder_on_any_dataclass():
    from dataclasses import dataclass
    from typing import Annotated, Literal

    from esosae.config import Range

    @dataclass
    class Flags:
        rate: Annotated[float, Range(gt=0, le=1)] = 0.5
        """A rate (100% is 1)."""
        ks: tuple[int, ...] = (1, 2)
        """Some ks."""
        mode: Literal["a", "b"] = "a"
        """A mode."""
        on: bool = True
        """A switch."""
        name: str | None = None
        """A name (default: none)."""

    p = OneLineParser(prog="x")
    add_fields(p, Flags, defaults=True)
    ns = p.parse_args(["--rate", "1", "--ks", "3, 4,", "--mode", "b", "--no-on", "--name", "n"])
    assert vars(ns) == {"rate": 1.0, "ks": (3, 4), "mode": "b", "on": False, "name": "n"}
    assert vars(p.parse_args([])) == {"rate": 0.5, "ks": (1, 2), "mode": "a", "on": True, "name": None}
    assert "100%" in p.format_help() and "(default: none)" in p.format_help()
    for argv, message in [(["--rate", "1.5"], "--rate must be in (0, 1] (got 1.5)"),
                          (["--ks", "1,x"], 'invalid --ks[1] "x": must be an integer'),
                          (["--mode", "c"], "invalid --mode c: must be one of a, b"),
                          (["--on", "yes"], "unrecognized arguments: yes")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            p.parse_args(argv)


def test_evals_and_experiments_flags_use_the_builder():
    ns = evals_cli.build_parser().parse_args(["run", "--k-values", "1,5", "--probe-c", "0.5", "--no-standardize"])
    assert (ns.k_values, ns.probe_c, ns.standardize) == ((1, 5), 0.5, False)
    with pytest.raises(ConfigError, match=re.escape("invalid --probe-c inf: must be a finite number")):
        evals_cli.build_parser().parse_args(["run", "--probe-c", "inf"])
    ns = experiments.build_parser().parse_args(["--jobs", "1", "--tokens", "2048", "--quick"])
    assert (ns.jobs, ns.tokens, ns.quick, ns.seed, ns.max_tries) == (1, 2048, True, 0, None)
    for argv, message in [(["--jobs", "-1"], "--jobs must be >= 1 (got -1)"),
                          (["--seed", "1.5"], "invalid --seed 1.5: must be an integer >= 0"),
                          (["--tokens", "-5"], "--tokens must be > 0 (got -5)")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            experiments.build_parser().parse_args(argv)


# -- README: the Flags table ---------------------------------------------------------------


def flags_table():
    text = (REPO / "README.md").read_text().split("\n## Flags", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip() for line in text.splitlines() if line.startswith("| `--")]
    assert len(rows) > 10
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", row[1:-1])] for row in rows]


def field_defaults():
    out = {}
    for cls in [*SECTIONS.values(), TrainConfig]:
        for name, f in cls.__dataclass_fields__.items():
            if name not in SECTIONS or cls is not TrainConfig:
                out[name] = f.default
    return out


def test_readme_flags_table_lists_only_real_flags_with_their_defaults():
    parser = cli.build_parser()
    known = {s: a for a in parser._actions for s in a.option_strings}
    defaults, specs = field_defaults(), SPECS
    for flag_cell, default_cell, meaning in flags_table():
        row_flags = re.findall(r"--[\w-]+", flag_cell)
        missing = [f for f in re.findall(r"--[\w-]+", " ".join((flag_cell, default_cell, meaning))) if f not in known]
        assert not missing, f"README's Flags table names flags that do not exist: {missing}"
        dests = [known[f].dest for f in row_flags]
        tokens = [t.strip() for t in re.findall(r"`[^`]*`|[^,]+", default_cell)]
        if "see" in default_cell or not tokens:
            continue
        pairs = zip(dests, tokens) if len(tokens) == len(dests) else [(d, tokens[0]) for d in dests]
        for dest, token in pairs:
            want = defaults[dest]
            if token == "auto":
                assert want is None, f"README: --{dest} defaults to {want!r}, not auto"
            elif token.startswith("`"):
                assert token.strip("`") == str(want), f"README: --{dest} defaults to {want!r}, not {token}"
            elif re.fullmatch(r"[\d.e+-]+", token):
                assert math.isclose(float(token), want), f"README: --{dest} defaults to {want!r}, not {token}"
        # the choices a row names are the declared ones, and it names all of them
        declared = {c for d in dests if d in specs for c in specs[d].choices}
        if declared:
            named = {w for w in re.findall(r"`([^`]*)`", default_cell + " " + meaning) if not w.startswith("-")}
            assert named <= declared, f"README names choices that do not exist: {named - declared}"
            assert all(re.search(rf"\b{re.escape(c)}\b", default_cell + " " + meaning) for c in declared), \
                f"README's row for {flag_cell} leaves out a choice of {sorted(declared)}"
