"""`llmkit multimodal train clip|caption`, `llmkit multimodal search|caption`: image-text models on digits and shapes.

The images are scikit-learn's 1,797 handwritten digits (8x8, offline), split 80/20 by a seed. CLIP learns
from captions written with TRAIN_TEMPLATES and is scored zero-shot with HELD_OUT_TEMPLATES, whose wording it
never saw; the captioner writes CAPTION_TEMPLATES captions and is scored on held-out images. The captioner also learns
compositional captions of rendered shape scenes (`data/shapes.py`), scored on new scenes and on scenes with
colour-shape combinations it never saw.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any

import sacrebleu
import torch
from torch import nn

from llmkit.data.batching import pad_batch
from llmkit.data.images import digits_split, image_files, load_image
from llmkit.data.shapes import shapes_split
from llmkit.errors import LlmkitError
from llmkit.inference.beam import beam_search, greedy_decode
from llmkit.models.checkpoint import save_checkpoint
from llmkit.models.config import ModelConfig, preset
from llmkit.models.load import load_model
from llmkit.models.vision import CLIP, ImageCaptioner, VisionConfig, clip_loss
from llmkit.tokenizer import Tokenizer, train_from_iterator
from llmkit.train.loop import TrainConfig, fit

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TRAIN_TEMPLATES = ["a photo of the digit {w}", "a handwritten {n}", "the number {w}", "an image of a {n}",
                   "a scan of the digit {n}", "a drawing of a {w}", "{w}", "digit {n}", "the handwritten number {w}",
                   "a {n}", "an {w} written by hand", "the digit {n} in ink"]
HELD_OUT_TEMPLATES = ["a picture of the number {n}", "this is a handwritten {w}", "someone wrote {w} here",
                      "a small {n}"]
CAPTION_TEMPLATES = ["a handwritten digit {w}", "the number {w} written by hand"]
SHAPES_TEMPLATE = "a {size} {colour} {shape} {left of|above} a {size} {colour} {shape}"  # data/shapes.py: describe
RESULTS = "eval_results.json"


def fill(template: str, digit: int) -> str:
    return template.format(w=WORDS[digit], n=digit)


def digit_in(text: str) -> int | None:
    """The digit a caption names (a numeral or its English word), None if none or several."""
    found = {int(t) if t.isdigit() else WORDS.index(t) for t in re.findall(r"[a-z]+|\d", text.lower())
             if t.isdigit() or t in WORDS}
    return found.pop() if len(found) == 1 else None


def _data(data: str, seed: int, allowed: tuple[str, ...] = ("digits",)) -> dict[str, tuple[torch.Tensor, Any]]:
    if data not in allowed:
        raise LlmkitError(f"unknown image data {data!r}; choose {' or '.join(allowed)}")
    if data == "shapes":  # rendered two-shape scenes; "novel" holds out colour-shape combinations
        return shapes_split(seed=seed)
    return digits_split(0.2, seed)


def _tensors(tok: Tokenizer, texts: list[str], special: bool, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    b = pad_batch([tok.encode(t, add_special_tokens=special) for t in texts], tok.pad_id)
    return b["input_ids"].to(device), b["attention_mask"].to(device)


# ----------------------------------------------------------------------------------------------- CLIP


class CLIPTask:
    """Batches of `groups` contrastive groups, each one image of every digit with a caption from a random
    training template (so no group holds two positives for one caption); loss = mean InfoNCE of the groups."""

    def __init__(self, data: dict[str, tuple[torch.Tensor, torch.Tensor]], tok: Tokenizer, groups: int, seed: int,
                 device: str):
        self.images, self.labels = data["train"]
        self.test = data["test"]
        self.by_class = [torch.nonzero(self.labels == c).flatten() for c in range(10)]
        self.tok, self.groups, self.seed, self.device = tok, groups, seed, device
        self.gen = torch.Generator().manual_seed(seed)

    def train_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        idx, texts = [], []
        for _ in range(self.groups):
            for c in torch.randperm(10, generator=self.gen).tolist():
                pool_c = self.by_class[c]
                idx.append(int(pool_c[torch.randint(len(pool_c), (1,), generator=self.gen)]))
                texts.append(fill(TRAIN_TEMPLATES[int(torch.randint(len(TRAIN_TEMPLATES), (1,), generator=self.gen))], c))
        ids, mask = _tensors(self.tok, texts, True, self.device)
        return {"px": self.images[idx].to(self.device), "ids": ids, "mask": mask}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        img = model.encode_images(batch["px"]).view(self.groups, 10, -1)
        txt = model.encode_texts(batch["ids"], batch["mask"]).view(self.groups, 10, -1)
        return clip_loss(img, txt, model.logit_scale.clamp(max=math.log(100.0)))  # CLIP caps the scale at 100

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return evaluate_clip(model, self.tok, *self.test, self.device)

    def n_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["mask"].sum())

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])


@torch.no_grad()
def class_embeddings(model: CLIP, tok: Tokenizer, templates: list[str], device: str = "cpu") -> torch.Tensor:
    """(10, E): per digit, the normalised mean of its captions' embeddings over `templates` (prompt ensembling)."""
    texts = [fill(t, c) for c in range(10) for t in templates]
    emb = model.encode_texts(*_tensors(tok, texts, True, device)).view(10, len(templates), -1).mean(1)
    return torch.nn.functional.normalize(emb, dim=-1)


