"""The one training loop behind pretraining and every fine-tune: AdamW, warmup + cosine decay, gradient
clipping and accumulation, periodic validation, early stopping, checkpoints, exact resume, DDP / FSDP2,
bf16 autocast and gradient checkpointing.

What is trained on is a `Task` (batches, loss, evaluation, data-position state); the loop owns the rest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.distributed as dist
from torch import nn

from llmkit.errors import LlmkitError
from llmkit.io import atomic_file
from llmkit.train.distributed import (
    TaskForward,
    barrier,
    blocks_of,
    dist_info,
    full_weights,
    gather_objects,
    init_distributed,
    load_sharded,
    prune_sharded,
    rng_state,
    save_sharded,
    set_rng_state,
    shard_model,
    wrap_ddp,
)

__all__ = ["TrainConfig", "Task", "fit", "lr_at", "param_groups", "make_optimizer", "resume_config", "override_names",
           "dist_info", "init_distributed"]


@dataclass
class TrainConfig:
    """Optimisation settings shared by every training command."""

    max_steps: int = 1000  # optimizer steps
    batch_size: int = 12  # sequences per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak learning rate (after warmup)
    min_lr: float | None = None  # floor of the cosine decay; None -> lr / 10
    warmup_steps: int = 100  # linear warmup from 0 to lr
    weight_decay: float = 0.1  # on matrices only: never on norms, biases (or embeddings unless decay_embeddings)
    decay_embeddings: bool = False
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    eval_every: int = 250  # steps between validations (and at the last step); 0 = only at the end
    eval_batches: int = 20  # batches per validation
    save_every: int = 0  # steps between checkpoints; 0 = only at the end
    log_every: int = 10
    seed: int = 1337
    device: str = "cpu"
    stop_at: int = 0  # stop (saving a resumable checkpoint) at this step although the schedule runs to max_steps
    patience: int = 0  # early stopping: stop after this many validations without improvement (0 = off)
    metric: str = "val_loss"  # validation metric for early stopping / best checkpoint
    metric_mode: Literal["min", "max"] = "min"
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast matmuls, fp32 master weights and optimizer
    grad_checkpointing: bool = False  # recompute each block's activations in backward (less memory, ~30 % slower)
    fsdp: bool = False  # shard parameters, gradients and optimizer state over the ranks (FSDP2)
    # set by --resume_override of a schedule setting: the cosine restarts from (resume_step, resume_lr)
    resume_step: int = 0
    resume_lr: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum"):
            if getattr(self, name) <= 0:
                raise LlmkitError(f"{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise LlmkitError(f"lr must be positive, got {self.lr}")
        if self.precision not in ("fp32", "bf16"):
            raise LlmkitError(f"precision must be fp32 or bf16, got {self.precision!r}")


# settings that do not change what a step computes: free to differ on --resume
RESUME_FREE = frozenset({"stop_at", "log_every", "save_every", "eval_every", "eval_batches", "device",
                         "grad_checkpointing", "patience", "resume_step", "resume_lr"})
SCHEDULE = ("max_steps", "lr", "min_lr", "warmup_steps")


class Task(Protocol):
    """What to train on: deterministic batches, a loss, validation metrics and a resumable data position."""

    def train_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]: ...

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def evaluate(self, model: nn.Module) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def n_tokens(self, batch: dict[str, torch.Tensor]) -> int: ...


# ----------------------------------------------------------------------------------------------- optimisation


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to min_lr at max_steps.

    After a resume that changed the schedule (--resume_override max_steps, ...) past warmup, the cosine
    starts again from the learning rate the run had at the saved step (resume_lr at resume_step), so the
    rate never jumps: it decays from there to min_lr at the new max_steps.
    """
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    start, peak = cfg.warmup_steps, cfg.lr
    if cfg.resume_lr is not None and cfg.resume_step >= cfg.warmup_steps:
        start, peak = cfg.resume_step, cfg.resume_lr
    progress = min((step - start) / max(cfg.max_steps - start, 1), 1.0)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - min_lr)


