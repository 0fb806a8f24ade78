"""`llmkit` command line: each subcommand is a typed Python function; jsonargparse turns its signature into flags.

Conventions, the same for every command:
- the checkpoint (or file) a command works on is a positional argument (`llmkit generate CKPT`,
  `llmkit finetune classify INIT`); everything else is a `--flag` (keyword-only parameters);
- training data is `--data` and the folder written is `--out` everywhere; where a command's signature takes
  them positionally (`train seq2seq DATA OUT`, `convert from-hf SRC OUT`) the flag spelling works too;
- the model shape is `--preset` everywhere (`--preset_name` is kept as an alias), flags may be spelled with
  dashes (`--max-new-tokens`), and one-letter parameters take one dash (`-k`).
Commands are listed as "module:function" strings and imported only when run, so `llmkit generate` does
not pay for importing the server or transformers.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
from typing import Any

from llmkit.errors import LlmkitError

Entry = tuple[str, str]  # ("module:function", one-line summary)

COMMANDS: dict[str, Any] = {
    "demo": ("llmkit.demo:demo", "run the whole path on the embedded World English Bible corpus"),
    "clean": ("llmkit.data.clean:clean", "clean a raw text corpus (HTML, NFKC, whitespace, dedup, stemming, PII)"),
    "tokenizer": {
        "train": ("llmkit.data.prepare:train_tokenizer", "train a byte-level BPE / WordPiece / char tokenizer"),
    },
    "prepare": ("llmkit.data.prepare:prepare", "tokenize a corpus into train/val token shards"),
    "pretrain": ("llmkit.train.pretrain:pretrain", "pretrain a model (causal LM or masked LM) with exact resume"),
    "evaluate": ("llmkit.evaluate.evaluate:evaluate", "accuracy/P/R/F1 + confusion matrix, seqeval NER report, or perplexity"),
    "generate": ("llmkit.inference.generate:generate", "generate text (greedy, sampling, stop strings, streaming, batches)"),
    "serve": ("llmkit.serve.app:serve", "OpenAI-compatible HTTP server with continuous batching and a playground"),
    "bench": ("llmkit.bench.runner:bench", "measure training and decoding speed against reference implementations"),
    "train": {
        "seq2seq": ("llmkit.train.seq2seq:train_seq2seq", "train an encoder-decoder translator on parallel text; BLEU/chrF"),
    },
    "multimodal": {
        "train": {
            "clip": ("llmkit.train.multimodal:train_clip", "CLIP-style image-text model (ViT + text encoder, InfoNCE)"),
            "caption": ("llmkit.train.multimodal:train_caption", "image captioner (decoder cross-attending to patches)"),
        },
        "search": ("llmkit.train.multimodal:search", "rank images for a text, or captions for an image (CLIP)"),
        "caption": ("llmkit.train.multimodal:caption", "caption image files with a captioner checkpoint"),
    },
    "distill": ("llmkit.train.distill:distill", "knowledge distillation: a small student on a teacher's soft targets"),
    "app": {
        "summarize": ("llmkit.apps.summarize:summarize", "summarize texts with a decoder; ROUGE-1/2/L given references"),
        "translate": ("llmkit.apps.translate:translate", "translate with a seq2seq or decoder checkpoint; BLEU/chrF"),
        "qa": ("llmkit.apps.qa:qa", "answer questions about a context; SQuAD exact match and token F1"),
        "extract": ("llmkit.apps.extract:extract", "extract JSON fields from text (validated, retried); per-field F1"),
        "chat": ("llmkit.apps.chat:app_chat", "one chat turn (or a scripted conversation) with a decoder's template"),
    },
    "finetune": {
        "classify": ("llmkit.train.finetune.classify:classify", "fine-tune a text classifier ([CLS]/mean/last-token head)"),
        "ner": ("llmkit.train.finetune.ner:ner", "fine-tune token classification (BIO NER, first-sub-token labels)"),
        "multitask": ("llmkit.train.finetune.multitask:multitask", "one backbone, several heads, loss = sum of weighted task losses"),
        "sft": ("llmkit.train.finetune.sft:sft", "instruction-tune a decoder on chat JSONL (loss on responses; LoRA optional)"),
    },
    "quantize": ("llmkit.models.quantize:quantize", "int8 (per-channel) or int4 (grouped) weight-only quantized copy of a checkpoint"),
    "lora": {
        "merge": ("llmkit.models.lora:merge", "fold a LoRA adapter into its base checkpoint"),
    },
    "chat": ("llmkit.apps.chat:chat", "interactive terminal chat with a checkpoint or adapter (its chat template)"),
    "wordvec": {
        "train": ("llmkit.train.wordvec:wordvec_train", "train Word2Vec (CBOW / skip-gram) or FastText word vectors"),
        "similar": ("llmkit.train.wordvec:wordvec_similar", "nearest neighbours of a word, or an analogy a - b + c"),
    },
    "explain": {
        "attention": ("llmkit.explain.attention:explain_attention", "attention heatmap PNG + HTML page of all heads"),
        "tokens": ("llmkit.explain.tokens:explain_tokens", "per-token attribution (gradient x input, integrated gradients)"),
        "bias": ("llmkit.explain.bias:explain_bias", "minimal-pair log-prob skew with a bootstrap confidence interval"),
    },
    "convert": {
        "from-hf": ("llmkit.interop.commands:from_hf", "import a Hugging Face folder (GPT-2/Llama/BERT) or a GGUF file"),
        "to-hf": ("llmkit.interop.commands:to_hf", "export a checkpoint as a folder transformers/vLLM load"),
    },
    "export": {
        "onnx": ("llmkit.interop.commands:onnx", "export to ONNX (dynamic batch/sequence axes) for onnxruntime"),
        "torchscript": ("llmkit.interop.commands:torchscript", "export a traced TorchScript module (torch.jit.load)"),
    },
    "embed": ("llmkit.inference.embed:embed", "embed a text file (mean pooling + L2 norm) into a .npy search index"),
    "search": ("llmkit.inference.embed:search", "semantic search: rank an embedding index against a query"),
}


def _help_listing(prefix: list[str], group: dict[str, Any]) -> str:
    lines = [f"usage: llmkit {' '.join(prefix + ['COMMAND'])} [--help] ...", "", "commands:"]
    for name, entry in group.items():
        summary = entry[1] if isinstance(entry, tuple) else "(" + ", ".join(entry) + ")"
        lines.append(f"  {name:<14} {summary}")
    lines += ["", f"Run `llmkit {' '.join(prefix + ['COMMAND'])} --help` for a command's flags and examples."]
    if not prefix:
        lines.insert(0, "llmkit: the whole life of a language model on one machine.\n")
    return "\n".join(lines)


def _resolve(argv: list[str]) -> tuple[list[str], Entry | dict[str, Any], list[str]]:
    """Walk argv down the command tree; return (command path, entry or group, remaining args)."""
    node: Any = COMMANDS
    path: list[str] = []
    rest = list(argv)
    while isinstance(node, dict) and rest and not rest[0].startswith("-"):
        name = rest.pop(0)
        if name not in node:
            raise LlmkitError(f"unknown command {' '.join(path + [name])!r}; run `llmkit {' '.join(path)} --help`"
                              .replace("  ", " "))
        path.append(name)
        node = node[name]
    return path, node, rest


def _examples(fn: Any) -> str:
    doc = inspect.getdoc(fn) or ""
    if "Examples:" not in doc:
        return ""
    body = doc.split("Examples:", 1)[1]
    return "examples:\n" + "\n".join("  " + line.strip() for line in body.strip().splitlines() if line.strip())


ALIASES = {"preset_name": "preset", "preset": "preset_name", "output": "out", "out_dir": "out"}
POSITIONAL_FLAGS = ("data", "out", "src", "checkpoint")  # positional parameters that may also be given as flags


def _normalize_flags(fn: Any, args: list[str]) -> list[str]:
    """Accept `--max-new-tokens` for `--max_new_tokens`, `-k` for a one-letter parameter `k`, the aliases above,
    and `--data D --out O` for a command whose signature takes DATA and OUT positionally."""
    sig = inspect.signature(fn).parameters
    params = set(sig)
    out = []
    for a in args:
        if a.startswith("--"):
            name, eq, value = a[2:].partition("=")
            base = name.rstrip("+")
            key = base.replace("-", "_")
            if key not in params and ALIASES.get(key) in params:
                key = ALIASES[key]
            if key in params:
                a = "--" + key + name[len(base):] + eq + value
        elif len(a) == 2 and a[0] == "-" and a[1] in params:
            a = "-" + a
        out.append(a)
    positional = [n for n, p in sig.items() if p.default is inspect.Parameter.empty
                  and p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    return _flags_to_positionals(out, positional)


def _flags_to_positionals(args: list[str], positional: list[str]) -> list[str]:
    """Move `--data D` / `--out=O` of positional parameters into place: a leading run of them goes first, a
    trailing run last (so `--data D O` and `D --out O` both work)."""
    given: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(args):
        name, eq, value = args[i][2:].partition("=") if args[i].startswith("--") else ("", "", "")
        if name in positional and name in POSITIONAL_FLAGS:
            if not eq:
                if i + 1 >= len(args):
                    rest.append(args[i])
                    break
                value, i = args[i + 1], i + 1
            given[name] = value
        else:
            rest.append(args[i])
        i += 1
    if not given:
        return args
    head = []
    for n in positional:
        if n not in given:
            break
        head.append(given.pop(n))
    tail = []
    for n in reversed(positional):
        if n not in given:
            break
        tail.insert(0, given.pop(n))
    if given:  # a flag for a middle positional: leave it for the parser to report
        return args
    return head + rest + tail


def run_command(path: list[str], target: str, args: list[str]) -> Any:
    """Import the function behind a command and call it with flags parsed from its signature."""
    from jsonargparse import ArgumentParser, DefaultHelpFormatter

    class Formatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
        """Keep the examples' line breaks."""

    module, func = target.split(":")
    fn = getattr(importlib.import_module(module), func)
    parser = ArgumentParser(prog=f"llmkit {' '.join(path)}", description=(inspect.getdoc(fn) or "").split("\n\n")[0],
                            epilog=_examples(fn), formatter_class=Formatter)
    parser.add_function_arguments(fn, as_positional=True)
    args = _normalize_flags(fn, args)
    cfg = parser.parse_args(args)
    # jsonargparse 4.49 renamed instantiate_classes to instantiate (the old name warns on every command)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    kwargs = {k: v for k, v in vars(instantiate(cfg)).items() if k != "config"}
    return fn(**kwargs)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        path, node, rest = _resolve(argv)
        if isinstance(node, dict):
            print(_help_listing(path, node))
            return 0 if (not rest or rest[0] in ("-h", "--help")) and (path or not rest or rest[0] != "") else 2
        run_command(path, node[0], rest)
        return 0
    except LlmkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        print(f"error: {e.strerror or e}: {e.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `llmkit generate ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
