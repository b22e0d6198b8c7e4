"""The one small interface every inference backend implements.

A backend turns a batch of normalized patches into probabilities on its own device. Tensors stay on that
device: the tiler accumulates there, so nothing bounces through the host per patch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import TracebackType
from typing import ClassVar

import torch

from ..bundle import Bundle
from ..errors import BackendUnavailableError

__all__ = ["Backend", "BackendOptions"]


@dataclass(frozen=True)
class BackendOptions:
    """Settings a backend may honour.

    Args:
        precision: ``auto`` (the backend's fastest precision that passes the bundle's accuracy gate) or an
            explicit ``fp32``, ``bf16`` or ``fp16``.
        threads: CPU threads; None uses every core this process may run on.
        max_batch: the largest batch the caller will pass (engines with fixed profiles size for it).
    """

    precision: str = "auto"
    threads: int | None = None
    max_batch: int = 8


class Backend(ABC):
    """A loaded model that maps ``(N, C, Z, Y, X)`` float32 batches to ``(N, K, Z, Y, X)`` probabilities.

    Subclasses set ``name`` and implement ``unavailable_reason`` and ``run``; construct them through
    :func:`engine.backends.select_backend`.
    """

    name: ClassVar[str]
    precisions: ClassVar[tuple[str, ...]]

    def __init__(self, bundle: Bundle, /, *, options: BackendOptions) -> None:
        self.bundle = bundle
        self.options = options
        self.precision = self.precisions[0] if options.precision == "auto" else options.precision
        if self.precision not in self.precisions:
            raise BackendUnavailableError(f"backend {self.name} runs {list(self.precisions)}, not {self.precision!r}")
        self.device = torch.device("cpu")

    @classmethod
    @abstractmethod
    def unavailable_reason(cls) -> str | None:
        """Why this backend cannot run here (missing package, no GPU), or None when it can."""

    @abstractmethod
    def run(self, batch: torch.Tensor, /) -> torch.Tensor:
        """Probabilities for one batch.

        Args:
            batch: ``(N, C, Z, Y, X)`` float32 on ``self.device``.

        Returns:
            ``(N, K, Z, Y, X)`` float32 on ``self.device``.
        """

    @property
    def device_name(self) -> str:
        """Human-readable device, for the run report."""
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return "cpu"

    def close(self) -> None:
        """Release the model and any device memory it holds."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