@torch.no_grad()
def evaluate_clip(model: CLIP, tok: Tokenizer, images: torch.Tensor, labels: torch.Tensor,
                  device: str = "cpu") -> dict[str, float]:
    """Zero-shot accuracy with held-out (and, for reference, training) templates; image->text recall@1/5 over
    the ten held-out class captions; text->image precision@1/5 of each held-out caption over the images."""
    model.eval()
    img = model.encode_images(images.to(device))  # (N, E)
    labels = labels.to(device)
    out: dict[str, float] = {}
    for name, templates in (("zero_shot_accuracy", HELD_OUT_TEMPLATES), ("train_template_accuracy", TRAIN_TEMPLATES)):
        out[name] = float(((img @ class_embeddings(model, tok, templates, device).T).argmax(-1) == labels).float().mean())
    sims = img @ class_embeddings(model, tok, HELD_OUT_TEMPLATES, device).T  # (N, 10)
    rank5 = sims.topk(5, dim=-1).indices
    out["i2t_recall@1"] = out["zero_shot_accuracy"]
    out["i2t_recall@5"] = float((rank5 == labels[:, None]).any(-1).float().mean())
    texts = [fill(t, c) for c in range(10) for t in HELD_OUT_TEMPLATES]
    txt = model.encode_texts(*_tensors(tok, texts, True, device))  # (10 * n_templates, E)
    want = torch.arange(10, device=device).repeat_interleave(len(HELD_OUT_TEMPLATES))
    top = (txt @ img.T).topk(5, dim=-1).indices  # (n_texts, 5) image indices
    hits = labels[top] == want[:, None]
    out["t2i_precision@1"] = float(hits[:, 0].float().mean())
    out["t2i_precision@5"] = float(hits.float().mean())
    return out


# ----------------------------------------------------------------------------------------------- captioning


class CaptionTask:
    """Random training images, each with one of its reference captions; teacher-forced next-token loss.

    data: {"train": (images, refs), <eval split>: (images, refs), ...}, refs a list of reference captions per
    image; every split but "train" is captioned at validation (metrics prefixed by the split's name unless
    it is "test"). digits: digit labels -> CAPTION_TEMPLATES references (and digit accuracy).
    """

    def __init__(self, data: dict[str, tuple[torch.Tensor, Any]], tok: Tokenizer, batch_size: int,
                 seed: int, device: str, beam: int = 1):
        self.images, self.refs = data["train"][0], _references(data["train"][1])
        self.evals = {k: v for k, v in data.items() if k != "train"}
        self.tok, self.batch, self.seed, self.device, self.beam = tok, batch_size, seed, device, beam
        self.bos, self.eos = tok.bos_id, tok.eos_id
        self.gen = torch.Generator().manual_seed(seed)

    def train_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        idx = torch.randint(len(self.images), (self.batch,), generator=self.gen)
        pick = torch.randint(1 << 30, (self.batch,), generator=self.gen).tolist()
        ids = [self.tok.encode(self.refs[i][p % len(self.refs[i])]) for p, i in zip(pick, idx.tolist())]
        b = pad_batch([[self.bos, *s] for s in ids], self.tok.pad_id, [[*s, self.eos] for s in ids])
        return {k: v.to(self.device) for k, v in
                {"px": self.images[idx], "tgt_in": b["input_ids"], "tgt_out": b["labels"]}.items()}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model.loss(batch["px"], batch["tgt_in"], batch["tgt_out"])

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        out = {}
        for name, (images, labels) in self.evals.items():
            scores = evaluate_captions(model, self.tok, images, labels, self.device, self.beam)[0]
            out.update({(k if name == "test" else f"{name}_{k}"): v for k, v in scores.items()})
        return out

    def n_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["tgt_out"] != -100).sum())

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])


