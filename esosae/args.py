"""The one dataclass → argparse builder, and the parser whose errors are one line.

``add_fields(parser, Cls)`` gives every field of a config dataclass a flag
(``--tau-final`` and ``--tau_final`` alike) whose help is the field's docstring line and
its default, and whose value goes through the same strict converter as ``--config`` JSON
(``esosae.config.convert``): the flag's text is read as the field's type (``"20"`` → 20 for
an int, ``"1e-3"`` → 0.001 for a float, ``"1,5,20"`` → a tuple, ``auto`` → None where the
field is optional), then checked against the declared type, choices and range. A bool field
is a ``--x`` / ``--no-x`` pair. Argparse itself only splits the command line.

``OneLineParser`` raises every usage error as a ConfigError (one line, exit 2 in the CLIs),
and reads ``--lr -1e-3`` as a value, so the range check rejects it with a message that says
what is allowed, instead of argparse calling ``-1e-3`` an unknown flag.

Used by ``train.py`` (esosae.cli), ``python -m esosae.evals`` and ``python -m esosae.experiments``.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import typing
from typing import Any

from esosae.config import ConfigError, Spec, convert, field_docs, field_specs, show

AUTO_WORDS = ("auto", "none", "")
"""Flag text that means None (auto) for an optional field."""

_NEGATIVE = re.compile(r"-(\d|\.\d|inf(inity)?$|nan$)", re.IGNORECASE)
_PLAIN = re.compile(r"[\w.+\-,:/]{1,60}", re.ASCII)
"""Flag text shown as typed in a message; anything else is shown quoted and escaped."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors raise ConfigError, so the CLIs report them as one line,
    and where a value-taking flag followed by a negative number takes it as its value."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(self._attach_negative_values(args), namespace)

    def _attach_negative_values(self, args: list[str]) -> list[str]:
        """``--lr -1e-3`` → ``--lr=-1e-3``: argparse takes ``-1e-3`` (or ``-inf``) for a flag."""
        takes_value = {s for a in self._actions if a.nargs is None for s in a.option_strings}
        out: list[str] = []
        i = 0
        while i < len(args):
            a = args[i]
            if a == "--":
                return out + args[i:]
            if a in takes_value and i + 1 < len(args) and _NEGATIVE.match(args[i + 1]):
                out.append(f"{a}={args[i + 1]}")
                i += 2
                continue
            out.append(a)
            i += 1
        return out


def parse_text(spec: Spec, text: str) -> Any:
    """A flag's text as the value a JSON config would hold; text that does not read as the
    field's type is returned as it is, for ``convert`` to reject with its message."""
    if spec.optional and text.strip().lower() in AUTO_WORDS:
        return None
    if spec.kind is tuple:
        assert spec.item is not None
        return [parse_text(spec.item, t.strip()) for t in text.split(",") if t.strip()]
    try:
        if spec.kind is int and not spec.choices:
            return int(text)
        if spec.kind is float:
            return float(text)
    except ValueError:  # '20.5' for an int, 'two', or more than 4,300 digits
        pass
    return text


class FieldAction(argparse.Action):
    """Stores a flag's text converted by ``parse_text`` and ``convert``; errors name the flag."""

    def __init__(self, option_strings: list[str], dest: str, spec: Spec, **kw: Any):
        super().__init__(option_strings, dest, **kw)
        self.spec = spec

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        value = convert(self.spec, parse_text(self.spec, values), self.option_strings[0], flag=True,
                        typed=values if _PLAIN.fullmatch(values) else show(values))
        setattr(namespace, self.dest, value)


def flag_names(name: str) -> list[str]:
    """``tau_final`` → ``--tau-final``, ``--tau_final``."""
    return [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])


def _shown_default(default: Any) -> str:
    if default is None:
        return "auto"
    if isinstance(default, tuple):
        return ",".join(map(str, default))
    return str(default)


def _metavar(name: str, spec: Spec) -> str:
    if spec.choices:
        return "{" + ",".join(spec.choices) + "}"
    if spec.kind is tuple:
        return f"{name.upper()},..."
    return name.upper()


def add_fields(parser: argparse.ArgumentParser, cls: type, title: str | None = None,
               defaults: bool = False) -> None:
    """One flag per field of dataclass ``cls`` (nested config dataclasses are skipped), in a
    group ``title`` if given. ``defaults``: the namespace gets each field's default when the
    flag is absent; otherwise the parser's ``argument_default`` (SUPPRESS: only given flags)."""
    target: Any = parser.add_argument_group(title) if title else parser
    docs, specs = field_docs(cls), field_specs(cls)
    for f in dataclasses.fields(cls):
        spec = specs[f.name]
        if dataclasses.is_dataclass(spec.kind):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        doc = docs.get(f.name, "")
        kw: dict[str, Any] = {"dest": f.name}
        if defaults:
            kw["default"] = default
        help_text = doc if "default" in doc.lower() else f"{doc} (default: {_shown_default(default)})"
        help_text = help_text.replace("%", "%%")  # argparse %-formats help
        if spec.kind is bool:
            target.add_argument(*flag_names(f.name), action=argparse.BooleanOptionalAction, help=help_text, **kw)
        else:
            target.add_argument(*flag_names(f.name), action=FieldAction, spec=spec, help=help_text,
                                metavar=_metavar(f.name, spec), **kw)
