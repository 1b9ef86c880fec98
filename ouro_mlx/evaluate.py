"""lm-evaluation-harness at every loop depth (``ouro-mlx eval``).

``DepthRunner`` holds the model and the depth keys to score (``ouro_mlx.scoring``:
``"1"``, ``"2"``, ..., ``"q0.5"``); ``runner.lm(key)`` is an lm-eval ``LM`` that
answers as the model at that depth, and ``lm_eval.simple_evaluate`` runs once per key.
Loglikelihood requests (multiple choice, rolling perplexity) are scored at every key
by the first run, from one pass per batch at the deepest depth, and answered from
that store by the others; generation runs per key (a fixed depth, or an adaptive exit
with the loop steps per token recorded).

Requests are read as ``mlx_lm.evaluate`` reads them, so the scores at one depth are
that command's with the model set to that depth: the context and the continuation
are tokenized together (``encode(context + continuation)``, the continuation being
what follows ``encode(context)``), with special tokens added unless a chat template
is applied, and special-token strings in a task's text read as special tokens (a
task's prompt is written for the model, as with lm-eval's other backends). Rolling
loglikelihood scores every token, the first after eos, in windows of the model's
positions, as lm-eval's Hugging Face backend does.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from typing import Callable

from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from .decoding.batch import Batcher, Sequence
from .encoding import apply_template
from .exit import ExitRule
from .model import Model
from .scoring import Depths, score

DEFAULT_MAX_TOKENS = 8192  # mlx_lm.evaluate's context cap when --max-tokens is not given


class DepthRunner:
    """The model, its tokenizer and the keys of ``depths``; see the module docstring.
    ``max_tokens``: the generation cap for every request (else each task's
    ``max_gen_toks``) and the context length loglikelihood keeps."""

    def __init__(self, model: Model, tokenizer, depths: Depths, *, batch_size: int = 8,
                 max_tokens: int | None = None, use_chat_template: bool | None = None,
                 chat_template_args: dict | None = None, sampler: Callable | None = None,
                 progress: bool = True):
        self.model, self.tokenizer, self.depths = model, tokenizer, depths
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        if use_chat_template is None:
            use_chat_template = tokenizer.chat_template is not None
        self.use_chat_template = use_chat_template
        self.chat_template_args = chat_template_args or {}
        self.sampler = sampler
        self.progress = progress
        self.positions = model.args.max_position_embeddings
        self._ll: dict[tuple, dict[str, tuple]] = {}  # request → key → (lp, greedy, n, loops)
        self.loops: dict[str, dict[str, list[float]]] = defaultdict(
            lambda: defaultdict(lambda: [0.0, 0]))  # key → task → [Σ loops, tokens]
        self.passes = 0  # forward passes of the loglikelihood store

    def lm(self, key: str) -> "DepthLM":
        if key not in self.depths.keys():
            raise ValueError(f"{key!r} is not one of the depths scored: "
                             f"{', '.join(self.depths.keys())}.")
        return DepthLM(self, key)

    def avg_loops(self, key: str) -> dict[str, float]:
        """Loop steps per scored or generated token, by task, at ``key``."""
        return {task: s / n for task, (s, n) in self.loops[key].items() if n}

    # ---------------------------------------------------------------- tokens

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=not self.use_chat_template))

    def _pair(self, context: str, continuation: str) -> tuple[list[int], int]:
        """(tokens, where the continuation starts), as mlx_lm.evaluate splits them;
        the context is cut from the left to fit the model's positions."""
        prefix = self.encode(context)
        whole = self.encode(context + continuation)
        start = len(prefix)
        if start == 0:  # an empty context: the continuation follows eos
            whole, start = [self.tokenizer.eos_token_id, *whole], 1
        limit = min(self.max_tokens or DEFAULT_MAX_TOKENS, self.positions)
        cut = min(max(0, len(whole) - limit), start - 1)
        if len(whole) - cut > self.positions:
            raise ValueError(f"a continuation of {len(whole) - start} tokens does not fit "
                             f"the model's {self.positions} positions.")
        return whole[cut:], start - cut

    # ---------------------------------------------------------------- scoring

    def _score_all(self, items: list[tuple[tuple, list[int], list[int]]]) -> None:
        """Score (key, tokens, mask) items not yet stored, at every depth key."""
        todo = {}
        for key, rows, mask in items:
            if key not in self._ll:
                todo[key] = (rows, mask)
        order = sorted(todo, key=lambda k: -len(todo[k][0]))
        bar = tqdm(total=len(order), desc="scoring every depth", unit="request",
                   file=sys.stderr, disable=not self.progress or None)
        with bar:
            for i in range(0, len(order), self.batch_size):
                keys = order[i:i + self.batch_size]
                result = score(self.model, [todo[k][0] for k in keys],
                               [todo[k][1] for k in keys], self.depths)
                self.passes += 1
                for b, k in enumerate(keys):
                    self._ll[k] = {
                        d: (float(s.logprob[b]), None if s.greedy is None else bool(s.greedy[b]),
                            int(s.tokens[b]), None if s.loops is None else float(s.loops[b]))
                        for d, s in result.items()}
                bar.update(len(keys))

    def _answer(self, requests, store_keys: list[tuple], key: str) -> list[tuple]:
        out = []
        for req, k in zip(requests, store_keys):
            lp, greedy, n, loops = self._ll[k][key]
            if loops is not None:
                tally = self.loops[key][req.task_name]
                tally[0] += loops
                tally[1] += n
            out.append((lp, greedy))
        return out

    def loglikelihood(self, requests, key: str) -> list[tuple[float, bool]]:
        items, keys = [], []
        for req in requests:
            context, continuation = req.args[:2]
            k = ("ll", context, continuation)
            if k not in self._ll:
                tokens, start = self._pair(context, continuation)
                items.append((k, tokens, [0] * start + [1] * (len(tokens) - start)))
            keys.append(k)
        self._score_all(items)
        return self._answer(requests, keys, key)

    def loglikelihood_rolling(self, requests, key: str) -> list[float]:
        items, per_request = [], []
        for req in requests:
            tokens = self.encode(req.args[0])
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                tokens, self.tokenizer.eos_token_id, self.positions, 1)]
            keys = []
            for context, target in windows:
                k = ("rolling", tuple(context), tuple(target))
                if k not in self._ll:
                    row = [*context, *target]
                    items.append((k, row, [0] * len(context) + [1] * len(target)))
                keys.append(k)
            per_request.append(keys)
        self._score_all(items)
        out = []
        for req, keys in zip(requests, per_request):
            out.append(sum(lp for lp, _ in self._answer([req] * len(keys), keys, key)))
        return out

    # ---------------------------------------------------------------- generation

    def rule(self, key: str) -> ExitRule:
        if key.startswith("q"):
            return ExitRule(self.model.ut_steps, threshold=float(key[1:]))
        return ExitRule(int(key), threshold=1.0)  # exactly that many steps

    def generate_until(self, requests, key: str) -> list[str]:
        """Greedy (or ``sampler``) completions at ``key``, at most ``batch_size``
        decoded together, each stopped at its first ``until`` string or eos."""
        rule = self.rule(key)
        eos = frozenset(self.tokenizer.eos_token_ids)
        seqs = []
        for req in requests:
            context, opts = req.args[:2]
            until = opts.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n = self.max_tokens or opts.get("max_gen_toks", DEFAULT_MAX_TOKENS)
            n = max(1, min(n, self.positions - 1))
            prompt = self.encode(context)[-(self.positions - n):] or [
                self.tokenizer.eos_token_id]  # an empty context: generate after eos
            s = Sequence(prompt, self.model, rule, n, eos, sampler=self.sampler,
                         tag=(req, until))
            seqs.append(s)
        batcher = Batcher()
        waiting = list(reversed(seqs))
        active = 0
        bar = tqdm(total=len(seqs), desc=f"generating at {key}", unit="request",
                   file=sys.stderr, disable=not self.progress or None)
        with bar:
            while waiting or not batcher.idle:
                while waiting and active < self.batch_size:
                    batcher.add(waiting.pop())
                    active += 1
                for tok in batcher.step():
                    s = tok.seq
                    if tok.finish is not None:
                        active -= 1
                        bar.update(1)
                    elif not s.cancelled and _stops(self.tokenizer.decode(s.tokens), s.tag[1]):
                        s.cancelled = True  # the rest would be cut off anyway
        texts = []
        for s in seqs:
            if s.error is not None:
                raise s.error
            n = len(s.tokens) - (s.finish == "stop")
            texts.append(_cut(self.tokenizer.decode(s.tokens[:n]), s.tag[1]))
            if not key.isdigit() and len(s.loops) > 1:
                # the first token comes from the prompt's pass at full depth
                tally = self.loops[key][s.tag[0].task_name]
                tally[0] += sum(s.loops[1:n])
                tally[1] += len(s.loops[1:n])
        return texts

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt=True) -> str:
        return apply_template(self.tokenizer, chat_history, tokenize=False,
                              add_generation_prompt=add_generation_prompt,
                              continue_final_message=not add_generation_prompt,
                              **self.chat_template_args)


