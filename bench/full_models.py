"""Full-size SD1.5 / SDXL UNet + ControlNet configs with random weights: the real models'
compute, no download. For measuring it/s on a GPU (and checking the code path on a CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def build_full(family: str, out: Path) -> tuple[str, str]:
    """Save a random-weight full-size pipeline and ControlNet under `out`; return their refs."""
    import torch

    base, cn = f"full-{family}", f"full-{family}-controlnet"
    if (out / base / "model_index.json").exists() and (out / cn).is_dir():
        return base, cn
    # Built on the GPU when there is one (random init of 2.6 B parameters is minutes on a
    # CPU), saved in fp16: what the bench loads on a GPU, and half the bytes to write.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        pipe, controlnet = _build(family)
    pipe.to(torch.float16)
    controlnet.to(torch.float16)
    pipe.save_pretrained(out / base, safe_serialization=True)
    controlnet.save_pretrained(out / cn, safe_serialization=True)
    del pipe, controlnet
    if device == "cuda":
        torch.cuda.empty_cache()
    return base, cn


def _build(family: str) -> tuple[Any, Any]:
    import torch
    from diffusers import (
        AutoencoderKL,
        ControlNetModel,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from worker.engine.tiny import _scheduler, _tokenizer

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=1024 if family == "sdxl" else 512,
    )
    tokenizer = _tokenizer()

    def text_config(hidden: int, layers: int, heads: int, projection: int) -> Any:
        return CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=hidden * 4,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            projection_dim=projection,
            max_position_embeddings=77,
            bos_token_id=len(tokenizer) - 2,
            eos_token_id=len(tokenizer) - 1,
            pad_token_id=len(tokenizer) - 1,
        )

    if family == "sd15":
        unet = UNet2DConditionModel(
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
            layers_per_block=2,
        )
        pipe: Any = StableDiffusionPipeline(
            vae=vae,
            text_encoder=CLIPTextModel(text_config(768, 12, 12, 768)),
            tokenizer=tokenizer,
            unet=unet,
            scheduler=_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        unet = UNet2DConditionModel(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            use_linear_projection=True,
            cross_attention_dim=2048,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            layers_per_block=2,
        )
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=CLIPTextModel(text_config(768, 12, 12, 768)),
            text_encoder_2=CLIPTextModelWithProjection(text_config(1280, 32, 20, 1280)),
            tokenizer=tokenizer,
            tokenizer_2=_tokenizer(),
            unet=unet,
            scheduler=_scheduler(),
        )
    return pipe, ControlNetModel.from_unet(unet)


def write_random_annotators(model_dir: Path) -> Path:
    """lllyasviel/Annotators' three OpenPose files with random weights (same layout and
    compute as the real ones), under model_dir, for loading tests and timing."""
    import torch
    from controlnet_aux.open_pose.body import bodypose_model
    from controlnet_aux.open_pose.face import FaceNet
    from controlnet_aux.open_pose.hand import handpose_model

    from worker.engine.pose.openpose import ANNOTATORS_REPO, WEIGHT_FILES

    folder = model_dir / ANNOTATORS_REPO
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    models = (bodypose_model(), handpose_model(), FaceNet())
    for name, model, strip in zip(WEIGHT_FILES, models, (True, True, False), strict=True):
        state = model.state_dict()
        if strip:  # controlnet-aux's transfer() expects keys without the first component
            state = {".".join(k.split(".")[1:]): v for k, v in state.items()}
        torch.save(state, folder / name)
    return folder
