"""A prompt-cache LRU shared by the requests of a server: a new request starts from
the cache of the longest stored token prefix it shares, so a conversation's next
turn processes only its new tokens.

mlx-lm's ``LRUPromptCache`` (a trie of token prefixes with entry and byte limits)
does the bookkeeping; what is ours is the key (a cache is reusable only with the
same loop depth and KV layout) and that the stored tokens are exactly those the
cache holds (a generation that ends leaves its last token unprocessed, or one
more already queued; speculative decoding may hold accepted drafts past the last
token handed out: those are trimmed off).
"""

from __future__ import annotations

from mlx_lm.models.cache import LRUPromptCache


def cache_tokens(cache: list) -> int:
    """Tokens every per-step cache holds; the deeper ones are trimmed to that."""
    offsets = [c.offset for layer in cache for c in layer.caches]
    low = min(offsets)
    for layer in cache:
        for c in layer.caches:
            if c.offset > low:
                c.trim(c.offset - low)
    return low


class PromptCache:
    """Caches from ``Model.make_cache`` keyed by the tokens they hold and by their
    layout (``ut_steps``, ``kv_mode``, ``kv_bits``, ``kv_group_size``).

    ``fetch`` hands out a copy (stored entries are never changed); ``store`` takes
    ownership of a cache after its request is done. ``max_bytes`` bounds the sum
    of the stored caches' ``nbytes``; ``max_entries`` their number."""

    def __init__(self, max_bytes: int = 1 << 30, max_entries: int = 16):
        if max_bytes < 0 or max_entries < 0:
            raise ValueError("prompt cache limits must be >= 0.")
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self._lru = LRUPromptCache(max_size=max(max_entries, 1), max_bytes=max_bytes)

    def __len__(self) -> int:
        return len(self._lru)

    @property
    def nbytes(self) -> int:
        return self._lru.nbytes

    def fetch(self, layout: tuple, tokens: list[int]) -> tuple[list | None, int]:
        """The cache of the longest stored prefix of ``tokens`` (trimmed to leave
        at least one token to feed) and how many tokens it holds; (None, 0) on a miss."""
        if not self.max_entries or len(tokens) < 2:
            return None, 0
        cache, rest = self._lru.fetch_nearest_cache(layout, list(tokens))
        if cache is None:
            return None, 0
        held = cache_tokens(cache)
        keep = min(held, len(tokens) - len(rest), len(tokens) - 1)
        if held > keep:
            for layer in cache:
                for c in layer.caches:
                    c.trim(held - keep)
        return cache, keep

    def store(self, layout: tuple, tokens: list[int], cache: list) -> None:
        """Keep ``cache``, which holds ``tokens`` or a prefix of them, or ``tokens``
        and then tokens that were never handed out (trimmed off)."""
        if not self.max_entries:
            return
        held = cache_tokens(cache)
        if held > len(tokens):
            for layer in cache:
                for c in layer.caches:
                    c.trim(held - len(tokens))
            held = len(tokens)
        if held == 0:
            return
        self._lru.insert_cache(layout, list(tokens[:held]), cache)
