"""The one progress bar of the library and the experiments: tqdm, or nothing when disabled."""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm


class _Off:
    """Stands in for a disabled bar: every tqdm method used here is a no-op."""

    n = 0

    def update(self, n: int = 1) -> None:
        del n

    def set_postfix(self, **kwargs: Any) -> None:
        del kwargs

    def close(self) -> None:
        pass


def progress_bar(total: int, *, desc: str, unit: str, enabled: bool = True, initial: int = 0,
                 leave: bool = True) -> Any:
    """A tqdm bar on stdout (``update``, ``set_postfix``, ``close``), or a silent stand-in when
    ``enabled`` is false or there is nothing to count."""
    if not enabled or total <= 0:
        return _Off()
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave,
                dynamic_ncols=True, file=sys.stdout)
