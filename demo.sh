#!/usr/bin/env bash
# The main job on a fresh machine: install, learn `*` for a shipped concept on the shipped tiny model,
# then sample with the learned embedding, as learned and in a colour its images never show. CONCEPT,
# INIT_WORD and EDIT_COLOUR may be overridden from the environment.
set -euo pipefail
cd "$(dirname "$0")"
bash install.sh
export HF_HUB_OFFLINE=1
CONCEPT=${CONCEPT:-solid_square}
INIT_WORD=${INIT_WORD:-square}
.venv/bin/python train_new.py --base models/ldm/tiny-shapes/config.yaml configs/tiny-shapes/finetune.yaml -t \
    --actual_resume models/ldm/tiny-shapes/model.safetensors -n demo --data_root "dataset/$CONCEPT" \
    --init_word "$INIT_WORD" --placeholder_string '*' -l logs/demo
RUN=$(ls -d logs/demo/*_demo | tail -n 1)
EDIT_COLOUR=${EDIT_COLOUR:-purple}  # a colour the concept's images never show
for PROMPT in "a photo of a *" "a photo of a $EDIT_COLOUR *"; do
    .venv/bin/python txt2img.py --config models/ldm/tiny-shapes/config.yaml \
        --ckpt_path models/ldm/tiny-shapes/model.safetensors --embedding_path "$RUN/checkpoints/embeddings.pt" \
        --prompt "$PROMPT" --ddim_steps 50 --outdir outputs/demo --scale 3.0 --n_samples 8 --n_iter 1 \
        --ddim_eta 0.0 --H 32 --W 32
done
echo "embedding: $RUN/checkpoints/embeddings.pt   samples: outputs/demo/"
