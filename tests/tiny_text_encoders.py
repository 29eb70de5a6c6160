"""Tiny CLIP and T5 text encoders saved to local folders, built offline at test time."""
import torch

from ldm.modules.encoders.tokenizers import CLIP_VOCAB_SIZE, write_clip_tokenizer_files

TINY_CLIP = dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu")
CORPUS = [  # every word the tests use, so the trained tokenizer has pieces for them; 'teddybear' stays split
    "a photo of a dog", "A photo of a cat", "a photo of a teddy bear next to another bear",
    "a sculpture of a dog sitting next to a cat", "a rendering of a clean toy", "the sks backpack in the snow",
    "photo photos photograph of the dog and the cat", "teddy teddies bears bear bearing",
]


def clip_tokenizer_folder(folder):
    """SD v1's CLIP tokenizer files (from open_clip's BPE) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    write_clip_tokenizer_files(str(folder))
    return folder


def tiny_clip_folder(folder, seed=0):
    """A 2-layer, width-32 CLIPTextModel with CLIP's 49408-entry vocabulary, saved with save_pretrained."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    CLIPTextModel(CLIPTextConfig(**TINY_CLIP)).save_pretrained(folder)
    return folder


def tiny_t5_folder(folder, seed=0):
    """A 2-layer, width-32 T5EncoderModel plus a Unigram tokenizer trained on CORPUS (<pad>=0, </s>=1, <unk>=2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(fast) + 8, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0)
    T5EncoderModel(config).save_pretrained(folder)
    return folder
