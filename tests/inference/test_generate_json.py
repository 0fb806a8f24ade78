"""`llmkit generate --json_schema`: sampled outputs of a random model are JSON that validates (jsonschema)."""

from __future__ import annotations

import json

import jsonschema
import pytest

from llmkit.errors import LlmkitError
from llmkit.inference.generate import generate

SCHEMA = {"type": "object", "properties": {"book": {"enum": ["Genesis", "Exodus"]},
                                           "chapter": {"type": "integer", "minimum": 1, "maximum": 50}},
          "required": ["book", "chapter"], "additionalProperties": False}


def test_generate_json_schema_outputs_validate(tiny_ckpt, tmp_path, capsys):
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(SCHEMA))
    prompt = "A verse:"
    outs = generate(str(tiny_ckpt), prompt=prompt, max_new_tokens=30, temperature=1.0, seed=3, num_samples=3,
                    json_schema=str(path))
    capsys.readouterr()
    assert len(outs) == 3
    for o in outs:
        jsonschema.validate(json.loads(o[len(prompt):]), SCHEMA)
    with pytest.raises(LlmkitError, match="no such file"):
        generate(str(tiny_ckpt), prompt=prompt, json_schema=str(tmp_path / "missing.json"))
