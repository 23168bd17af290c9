"""Reproduce the embedded default model with one command:

    python train/default_model/build.py            # data -> tokenizer -> encoder + probe -> VLM -> eval
    python train/default_model/build.py --install  # ... and copy it into mlx_vlm_native/default_model/

Every step writes under --out (default runs/default_model) and is skipped when
its output exists, so an interrupted build continues where it stopped (the
training stages resume from their last checkpoint). Each stage is measured on
its own before the next: stage 1 trains the ViT with the generator's dense
per-token labels (`encoder.py`) and a linear probe on its frozen tokens reads
every object's colour, shape and cell; stage 2 connects the frozen ViT
LLaVA-style (MLP projector) to a fresh Qwen2-style decoder and trains those on
the question-answer conversations, loss on the answers (`stage2.json`); then
the whole model is scored on held-out scenes and on PIL-drawn single shapes.
"""

import argparse
import contextlib
import functools
import json
import shutil
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_vlm_native import load

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(HERE), str(ROOT)]
from train import shapes_world as shapes  # noqa: E402  (the generated world: train/shapes_world.py)
import encoder  # noqa: E402  (stage 1: train/default_model/encoder.py)
import lookup  # noqa: E402  (stage 2 with the lookup loss: train/default_model/lookup.py)
from convert.write_hf_release import CHAT_TEMPLATE  # noqa: E402  (the tests' ChatML template)
PACKAGE_MODEL = ROOT / "mlx_vlm_native" / "default_model"

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]  # ids 0..4
TEXT_CONFIG = {
    "model_type": "qwen2", "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True,
}
EVAL_SEED = 2026  # training scenes come from seed 0's stream; these are other scenes
DRAWN_SEED = 7070  # the PIL-drawn single-shape pictures (shapes.drawn_questions)
TARGETS = {"colour": 0.95, "shape": 0.9, "count": 0.95, "position": 0.9, "word": 0.8, "multi_image": 0.9}
PROBE_TARGET = 0.95  # per-object colour and shape read linearly off the frozen encoder


def corpus(data: Path):
    for line in open(data / "conversations.jsonl"):
        for m in json.loads(line)["messages"]:
            content = m["content"]
            yield content if isinstance(content, str) else " ".join(c.get("text", "") for c in content)
    for line in open(data / "captions.jsonl"):
        yield json.loads(line)["caption"]


def train_tokenizer(data: Path, dst: Path, vocab_size: int):
    """Byte-level BPE on the generated text, the special tokens first (ids 0..4),
    with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(data), trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                      chat_template=CHAT_TEMPLATE)
    wrapped.save_pretrained(str(dst))
    return wrapped


def assemble(vision_dir: Path, tokenizer_dir: Path, dst: Path, seed: int = 0) -> Path:
    """An `openvision_llava` folder: the stage-1 ViT, a fresh projector and decoder."""
    from mlx_vlm_native.models import openvision_checkpoint as ovc
    from mlx_vlm_native.models import openvision_llava as ol
    from mlx_vlm_native.utils import save_weights

    tokenizer = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = len(tokenizer["model"]["vocab"])
    config = {
        "model_type": "openvision_llava",
        "vision_config": json.loads((vision_dir / "vision_config.json").read_text()),
        "text_config": {**TEXT_CONFIG, "vocab_size": vocab, "bos_token_id": 1, "eos_token_id": 2},
        "image_token_index": SPECIAL_TOKENS.index("<image>"),
        "image_aspect_ratio": "resize",
        "image_mean": list(ovc.IMAGE_MEAN), "image_std": list(ovc.IMAGE_STD),
    }
    mx.random.seed(seed)
    model = ol.Model(ol.ModelArgs.from_dict(config))
    model.vision_tower.load_weights(str(vision_dir / "vision.safetensors"))
    dst.mkdir(parents=True, exist_ok=True)
    save_weights(dst, model, progress=False)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, dst / f.name)
    return dst


def run_stage(recipe: Path, out: Path, **overrides) -> None:
    from mlx_vlm_native.train import main as train

    argv = ["--recipe", str(recipe)]
    for k, v in overrides.items():
        if v is not None:
            argv += [f"--{k.replace('_', '-')}", str(v)]
    if (out / "checkpoints").exists():
        argv += ["--resume"]
    train(argv)


def evaluate(model, processor, per_type: int) -> dict:
    """{"scenes": held-out generated scenes, "drawn": PIL-drawn single shapes}."""
    scenes = shapes.evaluate(model, processor, shapes.held_out_questions(per_type, EVAL_SEED), progress=True)
    drawn = shapes.evaluate(model, processor, shapes.drawn_questions(max(per_type // 2, 1), DRAWN_SEED),
                            progress=True)
    return {"scenes": scenes, "drawn": drawn}


def size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e6


def parameter_count(model_dir: Path) -> int:
    return sum(int(np.prod(v.shape)) for f in model_dir.glob("*.safetensors") for v in mx.load(str(f)).values())


def verdict(scores: dict, probe: dict) -> str:
    """The card's status lines, read off the measurements."""
    missed = [f"{k} on {where} ({scores[where][k]['accuracy']:.1%} < {t:.0%})"
              for where in ("scenes", "drawn") for k, t in TARGETS.items()
              if k in scores[where] and scores[where][k]["accuracy"] < t]
    weak = [f"{k} {probe[k]:.1%}" for k in ("colour", "shape") if probe[k] < PROBE_TARGET]
    lines = [f"## Status: {'meets' if not missed else 'misses'} the targets", ""]
    lines.append("- Encoder probe: " + ("colour and shape both >= 95%." if not weak else
                                        f"below 95% on {', '.join(weak)}."))
    lines.append("- Missed: " + ("; ".join(missed) + "." if missed else "none."))
    return "\n".join(lines)


