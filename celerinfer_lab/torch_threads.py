"""A bench or profile asked for ``threads`` sets torch's thread count for its run only.

``torch.set_num_threads`` is process-wide: left set, it slowed every later torch call of a notebook
kernel or a test session, and on an Intel Xeon it changed their float32 sums (a training run after a
one-thread bench no longer matched the same training in a fresh process). (The bench puts the C++
pool's count back itself; the environment Dask's workers leave is campaign.LocalDask's job.)"""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable)


def restores_torch_threads(fn: F) -> F:
    """``fn`` with torch's thread count put back as it was when ``fn`` returns or raises."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        before = torch.get_num_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return wrapper  # type: ignore[return-value]