def _references(labels: torch.Tensor | list[str]) -> list[list[str]]:
    """Reference captions per image: CAPTION_TEMPLATES filled with the digit, or the scene's one caption."""
    if isinstance(labels, torch.Tensor):
        return [[fill(t, y) for t in CAPTION_TEMPLATES] for y in labels.tolist()]
    return [[c] for c in labels]


@torch.no_grad()
def write_captions(model: ImageCaptioner, tok: Tokenizer, images: torch.Tensor, device: str = "cpu",
                   beam: int = 1, max_new_tokens: int = 16) -> list[str]:
    """Greedy (beam=1) or beam-search captions for (N, C, H, W) images."""
    model.eval()
    px = images.to(device)
    mask = model.memory_mask(px)
    bos, eos = tok.bos_id, tok.eos_id
    ids = (beam_search(model, px, mask, bos, eos, max_new_tokens, beam) if beam > 1
           else greedy_decode(model, px, mask, bos, eos, max_new_tokens))
    return [tok.decode(i).strip() for i in ids]


def evaluate_captions(model: ImageCaptioner, tok: Tokenizer, images: torch.Tensor, labels: torch.Tensor | list[str],
                      device: str = "cpu", beam: int = 1) -> tuple[dict[str, float], list[str]]:
    """Exact match with any reference and corpus BLEU against all references of each image; for digits also
    the digit accuracy (the caption names the right digit). labels: digits (N,) or one caption per image."""
    hyps = write_captions(model, tok, images, device, beam, max_new_tokens=24)
    refs = _references(labels)
    out = {}
    if isinstance(labels, torch.Tensor):
        out["digit_accuracy"] = sum(digit_in(h) == y for h, y in zip(hyps, labels.tolist())) / len(hyps)
    out["exact_match"] = sum(h in r for h, r in zip(hyps, refs)) / len(hyps)
    out["bleu"] = float(sacrebleu.corpus_bleu(hyps, [list(r) for r in zip(*refs)]).score)
    return out, hyps


# ----------------------------------------------------------------------------------------------- commands


