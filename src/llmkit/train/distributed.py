"""What makes one training run out of N torchrun processes: the process group, each rank's slice of the
global batch, per-rank RNG state, and the DDP / FSDP2 wrapping of the model.

Every task draws the same *global* batch on every rank and keeps its own rows (`rank_slice`), so the data
order does not depend on the number of processes. The slice carries `loss_scale` = world · (targets in this
slice / targets in the global batch): a mean loss times it, averaged over ranks by DDP, is exactly the mean
over the global batch even when ranks hold different numbers of target tokens.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from llmkit.errors import LlmkitError


def dist_info() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when not launched by torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str) -> tuple[int, int, str]:
    """Join the process group torchrun set up (gloo on CPU, nccl on GPU); returns (rank, world, device)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, device
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return rank, world, device


def barrier() -> None:
    """Wait for every rank (no-op in one process): e.g. before others read what rank 0 wrote."""
    if dist_info()[1] > 1:
        dist.barrier()


def rank_slice(full: dict[str, torch.Tensor], weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """This rank's rows of a global batch (every tensor split along dim 0), plus `loss_scale`.

    weights: per-row loss weight (B,), e.g. the number of target tokens of each row; default 1 per row.
    In one process the batch is returned unchanged.
    """
    rank, world = dist_info()
    if world == 1:
        return full
    n = next(iter(full.values())).size(0)
    if n < world:
        raise LlmkitError(f"a global batch of {n} rows cannot be split over {world} processes; "
                          "raise --batch_size or use fewer processes")
    bounds = [n * r // world for r in range(world + 1)]
    lo, hi = bounds[rank], bounds[rank + 1]
    w = torch.ones(n) if weights is None else weights.float().cpu()
    total = float(w.sum())
    out = {k: v[lo:hi] for k, v in full.items()}
    out["loss_scale"] = torch.tensor(world * float(w[lo:hi].sum()) / max(total, 1e-12))
    return out


def gather_objects(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank; [obj] in one process."""
    rank, world = dist_info()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def rng_state() -> dict[str, Any]:
    """This process's RNG state (CPU and, when present, CUDA)."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if torch.cuda.is_available() and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"])


class TaskForward(nn.Module):
    """Runs `task.loss(model, batch)` as this module's forward, so DDP / FSDP see one forward per micro-batch
    even for tasks that call model methods other than forward (heads, seq2seq)."""

    def __init__(self, model: nn.Module, task: Any):
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = self.task.loss(self.model, batch)
        scale = batch.get("loss_scale")
        return loss if scale is None else loss * scale.to(loss.device)


def wrap_ddp(module: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    # heads, MLM layers or adapters may take no part in a given loss: let DDP find them each step
    return DistributedDataParallel(module, find_unused_parameters=True)


# ----------------------------------------------------------------------------------------------- FSDP2


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The repeated layers of a model (every member of an nn.ModuleList): the units to checkpoint / shard."""
    return [m for lst in model.modules() if isinstance(lst, nn.ModuleList) for m in lst]


def shard_model(model: nn.Module) -> None:
    """FSDP2: each block is one sharded unit (gathered for its forward / backward, then freed), the rest
    (embeddings, final norm, head) the root unit. Parameters, gradients and optimizer state are sharded."""
    from torch.distributed.fsdp import fully_shard

    blocks = blocks_of(model)
    if not blocks:
        raise LlmkitError(f"{type(model).__name__} has no repeated blocks to shard; train it without --fsdp")
    for b in blocks:
        fully_shard(b)
    fully_shard(model)


def sharded_dir(out_dir: Path) -> Path:
    """Where FSDP runs keep their sharded model + optimizer state for --resume: OUT.shards/step_N."""
    return out_dir.with_name(out_dir.name + ".shards")


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The consolidated (unsharded) state dict, on CPU, on rank 0 ({} elsewhere). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(out_dir: Path, step: int, model: nn.Module, opt: torch.optim.Optimizer) -> str:
    """Every rank writes its shards (torch.distributed.checkpoint) to OUT.shards/step_N; returns "step_N".

    Written to a temp name and renamed by rank 0 once all ranks are done, so a kill leaves the previous
    step's folder (which the previous training_state.pt points at) intact. Collective.
    """
    import shutil

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = sharded_dir(out_dir)
    name = f"step_{step:08d}"
    tmp, final = root / f".{name}.tmp", root / name
    if dist_info()[0] == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
    barrier()
    if dist_info()[0] == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    barrier()
    return name


def load_sharded(out_dir: Path, name: str, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Restore the sharded model + optimizer state saved by save_sharded (each rank reads its shards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = sharded_dir(out_dir) / name
    if not path.exists():
        raise LlmkitError(f"{path} (the sharded state this checkpoint was saved with) is missing; "
                          "--resume of an --fsdp run needs it")
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def prune_sharded(out_dir: Path, keep: str) -> None:
    """Drop the sharded states older than `keep` (rank 0, after the checkpoint pointing at `keep` is saved)."""
    import shutil

    for p in sharded_dir(out_dir).glob("step_*"):
        if p.name != keep:
            shutil.rmtree(p, ignore_errors=True)


class WeightsView(nn.Module):
    """A stand-in module whose state_dict is a given (consolidated) dict: what save_checkpoint writes."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.weights = weights

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return self.weights


def weights_to_save(model: nn.Module, training_state: dict[str, Any]) -> nn.Module:
    """The module a save callback should write: the consolidated FSDP weights when the loop gathered them."""
    weights = training_state.pop("weights", None)
    return model if weights is None else WeightsView(weights)
