"""Chat templates in the conventions of the families jaxllm serves, rendered by jaxllm's Jinja path and by transformers'
`apply_chat_template` from the same tokenizer directory: the strings must be identical, and a template's own
`raise_exception` must fail both.

The templates are written here (not copied from model repositories) to exercise what those families' templates do:
  ChatML (Qwen2.5 / Qwen3)  tools listed in the system turn as JSON lines, assistant `tool_calls` rendered as
                            <tool_call> JSON, consecutive `tool` messages grouped into one user turn of
                            <tool_response> blocks (loop.previtem / loop.nextitem), Qwen3's reasoning: earlier turns'
                            `reasoning_content` dropped, the last assistant turn's kept in <think>, `enable_thinking`
                            (string slicing, `split`, `namespace` state over a reversed message list);
  Gemma 2 / 3               BOS, the system message folded into the first user turn, `assistant` shown as `model`,
                            strict user/model alternation (raise_exception otherwise), content as a string or a list
                            of typed parts (Gemma 3), `| trim`;
  Phi-3                     <|system|> / <|user|> / <|assistant|> turns closed by <|end|>, EOS when no generation
                            prompt is asked for.
"""

import pytest
import transformers

from jaxllm.chat_template import ChatTemplateError
from jaxllm.tokenizer import load_tokenizer
from tests.test_tokenizer import _write_tokenizer_json_dir

CHATML = """{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- "# Tools\\n\\nYou may call one or more functions.\\n<tools>" }}
{%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
{{- "\\n</tools>\\n\\nFor each call, return JSON inside <tool_call></tool_call> tags.<|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_query=messages|length - 1) %}
{%- for message in messages[::-1] %}
{%- set index = (messages|length - 1) - loop.index0 %}
{%- if message.role == 'user' and ns.last_query == messages|length - 1 %}{%- set ns.last_query = index %}{%- endif %}
{%- endfor %}
{%- for message in messages %}
{%- set content = message.content if message.content is string else '' %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{%- set reasoning = '' %}
{%- if message.reasoning_content is string %}{%- set reasoning = message.reasoning_content %}
{%- elif '</think>' in content %}
{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
{%- set content = content.split('</think>')[-1].lstrip('\\n') %}
{%- endif %}
{%- if loop.index0 > ns.last_query and reasoning %}
{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
{%- else %}
{{- '<|im_start|>assistant\\n' + content }}
{%- endif %}
{%- if message.tool_calls %}
{%- for tool_call in message.tool_calls %}
{%- if (loop.first and content) or not loop.first %}{{- '\\n' }}{%- endif %}
{%- set call = tool_call.function if tool_call.function else tool_call %}
{{- '<tool_call>\\n{"name": "' + call.name + '", "arguments": ' }}
{{- call.arguments if call.arguments is string else call.arguments | tojson }}
{{- '}\\n</tool_call>' }}
{%- endfor %}
{%- endif %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.first or loop.previtem.role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}
{%- if loop.last or loop.nextitem.role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}"""

GEMMA = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
{%- set first = messages[0]['content'] if messages[0]['content'] is string else messages[0]['content'][0]['text'] -%}
{%- set first = first + '\\n\\n' -%}
{%- set rest = messages[1:] -%}
{%- else -%}{%- set first = '' -%}{%- set rest = messages -%}
{%- endif -%}
{%- for message in rest -%}
{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
{{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
{%- endif -%}
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
{{ '<start_of_turn>' + role + '\\n' + (first if loop.first else '') }}
{%- if message['content'] is string -%}{{ message['content'] | trim }}
{%- else -%}
{%- for part in message['content'] -%}
{%- if part['type'] == 'text' -%}{{ part['text'] | trim }}
{%- else -%}{{ raise_exception("Unsupported content part: " + part['type']) }}{%- endif -%}
{%- endfor -%}
{%- endif -%}
{{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"""

PHI3 = """{% for message in messages %}{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + \
'<|end|>\\n' }}{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '<|end|>\\n' }}{% elif \
message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + '<|end|>\\n' }}{% endif %}{% endfor %}\
{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"""

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city — naïve",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
SYSTEM = {"role": "system", "content": "You are terse."}
MULTI_TURN = [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
              {"role": "user", "content": "  What is 2+2?\n"}]
TOOL_ROUND = [
    SYSTEM, {"role": "user", "content": "Weather in Paris and Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "9C"},
]
THINKING = [{"role": "user", "content": "a"},
            {"role": "assistant", "content": "<think>\nold reasoning\n</think>\n\nA1"},
            {"role": "user", "content": "b"},
            {"role": "assistant", "content": "A2", "reasoning_content": "new reasoning"}]
PARTS = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
         {"role": "user", "content": [{"type": "text", "text": " Describe "}, {"type": "text", "text": "this."}]}]

CASES = {  # template: [(messages, apply_chat_template kwargs)]
    "chatml": (CHATML, [(MULTI_TURN, {}), (MULTI_TURN, dict(tools=TOOLS)), (TOOL_ROUND, dict(tools=TOOLS)),
                        (THINKING, {}), (THINKING[:3], dict(enable_thinking=False)),
                        (MULTI_TURN[1:], dict(add_generation_prompt=False))]),
    "gemma": (GEMMA, [(MULTI_TURN, {}), (MULTI_TURN[1:], dict(add_generation_prompt=False)), (PARTS, {})]),
    "phi3": (PHI3, [(MULTI_TURN, {}), (MULTI_TURN, dict(add_generation_prompt=False))]),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def family(request, tmp_path_factory):
  template, conversations = CASES[request.param]
  path = tmp_path_factory.mktemp(request.param)
  _write_tokenizer_json_dir(path, {"chat_template": template})
  return load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(str(path)), conversations


def test_family_templates_render_as_transformers_does(family):
  ours, hf, conversations = family
  for messages, kwargs in conversations:
    kwargs = {"add_generation_prompt": True, **kwargs}
    want = hf.apply_chat_template(messages, tokenize=False, **kwargs)
    assert ours.apply_chat_template(messages, **kwargs) == want, (messages, kwargs)


def test_gemma_alternation_is_enforced_by_both(tmp_path):
  _write_tokenizer_json_dir(tmp_path, {"chat_template": GEMMA})
  ours, hf = load_tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  twice = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
  with pytest.raises(ChatTemplateError, match="roles must alternate"):
    ours.apply_chat_template(twice)
  with pytest.raises(Exception, match="roles must alternate"):
    hf.apply_chat_template(twice, tokenize=False, add_generation_prompt=True)