def _fit_and_save(model: nn.Module, task: Any, tok: Tokenizer, out: str, steps: int, lr: float, eval_every: int,
                  seed: int, device: str, meta: dict[str, Any]) -> dict[str, Any]:
    """Train with the one loop, save the final model as a checkpoint folder, write eval_results.json."""
    tcfg = TrainConfig(max_steps=steps, batch_size=1, lr=lr, warmup_steps=min(100, steps // 10), weight_decay=0.05,
                       eval_every=eval_every, log_every=max(1, steps // 20), seed=seed, device=device)
    out_dir = Path(out)
    t0, c0 = time.perf_counter(), time.process_time()
    records = fit(model, task, tcfg, out_dir, lambda kind, state: None)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    save_checkpoint(out_dir, model, model.cfg, tok, meta={"multimodal": model.meta(), "train": vars(tcfg), **meta})
    final = {k: v for r in records if "loss" not in r for k, v in r.items()}
    res = {**final, "fit_seconds": round(wall, 1), "fit_cpu_seconds": round(cpu, 1),
           "threads": torch.get_num_threads(), "params": sum(p.numel() for p in model.parameters())}
    (out_dir / RESULTS).write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(res))
    return res


def train_clip(*, out: str, data: str = "digits", steps: int = 500, groups: int = 4, lr: float = 2e-3,
               d_model: int = 64, n_layer: int = 2, n_head: int = 4, d_embed: int = 64, patch_size: int = 2,
               eval_every: int = 500, seed: int = 0, device: str = "cpu") -> dict[str, Any]:
    """Train a CLIP-style image-text model (small ViT + text encoder, symmetric InfoNCE, learnable temperature).

    Evaluates zero-shot digit classification of held-out images with caption templates never seen in
    training, image->text recall@1/5 and text->image precision@1/5; writes the checkpoint and eval_results.json.

    Args:
        out: checkpoint folder (model.safetensors, config.json, tokenizer.json, eval_results.json).
        data: image-caption data; `digits` (scikit-learn's 8x8 handwritten digits, 80/20 split).
        steps: optimizer steps.
        groups: contrastive groups per batch (each: one image of every digit, so 10 x groups pairs).
        lr: peak learning rate.
        d_model: width of both towers.
        n_layer: Transformer blocks in each tower.
        n_head: attention heads.
        d_embed: size of the shared embedding space.
        patch_size: square patch side in pixels (8x8 images: 2 -> 16 patches).
        eval_every: evaluate every N steps (and at the end).
        seed: seeds the split, the initialisation and the batches.
        device: cpu or cuda.

    Examples:
        llmkit multimodal train clip --out runs/clip --steps 500
        llmkit multimodal search runs/clip --text "a picture of the number 7"
    """
    split = _data(data, seed)
    tok = train_from_iterator([fill(t, c) for t in TRAIN_TEMPLATES for c in range(10)] * 5, "wordpiece",
                              vocab_size=150, show_progress=False)
    torch.manual_seed(seed)
    text_cfg = preset("bert-tiny", vocab_size=tok.vocab_size, n_layer=n_layer, d_model=d_model, n_head=n_head,
                      block_size=32, pad_token_id=tok.pad_id)
    vis = VisionConfig(8, patch_size, 1)
    vision_cfg = ModelConfig(arch="encoder", vocab_size=1, block_size=vis.n_patches + 1, n_layer=n_layer,
                             n_head=n_head, d_model=d_model, prenorm=True, pos="none")
    model = CLIP(text_cfg, vision_cfg, vis, d_embed).to(device)
    task = CLIPTask(split, tok, groups, seed, device)
    return _fit_and_save(model, task, tok, out, steps, lr, eval_every, seed, device,
                         {"task": "clip", "data": data, "templates": {"train": TRAIN_TEMPLATES,
                                                                      "held_out": HELD_OUT_TEMPLATES}})


def train_caption(*, out: str, data: str = "digits", steps: int = 500, batch_size: int = 64, lr: float = 2e-3,
                  d_model: int = 64, n_layer: int = 2, n_head: int = 4, patch_size: int | None = None, beam: int = 1,
                  eval_every: int = 500, seed: int = 0, device: str = "cpu") -> dict[str, Any]:
    """Train an image captioner: a decoder that cross-attends to ViT patch embeddings and writes the caption.

    Evaluates greedy (or beam) captions of held-out images: exact match and BLEU (digits: also digit
    accuracy; shapes: also on scenes with colour-shape combinations never seen in training, `novel_*`).

    Args:
        out: checkpoint folder (model.safetensors, config.json, tokenizer.json, eval_results.json).
        data: `digits` (scikit-learn's 8x8 handwritten digits, 80/20 split, templated captions) or `shapes`
            (rendered 24x24 colour scenes of two shapes, "a small red circle left of a large blue square";
            6,000 training scenes, 500 test scenes, 500 novel-combination scenes).
        steps: optimizer steps.
        batch_size: images per batch.
        lr: peak learning rate.
        d_model: model width.
        n_layer: blocks in the image encoder and in the text decoder each.
        n_head: attention heads.
        patch_size: square patch side in pixels (default 2 for digits, 4 for shapes).
        beam: beam width for the evaluation captions (1 = greedy).
        eval_every: evaluate every N steps (and at the end).
        seed: seeds the split, the initialisation and the batches.
        device: cpu or cuda.

    Examples:
        llmkit multimodal train caption --out runs/caption --steps 500
        llmkit multimodal train caption --data shapes --out runs/shapes --steps 1500
        llmkit multimodal caption runs/caption --image digit.png --beam 4
    """
    split = _data(data, seed, ("digits", "shapes"))
    if data == "shapes":
        texts = split["train"][1][:2000]  # 400 asks for more merges than there are: every word becomes one token
        vis = VisionConfig(split["train"][0].size(-1), patch_size or 4, 3)
    else:
        texts = [fill(t, c) for t in CAPTION_TEMPLATES for c in range(10)] * 5
        vis = VisionConfig(8, patch_size or 2, 1)
    tok = train_from_iterator(texts, "bpe", vocab_size=400 if data == "shapes" else 300, show_progress=False)
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="seq2seq", vocab_size=tok.vocab_size, block_size=32, n_layer=n_layer, n_head=n_head,
                      d_model=d_model, prenorm=True, pos="learned", pad_token_id=tok.pad_id)
    model = ImageCaptioner(cfg, vis).to(device)
    task = CaptionTask(split, tok, batch_size, seed, device, beam)
    return _fit_and_save(model, task, tok, out, steps, lr, eval_every, seed, device,
                         {"task": "caption", "data": data,
                          "templates": CAPTION_TEMPLATES if data == "digits" else [SHAPES_TEMPLATE]})


def _load(checkpoint: str, kind: type) -> tuple[nn.Module, Tokenizer]:
    model, _ = load_model(checkpoint)
    if not isinstance(model, kind):
        raise LlmkitError(f"{checkpoint} is not a {kind.__name__} checkpoint; train one with "
                          f"`llmkit multimodal train {'clip' if kind is CLIP else 'caption'}`")
    return model, Tokenizer.load(checkpoint)


def _images(images: str, size: int, seed: int = 0, channels: int = 1) -> tuple[torch.Tensor, list[str]]:
    if images == "digits":  # the held-out split, named by index and true digit
        px, ys = digits_split(0.2, seed)["test"]
        return px, [f"digits-test[{i}] (a {y})" for i, y in enumerate(ys.tolist())]
    files = image_files(images)
    return torch.stack([load_image(f, size, channels) for f in files]), [str(f) for f in files]


def search(checkpoint: str, *, text: str | None = None, image: str | None = None, images: str = "digits",
           captions: str | None = None, top_k: int = 5) -> list[tuple[str, float]]:
    """Rank images for a text query, or captions for an image, with a CLIP checkpoint (cosine similarity).

    Args:
        checkpoint: a `multimodal train clip` checkpoint.
        text: the query; ranks the images of --images.
        image: a PNG/JPEG file; ranks --captions (default: every digit in the held-out templates).
        images: a folder of PNG/JPEG files (or one file), or `digits` (the held-out digits).
        captions: a text file with one candidate caption per line.
        top_k: how many results to print.

    Examples:
        llmkit multimodal search runs/clip --text "a picture of the number 7"
        llmkit multimodal search runs/clip --text "a small 3" --images my_scans/
        llmkit multimodal search runs/clip --image digit.png
    """
    if (text is None) == (image is None):
        raise LlmkitError("give exactly one of --text (rank images) or --image (rank captions)")
    model, tok = _load(checkpoint, CLIP)
    with torch.no_grad():
        if text is not None:
            px, names = _images(images, model.vis.image_size)
            scores = (model.encode_images(px) @ model.encode_texts(*_tensors(tok, [text], True, "cpu")).T)[:, 0]
        else:
            if captions is not None:
                names = [line.strip() for line in Path(captions).read_text(encoding="utf-8").splitlines() if line.strip()]
            else:
                names = [fill(t, c) for t in HELD_OUT_TEMPLATES for c in range(10)]
            if not names:
                raise LlmkitError(f"{captions} holds no captions (one per line)")
            px = load_image(image, model.vis.image_size)[None]
            scores = (model.encode_texts(*_tensors(tok, names, True, "cpu")) @ model.encode_images(px).T)[:, 0]
    order = scores.argsort(descending=True)[:top_k].tolist()
    ranked = [(names[i], float(scores[i])) for i in order]
    for name, s in ranked:
        print(f"{s:+.4f}  {name}")
    return ranked


def caption(checkpoint: str, *, image: str, beam: int = 1) -> list[str]:
    """Caption images (a PNG/JPEG file or a folder of them) with a `multimodal train caption` checkpoint.

    Args:
        checkpoint: a `multimodal train caption` checkpoint.
        image: a PNG/JPEG file, a folder of them, or `digits` (the held-out digits).
        beam: beam width (1 = greedy).

    Examples:
        llmkit multimodal caption runs/caption --image digit.png
        llmkit multimodal caption runs/caption --image scans/ --beam 4
    """
    model, tok = _load(checkpoint, ImageCaptioner)
    px, names = _images(image, model.vis.image_size, channels=model.vis.channels)
    caps = write_captions(model, tok, px, beam=beam)
    for name, c in zip(names, caps):
        print(f"{name}\t{c}")
    return caps
