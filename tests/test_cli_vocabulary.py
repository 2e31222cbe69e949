"""One vocabulary: the same thing has the same flag name and default in every command."""

from __future__ import annotations

import argparse
from typing import Iterator

import pytest

from ncpipe.cli import build_parser

# dest -> the flag every command that has it spells it with first (older names may follow as aliases)
CANONICAL = {
    "refiner_steps": "--refiner-steps",
    "corrdiff_steps": "--corrdiff-steps",
    "corrdiff_bits": "--corrdiff-bits",
    "max_images": "--max-images",
    "device": "--device",
    "batch_size": "--batch-size",
}


def _commands(parser: argparse.ArgumentParser, prefix: str = "") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix}{name}", sub
                yield from _commands(sub, f"{prefix}{name} ")


COMMANDS = dict(_commands(build_parser()))


def _options(command: str) -> dict[str, argparse.Action]:
    return {action.dest: action for action in COMMANDS[command]._actions if action.option_strings}


@pytest.mark.parametrize("dest", sorted(CANONICAL))
def test_one_name_for_one_thing(dest):
    spelled = {command: options[dest].option_strings[0] for command in COMMANDS
               if dest in (options := _options(command))}
    assert spelled and set(spelled.values()) == {CANONICAL[dest]}, spelled


def test_the_old_names_still_parse():
    args = build_parser().parse_args(["decompress", "a", "-o", "b", "--steps", "2"])
    assert args.refiner_steps == 2


def test_device_defaults_to_auto_everywhere():
    defaults = {command: options["device"].default for command in COMMANDS
                if "device" in (options := _options(command))}
    assert {d for d in defaults.values() if d is not argparse.SUPPRESS} == {"auto"}, defaults
    assert "verify" in defaults and "decompress" in defaults


def test_job_commands_share_batch_size_and_allow_errors():
    for command in ("compress", "decompress", "recompress"):
        options = _options(command)
        assert options["batch_size"].default == 8 and options["batch_size"].help
        assert "allow_errors" in options


def test_no_synonyms_left_as_primary_names():
    """--steps means training steps only; sampler steps, coefficient bits and image limits have their own names."""
    primaries = {(command, action.option_strings[0]) for command in COMMANDS
                 for action in _options(command).values()}
    assert not {p for p in primaries if p[1] in ("--limit", "--bits")}
    assert {command for command, flag in primaries if flag == "--steps"} <= {
        command for command in COMMANDS if command.startswith("train ")}
