#!/bin/bash
# Every GPU measurement in one run, logs under $OUT (default gpu_out/): which attention tiles run and how fast
# (bench/flash_configs.py, which picks the tiles to autotune over), then with those tiles the kernel checks, the SD1.5
# UNet + ControlNet step and a training step (bench/gpu_check.py), then the attention table (bench/attention.py).
# The time limits add up to under ten minutes; every log is written as it goes, so a cut-off run keeps what it measured.
#
#     bash bench/gpu_session.sh
set -u
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/card.txt"
timeout 290 python bench/flash_configs.py --pick "$out/tiles.json" --budget 260 2>&1 | tee "$out/flash_configs.txt"
if [ -s "$out/tiles.json" ]; then export MINICONTROL_FLASH_TILES=$PWD/$out/tiles.json; fi
echo "autotuning over: ${MINICONTROL_FLASH_TILES:-the tiles in minicontrol/tuning.py}" | tee "$out/tiles_used.txt"
timeout 140 python bench/gpu_check.py 2>&1 | tee "$out/gpu_check.txt"
timeout 150 python bench/attention.py 2>&1 | tee "$out/attention.txt"
