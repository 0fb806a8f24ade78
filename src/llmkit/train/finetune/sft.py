"""`llmkit finetune sft`: instruction tuning of a decoder on chat data, loss on the assistant's tokens only.

Each example is rendered with the tokenizer's chat template (`render_chat`) and cut into prompt and response
segments; prompt tokens get label -100 so only the responses are learned. Optional packing concatenates
examples into full-length rows (no padding; attention then crosses example boundaries, the usual trade).
With --lora_r > 0 only LoRA adapters train and OUT holds the adapter alone.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from llmkit.data.batching import shifted_pair
from llmkit.data.chat_data import Messages, load_chat_data
from llmkit.errors import LlmkitError
from llmkit.inference.chat_template import render_chat
from llmkit.io import atomic_file
from llmkit.models.checkpoint import load_training_state, save_checkpoint
from llmkit.models.config import ModelConfig
from llmkit.models.load import load_model
from llmkit.models.lora import DEFAULT_TARGETS, apply_lora, count_trainable, load_adapter, save_adapter
from llmkit.models.lora import merge as merge_cmd
from llmkit.tokenizer import Tokenizer
from llmkit.train.distributed import barrier, dist_info, init_distributed, rank_slice, weights_to_save
from llmkit.train.loop import TrainConfig, fit, override_names

Example = tuple[list[int], list[int]]  # (token ids, labels): labels[i] = ids[i] on response tokens, else -100


def chat_segments(tok: Tokenizer, messages: Messages) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, is_response) pieces whose concatenation is the whole text.

    A response piece is what the template adds for an assistant turn after its generation prompt
    (the content and the end-of-turn marker), so the model learns to answer and to stop.
    """
    full = render_chat(tok, messages, add_generation_prompt=False)
    segments: list[tuple[str, bool]] = []
    done = 0  # characters of `full` already assigned
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        through = render_chat(tok, messages[: i + 1], add_generation_prompt=False)
        if i:
            before = render_chat(tok, messages[:i], add_generation_prompt=True)
        else:  # an opening assistant turn: whatever the template puts before its content is prompt
            before = through[: through.rfind(m["content"])] if m["content"] else through
        if not (full.startswith(through) and through.startswith(before) and len(before) >= done):
            raise LlmkitError("the chat template does not render conversations prefix by prefix, so prompt and "
                              "response tokens cannot be told apart; use a ChatML-style template")
        if len(before) > done:
            segments.append((full[done:len(before)], False))
        segments.append((full[len(before):len(through)], True))
        done = len(through)
    if done < len(full):
        segments.append((full[done:], False))
    return segments


def encode_chat(tok: Tokenizer, messages: Messages) -> Example:
    """Token ids of the rendered conversation and labels with every prompt token set to -100."""
    ids: list[int] = []
    labels: list[int] = []
    for text, is_response in chat_segments(tok, messages):
        piece = tok.encode(text)
        ids += piece
        labels += piece if is_response else [-100] * len(piece)
    return ids, labels


def encode_examples(tok: Tokenizer, examples: list[Messages], max_len: int) -> tuple[list[Example], int]:
    """Encode and truncate to `max_len` tokens; drops examples left with no response token.

    Returns (examples, number truncated).
    """
    out, truncated = [], 0
    for m in examples:
        ids, labels = encode_chat(tok, m)
        if len(ids) > max_len:
            truncated += 1
            ids, labels = ids[:max_len], labels[:max_len]
        if any(lab != -100 for lab in labels[1:]):  # position 0 is never a target
            out.append((ids, labels))
    return out, truncated


def pack_examples(examples: list[Example], block_size: int) -> list[Example]:
    """Concatenate examples into one stream and cut rows of block_size+1 tokens (input + shifted target)."""
    ids = [t for e in examples for t in e[0]]
    labels = [t for e in examples for t in e[1]]
    rows = []
    for start in range(0, max(len(ids) - 1, 0), block_size):
        row_ids, row_labels = ids[start : start + block_size + 1], labels[start : start + block_size + 1]
        if len(row_ids) >= 2 and any(lab != -100 for lab in row_labels[1:]):
            rows.append((row_ids, row_labels))
    return rows


