"""Which implementation of the speed and memory tricks runs: ours, the reference code's, or a mix.

One frozen `Implementation` is active at a time. The pieces that have a faster way (attention, the UNet's frozen
convolutions and 1x1 projections, GEGLU, the TI dataset, the tokenizer) read `current()` when they run;
`using(settings)` makes another one active for a block. The benchmarks run the original code's way with
`using(REFERENCE)` on the same model and dataset as ours; the tests compare one switch at a time.

Why one active object rather than an argument: the switches reach layers deep inside the UNet and the text
encoder, the dataset and the tokenizer, which are built from separate config nodes and shared by the variants a
benchmark interleaves (one model sampled both ways, one dataset read both ways); an argument would have to pass
through every constructor and call between them. It is process-wide, as the class attributes it replaces were,
not per-thread: a checkpointed forward that autograd re-runs in its own device thread during backward reads the
same object as the thread that called backward.
"""
import contextlib
import dataclasses


@dataclasses.dataclass(frozen=True)
class Implementation:
    """True: ours; False: the reference code's way (`REFERENCE`, all False). Either way the values are the same (up to
    rounding where noted): only time and memory differ.

    sdpa: attention (the UNet's CrossAttention, the LDM BERT's) through scaled_dot_product_attention; off: explicit
        einsum and softmax (rounds differently).
    lean_conv: a frozen `Conv2d` keeps only its weight for backward (inputs of at least `Conv2d.lean_min_numel`
        elements); off: autograd's convolution, which keeps the input too.
    linear_projections: the SpatialTransformer's 1x1 proj_in/proj_out run as matrix products on its (B, H*W, C)
        tokens; off: as convolutions on (B, C, H, W) (rounds differently).
    fused_geglu: the GEGLU gate keeps only its input for backward and recomputes the GELU; off: autograd's graph.
    memoise_images: PersonalizedBase keeps each image decoded, cropped and resized (within its `memo_bytes`); off:
        every item reads its file.
    memoise_captions: a TextTokenizer keeps the ids of the captions it tokenized; off: every call tokenizes.
    """

    sdpa: bool = True
    lean_conv: bool = True
    linear_projections: bool = True
    fused_geglu: bool = True
    memoise_images: bool = True
    memoise_captions: bool = True


OURS = Implementation()
REFERENCE = Implementation(**{field.name: False for field in dataclasses.fields(Implementation)})

_active = OURS


def current():
    """The active Implementation (OURS unless a `using` block says otherwise)."""
    return _active


@contextlib.contextmanager
def using(settings):
    """Make `settings` the active Implementation inside the block, the previous one again after it."""
    global _active
    if not isinstance(settings, Implementation):
        raise TypeError(f"using() takes an Implementation, got {type(settings).__name__}")
    previous, _active = _active, settings
    try:
        yield settings
    finally:
        _active = previous
