"""Reading a user's YAML: floats like 1e-5 as floats, and a bad file as one line naming it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from ds_trainer.errors import ConfigError


class YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads floats like 1e-5: YAML 1.1 wants a dot and would hand back a string."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(path: str, what: str, flag: str) -> Any:
    """A user's YAML file, or one line naming the file, the line and the flag to fix."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {path} not found; pass an existing YAML file to {flag}")
    try:
        return yaml.load(p.read_text(), Loader=YamlLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{what} {path}{where} is not valid YAML: {getattr(e, 'problem', e)}") from None
