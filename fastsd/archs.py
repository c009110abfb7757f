"""Architecture configs fastsd carries itself, so nothing is downloaded.

SD 1.x, 2.x and SD-XL base are the published diffusers configs of those checkpoints (the
numbers that define the networks); `tiny` and `tiny-xl` are the same architectures at a
width that runs in milliseconds on a CPU. Each entry is a plain dict per component, in diffusers' format.
"""

from __future__ import annotations

import copy

_SCHEDULER_SD = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}

_UNET_SD15 = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "use_linear_projection": False,
}

_VAE_SD = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

_TEXT_SD15 = {  # CLIP ViT-L/14 text tower
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}

_TEXT_SD21 = {  # OpenCLIP ViT-H/14 text tower, penultimate layer (23 of 24)
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 512,
}


def _sd15() -> dict:
    return {
        "unet": _UNET_SD15,
        "vae": _VAE_SD,
        "text_encoder": _TEXT_SD15,
        "scheduler": _SCHEDULER_SD,
        "pad_token": "<|endoftext|>",
    }


def _lcm_sd15() -> dict:
    """An LCM-distilled SD 1.5 (LCM-Dreamshaper v7's layout): the UNet also takes the guidance
    scale's embedding (time_cond_proj_dim 256) and runs without CFG; LCMScheduler."""
    spec = _sd15()
    spec["unet"] = dict(_UNET_SD15, time_cond_proj_dim=256)
    spec["scheduler"] = dict(_SCHEDULER_SD, _class_name="LCMScheduler", original_inference_steps=50,
                             timestep_scaling=10.0)
    del spec["scheduler"]["skip_prk_steps"]
    return spec


def _sd21() -> dict:
    unet = dict(_UNET_SD15, sample_size=96, cross_attention_dim=1024, use_linear_projection=True)
    unet["attention_head_dim"] = [5, 10, 20, 20]
    return {
        "unet": unet,
        "vae": _VAE_SD,
        "text_encoder": _TEXT_SD21,
        "scheduler": dict(_SCHEDULER_SD, prediction_type="v_prediction"),
        "pad_token": "!",
    }


def _sd_turbo() -> dict:
    """SD-Turbo's layout: SD 2.1-base (512, epsilon prediction), adversarially distilled to
    run in 1-4 steps without CFG; EulerDiscreteScheduler with trailing spacing."""
    spec = _sd21()
    spec["unet"] = dict(spec["unet"], sample_size=64)
    spec["scheduler"] = dict(_SCHEDULER_SD, _class_name="EulerDiscreteScheduler", timestep_spacing="trailing",
                             prediction_type="epsilon")
    del spec["scheduler"]["skip_prk_steps"]
    return spec


def _tiny() -> dict:
    """SD 1.x layout at width 32/64: a latent factor of 2 and VAE scale 0.5 on purpose,
    so nothing can silently assume SD's 8 and 0.18215."""
    return {
        "unet": {
            "sample_size": 16,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "block_out_channels": [32, 64],
            "layers_per_block": 1,
            "cross_attention_dim": 64,
            "attention_head_dim": 8,
            "norm_num_groups": 32,
            "use_linear_projection": False,
        },
        "vae": {
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": 4,
            "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2,
            "block_out_channels": [32, 64],
            "layers_per_block": 1,
            "norm_num_groups": 32,
            "sample_size": 32,
            "scaling_factor": 0.5,
        },
        "text_encoder": {
            "vocab_size": 1000,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 1,  # hidden // 64, the rule SD 1.x and 2.x follow
            "max_position_embeddings": 77,
            "hidden_act": "quick_gelu",
            "projection_dim": 64,
        },
        "scheduler": _SCHEDULER_SD,
        "pad_token": "<|endoftext|>",
    }


