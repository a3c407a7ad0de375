"""Real transformer architectures built from transformers configs with random weights (no download).

``build(name, size)`` gives a ``(model, make_feeds)`` pair: ``size="tiny"`` for the CPU suite,
``"full"`` for the GPU zoo script (benchmarks/zoo_gpu.py). ``make_feeds(padding, batch, seq)`` gives
the model's keyword inputs as torch tensors: ``padding`` is "right", "left" or "masked_row" (a row
whose keys are all masked). Models are put in eval mode with SDPA attention (transformers' default).
"""

from __future__ import annotations

import numpy as np
import torch

TEXT_ARCHS = ["bert", "distilbert", "roberta", "albert", "electra", "gpt2", "gpt_neox", "llama", "qwen2",
              "mistral", "phi3", "t5_encoder", "mpnet", "clip_text"]
ARCHS = TEXT_ARCHS + ["whisper_encoder", "clip_vision"]
PADDINGS = ("right", "left", "masked_row")

_TINY = dict(hidden=32, layers=2, heads=4, kv_heads=2, inter=64, vocab=96, positions=64)
_FULL = {
    "bert": dict(hidden=768, layers=12, heads=12, inter=3072, vocab=30522, positions=512),
    "gpt2": dict(hidden=768, layers=12, heads=12, inter=3072, vocab=50257, positions=1024),
    "llama": dict(hidden=1024, layers=8, heads=16, kv_heads=4, inter=2816, vocab=32000, positions=2048),
    "t5_encoder": dict(hidden=768, layers=12, heads=12, inter=3072, vocab=32128, positions=512),
    "whisper_encoder": dict(hidden=512, layers=6, heads=8, inter=2048, vocab=51865, positions=1500),
}


def dims(name: str, size: str) -> dict:
    if size == "tiny":
        return dict(_TINY)
    d = dict(_TINY)
    d.update(_FULL[name])
    return d


