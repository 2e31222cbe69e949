"""`ncpipe --help` (and every `COMMAND --help`) answers without importing torch, CompressAI or Ray:
heavy imports happen inside the command handlers."""

import subprocess
import sys

import pytest

HEAVY = ("torch", "compressai", "ray")
PROBE = (
    "import sys\n"
    "from ncpipe.cli import build_parser\n"
    "parser = build_parser()\n"
    "for words in ({commands}):\n"
    "    try:\n"
    "        parser.parse_args([*words, '--help'])\n"
    "    except SystemExit:\n"
    "        pass\n"
    "print('imported:', ','.join(m for m in {heavy} if m in sys.modules))\n"
)


@pytest.mark.parametrize("commands", [[[]], [["compress"], ["decompress"], ["train", "codec"], ["evaluate"],
                                             ["train", "release"], ["run"], ["verify"]]])
def test_help_imports_no_heavy_module(commands):
    code = PROBE.format(commands=repr([list(c) for c in commands]), heavy=repr(HEAVY))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    last = result.stdout.strip().splitlines()[-1]
    assert last == "imported:", f"--help {last}"
