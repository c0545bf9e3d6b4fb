"""Model family -> diffusers pipeline classes: one explicit table (cf. diffusers' auto_pipeline).

`base` loads the base model alone; `controlnet` is the img2img ControlNet variant built from
it with `from_pipe` (shared components). A family missing here cannot be enabled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Family:
    name: str
    base: str
    controlnet: str
    # SDXL also conditions on original size / crop; its tiny and real UNets expect it.
    micro_conditioning: bool = False


FAMILIES: dict[str, Family] = {
    "sd15": Family(
        name="sd15",
        base="StableDiffusionPipeline",
        controlnet="StableDiffusionControlNetImg2ImgPipeline",
    ),
    "sdxl": Family(
        name="sdxl",
        base="StableDiffusionXLPipeline",
        controlnet="StableDiffusionXLControlNetImg2ImgPipeline",
        micro_conditioning=True,
    ),
}


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"model family {name!r} has no pipeline in posegen yet") from None


def pipeline_class(class_name: str) -> Any:
    import diffusers

    return getattr(diffusers, class_name)
