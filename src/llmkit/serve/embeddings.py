"""POST /v1/embeddings: mean-pooled, L2-normalised vectors of texts or token-id lists (float or base64)."""

from __future__ import annotations

import base64
import struct
from typing import Any

from fastapi import APIRouter, Depends

from llmkit.inference.embed import embed_texts, mean_pool_embeddings
from llmkit.serve.errors import APIError
from llmkit.serve.schemas import ERROR_RESPONSES, EmbeddingRequest
from llmkit.serve.server import Server, check_api_key, server_of

router = APIRouter(responses=ERROR_RESPONSES)
MAX_INPUTS = 2048


def _input_ids(srv: Server, body: EmbeddingRequest) -> tuple[list[str] | None, list[list[int]]]:
    """(texts or None for token-id input, token ids per input), checked against the context."""
    texts: list[str] | None = None
    if isinstance(body.input, str) or (body.input and isinstance(body.input[0], str)):
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        ids = [srv.tok.encode(t, add_special_tokens=True) for t in texts]
    else:
        ids = srv.prompt_ids(body.input, "input")
    for x in ids:
        if not x:
            raise APIError(400, "input holds an empty text; give at least one token", param="input")
        if len(x) > srv.block_size:
            raise APIError(400, f"an input has {len(x)} tokens but the model's context is {srv.block_size}; "
                                "shorten it", param="input", code="context_length_exceeded")
    if len(ids) > MAX_INPUTS:
        raise APIError(400, f"at most {MAX_INPUTS} inputs per request", param="input")
    return texts, ids


@router.post("/v1/embeddings", dependencies=[Depends(check_api_key)])
async def embeddings(body: EmbeddingRequest, srv: Server = Depends(server_of)) -> dict[str, Any]:
    srv.check_model(body.model)
    texts, ids = _input_ids(srv, body)

    def compute(part: list[list[int]]) -> list[list[float]]:
        if texts is not None:  # the same vectors as `llmkit embed` / `llmkit search`
            return embed_texts(srv.model, srv.tok, [texts[by_ids[tuple(x)]] for x in part]).tolist()
        return mean_pool_embeddings(srv.model, srv.tok, part)  # token-id input

    by_ids = {tuple(x): i for i, x in enumerate(ids)} if texts is not None else {}
    # counted against --max_concurrent; run on the engine thread (the model is not thread-safe) in bounded
    # batches, so decode steps of running generations go on between them
    with srv.admitted(len(ids)):
        vecs = await srv.in_batches(ids, compute)
    if body.dimensions is not None:
        vecs = [v[: body.dimensions] for v in vecs]
    n_tok = sum(len(x) for x in ids)
    srv.metrics.count_tokens(prompt=n_tok)
    data = []
    for i, v in enumerate(vecs):
        emb: Any = v
        if body.encoding_format == "base64":
            emb = base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return {"object": "list", "data": data, "model": srv.name,
            "usage": {"prompt_tokens": n_tok, "total_tokens": n_tok}}
