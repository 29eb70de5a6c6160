"""Textual inversion with improvement v2 (multilingual pre-encoder + aligner): train_new.py plus
configs/improvement/v2.yaml.

    python train_new_v2.py -t --actual_resume models/ldm/tiny-shapes/model.safetensors -n NAME \
        --data_root dataset/solid_square --init_word square --placeholder_string '*'

Without --base it runs on the shipped tiny model (config.yaml + configs/tiny-shapes/finetune.yaml). The
embedding it learns is an ordinary LDM-BERT embedding: txt2img.py and txt2img_v2.py both read it.
"""
import train_new
from train_new_v1 import TINY

V2 = "configs/improvement/v2.yaml"

if __name__ == "__main__":
    train_new.main(default_base=TINY, overlays=(V2,))