def score_table(scores: dict) -> str:
    rows = [f"| {k} | {s['accuracy']:.1%} | {s['correct']}/{s['total']} | "
            f"{TARGETS[k]:.0%} |" if k in TARGETS else f"| {k} | {s['accuracy']:.1%} | {s['correct']}/{s['total']} | - |"
            for k, s in scores.items()]
    return "| question type | accuracy | correct | target |\n|---|---|---|---|\n" + "\n".join(rows)


def failures(scores: dict) -> str:
    out = [f"- {k}: \"{e['question']}\" -> \"{e['answer']}\" (expected \"{e['expected']}\")"
           for k, sc in scores.items() for e in sc.get("failures", [])[:2]]
    return "\n".join(out) or "- none in this sample"


def model_card(scores: dict, probe: dict, info: dict) -> str:
    t = info["timings"]
    minutes = lambda key: sum(v[key] for v in t.values()) / 60  # noqa: E731
    steps = "\n".join(f"| {k} | {v['wall'] / 60:.1f} | {v['cpu'] / 60:.1f} |" for k, v in t.items())
    return f"""# mlx-vlm-native default model (shapes-vqa, {info['parameters'] / 1e6:.1f}M parameters)

The model `mlx-vlm-native` uses when `--model` is not given. It was trained on this
machine by `python train/default_model/build.py` (the recipe and the data generator are
in the repository) on procedurally generated images only, so it answers questions
about **simple pictures of coloured shapes**: one shape drawn on a flat background,
or scenes of up to {shapes.MAX_OBJECTS} shapes in a 3x3 layout with a short printed word. It knows
nothing else; do not expect it to describe photos.

- Architecture: `openvision_llava`. A hybrid ViT ({info['vision']}); every picture is
  stretched to {info['image_size']} x {info['image_size']} px, so its thirds fall on the same
  {info['tokens']} tokens whatever the aspect ratio. A 2-layer GELU MLP projector and a Qwen2-style
  decoder ({info['text']}).
- Stage 1, the encoder alone: {info['encoder_steps']} steps x {info['encoder_batch']} freshly generated pictures;
  each token is taught the colour, shape and layout cell of the object drawn over it, the word
  printed over it, and the mean token the object count (linear heads, dropped afterwards).
  The first fifth of the steps show at most two objects.{info.get('encoder_history', '')}
- Stage 2: the ViT frozen; projector and decoder trained from scratch on {info['stage2_steps']} x
  {info['stage2_batch']} conversations (up to {info.get('turns', 3)} questions each) about {info['train_images']} generated pictures,
  loss on the answer tokens only.{info.get('stage2_history', '')}
- Tokenizer: byte-level BPE with {info['vocab']} tokens trained on the generated text; ChatML template.
- Weights: {info['size_mb']:.1f} MB (float32 safetensors).

{verdict(scores, probe)}

## Stage 1 probe: what the frozen encoder's tokens hold

Linear probes (logistic regression) fitted on the frozen tokens of {info['probe_train']} fresh
pictures and scored on {probe['objects']} objects in {info['probe_test']} others: each object's
colour, shape and cell from the mean of the tokens it covers (`*_centre`: from the one token
at its centre; `*_lone` / `*_scenes`: one-shape pictures / scenes); the word and the count
from the tokens' mean and max. Target: colour and shape >= {PROBE_TARGET:.0%}.

| read-out | accuracy |
|---|---|
""" + "\n".join(f"| {k} | {probe[k]:.1%} |" for k in
               ("colour", "shape", "cell", "word", "count", "colour_centre", "shape_centre", "colour_lone",
                "shape_lone", "colour_scenes", "shape_scenes")) + f"""

## Accuracy of the whole model

Greedy decoding; an answer counts when the value it names (colour, shape, number,
cell, word, image) is the right one; captions must match exactly.

**Held-out generated scenes** ({sum(s['total'] for s in scores['scenes'].values())} questions, seed {EVAL_SEED}, scenes
never trained on):

{score_table(scores['scenes'])}

**Pictures drawn with plain PIL primitives** (`shapes.drawn_questions`, seed {DRAWN_SEED}): one
circle, square, triangle, star, diamond or cross in a paint program's pure colours on a white,
black, grey, cream or pale blue background, 100-400 px, aspect 1:2-2:1, 10-60% of the short
side, aliased or anti-aliased, asked "What colour is the shape?", "What shape is this?", ...:

{score_table(scores['drawn'])}

Wrong answers (question -> model answer, expected):

{failures(scores['scenes'])}
{failures(scores['drawn'])}

## Compute

{minutes('wall'):.0f} min wall, {minutes('cpu'):.0f} min of CPU time in all, on {info['machine']}:

| step | wall min | CPU min |
|---|---|---|
{steps}

The shipped weights are the checkpoint a later build continues from (a build's `runs/` do not
outlive the machine): `python train/default_model/build.py --from-model mlx_vlm_native/default_model`
continues its stage 2; with `--more-encoder-steps N` it first trains the shipped encoder N steps
further (fresh heads) and probes it again; with `--fresh-decoder` stage 2 starts afresh
(`train/README.md` lists the flags).

## What it was trained to answer

Shapes: {', '.join(shapes.SHAPES)}. Colours: {', '.join(shapes.COLOURS)}. Positions: the cells of a
3x3 layout (top left ... bottom right). Counts: 0 to {shapes.MAX_OBJECTS}. Words: {len(shapes.WORDS)} short
words ({', '.join(shapes.WORDS[:8])}, ...). Two images: which one has a given shape.

Question forms it was trained on: "What colour is the circle?", "What colour is the
shape?", "What shape is this?", "What shape is the red object?", "How many shapes are
there?", "Where is the blue square?", "What word is written in the image?", "What is in
the image?", and with two images "Which image has a star?".

## Limits

- Real photos, other shapes or colours, more than {shapes.MAX_OBJECTS} objects, overlapping objects,
  or words outside its list are out of distribution: it answers anyway, confidently and often wrong.
- Colour names cover 8 colours; shades in between get the nearest name it learnt.
- It is a demonstration of the whole pipeline (generation, dense encoder training, LLaVA-style
  training, evaluation, packaging), not a general assistant.
"""


