"""The inspection lab: every component and every step of Stable Diffusion, as pictures.

Each function takes a loaded Pipeline (or just a noise-schedule config), writes its figures into an output
folder and returns an Inspection: the files written and the numbers worth printing. `dapple inspect ...` on the
command line calls these.
"""

from dapple.inspect.denoise import denoise_steps
from dapple.inspect.embeddings import embeddings, token_table
from dapple.inspect.grids import parameter_grid
from dapple.inspect.result import Inspection
from dapple.inspect.schedule import noise_schedule
from dapple.inspect.vae import compression_ratio, forward_noise, unet_call, vae_round_trip

__all__ = [
    "Inspection", "compression_ratio", "denoise_steps", "embeddings", "forward_noise", "noise_schedule",
    "parameter_grid", "token_table", "unet_call", "vae_round_trip",
]