def _config(name: str, d: dict):
    import transformers as tf

    h, L, nh, inter, vocab, pos = d["hidden"], d["layers"], d["heads"], d["inter"], d["vocab"], d["positions"]
    kv = d.get("kv_heads", nh)
    common = dict(vocab_size=vocab, hidden_size=h, num_hidden_layers=L, num_attention_heads=nh,
                  intermediate_size=inter)
    if name == "bert":
        return tf.BertConfig(max_position_embeddings=pos, **common), tf.BertModel
    if name == "roberta":
        return tf.RobertaConfig(max_position_embeddings=pos + 2, **common), tf.RobertaModel
    if name == "electra":
        return tf.ElectraConfig(embedding_size=h, max_position_embeddings=pos, **common), tf.ElectraModel
    if name == "albert":
        return tf.AlbertConfig(embedding_size=h // 2, max_position_embeddings=pos, **common), tf.AlbertModel
    if name == "mpnet":
        return tf.MPNetConfig(max_position_embeddings=pos + 2, **common), tf.MPNetModel
    if name == "distilbert":
        return tf.DistilBertConfig(vocab_size=vocab, dim=h, n_layers=L, n_heads=nh, hidden_dim=inter,
                                   max_position_embeddings=pos), tf.DistilBertModel
    if name == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=h, n_layer=L, n_head=nh, n_inner=inter, n_positions=pos,
                             bos_token_id=0, eos_token_id=0), tf.GPT2Model
    if name == "gpt_neox":
        return tf.GPTNeoXConfig(max_position_embeddings=pos, **common), tf.GPTNeoXModel
    if name == "llama":
        return tf.LlamaConfig(num_key_value_heads=kv, max_position_embeddings=pos, **common), tf.LlamaModel
    if name == "qwen2":
        return tf.Qwen2Config(num_key_value_heads=kv, max_position_embeddings=pos, **common), tf.Qwen2Model
    if name == "mistral":
        return tf.MistralConfig(num_key_value_heads=kv, max_position_embeddings=pos, **common), tf.MistralModel
    if name == "phi3":
        return tf.Phi3Config(num_key_value_heads=kv, max_position_embeddings=pos, pad_token_id=0, bos_token_id=1,
                             eos_token_id=2, **common), tf.Phi3Model
    if name == "t5_encoder":
        return tf.T5Config(vocab_size=vocab, d_model=h, d_kv=h // nh, d_ff=inter, num_layers=L, num_heads=nh,
                           relative_attention_num_buckets=32 if h >= 256 else 8), tf.T5EncoderModel
    if name == "clip_text":
        return tf.CLIPTextConfig(max_position_embeddings=pos, bos_token_id=0, eos_token_id=2, pad_token_id=1,
                                 **common), tf.CLIPTextModel
    if name == "clip_vision":
        return tf.CLIPVisionConfig(hidden_size=h, num_hidden_layers=L, num_attention_heads=nh, intermediate_size=inter,
                                   image_size=32 if h < 256 else 224, patch_size=8 if h < 256 else 32), \
            tf.CLIPVisionModel
    if name == "whisper_encoder":
        return tf.WhisperConfig(vocab_size=vocab, d_model=h, encoder_layers=L, decoder_layers=1,
                                encoder_attention_heads=nh, decoder_attention_heads=nh, encoder_ffn_dim=inter,
                                decoder_ffn_dim=inter, num_mel_bins=16 if h < 256 else 80, pad_token_id=0,
                                bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                                max_source_positions=16 if h < 256 else 1500), None
    raise KeyError(name)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random, non-zero weights everywhere (zero-initialized biases and norms included).

    Weights have std 1/sqrt(fan-in). (Until 2026-12-07 a conv's fan-in was taken as its last
    dim, the kernel width: std 0.58 for a 3x3 conv, so a full-size UNet, VAE decoder or wav2vec2
    overflowed fp16 in eager PyTorch itself and no comparison with it could judge anything.)

    T5's attention has no 1/sqrt(d_kv) score scale: its query projection is initialized that much
    smaller instead (transformers' ``T5PreTrainedModel._init_weights``: q std (d_model * d_kv)^-0.5).
    Without that, T5-base's scores are sqrt(64) times too large and the model is ill-conditioned:
    eager fp16 is 0.10 off fp64 (with it, 2.0e-3)."""
    g = torch.Generator().manual_seed(seed)
    config = getattr(model, "config", None)
    q_scale = config.d_kv ** -0.5 if getattr(config, "model_type", None) == "t5" else 1.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:  # std 1/sqrt(fan-in): a conv's fan-in is in_channels/groups x its taps
                p.copy_(torch.randn(p.shape, generator=g) / max(p[0].numel(), 1) ** 0.5)
                if name.endswith("SelfAttention.q.weight"):
                    p.mul_(q_scale)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            else:  # norm scales
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.1)


def build(name: str, size: str = "tiny", seed: int = 0):
    """(model, make_feeds): make_feeds(padding, batch, seq) -> dict of torch tensors."""
    d = dims(name, size)
    cfg, cls = _config(name, d)
    # transformers' default: SDPA where the architecture has it (MPNet has only its eager attention)
    cfg._attn_implementation = "eager" if name == "mpnet" else "sdpa"
    torch.manual_seed(seed)
    if name == "whisper_encoder":
        import transformers as tf

        model = tf.WhisperModel(cfg).get_encoder()
    else:
        model = cls(cfg)
    model.eval()
    randomize(model, seed)

    def make_feeds(padding: str, batch: int = 3, seq: int = 8) -> dict:
        g = torch.Generator().manual_seed(seed + 1)
        if name in ("clip_vision", "whisper_encoder"):
            # no attention mask: padding is zeros in the input itself (silence after or before the
            # audio, a blank strip of the image), and "masked_row" is a row of zeros only
            if name == "clip_vision":
                x = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g)
            else:
                x = torch.randn(batch, cfg.num_mel_bins, 2 * cfg.max_source_positions, generator=g)
            width = x.shape[-1]
            keep = padding_mask(padding, batch, width).bool()
            x = x * keep.view(batch, *([1] * (x.dim() - 2)), width)
            return {"pixel_values" if name == "clip_vision" else "input_features": x}
        ids = torch.randint(3, d["vocab"], (batch, seq), generator=g)
        mask = padding_mask(padding, batch, seq)
        ids = ids.masked_fill(mask == 0, 1)
        return {"input_ids": ids, "attention_mask": mask}

    return model, make_feeds


def padding_mask(padding: str, batch: int, seq: int) -> torch.Tensor:
    """Row r keeps seq - r tokens (at least 1), at the right or left end; "masked_row" pads on the
    right and masks the last row entirely."""
    mask = torch.ones(batch, seq, dtype=torch.int64)
    for r in range(batch):
        keep = max(seq - 2 * r, 1)
        if padding == "left":
            mask[r, : seq - keep] = 0
        else:
            mask[r, keep:] = 0
    if padding == "masked_row":
        mask[-1] = 0
    return mask


class Wrapped(torch.nn.Module):
    """The model with its inputs as positional args and its first output (last hidden state)."""

    def __init__(self, model, names):
        super().__init__()
        self.model, self.names = model, list(names)

    def forward(self, *args):
        out = self.model(**dict(zip(self.names, args)))
        return out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state


def export(name: str, model, feeds: dict, dynamo: bool, path: str) -> str:
    """Export to ONNX with the TorchScript exporter (opset 17) or the dynamo one (its default opset)."""
    names = list(feeds)
    wrapped = Wrapped(model, names).eval()
    args = tuple(feeds[n] for n in names)
    with torch.no_grad():
        if dynamo:
            torch.onnx.export(wrapped, args, path, input_names=names, output_names=["out"], dynamo=True,
                              verbose=False)
        else:
            torch.onnx.export(wrapped, args, path, input_names=names, output_names=["out"], dynamo=False,
                              opset_version=17)
    return path


def to_numpy(feeds: dict) -> dict:
    return {k: v.numpy() for k, v in feeds.items()}


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    fa, fb = np.isfinite(a), np.isfinite(b)
    if not np.array_equal(fa, fb):
        return float("inf")
    return float(np.abs(a[fa] - b[fa]).max(initial=0) / max(np.abs(b[fb]).max(initial=0), 1e-30))
