"""One config style for every entry point: a dataclass whose fields declare each option once (type, default,
choices, help), and a recipe file that sets any of them.

From such dataclasses come a command's flags (`build_parser`), its options from a TOML file (`--config FILE`,
`load_config_file`: field names as keys, flags given on the command line override the file, and `--help` shows the
defaults after the file is applied), the config from parsed flags (`config_from_args`; `parse_config` does all of
it for one class), the choices check (`check_choices`) and, for the Prefect flow, the flow's parameters
(`flow_parameters`: the deployment's parameter schema and defaults). A stage's config adds its own `validate`.
`dump_toml` writes a config back as a recipe file (the student's run directory keeps the one it ran).

Field types: int, float, str, bool (--x / --no-x), each optionally `| None`; list[T] and tuple[T, ...] of int, float
or str (a comma-separated flag, a TOML array in a file).
"""

from __future__ import annotations

import argparse
import inspect
import json
import tomllib
import types
import typing
from dataclasses import MISSING, field, fields, is_dataclass
from pathlib import Path

from pipeline.errors import UserError


def opt(default, help: str, choices: tuple | None = None, aliases: tuple[str, ...] = (), positional: bool = False,
        factory=None, const=None):
    """A config field with its CLI help (and allowed values, other flag names; `positional`: an optional positional
    argument instead of a flag; `factory`: a default computed when the config is made, e.g. the machine's
    threads, with `default` ignored; `const`: the flag's value when it is given without one, `--resume` for
    `--resume latest`)."""
    metadata = {"help": help, "choices": choices, "aliases": aliases, "positional": positional, "const": const}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def listed(default: list | tuple, help: str):
    """A list-valued config field (a comma-separated CLI flag)."""
    return field(default_factory=lambda: list(default), metadata={"help": help, "choices": None, "aliases": ()})


class ConfigError(UserError, ValueError):
    """An option value that cannot work; raised before any work starts."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def default_of(f):
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


_SCALARS = (int, float, str, bool)


def field_kind(tp) -> tuple[type, type | None]:
    """(scalar type, container: list, tuple or None) of a field's type hint; `X | None` is X."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"config fields take one type or that type | None, not {tp}")
        return field_kind(args[0])
    if origin in (list, tuple):
        inner = typing.get_args(tp)[0]
        if inner not in _SCALARS:
            raise TypeError(f"config list fields hold int, float or str, not {tp}")
        return inner, origin
    if tp not in _SCALARS:
        raise TypeError(f"config fields are int, float, str, bool or lists of them, not {tp}")
    return tp, None


def _kinds(config_cls) -> dict[str, tuple[type, type | None]]:
    hints = typing.get_type_hints(config_cls)
    return {f.name: field_kind(hints[f.name]) for f in fields(config_cls)}


def comma_list(kind: type, container: type = list):
    """The one list parser of every command: 'a,b,c' -> [kind(a), kind(b), kind(c)] (empty items dropped)."""
    return lambda text: container(kind(v.strip()) for v in text.split(",") if v.strip())


def _shown(value) -> str:
    if value in (None, "") or value == [] or value == ():
        return ""
    if isinstance(value, (list, tuple)):
        return f" (default: {','.join(map(str, value))})"
    return f" (default: {value})"


def _with_skips(config_classes, skip: tuple[str, ...]) -> list[tuple[type, tuple[str, ...]]]:
    """(class, fields left out) per item: a config class (leaves out `skip`) or a (class, its own skip) pair."""
    return [(c[0], tuple(c[1])) if isinstance(c, tuple) else (c, skip) for c in config_classes]


def build_parser(*config_classes, defaults: dict | None = None, parser: argparse.ArgumentParser | None = None,
                 skip: tuple[str, ...] = (), description: str | None = None) -> argparse.ArgumentParser:  # fmt: skip
    """An argparse parser with one flag per field of the `config_classes` (types, choices, help from the
    dataclasses; an item may be a (class, fields to leave out) pair). `defaults` overrides field defaults; `skip`
    leaves fields out; `parser`: add the flags to this one, else a new one with `description`."""
    parser = parser or argparse.ArgumentParser(description=description,
                                               formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    defaults = defaults or {}
    for config_cls, left_out in _with_skips(config_classes, skip):
        kinds = _kinds(config_cls)
        for f in fields(config_cls):
            if f.name in left_out:
                continue
            default = defaults.get(f.name, default_of(f))
            kind, container = kinds[f.name]
            help_ = f.metadata.get("help", "")
            if f.metadata.get("positional"):
                parser.add_argument(f.name, nargs="?", type=kind, default=default, help=help_ + _shown(default))
                continue
            names = [flag(f.name), *f.metadata.get("aliases", ())]
            if kind is bool and container is None:
                parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                    help=help_)  # fmt: skip
            elif container is not None:
                parser.add_argument(*names, dest=f.name, type=comma_list(kind, container), default=default,
                                    help=help_ + _shown(default), metavar=f.name.upper().split("_")[-1] + ",...")  # fmt: skip
            elif f.metadata.get("const") is not None:
                parser.add_argument(*names, dest=f.name, type=kind, default=default, help=help_ + _shown(default),
                                    choices=f.metadata.get("choices"), nargs="?", const=f.metadata["const"])  # fmt: skip
            else:
                parser.add_argument(*names, dest=f.name, type=kind, default=default, help=help_ + _shown(default),
                                    choices=f.metadata.get("choices"))  # fmt: skip
    return parser


