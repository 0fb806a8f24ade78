"""Differentially private training (DP-SGD) for the one training loop, with opacus.

`DPTask` wraps any `Task` so that `train.loop.fit` trains with DP-SGD without knowing it: for every batch it
computes per-example gradients (opacus' per-sample gradient hooks, which support our Linear / Embedding /
LayerNorm / RMSNorm layers and tied embeddings), clips each example's gradient to norm C, sums them, adds
Gaussian noise N(0, sigma^2 C^2) and divides by the batch size. It returns a surrogate loss whose value is the
real loss and whose gradient is exactly that private gradient, so fit's backward / AdamW / clipping (all
post-processing, which keeps the guarantee) run unchanged. sigma is chosen by opacus' RDP accountant for the
target (epsilon, delta) over the planned number of steps.

Noise comes from the operating system's CSPRNG (os.urandom) by default, drawn the way opacus' secure_mode
draws it (the sum of 4 Gaussians / 2, against floating-point attacks on the sampler); opacus itself needs
torchcsprng for that, which does not build for current torch. Nothing about the noise is saved, so neither
the seed nor a checkpoint can regenerate it. `reproducible=True` (tests only) uses a seeded torch.Generator.

Caveats (also in docs/responsible.md): the accountant assumes Poisson sampling of examples with rate
batch_size / dataset_size, while llmkit tasks draw fixed-size batches; a "record" is one training sequence,
so a person whose text spans many sequences gets a weaker guarantee.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from llmkit.errors import LlmkitError


def noise_multiplier(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """sigma for DP-SGD so that `steps` steps at `sample_rate` cost (epsilon, delta) under RDP accounting."""
    from opacus.accountants.utils import get_noise_multiplier

    if epsilon <= 0:
        raise LlmkitError(f"--dp_epsilon must be positive, got {epsilon}")
    if not 0 < delta < 1:
        raise LlmkitError(f"--dp_delta must be in (0, 1), got {delta}; use about 1 / dataset size or less")
    if not 0 < sample_rate <= 1:
        raise LlmkitError(f"batch_size / dataset_size = {sample_rate:.3g} must be in (0, 1]; "
                          "is the dataset smaller than one batch?")
    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant="rdp"))


def epsilon_spent(sigma: float, sample_rate: float, steps: int, delta: float) -> float:
    """The epsilon that `steps` DP-SGD steps with noise sigma and sampling rate cost at this delta (RDP)."""
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(sigma, sample_rate, steps)]
    return float(acc.get_epsilon(delta))


def secure_normal(shape: tuple[int, ...], std: float) -> torch.Tensor:
    """N(0, std^2) samples (float32) from os.urandom: 4 Box-Muller Gaussians summed and halved (opacus'
    secure_mode recipe, so the low-order bits of one sample do not reveal it)."""
    n = math.prod(shape)
    bits = np.frombuffer(os.urandom(4 * n * 8), dtype=np.uint64).reshape(2, 2 * n)
    u = (bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53  # uniform on [0, 1) with 53 random bits
    r, theta = np.sqrt(-2.0 * np.log1p(-u[0])), 2.0 * np.pi * u[1]  # 1 - u in (0, 1]: log is finite
    z = np.concatenate([r * np.cos(theta), r * np.sin(theta)]).reshape(4, n)
    return torch.from_numpy((z.sum(0) / 2.0 * std).astype(np.float32)).reshape(shape)


class DPTask:
    """A Task whose loss gradient is the DP-SGD gradient (per-example clip + Gaussian noise) of the inner task."""

    def __init__(self, task: Any, model: nn.Module, *, epsilon: float, delta: float, batch_size: int,
                 dataset_size: int, steps: int, max_grad_norm: float = 1.0, seed: int = 0,
                 reproducible: bool = False):
        from opacus.grad_sample.grad_sample_module import GradSampleHooks

        if max_grad_norm <= 0:
            raise LlmkitError(f"--dp_max_grad_norm must be positive, got {max_grad_norm}")
        self.task, self.model = task, model
        self.C = max_grad_norm
        self.batch_size, self.delta = batch_size, delta
        self.sample_rate = batch_size / dataset_size
        self.sigma = noise_multiplier(epsilon, delta, self.sample_rate, steps)
        self.params = list(dict.fromkeys(p for p in model.parameters() if p.requires_grad))  # tied: once
        try:
            self.hooks = GradSampleHooks(model, batch_first=True, loss_reduction="mean", strict=False)
        except NotImplementedError as e:
            raise LlmkitError(f"opacus cannot compute per-example gradients for this model ({e}); "
                              "train without --dp_epsilon") from e
        self.hooks.disable_hooks()
        # secure by default; a seeded generator only when asked for (tests): it makes the noise regenerable
        self.gen = torch.Generator(device="cpu").manual_seed(seed) if reproducible else None
        self.steps_done = 0

    # -- the Task protocol ------------------------------------------------------------------------------
    def train_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        return self.task.train_batch(step, micro)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        out = dict(self.task.evaluate(model))
        out["dp_epsilon"] = self.epsilon()
        return out

    def n_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return self.task.n_tokens(batch)

    def state_dict(self) -> dict[str, Any]:
        state = {"task": self.task.state_dict(), "steps_done": self.steps_done}
        if self.gen is not None:  # reproducible mode only: secure noise leaves nothing to save
            state["noise_rng"] = self.gen.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.task.load_state_dict(state["task"])
        if self.gen is not None and "noise_rng" in state:
            self.gen.set_state(state["noise_rng"])
        self.steps_done = state["steps_done"]

    def noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        """N(0, sigma^2 C^2) of this shape: from the OS CSPRNG, or the seeded generator when reproducible."""
        std = self.sigma * self.C
        if self.gen is None:
            return secure_normal(shape, std)
        return torch.randn(shape, generator=self.gen) * std

    def epsilon(self) -> float:
        """Privacy spent so far (epsilon at self.delta)."""
        return epsilon_spent(self.sigma, self.sample_rate, max(self.steps_done, 1), self.delta)

    # -- DP-SGD -------------------------------------------------------------------------------------------
    def per_example_grads(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(loss, [per-example gradient (B, *p.shape) per parameter]) via opacus' hooks."""
        for p in self.params:
            p.grad_sample = None
            p.grad = None
        self.hooks.enable_hooks()
        try:
            with warnings.catch_warnings():  # "full backward hook is firing ... no inputs require gradients": expected
                warnings.simplefilter("ignore", UserWarning)
                loss = self.task.loss(self.model, batch)
                loss.backward()
        finally:
            self.hooks.disable_hooks()
        grads: list[torch.Tensor | None] = []
        for p in self.params:
            gs = getattr(p, "grad_sample", None)
            if gs is None and p.grad is not None:
                raise LlmkitError(f"opacus produced no per-example gradient for a parameter of shape {tuple(p.shape)}; "
                                  "this layer type is not supported for DP training")
            grads.append(gs)  # None: the parameter took no part in this loss (e.g. an unused MLM head)
            p.grad_sample = None
            p.grad = None
        return loss.detach(), grads

    def private_grads(self, grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """sum_i clip(g_i, C) + N(0, sigma^2 C^2), divided by the batch size (None stays None: unused)."""
        used = [g for g in grads if g is not None]
        B = used[0].size(0)
        norms = torch.sqrt(sum(g.reshape(B, -1).float().pow(2).sum(1) for g in used))  # (B,)
        scale = (self.C / (norms + 1e-6)).clamp(max=1.0)
        out: list[torch.Tensor | None] = []
        for g in grads:
            if g is None:
                out.append(None)
                continue
            summed = torch.einsum("b,b...->...", scale.to(g.dtype), g)
            noise = self.noise(tuple(summed.shape))
            out.append((summed + noise.to(summed.device, summed.dtype)) / self.batch_size)
        return out

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """A surrogate: value = the real loss, gradient w.r.t. the parameters = the private gradient."""
        loss, grads = self.per_example_grads(batch)
        priv = self.private_grads(grads)
        self.steps_done += 1
        dot = sum((p * g).sum() for p, g in zip(self.params, priv) if g is not None)
        return loss + dot - dot.detach()