def parse_mix(text: str) -> dict:
    """"colour=0.3,shape=0.3" -> {"colour": 0.3, "shape": 0.3}: question types the generator asks."""
    mix = {}
    for part in text.split(","):
        kind, _, weight = part.partition("=")
        kind = kind.strip()
        known = tuple(shapes.TRAIN_MIX) + shapes.LIST_TYPES
        if kind not in known:
            raise argparse.ArgumentTypeError(f"unknown question type {kind!r} in --mix; known: {', '.join(known)}")
        try:
            mix[kind] = float(weight)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--mix needs type=weight pairs, got {part!r}") from None
        if mix[kind] < 0:
            raise argparse.ArgumentTypeError(f"--mix weight of {kind} is negative: {weight}")
    if not sum(mix.values()) > 0:
        raise argparse.ArgumentTypeError("--mix weights sum to zero")
    return mix


def data_recipe(a) -> str:
    mix = a.mix or shapes.TRAIN_MIX
    asked = {k: v for k, v in mix.items() if k not in shapes.LIST_TYPES}
    lists = {k: v for k, v in mix.items() if k in shapes.LIST_TYPES}
    pictures = (f"a fresh picture each conversation, lookup loss weight {a.lookup_weight:g} on heads "
                + ", ".join(f"{h} of layer {layer}" for layer, h in lookup.LOOKUP_HEADS)
                + (" (answers about one shape, and each shape's words in captions and lists)" if a.lookup_in_lists
                   else " (answers about one shape)") if a.lookup_weight
                else f"{a.images} pictures")
    return (f"{pictures}, up to {a.turns} questions a conversation, {a.two_image_fraction:.0%} two-image"
            + (f" (up to {a.two_image_turns} questions)" if a.two_image_turns > 1 else "") + ", "
            "mix " + " ".join(f"{k} {v / sum(asked.values()):.2f}" for k, v in asked.items())
            + ("; ending with a list of every shape's " + " or ".join(
                f"{'colour' if k == 'colours' else 'place'} (share {v:.2f})" for k, v in lists.items()) if lists else ""))


