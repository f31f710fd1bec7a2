"""Every `snakemake` command the project documents parses the way it reads.

`--configfile` takes every following word up to the next option, so a target written after the config files
(`--configfile config/paper.yaml results/paper/table11.csv`) is read as one more config file and the command
fails. This parses each documented command (README, docs, config comments) with Snakemake's own argument parser
and checks that every config file it names exists in the repository.
"""
from __future__ import annotations

import functools
import re
import shlex
from pathlib import Path

import pytest
from snakemake.cli import get_argument_parser

parser = functools.cache(get_argument_parser)

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["README.md", "benchmarks/README.md", "config/README.md", *map(str, sorted(
    p.relative_to(ROOT) for pattern in ("docs/*.md", "config/**/*.yaml") for p in ROOT.glob(pattern)))]
PLACEHOLDERS = {"my.yaml", "my_overrides.yaml", "missing.yaml"}  # examples of a user's own file


def documented_commands(text: str) -> list[str]:
    """`snakemake ...` commands in `text`: in code blocks, inline code and `#` comments; a line ending in `\\`
    continues on the next."""
    commands, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        body = line.lstrip("# ").strip()
        for match in re.finditer(r"(?:^|`)((?:\S*/)?snakemake\s[^`]*)", body):
            command, j = match.group(1).strip(), i
            while command.endswith("\\") and j + 1 < len(lines):
                j += 1
                command = command[:-1].rstrip() + " " + lines[j].lstrip("# ").strip()
            commands.append(command.split("  #")[0].strip())
    return commands


def _cases() -> list[tuple[str, str]]:
    return [(source, command) for source in SOURCES
            for command in documented_commands((ROOT / source).read_text())]


def test_the_scanner_finds_the_commands_and_joins_continued_lines():
    text = "run `snakemake --cores 2 a.csv` or\n#   snakemake --configfile x.yaml \\\n#     -- b.csv\n"
    assert documented_commands(text) == ["snakemake --cores 2 a.csv", "snakemake --configfile x.yaml -- b.csv"]
    assert len(_cases()) > 10


@pytest.mark.parametrize(("source", "command"), _cases())
def test_documented_snakemake_command_names_existing_config_files(source: str, command: str):
    words = [w for w in shlex.split(command)[1:] if w not in ("...", "…")]
    args = parser().parse_args(words)
    for path in args.configfile or []:
        assert str(path) in PLACEHOLDERS or (ROOT / path).is_file(), (
            f"{source}: `{command}` reads {path} as a config file; put targets before --configfile (or after --)")
