"""One typed config per stage: a dataclass whose fields declare each option once (type, default, choices, help).

From such a dataclass come the stage's CLI flags (`build_parser`), the config from parsed flags
(`config_from_args`), the choices check (`check_choices`) and, for the Prefect flow, the flow's parameters
(`flow_parameters`: the deployment's parameter schema and defaults). A stage's config adds its own `validate`.
"""

from __future__ import annotations

import argparse
import inspect
import typing
from dataclasses import MISSING, field, fields

from pipeline.errors import UserError


def opt(default, help: str, choices: tuple | None = None, aliases: tuple[str, ...] = ()):
    """A config field with its CLI help (and allowed values, and other flag names)."""
    return field(default=default, metadata={"help": help, "choices": choices, "aliases": aliases})


def listed(default: list, help: str):
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


_SCALARS = {"int": int, "float": float, "str": str}


def _comma_list(kind):
    return lambda text: [kind(v) for v in text.split(",") if v.strip()]


def build_parser(config_cls, defaults: dict | None = None, parser: argparse.ArgumentParser | None = None,
                 skip: tuple[str, ...] = (), description: str | None = None) -> argparse.ArgumentParser:  # fmt: skip
    """An argparse parser with one flag per field of `config_cls` (types, choices, help from the dataclass).

    `defaults` overrides field defaults; `skip` leaves fields out; `parser`: add the flags to this one, else a
    new one with `description`. Booleans get --x / --no-x; lists are comma-separated.
    """
    parser = parser or argparse.ArgumentParser(description=description,
                                               formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    defaults = defaults or {}
    for f in fields(config_cls):
        if f.name in skip:
            continue
        default = defaults.get(f.name, default_of(f))
        names = [flag(f.name), *f.metadata.get("aliases", ())]
        help_ = f.metadata.get("help", "")
        typ = str(f.type).replace(" | None", "")
        if typ == "bool":
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_)
            continue
        if typ.startswith("list["):
            kind = _SCALARS[typ[5:-1]]
            shown = f" (default: {','.join(map(str, default))})" if default else ""
            parser.add_argument(*names, dest=f.name, type=_comma_list(kind), default=default, help=help_ + shown)
            continue
        shown = f" (default: {default})" if default not in (None, "") else ""
        parser.add_argument(*names, dest=f.name, type=_SCALARS[typ], default=default, help=help_ + shown,
                            choices=f.metadata.get("choices"))  # fmt: skip
    return parser


def config_from_args(config_cls, args: argparse.Namespace, **overrides):
    names = {f.name for f in fields(config_cls)}
    return config_cls(**{**{k: v for k, v in vars(args).items() if k in names}, **overrides})


def check_choices(config) -> None:
    for f in fields(config):
        choices = f.metadata.get("choices")
        value = getattr(config, f.name)
        if choices and value not in choices and not (value is None and f.default is None):
            raise ConfigError(f"{flag(f.name)} {value!r} is not one of: {', '.join(map(str, choices))}")


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