def override_names(names: str | Sequence[str] | None) -> list[str]:
    """`max_steps,lr` (or a list) -> ["max_steps", "lr"]: the value of --resume_override."""
    parts = (names.split(",") if isinstance(names, str) else list(names)) if names else []
    return [p.strip() for p in parts if p.strip()]


def resume_config(saved: dict[str, Any], cfg: TrainConfig, step: int, override: Sequence[str] = ()
                  ) -> TrainConfig:
    """The config a resumed run continues with: refuse settings that differ from the checkpoint's unless
    `override` names them; a changed schedule continues from the saved step (see lr_at)."""
    known = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = [o for o in override if o not in known and o != "world_size"]
    if unknown:
        raise LlmkitError(f"--resume_override names unknown setting(s) {', '.join(unknown)}; "
                          f"choose from {', '.join(k for k in known if k not in RESUME_FREE)}, world_size")
    new = dataclasses.asdict(cfg)
    changed = [k for k in known if k in saved and k not in RESUME_FREE and saved[k] != new[k]]
    refused = [k for k in changed if k not in override]
    if refused:
        diff = ", ".join(f"{k} {saved[k]!r} -> {new[k]!r}" for k in refused)
        raise LlmkitError(f"--resume: training settings differ from the checkpoint's ({diff}); pass the saved "
                          f"values, or add --resume_override {','.join(refused)} to change them")
    anchor_step, anchor_lr = saved.get("resume_step", 0), saved.get("resume_lr")
    if any(k in changed for k in SCHEDULE):
        old = TrainConfig(**{k: v for k, v in saved.items() if k in known})
        anchor_step, anchor_lr = step, lr_at(step, old)
    return dataclasses.replace(cfg, resume_step=anchor_step, resume_lr=anchor_lr)


