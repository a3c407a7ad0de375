"""Vision, speech and diffusion architectures from transformers and diffusers configs, random weights
(no download): the second half of the model zoo (tests/zoo/archs.py holds the text models).

``build(name, size)`` gives ``(model, make_feeds)``: ``size="tiny"`` for the CPU suite, ``"full"`` for
the GPU script (benchmarks/zoo_gpu.py). ``make_feeds(batch)`` gives the model's positional inputs as
a dict of torch tensors (names are the ONNX input names). The model returns one tensor.
"""

from __future__ import annotations

import unittest.mock

import torch

from tests.zoo.archs import randomize

TRANSFORMERS = ["swin", "convnext", "segformer", "mobilevit", "beit", "dinov2", "wav2vec2"]
DIFFUSERS = ["unet2d", "vae_decoder", "flux", "sd3"]
ARCHS = TRANSFORMERS + DIFFUSERS


class Single(torch.nn.Module):
    """The model with positional inputs and one tensor out (the first output, or the named field)."""

    def __init__(self, model, names, kwargs=None, field=None):
        super().__init__()
        self.model, self.names, self.kwargs, self.field = model, list(names), dict(kwargs or {}), field

    def forward(self, *args):
        out = self.model(**dict(zip(self.names, args)), **self.kwargs)
        if self.field is not None:
            return getattr(out, self.field)
        return out[0] if isinstance(out, (tuple, list)) else out.to_tuple()[0]


def _image(batch: int, channels: int, size: int, g) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=g)


def _transformers(name: str, full: bool):
    """(module, feeds(batch, g)) of a transformers vision or speech model."""
    import transformers as tf

    if name == "swin":
        cfg = (tf.SwinConfig() if full else
               tf.SwinConfig(image_size=56, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=7))
        model, size = tf.SwinModel(cfg), cfg.image_size
    elif name == "convnext":
        cfg = (tf.ConvNextConfig() if full else
               tf.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 2], num_stages=2, image_size=64))
        model, size = tf.ConvNextModel(cfg), 224 if full else 64
    elif name == "segformer":
        cfg = (tf.SegformerConfig() if full else
               tf.SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[4, 2], hidden_sizes=[16, 32],
                                  num_attention_heads=[1, 2], decoder_hidden_size=32, num_labels=5))
        model, size = tf.SegformerForSemanticSegmentation(cfg), 512 if full else 64
    elif name == "mobilevit":
        cfg = (tf.MobileViTConfig() if full else
               tf.MobileViTConfig(image_size=32, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
                                  num_attention_heads=2))
        model, size = tf.MobileViTModel(cfg), cfg.image_size
    elif name == "beit":
        cfg = (tf.BeitConfig(use_relative_position_bias=True) if full else
               tf.BeitConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, use_relative_position_bias=True))
        model, size = tf.BeitModel(cfg), cfg.image_size
    elif name == "dinov2":
        cfg = (tf.Dinov2Config() if full else
               tf.Dinov2Config(image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=2, num_attention_heads=4))
        model, size = tf.Dinov2Model(cfg), 224 if full else 28
    elif name == "wav2vec2":
        cfg = (tf.Wav2Vec2Config() if full else
               tf.Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 conv_dim=(16, 16, 16), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3),
                                 num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4))
        model = tf.Wav2Vec2Model(cfg)
        samples = 16000 if full else 400
        return model, ["input_values"], lambda b, g: {"input_values": torch.randn(b, samples, generator=g)}
    else:
        raise KeyError(name)
    return model, ["pixel_values"], lambda b, g: {"pixel_values": _image(b, 3, size, g)}


