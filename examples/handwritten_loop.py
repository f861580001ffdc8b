"""The diffusers tutorial's sampling loop, written by hand against Dapple's components.

Run it on any model folder:

    python examples/handwritten_loop.py MODEL_DIR "a red circle on a blue background" --seed 42

It gives the same image as `dapple generate` / `pipe.generate` with the same settings (tests/test_examples.py
checks this), because those run this very computation inside dapple.engine.loop.denoise.
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
) -> Image.Image:
    # 1. Text -> embeddings: [negative; prompt], each 77 CLIP tokens long.
    text = pipe.encode_prompt(prompt, negative_prompt, guidance_scale=guidance_scale)

    # 2. The sampler (a diffusers scheduler) and its timesteps.
    scheduler = pipe.make_scheduler(sampler)
    scheduler.set_timesteps(steps, device=pipe.device)

    # 3. Seeded noise in latent space, scaled to the sampler's starting noise level.
    latents = pipe.prepare_latents(seed) * scheduler.init_noise_sigma

    # 4. The loop: predict the noise for both halves, guide, step.
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        noise = pipe.unet(model_input, t, encoder_hidden_states=text.unet_batch).sample
        noise_uncond, noise_text = noise.chunk(2)
        noise = noise_uncond + guidance_scale * (noise_text - noise_uncond)
        latents = scheduler.step(noise, t, latents).prev_sample

    # 5. Latents -> pixels.
    return pipe.decode_latents(latents)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("prompt")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="handwritten.png")
    args = parser.parse_args()
    image = handwritten_txt2img(dapple.load(args.model), args.prompt, seed=args.seed, steps=args.steps)
    image.save(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
