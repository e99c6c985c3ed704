"""Tokenizers behind one small interface, plus a chat template with a thinking section.

Two implementations:

* `ByteTokenizer` — UTF-8 bytes (ids 0..255) plus a handful of special tokens; needs no files and
  fits the tiny/small model presets (vocab ≤ 512). Used for the procedural tasks.
* `HFTokenizer` — a local HF ``tokenizer.json`` loaded with the ``tokenizers`` library, for real
  checkpoints (Ling/Ring 2.0 ship one). Never downloads anything.

Both expose ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``, ``pad_id``,
``bos_id``, ``eos_id`` (the generation stop token: the end of the assistant turn) and
``apply_chat_template(prompt_text, thinking=True) -> str``.

Thinking convention (as in Ring-1T's long-CoT format, PAPER §5): with ``thinking=True`` the
assistant turn is opened with the think tag, so the policy writes ``reasoning</think>answer``;
with ``thinking=False`` the template writes an empty ``<think></think>`` and the policy writes the
answer only. `ring_jax.data.tasks.base.split_thinking` undoes this on the response side.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Protocol, Sequence, runtime_checkable

from ring_jax.config import check, check_one_of


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """String pieces of a single-turn chat prompt. ``{prompt}`` is filled with the user text."""
    user_turn: str = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    think_open: str = "<think>"
    think_close: str = "</think>"

    def __post_init__(self):
        check("{prompt}" in self.user_turn, "user_turn", self.user_turn,
              "must contain the placeholder '{prompt}'")
        check(bool(self.think_open) and bool(self.think_close), "think_open/think_close",
              (self.think_open, self.think_close), "must both be non-empty")

    def render(self, prompt_text: str, thinking: bool = True) -> str:
        head = self.user_turn.replace("{prompt}", prompt_text)
        if thinking:
            return head + self.think_open
        return head + self.think_open + self.think_close


CHAT_TEMPLATES = {
    # ChatML-style turns (Qwen, Ring/Ling community templates) with <think> tags.
    "chatml": ChatTemplate(),
    # Bare template for tiny procedural runs: the prompt is followed directly by the think tag,
    # which keeps prompts short for ~1M-parameter models.
    "bare": ChatTemplate(user_turn="{prompt}\n"),
}


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def apply_chat_template(self, prompt_text: str, thinking: bool = True) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; special tokens follow from 256 and are matched in the text.

    ``encode`` turns every occurrence of a special string (e.g. ``</think>``) into its single id,
    so a rendered chat template and a model's response round-trip through ``decode``.
    """

    SPECIALS = ("<|pad|>", "<|bos|>", "<|im_end|>", "<|im_start|>", "<think>", "</think>")

    def __init__(self, template: str | ChatTemplate = "chatml"):
        if isinstance(template, str):
            check_one_of("template", template, tuple(CHAT_TEMPLATES))
            template = CHAT_TEMPLATES[template]
        self.template = template
        self._special_to_id = {s: 256 + i for i, s in enumerate(self.SPECIALS)}
        self._id_to_special = {i: s for s, i in self._special_to_id.items()}
        self._special_re = re.compile("(" + "|".join(map(re.escape, self.SPECIALS)) + ")")
        self.vocab_size = 256 + len(self.SPECIALS)
        self.pad_id = self._special_to_id["<|pad|>"]
        self.bos_id = self._special_to_id["<|bos|>"]
        self.eos_id = self._special_to_id["<|im_end|>"]

    def token_to_id(self, token: str) -> int | None:
        return self._special_to_id.get(token)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self._special_re.split(text):
            if piece in self._special_to_id:
                ids.append(self._special_to_id[piece])
            elif piece:
                ids.extend(piece.encode("utf-8"))
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        out: list[str] = []
        buf = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                buf.append(i)
                continue
            # Flush bytes before a special so a split multi-byte char is replaced, not merged.
            out.append(buf.decode("utf-8", errors="replace"))
            buf.clear()
            special = self._id_to_special.get(i)
            if special is not None and not skip_special:
                out.append(special)
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def apply_chat_template(self, prompt_text: str, thinking: bool = True) -> str:
        return self.template.render(prompt_text, thinking)


class HFTokenizer:
    """A local HF ``tokenizer.json`` (``tokenizers`` library), e.g. a Ling/Ring 2.0 checkpoint's.

    Special tokens are looked up by their strings; ``bos_token`` may be absent (then ``bos_id``
    falls back to ``eos_id``, as many chat models have no BOS), ``pad_token`` defaults to EOS.
    """

    def __init__(self, path: str, *, eos_token: str, bos_token: str | None = None,
                 pad_token: str | None = None, template: str | ChatTemplate = "chatml"):
        from tokenizers import Tokenizer as _HFTok  # the library, not this module

        self._tok = _HFTok.from_file(path)
        if isinstance(template, str):
            check_one_of("template", template, tuple(CHAT_TEMPLATES))
            template = CHAT_TEMPLATES[template]
        self.template = template
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._require_id("eos_token", eos_token)
        self.bos_id = self._require_id("bos_token", bos_token) if bos_token else self.eos_id
        self.pad_id = self._require_id("pad_token", pad_token) if pad_token else self.eos_id

    def _require_id(self, field: str, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        check(token_id is not None, field, token, "must be a token of the tokenizer.json vocab")
        return token_id

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def apply_chat_template(self, prompt_text: str, thinking: bool = True) -> str:
        return self.template.render(prompt_text, thinking)


def get_tokenizer(name: str = "byte", **kwargs) -> ByteTokenizer | HFTokenizer:
    """``"byte"``: `ByteTokenizer(**kwargs)`; ``"hf"``: `HFTokenizer(**kwargs)` (needs path)."""
    check_one_of("tokenizer", name, ("byte", "hf"))
    return ByteTokenizer(**kwargs) if name == "byte" else HFTokenizer(**kwargs)
