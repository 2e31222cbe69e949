"""How a codec worker runs its transforms on a CPU: channels-last g_a and g_s, and host memory kept
for reuse (ncpipe.allocator)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ncpipe.models.checkpoint import load_codec_model
from tests.factories import REPO_ROOT, kodak_pixels


def test_a_model_on_the_cpu_runs_channels_last_with_the_same_values(tiny_model_path):
    model = load_codec_model(tiny_model_path).to("cpu")
    adapter = model.adapter
    assert adapter.channels_last
    assert adapter.model.g_s[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.from_numpy(kodak_pixels(5, (96, 128))).permute(2, 0, 1)[None].float().div(255.0)
    with torch.inference_mode():
        y, z = adapter.analysis(x)
        x_hat = adapter.synthesis(torch.round(y))
        adapter.set_channels_last(False)
        y_plain, z_plain = adapter.analysis(x.contiguous())
        x_hat_plain = adapter.synthesis(torch.round(y))
    assert y.is_contiguous() and x_hat.is_contiguous()  # handed to numpy and fixed-point code as before
    assert (y - y_plain).abs().max() < 1e-4 and (z - z_plain).abs().max() < 1e-4
    assert (x_hat - x_hat_plain).abs().max() < 1e-4


_HEAP = """
import ctypes, ctypes.util, json, sys
import torch
from ncpipe.allocator import retain_freed_memory

class MallInfo2(ctypes.Structure):  # glibc >= 2.33
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "retain":
    assert retain_freed_memory()
before = libc.mallinfo2()
tensor = torch.ones(64 << 20, dtype=torch.uint8)  # a layer's output
held = libc.mallinfo2()
del tensor
freed = libc.mallinfo2()
print(json.dumps({"mapped_while_held": held.hblkhd - before.hblkhd, "heap_kept": freed.arena - before.arena}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_worker_keeps_large_blocks_in_its_heap_for_reuse():
    """A 64 MB tensor: by default glibc maps it on its own and unmaps it on free (the next one faults
    its pages in again); with the worker's setting it comes from the heap, which keeps it when freed."""
    def heap(mode: str) -> dict:
        done = subprocess.run([sys.executable, "-c", _HEAP, mode], cwd=REPO_ROOT, check=True,
                              capture_output=True, text=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    block = 64 << 20
    default, retained = heap("default"), heap("retain")
    assert default["mapped_while_held"] >= block and default["heap_kept"] < block, default
    assert retained["mapped_while_held"] == 0 and retained["heap_kept"] >= block, retained
