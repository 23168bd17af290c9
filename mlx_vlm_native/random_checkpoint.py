"""Random-weight LLaVA-OneVision checkpoints in the Hugging Face layout, at any
geometry: tiny ones for tests and the demo, real-size ones for benchmarks.

They load in transformers (`LlavaOnevisionForConditionalGeneration`) as well as
here, which is what makes them a parity fixture. No torch is needed.
"""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .processors.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'video' %}<video>\n{% elif c['type'] == 'text' %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "What is shown in this image? Describe the picture in detail.",
    "A red circle and a blue square on a white background.",
    "The cat sits on the mat next to a green ball.",
    "How many objects are there? There are three objects.",
    "Describe this video. A yellow triangle moves from left to right.",
    "The quick brown fox jumps over the lazy dog 0123456789.",
    "Where is the star? The star is at the top left of the image.",
    "Compare the two images: the first is bright, the second is dark.",
]

PRESETS = {
    # tiny widths at the real 384-px / 14-px geometry (729 tokens per tile)
    "tiny": dict(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, image_size=384, patch_size=14),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
        vocab_size=None,
        # untied: with tied embeddings a random model just repeats its last token
        tie_word_embeddings=False,
    ),
    # llava-hf/llava-onevision-qwen2-0.5b-ov-hf sizes
    "llava-onevision-0.5b": dict(
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                    num_attention_heads=16, image_size=384, patch_size=14),
        text=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2),
        vocab_size=152000,
        tie_word_embeddings=True,
    ),
}


def build_tokenizer(path: Path, vocab_size: int = 500):
    """A byte-level BPE tokenizer with Qwen2's pre-tokenizer, trained on a fixed
    corpus (deterministic), saved with a ChatML template."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    split = Regex(
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(split, behavior="isolated"),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )
    wrapped.save_pretrained(str(path))
    return wrapped


def hf_config(preset: str, vocab_size: int, image_token: int, video_token: int) -> dict:
    p = PRESETS[preset]
    side = p["vision"]["image_size"]
    return {
        "architectures": ["LlavaOnevisionForConditionalGeneration"],
        "model_type": "llava_onevision",
        "image_token_index": image_token,
        "video_token_index": video_token,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
        "vision_aspect_ratio": "anyres_max_9",
        "image_grid_pinpoints": [[side * i, side * j] for i in range(1, 7) for j in range(1, 7)],
        "tie_word_embeddings": p["tie_word_embeddings"],
        "vision_config": {
            "model_type": "siglip_vision_model", "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6, "num_channels": 3, "vision_use_head": False,
            **p["vision"],
        },
        "text_config": {
            "model_type": "qwen2", "vocab_size": vocab_size, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "max_position_embeddings": 32768,
            "tie_word_embeddings": p["tie_word_embeddings"], "hidden_act": "silu", **p["text"],
        },
    }


def randomize(model, seed: int) -> dict:
    """Fan-in-scaled normal weights, norms near 1, small non-zero biases, so that
    attention patterns are far from uniform and layout bugs show."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in tree_flatten(model.parameters()):
        shape = v.shape
        if "norm" in k and k.endswith("weight"):
            a = 1 + 0.1 * rng.standard_normal(shape)
        elif k.endswith("bias") or k == "image_newline":
            a = 0.1 * rng.standard_normal(shape)
        elif "embed_tokens" in k or "position_embedding" in k:
            a = 0.5 * rng.standard_normal(shape)
        else:
            fan_in = int(np.prod(shape[1:]))
            a = rng.standard_normal(shape) / np.sqrt(fan_in)
        out[k] = mx.array(a.astype(np.float32))
    return out


def to_hf_layout(weights: dict) -> dict:
    """This project's parameter names -> transformers 5's in-memory layout."""
    out = {}
    for k, v in weights.items():
        if k.startswith("language_model.model."):
            k = "model.language_model." + k[len("language_model.model.") :]
        elif k == "language_model.lm_head.weight":
            k = "lm_head.weight"
        else:
            k = "model." + k
        if k.endswith("patch_embedding.weight"):
            v = v.transpose(0, 3, 1, 2)
        out[k] = v
    return out


def write_checkpoint(path, preset: str = "tiny", seed: int = 1) -> Path:
    from .models.llava_onevision import Model, ModelArgs

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path)
    vocab = PRESETS[preset]["vocab_size"] or len(tok)
    config = hf_config(preset, vocab, tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids("<video>"))
    model = Model(ModelArgs.from_dict(config))
    weights = to_hf_layout(randomize(model, seed))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    side = config["vision_config"]["image_size"]
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "LlavaOnevisionImageProcessor",
        "size": {"height": side, "width": side},
        "image_grid_pinpoints": config["image_grid_pinpoints"],
        "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD),
        "rescale_factor": 1 / 255, "resample": 3,
        "do_resize": True, "do_rescale": True, "do_normalize": True,
        "do_convert_rgb": True, "do_pad": True,
    }, indent=2))
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return path