def _diffusers(name: str, full: bool):
    """(module, names, feeds(batch, g)) of a diffusers model."""
    import diffusers as df

    if name == "unet2d":
        if full:  # Stable Diffusion 1.5's UNet
            model = df.UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
            size, text, ctx = 64, 77, 768
        else:
            model = df.UNet2DConditionModel(
                sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
                norm_num_groups=8)
            size, text, ctx = 16, 7, 32

        def feeds(b, g):
            return {"sample": torch.randn(b, 4, size, size, generator=g),
                    "timestep": torch.tensor([999.0] * b), "encoder_hidden_states": torch.randn(b, text, ctx, generator=g)}
        return model, ["sample", "timestep", "encoder_hidden_states"], feeds
    if name == "vae_decoder":
        if full:  # Stable Diffusion's VAE
            model = df.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                                     down_block_types=("DownEncoderBlock2D",) * 4,
                                     up_block_types=("UpDecoderBlock2D",) * 4,
                                     block_out_channels=(128, 256, 512, 512), layers_per_block=2)
            size = 64
        else:
            model = df.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                                     down_block_types=("DownEncoderBlock2D",) * 2,
                                     up_block_types=("UpDecoderBlock2D",) * 2,
                                     block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)
            size = 8

        class Decode(torch.nn.Module):
            def __init__(self, vae):
                super().__init__()
                self.vae = vae

            def forward(self, latent_sample):
                return self.vae.decode(latent_sample).sample
        return Decode(model), ["latent_sample"], lambda b, g: {"latent_sample": torch.randn(b, 4, size, size, generator=g)}
    if name == "flux":
        cfg = (dict(num_layers=4, num_single_layers=8, attention_head_dim=128, num_attention_heads=12,
                    joint_attention_dim=4096, pooled_projection_dim=768, in_channels=64, axes_dims_rope=(16, 56, 56))
               if full else
               dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                    joint_attention_dim=32, pooled_projection_dim=16, in_channels=16, axes_dims_rope=(4, 6, 6)))
        model = df.FluxTransformer2DModel(**cfg)
        side, text = (64, 512) if full else (4, 6)
        return model, ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids"], \
            flux_feeds(cfg, side, side, text)
    if name == "sd3":
        cfg = (dict(sample_size=128, num_layers=12, attention_head_dim=64, num_attention_heads=12, joint_attention_dim=4096,
                    caption_projection_dim=768, pooled_projection_dim=2048, in_channels=16, out_channels=16)
               if full else
               dict(sample_size=8, patch_size=2, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                    joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16, in_channels=4,
                    out_channels=4, pos_embed_max_size=16))
        model = df.SD3Transformer2DModel(**cfg)
        side, text = (128, 154) if full else (8, 5)

        def feeds(b, g):
            return {"hidden_states": torch.randn(b, cfg["in_channels"], side, side, generator=g),
                    "encoder_hidden_states": torch.randn(b, text, cfg["joint_attention_dim"], generator=g),
                    "pooled_projections": torch.randn(b, cfg["pooled_projection_dim"], generator=g),
                    "timestep": torch.tensor([500.0] * b)}
        return model, ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"], feeds
    raise KeyError(name)


def flux_feeds(cfg: dict, height: int, width: int, text: int):
    """FLUX inputs for a latent of ``height x width`` packed 2x2 patches (``height * width`` image
    tokens) and ``text`` text tokens; the position ids are FLUX's (0, row, column) per image token."""
    def feeds(b, g):
        rows = torch.arange(height).repeat_interleave(width)
        cols = torch.arange(width).repeat(height)
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], 1).float()
        return {"hidden_states": torch.randn(b, height * width, cfg["in_channels"], generator=g),
                "encoder_hidden_states": torch.randn(b, text, cfg["joint_attention_dim"], generator=g),
                "pooled_projections": torch.randn(b, cfg["pooled_projection_dim"], generator=g),
                "timestep": torch.tensor([0.5] * b), "img_ids": img_ids, "txt_ids": torch.zeros(text, 3)}
    return feeds


def build(name: str, size: str = "tiny", seed: int = 0):
    """(module, make_feeds): the module takes the feeds positionally and returns one tensor;
    make_feeds(batch) -> dict of torch tensors, in the module's argument order."""
    full = size == "full"
    torch.manual_seed(seed)
    if name in DIFFUSERS:
        model, names, feeds = _diffusers(name, full)
        kwargs = {"return_dict": False} if name != "vae_decoder" else {}
        module = model if name == "vae_decoder" else Single(model, names, kwargs)
    else:
        model, names, feeds = _transformers(name, full)
        field = "logits" if name == "segformer" else "last_hidden_state"
        module = Single(model, names, field=field)
    module.eval()
    randomize(module, seed)

    def make_feeds(batch: int = 2) -> dict:
        g = torch.Generator().manual_seed(seed + 1)
        return feeds(batch, g)

    return module, make_feeds


def rms_norm(x, normalized_shape, weight=None, eps=None):
    """``F.rms_norm`` written out (in fp32, as torch's kernels compute it): on CUDA, torch 2.11's
    dynamo exporter has no ONNX function for the ``aten._fused_rms_norm`` it turns into, and the
    TorchScript exporter has none for ``aten::rms_norm`` (FLUX's q/k norms are torch.nn.RMSNorm)."""
    dims = tuple(range(-len(normalized_shape), 0))
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(dims, keepdim=True) + eps)).to(x.dtype)
    return y if weight is None else y * weight


def export(module, feeds: dict, dynamo: bool, path: str) -> str:
    """Export with the TorchScript exporter (opset 17) or the dynamo one (its default opset)."""
    names = list(feeds)
    args = tuple(feeds.values())
    with torch.no_grad(), unittest.mock.patch.object(torch.nn.functional, "rms_norm", rms_norm):
        if dynamo:
            torch.onnx.export(module, args, path, input_names=names, output_names=["out"], dynamo=True, verbose=False)
        else:
            torch.onnx.export(module, args, path, input_names=names, output_names=["out"], dynamo=False,
                              opset_version=17)
    return path
