"""The functions take the command line's options, with its defaults, and their help is its
help."""

import inspect
import re
import subprocess

import pytest

import infl
from conftest import BIN

STAGES = ["fit", "score", "self_influence", "index", "inspect", "report"]
# Python-only parameters.
PYTHON_ONLY = {"threads", "progress"}


def flags(text):
    return set(re.findall(r"^\s+(?:-\w, )?--([a-z][a-z0-9-]*)", text, re.M)) - {"help"}


def defaults(text):
    """{flag: default} of a help text (whatever width it was wrapped at)."""
    out = {}
    blocks = re.split(r"^\s+(?:-\w, )?--([a-z][a-z0-9-]*)", text, flags=re.M)
    for flag, body in zip(blocks[1::2], blocks[2::2]):
        d = re.search(r"\[default: ([^\]]+)\]", " ".join(body.split()))
        if d:
            out[flag] = d.group(1)
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_every_flag_is_a_keyword_and_every_default_is_the_cli_one(stage):
    text = infl._infl.options_help(stage)
    params = set(inspect.signature(getattr(infl, stage)).parameters)
    assert {f.replace("-", "_") for f in flags(text)} == params - PYTHON_ONLY
    cli = subprocess.run([str(BIN), stage.replace("_", "-"), "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert defaults(text) == {k: v for k, v in defaults(cli).items() if k not in ("threads",)}


def test_help_teaches_what_the_cli_help_does():
    doc = infl.score.__doc__
    assert "--query-rank" in doc and "[default: 32]" in doc and "max_len" in doc
