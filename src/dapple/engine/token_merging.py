"""Token merging as a loop extension: ToMe for SD (Bolya & Hoffman, 2023, "Token Merging for Fast Stable
Diffusion"), after Bolya et al., 2023, "Token Merging: Your ViT But Faster".

Neighbouring latent pixels are often near duplicates. Before self-attention in the highest-resolution
transformer blocks, ToMe splits the tokens into a destination set (one random token per sx x sy cell) and a
source set, matches every source token to its most similar destination (cosine similarity of the block's input
tokens: bipartite soft matching), averages the r = int(N * ratio) best-matched sources into their destinations,
runs the attention on the N - r tokens left, and unmerges the output (each merged source gets its destination's
output) before the residual add. tomesd's defaults: self-attention only, sx = sy = 2, random destinations.

Why not tomesd (0.1.3, 2023): it still runs on today's diffusers, but by replacing BasicTransformerBlock's whole
forward with a 2023 copy of it (which drops what diffusers added since: GLIGEN, positional embeddings, chunked
feed-forward, the ada_norm_single/continuous norms), and its random destinations come from a generator forked
from torch's global RNG state, so a seed no longer reproduces an image. This module touches no forward: it puts
removable hooks on the blocks' attention modules (merge the attention's input, unmerge its output, which is
where tomesd merges), and draws each image's destinations from a CPU torch.Generator seeded by that image's seed.
The partition is drawn per image and shared by its unconditional and conditional rows, so image i of a batch
is image i of a single run with seed + i, and an unguided (odd) batch keeps its random destinations (tomesd
turns them off there).

"Highest resolution" = the finest level that has transformer blocks: the first down block and the last up
block for SD 1.x/2.x (tomesd's max_downsample=1), the second level for SDXL, whose first level has no attention
(tomesd's max_downsample=1 leaves SDXL unmerged).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from dapple.engine.extensions import Extension, ModelInputs
from dapple.errors import InvalidRequestError

if TYPE_CHECKING:
    from dapple.engine.hooks import StepContext

MAX_RATIO = 0.9  # the request field's bound (0: off)
ORDER_TOKEN_MERGING = 410  # after the feature cache (400), before user extensions (500)

Merge = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def destination_choice(generators: Sequence[torch.Generator], rows: int, cells_h: int, cells_w: int, sx: int,
                       sy: int) -> torch.Tensor:
    """(rows, cells_h, cells_w): which position of each sy x sx cell is the destination token, drawn per image
    from its generator; a batch of `rows` = copies x images rows (the guided batch holds each image twice)
    repeats the images' draws, so an image's unconditional and conditional rows share their partition."""
    draws = torch.stack([torch.randint(sx * sy, (cells_h, cells_w), generator=generator)
                         for generator in generators])
    return draws.repeat(rows // len(generators), 1, 1)


def bipartite_soft_matching_2d(metric: torch.Tensor, width: int, height: int, r: int, sx: int = 2, sy: int = 2,
                               choice: torch.Tensor | None = None) -> tuple[Merge, Merge]:
    """ToMe's bipartite soft matching on a (B, N = height * width, C) token grid (row-major, as diffusers'
    Transformer2DModel lays it out): merge(x) -> (B, N - r', C) and its unmerge, with r' = min(r, sources).

    choice (B, height // sy, width // sx) picks the destination in each cell; None: the top-left token (tomesd's
    no_rand). Tokens outside whole cells (odd sizes) are sources."""
    batch, tokens, _ = metric.shape
    cells_h, cells_w = height // sy, width // sx
    if r <= 0 or cells_h == 0 or cells_w == 0:
        return _identity, _identity
    if tokens != height * width:
        raise ValueError(f"{tokens} tokens do not form a {height}x{width} grid")
    device = metric.device
    with torch.no_grad():
        if choice is None:
            choice = torch.zeros((batch, cells_h, cells_w), dtype=torch.int64)
        choice = choice.to(device=device, dtype=torch.int64)
        # -1 marks the destination in each cell, 0 the sources; a stable argsort puts dst | src, each in
        # token order (stable: the same partition on every device).
        marks = torch.zeros((batch, cells_h, cells_w, sy * sx), dtype=torch.int64, device=device)
        marks.scatter_(3, choice[..., None], -1)
        marks = marks.view(batch, cells_h, cells_w, sy, sx).permute(0, 1, 3, 2, 4).reshape(
            batch, cells_h * sy, cells_w * sx)
        if cells_h * sy < height or cells_w * sx < width:
            full = torch.zeros((batch, height, width), dtype=torch.int64, device=device)
            full[:, : cells_h * sy, : cells_w * sx] = marks
            marks = full
        order = marks.reshape(batch, tokens).argsort(dim=1, stable=True)[..., None]
        destinations = cells_h * cells_w
        a_idx, b_idx = order[:, destinations:], order[:, :destinations]  # sources, destinations

        metric = metric / metric.norm(dim=-1, keepdim=True)
        a = metric.gather(1, a_idx.expand(-1, -1, metric.shape[-1]))
        b = metric.gather(1, b_idx.expand(-1, -1, metric.shape[-1]))
        scores = a @ b.transpose(-1, -2)
        r = min(a.shape[1], r)
        node_max, node_idx = scores.max(dim=-1)  # each source's best destination
        edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)[..., None]
        unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]  # kept sources, merged sources (most similar first)
        dst_idx = node_idx[..., None].gather(1, src_idx)
        unm_positions = a_idx.gather(1, unm_idx)
        src_positions = a_idx.gather(1, src_idx)

    def merge(x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[-1]
        src = x.gather(1, a_idx.expand(-1, -1, channels))
        dst = x.gather(1, b_idx.expand(-1, -1, channels))
        unm = src.gather(1, unm_idx.expand(-1, -1, channels))
        src = src.gather(1, src_idx.expand(-1, -1, channels))
        dst = dst.scatter_reduce(1, dst_idx.expand(-1, -1, channels), src, reduce="mean")
        return torch.cat([unm, dst], dim=1)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[-1]
        kept = unm_idx.shape[1]
        unm, dst = x[:, :kept], x[:, kept:]
        src = dst.gather(1, dst_idx.expand(-1, -1, channels))
        out = torch.zeros((x.shape[0], tokens, channels), device=x.device, dtype=x.dtype)
        out.scatter_(1, b_idx.expand(-1, -1, channels), dst)
        out.scatter_(1, unm_positions.expand(-1, -1, channels), unm)
        out.scatter_(1, src_positions.expand(-1, -1, channels), src)
        return out

    return merge, unmerge


def finest_transformer_blocks(unet: torch.nn.Module) -> tuple[int, list[torch.nn.Module]]:
    """(level, blocks): the BasicTransformerBlocks at the finest resolution level that has any (level L works
    on the latents downsampled L times), in the down and up blocks."""
    from diffusers.models.attention import BasicTransformerBlock

    levels = len(unet.down_blocks)
    by_level: dict[int, list[torch.nn.Module]] = {}
    placed = [(i, block) for i, block in enumerate(unet.down_blocks)]
    placed += [(levels - 1, unet.mid_block)] if getattr(unet, "mid_block", None) is not None else []
    placed += [(levels - 1 - j, block) for j, block in enumerate(unet.up_blocks)]
    for level, block in placed:
        found = [module for module in block.modules() if isinstance(module, BasicTransformerBlock)]
        by_level.setdefault(level, []).extend(found)
    with_blocks = sorted(level for level, found in by_level.items() if found)
    if not with_blocks:
        raise InvalidRequestError("token_merging_ratio needs a UNet with transformer (attention) blocks; this one "
                                  "has none: use token_merging_ratio 0 (off)")
    return with_blocks[0], by_level[with_blocks[0]]


def grid_at_level(height: int, width: int, level: int) -> tuple[int, int]:
    """The token grid of level `level`: each diffusers Downsample2D (3x3, stride 2, padding 1) takes ceil(n/2)."""
    for _ in range(level):
        height, width = (height + 1) // 2, (width + 1) // 2
    return height, width


def _first_tensor(args: tuple, kwargs: dict, name: str) -> torch.Tensor:
    return args[0] if args else kwargs[name]


def _with_first(args: tuple, kwargs: dict, name: str, value: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, name: value}


class TokenMerging(Extension):
    """ToMe for SD on the finest transformer blocks: self-attention (and optionally cross-attention and the
    MLP) runs on N - int(N * ratio) tokens. ratio_hr > 0 replaces ratio in the hires pass (A1111's
    token_merging_ratio_hr: 0 = the same as ratio)."""

    name = "token merging"
    order = ORDER_TOKEN_MERGING
    needs_torch_unet = True  # it patches the torch UNet's modules

    def __init__(self, ratio: float, ratio_hr: float = 0.0, *, merge_attn: bool = True,
                 merge_crossattn: bool = False, merge_mlp: bool = False, sx: int = 2, sy: int = 2,
                 use_rand: bool = True) -> None:
        for what, value in (("token_merging_ratio", ratio), ("token_merging_ratio_hr", ratio_hr)):
            check_ratio(value, what)
        self.ratio, self.ratio_hr = float(ratio), float(ratio_hr)
        self.merge_attn, self.merge_crossattn, self.merge_mlp = merge_attn, merge_crossattn, merge_mlp
        self.sx, self.sy, self.use_rand = sx, sy, use_rand
        self.hires_used = False
        self.merged_calls = 0  # attention/MLP calls that ran on merged tokens (tests, diagnostics)
        self._reset()

    def _reset(self) -> None:
        self._ratio = 0.0  # this UNet call's ratio; 0 outside the loop's calls
        self._size: tuple[int, int] = (0, 0)
        self._generators: list[torch.Generator] = []
        self._level = 0
        self._current: dict[int, tuple[Merge, Merge] | None] = {}

    # -- run-wide patch -----------------------------------------------------------------------------------------
    def patch(self, run: Any) -> Any:
        return self.patched(run.components.unet, run.seeds)

    @contextmanager
    def patched(self, unet: torch.nn.Module, seeds: Sequence[int]) -> Iterator[None]:
        """Hook the finest transformer blocks of `unet` for as long as this is held; one CPU generator per image,
        seeded by its seed, draws the random destinations. Every hook is removed on any exit."""
        self._reset()
        self._generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
        self._level, blocks = finest_transformer_blocks(unet)
        handles = []
        try:
            for block in blocks:
                handles.append(block.register_forward_pre_hook(self._block_start, with_kwargs=True))
                handles.append(block.register_forward_hook(self._block_end))
                targets = [("hidden_states", block.attn1, self.merge_attn)]
                if getattr(block, "attn2", None) is not None:
                    targets.append(("hidden_states", block.attn2, self.merge_crossattn))
                # diffusers' chunked feed-forward calls ff once per chunk: merging there would mix the chunks
                targets.append(("hidden_states", block.ff, self.merge_mlp and block._chunk_size is None))
                for argument, module, wanted in targets:
                    if wanted:
                        handles.append(module.register_forward_pre_hook(self._merger(block, argument),
                                                                        with_kwargs=True))
                        handles.append(module.register_forward_hook(self._unmerger(block)))
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._reset()

    def _block_start(self, block: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Compute this block's matching from its input tokens (tomesd's compute_merge)."""
        self._current[id(block)] = None
        if self._ratio <= 0:
            return
        x = _first_tensor(args, kwargs, "hidden_states")
        height, width = grid_at_level(*self._size, self._level)
        if x.ndim != 3 or x.shape[1] != height * width:
            return  # not the token grid this call was set up for: leave the block as it is
        cells_h, cells_w = height // self.sy, width // self.sx
        random = self.use_rand and cells_h and cells_w and self._generators
        if random and x.shape[0] % len(self._generators):
            return  # rows that are not copies of the run's images: leave the block as it is
        choice = destination_choice(self._generators, x.shape[0], cells_h, cells_w, self.sx, self.sy) if random \
            else None
        self._current[id(block)] = bipartite_soft_matching_2d(x, width, height, int(x.shape[1] * self._ratio),
                                                              self.sx, self.sy, choice)

    def _block_end(self, block: torch.nn.Module, args: tuple, output: Any) -> None:
        self._current.pop(id(block), None)

    def _merger(self, block: torch.nn.Module, argument: str) -> Callable[..., Any]:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            matching = self._current.get(id(block))
            if matching is None:
                return None
            self.merged_calls += 1
            return _with_first(args, kwargs, argument, matching[0](_first_tensor(args, kwargs, argument)))
        return hook

    def _unmerger(self, block: torch.nn.Module) -> Callable[..., Any]:
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
            matching = self._current.get(id(block))
            return None if matching is None else matching[1](output)
        return hook

    # -- per step ---------------------------------------------------------------------------------------------
    def before_model(self, step: "StepContext", inputs: ModelInputs) -> None:
        hires = step.phase == "hires"
        self.hires_used |= hires
        self._ratio = self.ratio_hr if hires and self.ratio_hr > 0 else self.ratio
        self._size = tuple(inputs.sample.shape[-2:])

    def after_guidance(self, step: "StepContext", inputs: ModelInputs, noise_pred: torch.Tensor) -> torch.Tensor:
        self._ratio = 0.0  # the UNet call is over: other calls run unmerged
        return noise_pred

    def infotext(self) -> dict[str, Any]:
        entries: dict[str, Any] = {}
        if self.ratio > 0:
            entries["Token merging ratio"] = self.ratio
        if self.hires_used and self.ratio_hr > 0:
            entries["Token merging ratio hr"] = self.ratio_hr
        return entries


def check_ratio(value: Any, what: str = "token_merging_ratio") -> float:
    """A merging ratio from 0 (off) to MAX_RATIO, or a clear error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= MAX_RATIO:
        raise InvalidRequestError(f"{what} must be a number from 0 (off) to {MAX_RATIO}; got {value!r}")
    return float(value)


def token_merging_extension(ratio: float, ratio_hr: float = 0.0, hires: bool = False) -> TokenMerging | None:
    """The request's token merging, or None when no pass merges (ratio 0, and ratio_hr 0 or no hires pass)."""
    extension = TokenMerging(ratio, ratio_hr)  # checks the values
    return extension if ratio > 0 or (hires and ratio_hr > 0) else None
