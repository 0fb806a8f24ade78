"""Run a list of llmkit training calls inside one torchrun process group (used by test_ddp.py).

argv[1]: a JSON file [{"fn": "module:function", "args": [...], "kwargs": {...}}, ...], run in order.
"""

import importlib
import json
import sys

import torch.distributed as dist

from llmkit.train.distributed import init_distributed

if __name__ == "__main__":
    init_distributed("cpu")
    for job in json.loads(open(sys.argv[1], encoding="utf-8").read()):
        module, name = job["fn"].split(":")
        getattr(importlib.import_module(module), name)(*job.get("args", []), **job["kwargs"])
    dist.destroy_process_group()
