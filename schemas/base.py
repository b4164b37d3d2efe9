"""What every config section shares: strict frozen models, and how paths a config names are found."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo


class ConfigError(ValueError):
    """A user mistake in a run config; its message is meant to be shown as is."""


class Section(BaseModel):
    # Defaults go through the same validators as user values: a default is a value too.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def _looks_like_path(text: str) -> bool:
    # A hub id is "name" or "org/name"; anything else that names a file system
    # location must exist, so a typo is reported instead of sent to the hub.
    return (
        text.startswith((".", "/", "~"))
        or text.endswith((".safetensors", ".ckpt"))
        or text.count("/") > 1
        or "\\" in text
    )


def find_path(value: str, info: ValidationInfo, accept) -> str | None:
    """`value` as an absolute path: itself if absolute, else against the config file's folder,
    then the working directory; None when no candidate passes `accept`."""
    base = Path((info.context or {}).get("base_dir", "."))
    expanded = Path(value).expanduser()
    candidates = [expanded] if expanded.is_absolute() else [base / expanded, Path.cwd() / expanded]
    return next((str(c.resolve()) for c in candidates if accept(c)), None)


def resolve_model_location(value: str | None, info: ValidationInfo) -> str | None:
    if value is None:
        return None
    found = find_path(value, info, Path.exists)
    if found is not None:
        return found
    if _looks_like_path(value):
        raise ValueError(f"'{value}' does not exist (relative paths are resolved against the config file's folder)")
    return value  # a hub id


RELATIVE_PATHS = "relative paths are resolved against the config file's folder"


def require_path(value: str | None, info: ValidationInfo, accept, what: str) -> str | None:
    """`value` resolved as `find_path` does; refused as not `what` when no candidate passes."""
    if value is None:
        return None
    found = find_path(value, info, accept)
    if found is None:
        raise ValueError(f"'{value}' is not {what}")
    return found


def resolve_input_file(value: str | None, info: ValidationInfo) -> str | None:
    """A file the config names: resolved against the config's folder (then the working
    directory); it must exist."""
    return require_path(value, info, Path.is_file, f"a file ({RELATIVE_PATHS})")


def format_error(error: ValidationError, prefix: str = "") -> str:
    """One line per problem, each naming its field (`section.key: message`)."""
    lines = []
    for item in error.errors():
        parts = [str(p) for p in item["loc"] if not str(p).startswith(("function-", "str", "Template"))]
        where = prefix + ".".join(p if p.isprintable() and p.strip() == p and p else repr(p) for p in parts)
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        if re.match(r"^[a-z_]+\.[a-z_.]+: ", message) and (not where or message.startswith(f"{where}.")):
            lines.append(prefix + message)  # a check across fields names the field itself
        else:
            lines.append(f"{where or 'config'}: {message}")
    return "; ".join(dict.fromkeys(lines))
