"""Text to token ids where special tokens come only from the chat template.

A tokenizer's ``encode`` turns the string ``<|im_end|>`` into the real end-of-turn
token wherever it appears, so a user who types ``<|im_end|>\\n<|im_start|>system``
opens a system turn of their own. Here message content and raw text are encoded as
plain text; only the template's own markup becomes special tokens.

Text without any added-token string (nearly all of it) takes the tokenizer's usual
path, so its ids are exactly those the model was trained on. Otherwise the template
is rendered with each added-token string in the content replaced by a sentinel, the
rendering is cut at the template's own special tokens, and each piece between them
is encoded with every added token treated as plain text, as a whole (merges across
template text and content stay as in a normal encoding).
"""

from __future__ import annotations

import json
import re
import uuid


def encode_chat(tokenizer, messages: list[dict], *, add_generation_prompt: bool) -> list[int]:
    """The chat template's ids for ``messages``; their content (and role: a data
    file's roles are text from a stranger too) is always plain text."""
    for i, m in enumerate(messages):
        for key, value in m.items():
            check_unicode(value, f"messages[{i}].{key}")
    specials = _added_tokens(tokenizer)
    if not any(_has_special(v, specials) for m in messages for v in m.values()):
        return list(apply_template(
            tokenizer, messages, add_generation_prompt=add_generation_prompt))
    marks = {s: f"\ue000{uuid.uuid4().hex}{i}\ue001" for i, s in enumerate(specials)}
    hidden = [{k: _replace(v, marks) if isinstance(v, str) else v for k, v in m.items()}
              for m in messages]
    text = apply_template(
        tokenizer, hidden, add_generation_prompt=add_generation_prompt, tokenize=False)
    back = {v: k for k, v in marks.items()}
    return _encode_plain(tokenizer, text, specials, restore=back)


def encode_text(tokenizer, text: str) -> list[int]:
    """``text`` as plain text: an added-token string in it is never a special token."""
    check_unicode(text, "the prompt")
    specials = _added_tokens(tokenizer)
    if not _has_special(text, specials):
        return list(tokenizer.encode(text, add_special_tokens=False))
    return _plain_encoder(tokenizer).encode(text, first=True)


def check_unicode(text, what: str) -> None:
    """Refuse a str holding a lone surrogate (from JSON's ``"\\ud800"``, or bytes
    that are not UTF-8 in a file name or argument): no tokenizer can encode it."""
    if (at := surrogate_at(text)) is not None:
        raise ValueError(f"{what} holds a lone surrogate (\\u{ord(text[at]):04x}) at "
                         f"character {at}, which is not Unicode text.")


def surrogate_at(text) -> int | None:
    """Where a str holds a lone surrogate (not encodable as UTF-8), else None."""
    if not isinstance(text, str):
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of ``text`` may begin one of ``stops``: text a
    stream holds back until it is clear whether a stop string follows."""
    return max((k for stop in stops for k in range(min(len(stop) - 1, len(text)), 0, -1)
                if text.endswith(stop[:k])), default=0)


class TemplateFailure(ValueError):
    """The model's chat template cannot render (its file named in the message)."""


def apply_template(tokenizer, messages: list[dict], **kwargs):
    """``tokenizer.apply_chat_template``, with a template that fails (a syntax error,
    or an attribute Jinja's sandbox refuses, such as ``''.__class__``) reported in one
    line naming the file it came from."""
    from jinja2.exceptions import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except TemplateError as e:
        from jinja2.exceptions import SecurityError

        what = ("tries something Jinja's sandbox refuses" if isinstance(e, SecurityError)
                else "failed")
        raise TemplateFailure(f"{template_file(tokenizer)}: the chat template {what}: "
                         f"{e}".rstrip(".") + ".") from None


def template_file(tokenizer) -> str:
    """Where ``tokenizer``'s chat template was read from, as well as it can be told."""
    from pathlib import Path

    inner = getattr(tokenizer, "_tokenizer", tokenizer)  # mlx-lm's wrapper
    name = getattr(inner, "name_or_path", None) or ""
    folder = Path(name)
    if name and folder.is_dir():
        for file in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json"):
            if (folder / file).is_file():
                return str(folder / file)
    return f"the chat template of {name}" if name else "the tokenizer's chat template"


def _added_tokens(tokenizer) -> dict[str, int]:
    return dict(tokenizer.get_added_vocab())


def _has_special(text, specials: dict[str, int]) -> bool:
    return isinstance(text, str) and any(s in text for s in specials)


def _replace(text: str, marks: dict[str, str]) -> str:
    pattern = "|".join(map(re.escape, sorted(marks, key=len, reverse=True)))
    return re.sub(pattern, lambda m: marks[m.group(0)], text)


def _encode_plain(tokenizer, text: str, specials: dict[str, int],
                  restore: dict[str, str]) -> list[int]:
    """Cut ``text`` at the added-token strings it holds (the template's own), take
    their ids, and encode the pieces between them with ``restore`` applied, plainly."""
    encoder = _plain_encoder(tokenizer)
    pattern = "|".join(map(re.escape, sorted(specials, key=len, reverse=True)))
    ids: list[int] = []
    pos = 0
    for m in [*re.finditer(pattern, text), None]:
        end = m.start() if m else len(text)
        if end > pos:
            piece = _replace(text[pos:end], restore) if restore else text[pos:end]
            ids += encoder.encode(piece, first=pos == 0)
        if m:
            ids.append(specials[m.group(0)])
            pos = m.end()
    return ids


class _PlainEncoder:
    """Encodes with every added token as plain text. ``first``: the piece starts the
    text (a Metaspace pre-tokenizer with prepend_scheme "first" marks only that one)."""

    def __init__(self, tokenizer):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.slow = tokenizer if backend is None else None
        if backend is None:
            return
        from tokenizers import Tokenizer

        spec = json.loads(backend.to_str())
        for token in spec.get("added_tokens") or []:
            token["special"] = True  # encode_special_tokens then skips them all
        self.first = Tokenizer.from_str(json.dumps(spec))
        _never_prepend(spec.get("pre_tokenizer"))
        self.rest = Tokenizer.from_str(json.dumps(spec))
        for t in (self.first, self.rest):
            t.encode_special_tokens = True

    def encode(self, text: str, first: bool) -> list[int]:
        if self.slow is not None:
            return list(self.slow.encode(text, add_special_tokens=False,
                                         split_special_tokens=True))
        return (self.first if first else self.rest).encode(
            text, add_special_tokens=False).ids


def _never_prepend(spec) -> None:
    if isinstance(spec, dict):
        if spec.get("type") == "Metaspace" and spec.get("prepend_scheme") == "first":
            spec["prepend_scheme"] = "never"
        for v in spec.values():
            _never_prepend(v)
    elif isinstance(spec, list):
        for v in spec:
            _never_prepend(v)


def _plain_encoder(tokenizer) -> _PlainEncoder:
    inner = getattr(tokenizer, "_tokenizer", tokenizer)  # mlx-lm's wrapper
    encoder = getattr(inner, "_ouro_plain_encoder", None)
    if encoder is None:
        encoder = _PlainEncoder(inner)
        inner._ouro_plain_encoder = encoder
    return encoder
