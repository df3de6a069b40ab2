"""Kimi-VL for training: MoonViT, the patch-merging projector and the DeepSeek-V3 language model.

transformers has no Kimi-VL class (the hub's is remote code that needs flash-attention and
torchvision), so thinkrl carries its own, computing what vLLM's `kimi_vl` computes, op for op:

- MoonViT: 14 px patches through a convolution, plus a learnable 2D position embedding (bicubically
  resized when the patch grid differs from its own); transformer blocks with full attention inside
  each image and a 2D rotary embedding (interleaved pairs: even frequencies rotate by the column,
  odd by the row); a final LayerNorm.
- The merger: each 2x2 block of patches becomes one token (the four patch vectors side by side).
- The projector: LayerNorm, Linear, GELU (erf), Linear to the language model's width.
- The language model: transformers' DeepSeek-V3 (MLA, MoE). Each `<|media_pad|>` of the (expanded)
  prompt takes the next image token's embedding.

Parameter names are the checkpoint's (`vision_tower.encoder.blocks.0.wqkv.weight`,
`multi_modal_projector.linear_1.weight`, `language_model.model.layers...`), so a real
Kimi-VL-A3B folder loads by path and what `save_pretrained` writes is what vLLM loads. Tests compare
this model's log-probs on image prompts with vLLM's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, PretrainedConfig, PreTrainedModel

VISION_DEFAULTS = dict(patch_size=14, init_pos_emb_height=64, init_pos_emb_width=64, num_attention_heads=16,
                       num_hidden_layers=27, hidden_size=1152, intermediate_size=4304, merge_kernel_size=[2, 2])


class KimiVLConfig(PretrainedConfig):
    """`config.json` of a Kimi-VL folder: `vision_config` (MoonViT, a dict), `text_config` (DeepSeek-V3)."""

    model_type = "kimi_vl"

    def __init__(self, vision_config: dict | None = None, text_config: dict | DeepseekV3Config | None = None,
                 media_placeholder_token_id: int = 163605, pad_token_id: int = 0, **kwargs) -> None:
        self.vision_config = {**VISION_DEFAULTS, **(vision_config or {})}
        if isinstance(text_config, dict):
            text = {k: v for k, v in text_config.items() if k != "model_type"}
            text_config = DeepseekV3Config(**text)
        self.text_config = text_config or DeepseekV3Config()
        self.media_placeholder_token_id = media_placeholder_token_id
        kwargs.setdefault("architectures", ["KimiVLForConditionalGeneration"])
        super().__init__(pad_token_id=pad_token_id, **kwargs)

    def to_dict(self) -> dict:
        out = super().to_dict()
        text = self.text_config.to_dict()
        text["model_type"] = "deepseek_v3"
        out["text_config"] = text
        return out


# ---- MoonViT ----------------------------------------------------------------------------------------


def rope_2d(grid_h: int, grid_w: int, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """cis of the 2D rotary angles of a grid, complex64 [h*w, head_dim/2], row-major positions.

    Pair 2i rotates by column x freq_i, pair 2i+1 by row x freq_i, freq_i = theta^(-4i/head_dim).
    """
    pos = torch.arange(grid_h * grid_w).float()
    x, y = pos % grid_w, torch.div(pos, grid_w, rounding_mode="floor")
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 4)[: head_dim // 4].float() / head_dim))
    x_cis = torch.polar(torch.ones(len(pos), len(freqs)), torch.outer(x, freqs).float())
    y_cis = torch.polar(torch.ones(len(pos), len(freqs)), torch.outer(y, freqs).float())
    return torch.stack([x_cis, y_cis], dim=-1).reshape(len(pos), -1)


def apply_rope(x_B_L_H_D: torch.Tensor, cis_L_D2: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (2i, 2i+1) of the last dimension by `cis` (as vLLM's MoonViT does, in float32)."""
    pairs = torch.view_as_complex(x_B_L_H_D.float().reshape(*x_B_L_H_D.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * cis_L_D2[:, None, :]).flatten(-2).type_as(x_B_L_H_D)


class _PosEmb(nn.Module):
    def __init__(self, height: int, width: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(height, width, dim))

    def forward(self, grid_h: int, grid_w: int) -> torch.Tensor:
        if (grid_h, grid_w) == tuple(self.weight.shape[:2]):
            return self.weight.flatten(end_dim=1)
        resized = F.interpolate(self.weight.permute(2, 0, 1)[None], size=(grid_h, grid_w), mode="bicubic")
        return resized[0].permute(1, 2, 0).flatten(end_dim=1)


class _PatchEmbed(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        p = cfg["patch_size"]
        self.proj = nn.Conv2d(3, cfg["hidden_size"], kernel_size=p, stride=p)
        self.pos_emb = _PosEmb(cfg["init_pos_emb_height"], cfg["init_pos_emb_width"], cfg["hidden_size"])


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc0 = nn.Linear(dim, hidden)
        self.fc1 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(F.gelu(self.fc0(x), approximate="tanh"))


class _Block(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        dim = cfg["hidden_size"]
        self.heads = cfg["num_attention_heads"]
        self.norm0 = nn.LayerNorm(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.wqkv = nn.Linear(dim, 3 * dim)
        self.wo = nn.Linear(dim, dim)
        self.mlp = _MLP(dim, cfg["intermediate_size"])

    def forward(self, x_B_L_D: torch.Tensor, cis_L_D2: torch.Tensor) -> torch.Tensor:
        B, L, D = x_B_L_D.shape
        qkv = self.wqkv(self.norm0(x_B_L_D)).view(B, L, 3, self.heads, D // self.heads)
        q, k, v = qkv.unbind(dim=2)
        q, k = apply_rope(q, cis_L_D2), apply_rope(k, cis_L_D2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x_B_L_D = x_B_L_D + self.wo(out.transpose(1, 2).reshape(B, L, D))
        return x_B_L_D + self.mlp(self.norm1(x_B_L_D))


class _Encoder(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Block(cfg) for _ in range(cfg["num_hidden_layers"])])
        self.final_layernorm = nn.LayerNorm(cfg["hidden_size"])


class MoonViT(nn.Module):
    """The vision tower: pixel patches of images -> one vector per 2x2 patch block (concatenated)."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = _PatchEmbed(cfg)
        self.encoder = _Encoder(cfg)

    def forward(self, pixel_values_N_C_P_P: torch.Tensor, grid_hws: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Per image, its merged tokens [(h/kh)(w/kw), kh*kw*D]; images with equal grids share one pass."""
        kh, kw = self.cfg["merge_kernel_size"]
        D = self.cfg["hidden_size"]
        head_dim = D // self.cfg["num_attention_heads"]
        patches = self.patch_embed.proj(pixel_values_N_C_P_P).flatten(1)  # [N, D]
        starts = [0]
        for h, w in grid_hws:
            starts.append(starts[-1] + h * w)
        out: list[torch.Tensor | None] = [None] * len(grid_hws)
        for (h, w) in sorted(set(map(tuple, grid_hws))):
            members = [i for i, g in enumerate(grid_hws) if tuple(g) == (h, w)]
            x = torch.stack([patches[starts[i] : starts[i + 1]] for i in members])  # [B, h*w, D]
            x = x + self.patch_embed.pos_emb(h, w)
            cis = rope_2d(h, w, head_dim).to(x.device)
            for block in self.encoder.blocks:
                x = block(x, cis)
            x = self.encoder.final_layernorm(x)
            merged = x.view(len(members), h // kh, kh, w // kw, kw, D).permute(0, 1, 3, 2, 4, 5)
            merged = merged.reshape(len(members), (h // kh) * (w // kw), kh * kw, D)
            for row, i in enumerate(members):
                out[i] = merged[row]
        return out  # type: ignore[return-value]


class _Projector(nn.Module):
    def __init__(self, config: KimiVLConfig) -> None:
        super().__init__()
        v = config.vision_config
        self.width = v["hidden_size"] * v["merge_kernel_size"][0] * v["merge_kernel_size"][1]
        self.pre_norm = nn.LayerNorm(v["hidden_size"], eps=1e-5)
        self.linear_1 = nn.Linear(self.width, self.width)
        self.linear_2 = nn.Linear(self.width, config.text_config.hidden_size)

    def forward(self, merged_T_K_D: torch.Tensor) -> torch.Tensor:
        x = self.pre_norm(merged_T_K_D).view(-1, self.width)
        return self.linear_2(F.gelu(self.linear_1(x)))


class KimiVLForConditionalGeneration(PreTrainedModel):
    """Kimi-VL (see the module docstring). `embed_inputs` is what the trainer's forward starts from."""

    config_class = KimiVLConfig
    base_model_prefix = "kimi_vl"
    _supports_sdpa = True
    _no_split_modules = ["_Block", "DeepseekV3DecoderLayer"]

    def __init__(self, config: KimiVLConfig) -> None:
        super().__init__(config)
        self.vision_tower = MoonViT(config.vision_config)
        self.multi_modal_projector = _Projector(config)
        config.text_config._attn_implementation = config._attn_implementation or "sdpa"
        self.language_model = DeepseekV3ForCausalLM(config.text_config)
        self.post_init()

    def _init_weights(self, module) -> None:
        std = 0.02
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, _PosEmb):
            nn.init.normal_(module.weight, std=std)

    def get_decoder(self):
        return self.language_model.model

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def image_features(self, pixel_values: torch.Tensor, grid_hws: list[tuple[int, int]],
                       order: list[int] | None = None) -> torch.Tensor:
        """The language-model embeddings of the images' tokens, [tokens, H]: of the images in order, or of
        `order`'s (indices into them; an image used several times is computed once)."""
        merged = self.vision_tower(pixel_values.to(self.vision_tower.patch_embed.proj.weight.dtype), grid_hws)
        per_image = self.multi_modal_projector(torch.cat(merged)).split([len(m) for m in merged])
        return torch.cat([per_image[i] for i in (order if order is not None else range(len(per_image)))])

    def embed_inputs(self, input_ids_B_T: torch.Tensor, pixel_values: torch.Tensor | None,
                     grid_hws: list[tuple[int, int]], row_tokens: list[int] | None = None,
                     order: list[int] | None = None) -> torch.Tensor:
        """Token embeddings with the image tokens' features in place of `<|media_pad|>`, row-major.

        `row_tokens`: image tokens of each row; a row's first that many placeholders are its images, any
        later one was generated and stays text (as vLLM embeds it). None: every placeholder is an image.
        `order`: which of the given (distinct) images each placeholder-ordered image is (None: in order).
        Raises ValueError when the placeholders and the images' tokens differ in number.
        """
        embeds = self.get_input_embeddings()(input_ids_B_T)
        slots = input_ids_B_T == self.config.media_placeholder_token_id
        if row_tokens is not None:
            limit = torch.tensor(row_tokens, device=slots.device)[:, None]
            slots = slots & (slots.long().cumsum(-1) <= limit)
        if pixel_values is None or not grid_hws:
            if row_tokens is None and slots.any():
                raise ValueError(f"{int(slots.sum())} image placeholder tokens but no image")
            return embeds
        features = self.image_features(pixel_values, grid_hws, order).to(embeds.dtype)
        if int(slots.sum()) != features.shape[0]:
            raise ValueError(f"{int(slots.sum())} image placeholder tokens for {features.shape[0]} image tokens")
        return embeds.masked_scatter(slots[..., None], features)


def register() -> None:
    """Make transformers' Auto classes know `kimi_vl` (AutoTokenizer reads a folder's config first)."""
    from transformers import AutoConfig

    AutoConfig.register("kimi_vl", KimiVLConfig, exist_ok=True)
