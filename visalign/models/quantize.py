"""A quantized frozen base: ``model.quantize = none | int8 | nf4 | fp8``, through diffusers' own quantization
configs, applied when the denoiser loads (its full-precision weights are never held whole).

Which backend serves which mode (chosen by what each supports, tested on CPU in tests/test_quantize.py):

| mode | CUDA | CPU |
|---|---|---|
| int8 | bitsandbytes LLM.int8 (``BitsAndBytesConfig(load_in_8bit)``), else optimum-quanto int8 | optimum-quanto int8 |
| nf4 | bitsandbytes NF4 (``load_in_4bit``, double quantization, compute in bf16) | not served: choose int8 or fp8 |
| fp8 | optimum-quanto float8 | optimum-quanto float8 (weights stored in fp8, computed in the compute dtype) |

LoRA trains on top in the compute dtype; the reference is the same quantized weights with the adapters
off, so only the adapters change. A mode the device or the installed packages cannot serve fails before
anything loads, with one line saying what to install or choose. (diffusers marks QuantoConfig deprecated
for its 1.0; torchao, its successor on CPU, takes an explicit AOBaseConfig and is the next backend to add.)
"""

from __future__ import annotations

import importlib.util

from ..errors import UserError

MODES = ("none", "int8", "nf4", "fp8")
INSTALL = "pip install 'visalign[quant]' (on a CUDA machine 'visalign[quant-cuda]', which adds bitsandbytes)"


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def backend_for(mode: str, cuda: bool) -> str:
    """The package that serves ``mode`` on this device ('' for none); a mode no installed package serves is
    one line naming what to install or choose."""
    if mode not in MODES:
        raise UserError(f"model.quantize={mode!r}: expected one of {', '.join(MODES)}")
    if mode == "none":
        return ""
    if mode == "nf4":
        if not cuda:
            raise UserError("model.quantize=nf4: NF4 is bitsandbytes', which needs a CUDA GPU; on this machine "
                            "choose model.quantize=int8 or fp8 (optimum-quanto)")
        if not _installed("bitsandbytes"):
            raise UserError(f"model.quantize=nf4 needs bitsandbytes: {INSTALL}")
        return "bitsandbytes"
    if mode == "int8" and cuda and _installed("bitsandbytes"):
        return "bitsandbytes"
    if not _installed("optimum.quanto"):
        raise UserError(f"model.quantize={mode} needs optimum-quanto on this machine: {INSTALL}")
    return "quanto"


def quantization_kwargs(mode: str, cuda: bool | None = None) -> dict:
    """``from_pretrained``'s ``quantization_config`` for the denoiser (empty for none)."""
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    backend = backend_for(mode, cuda)
    if not backend:
        return {}
    if backend == "bitsandbytes":
        from diffusers import BitsAndBytesConfig

        config = (BitsAndBytesConfig(load_in_8bit=True) if mode == "int8" else
                  BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                     bnb_4bit_compute_dtype=torch.bfloat16))
    else:
        from diffusers import QuantoConfig

        config = QuantoConfig(weights_dtype={"int8": "int8", "fp8": "float8"}[mode])
    return {"quantization_config": config}


def is_quantized(module) -> bool:
    """Whether ``module`` was loaded with a quantization config (diffusers marks it)."""
    return bool(getattr(module, "is_quantized", False) or getattr(module, "hf_quantizer", None))