def collate(rows: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows into x (B, T) and targets y (B, T) = labels shifted left by one, padding = -100.

    Right padding needs no attention mask in a causal model: real tokens never see the pads after them.
    """
    x, y = shifted_pair([r[0] for r in rows], [r[1] for r in rows], pad_id)
    return {"x": x, "y": y}


class SFTTask:
    """Batches of chat examples for `fit`: a seeded shuffle per epoch, so batch (step, micro) is deterministic.

    Under torchrun the global batch is batch_size x world rows; each rank keeps its slice.
    """

    def __init__(self, train: list[Example], val: list[Example], batch_size: int, grad_accum: int, seed: int,
                 pad_id: int, device: str = "cpu", eval_batches: int = 20):
        if not train:
            raise LlmkitError("no training examples with a response left; check the data or raise --max_len")
        self.train, self.val = train, val
        self.batch, self.accum, self.seed, self.pad_id = batch_size, grad_accum, seed, pad_id
        self.device, self.eval_batches = device, eval_batches
        self.world = dist_info()[1]
        self._perm: tuple[int, list[int]] | None = None

    def _order(self, epoch: int) -> list[int]:
        if self._perm is None or self._perm[0] != epoch:
            order = list(range(len(self.train)))
            random.Random(self.seed * 100_003 + epoch).shuffle(order)
            self._perm = (epoch, order)
        return self._perm[1]

    def train_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        size = self.batch * self.world  # the global batch
        first = (step * self.accum + micro) * size
        n = len(self.train)
        rows = [self.train[self._order(g // n)[g % n]] for g in range(first, first + size)]
        full = collate(rows, self.pad_id)
        return {k: v.to(self.device) for k, v in rank_slice(full, (full["y"] != -100).sum(1)).items()}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(batch["x"], batch["y"]).loss

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Mean loss per response token over (up to eval_batches batches of) the validation examples."""
        rows = self.val[: self.eval_batches * self.batch]
        if not rows:
            return {}
        total, count, correct = 0.0, 0, 0
        for i in range(0, len(rows), self.batch):
            b = collate(rows[i : i + self.batch], self.pad_id)
            x, y = b["x"].to(self.device), b["y"].to(self.device)
            logits = model(x).logits.float()
            keep = y != -100
            total += float(nn.functional.cross_entropy(logits[keep], y[keep], reduction="sum"))
            correct += int((logits[keep].argmax(-1) == y[keep]).sum())
            count += int(keep.sum())
        loss = total / max(count, 1)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)), "val_token_acc": correct / max(count, 1)}

    def n_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["x"].numel())

    def state_dict(self) -> dict[str, Any]:
        return {}  # the data order is a function of (seed, step): nothing else to restore

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _split(examples: list[Messages], val_fraction: float, seed: int) -> tuple[list[Messages], list[Messages]]:
    if not 0 <= val_fraction < 1:
        raise LlmkitError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = int(round(len(examples) * val_fraction)) if len(examples) > 1 else 0
    val = [examples[i] for i in order[:n_val]]
    return [examples[i] for i in order[n_val:]], val


