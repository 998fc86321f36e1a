"""Config plumbing shared by every stage: TOML presets, dotted CLI overrides, flags from fields,
early validation.

Each stage declares its sections as dataclasses (``ModelConfig`` in model.py, ``TrainConfig`` in
train.py, ``SamplingConfig`` for ``[sample]`` in generate/sampling.py). A run's config is a dict of
sections, ``{"model": {...}, "train": {...}}``, built from a preset, then an optional ``--config``
file, then ``section.key=value`` overrides, and only then turned into dataclasses by
``from_dict``, so that an unknown key or a wrong type is reported before any work starts.

A section can also be set by command-line flags made from its fields: a field whose metadata has
a ``help`` becomes a flag (``add_section_arguments``), and ``section_from_args`` builds the
dataclass from the flags given, over a TOML table, through the same ``from_dict``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import re
import sys
import types
from importlib import resources
from pathlib import Path
from collections.abc import Iterable
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from slmkit.errors import SlmError

T = TypeVar("T")


def preset_names() -> list[str]:
    """Names of the presets shipped in ``slmkit/presets``."""
    folder = resources.files("slmkit") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_preset(name: str) -> dict[str, dict[str, Any]]:
    """Load a shipped preset by name; an unknown name suggests the closest one."""
    names = preset_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise SlmError(f"unknown preset '{name}': {hint}choose one of {', '.join(names)}")
    text = (resources.files("slmkit") / "presets" / f"{name}.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file with errors that name the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise SlmError(f"config file {path} does not exist: check the path") from None
    except OSError as e:  # a directory, no permission, ...
        raise SlmError(f"config file {path} cannot be read ({e.strerror}): check the path") from None
    except UnicodeDecodeError as e:
        raise SlmError(f"config file {path} is not UTF-8 (byte offset {e.start}): save it as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise SlmError(f"config file {path} is not valid TOML ({e}): fix the syntax") from None


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``extra`` into a copy of ``base`` (extra wins)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _parse_value(text: str) -> Any:
    """Parse an override's value as a TOML value, falling back to a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_args_and_overrides(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args``, except that ``section.key=value`` items may also come after the options
    (``slm finetune BASE --out RUN train.lr=1e-4``), where argparse no longer gives them to the
    ``overrides`` positional list: they are added to it. Anything else unknown is an error."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not isinstance(getattr(args, "overrides", None), list) or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    return args


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """Turn ``["model.n_layer=4", "train.lr=1e-3"]`` into nested dicts."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise SlmError(f"override '{item}' is not of the form section.key=value (e.g. train.lr=1e-3)")
        out = merge(out, {parts[0]: {parts[1]: _parse_value(value.strip())}})
    return out


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; allow int -> float and str durations."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except SlmError as e:
                errors.append(str(e))
        raise SlmError(errors[0] if errors else f"{where} cannot be None")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise SlmError(f"{where} = {value!r} is not allowed: choose one of {_type_name(tp)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # TOML has nan and inf, and ints of any size: none of them is a usable setting.
            if (isinstance(value, int) and abs(value) > 2**53) or not math.isfinite(value):
                raise SlmError(f"{where} = {value!r} must be a finite number")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            (inner,) = get_args(tp)[:1] or (Any,)
            return [_coerce(v, inner, where) for v in value] if inner is not Any else list(value)
    elif tp is Any:
        return value
    raise SlmError(f"{where} = {value!r} has the wrong type: expected {_type_name(tp)}")


def from_dict(cls: type[T], data: dict[str, Any], section: str) -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types in one line.

    After construction, the dataclass's own ``validate()`` (if any) checks relations between fields.
    """
    if not isinstance(data, dict):
        raise SlmError(f"config section [{section}] must be a table of key = value pairs")
    hints = get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=1)
            hint = f" (did you mean {section}.{close[0]}?)" if close else ""
            raise SlmError(f"unknown config key {section}.{key}{hint}")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate()
    return obj


# The sections of a run's TOML file, one per stage that reads one.
# Every command accepts the whole file and reads its own sections.
RUN_SECTIONS = ("model", "train", "sample", "finetune", "lora", "serve", "distill")  # what a RUN_DIR's config.toml may hold


def check_sections(sections: dict[str, Any], known: Iterable[str], where: str) -> None:
    """Refuse a section no stage reads (a typo, most likely), suggesting the closest known one;
    ``where`` names the file. Each known section must be a table."""
    known = sorted(known)
    for name, table in sections.items():
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean [{close[0]}]? " if close else ""
            raise SlmError(f"unknown config section [{name}] in {where}: {hint}the sections are "
                           + ", ".join(f"[{k}]" for k in known))
        if not isinstance(table, dict):
            raise SlmError(f"config section [{name}] in {where} must be a table of key = value pairs")


