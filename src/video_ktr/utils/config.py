"""One dataclass per command: the same fields serve the command line, YAML files and the docs.

Every field carries its help text in ``metadata["help"]``. ``parse_args`` builds an argparse parser
from the dataclass, reads ``--config FILE.yaml`` first (its keys are field names) and lets explicit
command-line flags override it, as HF/TRL users expect.

The flags follow ``transformers.HfArgumentParser``'s conventions (written here over argparse so every
command keeps its choices, YAML coercion and error messages):

- ``--flag value`` and ``--flag=value``; no abbreviations (``--model`` is not ``--model_name_or_path``);
- lists space-separated (``--reward_funcs accuracy format``); a comma-separated item still splits, so old
  commands and YAML files (``accuracy,format``) read as before;
- booleans: ``--flag`` (true), ``--flag true|false``, ``--no_flag`` (false);
- the names TRL / Video-R1 users type, where the command has the option they mean: ``--bf16`` / ``--fp16``
  (-> ``--dtype bfloat16|float16``), ``--dataset_name`` (-> ``--dataset``);
- an unknown flag is one line naming the closest valid one; ``--help`` lists the required flags first,
  then the options grouped by the dataclass that declares them.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
import typing
import warnings
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
            if isinstance(value, str):  # a comma-separated list (older commands and YAML files)
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                value = [value]
            if optional and len(value) == 1 and isinstance(value[0], str) and value[0].lower() in {"none", "null"}:
                return None
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


# Names users of TRL / transformers / Video-R1 type, mapped onto ours: alias -> (our field, how to convert).
_ALIASES: dict[str, tuple[str, str]] = {
    "bf16": ("dtype", "bfloat16"),
    "fp16": ("dtype", "float16"),
    "dataset_name": ("dataset", ""),
}
_ALIAS_DEST = "_alias__"


def _is_required(f: dataclasses.Field) -> bool:
    no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    return no_default or "[required]" in f.metadata.get("help", "")


def _declaring_class(cls: type, name: str) -> type:
    for klass in reversed(cls.__mro__):  # the most basic class that declares it
        if name in getattr(klass, "__annotations__", {}):
            return klass
    return cls


class _ListAction(argparse.Action):
    """Space-separated values (HfArgumentParser), each of which may also be a comma-separated list (as before)."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[override]
        setattr(namespace, self.dest, [p.strip() for v in values for p in v.split(",") if p.strip()])


class ConfigArgumentParser(argparse.ArgumentParser):
    removed_options: dict[str, str] = {}  # option -> what to do instead (a dataclass's REMOVED_OPTIONS)

    """argparse with HfArgumentParser's conventions, aliases and one-line errors (see the module docstring)."""

    def error(self, message: str) -> typing.NoReturn:  # one line, not the whole usage
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")

    def _closest(self, flag: str) -> str | None:
        name = flag.split("=", 1)[0]
        options = [o for a in self._actions if a.help is not argparse.SUPPRESS or name.startswith("--no_")
                   for o in a.option_strings if o.startswith("--")]
        match = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
        return match[0] if match else None

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        ns, extras = super().parse_known_args(args, namespace)
        self._apply_aliases(ns)
        return ns, extras

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        ns, extras = self.parse_known_args(list(sys.argv[1:] if args is None else args), namespace)
        if extras:
            flag = next((e for e in extras if e.startswith("-")), extras[0])
            if flag.startswith("-"):
                near = self._closest(flag)
                hint = f"; did you mean {near}?" if near else ""
                removed = self.removed_options.get(flag.split("=", 1)[0].lstrip("-"))
                if removed:
                    hint = f": {removed}"
                self.error(f"unrecognized argument {flag.split('=', 1)[0]}{hint}")
            self.error(f"unexpected value {flag!r} (flags take the form --name value)")
        return ns

    def _apply_aliases(self, ns: argparse.Namespace) -> None:
        for alias, (target, value) in _ALIASES.items():
            dest = _ALIAS_DEST + alias
            if not hasattr(ns, dest):
                continue
            given = getattr(ns, dest)
            delattr(ns, dest)
            if value:  # a boolean alias: --bf16 [true|false]
                if not _str2bool(given):
                    continue
            else:
                value = given
            current = getattr(ns, target, None)
            if current is not None and current != value:
                self.error(f"--{alias} sets --{target} {value}, but --{target} {current} is also given")
            setattr(ns, target, value)


def build_parser(cls: type, prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    required = [f"--{f.name} {f.name.upper()}" for f in dataclasses.fields(cls) if _is_required(f)]
    parser = ConfigArgumentParser(
        prog=prog,
        usage=" ".join(["%(prog)s", *required, "[--config FILE.yaml] [options]"]),
        description=description or (cls.__doc__ or "").strip().split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    parser.removed_options = dict(getattr(cls, "REMOVED_OPTIONS", {}))
    parser.add_argument("--config", default=None, help="YAML file whose keys are the flags below (flags given on the command line win).")
    hints = _type_hints(cls)
    fields = dataclasses.fields(cls)
    groups: dict[Any, argparse._ArgumentGroup] = {"required": parser.add_argument_group("required")}
    for f in fields:
        if not _is_required(f):
            klass = _declaring_class(cls, f.name)
            if klass not in groups:
                doc = (klass.__doc__ or "").strip()
                title = doc.split("\n")[0].rstrip(".") if doc and not doc.startswith(f"{klass.__name__}(") else ""
                groups[klass] = parser.add_argument_group(f"{title} ({klass.__name__})" if title else klass.__name__)
    names = {f.name for f in fields}
    for f in sorted(fields, key=lambda f: not _is_required(f)):  # required first, otherwise declaration order
        group = groups["required"] if _is_required(f) else groups[_declaring_class(cls, f.name)]
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
        elif _list_item_type(base) is not None:
            kwargs.update(nargs="+", metavar=f.name.upper(), action=_ListAction)
        else:
            kwargs["metavar"] = f.name.upper()
        group.add_argument(f"--{f.name}", **kwargs)
        if base is bool and f"no_{f.name}" not in names:
            group.add_argument(f"--no_{f.name}", dest=f.name, action="store_const", const="false",
                               default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    aliases = parser.add_argument_group("names from TRL / transformers (mapped onto the options above)")
    for alias, (target, value) in _ALIASES.items():
        if target in names and alias not in names:
            if value:
                aliases.add_argument(f"--{alias}", dest=_ALIAS_DEST + alias, nargs="?", const="true", metavar="BOOL",
                                     default=argparse.SUPPRESS, help=f"= --{target} {value}")
            else:
                aliases.add_argument(f"--{alias}", dest=_ALIAS_DEST + alias, metavar=target.upper(),
                                     default=argparse.SUPPRESS, help=f"= --{target}")
    return parser


def from_dict(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    """Build the dataclass from a mapping, refusing unknown keys and bad types by name."""
    hints = _type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    removed = getattr(cls, "REMOVED_OPTIONS", {})
    if any(name in removed for name in unknown):  # an old YAML still runs: the key is ignored, with the reason
        for name in [n for n in unknown if n in removed]:
            warnings.warn(f"{source}: option {name} was removed and is ignored: {removed[name]}", FutureWarning,
                          stacklevel=2)
        values = {k: v for k, v in values.items() if k not in removed}
        unknown = [n for n in unknown if n not in removed]
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
