"""Feature caching across steps as a loop extension: DeepCache (Ma, Fang & Wang, 2024, "DeepCache: Accelerating
Diffusion Models for Free").

Adjacent denoising steps change the UNet's deep, low-resolution features very little. DeepCache runs the whole
UNet on every N-th step and keeps what the deep part hands to the last up block; on the steps between it runs
only the shallow branch (the paper's branch 0 at block granularity):

    full step:    conv_in -> down_blocks[0..] -> mid -> up_blocks[..-2] -> up_blocks[-1] -> norm/conv_out
                                                       cache: up_blocks[-2]'s output
    cached step:  conv_in -> down_blocks[0] ------- (cached feature) ----> up_blocks[-1] -> norm/conv_out

so a cached step reads fresh shallow skip connections (conv_in's and down_blocks[0]'s outputs, which is where
the inpainting/depth input channels and the ControlNet residuals of those skips arrive) and the cached deep
feature. The block split follows horseee/DeepCache's diffusers UNet (quick_replicate with the deep part cut at
the last up block); the code is ours and leaves diffusers' UNet forward untouched: the run-wide patch wraps the
`forward` of the deep blocks (down_blocks[1:], mid_block, up_blocks[:-1]) for the run and always restores it,
and `before_model` decides, per UNet call, whether the deep blocks compute (and record their outputs) or
return what the last full step recorded. The deep down blocks and the mid block return their recorded outputs
too, so that diffusers' forward still finds skip tensors of the right count and shape (ControlNet residuals
add to them, T2I-Adapter features add into them); the skipped up blocks consume those and are skipped, so their
values never reach the output.

When the cache is valid: a cached step needs the last full step's feature for the same batch layout. Anything
that changes the batch (the guidance interval's switch from the guided [uncond, cond] batch to cond alone, the
hires pass at another size, a new pass) forces a full step; the interval counts from the last full step.
Interval 1 is off: the extension is then not added at all, so the loop is exactly what it is without it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

import torch

from dapple.engine.extensions import Extension, ModelInputs
from dapple.errors import InvalidRequestError

if TYPE_CHECKING:
    from dapple.engine.hooks import StepContext

MIN_INTERVAL, MAX_INTERVAL = 1, 10  # the request field's bounds (1: off)
# After the control residuals (300), before user extensions (500): it only decides how the UNet call runs.
ORDER_FEATURE_CACHE = 400

FULL, CACHED = "full", "cached"


def deep_modules(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The UNet's deep part, which a cached step skips: down_blocks[1:], mid_block and up_blocks[:-1]."""
    down, up = list(unet.down_blocks), list(unet.up_blocks)
    if len(down) < 2 or len(up) < 2:
        raise InvalidRequestError(f"deep_cache_interval needs a UNet with at least 2 down and 2 up blocks; this "
                                  f"one has {len(down)} and {len(up)}: use deep_cache_interval 1 (off)")
    modules = [(f"down_blocks.{i}", block) for i, block in enumerate(down) if i > 0]
    if getattr(unet, "mid_block", None) is not None:
        modules.append(("mid_block", unet.mid_block))
    modules += [(f"up_blocks.{i}", block) for i, block in enumerate(up[:-1])]
    return modules


@contextmanager
def wrapped_forward(module: torch.nn.Module, wrapper: Callable[[Callable[..., Any]], Callable[..., Any]]
                    ) -> Iterator[None]:
    """Replace module.forward by wrapper(original) while held; restore exactly what was there (a forward set on
    the instance by someone else, e.g. an offload hook, stays theirs)."""
    had_own = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    module.forward = wrapper(module.forward)
    try:
        yield
    finally:
        if had_own:
            module.forward = previous
        else:
            del module.forward


class DeepCache(Extension):
    """DeepCache with cache interval N: the full UNet on every N-th step (counted from the last full one), the
    shallow branch with the cached deep feature on the others."""

    name = "deep cache"
    order = ORDER_FEATURE_CACHE
    needs_torch_unet = True  # it patches the torch UNet's modules

    def __init__(self, interval: int) -> None:
        if not isinstance(interval, int) or isinstance(interval, bool) or not MIN_INTERVAL <= interval <= MAX_INTERVAL:
            raise InvalidRequestError(f"deep_cache_interval must be an integer from {MIN_INTERVAL} (off) to "
                                      f"{MAX_INTERVAL}; got {interval!r}")
        self.interval = interval
        self.full_steps: list[tuple[str, int]] = []  # (phase, step index) of each full step (tests, diagnostics)
        self.cached_steps: list[tuple[str, int]] = []
        self._reset()

    def _reset(self) -> None:
        self._mode: str | None = None  # None: deep blocks run as usual (any call outside the loop's)
        self._key: tuple | None = None  # the batch layout the cache was recorded for
        self._since_full = 0  # cached steps since the last full one
        self._outputs: dict[str, Any] = {}

    # -- run-wide patch -----------------------------------------------------------------------------------------
    def patch(self, run: Any) -> Any:
        return self.patched(run.components.unet)

    @contextmanager
    def patched(self, unet: torch.nn.Module) -> Iterator[None]:
        """Wrap the deep blocks of `unet` for as long as this is held (the run); restore them on any exit."""
        self._reset()
        with ExitStack() as stack:
            for name, module in deep_modules(unet):
                stack.enter_context(wrapped_forward(module, self._wrapper(name)))
            try:
                yield
            finally:
                self._reset()  # the recorded features are the run's; free them with it

    def _wrapper(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
            def forward(*args: Any, **kwargs: Any) -> Any:
                if self._mode == CACHED:
                    return self._outputs[name]
                output = original(*args, **kwargs)
                if self._mode == FULL:
                    self._outputs[name] = output
                return output
            return forward
        return wrap

    # -- per step ---------------------------------------------------------------------------------------------
    def before_model(self, step: "StepContext", inputs: ModelInputs) -> None:
        """Full or cached: full when the batch layout differs from the cache's (or nothing is cached yet), or
        when interval - 1 cached steps have run since the last full one."""
        key = (step.phase, tuple(inputs.sample.shape), inputs.guided, inputs.sample.dtype)
        if key != self._key or not self._outputs or self._since_full >= self.interval - 1:
            self._mode, self._key, self._since_full = FULL, key, 0
            self._outputs = {}
            self.full_steps.append((step.phase, step.index))
        else:
            self._mode = CACHED
            self._since_full += 1
            self.cached_steps.append((step.phase, step.index))

    def after_guidance(self, step: "StepContext", inputs: ModelInputs, noise_pred: torch.Tensor) -> torch.Tensor:
        self._mode = None  # the UNet call is over: any other call runs the deep blocks as usual
        return noise_pred

    def infotext(self) -> dict[str, Any]:
        return {"DeepCache interval": self.interval}


def deep_cache_extension(interval: int) -> DeepCache | None:
    """The request's DeepCache extension, or None when off (interval 1): off adds nothing to the run."""
    extension = DeepCache(interval)  # checks the value
    return extension if interval > 1 else None