def stage2_recipe(out: Path, lr) -> Path:
    """stage2.json, or a copy of it under `out` with another peak learning rate."""
    if lr is None:
        return HERE / "stage2.json"
    recipe = json.loads((HERE / "stage2.json").read_text())
    recipe["optim"]["lr"] = lr
    dst = out / "stage2.json"
    dst.write_text(json.dumps(recipe, indent=2))
    return dst


def as_previous(text: str) -> str:
    """A built model's own "this build" words, as the build that continues it reads them."""
    return text.replace("this build", "previous build").replace("This build", "Previous build")


def carried_timings(timings: dict) -> dict:
    """A built model's step timings as the build continuing it records them: its own steps
    become "(previous build)" rows, added to the rows of the builds before it of that name, so
    the card's total stays the whole cost however many times stage 2 is continued."""
    carried = {}
    for step, t in timings.items():
        name = as_previous(step) if "(" in step else f"{step} (previous build)"
        done = carried.get(name, {"wall": 0.0, "cpu": 0.0})
        carried[name] = {"wall": done["wall"] + t["wall"], "cpu": done["cpu"] + t["cpu"]}
    return carried


def stage1_rows(timings: dict) -> dict:
    """The carried rows that made the encoder (stage 1 and its probe): what a build that keeps
    only a model's encoder inherits of its cost."""
    return {k: v for k, v in timings.items() if k.startswith(("stage1", "probe"))}


def write_encoder(model: Path, enc: Path) -> None:
    """A built model's frozen ViT as stage 1's output (vision_config.json, vision.safetensors)."""
    config = json.loads((model / "config.json").read_text())
    prefix = "vision_tower."
    weights = {k[len(prefix):]: v for f in sorted(model.glob("*.safetensors"))
               for k, v in mx.load(str(f)).items() if k.startswith(prefix)}
    if not weights:
        raise ValueError(f"{model} has no {prefix}* weights to keep as the encoder")
    (enc / "vision_config.json").write_text(json.dumps(config["vision_config"], indent=2))
    mx.save_safetensors(str(enc / "vision.safetensors"), weights)


def swap_encoder(model: Path, enc: Path) -> None:
    """Put stage 1's ViT (enc/vision.safetensors) into a model folder's weights in place of its vision tower."""
    prefix = "vision_tower."
    vision = mx.load(str(enc / "vision.safetensors"))
    for f in sorted(model.glob("*.safetensors")):
        weights = mx.load(str(f))
        tower = {k[len(prefix):] for k in weights if k.startswith(prefix)}
        if not tower:
            continue
        if tower != set(vision):
            raise ValueError(f"{enc / 'vision.safetensors'} does not fit {f}'s vision tower: missing "
                             f"{sorted(tower - set(vision))[:5]}, unexpected {sorted(set(vision) - tower)[:5]}")
        weights.update({prefix + k: v for k, v in vision.items()})
        tmp = f.with_name(f.name + ".tmp.safetensors")
        mx.save_safetensors(str(tmp), weights, metadata={"format": "mlx"})
        tmp.replace(f)


