#!/usr/bin/env bash
# One command for a GPU machine (<= 8 minutes): real-size SDXL UNet, SD3-medium and FLUX.1-dev LoRA DPO steps (and a FLUX GRPO update), bf16.
set -euo pipefail
cd "$(dirname "$0")/.."
timeout 480 python scripts/gpu_check.py