def _cut(text: str, until: list[str]) -> str:
    """``text`` up to its first ``until`` string (mlx_lm.evaluate's rule)."""
    ends = [i for u in until if u and (i := text.find(u)) >= 0]
    return text[:min(ends)] if ends else text


def _stops(text: str, until: list[str]) -> bool:
    return any(u and u in text for u in until)


class DepthLM(LM):
    """An lm-eval model answering as ``runner.model`` at depth key ``key``."""

    def __init__(self, runner: DepthRunner, key: str):
        super().__init__()
        self.runner, self.key = runner, key

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return self.runner.loglikelihood(requests, self.key)

    def loglikelihood_rolling(self, requests) -> list[float]:
        return self.runner.loglikelihood_rolling(requests, self.key)

    def generate_until(self, requests) -> list[str]:
        return self.runner.generate_until(requests, self.key)

    def apply_chat_template(self, chat_history, add_generation_prompt=True) -> str:
        return self.runner.apply_chat_template(chat_history, add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.runner.tokenizer, "name_or_path", "ouro")).replace("/", "__")

    def chat_template(self, chat_template=False) -> str | None:
        return getattr(self.runner.tokenizer, "chat_template", None)


def metrics(task_results: dict) -> dict[str, float]:
    """lm-eval's ``{"acc,none": v, "alias": ...}`` as ``{"acc": v}`` (a filter other
    than none stays in the name: ``"exact_match,flexible"``)."""
    out = {}
    for name, value in task_results.items():  # "sample_len", "alias": not metrics
        if "," not in name or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        metric, _, filt = name.partition(",")
        out[metric if filt == "none" else name] = value
    return out
