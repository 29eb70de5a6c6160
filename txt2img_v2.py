"""Sampling through improvement v2: txt2img.py plus configs/improvement/v2.yaml, so prompts may be Korean.

    python txt2img_v2.py --embedding_path logs/RUN/checkpoints/embeddings.pt --prompt "*의 사진" --H 32 --W 32

Any LDM-BERT embedding of the same model works here, whether it was learned with train_new.py or train_new_v2.py.
"""
import txt2img
from train_new_v1 import TINY
from train_new_v2 import V2

if __name__ == "__main__":
    txt2img.main(overlays=(V2,), default_config=TINY, default_ckpt="models/ldm/tiny-shapes/model.safetensors")
