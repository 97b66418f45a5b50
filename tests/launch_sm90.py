"""Our attention launcher on the path Triton takes on a GPU, on a machine without one: a stand-in driver says it is an
H100 (sm_90) with as much shared memory per block as the argument gives (a real one has 227 KiB), the kernel is compiled
for it with Triton's own compiler, and the launch itself, which would start the kernel, records its grid and arguments
instead. Triton's do_bench times those launches on the CPU clock, so which tile "wins" means nothing here; what is
checked is the way there. Must run outside Triton's interpreter, so the tests start it as its own process:

    MINICONTROL_CACHE=DIR python tests/launch_sm90.py SHARED_BYTES      # prints a JSON report
"""
import json
import os
import sys
import time

import torch
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.driver import CudaDriver
from triton.runtime.driver import driver

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import minicontrol.attention as attn  # noqa: E402

launches = []


class Launcher:
    def __init__(self, src, metadata):
        self.shared = metadata.shared

    def __call__(self, grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata, enter_hook,
                 exit_hook, *args):
        launches.append(dict(grid=[grid_x, grid_y, grid_z], shared=self.shared,
                             ints=[a for a in args if type(a) is int]))


class Event:
    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


class Device:
    Event = staticmethod(lambda enable_timing: Event())
    synchronize = staticmethod(lambda: None)


class Utils:
    def __init__(self, shared):
        self.shared = shared

    def load_binary(self, name, kernel, shared, device):
        return 1, 1, 128, 0, 1024                      # module, function, registers, spills, threads per block

    def get_device_properties(self, device):
        return {"max_shared_mem": self.shared, "multiprocessor_count": 132}


class StandInH100(CudaDriver):
    def __init__(self, shared):
        self.utils, self.launcher_cls = Utils(shared), Launcher

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_device_interface(self):
        return Device

    def get_empty_cache_for_benchmark(self):
        return torch.empty(1024, dtype=torch.int)


def use_stand_in(shared):
    """Triton's driver replaced by the stand-in, and torch told its name (part of the attention tile cache's key)."""
    driver.set_active(StandInH100(shared))
    torch.cuda.get_device_name = lambda device=None: "stand-in H100"


if __name__ == "__main__":
    use_stand_in(int(sys.argv[1]))
    # SD1.5's widest heads at 64 tokens, laid out as the UNet passes them; fp16, so row strides of 8 * 160 elements
    q, k, v = (torch.randn(2, n, 8 * 160, dtype=torch.float16).view(2, n, 8, 160).transpose(1, 2) for n in (64, 77, 77))
    attn.TILES = {160: [(64, 32, 4, 3, False), (128, 128, 8, 3, False)]}
    first = attn.flash_attention(q, k, v)
    timed = len(launches)
    again = attn.flash_attention(q, k, v)
    print(json.dumps(dict(launches=launches, timed=timed, best=list(attn.best_tiles.values()),
                          same_layout=first.stride() == again.stride() == q.stride())))
