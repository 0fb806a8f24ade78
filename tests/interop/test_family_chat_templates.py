"""Chat templates of the small-model families render through llmkit's `render_chat` exactly as transformers'
`apply_chat_template` renders them (same tokenizer folder, same conversations, tools where the format has
them). The templates are written here in each family's published prompt format (ChatML + <tool_call> for
Qwen2.5/Qwen3 with Qwen3's <think> blocks, <start_of_turn> for Gemma 2/3, [INST] + [AVAILABLE_TOOLS] for
Mistral, <|user|>/<|end|> for Phi-3) and use the Jinja constructs those files use: namespaces, loop
controls, `tojson`, `raise_exception`, reversed message scans and template variables (enable_thinking)."""

from __future__ import annotations

import json
import os

import pytest
from tokenizers import Tokenizer as HFTokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from llmkit.errors import LlmkitError  # noqa: E402
from llmkit.inference.chat_template import render_chat  # noqa: E402
from llmkit.interop.hf_tokenizer import tokenizer_from_folder  # noqa: E402

QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}
    {%- else %}{{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}{%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
        "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": "
        "<args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first)
          or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

QWEN3 = """{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not (message.content.startswith('<tool_response>')
          and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
    {{- "# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}{%- set reasoning_content = '' %}
        {%- if '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n'
                + content.lstrip('\\n') }}
        {%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}
                {{- '\\n<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' }}
                {%- if tool_call.arguments is string %}{{- tool_call.arguments }}
                {%- else %}{{- tool_call.arguments | tojson }}{%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}
"""

GEMMA = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}
{%- else -%}{%- set first_user_prefix = "" -%}{%- set loop_messages = messages -%}{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- set role = "model" if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim }}<end_of_turn>
{% endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}
"""

MISTRAL = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}{%- set loop_messages = messages[1:] %}
{%- else %}{%- set loop_messages = messages %}{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {{- '{"type": "function", "function": ' + (tool.function | tojson) + '}' }}
                {%- if not loop.last %}{{- ", " }}{%- else %}{{- "]" }}{%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
        {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}{{- "[INST] " + message["content"] + "[/INST]" }}{%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {{- '{"name": "' + tool_call.function.name + '", "arguments": ' + (tool_call.function.arguments | tojson)
                + ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}{{- ", " }}{%- else %}{{- "]" + eos_token }}{%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"] | trim + eos_token }}
    {%- elif message["role"] == "tool" %}
        {{- '[TOOL_RESULTS] {"content": ' + message.content | string + ', "call_id": "' + message.tool_call_id
            + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional "
                            "system message!") }}
    {%- endif %}
{%- endfor %}
"""

PHI3 = """{% for message in messages %}
{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}
{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}
{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}
{% endif %}
{% endfor %}
{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"""

TEMPLATES = {"qwen2.5": (QWEN25, "<|endoftext|>", None), "qwen3": (QWEN3, "<|im_end|>", None),
             "gemma": (GEMMA, "<eos>", "<bos>"), "mistral": (MISTRAL, "</s>", "<s>"), "phi3": (PHI3, "<|endoftext|>", "<s>")}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city, in °C",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "e.g. 北京"}},
                   "required": ["city"]}}}
CALL = {"id": "call0abcd", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
CONVERSATIONS = {
    "single": ([{"role": "user", "content": "What is the capital of France?"}], None),
    "system+multi-turn": ([{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello! How can I help?"},
                           {"role": "user", "content": "  北京是中国的首都吗? "}], None),
    "tools": ([{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": "", "tool_calls": [CALL]},
               {"role": "tool", "content": "{\"temp\": 21}", "tool_call_id": "call0abcd"},
               {"role": "assistant", "content": "It is 21 °C."}, {"role": "user", "content": "And tomorrow?"}],
              [WEATHER]),
    "thinking": ([{"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
                  {"role": "user", "content": "3+3?"}], None),
}
# which conversations each format supports (Gemma and Phi-3 have no tool format; thinking is Qwen3's)
SUPPORTED = {"qwen2.5": ["single", "system+multi-turn", "tools"],
             "qwen3": ["single", "system+multi-turn", "tools", "thinking"],
             "gemma": ["single", "system+multi-turn"], "mistral": ["single", "system+multi-turn", "tools"],
             "phi3": ["single", "system+multi-turn"]}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, bpe_tokenizer):
    """One HF tokenizer folder per family: tokenizer.json + tokenizer_config.json with the chat template."""
    out = {}
    for name, (template, eos, bos) in TEMPLATES.items():
        folder = tmp_path_factory.mktemp(name.replace(".", ""))
        tok = HFTokenizer.from_str(bpe_tokenizer.tok.to_str())
        tok.add_special_tokens([t for t in (bos, eos) if t])  # in a real folder they are in the vocabulary
        tok.save(str(folder / "tokenizer.json"))
        meta = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, "eos_token": eos,
                **({"bos_token": bos} if bos else {})}
        (folder / "tokenizer_config.json").write_text(json.dumps(meta))
        out[name] = folder
    return out


@pytest.mark.parametrize("family, conv", [(f, c) for f, cs in SUPPORTED.items() for c in cs])
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_renders_as_transformers(folders, family, conv, gen):
    messages, tools = CONVERSATIONS[conv]
    if not gen and messages[-1]["role"] != "assistant":
        messages = messages + [{"role": "assistant", "content": "Done."}]
    ours = tokenizer_from_folder(folders[family])
    ref = transformers.AutoTokenizer.from_pretrained(folders[family])
    want = ref.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=gen)
    assert render_chat(ours, messages, add_generation_prompt=gen, tools=tools) == want


@pytest.mark.parametrize("thinking", [True, False])
def test_template_variables_reach_the_template(folders, thinking):
    """Qwen3's enable_thinking switch: an empty <think> block when thinking is off."""
    messages = CONVERSATIONS["single"][0]
    ours = tokenizer_from_folder(folders["qwen3"])
    ref = transformers.AutoTokenizer.from_pretrained(folders["qwen3"])
    want = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=thinking)
    assert render_chat(ours, messages, enable_thinking=thinking) == want
    assert ("<think>\n\n</think>" in want) == (not thinking)


def test_template_exception_is_one_clear_error(folders):
    ours = tokenizer_from_folder(folders["gemma"])
    with pytest.raises(LlmkitError, match="roles must alternate"):
        render_chat(ours, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
