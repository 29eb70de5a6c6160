"""Our exported embeddings in diffusers' own load_textual_inversion, and diffusers-format files in our manager.

Both sides wrap the same tiny CLIPTextModel and SD v1's CLIP tokenizer (built from open_clip's BPE file,
no hub); the text-encoder outputs for "a photo of <cat-toy>" must agree.
"""
import pytest
import torch
from safetensors.torch import save_file

from ldm.modules.embedding_formats import read_embeddings
from ldm.modules.embedding_manager import EmbeddingManager

pytest.importorskip("diffusers")
from diffusers.loaders import TextualInversionLoaderMixin  # noqa: E402
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: E402

from check.convert_embedding import convert  # noqa: E402

PROMPT = "a photo of <cat-toy>"


class TextStack(TextualInversionLoaderMixin):
    """The lightest object diffusers' load_textual_inversion runs on: a tokenizer and a text encoder."""

    hf_device_map = None

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder

    @property
    def components(self):
        return {"tokenizer": self.tokenizer, "text_encoder": self.text_encoder}

    @torch.no_grad()
    def encode(self, prompt):
        """What StableDiffusionPipeline.encode_prompt does: multi-vector expansion, pad to 77, last hidden state."""
        prompt = self.maybe_convert_prompt(prompt, self.tokenizer)
        ids = self.tokenizer(prompt, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids)[0]


@pytest.fixture
def stack(encoder_dirs):
    return TextStack(CLIPTokenizer.from_pretrained(encoder_dirs["clip_tokenizer"]),
                     CLIPTextModel.from_pretrained(encoder_dirs["clip"]).eval())


def trained_manager(clip, num_vectors):
    manager = EmbeddingManager(clip, ["<cat-toy>"], ["toy"], num_vectors_per_token=num_vectors)
    with torch.no_grad():
        manager.string_to_param_dict["<cat-toy>"].copy_(
            torch.randn(num_vectors, 32, generator=torch.Generator().manual_seed(7)))
    return manager


def our_states(clip, manager):
    with torch.no_grad():
        return clip.encode([PROMPT], embedding_manager=manager)


@pytest.mark.parametrize("num_vectors", [1, 3])
@pytest.mark.parametrize("fmt, dst", [("diffusers", "concept_folder"), ("diffusers", "learned_embeds.bin"),
                                      ("a1111", "cat-toy.pt")])
def test_diffusers_loads_our_export(make_encoder, stack, tmp_path, num_vectors, fmt, dst):
    clip = make_encoder("clip")
    manager = trained_manager(clip, num_vectors)
    manager.save(tmp_path / "embeddings.pt")
    dst = tmp_path / dst
    convert(tmp_path / "embeddings.pt", dst, fmt)
    stack.load_textual_inversion(str(dst))
    assert stack.tokenizer.convert_tokens_to_ids("<cat-toy>") == 49408
    torch.testing.assert_close(stack.encode(PROMPT), our_states(clip, manager), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_a_file_saved_the_diffusers_way_loads_into_our_manager(make_encoder, stack, tmp_path, suffix):
    """Vectors installed by diffusers' loader, saved as its textual_inversion example saves learned_embeds."""
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(3))
    stack.load_textual_inversion({"<cat-toy>": vectors})
    ids = stack.tokenizer.convert_tokens_to_ids(["<cat-toy>", "<cat-toy>_1"])
    learned = stack.text_encoder.get_input_embeddings().weight[min(ids):max(ids) + 1].detach()
    path = tmp_path / f"learned_embeds{suffix}"
    if suffix == ".safetensors":
        save_file({"<cat-toy>": learned}, path, metadata={"format": "pt"})
    else:
        torch.save({"<cat-toy>": learned}, path)
    assert read_embeddings(path).format == "diffusers"
    clip = make_encoder("clip")
    manager = EmbeddingManager(clip, ["*"])
    manager.load(path)
    assert manager.string_to_param_dict["<cat-toy>"].shape == (2, 32)
    torch.testing.assert_close(our_states(clip, manager), stack.encode(PROMPT), atol=1e-6, rtol=1e-6)


def test_a_single_vector_of_shape_d_loads(make_encoder, tmp_path):
    vector = torch.randn(32, generator=torch.Generator().manual_seed(5))
    save_file({"<cat-toy>": vector}, tmp_path / "one.safetensors")
    manager = EmbeddingManager(make_encoder("clip"), ["*"])
    manager.load(tmp_path / "one.safetensors")
    assert torch.equal(manager.string_to_param_dict["<cat-toy>"].detach(), vector[None])
