"""The CPU's bfloat16 instructions as the kernel reports them, and the allocator setting that keeps freed scratch
memory, counted in page faults by the kernel."""
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from minicontrol.cpu import native_bf16

ROOT = Path(__file__).resolve().parents[1]
x86_linux = pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64",
                               reason="reads Linux's /proc/cpuinfo flags and glibc's allocator")


@x86_linux
def test_native_bf16_follows_the_cpu_flags():
    flags = set()
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    assert native_bf16() == bool({"avx512_bf16", "amx_bf16"} & flags)


FAULTS = """
import resource, sys, torch
from minicontrol.cpu import keep_freed_memory
if sys.argv[1] == "keep":
    keep_freed_memory()
torch.set_num_threads(2)
conv = torch.nn.Conv2d(1280, 1280, 3, padding=1)    # SD's deepest convolutions: 59 MB of weights
x = torch.randn(2, 1280, 8, 8)                       # a 256x256 sample at batch 2
faults = []
with torch.no_grad():
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        conv(x)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(max(faults[3:]))                 # once the heap has grown to hold it (two calls)
"""


@x86_linux
def test_convolution_scratch_memory_is_kept_and_not_faulted_in_again():
    # oneDNN reorders the weights into fresh scratch memory at every call: without the setting glibc maps it anew each
    # time and the kernel faults in every 4 KiB page (59 MB: about 14,400); with it the heap's pages are reused
    counts = {}
    for mode in ("plain", "keep"):
        res = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, cwd=ROOT)
        assert res.returncode == 0, res.stderr
        counts[mode] = int(res.stdout.split()[-1])
    assert counts["plain"] > 10000 and counts["keep"] < 1000, counts