def continue_from(model: Path, tok_dir: Path, enc: Path, init: Path, out: Path, fresh_decoder: bool = False,
                  keep_probe: bool = True) -> None:
    """Set a build up to train stage 2 further from a built model folder (the shipped one):
    its tokenizer, its frozen encoder's probe and its weights become this build's, and its
    build's timings are carried over so the card's total stays the whole cost. With
    `fresh_decoder` only the tokenizer and the encoder are kept (and only stage 1's cost):
    the projector and decoder start from a fresh initialisation. Without `keep_probe`
    (an encoder trained further) the probe is run again."""
    built = json.loads((model / "eval.json").read_text())
    tok_dir.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (model / name).exists():
            shutil.copy(model / name, tok_dir / name)
    enc.mkdir(parents=True, exist_ok=True)
    if keep_probe:
        (enc / "probe.json").write_text(json.dumps(built["probe"], indent=2))
    carried = carried_timings(built["build"]["timings"])
    if fresh_decoder:
        write_encoder(model, enc)
        carried = stage1_rows(carried)
    else:
        shutil.copytree(model, init, ignore=shutil.ignore_patterns("README.md", "eval.json"), dirs_exist_ok=True)
    if not (out / "timings.json").exists():
        (out / "timings.json").write_text(json.dumps(carried, indent=2))
    previous = {k: as_previous(v) if k.endswith("_history") else v for k, v in built["build"].items()}
    (out / "previous_build.json").write_text(json.dumps({**previous, "fresh_decoder": fresh_decoder}, indent=2))


@contextlib.contextmanager
def timed(out: Path, step: str):
    """Add the step's wall and CPU time to out/timings.json (what the model card reports)."""
    tic, cpu = time.time(), time.process_time()
    yield
    f = out / "timings.json"
    timings = json.loads(f.read_text()) if f.exists() else {}
    done = timings.get(step, {"wall": 0.0, "cpu": 0.0})
    timings[step] = {"wall": done["wall"] + time.time() - tic, "cpu": done["cpu"] + time.process_time() - cpu}
    f.write_text(json.dumps(timings, indent=2))


