"""Train a textual-inversion embedding (or pretrain a model) from YAML configs, on Lightning 2.x.

    python train_new.py --base configs/latent-diffusion/txt2img-1p4B-finetune.yaml -t \
        --actual_resume models/ldm/text2img-large/model.ckpt -n NAME --gpus 0, \
        --data_root dataset/NAME --init_word dog --placeholder_string '*'

Any `key=value` argument overrides that entry of the merged config (e.g. model.params.latent_cache=false,
lightning.trainer.max_steps=1000, data.params.batch_size=2).
"""
from ldm.training import get_parser, main  # noqa: F401

if __name__ == "__main__":
    main()
