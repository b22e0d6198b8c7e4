"""The one small interface every inference backend implements.

A backend turns a batch of normalized patches into probabilities on its own device. Tensors stay on that
device: the tiler accumulates there, so nothing bounces through the host per patch. The base class does the
checks every backend needs (dtype, device, shape, contiguity, the output's shape against the bundle) in
:meth:`Backend.run` and calls the backend's own :meth:`Backend.forward`; what a backend can do is said by
class attributes (``can_grow_patch``, ``oom_errors``), not by its name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, ClassVar

import torch

from ..bundle import Bundle
from ..errors import BackendUnavailableError, InputError

if TYPE_CHECKING:  # typing.Self is 3.11+; torch brings typing_extensions
    from typing import Self

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

    Subclasses set ``name`` and ``precisions`` and implement ``unavailable_reason`` and ``forward``;
    construct them through :func:`engine.backends.select_backend`. After the patch and batch are chosen,
    the caller calls :meth:`prepare` once, before streaming.

    Attributes:
        can_grow_patch: fitting may give this backend patches larger than the bundle's (torch); engines
            built for a patch (TensorRT, ONNX Runtime's TensorRT EP) keep it and cap the batch at
            ``options.max_batch``.
        oom_errors: what this backend raises when the device runs out of memory (the batch is halved).
    """

    name: ClassVar[str]
    precisions: ClassVar[tuple[str, ...]]
    can_grow_patch: ClassVar[bool] = False
    oom_errors: ClassVar[tuple[type[BaseException], ...]] = (torch.cuda.OutOfMemoryError,)

    def __init__(self, bundle: Bundle, /, *, options: BackendOptions) -> None:
        self.bundle = bundle
        self.options = options
        self.precision = self.precisions[0] if options.precision == "auto" else options.precision
        if self.precision not in self.precisions:
            raise BackendUnavailableError(f"backend {self.name} runs {list(self.precisions)}, not {self.precision!r}")
        self.device = torch.device("cpu")
        self.prepared: tuple[tuple[int, int, int], int] | None = None

    @classmethod
    @abstractmethod
    def unavailable_reason(cls) -> str | None:
        """Why this backend cannot run here (missing package, no GPU), or None when it can."""

    def prepare(self, patch_shape: tuple[int, int, int], max_batch: int, /) -> None:
        """Get ready for ``(<= max_batch, C, *patch_shape)`` batches before streaming starts.

        Engines built for a shape (TensorRT) load or build their plan here, so nothing is built in the
        middle of a run. The base records the shape; subclasses that build call ``super().prepare``.

        Raises:
            InputError: not 3 positive sides, or a batch below 1.
        """
        patch = tuple(int(p) for p in patch_shape)
        if len(patch) != 3 or min(patch) < 1 or int(max_batch) < 1:
            raise InputError(f"prepare needs 3 positive patch sides and a batch >= 1, got {patch_shape!r}, {max_batch!r}")
        self.prepared = ((patch[0], patch[1], patch[2]), int(max_batch))

    def run(self, batch: torch.Tensor, /) -> torch.Tensor:
        """Probabilities for one batch, checked on the way in and out.

        Args:
            batch: ``(N, C, Z, Y, X)`` float32 on ``self.device`` (made contiguous here).

        Returns:
            ``(N, K, Z, Y, X)`` float32 on ``self.device``, K the bundle's output channels.

        Raises:
            InputError: the batch has the wrong rank, channels, dtype or device.
            RuntimeError: the backend returned another shape, dtype or device (a plan or model that does
                not fit the bundle).
        """
        c = self.bundle.in_channels
        if batch.ndim != 5 or batch.shape[1] != c or batch.dtype != torch.float32 or batch.device != self.device:
            raise InputError(
                f"backend {self.name} takes (N, {c}, Z, Y, X) float32 on {self.device}, "
                f"got {tuple(batch.shape)} {batch.dtype} on {batch.device}"
            )
        out = self.forward(batch.contiguous())
        n, _, z, y, x = batch.shape
        want = (n, len(self.bundle.output.names), z, y, x)
        if tuple(out.shape) != want or out.dtype != torch.float32 or out.device != self.device:
            raise RuntimeError(
                f"backend {self.name} returned {tuple(out.shape)} {out.dtype} on {out.device}, expected {want} float32 "
                f"on {self.device}; its model does not fit bundle {self.bundle.name!r}"
            )
        return out

    @abstractmethod
    def forward(self, batch: torch.Tensor, /) -> torch.Tensor:
        """The backend's own part of :meth:`run`: ``batch`` is already checked and contiguous."""

    @property
    def device_name(self) -> str:
        """Human-readable device, for the run report."""
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return "cpu"

    def close(self) -> None:
        """Release the model and any device memory it holds."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
