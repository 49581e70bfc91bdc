"""One dataclass per command: the same fields serve the command line, YAML files and the docs.

Every field carries its help text in ``metadata["help"]``. ``parse_args`` builds an argparse parser
from the dataclass, reads ``--config FILE.yaml`` first (its keys are field names) and lets explicit
command-line flags override it, as HF/TRL users expect.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from video_ktr.utils.settings_check import SettingsError, check_settings

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "y", "on"}
_FALSE = {"0", "false", "no", "n", "off"}


def field(default: Any = dataclasses.MISSING, *, help: str, choices: list[str] | None = None, **kw: Any) -> Any:
    """A dataclass field with a help text (and optional choices); mutable defaults are copied."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = list(choices)
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


def _str2bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _list_item_type(tp: Any) -> Any | None:
    if typing.get_origin(tp) in (list, typing.List):  # noqa: UP006
        (item,) = typing.get_args(tp) or (str,)
        return item
    return None


def _coerce(name: str, tp: Any, value: Any, source: str) -> Any:
    """Convert a YAML or command-line value to the field's type, with an error naming the field."""
    base, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in {"none", "null"}):
        if optional:
            return None
        raise ValueError(f"{source}: field '{name}' may not be null")
    item = _list_item_type(base)
    try:
        if item is not None:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                value = [value]
            return [_coerce(name, item, v, source) for v in value]
        if base is bool:
            return value if isinstance(value, bool) else _str2bool(value)
        if base in (int, float) and isinstance(value, bool):  # YAML `max_steps: true` is not 1
            raise ValueError("a boolean is not a number")
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError("not an integer")
            return int(value)
        if base is float:
            return float(value)
        if base is str:
            return str(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
        raise ValueError(f"{source}: field '{name}' expects {getattr(base, '__name__', base)}, got {value!r} ({exc})") from None
    return value


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def build_parser(cls: type, prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description or (cls.__doc__ or "").strip().split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", default=None, help="YAML file whose keys are the flags below (flags given on the command line win).")
    hints = _type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        base, _ = _unwrap_optional(tp)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        )
        kwargs: dict[str, Any] = {"help": f.metadata.get("help", ""), "default": argparse.SUPPRESS, "dest": f.name}
        if "choices" in f.metadata:
            kwargs["help"] += f" Choices: {', '.join(f.metadata['choices'])}."
        kwargs["help"] += f" (default: {default!r})"
        if base is bool:
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        else:
            kwargs["metavar"] = f.name.upper()
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required:
            kwargs["help"] += " [required]"
        parser.add_argument(f"--{f.name}", **kwargs)
    return parser


def from_dict(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    """Build the dataclass from a mapping, refusing unknown keys and bad types by name."""
    hints = _type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"{source}: unknown option(s) {', '.join(unknown)}; see --help for the valid ones")
    kwargs = {k: _coerce(k, hints[k], v, source) for k, v in values.items()}
    for name, f in names.items():
        if name in kwargs and "choices" in f.metadata:
            vals = kwargs[name] if isinstance(kwargs[name], list) else [kwargs[name]]
            for v in vals:
                if v is not None and v not in f.metadata["choices"]:
                    raise ValueError(f"{source}: field '{name}' must be one of {f.metadata['choices']}, got {v!r}")
    missing = [
        n for n, f in names.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"{source}: missing required option(s): {', '.join('--' + m for m in missing)}")
    obj = cls(**kwargs)
    try:
        check_settings(obj)
    except SettingsError as exc:
        raise SettingsError(f"{source}: {exc}") from None
    post = getattr(obj, "validate", None)
    if callable(post):
        post()
    return obj


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    with path.open() as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must be a mapping of option names to values")
    return data


def parse_args(cls: type[T], argv: list[str] | None = None, prog: str | None = None) -> T:
    """Parse ``argv`` into ``cls``: YAML from ``--config`` first, then explicit flags."""
    parser = build_parser(cls, prog=prog)
    ns = vars(parser.parse_args(argv))
    config_path = ns.pop("config", None)
    values: dict[str, Any] = load_yaml(config_path) if config_path else {}
    values.update(ns)
    try:
        return from_dict(cls, values, source=str(config_path) if config_path and not ns else "arguments")
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def markdown_table(cls: type) -> str:
    """The options of a command as a Markdown table (for the docs)."""
    hints = _type_hints(cls)
    rows = ["| option | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required"  # type: ignore[misc]
        )
        tp = getattr(hints[f.name], "__name__", str(hints[f.name])).replace("typing.", "")
        rows.append(f"| `--{f.name}` | {tp} | `{default!r}` | {f.metadata.get('help', '')} |")
    return "\n".join(rows)
