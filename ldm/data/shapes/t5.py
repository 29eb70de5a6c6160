"""A tiny T5 encoder folder trained from scratch: a BPE tokenizer (T5's Metaspace pieces) fitted to the
distinct words of the shapes world's captions, small enough that most words split into several pieces
("triangle" -> ▁t ri ang le), and a random-init T5EncoderModel that pretraining trains with the generator.

    python -m ldm.data.shapes.t5 --out models/ar/tiny-shapes/t5
"""
import argparse
import itertools

import torch

from ldm.data.shapes.palette import COLOURS, SCENE_PHRASE, SCENES, SHAPES, TEMPLATES

T5_CONFIG = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
                 dropout_rate=0.0)
SPECIALS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in T5


def world_captions():
    """Every caption the world can write (template x colour x shape x optional scene)."""
    scenes = [None, *SCENES]
    for template, colour, shape, scene in itertools.product(TEMPLATES, COLOURS, SHAPES, scenes):
        text = template.format(f"{colour} {shape}")
        yield text if scene is None else f"{text} {SCENE_PHRASE.format(scene)}"


def train_pieces(texts, vocab_size):
    """A T5-style fast tokenizer (Metaspace pieces, "</s>" appended) with BPE merges fitted to the distinct
    words of texts: every word counts once, so frequent words are not merged whole before the rest."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    words = sorted({w for t in texts for w in t.split()})
    tokenizer.train_from_iterator(words, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS))
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def write_tiny_t5(folder, texts, vocab_size=90, seed=0, **config):
    """Save a tokenizer trained on `texts` and a random-init T5EncoderModel into `folder` -> the tokenizer."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = train_pieces(texts, vocab_size)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    T5EncoderModel(T5Config(vocab_size=len(tokenizer), **{**T5_CONFIG, **config})).save_pretrained(folder)
    return tokenizer


def main(argv=None):
    p = argparse.ArgumentParser(description="Write a tiny T5 encoder folder for the shapes world.")
    p.add_argument("--out", default="models/ar/tiny-shapes/t5")
    p.add_argument("--vocab_size", type=int, default=90)
    args = p.parse_args(argv)
    tokenizer = write_tiny_t5(args.out, list(world_captions()), args.vocab_size)
    for word in (*SHAPES, *COLOURS):
        print(f"{word}: {tokenizer.tokenize(word)}")
    print(f"{args.out}: {len(tokenizer)} pieces")


if __name__ == "__main__":
    main()
