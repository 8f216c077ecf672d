"""tqdm progress bar over input bytes, showing documents/s, tokens/s and the ETA."""
from __future__ import annotations

import sys
import time


class Progress:
    """A progress bar whose total is the on-disk size of the inputs (so the ETA is meaningful).

    ``add_bytes(n)`` advances it; ``add_docs``/``add_tokens`` feed the documents/s and tokens/s
    shown after it. ``quiet=True`` shows nothing.
    """

    def __init__(self, total_bytes: int, desc: str, quiet: bool = False) -> None:
        self.docs = 0
        self.tokens = 0
        self._t0 = time.perf_counter()
        self._last = 0.0
        self.bar = None
        if not quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True,
                            unit_divisor=1024, file=sys.stderr, dynamic_ncols=True)

    def add_bytes(self, n: int) -> None:
        if self.bar is not None and n:
            self.bar.update(n)
            self._postfix()

    def add_docs(self, n: int) -> None:
        self.docs += n

    def add_tokens(self, n: int) -> None:
        self.tokens += n

    def _postfix(self, force: bool = False) -> None:
        now = time.perf_counter()
        if self.bar is None or (not force and now - self._last < 0.5):
            return
        self._last = now
        dt = max(now - self._t0, 1e-9)
        post = f"{self.docs / dt:,.0f} docs/s"
        if self.tokens:
            post += f", {self.tokens / dt:,.0f} tokens/s"
        self.bar.set_postfix_str(post, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self._postfix(force=True)
            self.bar.close()
            self.bar = None
