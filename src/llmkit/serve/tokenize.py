"""POST /tokenize, POST /detokenize and GET /tokenizer_info in vLLM's shapes, which lm-evaluation-harness's
`local-completions` uses instead of downloading a Hugging Face tokenizer (its `tokenizer_backend=remote`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from llmkit.errors import LlmkitError
from llmkit.inference.chat_template import chat_stop_strings, encode_chat
from llmkit.serve.errors import APIError
from llmkit.serve.schemas import ERROR_RESPONSES, DetokenizeRequest, TokenizeChat, TokenizeText
from llmkit.serve.server import Server, check_api_key, server_of

router = APIRouter(responses=ERROR_RESPONSES)


@router.post("/tokenize", dependencies=[Depends(check_api_key)])
async def tokenize(body: TokenizeText | TokenizeChat, srv: Server = Depends(server_of)) -> dict[str, Any]:
    if isinstance(body, TokenizeChat):
        try:
            ids = encode_chat(srv.tok, [m.rendered() for m in body.messages], body.add_generation_prompt)
        except LlmkitError as e:
            raise APIError(400, str(e), param="messages") from None
    else:
        ids = srv.tok.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    return {"count": len(ids), "max_model_len": srv.block_size, "tokens": ids,
            "token_strs": [srv.token_str(t) for t in ids] if body.return_token_strs else None}


@router.post("/detokenize", dependencies=[Depends(check_api_key)])
async def detokenize(body: DetokenizeRequest, srv: Server = Depends(server_of)) -> dict[str, Any]:
    V = srv.tok.vocab_size
    if any(t >= V for t in body.tokens):
        raise APIError(400, f"tokens holds ids outside the vocabulary [0, {V})", param="tokens")
    return {"prompt": srv.tok.decode(body.tokens, skip_special_tokens=False)}


@router.get("/tokenizer_info", dependencies=[Depends(check_api_key)])
async def tokenizer_info(srv: Server = Depends(server_of)) -> dict[str, Any]:
    tok = srv.tok
    return {"tokenizer_class": "llmkit.Tokenizer", "vocab_size": tok.vocab_size, "model_max_length": srv.block_size,
            "eos_token": tok.specials.get("eos"), "bos_token": tok.specials.get("bos"),
            "pad_token": tok.specials.get("pad"), "unk_token": tok.specials.get("unk"),
            "chat_template": tok.chat_template, "stop_strings": chat_stop_strings(tok)}
