"""Encode a prompt with and without a learned embedding file and show which token positions change.

Only the placeholder positions of the token embeddings may change (the manager acts before the
position embedding); after the encoder's attention every position moves, which is expected.

    python check/placeholder.py embeddings.pt --prompt "a photo of *"
    python check/placeholder.py embeddings.pt --config CONFIG.yaml --ckpt MODEL.ckpt
"""
import functools
import sys

import torch

from ldm.cli import ArgumentParser, run_command
from ldm.modules.embedding_formats import read_embeddings
from ldm.modules.embedding_manager import EmbeddingManager
from ldm.modules.encoders.modules import BERTEmbedder


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("embedding", help="learned embedding file (any supported format)")
    parser.add_argument("--prompt", default="a photo of *", help="prompt that uses the placeholder")
    parser.add_argument("--config", help="model config YAML (with --ckpt)")
    parser.add_argument("--ckpt",
                        help="model checkpoint; without it a seeded random encoder of the file's width is used")
    parser.add_argument("--n_layer", type=int, default=2, help="depth of the random encoder without a checkpoint")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = parser.parse_args(argv)
    if bool(args.config) != bool(args.ckpt):
        parser.error("--config and --ckpt go together: give both, or neither for a random encoder")
    return args


def load_embedder_and_manager(args):
    """(BERTEmbedder, EmbeddingManager holding the file's vectors), both in eval mode."""
    width = next(iter(read_embeddings(args.embedding).vectors.values())).shape[-1]
    if args.ckpt:
        from ldm.checkpoints import load_model_from_config, read_config

        model = load_model_from_config(read_config(args.config), args.ckpt)
        embedder, manager = model.cond_stage_model, model.embedding_manager
    else:
        torch.manual_seed(0)
        embedder, manager = BERTEmbedder(n_embed=width, n_layer=args.n_layer), None
    if manager is None:
        manager = EmbeddingManager(embedder, placeholder_strings=["*"])
    manager.load(args.embedding)
    return embedder.eval(), manager.eval()


def main(argv=None):
    """-> 0 where only the placeholder positions changed, 1 where not (or the prompt has no placeholder)."""
    args = parse_args(argv)
    return run_command(functools.partial(compare, args), args.debug)


@torch.no_grad()
def compare(args):
    """Print which positions the embedding file changes in args.prompt -> the exit status (0: as expected)."""
    embedder, manager = load_embedder_and_manager(args)
    tokens = embedder.tokenize([args.prompt])
    edited_tokens = tokens.clone()  # the manager rewrites ids in place when a placeholder has several vectors
    swapped = manager.input_seam(edited_tokens, embedder.token_embedding)
    context = manager.context_tokens(edited_tokens)  # the prompt as the encoder sees it without learned vectors
    plain = embedder.transformer(context)
    learned = embedder.transformer(tokens.clone(), embedding_manager=manager)

    placeholder_ids = {i for ids in manager.placeholder_ids.values() for i in ids}
    if manager.injection == "input":
        changed = (swapped != embedder.token_embedding(context)).any(-1)[0].nonzero().flatten().tolist()
    else:  # output injection edits only the final states
        changed = (learned != plain).any(-1)[0].nonzero().flatten().tolist()
    expected = [i for i, t in enumerate(edited_tokens[0].tolist()) if t in placeholder_ids]
    pieces = embedder.tokenizer.pieces(edited_tokens[0].tolist())
    print(f"tokens: {' '.join(p for p in pieces if p != '[PAD]')}")
    seam = "token embeddings" if manager.injection == "input" else "final states"
    print(f"{seam} changed at {changed} ({[pieces[i] for i in changed]})")
    print(f"encoder output: max |diff| {(learned - plain).abs().max():.4g} (attention spreads the change everywhere)")
    if not expected:
        print(f"the prompt has none of the file's placeholders {sorted(manager.string_to_token_dict)}")
        return 1
    if changed != expected:
        print(f"UNEXPECTED: placeholder positions are {expected}")
        return 1
    print("OK: only placeholder positions changed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
