"""Build the tiny development models: real diffusers pipelines, small random weights.

Deterministic (fixed seeds, generated tokenizer files) and offline. The VAE has four blocks
so latents are 1/8 of the image, as in the real models; SDXL has both text encoders and the
text_time embedding. They produce noise, not portraits, and exercise every code path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_MODELS = {
    # model dir name -> family
    "tiny-sd15": "sd15",
    "tiny-sdxl": "sdxl",
}


def _byte_chars() -> list[str]:
    """GPT-2/CLIP's byte -> printable character table (every byte is a token)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _tokenizer() -> Any:
    """A CLIP BPE tokenizer over bytes: every byte alone and word-final, a few merges."""
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("o", "n</w>"), ("p", "e"), ("r", "s")]
    tokens = [*chars, *(c + "</w>" for c in chars), *("".join(m) for m in merges)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    # The backend (tokenizers' BPE) takes merges as pairs; transformers annotates them as str.
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)  # type: ignore[arg-type]


def _text_config(vocab_size: int) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        projection_dim=32,
        max_position_embeddings=77,
        hidden_act="gelu",
    )


def _vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(16, 32, 32, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=128,
    )


def _scheduler() -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


# The UNet both tiny families share; each adds its conditioning on top.
_TINY_UNET = {
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
}


def _build(out: Path, name: str, unet_config: dict[str, Any], make_pipe: Any) -> None:
    """Seeded, in a fixed order, so a build is the same bytes every time."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**_TINY_UNET, **unet_config)
    torch.manual_seed(1)
    controlnet = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=(16, 32, 48, 64)
    )
    torch.manual_seed(2)
    vae = _vae()
    torch.manual_seed(3)
    pipe = make_pipe(unet=unet, vae=vae, scheduler=_scheduler())
    pipe.save_pretrained(out / name, safe_serialization=True)
    controlnet.save_pretrained(out / f"{name}-controlnet", safe_serialization=True)


def build_sd15(out: Path) -> None:
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    def make_pipe(**components: Any) -> Any:
        tokenizer = _tokenizer()
        return StableDiffusionPipeline(
            text_encoder=CLIPTextModel(_text_config(len(tokenizer))),
            tokenizer=tokenizer,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            **components,
        )

    _build(out, "tiny-sd15", {"cross_attention_dim": 32, "attention_head_dim": 4}, make_pipe)


def build_sdxl(out: Path) -> None:
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    def make_pipe(**components: Any) -> Any:
        tokenizer, tokenizer_2 = _tokenizer(), _tokenizer()
        text_encoder = CLIPTextModel(_text_config(len(tokenizer)))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(len(tokenizer_2)))
        return StableDiffusionXLPipeline(
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            **components,
        )

    unet_config = {
        "attention_head_dim": (2, 4),
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "transformer_layers_per_block": (1, 2),
        "projection_class_embeddings_input_dim": 80,  # 6 * 8 (time ids) + 32 (pooled text)
        "cross_attention_dim": 64,  # 32 + 32: both text encoders' hidden states, concatenated
    }
    _build(out, "tiny-sdxl", unet_config, make_pipe)


def build_tiny(model_dir: Path, *, force: bool = False) -> list[Path]:
    """Build the tiny models under `model_dir` (skipped where they exist, unless forced)."""
    built: list[Path] = []
    builders = {"tiny-sd15": build_sd15, "tiny-sdxl": build_sdxl}
    for name, builder in builders.items():
        marker = model_dir / name / "model_index.json"
        if marker.exists() and (model_dir / f"{name}-controlnet").is_dir() and not force:
            continue
        builder(model_dir)
        built.append(model_dir / name)
    return built
