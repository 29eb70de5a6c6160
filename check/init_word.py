"""How a word tokenizes for the LDM BERT text encoder, and (with a checkpoint) its nearest vocabulary neighbours.

    python check/init_word.py teddybear
    python check/init_word.py dog --config CONFIG.yaml --ckpt MODEL.ckpt
"""
import functools

import torch
import torch.nn.functional as F

from ldm.cli import ArgumentParser, UsageError, run_command
from ldm.modules.encoders.modules import BERTEmbedder
from ldm.util import require_positive


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("word", help="candidate initializer word or placeholder string")
    parser.add_argument("--config", help="model config YAML (with --ckpt: show embedding neighbours)")
    parser.add_argument("--ckpt", help="model checkpoint matching --config")
    parser.add_argument("--n_embed", type=int, default=1280, help="encoder width without a checkpoint")
    parser.add_argument("--n_layer", type=int, default=32, help="encoder depth without a checkpoint")
    parser.add_argument("--tokenizer_path", help="local bert-base-uncased folder (default: the installed vocabulary)")
    parser.add_argument("--top", type=int, default=10, help="neighbours to list per token")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = parser.parse_args(argv)
    if bool(args.config) != bool(args.ckpt):
        parser.error("--config and --ckpt go together: give both to see embedding neighbours, or neither")
    return args


def load_embedder(args):
    """The checkpoint's text encoder, or a weightless one (meta device) that can only tokenize."""
    if args.ckpt:
        from ldm.checkpoints import load_model_from_config, read_config

        return load_model_from_config(read_config(args.config), args.ckpt).cond_stage_model
    with torch.device("meta"):
        return BERTEmbedder(n_embed=args.n_embed, n_layer=args.n_layer, tokenizer_path=args.tokenizer_path)


def neighbours(weight, token_id, top):
    """weight: (V, D) -> [(id, cosine)] of the `top` rows closest to row token_id, itself excluded."""
    cosine = F.cosine_similarity(weight[token_id][None].float(), weight.float(), dim=-1)
    cosine[token_id] = -2.0
    values, ids = cosine.topk(top)
    return list(zip(ids.tolist(), values.tolist()))


def verdict(ids, unk_id):
    if unk_id in ids:
        return "has [UNK]: not in the vocabulary, pick another word"
    if len(ids) == 1:
        return "a single token: usable as initializer word or placeholder"
    return (f"{len(ids)} tokens: usable as initializer word (pieces averaged with init_mode: mean, one per "
            "vector with init_mode: pieces); as a placeholder it is registered as a new token")


def main(argv=None):
    args = parse_args(argv)
    run_command(functools.partial(show, args), args.debug)


def show(args):
    """Print how args.word tokenizes and, with a checkpoint, each token's nearest neighbours."""
    require_positive(top=args.top)
    embedder = load_embedder(args)
    ids = embedder.word_token_ids(args.word)
    if not ids:
        raise UsageError(f"'{args.word}' holds no token (empty or blank): give a word")
    pieces = embedder.tokenizer.pieces(ids)
    print(f"'{args.word}' -> {pieces} ids {ids} ({verdict(ids, embedder.unk_token_id)})")
    if not args.ckpt:
        return
    weight = embedder.token_embedding.weight.detach()
    for token_id, piece in zip(ids, pieces):
        near = ", ".join(f"{p} {c:.3f}" for p, c in
                         ((embedder.tokenizer.pieces([i])[0], c) for i, c in neighbours(weight, token_id, args.top)))
        print(f"nearest to {piece}: {near}")


if __name__ == "__main__":
    main()
