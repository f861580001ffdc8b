"""The diffusers tutorial's sampling loop, written by hand against Dapple's components.

Run it on any model folder:

    python examples/handwritten_loop.py MODEL_DIR "a red circle on a blue background" --seed 42

It gives the same image as `dapple generate` / `pipe.generate` with the same settings (tests/test_examples.py
checks this, on a tiny model and on the built-in one), because those run this very computation inside
dapple.engine.loop.denoise. Like them, it takes the model's recommended settings (pipe.recommended_settings, from
the folder's generation_defaults.json: the built-in model's are DPM++ 2M, CFG 5, guidance only at t >= 600) for
whatever you do not set.
"""

from __future__ import annotations

import argparse

import torch
from PIL import Image

import dapple


@torch.inference_mode()
def handwritten_txt2img(
    pipe: dapple.Pipeline,
    prompt: str,
    *,
    negative_prompt: str = "",
    seed: int = 42,
    steps: int = 20,
    guidance_scale: float = 7.0,
    sampler: str = "Euler",
    guidance_min_timestep: int = 0,
) -> Image.Image:
    # 1. Text -> embeddings: [negative; prompt], each 77 CLIP tokens long.
    text = pipe.encode_prompt(prompt, negative_prompt, guidance_scale=guidance_scale)
    prompt_only = text.prompt_only()  # for the steps a guidance interval leaves unguided

    # 2. The sampler (a diffusers scheduler) and its timesteps.
    scheduler = pipe.make_scheduler(sampler)
    scheduler.set_timesteps(steps, device=pipe.device)

    # 3. Seeded noise in latent space, scaled to the sampler's starting noise level.
    latents = pipe.prepare_latents(seed) * scheduler.init_noise_sigma

    # 4. The loop: predict the noise for both halves, guide, step. Below guidance_min_timestep (a guidance
    #    interval, Kynkaanniemi et al. 2024) the prompt alone predicts, in one half-sized UNet call.
    for t in scheduler.timesteps:
        if guidance_scale > 1 and t >= guidance_min_timestep:
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            noise = pipe.unet(model_input, t, encoder_hidden_states=text.unet_batch).sample
            noise_uncond, noise_text = noise.chunk(2)
            noise = noise_uncond + guidance_scale * (noise_text - noise_uncond)
        else:
            model_input = scheduler.scale_model_input(latents, t)
            noise = pipe.unet(model_input, t, encoder_hidden_states=prompt_only.unet_batch).sample
        latents = scheduler.step(noise, t, latents).prev_sample

    # 5. Latents -> pixels.
    return pipe.decode_latents(latents)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="a diffusers folder (default: the built-in model)")
    parser.add_argument("prompt")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--out", default="handwritten.png")
    args = parser.parse_args()
    pipe = dapple.load(args.model)
    # Dapple's defaults, then the model's recommendation, then what was asked: what pipe.generate does.
    settings = {"steps": 20, "guidance_scale": 7.0, "sampler": "DPM++ 2M Karras", **pipe.recommended_settings}
    if args.steps is not None:
        settings["steps"] = args.steps
    print("settings:", ", ".join(f"{name}={value}" for name, value in settings.items()))
    image = handwritten_txt2img(pipe, args.prompt, seed=args.seed, **settings)
    image.save(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
