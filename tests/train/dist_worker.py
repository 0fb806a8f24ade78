"""Run a list of llmkit training calls inside one torchrun process group (used by test_ddp.py).

argv[1]: a JSON file [{"fn": "module:function", "args": [...], "kwargs": {...}}, ...], run in order.
A job with "kill_at_step": N makes rank 0 SIGKILL itself when the trainer is about to write its checkpoint
for step N (the sharded state of step N is already on disk): a crash at the worst moment, for resume tests.
"""

import importlib
import json
import os
import signal
import sys

import torch.distributed as dist

from llmkit.train.distributed import init_distributed


def _kill_at(module, step: int) -> None:
    real = module.save_checkpoint

    def save_checkpoint(folder, model, cfg, tok=None, meta=None, training_state=None, **kw):
        if training_state is not None and training_state["step"] == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(folder, model, cfg, tok, meta, training_state, **kw)

    module.save_checkpoint = save_checkpoint


if __name__ == "__main__":
    init_distributed("cpu")
    for job in json.loads(open(sys.argv[1], encoding="utf-8").read()):
        module_name, name = job["fn"].split(":")
        module = importlib.import_module(module_name)
        if "kill_at_step" in job:
            _kill_at(module, job["kill_at_step"])
        getattr(module, name)(*job.get("args", []), **job["kwargs"])
    dist.destroy_process_group()
