"""Step previews: the latents of a running job as a small RGB image, by a fixed linear map
from the latent channels to RGB (no VAE decode, no extra weights).

The maps are the known least-squares fits of each latent space to the colours its VAE
decodes them to (as ComfyUI's latent previews use them): four channels to R, G, B, plus a
bias for SDXL's. The image has the latents' size (the output's size / 8); a browser scales
it up."""

from __future__ import annotations

import time
from typing import Any

from PIL import Image

LATENT_RGB: dict[str, tuple[list[list[float]], list[float]]] = {
    # rows: latent channels 0-3; columns: R, G, B
    "sd15": (
        [
            [0.3512, 0.2297, 0.3227],
            [0.3250, 0.4974, 0.2350],
            [-0.2829, 0.1762, 0.2721],
            [-0.2120, -0.2616, -0.7177],
        ],
        [0.0, 0.0, 0.0],
    ),
    "sdxl": (
        [
            [0.3651, 0.4232, 0.4341],
            [-0.2533, -0.0042, 0.1068],
            [0.1076, 0.1111, -0.0362],
            [-0.3165, -0.2492, -0.2188],
        ],
        [0.1084, -0.0175, -0.0011],
    ),
}


def latents_to_image(latents: Any, family: str) -> Image.Image:
    """The first image of a (batch, 4, h, w) latent tensor, projected to RGB (h x w)."""
    import torch

    factors, bias = LATENT_RGB[family]
    sample = latents[0].float()
    weights = torch.tensor(factors, device=sample.device)
    offset = torch.tensor(bias, device=sample.device)
    rgb = torch.einsum("chw,cr->hwr", sample, weights) + offset
    # The projection lands in about -1..1, as the VAE's output does.
    pixels = ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8).cpu().numpy()
    return Image.fromarray(pixels, "RGB")


class Schedule:
    """When a preview is due: at the first step, then at most once every `interval`
    seconds (so a fast model's previews cost the same share of its run as a slow one's)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last = -float("inf")

    def due(self) -> bool:
        now = time.monotonic()
        if now - self._last < self.interval:
            return False
        self._last = now
        return True
