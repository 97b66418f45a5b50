"""Our attention launcher on the path Triton takes on a GPU, on a machine without one: a stand-in driver says it is an
H100 (sm_90) with as much shared memory per block as the argument gives (a real one has 227 KiB), the kernel is compiled
for it with Triton's own compiler, and the launch itself, which would start the kernel, records its grid and arguments
instead. Nothing is timed: do_bench is a stand-in that calls what it would time once and gives a fixed answer. Without
WINNER, flash_attention() runs alone and the 128x128 tile is the faster wherever it fits. Given WINNER (ours or sdpa),
the tensors pass for CUDA ones and go through attention(), SDPA is a stand-in too, counting its calls, and do_bench
says WINNER is the faster (our tiles all tie). Must run outside Triton's interpreter, so the tests start it as its own
process:

    MINICONTROL_CACHE=DIR [MINICONTROL_ATTENTION=...] python tests/launch_sm90.py SHARED_BYTES [WINNER]   # JSON report
"""
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton.testing
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.driver import CudaDriver
from triton.runtime.driver import driver

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import minicontrol.attention as attn  # noqa: E402
import minicontrol.tuning as tuning  # noqa: E402

launches = []
sdpa_runs = []


class Launcher:
    def __init__(self, src, metadata):
        self.shared = metadata.shared

    def __call__(self, grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata, enter_hook,
                 exit_hook, *args):
        launches.append(dict(grid=[grid_x, grid_y, grid_z], shared=self.shared,
                             ints=[a for a in args if type(a) is int]))


class Device:
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


class OnGPU(torch.Tensor):                           # CPU tensors that attention() takes for CUDA ones
    is_cuda = property(lambda self: True)


def sdpa(q, k, v):
    sdpa_runs.append(q.shape)
    return torch.zeros_like(q)


def big_tile_wins(fn, **kwargs):
    """do_bench for flash_attention() alone: what it would time runs once (the launch is recorded, or a tile needing
    more shared memory than the device has raises), and the 128x128 tile is the faster."""
    fn()
    return 1.0 if launches[-1]["ints"][-2:] == [128, 128] else 2.0


def through_attention(q, k, v, winner):
    """attention() twice on these tensors; what do_bench timed, and what ran outside it: kernel launches, SDPA calls."""
    timed = []

    def do_bench(fn, **kwargs):
        runs, launched = len(sdpa_runs), len(launches)
        fn()
        timed.append("sdpa" if len(sdpa_runs) > runs else launches[-1]["ints"][-2:])
        del sdpa_runs[runs:], launches[launched:]
        return 1.0 if (timed[-1] == "sdpa") == (winner == "sdpa") else 2.0
    triton.testing.do_bench = do_bench
    F.scaled_dot_product_attention = sdpa
    attn.has_tensor_core_code = lambda device: True
    q, k, v = (t.as_subclass(OnGPU) for t in (q, k, v))
    attn.attention(q, k, v)
    attn.attention(q, k, v)
    return dict(timed=timed, launches=launches, sdpa_runs=len(sdpa_runs))


if __name__ == "__main__":
    use_stand_in(int(sys.argv[1]))
    # SD1.5's widest heads at 64 tokens, laid out as the UNet passes them; fp16, so row strides of 8 * 160 elements
    q, k, v = (torch.randn(2, n, 8 * 160, dtype=torch.float16).view(2, n, 8, 160).transpose(1, 2) for n in (64, 77, 77))
    tuning.TILES = {160: [(64, 32, 4, 3, False), (128, 128, 8, 3, False)]}
    if len(sys.argv) > 2:
        print(json.dumps(through_attention(q, k, v, sys.argv[2])))
    else:
        triton.testing.do_bench = big_tile_wins
        first = tuning.flash_attention(q, k, v)
        timed = len(launches)
        again = tuning.flash_attention(q, k, v)
        print(json.dumps(dict(launches=launches, timed=timed, best=list(tuning.picks.values()),
                              same_layout=first.stride() == again.stride() == q.stride())))
