"""Which mode a request asks for, and the inputs it needs opened: the single entry point of the engine."""

from __future__ import annotations

from collections.abc import Iterable

from dapple.engine.depth import depth_tensor
from dapple.engine.extensions import Extension
from dapple.engine.generation import output_size
from dapple.engine.hires import hires_size
from dapple.engine.hooks import StepHooks
from dapple.engine.images import open_image
from dapple.engine.img2img import depth2img, img2img
from dapple.engine.inpaint import inpaint, outpaint
from dapple.engine.txt2img import txt2img
from dapple.errors import InvalidRequestError
from dapple.models.components import Components
from dapple.request import GenerationRequest, GenerationResult, Limits


def run_request(
    components: Components, request: GenerationRequest, hooks: StepHooks | None = None, limits: Limits | None = None,
    extensions: Iterable[Extension] = (),
) -> GenerationResult:
    """Open the request's images (refusing ones over the pixel limit before decoding) and run its mode with the
    given extensions (ControlNet units, plugins, the caller's own)."""
    limits = limits or Limits()
    mode = request.mode
    refuse_mode_for_model(components, mode)
    if mode == "txt2img":
        if request.hires_scale > 1:
            native = components.native_size
            limits.check_size(*hires_size(request.width or native, request.height or native, request.hires_scale),
                              "hires fix target")
        return txt2img(components, request, hooks, extensions)
    init_image = open_image(request.init_image, max_pixels=limits.max_image_pixels, what="init_image")
    width, height = output_size(request, init_image)
    limits.check_size(width + request.outpaint_left + request.outpaint_right,
                      height + request.outpaint_top + request.outpaint_bottom)
    if mode == "inpaint":
        mask = open_image(request.mask, max_pixels=limits.max_image_pixels, what="mask")
        return inpaint(components, request, hooks, init_image, mask, extensions)
    if mode == "outpaint":
        return outpaint(components, request, hooks, init_image, extensions)
    if components.unet_kind != "depth":
        if request.depth_map is not None:
            raise InvalidRequestError(
                f"depth_map needs a depth model (a UNet with {components.latent_channels + 1} input channels, "
                f"like SD 2 depth); this model's UNet takes {components.unet.config.in_channels}"
            )
        return img2img(components, request, hooks, init_image, extensions=extensions)
    depth = None
    if request.depth_map is not None:
        source = request.depth_map
        if not hasattr(source, "shape"):  # an image (PIL, path, bytes); arrays and tensors are taken as they are
            source = open_image(source, max_pixels=limits.max_image_pixels, what="depth_map")
        depth = depth_tensor(source)
    return depth2img(components, request, hooks, init_image, depth, extensions)


def refuse_mode_for_model(components: Components, mode: str) -> None:
    """Modes a model's UNet cannot run, refused before any work: a depth UNet needs an image and its depth map."""
    if components.unet_kind != "depth":
        return
    if mode == "txt2img":
        raise InvalidRequestError("this is a depth model (5-channel UNet): give init_image and depth_map (depth2img)")
    if mode in ("inpaint", "outpaint"):
        raise InvalidRequestError("depth models (5-channel UNet) cannot inpaint; use an inpainting or standard model")
