"""Writing a token for machines: ``--output json|env|dotenv|github``.

``github`` appends ``NAME=value`` lines to the file named by ``GITHUB_ENV`` (so later steps of
the job see the variables) and prints ``::add-mask::<value>`` first, so the runner masks the
secret in every log line.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from typing import Any, TextIO

FORMATS = ("json", "env", "dotenv", "github")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class OutputError(ValueError):
    pass


def write_result(
    fmt: str,
    body: dict[str, Any],
    variables: dict[str, str],
    secrets: list[str],
    out: TextIO,
    environ: dict[str, str] | None = None,
) -> None:
    """Print ``body`` as JSON, or ``variables`` as env/dotenv lines, or hand them to GitHub."""
    if fmt == "json":
        out.write(json.dumps(body, indent=2) + "\n")
        return
    for name, value in variables.items():
        if not _NAME.match(name):
            raise OutputError(f"{name!r} is not a valid environment variable name")
        if "\n" in value or "\r" in value:
            raise OutputError(f"the value of {name} spans lines")
    if fmt == "env":
        for name, value in variables.items():
            out.write(f"export {name}={shlex.quote(value)}\n")
    elif fmt == "dotenv":
        for name, value in variables.items():
            out.write(f"{name}={value}\n")
    elif fmt == "github":
        env = os.environ if environ is None else environ
        path = env.get("GITHUB_ENV")
        if not path:
            raise OutputError("--output github needs GITHUB_ENV (set by the GitHub runner)")
        for secret in secrets:
            out.write(f"::add-mask::{secret}\n")
        out.flush()
        with open(path, "a", encoding="utf-8") as fh:
            for name, value in variables.items():
                fh.write(f"{name}={value}\n")
        out.write(f"wrote {', '.join(variables)} to GITHUB_ENV\n")
    else:
        raise OutputError(f"--output must be one of {', '.join(FORMATS)}")