def _coerce(path: Path, key: str, value, kind: type, container: type | None):
    """A recipe file's value as the field's type, or ConfigError naming the file and the key."""
    def one(v):
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            return float(v)
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise ConfigError(f"{path}: {key} = {v!r} is not a {kind.__name__}")
        return v

    if value is None:
        return None
    if container is not None:
        if isinstance(value, str):
            return comma_list(kind, container)(value)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: {key} = {value!r} is not a list")
        return container(one(v) for v in value)
    return one(value)


def load_config_file(path: Path | str, config_classes, skip: tuple[str, ...] = ()) -> dict:
    """The option values of a TOML recipe file: top-level keys are field names (`align_steps` or `align-steps`),
    checked against the fields of `config_classes` and their types. Unknown keys are refused, naming them."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {path}: not a TOML file ({exc})") from None
    known = {}
    for cls, left_out in _with_skips(config_classes, skip):
        known.update({name: kind for name, kind in _kinds(cls).items() if name not in left_out})
    values = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ConfigError(f"--config {path}: unknown option {key!r}; the options are the command's flags "
                              f"without their dashes (see --help)")  # fmt: skip
        values[name] = _coerce(path, key, value, *known[name])
    return values


def parse_args(*config_classes, argv: list[str] | None = None, description: str | None = None,
               defaults: dict | None = None, skip: tuple[str, ...] = (), add_arguments=None,
               default_config: str | None = None) -> argparse.Namespace:  # fmt: skip
    """Parse a command line made of the configs' flags, plus `--config FILE` (a TOML recipe whose values become
    the defaults, so flags given override it and --help shows the result; `default_config`: the file read when
    none is given). `add_arguments(parser)` adds a command's own non-config arguments."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=default_config)
    known, _ = pre.parse_known_args(argv)
    from_file = load_config_file(known.config, config_classes, skip) if known.config else {}
    parser = build_parser(*config_classes, defaults={**(defaults or {}), **from_file}, skip=skip,
                          description=description)  # fmt: skip
    parser.add_argument("--config", default=known.config, metavar="FILE",
                        help="a TOML recipe: option values by name (e.g. configs/demo.toml); flags override it")
    if add_arguments is not None:
        add_arguments(parser)
    return parser.parse_args(argv)


def config_from_args(config_cls, args: argparse.Namespace, **overrides):
    names = {f.name for f in fields(config_cls)}
    return config_cls(**{**{k: v for k, v in vars(args).items() if k in names}, **overrides})


def parse_config(config_cls, argv: list[str] | None = None, description: str | None = None,
                 defaults: dict | None = None, **overrides):  # fmt: skip
    """`config_cls` from a command line (and its --config file): parse_args + config_from_args."""
    return config_from_args(config_cls, parse_args(config_cls, argv=argv, description=description,
                                                   defaults=defaults), **overrides)  # fmt: skip


def check_choices(config) -> None:
    for f in fields(config):
        choices = f.metadata.get("choices")
        value = getattr(config, f.name)
        if choices and value not in choices and not (value is None and f.default is None):
            raise ConfigError(f"{flag(f.name)} {value!r} is not one of: {', '.join(map(str, choices))}")


def dump_toml(config, header: str = "") -> str:
    """A config as a TOML recipe that --config reads back to the same values (fields that are None are left out:
    their default)."""
    if not is_dataclass(config):
        raise TypeError("dump_toml takes a config dataclass")
    lines = [f"# {line}" for line in header.splitlines()] if header else []
    for f in fields(config):
        value = getattr(config, f.name)
        if value is None:
            continue
        if isinstance(value, tuple):
            value = list(value)
        lines.append(f"{f.name} = {json.dumps(value) if not isinstance(value, bool) else str(value).lower()}")
    return "\n".join(lines) + "\n"


def flow_parameters(*config_classes, skip: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """The fields of these configs as keyword parameters with their types and defaults: what a Prefect flow's
    signature is made of, so the deployment's parameter schema and defaults are the configs'."""
    params = []
    for cls in config_classes:
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if f.name in skip:
                continue
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default_of(f),
                                            annotation=hints[f.name]))  # fmt: skip
    return params
