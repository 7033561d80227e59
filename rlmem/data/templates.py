"""Prompt templates: task instructions, the model's chat template, the interoception tag.

``build_prompt(example, tokenizer)`` makes the text fed to the model:

1. the user message = the example's task statement (``example["prompt"]``) + the instruction of
   its task (Countdown: use each number once, think in ``<think>``, answer in ``<answer>``;
   math: reason step by step, answer in ``\\boxed{}``);
2. ``template="auto"`` applies the tokenizer's chat template with ``add_generation_prompt=True``
   when it has one (DeepSeek-R1-Distill's ends the prompt with ``<think>\\n``), else a plain
   ``User: ... Assistant:`` frame; ``"chat"`` requires a chat template; ``"plain"`` never uses it;
3. with ``eviction_rate`` (ε in (0, 1]), the interoception tag of docs/design.md section 1,
   ``<eviction_rate>{percent}%</eviction_rate>``, is appended at the very end of the prompt
   (``tag_position="end"``, the default: the last thing the model reads before generating), or
   at the end of the user message (``tag_position="user"``).
"""

from __future__ import annotations

from typing import Any

COUNTDOWN_INSTRUCTION = (
    "You can use basic arithmetic operations (+, -, *, /) and each number must be used exactly once. "
    "Show your work in <think> </think> tags. And return the final equation in <answer> </answer> tags, "
    "for example <answer> (1 + 2) / 3 </answer>."
)
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# passkey prompts (rlmem/data/passkey.py) carry their own question: no instruction is appended
INSTRUCTIONS = {"countdown": COUNTDOWN_INSTRUCTION, "math": MATH_INSTRUCTION, "passkey": ""}
PLAIN_FRAME = "User: {user}\nAssistant: <think>\n"


def format_percent(eviction_rate: float) -> str:
    """0.5 -> "50%", 0.125 -> "12.5%", 1 -> "100%"."""
    try:
        eps = float(eviction_rate)
    except (TypeError, ValueError):
        raise ValueError(f"eviction_rate must be a number in (0, 1] (got {eviction_rate!r})") from None
    if not (0.0 < eps <= 1.0):
        raise ValueError(f"eviction_rate must be in (0, 1] (got {eviction_rate!r})")
    return f"{round(eps * 100, 4):g}%"


def interoception_tag(eviction_rate: float) -> str:
    return f"<eviction_rate>{format_percent(eviction_rate)}</eviction_rate>"


def task_of(example: dict) -> str:
    task = example.get("task") or example.get("reward")
    if task in INSTRUCTIONS:
        return task
    if "numbers" in example and "target" in example:
        return "countdown"
    return "math"


def user_message(example: dict, instruction: str | None = None) -> str:
    if "prompt" not in example or not isinstance(example["prompt"], str):
        raise ValueError(f"example {example.get('id', '?')!r} has no text field 'prompt'")
    inst = INSTRUCTIONS[task_of(example)] if instruction is None else instruction
    return f"{example['prompt'].strip()} {inst}".strip() if inst else example["prompt"].strip()


def has_chat_template(tokenizer: Any) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def build_prompt(example: dict, tokenizer: Any = None, *, template: str = "auto",
                 eviction_rate: float | None = None, instruction: str | None = None,
                 system_prompt: str | None = None, tag_position: str = "end") -> str:
    """The prompt text for ``example`` (see the module docstring)."""
    if template not in ("auto", "chat", "plain"):
        raise ValueError(f"template must be 'auto', 'chat' or 'plain' (got {template!r})")
    if tag_position not in ("end", "user"):
        raise ValueError(f"tag_position must be 'end' or 'user' (got {tag_position!r})")
    tag = interoception_tag(eviction_rate) if eviction_rate is not None else ""
    user = user_message(example, instruction)
    if tag and tag_position == "user":
        user = f"{user}\n{tag}"
    use_chat = template == "chat" or (template == "auto" and has_chat_template(tokenizer))
    if use_chat:
        if not has_chat_template(tokenizer):
            raise ValueError("template='chat' but the tokenizer has no chat template")
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
                   [{"role": "user", "content": user}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = (f"{system_prompt}\n" if system_prompt else "") + PLAIN_FRAME.format(user=user)
    if tag and tag_position == "end":
        text = text + tag
    return text
