"""The commands in README.md, BENCHMARKS.md and docs/ work as written.

Every `rmt ...`, `python -m rmt ...` and `torchrun ... -m rmt ...` line of a fenced code block is
parsed by the real command line (`rmt.cli.build_parser`, in-process): its sub-command exists, every
option it uses is one of that sub-command's own (spelt out, not abbreviated), and, unless it has
`...` placeholders, argparse accepts the whole line (choices, types, required arguments). Inline
code (which may wrap onto the next line) that starts with `rmt `, `python` or `torchrun` gets the
first two checks. Options given to `python SCRIPT.py` must
appear in that script, and every file named under configs/, scripts/, benchmarks/, tools/, tests/,
src/ or .ci/ must exist. The commands are read from the documents, so new pages and new
sub-commands are checked as they appear.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import pytest

from rmt.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").rglob("*.md"))]

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`([^`]+)`")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
OPTION = re.compile(r"^--?[A-Za-z][\w-]*")
NEGATIVE_NUMBER = re.compile(r"^-\d")
# repository files a document may name; outputs (benchmarks/results/*.json, runs/...) are not checked
FILE_REFERENCE = re.compile(
    r"(?<![\w./-])((?:configs|scripts|benchmarks|tools|tests|src|\.ci)/[\w./-]*?\.(?:ya?ml|sh|py))(?![\w])")


@dataclass
class Command:
    where: str           # "README.md:123"
    tokens: List[str]    # the whole line, split as the shell would
    argv: List[str]      # what rmt's parser receives
    fenced: bool         # from a code block (checked in full) or inline code (names only)


def _relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _split_document(text: str):
    """(line number, line) of fenced code, and the prose with code blocks blanked out."""
    code, prose, inside, output = [], [], False, False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            inside = not inside
            # a block marked as output (```text) shows what a command printed: not commands
            output = inside and line.strip().lstrip("`~").strip() in ("text", "console", "output")
            prose.append("")
            continue
        if inside and not output:
            code.append((number, line))
        prose.append("" if inside else line)
    return code, prose


def _logical_lines(code):
    """Join backslash continuations; yield (first line number, joined line)."""
    start, parts = None, []
    for number, line in code:
        if start is None:
            start = number
        if line.rstrip().endswith("\\"):
            parts.append(line.rstrip()[:-1])
            continue
        parts.append(line)
        yield start, " ".join(parts)
        start, parts = None, []
    if parts:
        yield start, " ".join(parts)


def rmt_arguments(tokens: List[str]) -> Optional[List[str]]:
    """The arguments `rmt` receives from a shell line, or None if the line does not run rmt."""
    tokens = list(tokens)
    if tokens[:1] == ["$"]:
        tokens = tokens[1:]
    while tokens and ENV_ASSIGNMENT.match(tokens[0]):
        tokens = tokens[1:]
    if not tokens:
        return None
    if tokens[0] == "rmt":
        return tokens[1:]
    if tokens[0] in ("python", "python3", "torchrun"):
        for i in range(1, len(tokens) - 1):
            if tokens[i] == "-m" and tokens[i + 1] == "rmt":
                return tokens[i + 2:]
    return None


def _shell_lines(path: Path):
    code, _ = _split_document(path.read_text(encoding="utf-8"))
    for number, line in _logical_lines(code):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            tokens = shlex.split(stripped, comments=True)
        except ValueError as e:
            raise AssertionError(f"{_relative(path)}:{number}: cannot split {stripped!r} as a shell line: {e}")
        if tokens:
            yield f"{_relative(path)}:{number}", tokens


def _inline_lines(path: Path):
    """Inline code spans that are shell lines (`rmt ...`, `python ...`), with their line numbers."""
    _, prose = _split_document(path.read_text(encoding="utf-8"))
    paragraph, first = [], 1
    for number, line in enumerate([*prose, ""], 1):
        if line.strip():
            if not paragraph:
                first = number
            paragraph.append(line)
            continue
        text = "\n".join(paragraph)  # inline code may wrap onto the next line, not across paragraphs
        paragraph = []
        for match in INLINE_CODE.finditer(text):
            span = " ".join(match.group(1).split())
            if not re.match(r"(rmt|python3?|torchrun) ", span):
                continue
            span = span.replace("[", " ").replace("]", " ")  # placeholders such as [--size HxW]
            try:
                tokens = shlex.split(span)
            except ValueError:
                tokens = span.split()
            yield f"{_relative(path)}:{first + text.count(chr(10), 0, match.start())}", tokens


def collect_commands(paths=DOCUMENTS) -> List[Command]:
    commands = []
    for path in paths:
        for fenced, lines in ((True, _shell_lines(path)), (False, _inline_lines(path))):
            for where, tokens in lines:
                argv = rmt_arguments(tokens)
                if argv:
                    commands.append(Command(where, tokens, argv, fenced))
    return commands


def collect_script_calls(paths=DOCUMENTS):
    """(where, script path, options) of every `python SCRIPT.py ...` line, fenced or inline."""
    calls = []
    for path in paths:
        for where, tokens in [*_shell_lines(path), *_inline_lines(path)]:
            while tokens and ENV_ASSIGNMENT.match(tokens[0]):
                tokens = tokens[1:]
            if len(tokens) >= 2 and tokens[0] in ("python", "python3") and tokens[1].endswith(".py"):
                options = [t.split("=")[0] for t in tokens[2:] if OPTION.match(t) and not NEGATIVE_NUMBER.match(t)]
                calls.append((where, tokens[1], options))
    return calls


def collect_file_references(paths=DOCUMENTS):
    references = []
    for path in paths:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for ref in FILE_REFERENCE.findall(line):
                references.append((f"{_relative(path)}:{number}", ref))
    return references


def _subparsers(parser: argparse.ArgumentParser):
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def problems(root: argparse.ArgumentParser, command: Command) -> List[str]:
    """What is wrong with one documented command (empty when nothing is)."""
    parser, argv, chain = root, list(command.argv), ["rmt"]
    while True:
        sub = _subparsers(parser)
        if sub is None or not argv or argv[0].startswith("-") or argv[0] == "...":
            # prose may name a group ("`rmt detect`"); a command line must pick one of its actions
            if sub is not None and sub.required and command.fenced and not {"-h", "--help"} & set(argv):
                return [f"'{' '.join(chain)}' needs one of: {', '.join(sub.choices)}"]
            break
        if argv[0] not in sub.choices:
            return [f"'{' '.join(chain)}' has no sub-command {argv[0]!r} (it has: {', '.join(sub.choices)})"]
        chain.append(argv[0])
        parser, argv = sub.choices[argv[0]], argv[1:]
    found = []
    known = parser._option_string_actions
    for token in argv:
        if token == "--":
            break
        if not OPTION.match(token) or NEGATIVE_NUMBER.match(token):
            continue
        name = token.split("=")[0]
        if name not in known:
            found.append(f"'{' '.join(chain)}' has no option {name} (run '{' '.join(chain)} --help')")
    if found or not command.fenced or "..." in argv or {"-h", "--help", "--version"} & set(argv):
        return found
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            root.parse_args(command.argv)
    except SystemExit:
        message = stderr.getvalue().strip().splitlines()
        found.append(f"argparse refuses it: {message[-1] if message else 'exit'}")
    return found


@pytest.fixture(scope="module")
def parser():
    return build_parser()


COMMANDS = collect_commands()


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{c.where} {' '.join(c.tokens[:4])}" for c in COMMANDS])
def test_documented_command_parses(parser, command):
    found = problems(parser, command)
    assert not found, f"{command.where}: {' '.join(command.tokens)}\n  " + "\n  ".join(found)


def script_problems(where: str, script: str, options: List[str]) -> List[str]:
    """Options the script does not define (each must appear in it as a quoted string)."""
    path = ROOT / script
    if not path.is_file():
        return [f"{where}: {script} does not exist"]
    text = path.read_text(encoding="utf-8")
    found = []
    for option in options:
        spellings = [option] + ([option.replace("--no-", "--", 1)] if option.startswith("--no-") else [])
        if not any(f'"{s}"' in text or f"'{s}'" in text for s in spellings):
            found.append(f"{where}: {script} has no option {option}")
    return found


def test_documented_scripts_take_their_options():
    found = [p for call in collect_script_calls() for p in script_problems(*call)]
    assert not found, "\n".join(found)


def test_documented_files_exist():
    references = collect_file_references()
    assert references, "no file references found: the pattern no longer matches the documents"
    missing = [f"{where}: {ref}" for where, ref in references if not (ROOT / ref).exists()]
    assert not missing, "documents name files that do not exist:\n" + "\n".join(missing)


def test_readme_commands_are_found():
    readme = [c for c in COMMANDS if c.where.startswith("README.md:") and c.fenced]
    subcommands = {c.argv[0] for c in readme}
    assert {"train", "eval", "detect", "segment", "export", "viz", "info"} <= subcommands, subcommands
    assert any(c.tokens[0] == "torchrun" for c in readme)
    references = {ref for where, ref in collect_file_references([ROOT / "README.md"])}
    assert {"scripts/demo.sh", "scripts/test.sh"} <= references


SAMPLE = """# A page

