"""train.py under torchrun, with DDP's all-reduces counted: a communication hook on every DistributedDataParallel
records each gradient all-reduce (one call per bucket; bucket 0 once per synchronisation). Each rank writes its count
of synchronisations to $DDP_PROBE_OUT.<rank>.

    torchrun --nproc_per_node 2 tests/ddp_probe.py train.py ARGS...
"""
import os
import runpy
import sys

import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

syncs = []


class CountedDDP(torch.nn.parallel.DistributedDataParallel):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_comm_hook(None, counted)


def counted(state, bucket):
    if bucket.index() == 0:
        syncs.append(1)
    return allreduce_hook(state, bucket)


torch.nn.parallel.DistributedDataParallel = CountedDDP
script = sys.argv[1]
sys.argv = sys.argv[1:]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    with open(f"{os.environ['DDP_PROBE_OUT']}.{os.environ['RANK']}", "w") as f:
        f.write(str(len(syncs)))