def _tiny2() -> dict:
    """`tiny` in the SD 2.x layout: linear attention projections, 64-wide heads, GELU text
    tower, v-prediction; what the single-file loader infers for an SD 2.x file."""
    spec = _tiny()
    spec["unet"].update(use_linear_projection=True, attention_head_dim=[1, 1])
    spec["text_encoder"]["hidden_act"] = "gelu"
    spec["scheduler"] = dict(_SCHEDULER_SD, prediction_type="v_prediction")
    spec["pad_token"] = "!"
    return spec


_SCHEDULER_SDXL = dict(  # stabilityai/stable-diffusion-xl-base-1.0's scheduler_config.json: SD's betas
    _SCHEDULER_SD, _class_name="EulerDiscreteScheduler", sample_max_value=1.0, interpolation_type="linear",
    use_karras_sigmas=False)


_TEXT_SDXL_2 = {  # OpenCLIP ViT-bigG/14 text tower with its projection (CLIPTextModelWithProjection)
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}


def _sdxl() -> dict:
    """SD-XL base 1.0: two text towers (CLIP ViT-L, OpenCLIP bigG), pooled-text and
    size/crop conditioning through the UNet's "text_time" added embedding."""
    unet = {
        "sample_size": 128,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [320, 640, 1280],
        "layers_per_block": 2,
        "transformer_layers_per_block": [1, 2, 10],
        "cross_attention_dim": 2048,
        "attention_head_dim": [5, 10, 20],
        "norm_num_groups": 32,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,  # 6 time ids x 256 + the pooled 1280
    }
    return {
        "unet": unet,
        "vae": dict(_VAE_SD, scaling_factor=0.13025, sample_size=1024, force_upcast=True),
        "text_encoder": _TEXT_SD15,
        "text_encoder_2": _TEXT_SDXL_2,
        "scheduler": _SCHEDULER_SDXL,
        "pad_token": "<|endoftext|>",
        "pad_token_2": "!",
        "force_zeros_for_empty_prompt": True,
    }


def _tiny_xl() -> dict:
    """`sdxl` at test width: two text towers of different widths (32 + 48 = the UNet's 80),
    a deeper second transformer level, 8-wide time-id embeddings; VAE factor 2, scale 0.5."""
    tiny = _tiny()
    text = dict(tiny["text_encoder"], hidden_size=32, intermediate_size=64, projection_dim=32)
    text_2 = dict(tiny["text_encoder"], hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                  hidden_act="gelu", projection_dim=24)
    unet = dict(tiny["unet"], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], transformer_layers_per_block=[1, 2],
                cross_attention_dim=80, attention_head_dim=[1, 1], use_linear_projection=True,  # 64-wide heads
                addition_embed_type="text_time", addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=6 * 8 + 24)
    return {
        "unet": unet,
        "vae": dict(tiny["vae"], force_upcast=True),
        "text_encoder": text,
        "text_encoder_2": text_2,
        "scheduler": _SCHEDULER_SDXL,
        "pad_token": "<|endoftext|>",
        "pad_token_2": "!",
        "force_zeros_for_empty_prompt": True,
    }


ARCHS = {"tiny": _tiny, "tiny2": _tiny2, "sd15": _sd15, "lcm-sd15": _lcm_sd15, "sd21": _sd21, "sd-turbo": _sd_turbo,
         "sdxl": _sdxl, "tiny-xl": _tiny_xl}


def arch(name: str) -> dict:
    """A deep copy of the named architecture's component configs."""
    return copy.deepcopy(ARCHS[name]())


# the UNet config keys a ControlNet of that UNet shares (diffusers' ControlNetModel.from_unet)
CONTROLNET_KEYS = ("in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "only_cross_attention",
                   "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor",
                   "act_fn", "norm_num_groups", "norm_eps", "cross_attention_dim", "transformer_layers_per_block",
                   "encoder_hid_dim", "encoder_hid_dim_type", "attention_head_dim", "num_attention_heads",
                   "use_linear_projection", "class_embed_type", "addition_embed_type", "addition_time_embed_dim",
                   "num_class_embeds", "upcast_attention", "resnet_time_scale_shift",
                   "projection_class_embeddings_input_dim", "mid_block_type")
