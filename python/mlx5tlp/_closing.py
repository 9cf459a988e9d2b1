"""The context-manager protocol every closable mlx5tlp type shares."""

from __future__ import annotations

from types import TracebackType
from typing import Optional, TypeVar

__all__ = ["Closing"]

T = TypeVar("T", bound="Closing")


class Closing:
    """``with obj:`` closes ``obj`` on exit; subclasses define an idempotent ``close()``."""

    __slots__ = ()

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: T) -> T:
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()
