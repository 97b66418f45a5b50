"""Frozen configs whose field names follow the official LDM / ControlNet yaml files, and the named presets."""
from dataclasses import dataclass, replace, asdict, fields
import json


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple = (4, 2, 1)   # downsampling factors that get a SpatialTransformer
    num_heads: int = 8                          # used when num_head_channels == -1
    num_head_channels: int = -1                 # SD2: fixed 64-wide heads
    context_dim: int = 768
    transformer_depth: int = 1
    use_linear_in_transformer: bool = False     # SD2: proj_in/proj_out are Linear, not 1x1 Conv
    hint_channels: int = 3                      # ControlNet input_hint_block input
    global_average_pooling: bool = False        # ControlNet 1.1 shuffle: pool each residual to 1x1

    def heads(self, channels: int) -> int:
        return channels // self.num_head_channels if self.num_head_channels > 0 else self.num_heads


@dataclass(frozen=True)
class VAEConfig:
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    in_channels: int = 3
    out_ch: int = 3
    scale_factor: float = 0.18215


@dataclass(frozen=True)
class TextConfig:
    layout: str = "hf"              # "hf": cond_stage_model.transformer.text_model.* (SD1); "open_clip": cond_stage_model.model.* (SD2)
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    activation: str = "quick_gelu"  # SD1 (OpenAI CLIP); SD2 uses exact "gelu"
    layer: str = "last"             # SD1: last block; SD2: "penultimate" block; ln_final is applied after either
    pad_id: int = 49407             # SD1 pads with <|endoftext|>; open_clip.tokenize pads with 0
    chunks: int = 1                 # pieces of 75 tokens, each encoded alone (the 1.1 lineart_anime demo uses 3)


@dataclass(frozen=True)
class ModelConfig:
    unet: UNetConfig = UNetConfig()
    vae: VAEConfig = VAEConfig()
    text: TextConfig = TextConfig()
    parameterization: str = "eps"   # "eps" or "v"

    @property
    def vae_down(self) -> int:
        """Image pixels per latent pixel, along a side: the VAE halves the size at every level but its last."""
        return 2 ** (len(self.vae.ch_mult) - 1)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this, for the UNet to halve the latents down to its deepest level."""
        return self.vae_down * 2 ** (len(self.unet.channel_mult) - 1)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> "ModelConfig":
        d = json.loads(text)
        def build(cls, values):
            return cls(**{f.name: tuple(values[f.name]) if isinstance(values[f.name], list) else values[f.name]
                          for f in fields(cls) if f.name in values})
        return ModelConfig(build(UNetConfig, d["unet"]), build(VAEConfig, d["vae"]), build(TextConfig, d["text"]),
                           d.get("parameterization", "eps"))


SD2_TEXT = TextConfig(layout="open_clip", width=1024, layers=24, heads=16, activation="gelu", layer="penultimate", pad_id=0)
SD2_UNET = UNetConfig(num_heads=-1, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)

# Tiny models share every code path with the real ones; GroupNorm(32) needs channel counts that are multiples of 32.
TINY_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                       num_heads=2, context_dim=64)
TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)
TINY_TEXT = TextConfig(width=64, layers=2, heads=2)

# the tiny world's model (minicontrol/world.py): 64x64 images, 8x8 latents, trained on CPU in minutes
WORLD_UNET = UNetConfig(model_channels=64, channel_mult=(1, 1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                        num_heads=2, context_dim=32)

PRESETS = {
    "sd15": ModelConfig(),
    "sd21": ModelConfig(unet=SD2_UNET, text=SD2_TEXT),
    "sd15-shuffle": ModelConfig(unet=UNetConfig(global_average_pooling=True)),   # ControlNet 1.1 shuffle
    "sd21-v": ModelConfig(unet=SD2_UNET, text=SD2_TEXT, parameterization="v"),
    "tiny": ModelConfig(unet=WORLD_UNET, vae=TINY_VAE, text=replace(TINY_TEXT, width=32)),
    "tiny-sd1": ModelConfig(unet=TINY_UNET, vae=TINY_VAE, text=TINY_TEXT),
    "tiny-sd2": ModelConfig(
        unet=replace(TINY_UNET, model_channels=64, num_heads=-1, num_head_channels=32, context_dim=64,
                     use_linear_in_transformer=True, attention_resolutions=(1, 2)),
        vae=TINY_VAE, text=replace(SD2_TEXT, width=64, layers=3, heads=2)),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
