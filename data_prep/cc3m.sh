#!/usr/bin/env bash
# CC3M -> WebDataset shards with img2dataset: KEY.jpg + KEY.txt + KEY.json per sample.
#   bash data_prep/cc3m.sh Train_GCC-training.tsv data/cc3m/train
# The official TSVs have two columns (caption, url) and no header; img2dataset needs one.
# About 3.3M train URLs; expect 10-20% to be dead links by now.
set -euo pipefail
# Images are stored with their shortest side at 256 px, a little above what CLIP reads
# (it resizes to 224 and centre-crops), so the shards stay small and any crop is sharp.
image_size=256
# 10,000 samples per shard (img2dataset's default): about 330 shards for CC3M's train
# split, each a few hundred MB at 256 px, enough shards to spread over many GPUs' loaders.
samples_per_shard=${SAMPLES_PER_SHARD:-10000}
tsv=${1:?usage: cc3m.sh CAPTIONS.tsv OUT_DIR}
out=${2:?usage: cc3m.sh CAPTIONS.tsv OUT_DIR}
mkdir -p "$out"
with_header="$out/urls_with_header.tsv"
{ printf 'caption\turl\n'; cat "$tsv"; } > "$with_header"
# PROCESSES x THREADS downloads at once (16 x 64 suits a 16-core machine with a fast link)
img2dataset \
  --url_list "$with_header" \
  --input_format tsv \
  --url_col url \
  --caption_col caption \
  --output_format webdataset \
  --output_folder "$out" \
  --processes_count "${PROCESSES:-16}" \
  --thread_count "${THREADS:-64}" \
  --image_size "$image_size" \
  --resize_mode keep_ratio \
  --resize_only_if_bigger True \
  --number_sample_per_shard "$samples_per_shard" \
  --enable_wandb False
