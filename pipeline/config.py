"""Stage configs: a YAML file plus `--key value` overrides, checked against a dataclass.

Every stage's config is a dataclass. Values from the YAML file and from the command line go
through the same check, so a typo or a bad value fails the same way wherever it was written:
the error names the key, where it came from, and what is accepted.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import re
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """YAML with only true/false as booleans: YAML 1.1 would read `save_strategy: no` as False."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


CLI = "the command line"


class UserError(ValueError):
    """Bad input from the user (a key, value, file, column, a refused rerun, a mismatched tokenizer):
    every entry point prints its message as one line and exits with status 2. Anything else that
    escapes is a bug and keeps its traceback."""


def setting(default: Any = dataclasses.MISSING, help: str = "", cli_only: bool = False) -> Any:
    """A config key with its default and one line of help (`--help` and the config reference read
    it). Lists and dicts are copied per instance. `cli_only`: taken from the command line only."""
    metadata = {"help": help, **({"cli_only": True} if cli_only else {})}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def require(cfg: Any, *keys: str, example: str = "") -> None:
    """Refuse a required key left unset: its name, its help, and the shipped config that sets one."""
    helps = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cfg)}
    for key in keys:
        if not getattr(cfg, key):
            raise ValueError(f"{key} is not set: {helps[key]}" + (f" ({example} sets the demo's)" if example else ""))


def parse_cli(argv: list[str]) -> tuple[str | None, dict[str, str]]:
    """Split `--config FILE --key value --flag` into the config path and raw overrides.

    Hand-rolled rather than argparse on purpose: argparse accepts unambiguous prefixes of
    option names, and a config key must never be matched by a prefix.
    """
    config_path, overrides = None, {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or len(token) == 2:
            raise UserError(f"expected --key value, got {token!r}")
        key, _, value = token[2:].partition("=")
        key = key.replace("-", "_")
        if not _:  # `--key value`, or a bare `--flag` meaning true
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            value = argv[i + 1] if has_value else "true"
            i += 1 if has_value else 0
        if key == "config":
            config_path = value
        elif key in overrides:
            raise UserError(f"--{key} is given twice on the command line")
        else:
            overrides[key] = value
        i += 1
    return config_path, overrides


def load_config(cls: type[T], path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                layer: tuple[str, dict[str, Any]] | None = None) -> T:
    """Build `cls` from a YAML file, then `layer` (source name, values: e.g. a study's reduced
    version), then overrides (command-line strings or typed values): the command line wins."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} does not exist")
        loaded = parse_yaml(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise UserError(f"{path}: expected a mapping of key: value, got {type(loaded).__name__}")
        values.update(_checked(cls, loaded, source=str(path)))
    if layer is not None:
        values.update(_checked(cls, layer[1], source=layer[0]))
    for key, raw in (overrides or {}).items():
        value = parse_yaml(raw) if isinstance(raw, str) else raw
        if isinstance(raw, str) and not isinstance(value, (bool, int, float, list, dict, type(None))):
            value = raw  # keep strings verbatim (yaml would eat a leading '#', strip quotes, ...)
        values.update(_checked(cls, {key: value}, source=CLI))
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise UserError(f"{cls.__name__}: {err}") from err


def renamed_keys(cls: type) -> dict[str, str]:
    """Old key -> new key, from each class's RENAMED (CHANGELOG.md lists them)."""
    out: dict[str, str] = {}
    for c in reversed(cls.__mro__):
        out.update(c.__dict__.get("RENAMED", {}))
    return out


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain YAML-able values (enums become their values)."""
    def plain(v: Any) -> Any:
        if isinstance(v, enum.Enum):
            return v.value
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if dataclasses.is_dataclass(v):
            return plain(dataclasses.asdict(v))
        return v if v is None or isinstance(v, (bool, int, float, str)) else str(v)
    # Command-line-only keys (overwrite) are left out: a saved config must load as a config file.
    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
            if f.init and not f.metadata.get("cli_only")}


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config, so every artifact says how it was made."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True))


def _checked(cls: type, values: dict[str, Any], source: str) -> dict[str, Any]:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in values.items():
        if key not in fields and key in renamed_keys(cls):
            raise UserError(f"{key!r} in {source} was renamed to {renamed_keys(cls)[key]!r}: write "
                            f"{renamed_keys(cls)[key]} instead (CHANGELOG.md lists every rename)")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
            hint = f" Did you mean {close[0]!r}?" if close else " `python -m pipeline COMMAND --help` lists every key."
            raise UserError(f"unknown config key {key!r} in {source}.{hint}")
        if fields[key].metadata.get("cli_only") and source != CLI:
            raise UserError(f"{key!r} in {source}: this key is taken only from the command line (--{key}), "
                            "so that rerunning a config file never deletes finished work")
        try:
            out[key] = _coerce(value, hints[key])
        except ValueError as err:
            raise UserError(f"bad value for {key!r} in {source}: {value!r}; {err}") from None
    return out


def _coerce(value: Any, annotation: Any) -> Any:
    """Return `value` as `annotation`, or raise ValueError saying what is accepted."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for member in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, member)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(" or ".join(errors))
    if origin is Literal:
        if value not in args:
            raise ValueError(f"accepted values: {', '.join(map(str, args))}")
        return value
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        try:
            return annotation(value)
        except ValueError:
            raise ValueError(f"accepted values: {', '.join(str(m.value) for m in annotation)}") from None
    if origin in (list, tuple):
        if isinstance(value, str):  # `--temperatures 0.6,1.0` from the command line
            value = [parse_yaml(v) for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        item = args[0] if args else Any
        return [_coerce(v, item) for v in value]
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ValueError("expected a mapping")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ValueError("expected true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("expected an integer")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise ValueError("expected a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("expected a number")
        return float(value)
    if annotation is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ValueError("expected a string")
        return str(value)
    return value  # a type this checker does not know: the dataclass validates it