Inline: `rmt train --epoch 1` and, wrapped, `python benchmarks/detection.py
--no-such-option 3`.

```bash
$ rmt trian --epochs 1
OMP_NUM_THREADS=1 rmt detect --data shapes
rmt segment train --data synthetic --iters 2 \\
    --head unet        # not one of the choices
torchrun --nproc_per_node 2 -m rmt export rmt_tiny --no-such-flag
python -m rmt segment eval runs/x/best.safetensors --data runs/x/data --ms
rmt detect train ... --schedule 3x
bash scripts/no_such_script.sh
```

```python
import rmt
rmt.load_into(model, "x.pth")
```
"""


def test_the_checks_catch_wrong_commands(parser, tmp_path, monkeypatch):
    """Extraction (prompts, env prefixes, continuations, inline code, torchrun) and each check."""
    page = tmp_path / "docs" / "page.md"
    page.parent.mkdir()
    page.write_text(SAMPLE, encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    commands = collect_commands([page])
    found = {" ".join(c.argv[:2]): problems(parser, c) for c in commands}
    expected = {
        "trian --epochs": "no sub-command 'trian'",
        "train --epoch": "no option --epoch",                    # an abbreviation argparse would take
        "detect --data": "needs one of",
        "segment train": "argparse refuses it",                  # --head unet: not one of the choices
        "export rmt_tiny": "no option --no-such-flag",
    }
    for start, message in expected.items():
        assert any(message in p for p in found[start]), (start, found)
    good = [c for c in commands if c.tokens[:3] == ["python", "-m", "rmt"] or "..." in c.argv]
    assert len(good) == 2 and all(problems(parser, c) == [] for c in good)
    assert len(commands) == len(expected) + 2  # nothing taken from the Python block
    calls = collect_script_calls([page])
    assert [c[1:] for c in calls] == [("benchmarks/detection.py", ["--no-such-option"])]
    assert script_problems(*calls[0]) == [f"{calls[0][0]}: benchmarks/detection.py does not exist"]
    assert [ref for _, ref in collect_file_references([page])] == [
        "benchmarks/detection.py", "scripts/no_such_script.sh"]
