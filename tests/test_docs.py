"""Every ``nestvit`` command written in docs/ and in the recipes' headers is one the CLI accepts.

The README's commands run in tests/test_readme.py. The docs' commands are too long to run here (studies,
GPU recipes), so each is parsed instead: its flags by the real ``nestvit`` parser, a training recipe and
its ``--set`` keys by the config loader, a GAN recipe by the GAN config, model names by the registry.
Synopsis lines (``[--flag ...]``, ``A|B``, ``...``) are not commands and are left out; upper-case words
(RUN, DIR, IMAGE) stand for the user's own paths and are accepted as such.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from nestvit.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
RECIPES = sorted((ROOT / "src" / "nestvit" / "recipes").glob("*.yaml"))
SYNOPSIS = re.compile(r"\s\[|\||\.\.\.|<")  # an optional part, alternatives, "and so on", a <placeholder>


def _command(text: str) -> list[str] | None:
    """The argv after ``nestvit`` of one command line, or None when the line is not a nestvit command."""
    text = text.split("  #")[0].split(" # ")[0].strip().rstrip(")").strip()
    m = re.search(r"(?:^|\s|\(|`)(?:torchrun\s.*?-m nestvit(?:\.cli)?|nestvit)\s+(.*)$", text)
    if not m or SYNOPSIS.search(m.group(1)):
        return None
    return shlex.split(m.group(1))


def doc_commands() -> list[tuple[str, list[str]]]:
    """``(where, argv)`` of each whole nestvit command in a docs page's bash blocks and the recipes' headers."""
    out = []
    for page in DOCS:
        text = page.read_text(encoding="utf-8")
        shell = [code for lang, code in re.findall(r"^```(\w*)\n(.*?)^```\n", text, re.S | re.M)
                 if lang in ("", "bash", "sh")]
        indented = re.findall(r"^\n((?: {4}.*\S.*\n)+)", re.sub(r"^```.*?^```\n", "", text, flags=re.S | re.M),
                              re.M)
        for block in shell + indented:
            for line in block.replace("\\\n", " ").splitlines():
                if line.strip().startswith(("nestvit ", "torchrun ")) and (argv := _command(line)) is not None:
                    out.append((f"{page.name}: {line.strip()}", argv))
    for recipe in RECIPES:  # "# command: CMD   (comment)", "then: CMD", "(or: CMD)", "(N GPUs: CMD)", "#   --more"
        header = [line.lstrip("# ") for line in recipe.read_text(encoding="utf-8").splitlines()
                  if line.startswith("#")]
        for i, line in enumerate(header):
            for cmd in re.findall(r"(?:command:|then:|\(or:|GPUs:)\s*(.+?)(?=\s{3,}|\)|\s\(|$)", line):
                more = [c.split("   ")[0] for c in header[i + 1:i + 2] if c.startswith("--")]
                if (argv := _command(" ".join([cmd, *more]))) is not None:
                    out.append((f"{recipe.name}: {cmd}", argv))
    return out


def doc_mentions() -> list[tuple[str, list[str]]]:
    """``(where, argv)`` of each inline ``nestvit ...`` of the docs and README: a command named with some flags."""
    return [(f"{page.name}: `{span}`", argv) for page in [*DOCS, ROOT / "README.md"]
            for span in re.findall(r"`(nestvit [^`]+)`", page.read_text(encoding="utf-8"))
            if (argv := _command(span)) is not None]


PARSER = build_parser()  # argparse parsers are not changed by parsing: one serves every case
COMMANDS = doc_commands()
MENTIONS = doc_mentions()


def test_the_docs_have_commands():
    # the extraction itself: a change of format that silently finds nothing fails here
    pages = {where.split(":")[0] for where, _ in COMMANDS}
    assert len(COMMANDS) > 30 and len(MENTIONS) > 20
    assert {"training.md", "results.md", "generation.md", "interpretability.md", "finetune.yaml"} <= pages


def _placeholder(value: str) -> bool:
    return bool(re.fullmatch(r"[A-Z][A-Z_]*(?:/[\w.]+)?", value)) or value.endswith("=...")


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[w[:80] for w, _ in COMMANDS])
def test_doc_command_is_accepted(where, argv, capsys):
    try:
        args = PARSER.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}\nthe nestvit parser refuses it: {capsys.readouterr().err.strip()}")
    sets = [s for s in (getattr(args, "overrides", None) or []) if not _placeholder(s.split("=", 1)[-1])]
    if args.command == "train" and getattr(args, "recipe", None) and not args.list_keys:
        from nestvit.train.config import load_config, read_recipe

        load_config(read_recipe(args.recipe)[0], sets)
    elif args.command == "generate" and args.gen_command == "train" and getattr(args, "recipe", None):
        from nestvit.generate.train import apply_overrides, load_recipe

        apply_overrides(load_recipe(args.recipe), sets)
    elif args.command == "bench":
        from nestvit.registry import list_models

        unknown = [m for m in args.models if m not in list_models()]
        assert not unknown, f"{where}: not registered models: {unknown}"


def _subparser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser of the (sub-)command that ``argv`` names: ``nestvit generate train`` -> its own parser."""
    parser = PARSER
    for word in argv:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or word not in subs[0].choices:
            break
        parser = subs[0].choices[word]
    return parser


@pytest.mark.parametrize("where,argv", MENTIONS, ids=[w[:80] for w, _ in MENTIONS])
def test_doc_mention_names_real_flags(where, argv):
    known = set(_subparser(argv)._option_string_actions)
    unknown = [a.split("=")[0] for a in argv if a.startswith("-") and a.split("=")[0] not in known]
    assert not unknown, f"{where}: the command has no {unknown}"
