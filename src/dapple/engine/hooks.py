"""Extension points of the denoise loop: named hooks that run before and after every step.

Progress bars, previews, cancellation and inpaint mask blending are all hooks; the loop itself knows
none of them. A hook receives the StepContext and may replace `context.latents`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image

from dapple.errors import GenerationCancelled

Previewer = Callable[[torch.Tensor, str], list[Image.Image]]


@dataclass
class StepContext:
    """What a hook sees of one denoising step.

    Before the step, `latents` is x_t; after it, `latents` is the sampler's next sample and `denoised` is its
    prediction of the clean latents x_0 when the sampler reports one.
    """

    index: int
    total: int
    timestep: torch.Tensor
    latents: torch.Tensor
    denoised: torch.Tensor | None = None
    previewer: Previewer | None = None
    phase: str = "sampling"  # which pass of the run: "sampling", or "hires" for hires fix's second pass

    @property
    def step(self) -> int:
        """1-based step number, for progress displays."""
        return self.index + 1

    def preview(self, mode: str = "cheap") -> list[Image.Image]:
        """Images of the current prediction: "cheap" (linear latent -> RGB, no VAE) or "full" (VAE decode)."""
        if self.previewer is None:
            raise RuntimeError("this run has no previewer")
        latents = self.denoised if self.denoised is not None else self.latents
        return self.previewer(latents, mode)


Hook = Callable[[StepContext], None]


@dataclass
class StepHooks:
    """Named hooks, run in the order they were added."""

    before_step: dict[str, Hook] = field(default_factory=dict)
    after_step: dict[str, Hook] = field(default_factory=dict)

    def run_before(self, context: StepContext) -> None:
        for hook in self.before_step.values():
            hook(context)

    def run_after(self, context: StepContext) -> None:
        for hook in self.after_step.values():
            hook(context)


class CancelToken:
    """Set from any thread to stop a running generation at the next step boundary."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def hook(self, context: StepContext) -> None:
        """A before-step hook that raises GenerationCancelled once the token is set."""
        if self.cancelled:
            raise GenerationCancelled(f"generation cancelled before step {context.step} of {context.total}")
