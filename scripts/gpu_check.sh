#!/usr/bin/env bash
# One command for a GPU machine (<= 8 minutes): real-size SDXL UNet and SD3-medium LoRA DPO steps, bf16.
set -euo pipefail
cd "$(dirname "$0")/.."
timeout 480 python scripts/gpu_check.py
