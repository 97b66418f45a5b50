"""Key names in one place: the official files' prefixes, and the two other namings mapped to ours: the HF CLIP text
model's (SD1's text encoder in the official files) and diffusers' ControlNet's (ControlNets saved by diffusers)."""
import torch

UNET, CONTROL, VAE = "model.diffusion_model.", "control_model.", "first_stage_model."
TEXT_HF, TEXT_OC = "cond_stage_model.transformer.text_model.", "cond_stage_model.model."


# HF CLIPTextModel (text_model.*) names -> open_clip's: the embeddings and final norm, and layer i's (HF_LAYER).
# q, k and v are packed into in_proj in that order.
HF_NAMES = {"embeddings.token_embedding.weight": "token_embedding.weight",
            "embeddings.position_embedding.weight": "positional_embedding",
            "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
HF_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
            "self_attn.out_proj": "attn.out_proj"}


def hf_names(layers: int) -> dict:
    """HF key -> open_clip key of every weight that is only renamed (q, k, v are packed: not among them)."""
    return HF_NAMES | {f"encoder.layers.{i}.{a}.{p}": f"transformer.resblocks.{i}.{b}.{p}"
                       for i in range(layers) for a, b in HF_LAYER.items() for p in ("weight", "bias")}


def from_hf(sd: dict, layers: int) -> dict:
    """SD1 checkpoint keys (after `cond_stage_model.transformer.text_model.`) -> TextEncoder state dict."""
    out = {oc: sd[hf] for hf, oc in hf_names(layers).items()}
    for i in range(layers):
        for p in ("weight", "bias"):
            qkv = [sd[f"encoder.layers.{i}.self_attn.{x}_proj.{p}"] for x in "qkv"]
            out[f"transformer.resblocks.{i}.attn.in_proj_{p}"] = torch.cat(qkv)
    return out


def to_hf(sd: dict, layers: int) -> dict:
    """The inverse of from_hf, adding the `embeddings.position_ids` buffer the released SD1 files carry."""
    out = {hf: sd[oc] for hf, oc in hf_names(layers).items()}
    out["embeddings.position_ids"] = torch.arange(sd["positional_embedding"].shape[0])[None]
    for i in range(layers):
        for p in ("weight", "bias"):
            for x, part in zip("qkv", sd[f"transformer.resblocks.{i}.attn.in_proj_{p}"].chunk(3)):
                out[f"encoder.layers.{i}.self_attn.{x}_proj.{p}"] = part
    return out


RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def from_diffusers(sd: dict, settings: dict = None) -> dict:
    """A diffusers ControlNetModel's weights under the official names: blocks by level (down_blocks.L.resnets.J)
    become blocks in order (input_blocks.I), ResBlock layers by role become numbered (RESNET); keys that fit no block
    stay, for fill to name. settings: its config.json, whose BGR order flips the first convolution's weights."""
    levels = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("down_blocks.")), default=-1)
    per_level = 1 + max((int(k.split(".")[3]) for k in sd if k.startswith("down_blocks.0.resnets.")), default=-1)
    names = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "mid_block.resnets.0": "middle_block.0",
             "mid_block.attentions.0": "middle_block.1", "mid_block.resnets.1": "middle_block.2",
             "controlnet_mid_block": "middle_block_out.0", "controlnet_cond_embedding.conv_in": "input_hint_block.0",
             "controlnet_cond_embedding.conv_out": "input_hint_block.14"}
    names |= {f"controlnet_cond_embedding.blocks.{j}": f"input_hint_block.{2 * j + 2}" for j in range(6)}
    i = 1                                            # input_blocks.0 is conv_in
    for level in range(levels):
        for j in range(per_level):
            names |= {f"down_blocks.{level}.resnets.{j}": f"input_blocks.{i}.0",
                      f"down_blocks.{level}.attentions.{j}": f"input_blocks.{i}.1"}
            i += 1
        if level < levels - 1:
            names[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{i}.0.op"
            i += 1
    names |= {f"controlnet_down_blocks.{j}": f"zero_convs.{j}.0" for j in range(i)}

    def rename(key):
        block = next((b for b in names if key.startswith(b + ".")), None)
        if block is None:
            return key
        layer, dot, rest = key[len(block) + 1:].partition(".")
        return f"{names[block]}.{RESNET.get(layer, layer)}{dot}{rest}"       # RESNET's names are in ResBlocks alone
    out = {rename(key): w for key, w in sd.items()}
    if (settings or {}).get("controlnet_conditioning_channel_order") == "bgr" and "input_hint_block.0.weight" in out:
        out["input_hint_block.0.weight"] = out["input_hint_block.0.weight"].flip(1)
    return out
