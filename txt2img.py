"""Sample images from a text prompt, optionally with a learned textual-inversion embedding.

    python txt2img.py --embedding_path logs/RUN/checkpoints/embeddings.pt \
        --ckpt_path models/ldm/text2img-large/model.ckpt --prompt "a photo of *" \
        --ddim_steps 50 --outdir outputs/NAME --scale 7.5 --n_samples 4 --n_iter 1 --ddim_eta 0.0

An autoregressive config (ldm.models.autoregressive.ar.ARTextToImage, e.g. models/ar/tiny-shapes/config.yaml)
samples codes instead: --top_k, --top_p and --temperature apply, the diffusion sampler options do not.

Samples go to <outdir>/samples/NNNNN.png and each prompt's grid to <outdir>/<prompt>-NNNNN.png, numbered on from
the largest number there: a file already in --outdir is never written over, and several runs may share one.
"""
from ldm.inference import get_parser, main  # noqa: F401

if __name__ == "__main__":
    main()