def install(model_dir: Path, scores: dict, probe: dict, info: dict) -> Path:
    """Copy the trained folder into the package with its figures and model card."""
    if PACKAGE_MODEL.exists():
        shutil.rmtree(PACKAGE_MODEL)
    shutil.copytree(model_dir, PACKAGE_MODEL, ignore=shutil.ignore_patterns("*.json.tmp"))
    (PACKAGE_MODEL / "eval.json").write_text(json.dumps({"scores": scores, "probe": probe, "build": info}, indent=2))
    (PACKAGE_MODEL / "README.md").write_text(model_card(scores, probe, info))
    return PACKAGE_MODEL


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/default_model")
    p.add_argument("--images", type=int, default=20000, help="generated pictures for stage 2's conversations")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--encoder-steps", type=int, default=2200)
    p.add_argument("--encoder-batch", type=int, default=32)
    p.add_argument("--encoder-lr", type=float, default=2e-3)
    p.add_argument("--word-weight", type=float, default=encoder.WEIGHTS["word"], help="stage 1's per-token word loss weight")
    p.add_argument("--more-encoder-steps", type=int, default=0,
                   help="with --from-model: train its encoder this many more steps first (fresh heads), then "
                        "probe it again; stage 2 continues the model's decoder on it (or a fresh one)")
    p.add_argument("--probe-pictures", type=int, default=1500, help="pictures the probes are fitted on")
    p.add_argument("--ignore-probe", action="store_true", help="train stage 2 even when the probe misses 95%%")
    p.add_argument("--stage2-steps", type=int, default=None, help="override stage2.json steps")
    p.add_argument("--stage2-lr", type=float, default=None, help="override stage2.json's peak learning rate")
    p.add_argument("--from-model", default=None,
                   help="train stage 2 further from this built model folder (e.g. mlx_vlm_native/default_model): "
                        "its tokenizer and frozen encoder are kept, stage 1 is skipped")
    p.add_argument("--fresh-decoder", action="store_true",
                   help="with --from-model: keep only its tokenizer and frozen encoder; the projector and "
                        "decoder are trained from scratch")
    p.add_argument("--mix", type=parse_mix, default=None,
                   help="stage 2's question types and weights, e.g. colour=0.3,shape=0.3,position=0.3,word=0.1 "
                        f"(default: {','.join(f'{k}={v:g}' for k, v in shapes.TRAIN_MIX.items())})")
    p.add_argument("--turns", type=int, default=3, help="questions per training conversation")
    p.add_argument("--two-image-fraction", type=float, default=0.1, help="share of two-image conversations")
    p.add_argument("--two-image-turns", type=int, default=1, help="questions per two-image conversation (at most)")
    p.add_argument("--lookup-weight", type=float, default=0.0,
                   help="train stage 2 on conversations generated on the fly, adding this weight times the "
                        "lookup loss (train/default_model/lookup.py: heads taught to look at the object an "
                        "answer is about); 0: stage2.json on the generated files")
    p.add_argument("--lookup-in-lists", action="store_true",
                   help="with --lookup-weight: also teach the heads to look at each shape while its own words "
                        "in a caption or list are said")
    p.add_argument("--eval-per-type", type=int, default=200)
    p.add_argument("--install", action="store_true", help="copy the result into mlx_vlm_native/default_model/")
    a = p.parse_args(argv)
    out = Path(a.out)
    data, tok_dir, enc, init, stage2 = out / "data", out / "tokenizer", out / "encoder", out / "init", out / "stage2"

    out.mkdir(parents=True, exist_ok=True)
    previous = {}
    if a.fresh_decoder and not a.from_model:
        p.error("--fresh-decoder needs --from-model (the model whose encoder is kept)")
    if a.more_encoder_steps and not a.from_model:
        p.error("--more-encoder-steps needs --from-model (the model whose encoder is trained further)")
    if a.lookup_weight < 0:
        p.error("--lookup-weight must be >= 0")
    if a.lookup_in_lists and not a.lookup_weight:
        p.error("--lookup-in-lists needs --lookup-weight")
    if a.from_model and not (out / "previous_build.json").exists():
        continue_from(Path(a.from_model), tok_dir, enc, init, out, a.fresh_decoder, keep_probe=not a.more_encoder_steps)
    if (out / "previous_build.json").exists():
        previous = json.loads((out / "previous_build.json").read_text())
    needs_files = not a.lookup_weight or not (tok_dir / "tokenizer.json").exists()  # the tokenizer is trained on them
    if needs_files and not (data / "conversations.jsonl").exists():
        with timed(out, "data"):
            shapes.write_dataset(data, a.images, seed=0, turns=a.turns, two_image_fraction=a.two_image_fraction,
                                 mix=a.mix, two_image_turns=a.two_image_turns, progress=True)
    if not (tok_dir / "tokenizer.json").exists():
        train_tokenizer(data, tok_dir, a.vocab_size)
    if not previous and not (enc / "done").exists():
        with timed(out, "stage1"):
            encoder.train(enc, a.encoder_steps, a.encoder_batch, a.encoder_lr, weights={"word": a.word_weight})
    if previous and a.more_encoder_steps and not (enc / "done").exists():
        with timed(out, "stage1"):
            encoder.train(enc, a.more_encoder_steps, a.encoder_batch, a.encoder_lr, init=Path(a.from_model),
                          weights={"word": a.word_weight})
        (enc / "history.txt").write_text(f"{a.more_encoder_steps} more steps from that encoder with fresh heads "
                                         f"(lr {a.encoder_lr:g}, word loss weight {a.word_weight:g})")
    if not (enc / "probe.json").exists():
        with timed(out, "probe"):
            probe = encoder.probe(encoder.load_vit(enc), a.probe_pictures, max(a.probe_pictures // 3, 1))
        (enc / "probe.json").write_text(json.dumps(probe, indent=2))
    probe = json.loads((enc / "probe.json").read_text())
    print("encoder probe: " + ", ".join(f"{k} {probe[k]:.1%}" for k in ("colour", "shape", "cell", "word", "count")))
    if min(probe["colour"], probe["shape"]) < PROBE_TARGET and not a.ignore_probe:
        sys.exit(f"the encoder's probe is below {PROBE_TARGET:.0%} on colour or shape ({enc / 'probe.json'}): "
                 "fix stage 1 before training the VLM, or pass --ignore-probe")
    if not (init / "config.json").exists():
        assemble(enc, tok_dir, init)
    elif a.more_encoder_steps and not (stage2 / "model" / "config.json").exists():
        swap_encoder(init, enc)  # the decoder continues from the model's, on the further-trained encoder
    if not (stage2 / "model" / "config.json").exists() and a.lookup_weight:
        recipe = json.loads((HERE / "stage2.json").read_text())
        with timed(out, "stage2"):
            lookup.train(init, stage2, a.stage2_steps or recipe["steps"], a.stage2_lr or recipe["optim"]["lr"],
                         a.lookup_weight, a.mix, a.turns, a.two_image_fraction, a.two_image_turns,
                         recipe["micro_batch_size"], recipe["seed"], recipe["checkpoint_every"],
                         in_lists=a.lookup_in_lists)
    elif not (stage2 / "model" / "config.json").exists():
        with timed(out, "stage2"):
            run_stage(stage2_recipe(out, a.stage2_lr), stage2, model=init, data=data / "conversations.jsonl",
                      output=stage2, steps=a.stage2_steps)
    model_dir = stage2 / "model"
    trained = functools.lru_cache(maxsize=1)(lambda: load(str(model_dir)))  # loaded once, when first needed
    scored = out / "eval.json"
    if scored.exists() and scored.stat().st_mtime > (model_dir / "config.json").stat().st_mtime:
        scores = json.loads(scored.read_text())  # this model was evaluated already
    else:
        with timed(out, "eval"):
            scores = evaluate(*trained(), a.eval_per_type)
        scored.write_text(json.dumps(scores, indent=2))
    for where, table in scores.items():
        for kind, s in table.items():
            print(f"{where:7s} {kind:12s} {s['accuracy']:6.1%}  ({s['correct']}/{s['total']})")

    if a.install:
        r2 = json.loads((HERE / "stage2.json").read_text())
        cfg = json.loads((model_dir / "config.json").read_text())
        v, t = cfg["vision_config"], cfg["text_config"]
        info = {
            "parameters": parameter_count(model_dir), "size_mb": size_mb(model_dir),
            "vision": (f"conv stem {v['stem_channels']}, " if v.get("stem_channels") else "")
                      + f"{v['layers']} blocks, width {v['width']}, {v['patch_size']}-px tokens",
            "text": f"{t['num_hidden_layers']} layers, width {t['hidden_size']}",
            "image_size": v["image_size"], "tokens": (v["image_size"] // v["patch_size"]) ** 2,
            "vocab": t["vocab_size"], "encoder_steps": a.encoder_steps, "encoder_batch": a.encoder_batch,
            "probe_train": a.probe_pictures, "probe_test": max(a.probe_pictures // 3, 1),
            "stage2_steps": a.stage2_steps or r2["steps"], "stage2_batch": r2["micro_batch_size"],
            "train_images": a.images, "turns": a.turns, "timings": json.loads((out / "timings.json").read_text()),
            "encoder_history": (f" This build: {(enc / 'history.txt').read_text().strip()}."
                                if (enc / "history.txt").exists() else ""),
            "stage2_history": (f" This build: {(stage2 / 'history.txt').read_text().strip()}."
                               if (stage2 / "history.txt").exists() else ""),
            "machine": "2 shared CPU cores (MLX CPU backend + OpenBLAS)",
        }
        if previous:  # stage 1 is the built model's, perhaps trained further here
            info.update({k: previous[k] for k in ("encoder_steps", "encoder_batch", "encoder_history")})
            if a.more_encoder_steps:
                info["encoder_steps"] += a.more_encoder_steps
                info["encoder_history"] += f" Then {(enc / 'history.txt').read_text().strip()}."
            else:
                info.update({k: previous[k] for k in ("probe_train", "probe_test")})
        if previous and not previous.get("fresh_decoder"):  # and so is stage 2 up to these steps
            lr = a.stage2_lr or r2["optim"]["lr"]
            info["stage2_steps"] = previous["stage2_steps"] + info["stage2_steps"]
            info["stage2_history"] = (previous["stage2_history"] + f" Then {a.stage2_steps or r2['steps']} more "
                                      "steps from those weights" + (" on the further-trained encoder"
                                                                    if a.more_encoder_steps else "")
                                      + f" (peak lr {lr:g}, {data_recipe(a)})"
                                      + (f": {(stage2 / 'history.txt').read_text().strip()}"
                                         if (stage2 / "history.txt").exists() else "") + ".")
            info["train_images"] = max(a.images, previous["train_images"])
            info["turns"] = max(a.turns, previous.get("turns", 3))
        else:
            info["stage2_history"] = (f" Peak lr {a.stage2_lr or r2['optim']['lr']:g}, {data_recipe(a)}."
                                      + info["stage2_history"])
        print(f"installed in {install(model_dir, scores, probe, info)}")


if __name__ == "__main__":
    from mlx_vlm_native.cli import ensure_fast_blas

    ensure_fast_blas()
    sys.exit(main())