def _save_state(path: Path, state: dict[str, Any]) -> None:
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def sft(checkpoint: str, *, data: str, out: str, val_data: str | None = None, val_fraction: float = 0.05,
        system: str | None = None, max_examples: int | None = None, max_len: int | None = None, pack: bool = False,
        lora_r: int = 0, lora_alpha: float = 16.0, lora_targets: list[str] | None = None,
        lora_dropout: float = 0.0, merge: bool = False,
        max_steps: int = 200, batch_size: int = 8, grad_accum: int = 1, lr: float | None = None,
        min_lr: float | None = None, warmup_steps: int = 10, weight_decay: float = 0.0, grad_clip: float = 1.0,
        eval_every: int = 50, eval_batches: int = 10, save_every: int = 0, log_every: int = 10,
        stop_at: int = 0, seed: int = 1337, device: str = "cpu", resume: bool = False, resume_override: str = "",
        precision: Literal["fp32", "bf16"] = "fp32", grad_checkpointing: bool = False,
        fsdp: bool = False) -> list[dict[str, Any]]:
    """Instruction-tune a decoder checkpoint on chat data; only response tokens carry loss.

    Args:
        checkpoint: base decoder checkpoint folder (e.g. from `llmkit convert from-hf` or `llmkit pretrain`).
        data: JSONL file ({"messages": [...]} or {"prompt", "response"} per line), or a named set:
            chatterbot-en, chatterbot-zh, chatterbot (both; PyPI package chatterbot-corpus).
        out: output folder: a full checkpoint, or with --lora_r the adapter alone (+ tokenizer, metrics).
        val_data: validation JSONL; default holds out val_fraction of DATA.
        val_fraction: share of DATA held out for validation when no val_data is given.
        system: system prompt added to every example that has none (and remembered for `llmkit chat`).
        max_examples: use at most this many training examples (after the shuffle), for quick runs.
        max_len: longest example in tokens (longer ones are truncated); default block_size + 1.
        pack: concatenate examples into full block_size rows instead of padding each batch.
        lora_r: LoRA rank; 0 = full fine-tuning of every weight.
        lora_alpha: LoRA scale numerator (the update is alpha/r * B A).
        lora_targets: Linear module-name suffixes to adapt (default attn.qkv attn.proj); others: mlp.fc,
            mlp.gate, mlp.proj.
        lora_dropout: dropout on the LoRA input path.
        merge: with LoRA, also write OUT/merged, a plain checkpoint with the adapter folded in.
        max_steps: optimizer steps.
        batch_size: examples (or packed rows) per micro-batch.
        grad_accum: micro-batches per optimizer step.
        lr: peak learning rate (default 2e-4 with LoRA, 3e-5 for full fine-tuning).
        min_lr: final learning rate of the cosine decay (default lr/10).
        warmup_steps: linear warmup steps.
        weight_decay: AdamW decay on weight matrices.
        grad_clip: clip the global gradient norm to this (0 = off).
        eval_every: validate every N steps (and at the end).
        eval_batches: validation batches per evaluation.
        save_every: save every N steps (0 = only at the end).
        log_every: log the training loss every N steps.
        stop_at: stop at this step with a resumable save (continue later with --resume true).
        seed: seeds the split, the data order, dropout and LoRA initialisation.
        device: cpu or cuda.
        resume: continue from OUT's training_state.pt (the training settings must match the saved ones).
        resume_override: comma-separated settings allowed to differ on --resume (e.g. max_steps).
        precision: fp32, or bf16 (autocast; weights, gradients and optimizer state stay fp32).
        grad_checkpointing: recompute block activations in backward (less memory, more compute).
        fsdp: under torchrun, shard parameters, gradients and optimizer state (FSDP2; full fine-tuning only);
            resumable sharded state goes to OUT.shards/, one consolidated model.safetensors to OUT.

    Examples:
        llmkit finetune sft runs/smollm2 --data chatterbot-en --out runs/sft-lora --lora_r 8 --max_steps 60
        llmkit finetune sft runs/tiny --data chat.jsonl --out runs/tiny-sft --pack true --max_steps 300
        llmkit lora merge runs/smollm2 runs/sft-lora runs/sft-merged
        torchrun --nproc_per_node 2 -m llmkit finetune sft runs/tiny --data chat.jsonl --out runs/tiny-sft-ddp
    """
    rank, _, device = init_distributed(device)
    model, meta = load_model(out if resume and not lora_r else checkpoint, device)
    cfg = ModelConfig.from_dict(meta["model"])
    if cfg.arch != "decoder":
        raise LlmkitError(f"SFT needs a decoder checkpoint; {checkpoint} is a {cfg.arch} "
                          "(use `llmkit finetune classify` / `ner` for encoders)")
    if not (Path(checkpoint) / "tokenizer.json").exists():
        raise LlmkitError(f"{checkpoint} has no tokenizer.json; SFT needs the tokenizer the model was trained with")
    tok = Tokenizer.load(checkpoint)
    if lora_r < 0:
        raise LlmkitError(f"lora_r must be >= 0 (0 = full fine-tuning), got {lora_r}")
    if merge and not lora_r:
        raise LlmkitError("--merge only applies to LoRA training; add --lora_r 8 or drop --merge")

    examples = load_chat_data(data, system)
    if val_data:
        train_msgs, val_msgs = examples, load_chat_data(val_data, system)
    else:
        train_msgs, val_msgs = _split(examples, val_fraction, seed)
    if max_examples:
        train_msgs = train_msgs[:max_examples]
    max_len = min(max_len or cfg.block_size + 1, cfg.block_size + 1)
    train, n_trunc = encode_examples(tok, train_msgs, max_len)
    val, _ = encode_examples(tok, val_msgs, max_len)
    if pack:
        train = pack_examples(train, min(max_len, cfg.block_size + 1) - 1)
    n_resp = sum(sum(lab != -100 for lab in e[1][1:]) for e in train)
    print(f"{len(train_msgs):,} training conversations -> {len(train):,} rows ({'packed' if pack else 'padded'}), "
          f"{n_resp:,} response tokens; {len(val):,} validation examples; {n_trunc} truncated to {max_len} tokens")

    out_dir = Path(out)
    targets = list(lora_targets or DEFAULT_TARGETS)
    torch.manual_seed(seed)
    if lora_r:
        if resume:
            load_adapter(model, out_dir)
        else:
            apply_lora(model, lora_r, lora_alpha, targets, lora_dropout)
    n_train, n_all = count_trainable(model)
    print(f"training {n_train:,} of {n_all:,} parameters ({100 * n_train / n_all:.2f}%)"
          + (f"; LoRA r={lora_r} alpha={lora_alpha} on {', '.join(targets)}" if lora_r else ""))

    tcfg = TrainConfig(max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum,
                       lr=lr or (2e-4 if lora_r else 3e-5), min_lr=min_lr, warmup_steps=warmup_steps,
                       weight_decay=weight_decay, grad_clip=grad_clip, eval_every=eval_every,
                       eval_batches=eval_batches, save_every=save_every, log_every=log_every, stop_at=stop_at,
                       seed=seed, device=device, precision=precision, grad_checkpointing=grad_checkpointing,
                       fsdp=fsdp)
    task = SFTTask(train, val, batch_size, grad_accum, seed, tok.pad_id, device, eval_batches)
    state = None
    if resume and lora_r:
        if not (out_dir / "training_state.pt").exists():
            raise LlmkitError(f"{out_dir} has no training_state.pt to resume from; start a new run instead")
        state = torch.load(out_dir / "training_state.pt", map_location="cpu", weights_only=True)
    elif resume:
        state = load_training_state(out_dir)
    model.eval()
    before = task.evaluate(model) if val else {}
    if before and rank == 0:
        print(f"before training: val_loss {before['val_loss']:.4f} (response tokens)")
    run_meta = {"task": "sft", "base": str(checkpoint), "data": data, "system": system, "pack": pack,
                "val_before": before, "train": vars(tcfg)}
    if lora_r:
        run_meta["base_abs"] = str(Path(checkpoint).resolve())

    def save(kind: str, training_state: dict[str, Any]) -> None:
        if kind != "last":
            return
        if lora_r:
            out_dir.mkdir(parents=True, exist_ok=True)
            tok.save(out_dir)
            _save_state(out_dir / "training_state.pt", training_state)
            save_adapter(out_dir, model, run_meta)
        else:
            save_checkpoint(out_dir, weights_to_save(model, training_state), cfg, tok, run_meta, training_state)

    records = fit(model, task, tcfg, out_dir, save, resume_state=state, resume_override=override_names(resume_override))
    if rank != 0:  # rank 0 writes the summary and the merged copy
        barrier()
        return records
    after = next((r for r in reversed(records) if "val_loss" in r), None)
    if before and after:
        print(f"val_loss {before['val_loss']:.4f} -> {after['val_loss']:.4f} on response tokens")
    summary = {"val_before": before, "val_after": after, "n_train_rows": len(train), "n_val": len(val),
               "trainable_params": n_train, "all_params": n_all}
    (out_dir / "sft_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if lora_r and merge:
        merge_cmd(checkpoint, str(out_dir), str(out_dir / "merged"))
    barrier()
    return records