# --- command-line flags from dataclass fields -----------------------------------------------------
#
# A field becomes a flag when its metadata has a "help" (argparse help; %(default)s is the field's
# default). Optional metadata, only where the flag is not the plain one: "flag" (its name; default
# --field-name, or --no-field-name for a bool that defaults to true), "metavar", and "parse" (turns
# one command-line word into a value, e.g. unescaping; default: the field's type).

_FLAG_KEYS = {"help", "flag", "metavar", "parse"}


def _flag_type(tp: Any) -> Any:
    """The type of one command-line word for annotation ``tp`` (``int | None`` -> int, list[str] -> str)."""
    if get_origin(tp) in (Union, types.UnionType):
        (tp,) = [a for a in get_args(tp) if a is not type(None)]
    if get_origin(tp) in (list, tuple):
        return _flag_type(get_args(tp)[0])
    return tp


def add_section_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add a flag for each field of dataclass ``cls`` that declares a ``help`` in its metadata.

    A number or string field takes one value, a list field one or more (repeating the flag adds
    more), a bool field is a switch that flips its default. Flags not given leave no attribute in
    the parsed namespace, so ``section_from_args`` can tell them from values typed on the command line.
    """
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta:
            continue
        if set(meta) - _FLAG_KEYS:  # a typo in a field's metadata is the program's bug, not the user's
            raise TypeError(f"{cls.__name__}.{f.name}: unknown flag metadata {sorted(set(meta) - _FLAG_KEYS)}")
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        tp = hints[f.name]
        # The default goes into the help now, because argparse's own default stays unset (SUPPRESS).
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                              "help": (meta["help"] % {"default": default}).replace("%", "%%")}
        name = "--" + f.name.replace("_", "-")
        if tp is bool:
            kw["action"] = "store_false" if default else "store_true"
            name = f"--no-{name[2:]}" if default else name
        else:
            one = _flag_type(tp)
            if get_origin(one) is Literal:
                kw["choices"] = get_args(one)
                one = type(kw["choices"][0])
            kw["type"] = meta.get("parse", one)
            if get_origin(tp) in (list, tuple):
                kw["nargs"], kw["action"] = "+", "extend"
            if "metavar" in meta:
                kw["metavar"] = meta["metavar"]
        parser.add_argument(meta.get("flag", name), **kw)


def section_from_args(cls: type[T], args: argparse.Namespace, section: str, table: dict[str, Any] | None = None) -> T:
    """Dataclass ``cls`` from the TOML ``table`` of ``[section]`` (may be empty) with the flags given
    on the command line on top (they win), checked by ``from_dict``: the same coercion, "did you
    mean" and ``validate()`` messages as a config file's."""
    flags = [f.name for f in dataclasses.fields(cls) if "help" in f.metadata]
    given = {name: getattr(args, name) for name in flags if hasattr(args, name)}
    return from_dict(cls, {**(table or {}), **given}, section)


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as a plain dict of TOML-friendly values (None entries are dropped)."""
    return {k: v for k, v in dataclasses.asdict(obj).items() if v is not None}


def dump_toml(sections: dict[str, dict[str, Any]]) -> str:
    """Write nested ``{section: {key: value}}`` dicts as TOML (scalars and flat lists only)."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        raise TypeError(f"cannot write {v!r} as TOML")

    lines = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {fmt(v)}" for k, v in table.items() if v is not None)
        lines.append("")
    return "\n".join(lines)


def parse_duration(text: str | float | int | None) -> float | None:
    """Parse ``"15m"``, ``"90s"``, ``"1h30m"`` or a number of seconds into seconds."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else float(text)
    s = text.strip().lower()
    num = r"(?:\d+\.?\d*|\.\d+)"  # ASCII digits only: "²".isdigit() is true but float() refuses it
    if not s or not re.fullmatch(rf"(?:{num}[hms])*{num}?", s, re.ASCII):
        raise SlmError(f"duration '{text}' is not understood: write e.g. 90s, 15m or 1h30m")
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "": 1.0}
    total = sum(float(n) * units[u] for n, u in re.findall(rf"({num})([hms]?)", s, re.ASCII))
    if not 0 < total < math.inf:
        raise SlmError(f"duration '{text}' must be positive")
    return total


__all__ = [
    "add_section_arguments",
    "check_sections",
    "dump_toml",
    "from_dict",
    "load_preset",
    "load_toml",
    "merge",
    "parse_duration",
    "parse_overrides",
    "preset_names",
    "section_from_args",
    "to_dict",
]
