"""`llmkit pretrain`: causal LM (decoders, LSTM) or masked LM (encoders) on token shards, with exact resume.

Batches are random windows of the token stream drawn from a seeded generator whose state is the data
position, so a resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from llmkit.data.corpus import iter_documents
from llmkit.data.prepare import META, load_shards, prepare
from llmkit.errors import LlmkitError
from llmkit.models.build import build_model
from llmkit.models.checkpoint import load_training_state, save_checkpoint
from llmkit.models.config import PRESETS, ModelConfig, preset
from llmkit.models.heads import nsp_model
from llmkit.models.load import load_model
from llmkit.tokenizer import Tokenizer, train_from_iterator
from llmkit.train.distributed import barrier, dist_info, init_distributed, rank_slice, weights_to_save
from llmkit.train.loop import TrainConfig, fit, override_names
from llmkit.train.nsp import nsp_task


class LMTask:
    """Random windows of a token stream; causal LM (predict the next token) or masked LM (15 %, 80/10/10)."""

    def __init__(self, train: np.ndarray, val: np.ndarray, block_size: int, batch_size: int, seed: int,
                 objective: Literal["clm", "mlm"] = "clm", device: str = "cpu", eval_batches: int = 20,
                 mask_id: int | None = None, special_ids: list[int] | None = None, vocab_size: int = 0):
        for name, arr in (("train", train), ("validation", val)):
            if len(arr) <= block_size + 1:
                raise LlmkitError(f"the {name} split has {len(arr)} tokens, fewer than block_size+2={block_size + 2}; "
                                  "give more text or lower --block_size")
        if objective == "mlm" and mask_id is None:
            raise LlmkitError("masked LM needs a tokenizer with a [MASK] token; train one with --kind wordpiece")
        self.train, self.val = train, val
        self.block, self.batch, self.objective, self.device = block_size, batch_size, objective, device
        self.eval_batches, self.seed, self.mask_id, self.vocab_size = eval_batches, seed, mask_id, vocab_size
        self.special = torch.tensor(sorted(set(special_ids or [])), dtype=torch.long)
        self.rank, self.world = dist_info()
        self.gen = torch.Generator().manual_seed(seed)

    def _windows(self, data: np.ndarray, gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(data) - self.block - 1, (n,), generator=gen).tolist()
        x = torch.from_numpy(np.stack([data[i : i + self.block].astype(np.int64) for i in ix]))
        y = torch.from_numpy(np.stack([data[i + 1 : i + 1 + self.block].astype(np.int64) for i in ix]))
        return x, y

    def _mask(self, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT masking: pick 15 % of non-special tokens; of those 80 % -> [MASK], 10 % random, 10 % kept."""
        probs = torch.rand(x.shape, generator=gen)
        choose = probs < 0.15
        if len(self.special):
            choose &= ~torch.isin(x, self.special)
        labels = torch.where(choose, x, torch.full_like(x, -100))
        action = torch.rand(x.shape, generator=gen)
        random_tokens = torch.randint(self.vocab_size, x.shape, generator=gen)
        x = torch.where(choose & (action < 0.8), torch.full_like(x, self.mask_id), x)
        x = torch.where(choose & (action >= 0.8) & (action < 0.9), random_tokens, x)
        return x, labels

    def _batch(self, data: np.ndarray, gen: torch.Generator, n: int) -> dict[str, torch.Tensor]:
        x, y = self._windows(data, gen, n)
        if self.objective == "mlm":
            x, y = self._mask(x, gen)
        return {"x": x, "y": y}

    def train_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        # every process draws the same global batch and keeps its slice: the data order does not depend
        # on the number of processes, so 2 x batch B equals 1 x batch 2B
        full = self._batch(self.train, self.gen, self.batch * self.world)
        weights = (full["y"] != -100).sum(1) if self.objective == "mlm" else None  # masked tokens per row
        return {k: v.to(self.device) for k, v in rank_slice(full, weights).items()}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(batch["x"], batch["y"]).loss

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        gen = torch.Generator().manual_seed(self.seed + 1)  # the same validation windows every time
        losses = []
        for _ in range(self.eval_batches):
            b = self._batch(self.val, gen, self.batch)
            losses.append(float(model(b["x"].to(self.device), b["y"].to(self.device)).loss))
        val_loss = sum(losses) / len(losses)
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}

    def n_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["x"].numel()

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])


def _default_tokenizer_kind(cfg_arch: str, preset_name: str) -> Literal["bpe", "wordpiece", "char"]:
    if preset_name.startswith("char"):
        return "char"
    return "wordpiece" if cfg_arch == "encoder" else "bpe"


def _data_folder(data: str, out: Path, tokenizer: str | None, kind: str, vocab_size: int, rank: int) -> Path:
    """A prepared folder: `data` itself if already prepared, else tokenize it next to the output folder."""
    if (Path(data) / META).exists():
        return Path(data)
    folder = out.with_name(out.name + "_data")
    if rank == 0:
        if tokenizer is None:
            tok_dir = out.with_name(out.name + "_tokenizer")
            print(f"training a {kind} tokenizer on {data} ...")
            train_from_iterator(iter_documents(data), kind, vocab_size).save(tok_dir)  # type: ignore[arg-type]
            tokenizer = str(tok_dir)
        prepare(data=data, tokenizer=tokenizer, out=str(folder))
    barrier()
    return folder


