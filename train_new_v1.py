"""Textual inversion with improvement v1 (adapter + transformer after BERT): train_new.py plus
configs/improvement/v1.yaml.

    python train_new_v1.py -t --actual_resume models/ldm/tiny-shapes/model.safetensors -n NAME \
        --data_root dataset/solid_square --init_word square --placeholder_string '*'

Without --base it runs on the shipped tiny model (config.yaml + configs/tiny-shapes/finetune.yaml).
"""
import train_new

V1 = "configs/improvement/v1.yaml"
TINY = ("models/ldm/tiny-shapes/config.yaml", "configs/tiny-shapes/finetune.yaml")

if __name__ == "__main__":
    train_new.main(default_base=TINY, overlays=(V1,))