def param_groups(model: nn.Module, cfg: TrainConfig, params: Iterable[nn.Parameter] | None = None
                 ) -> list[dict[str, Any]]:
    """Split trainable parameters into decayed (matrices) and not decayed (norms, biases, embeddings)."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    allowed = None if params is None else {id(p) for p in params}
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen or (allowed is not None and id(p) not in allowed):
            continue
        seen.add(id(p))
        is_embedding = id(p) in embedding_ids
        if p.dim() >= 2 and (not is_embedding or cfg.decay_embeddings):
            decay.append(p)
        else:
            no_decay.append(p)
    if not decay and not no_decay:
        raise LlmkitError("no trainable parameters: everything is frozen")
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: TrainConfig, params: Iterable[nn.Parameter] | None = None
                   ) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg, params)
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
    except (RuntimeError, TypeError):  # fused kernels unavailable for this device/dtype
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


# ----------------------------------------------------------------------------------------------- logging


class MetricsLog:
    """Append-only metrics.jsonl plus a loss-curve PNG redrawn from it."""

    def __init__(self, out_dir: Path, enabled: bool):
        self.path = out_dir / "metrics.jsonl"
        self.png = out_dir / "loss.png"
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume, drop records past the checkpoint's step (written by a run that died later)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")

    def plot(self) -> None:
        if not self.enabled or not self.path.exists():
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train), label="train loss", linewidth=1)
        if val:
            ax.plot(*zip(*val), "o-", label="validation loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        with atomic_file(self.png) as tmp:
            fig.savefig(tmp, dpi=100)
        plt.close(fig)


# ----------------------------------------------------------------------------------------------- the loop


def _better(value: float, best: float | None, mode: str) -> bool:
    return best is None or (value < best if mode == "min" else value > best)


def autocast(cfg: TrainConfig) -> contextlib.AbstractContextManager:
    """bf16 autocast for matmuls (weights, optimizer and gradients stay fp32); nothing for fp32."""
    if cfg.precision != "bf16":
        return contextlib.nullcontext()
    kind = torch.device(cfg.device).type
    if kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise LlmkitError("this GPU has no bf16 support; use --precision fp32")
    return torch.autocast(device_type=kind, dtype=torch.bfloat16)


@contextlib.contextmanager
def grad_checkpointing(model: nn.Module, enabled: bool):
    """Recompute each block's activations during backward instead of keeping them (torch.utils.checkpoint).

    The blocks' forward is wrapped per instance, so parameter names and checkpoints are unchanged; dropout
    replays the same mask (checkpoint restores the RNG state). Undone when the context exits.
    """
    from torch.utils.checkpoint import checkpoint

    patched = []
    if enabled:
        blocks = blocks_of(model)
        if not blocks:
            raise LlmkitError(f"{type(model).__name__} has no repeated blocks to checkpoint; "
                              "drop --grad_checkpointing")
        for b in blocks:
            fwd = b.forward

            def run(*args: Any, _fwd: Callable = fwd, **kwargs: Any) -> Any:
                if not torch.is_grad_enabled():
                    return _fwd(*args, **kwargs)
                return checkpoint(_fwd, *args, use_reentrant=False, **kwargs)

            b.forward = run
            patched.append(b)
    try:
        yield
    finally:
        for b in patched:
            del b.forward  # back to the class's forward


def fit(model: nn.Module, task: Task, cfg: TrainConfig, out_dir: str | Path,
        save: Callable[[str, dict[str, Any]], None], resume_state: dict[str, Any] | None = None,
        params: Iterable[nn.Parameter] | None = None, progress: bool = True,
        resume_override: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Train `model` on `task` for cfg.max_steps optimizer steps; returns the metric records.

    save(kind, training_state) is called on rank 0 with kind "last" (every save_every steps and at the end,
    with the state needed to resume) and "best" (when the validation metric improves).
    resume_state: a state previously passed to save; restores optimizer, step, each rank's RNG and the data
    position, after checking that the training settings match (resume_override: the ones that may change).
    params: train only these (e.g. LoRA adapters); default every parameter with requires_grad.
    Under torchrun every rank runs fit: each trains on its slice of the global batch (see distributed.py),
    losses are averaged over ranks, validation runs on every rank (same metrics, same early stopping).
    """
    out_dir = Path(out_dir)
    rank, world = dist_info()
    is_main = rank == 0
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(out_dir, is_main)
    torch.manual_seed(cfg.seed + rank)  # dropout RNG, per process
    step, best, bad_evals, records = 0, None, 0, []
    if resume_state is not None:
        step = resume_state["step"]
        if "train_config" in resume_state:
            cfg = resume_config(resume_state["train_config"], cfg, step, resume_override)
    forward = TaskForward(model, task)
    if cfg.fsdp:  # shard first: the optimizer must see the sharded parameters
        if params is not None:
            raise LlmkitError("--fsdp trains every parameter; it does not combine with LoRA adapters")
        shard_model(model)
        run: nn.Module = forward
    else:
        run = wrap_ddp(forward) if world > 1 else forward
    opt = make_optimizer(model, cfg, params)
    if resume_state is not None:
        if bool(resume_state.get("train_config", {}).get("fsdp", False)) != cfg.fsdp:
            raise LlmkitError("--resume: the checkpoint was trained with a different --fsdp setting; resume with "
                              "the one it was started with")
        if cfg.fsdp:
            load_sharded(out_dir, resume_state["fsdp_state"], model, opt)
        else:
            opt.load_state_dict(resume_state["optimizer"])
        task.load_state_dict(resume_state["task"])
        _restore_rng(resume_state, rank, world, cfg.seed + step, resume_override)
        best, bad_evals = resume_state.get("best"), resume_state.get("bad_evals", 0)
        log.truncate_after(step)
        if step >= cfg.max_steps:
            raise LlmkitError(f"the checkpoint is already at step {step} >= max_steps {cfg.max_steps}; "
                              "raise --max_steps (with --resume_override max_steps) to train further")

    def state() -> dict[str, Any]:  # collective: every rank calls it, rank 0 gets everyone's RNG
        st = {"step": step, "optimizer": None, "task": task.state_dict(),
              "rng": gather_objects(rng_state()), "world_size": world,
              "best": best, "bad_evals": bad_evals, "train_config": dataclasses.asdict(cfg)}
        if cfg.fsdp:  # sharded state for resume beside OUT; consolidated weights for the checkpoint
            st["fsdp_state"] = save_sharded(out_dir, step, model, opt)
            st["weights"] = full_weights(model)
        else:
            st["optimizer"] = opt.state_dict()
        return st

    bar = None
    if progress and is_main:
        import sys

        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
                   mininterval=0.1 if sys.stderr.isatty() else 10.0)  # keep redirected logs short
    model.train()
    t_last, tokens_since, stop_early = time.perf_counter(), 0, False
    with grad_checkpointing(model, cfg.grad_checkpointing):
        while step < cfg.max_steps and not stop_early:
            lr = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            loss_sum = torch.zeros((), device=cfg.device)
            for micro in range(cfg.grad_accum):
                batch = task.train_batch(step, micro)
                tokens_since += task.n_tokens(batch) * world
                sync = world == 1 or micro == cfg.grad_accum - 1
                if cfg.fsdp:
                    model.set_requires_gradient_sync(sync)  # type: ignore[operator]
                with contextlib.nullcontext() if sync or cfg.fsdp else run.no_sync():
                    with autocast(cfg):
                        loss = run(batch) / cfg.grad_accum
                    loss.backward()
                loss_sum += loss.detach().float()
            grad_norm = None
            if cfg.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]],
                                                      cfg.grad_clip)
                grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: DTensor
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if world > 1:
                dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
            loss_val = float(loss_sum)
            if not math.isfinite(loss_val):
                raise LlmkitError(f"loss became {loss_val} at step {step}; lower --lr or raise --warmup_steps")
            if step % cfg.log_every == 0 or step == cfg.max_steps or step == 1:
                now = time.perf_counter()
                tok_s = tokens_since / max(now - t_last, 1e-9)
                t_last, tokens_since = now, 0
                rec = {"step": step, "loss": round(loss_val, 6), "lr": lr, "tokens_per_s": round(tok_s, 1)}
                if grad_norm is not None:
                    rec["grad_norm"] = round(grad_norm, 4)
                records.append(rec)
                log.write(rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_val:.4f}", tok_s=f"{tok_s:,.0f}", lr=f"{lr:.2e}")
            if bar is not None:
                bar.update(1)
            last = step == cfg.max_steps
            if (cfg.eval_every and step % cfg.eval_every == 0) or last:
                model.eval()
                with torch.no_grad(), autocast(cfg):
                    metrics = task.evaluate(model)
                model.train()
                rec = {"step": step, **{k: round(v, 6) for k, v in metrics.items()}}
                records.append(rec)
                log.write(rec)
                log.plot()
                if bar is not None:
                    bar.write(f"step {step:>6}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                if cfg.metric in metrics:
                    if _better(metrics[cfg.metric], best, cfg.metric_mode):
                        best, bad_evals = metrics[cfg.metric], 0
                        st = state()
                        if is_main:
                            save("best", st)
                    else:
                        bad_evals += 1
                        if cfg.patience and bad_evals >= cfg.patience:
                            stop_early = True
                            if bar is not None:
                                bar.write(f"early stopping: {cfg.metric} did not improve for {bad_evals} evaluations")
            if cfg.stop_at and step >= cfg.stop_at:
                stop_early = True
            if (cfg.save_every and step % cfg.save_every == 0) or last or stop_early:
                st = state()
                if is_main:
                    save("last", st)
                    if cfg.fsdp:
                        prune_sharded(out_dir, st["fsdp_state"])
    if bar is not None:
        bar.close()
    barrier()  # rank 0's checkpoint is complete before any rank goes on (e.g. to read it)
    return records


def _restore_rng(state: dict[str, Any], rank: int, world: int, reseed: int, override: Sequence[str]) -> None:
    """Give each rank back its own RNG state (dropout masks continue as in an uninterrupted run)."""
    if "rng" not in state:  # checkpoints written before per-rank RNG: one state, rank 0's
        set_rng_state({"cpu": state["rng_cpu"], "cuda": state.get("rng_cuda")})
        return
    saved_world = state.get("world_size", len(state["rng"]))
    if saved_world == world:
        set_rng_state(state["rng"][rank])
    elif "world_size" in override:
        torch.manual_seed(reseed + rank)  # a new process count: fresh, distinct dropout streams
    else:
        raise LlmkitError(f"--resume: the checkpoint was trained by {saved_world} process(es), this run has "
                          f"{world}; use {saved_world}, or add --resume_override world_size (dropout then "
                          "differs from an uninterrupted run)")
