"""Train the v2 pre-encoder and aligner on Korean–English pairs against the frozen English LDM BERT.

    python -m improvement.v2.train_aligner                   # the shipped tiny model -> models/v2/tiny-shapes/
    python -m improvement.v2.train_aligner --v2 configs/improvement/v2-xlmr.yaml --out models/v2/xlmr

Loss on the conditioning states, mse + (1 - cosine) per position, plus the cross-entropy of the English
ids; English prompts are paired with themselves too, so English keeps working. Held-out Korean pairs
report the per-position cosine to the English conditioning (soft and hard decode) and the token accuracy.
The pre-encoder trains with the aligner when it is built from a config (random init), or when
`--train_pre_encoder` is given; a pretrained multilingual model is frozen by default.
"""
import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from improvement.v2.aligner import alignment_losses
from improvement.v2.corpus import read_pairs
from improvement.v2.pre_BERT import SPECIAL_TOKENS
from ldm.checkpoints import read_state_dict
from ldm.util import atomic_path, atomic_write_text, instantiate_from_config

MODEL = "models/ldm/tiny-shapes"


def train_wordpiece(texts, path, vocab_size=800):
    """A lower-cased WordPiece tokenizer (Hangul kept whole, not split into jamo) trained on `texts` -> path."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = list(SPECIAL_TOKENS.values())
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    cls, sep = (tok.token_to_id(SPECIAL_TOKENS[k]) for k in ("cls_token", "sep_token"))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls),
                                                                                               ("[SEP]", sep)])
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tok.save(path)
    return path


def english_target_ids(tokenizer, sentences):
    """Sorted ids a TextTokenizer gives `sentences` (with [PAD], [CLS], [SEP], [UNK]) -> list of int."""
    ids = set(tokenizer(list(sentences)).flatten().tolist())
    hf = tokenizer.tokenizer
    ids |= {hf.pad_token_id, hf.cls_token_id, hf.sep_token_id, hf.unk_token_id}
    return sorted(ids)


def build_conditioner(model_config, v2_config, pairs, out):
    """The v2 conditioner of `v2_config` (an overlay of the model config), ready to train from scratch."""
    node = OmegaConf.merge(model_config, v2_config).model.params.cond_stage_config
    params = OmegaConf.to_container(node.params, resolve=True)
    params.pop("aligner_ckpt", None)
    spec = params["pre_encoder"]
    if isinstance(spec, dict) and not spec.get("tokenizer"):
        texts = [t for pair in pairs for t in pair if t]
        spec["tokenizer"] = train_wordpiece(texts, os.path.join(out, "pre_encoder", "tokenizer.json"))
    from ldm.modules.encoders.tokenizers import TextTokenizer, default_bert_source, load_bert_tokenizer

    source = params.get("tokenizer_path") or default_bert_source()  # the English BERT's, as BERTEmbedder loads it
    tokenizer = TextTokenizer(load_bert_tokenizer(source, params.get("vocab_size", 30522)),
                              params.get("max_seq_len", 77))
    params["target_ids"] = english_target_ids(tokenizer, [en for _, en in pairs])
    return instantiate_from_config({"target": node.target, "params": params})


def load_bert(cond, ckpt):
    """Copy `cond_stage_model.transformer.*` of a LatentDiffusion checkpoint into cond.transformer, strictly."""
    sd, _ = read_state_dict(ckpt)
    prefix = "cond_stage_model.transformer."
    bert = {k[len(prefix):]: v.float() for k, v in sd.items() if k.startswith(prefix)}
    cond.transformer.load_state_dict(bert, strict=True)
    cond.transformer.requires_grad_(False).eval()


@torch.no_grad()
def english_targets(cond, sentences, batch_size=256):
    """The frozen BERT's conditioning (N, 77, D) and target indices (N, 77) of the English side, once."""
    states, index = [], []
    for i in range(0, len(sentences), batch_size):
        chunk = list(sentences[i:i + batch_size])
        states.append(cond.english(chunk))
        index.append(cond.aligner.target_index(cond.tokenize(chunk)))
    return torch.cat(states), torch.cat(index)


def batches(n, batch_size, generator):
    """Endless shuffled index batches over range(n)."""
    while True:
        order = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            yield order[i:i + batch_size]


def step_losses(cond, sources, target, index):
    """Loss terms of one batch: sources (B str), the English conditioning (B, 77, D) and ids (B, 77) to match."""
    logits = cond.align(sources)
    _, embeds = cond.aligner.decode(logits, cond.token_embedding, "soft")
    aligned = cond.transformer.encode_embeddings(embeds)
    return alignment_losses(aligned, target, logits, index)


