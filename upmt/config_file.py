"""Configuration files for the daemons' `run`: every command-line option, in TOML.

`--config FILE` (default: `/etc/upmt/<daemon>.toml` when it exists) names a
TOML table whose keys are the long options of `run` without their dashes
(`tunnel-port = 1800`; `tunnel_port` is the same key), with values of the
option's type: strings, numbers, booleans for flags, arrays for options
given more than once (`interface = ["wlan0", "wwan0"]`). The file's values
become the options' defaults, so a flag on the command line wins. An
unknown key or a value the option refuses is a one-line error naming the
file and the key. `--print-config` prints the merged result (file, flags,
defaults) as TOML and exits: a file it prints reads back to the same.
"""

from __future__ import annotations

import functools
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import click

from ground.errors import ConfigError

__all__ = ["config_file_options", "show_config", "to_toml"]

# Parameters that are not configuration: the file itself and what reads it.
_NOT_CONFIG = frozenset({"config_file", "print_config", "help"})
# Repeatable options that once took one value: a file written then (`anchor =
# "198.51.100.2"`) still reads, as an array of one.
_ONE_OR_MORE = frozenset({"anchor"})


def config_file_options(default: Path) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`--config FILE` and `--print-config` for a `run` command.

    The command itself sees neither: with `--print-config` it does not run.
    """

    def load(ctx: click.Context, _param: click.Parameter, value: Path | None) -> Path | None:
        path = value if value is not None else (default if default.exists() else None)
        if path is not None:
            ctx.default_map = {**(ctx.default_map or {}), **read_config(path, ctx.command)}
        return path

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def f(*args: Any, config_file: Path | None, print_config: bool, **kwargs: Any) -> Any:
            if print_config:
                show_config(click.get_current_context())
                return None
            return command(*args, **kwargs)

        f = click.option(
            "--print-config",
            is_flag=True,
            help="Print the merged configuration (file, flags, defaults) as TOML and exit.",
        )(f)
        return click.option(
            "--config",
            "config_file",
            type=click.Path(dir_okay=False, path_type=Path),
            default=None,
            is_eager=True,
            callback=load,
            help=f"TOML file with any of these options (default {default}, if it exists); "
            "flags override it.",
        )(f)

    return decorate


def read_config(path: Path, command: click.Command) -> dict[str, Any]:
    """The file's options by parameter name, each checked by the option's own type."""
    try:
        with open(path, "rb") as file:
            table = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    params = {
        p.name: p
        for p in command.params
        if isinstance(p, click.Option) and p.name is not None and p.name not in _NOT_CONFIG
    }
    by_key = {_key(p): name for name, p in params.items()}
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = by_key.get(key.replace("_", "-"))
        if name is None:
            raise ConfigError(f"{path}: unknown key {key!r}")
        if name in out:
            raise ConfigError(f"{path}: {key!r} given twice (with - and with _)")
        out[name] = _checked(path, key, params[name], value)
    return out


def _key(param: click.Option) -> str:
    """The option's long name without its dashes: its key in the file."""
    longs = [o for o in param.opts if o.startswith("--")]
    return (longs[0] if longs else param.opts[0]).lstrip("-")


def _checked(path: Path, key: str, param: click.Option, value: object) -> object:
    if isinstance(value, dict):
        raise ConfigError(f"{path}: {key}: a table is no option value")
    if param.multiple and param.name in _ONE_OR_MORE and not isinstance(value, list | dict):
        value = [value]
    if param.multiple:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: {key}: an array, such as [{value!r}]")
        values = value
    elif isinstance(value, list):
        raise ConfigError(f"{path}: {key}: one value, not an array")
    else:
        values = [value]
    if param.is_flag and not all(isinstance(v, bool) for v in values):
        raise ConfigError(f"{path}: {key}: true or false")
    for one in values:
        if isinstance(one, bool) != param.is_flag:
            raise ConfigError(f"{path}: {key}: {one!r} is not a value of this option")
        try:
            param.type.convert(one if param.is_flag else _text(one), param, None)
        except click.BadParameter as exc:
            raise ConfigError(f"{path}: {key}: {exc.message}") from None
    return tuple(values) if param.multiple else value


def _text(value: object) -> object:
    """Numbers are given to click's types as the command line gives them: as text."""
    return str(value) if isinstance(value, int | float) else value


def show_config(ctx: click.Context) -> None:
    """The merged options of the running command, as TOML, on stdout."""
    params = {
        _key(p): ctx.params[p.name]
        for p in ctx.command.params
        if isinstance(p, click.Option) and p.name is not None and p.name not in _NOT_CONFIG
    }
    click.echo(to_toml(params), nl=False)


def to_toml(options: Mapping[str, object]) -> str:
    """Key = value lines for strings, numbers, booleans, paths and their lists; None left out."""
    lines = []
    for key, value in options.items():
        if value is None or (isinstance(value, tuple | list) and not value):
            continue
        lines.append(f"{key} = {_value(value)}")
    return "\n".join(lines) + "\n"


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    text = str(value)
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
