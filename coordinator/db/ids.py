"""Public ids like `ftjob-0Jk3...`: a prefix, 9 base62 chars of milliseconds, 15 random base62 chars.

Ids sort in creation order (within one process strictly, across processes to the
millisecond), so cursor paging can page by id alone.
"""

from __future__ import annotations

import secrets
import threading
import time

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # ASCII order
_TIME_CHARS = 9
_RANDOM_CHARS = 15
_RANDOM_SPACE = 62**_RANDOM_CHARS

_lock = threading.Lock()
_last = (0, 0)


def _base62(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, r = divmod(n, 62)
        out.append(_ALPHABET[r])
    return "".join(reversed(out))


def new_id(prefix: str) -> str:
    global _last
    with _lock:
        ms = time.time_ns() // 1_000_000
        last_ms, last_rand = _last
        if ms <= last_ms:
            ms, rand = last_ms, last_rand + 1
            if rand >= _RANDOM_SPACE:
                ms, rand = last_ms + 1, secrets.randbelow(_RANDOM_SPACE // 2)
        else:
            # Leave headroom so increments within one millisecond never overflow.
            rand = secrets.randbelow(_RANDOM_SPACE // 2)
        _last = (ms, rand)
    return f"{prefix}{_base62(ms, _TIME_CHARS)}{_base62(rand, _RANDOM_CHARS)}"
