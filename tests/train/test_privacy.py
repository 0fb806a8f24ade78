"""DP-SGD through opacus: per-example gradients are exact, clipping/noise follow the formula, fit trains."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("opacus")
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook:UserWarning")

from llmkit.models.build import build_model  # noqa: E402
from llmkit.models.config import preset  # noqa: E402
from llmkit.train.privacy import DPTask, epsilon_spent, noise_multiplier  # noqa: E402


class LMTask:
    """Next-token prediction on sequences drawn from a fixed skewed unigram distribution (learnable fast)."""

    def __init__(self, V: int = 32, T: int = 12, B: int = 8):
        self.V, self.T, self.B = V, T, B
        self.probs = torch.softmax(torch.linspace(3, -3, V), 0)

    def _batch(self, seed: int, B: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        x = torch.multinomial(self.probs, B * (self.T + 1), replacement=True, generator=g).view(B, -1)
        return {"x": x[:, :-1], "y": x[:, 1:]}

    def train_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        return self._batch(1000 + step, self.B)

    def loss(self, model, batch):
        return model(batch["x"], batch["y"]).loss

    def evaluate(self, model) -> dict[str, float]:
        with torch.no_grad():
            return {"val_loss": float(self.loss(model, self._batch(0, 64)))}

    def state_dict(self):
        return {}

    def load_state_dict(self, d) -> None:
        pass

    def n_tokens(self, batch) -> int:
        return batch["x"].numel()


def _tiny(name: str):
    torch.manual_seed(0)
    return build_model(preset(name, vocab_size=32, block_size=16, n_layer=1, d_model=32, n_head=2))


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])  # tied embeddings + LayerNorm; RMSNorm + RoPE
def test_per_example_grads_match_one_at_a_time(name: str) -> None:
    model, task = _tiny(name), LMTask()
    dp = DPTask(task, model, epsilon=8.0, delta=1e-5, batch_size=8, dataset_size=1000, steps=10)
    batch = task.train_batch(0, 0)
    _, grads = dp.per_example_grads(batch)
    for i in range(3):
        model.zero_grad()
        task.loss(model, {k: v[i:i + 1] for k, v in batch.items()}).backward()
        for p, g in zip(dp.params, grads):
            torch.testing.assert_close(g[i], p.grad, atol=1e-5, rtol=1e-4)


def test_clipping_and_noise_follow_dp_sgd() -> None:
    model, task = _tiny("gpt2-tiny"), LMTask()
    dp = DPTask(task, model, epsilon=4.0, delta=1e-5, batch_size=8, dataset_size=1000, steps=10, max_grad_norm=0.05)
    _, grads = dp.per_example_grads(task.train_batch(0, 0))
    norms = torch.sqrt(sum(g.reshape(8, -1).pow(2).sum(1) for g in grads))
    assert float(norms.min()) > 0.05  # so clipping is active for every example
    sigma = dp.sigma
    dp.sigma = 0.0
    clean = dp.private_grads(grads)
    expected = [sum(g[i] * 0.05 / (norms[i] + 1e-6) for i in range(8)) / 8 for g in grads]
    for c, e in zip(clean, expected):
        torch.testing.assert_close(c, e, atol=1e-6, rtol=1e-4)
    dp.sigma = sigma
    noisy = dp.private_grads(grads)
    diff = torch.cat([(n - c).flatten() for n, c in zip(noisy, clean)])
    assert diff.std().item() == pytest.approx(sigma * 0.05 / 8, rel=0.05)  # N(0, sigma^2 C^2) / B


def test_noise_is_secure_by_default_and_seeded_only_when_asked() -> None:
    from scipy import stats

    from llmkit.train.privacy import secure_normal

    z = secure_normal((40000,), 2.0).double()
    assert stats.kstest(z.numpy() / 2.0, "norm").pvalue > 1e-3  # N(0, 2^2): 4 Gaussians summed / 2
    assert not torch.equal(secure_normal((8,), 1.0), secure_normal((8,), 1.0))

    def noise_of(**kw):
        model, task = _tiny("gpt2-tiny"), LMTask()
        dp = DPTask(task, model, epsilon=4.0, delta=1e-5, batch_size=8, dataset_size=1000, steps=10, seed=3, **kw)
        return dp, dp.noise((64,))

    (a, na), (_, nb) = noise_of(), noise_of()
    assert not torch.equal(na, nb) and "noise_rng" not in a.state_dict()  # same seed, different noise
    (r, ra), (_, rb) = noise_of(reproducible=True), noise_of(reproducible=True)
    assert torch.equal(ra, rb) and "noise_rng" in r.state_dict()


def test_accountant_round_trip() -> None:
    sigma = noise_multiplier(3.0, 1e-5, 0.01, 500)
    eps = epsilon_spent(sigma, 0.01, 500, 1e-5)
    assert 2.9 <= eps <= 3.0
    assert epsilon_spent(sigma, 0.01, 1000, 1e-5) > eps  # more steps cost more


def test_fit_trains_privately(tmp_path) -> None:
    from llmkit.train.loop import TrainConfig, fit

    model, task = _tiny("gpt2-tiny"), LMTask(B=16)
    start = task.evaluate(model)["val_loss"]
    steps = 30
    dp = DPTask(task, model, epsilon=8.0, delta=1e-5, batch_size=16, dataset_size=20000, steps=steps,
                max_grad_norm=1.0)
    cfg = TrainConfig(max_steps=steps, batch_size=16, lr=1e-2, warmup_steps=0, grad_clip=0.0, eval_every=0,
                      log_every=10, weight_decay=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        records = fit(model, dp, cfg, tmp_path, save=lambda kind, state: None, progress=False)
    finally:
        torch.set_num_threads(threads)
    final = [r for r in records if "val_loss" in r][-1]
    assert final["val_loss"] < start - 0.5, (start, final)  # unigram entropy is ~2.2 nats below ln(32)
    assert final["dp_epsilon"] <= 8.0 and math.isfinite(final["dp_epsilon"])