@torch.no_grad()
def evaluate(cond, pairs, batch_size=64):
    """Held-out figures: mean per-position cosine (soft, hard decode), token accuracy, exact-prompt share."""
    sums = {"cos_soft": 0.0, "cos_hard": 0.0, "token_acc": 0.0, "exact": 0.0}
    for i in range(0, len(pairs), batch_size):
        sources, targets = zip(*pairs[i:i + batch_size])
        target = cond.english(list(targets))
        logits = cond.align(list(sources))  # once; both decodes read it
        for mode in ("soft", "hard"):
            ids, embeds = cond.aligner.decode(logits, cond.token_embedding, mode)
            cos = F.cosine_similarity(cond.transformer.encode_embeddings(embeds), target, dim=-1)  # (B, 77)
            sums[f"cos_{mode}"] += cos.mean(1).sum().item()
        hit = ids == cond.tokenize(list(targets))
        sums["token_acc"] += hit.float().mean(1).sum().item()
        sums["exact"] += hit.all(1).float().sum().item()
    return {k: v / len(pairs) for k, v in sums.items()}


def save(cond, out, train_pre_encoder, report):
    """pre_encoder/ (a Hugging Face folder) when it trained or was built here, aligner.safetensors, report.json."""
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    folder = os.path.join(out, "pre_encoder")
    if train_pre_encoder:
        cond.pre_encoder.save_pretrained(folder)
        cond.pre_tokenizer.save_pretrained(folder)
    state = {k: v.detach().contiguous() for k, v in cond.state_dict().items() if k.startswith("aligner.")}
    with atomic_path(os.path.join(out, "aligner.safetensors")) as tmp:
        save_file(state, tmp)
    atomic_write_text(json.dumps(report, indent=2), os.path.join(out, "report.json"))


def train(args):
    torch.manual_seed(args.seed)
    pairs = read_pairs(args.pairs, "train")
    heldout = read_pairs(args.pairs, "heldout")
    train_pairs = pairs + [(en, en) for _, en in pairs if en]
    v2_config = OmegaConf.load(args.v2)
    cond = build_conditioner(OmegaConf.load(args.config), v2_config, train_pairs, args.out)
    load_bert(cond, args.ckpt)
    built_here = not isinstance(v2_config.model.params.cond_stage_config.params.pre_encoder, str)
    train_pre_encoder = args.train_pre_encoder or built_here
    cond.pre_encoder.requires_grad_(train_pre_encoder).train(train_pre_encoder)
    params = [p for p in cond.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.steps, pct_start=0.05)
    targets, indices = english_targets(cond, [en for _, en in train_pairs])
    data = batches(len(train_pairs), args.batch_size, torch.Generator().manual_seed(args.seed))
    start = time.time()
    for step in range(1, args.steps + 1):
        rows = next(data)
        losses = step_losses(cond, [train_pairs[i][0] for i in rows.tolist()], targets[rows], indices[rows])
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % args.log_every == 0 or step == args.steps:
            terms = " ".join(f"{k} {v.item():.4f}" for k, v in losses.items())
            print(f"step {step}/{args.steps} loss {loss.item():.4f} ({terms}) {time.time() - start:.0f}s", flush=True)
    cond.eval()
    report = {"steps": args.steps, "train_pairs": len(train_pairs), "heldout_pairs": len(heldout),
              "wall_s": round(time.time() - start, 1), "heldout_korean": evaluate(cond, heldout),
              "heldout_english": evaluate(cond, [(en, en) for _, en in heldout])}
    save(cond, args.out, train_pre_encoder, report)
    print(json.dumps(report, indent=2))
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=f"{MODEL}/config.yaml", help="the LatentDiffusion config")
    p.add_argument("--ckpt", default=f"{MODEL}/model.safetensors", help="its weights (the English BERT is read)")
    p.add_argument("--v2", default="configs/improvement/v2-aligner.yaml", help="v2 conditioner overlay to train")
    p.add_argument("--pairs", default="dataset/ko_en/pairs.tsv")
    p.add_argument("--out", default="models/v2/tiny-shapes")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log_every", type=int, default=100)
    p.add_argument("--train_pre_encoder", action="store_true", help="also train a pretrained pre-encoder")
    return train(p.parse_args(argv))


if __name__ == "__main__":
    main()