def _check_same(saved: ModelConfig, wanted: ModelConfig) -> None:
    diffs = [f"{k}: checkpoint {v!r} vs requested {getattr(wanted, k)!r}"
             for k, v in saved.to_dict().items() if k != "extra" and getattr(wanted, k) != v]
    if diffs:
        raise LlmkitError("config/checkpoint mismatch on --resume (" + "; ".join(diffs[:3]) +
                          "); resume with the flags the run was started with")


def pretrain(*, data: str = "bible", out: str = "runs/pretrain", preset_name: str = "gpt2-tiny",
             model_config: str | None = None, tokenizer: str | None = None,
             objective: Literal["auto", "clm", "mlm", "mlm+nsp"] = "auto", vocab_size: int | None = None,
             block_size: int | None = None, n_layer: int | None = None, n_head: int | None = None,
             d_model: int | None = None, dropout: float | None = None,
             max_steps: int = 1000, batch_size: int = 12, grad_accum: int = 1, lr: float = 1e-3,
             min_lr: float | None = None, warmup_steps: int = 100, weight_decay: float = 0.1,
             beta2: float = 0.99, grad_clip: float = 1.0, eval_every: int = 250, eval_batches: int = 20,
             save_every: int = 0, log_every: int = 10, stop_at: int = 0, seed: int = 1337, device: str = "cpu",
             resume: bool = False, resume_override: str = "", precision: Literal["fp32", "bf16"] = "fp32",
             grad_checkpointing: bool = False, fsdp: bool = False, compile: bool = False) -> list[dict[str, Any]]:
    """Pretrain a model from a preset on a corpus; writes a checkpoint folder, metrics.jsonl and loss.png to OUT.

    Args:
        data: a prepared folder (`llmkit prepare`), or a corpus (`bible`, a text file, a folder of .txt files)
            that is tokenized first into OUT_data.
        out: checkpoint folder (model.safetensors, config.json, tokenizer.json, training_state.pt, metrics).
        preset_name: gpt2-tiny, gpt2-small, llama-tiny, bert-tiny, lstm-tiny, char-shakespeare, ...
        model_config: a JSON file of ModelConfig fields used instead of the preset.
        tokenizer: tokenizer folder for a raw corpus; default trains one suited to the preset.
        objective: clm (next token), mlm (masked LM) or mlm+nsp (masked LM + next-sentence prediction on
            sentence pairs from the raw corpus' documents); auto = mlm for encoders, clm otherwise.
        vocab_size: override the preset (also the size of a tokenizer trained here).
        block_size: override the context length.
        n_layer: override the number of layers.
        n_head: override the number of attention heads.
        d_model: override the model width.
        dropout: override the dropout rate.
        max_steps: optimizer steps (the cosine schedule ends here).
        batch_size: sequences per micro-batch per process.
        grad_accum: micro-batches accumulated per optimizer step.
        lr: peak learning rate after warmup.
        min_lr: final learning rate of the cosine decay (default lr/10).
        warmup_steps: linear warmup steps.
        weight_decay: AdamW decay on weight matrices (not norms, biases, embeddings).
        beta2: AdamW beta2.
        grad_clip: clip the global gradient norm to this (0 = off).
        eval_every: validate every N steps (and at the end).
        eval_batches: batches per validation.
        save_every: checkpoint every N steps (0 = only at the end).
        log_every: log loss and tokens/s every N steps.
        stop_at: stop early at this step with a resumable checkpoint (continue later with --resume).
        seed: seeds initialisation, batches and dropout.
        device: cpu or cuda.
        resume: continue exactly from OUT's training_state.pt (the training settings must match the saved ones).
        resume_override: comma-separated settings allowed to differ on --resume (e.g. max_steps,lr); a changed
            schedule continues from the saved step's learning rate, decaying to min_lr at the new max_steps.
        precision: fp32, or bf16 (autocast; weights, gradients and optimizer state stay fp32).
        grad_checkpointing: recompute block activations in backward (less memory, more compute).
        fsdp: under torchrun, shard parameters, gradients and optimizer state over the processes (FSDP2);
            resumable sharded state goes to OUT.shards/, one consolidated model.safetensors to OUT.
        compile: torch.compile the model (faster steps after a slow first one).

    Examples:
        llmkit pretrain --data bible --out runs/bible-gpt --preset_name gpt2-tiny --max_steps 1000
        llmkit pretrain --data shakespeare.txt --out runs/shakespeare --preset_name char-shakespeare --max_steps 2000
        llmkit pretrain --data bible --out runs/bible-gpt --preset_name gpt2-tiny --max_steps 2000 --resume true \\
            --resume_override max_steps
        llmkit pretrain --data bible --out runs/bert-nsp --preset_name bert-tiny --objective mlm+nsp --max_steps 1000
        torchrun --nproc_per_node 2 -m llmkit pretrain --data bible --out runs/ddp --batch_size 6
        torchrun --nproc_per_node 2 -m llmkit pretrain --data bible --out runs/fsdp --batch_size 6 --fsdp true
    """
    rank, world, device = init_distributed(device)
    out_dir = Path(out)
    state = load_training_state(out_dir) if resume else None  # fail fast, before any data work
    if model_config:
        try:
            base = ModelConfig.from_dict(json.loads(Path(model_config).read_text(encoding="utf-8")))
        except FileNotFoundError as e:
            raise LlmkitError(f"model config file {model_config} does not exist") from e
        except json.JSONDecodeError as e:
            raise LlmkitError(f"model config {model_config} is not valid JSON ({e.msg})") from e
        base_dict = base.to_dict()
    else:
        if preset_name not in PRESETS:
            raise LlmkitError(f"unknown preset {preset_name!r}; choose one of {', '.join(PRESETS)}")
        base_dict = preset(preset_name).to_dict()
    overrides = dict(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                     d_model=d_model, dropout=dropout)
    kind = _default_tokenizer_kind(base_dict["arch"], preset_name)
    # a character tokenizer keeps every character it sees: the preset's vocab_size is only a floor
    tok_vocab = vocab_size or (1 << 20 if kind == "char" else base_dict["vocab_size"])
    folder = _data_folder(data, out_dir, tokenizer, kind, tok_vocab, rank)
    train_ids, val_ids, meta = load_shards(folder)
    tok = Tokenizer.load(folder)
    cfg_dict = {**base_dict, **{k: v for k, v in overrides.items() if v is not None}}
    cfg_dict["vocab_size"] = tok.vocab_size  # the model's vocabulary is the tokenizer's
    if base_dict["n_kv_head"] == base_dict["n_head"] and n_head is not None:
        cfg_dict["n_kv_head"] = None
    for derived in ("head_dim", "d_ff"):
        if any(v is not None for v in overrides.values()) and not model_config:
            cfg_dict[derived] = PRESETS.get(preset_name, {}).get(derived)
    cfg_dict["pad_token_id"] = tok.pad_id
    cfg = ModelConfig.from_dict(cfg_dict)
    obj = ("mlm" if cfg.arch == "encoder" else "clm") if objective == "auto" else objective
    if obj == "mlm+nsp" and (Path(data) / META).exists():
        raise LlmkitError("mlm+nsp draws sentence pairs from documents; give the raw corpus (bible, a text file "
                          "or a folder of .txt files), not a prepared folder")
    if obj in ("mlm", "mlm+nsp") and cfg.arch != "encoder":
        raise LlmkitError(f"masked LM needs an encoder (bert-*) preset; {preset_name} is a {cfg.arch}")
    if obj == "clm" and cfg.arch not in ("decoder", "lstm"):
        raise LlmkitError(f"causal LM needs a decoder or lstm preset; {preset_name} is a {cfg.arch}")
    if cfg.arch == "seq2seq":
        raise LlmkitError("seq2seq models train on parallel text: use `llmkit train seq2seq`")

    tcfg = TrainConfig(max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr, min_lr=min_lr,
                       warmup_steps=warmup_steps, weight_decay=weight_decay, beta2=beta2, grad_clip=grad_clip,
                       eval_every=eval_every, eval_batches=eval_batches, save_every=save_every,
                       log_every=log_every, stop_at=stop_at, seed=seed, device=device, precision=precision,
                       grad_checkpointing=grad_checkpointing, fsdp=fsdp)
    if resume:
        model, saved_meta = load_model(out_dir, device)
        _check_same(ModelConfig.from_dict(saved_meta["model"]), cfg)
        model.train()
    else:
        torch.manual_seed(seed)
        model = build_model(cfg).to(device)
        model = nsp_model(model) if obj == "mlm+nsp" else model
    if rank == 0:
        print(f"{cfg.arch} model, {model.num_params():,} parameters, {obj} objective; "
              f"{meta['n_train']:,} train / {meta['n_val']:,} val tokens; "
              f"{tcfg.batch_size * tcfg.grad_accum * world * cfg.block_size:,} tokens per step")
    task = nsp_task(data, tok, cfg.block_size, batch_size, seed, device, eval_batches) if obj == "mlm+nsp" else \
        LMTask(train_ids, val_ids, cfg.block_size, batch_size, seed, obj, device, eval_batches,
               mask_id=tok.special_id("mask"),
               special_ids=[i for i in (tok.special_id(r) for r in tok.specials) if i is not None],
               vocab_size=cfg.vocab_size)
    run_model = torch.compile(model) if compile else model
    run_meta = {"task": obj if obj != "clm" else "causal_lm", "data": str(folder), "train": vars(tcfg)}
    if obj == "mlm+nsp":
        run_meta["heads"] = model.specs  # backbone + NSP head: loads as a task model

    def save(kind: str, training_state: dict[str, Any]) -> None:
        if kind == "last":
            save_checkpoint(out_dir, weights_to_save(model, training_state), cfg, tok, run_meta, training_state)

    return fit(run_model, task, tcfg, out_dir, save, resume_state=state, resume_override=override_names(resume_override))

