"""`docs/CONFIG.md`, the reference of every config key, generated from the schema in config.py.

The schema is the one place a key, its type, default, bounds, description and Execution mark are written; this
module renders them as Markdown, one table per section, so the reference cannot drift from the code:
`hyperofa docs config` rewrites the file, `hyperofa docs config --check` (and tests/test_config.py) fails when the
file differs from what the schema gives.
"""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel

from .config import Config, is_execution, is_input_path
from .errors import HyperofaError

CONFIG_DOC = Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md"  # in the source tree (a checkout)
REGENERATE = "hyperofa docs config"

HEADER = """\
# Config reference

Every key of the config tree, generated from the schema (`hyperofa_dist/config.py`) by `{command}`;
do not edit by hand: `{command} --check` and `tests/test_config.py` fail when this file is stale.
A run reads a YAML file (`--config`; `hyperofa demo` uses the packaged `demo.yaml`) and `key=value` overrides,
all validated before any work starts.

- **Execution** keys change how a run executes (ranks, launcher, ports, threads, retries, resume, logging
  cadence, where results go), never what it computes: they are left out of every stage's inputs digest, so
  changing one never invalidates a finished stage (`Execution(...)` in the schema).
- **Input path** keys name an input by its location: the digest holds what is found there (file hashes), not
  the string, so a moved or re-spelled input keeps the stages up to date (`InputPath(...)`).
- `unset` is YAML `null`: the description says what takes its place.
"""


def leaves(model: BaseModel, prefix: str = "", inherited: bool = False) -> Iterator[tuple[str, Any, Any, bool]]:
    """(dotted key, field info, default value, execution) for every leaf key under `model`, in schema order."""
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        execution = inherited or is_execution(info)
        if isinstance(value, BaseModel):
            yield from leaves(value, f"{prefix}{name}.", execution)
        else:
            yield f"{prefix}{name}", info, value, execution


def type_name(annotation: Any) -> str:
    """A reader's spelling of a field's type: `int`, `str or unset`, `one of: a, b`, `list of str`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "one of: " + ", ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        kinds = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(kinds) + (" or unset" if type(None) in args else "")
    if origin in (list, tuple):
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"map {type_name(args[0])} -> {type_name(args[1])}" if args else "map"
    if origin is typing.Annotated:
        return type_name(args[0])
    return getattr(annotation, "__name__", str(annotation))


BOUNDS = (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"),
          ("min_length", "length ≥"), ("max_length", "length ≤"))


def bounds(info: Any) -> str:
    parts = [f"{sign} {getattr(m, attr)}" for m in info.metadata for attr, sign in BOUNDS if hasattr(m, attr)]
    return f" ({', '.join(parts)})" if parts else ""


def default_text(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def cell(text: str) -> str:
    """One table cell: one line, `|` escaped, `<name>` placeholders kept visible (not read as HTML tags)."""
    return " ".join(str(text).split()).replace("|", "\\|").replace("<", "&lt;")


def render() -> str:
    """The whole of docs/CONFIG.md."""
    out = [HEADER.format(command=REGENERATE)]
    section = None
    for key, info, value, execution in leaves(Config()):
        top = key.rsplit(".", 1)[0]
        if top != section:
            section = top
            out += ["", f"## `{section}`", "", "| key | type | default | kind | description |", "|---|---|---|---|---|"]
        kind = "execution" if execution else ("input path" if is_input_path(info) else "")
        default = default_text(value).replace("|", "\\|")
        out.append(f"| `{key}` | {cell(type_name(info.annotation) + bounds(info))} | `{default}` | {kind} | "
                   f"{cell(info.description or '')} |")
    return "\n".join(out) + "\n"


def write_or_check(path: Path, check: bool) -> int:
    """Write `path` from the schema, or with `check` compare it: 0 when it is current, else one error line."""
    text = render()
    if check:
        current = path.read_text(encoding="utf-8") if path.is_file() else None
        if current != text:
            state = "missing" if current is None else "stale (the config schema changed)"
            raise HyperofaError(f"{path}: {state}; run `{REGENERATE}` and commit the file")
        return 0
    from .formats.files import atomic_write_bytes

    if not path.parent.is_dir():  # an installed wheel has no docs/ beside the package
        raise HyperofaError(f"{path.parent}: no such directory to write {path.name} into; pass --output FILE")
    atomic_write_bytes(path, text.encode("utf-8"))
    print(f"wrote {path} ({text.count(chr(10))} lines)")
    return 0
