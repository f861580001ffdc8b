"""Extensions: the seam around the model call in the one denoise loop.

Each step the loop builds one ModelInputs (the scaled sample, t, the text states, SDXL's added conditioning, the
extra input channels, ControlNet/T2I-Adapter residuals, attention kwargs) for the guided batch ([uncond, cond]) or
the unguided one (cond only), and lets the run's extensions work on it at named points:

- ``patch(run)``: a context manager entered once per run and always exited, on error and cancel too (attention
  processors, temporary weight patches: IP-Adapter, token merging);
- ``before_step(step)`` / ``after_step(step)``: as the plain step hooks (mask blending, previews);
- ``before_model(step, inputs)``: add residuals, extra channels or attention kwargs (inpaint/depth channels,
  ControlNet, T2I-Adapter);
- ``after_guidance(step, inputs, noise_pred) -> noise_pred``: work on the guided prediction (feature caching,
  guidance rescaling).

Order is explicit: extensions run by ascending ``order``, ties in the order they were added (see ORDER_* below).
Names are unique within a run: adding a second extension with a name already present raises, so a user extension
can never silently replace a built-in one (InvokeAI's ExtensionsManager has the same rule).

Third-party packages add extensions through the ``dapple.extensions`` entry-point group: each entry point names a
factory ``(args: dict, components) -> Extension``, and a request turns it on with ``extensions={name: args}``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

import torch

from dapple.errors import InvalidRequestError

if TYPE_CHECKING:
    from dapple.engine.hooks import StepContext

ENTRY_POINT_GROUP = "dapple.extensions"

# Built-in orders. Input channels come first (they change what the UNet sees), control residuals next, then
# anything else; user and plugin extensions default to ORDER_USER and run after every built-in one.
ORDER_INPUT_CHANNELS = 100
ORDER_CONTROL = 300
ORDER_USER = 500


@dataclass
class ModelInputs:
    """Everything one UNet call takes, for the batch the loop is about to run.

    ``sample`` is the scaled latents (diffusers' latent_model_input, before extra channels); ``guided`` says the
    batch is [uncond, cond] (twice the images) rather than cond alone. Extensions add to it; ``call`` runs the
    UNet with what they added, exactly as diffusers' pipelines do."""

    sample: torch.Tensor
    timestep: torch.Tensor
    encoder_hidden_states: torch.Tensor
    guided: bool
    added_cond_kwargs: dict[str, torch.Tensor] | None = None
    extra_channels: list[torch.Tensor] = field(default_factory=list)
    down_block_additional_residuals: list[torch.Tensor] | None = None
    mid_block_additional_residual: torch.Tensor | None = None
    down_intrablock_additional_residuals: list[torch.Tensor] | None = None
    cross_attention_kwargs: dict[str, Any] | None = None

    @property
    def images(self) -> int:
        """Images in the run's batch (the guided batch holds each twice)."""
        return len(self.sample) // 2 if self.guided else len(self.sample)

    def per_image(self, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor given once per image, laid out like this batch ([t, t] when guided)."""
        return torch.cat([tensor] * 2) if self.guided else tensor

    def add_channels(self, channels: torch.Tensor) -> None:
        """Append input channels (one row per image) after the latents, as inpainting and depth UNets take."""
        self.extra_channels.append(self.per_image(channels))

    def add_residuals(self, down: Sequence[torch.Tensor] | None = None, mid: torch.Tensor | None = None,
                      intrablock: Sequence[torch.Tensor] | None = None) -> None:
        """Add ControlNet-style down/mid residuals or T2I-Adapter intrablock residuals; several sources sum, as
        diffusers' MultiControlNetModel sums its units."""
        if down is not None:
            self.down_block_additional_residuals = _summed(self.down_block_additional_residuals, down)
        if mid is not None:
            self.mid_block_additional_residual = mid if self.mid_block_additional_residual is None \
                else self.mid_block_additional_residual + mid
        if intrablock is not None:
            self.down_intrablock_additional_residuals = _summed(self.down_intrablock_additional_residuals,
                                                                intrablock)

    def model_input(self) -> torch.Tensor:
        """The UNet's input tensor: the sample with the extra channels appended."""
        if not self.extra_channels:
            return self.sample
        return torch.cat([self.sample, *(extra.to(self.sample.dtype) for extra in self.extra_channels)], dim=1)

    def call(self, unet: torch.nn.Module) -> torch.Tensor:
        """Run the UNet on these inputs and return its prediction."""
        optional = {
            "down_block_additional_residuals": self.down_block_additional_residuals,
            "mid_block_additional_residual": self.mid_block_additional_residual,
            "down_intrablock_additional_residuals": self.down_intrablock_additional_residuals,
            "cross_attention_kwargs": self.cross_attention_kwargs,
        }
        # The latents stay float32 (Run.dtype); a bf16/fp16 UNet gets its input in its dtype and the prediction
        # goes back to the latents' dtype for guidance and the sampler.
        prediction = unet(self.model_input().to(unet.dtype), self.timestep,
                          encoder_hidden_states=self.encoder_hidden_states, added_cond_kwargs=self.added_cond_kwargs,
                          return_dict=False, **{name: value for name, value in optional.items() if value is not None})[0]
        return prediction.to(self.sample.dtype)


def _summed(current: list[torch.Tensor] | None, new: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if current is None:
        return list(new)
    if len(current) != len(new):
        raise ValueError(f"residuals of {len(new)} blocks cannot be added to residuals of {len(current)} blocks")
    return [a + b for a, b in zip(current, new)]


class Extension:
    """Base class: override the points you need. ``name`` is unique within a run; ``order`` sets when it runs."""

    name: str = "extension"
    order: int = ORDER_USER
    # True for extensions that patch the torch UNet's modules (feature caching, token merging): a pipeline on
    # the OpenVINO backend, which has no torch UNet, refuses them before the run (models/openvino_backend.py).
    needs_torch_unet: bool = False

    def patch(self, run: Any) -> AbstractContextManager | None:
        """A context manager to hold for the whole run (entered before the first step, always exited)."""
        return None

    def before_step(self, step: "StepContext") -> None:
        """Before the step: may replace step.latents."""

    def before_model(self, step: "StepContext", inputs: ModelInputs) -> None:
        """Before the UNet call: may add channels, residuals or attention kwargs to inputs."""

    def after_guidance(self, step: "StepContext", inputs: ModelInputs, noise_pred: torch.Tensor) -> torch.Tensor:
        """After classifier-free guidance: return the prediction the sampler steps with."""
        return noise_pred

    def after_step(self, step: "StepContext") -> None:
        """After the sampler's step: may replace step.latents."""

    def infotext(self) -> dict[str, Any]:
        """Entries this extension adds to the image's parameters text (A1111 infotext)."""
        return {}


class Extensions:
    """An ordered set of uniquely named extensions, and the calls the loop makes on all of them."""

    def __init__(self, extensions: Iterable[Extension] = ()) -> None:
        self._items: list[Extension] = []
        for extension in extensions:
            self.add(extension)

    def add(self, extension: Extension) -> None:
        """Add one; a name already present is an error (nothing replaces an extension silently)."""
        for present in self._items:
            if present.name == extension.name:
                raise ValueError(f"an extension named {extension.name!r} is already in this run "
                                 f"({type(present).__name__}); extension names must be unique")
        self._items.append(extension)

    def __iter__(self) -> Iterator[Extension]:
        # sorted() is stable: equal orders keep the order they were added in.
        return iter(sorted(self._items, key=lambda extension: extension.order))

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: str) -> bool:
        return any(extension.name == name for extension in self._items)

    def names(self) -> list[str]:
        return [extension.name for extension in self]

    def merged(self, more: Iterable[Extension]) -> "Extensions":
        """These and `more` (e.g. a mode's own for one pass), under the same uniqueness rule."""
        return Extensions([*self._items, *more])

    @contextmanager
    def patched(self, run: Any) -> Iterator[None]:
        """Enter every extension's run-wide patch, in order; exit them in reverse, whatever happens."""
        with ExitStack() as stack:
            for extension in self:
                manager = extension.patch(run)
                if manager is not None:
                    stack.enter_context(manager)
            yield

    def before_step(self, step: "StepContext") -> None:
        for extension in self:
            extension.before_step(step)

    def before_model(self, step: "StepContext", inputs: ModelInputs) -> None:
        for extension in self:
            extension.before_model(step, inputs)

    def after_guidance(self, step: "StepContext", inputs: ModelInputs, noise_pred: torch.Tensor) -> torch.Tensor:
        for extension in self:
            noise_pred = extension.after_guidance(step, inputs, noise_pred)
        return noise_pred

    def after_step(self, step: "StepContext") -> None:
        for extension in self:
            extension.after_step(step)

    def infotext(self) -> dict[str, Any]:
        entries: dict[str, Any] = {}
        for extension in self:
            entries.update(extension.infotext())
        return entries


ExtensionFactory = Callable[[dict[str, Any], Any], Extension]


def installed_extensions() -> dict[str, ExtensionFactory]:
    """name -> factory of the extensions that installed packages register under the ``dapple.extensions``
    entry-point group (read when asked, never at import)."""
    return {entry.name: entry.load() for entry in entry_points(group=ENTRY_POINT_GROUP)}


def requested_extensions(requested: dict[str, dict[str, Any]], components: Any,
                         factories: dict[str, ExtensionFactory] | None = None) -> list[Extension]:
    """Build the plugin extensions a request names ({name: args}); an unknown name lists the installed ones."""
    if not requested:
        return []
    factories = installed_extensions() if factories is None else factories
    built = []
    for name, args in requested.items():
        if name not in factories:
            installed = ", ".join(sorted(factories)) or "none are installed"
            raise InvalidRequestError(f"extension {name!r} is not installed; installed extensions "
                                      f"(entry points in {ENTRY_POINT_GROUP!r}): {installed}")
        extension = factories[name](dict(args or {}), components)
        if not isinstance(extension, Extension):
            raise TypeError(f"the {name!r} extension's factory returned {type(extension).__name__}, not an Extension")
        if extension.order < ORDER_USER:
            raise ValueError(f"extension {name!r} asks for order {extension.order}; plugins run at order "
                             f">= {ORDER_USER}, after Dapple's own")
        built.append(extension)
    return built
