"""Sampling with an improvement-v1 run: txt2img.py plus configs/improvement/v1.yaml.

    python txt2img_v1.py --embedding_path logs/RUN/checkpoints/embeddings.pt --prompt "a photo of *"

modules.safetensors beside the embedding (the trained adapter and block) is loaded with it.
"""
import txt2img
from train_new_v1 import TINY, V1

if __name__ == "__main__":
    txt2img.main(overlays=(V1,), default_config=TINY, default_ckpt="models/ldm/tiny-shapes/model.safetensors")
