"""Small builders shared by the tests: synthetic Pick-a-Pic-schema parquet files, scripts as modules."""

import importlib.util
import io
from pathlib import Path

import numpy as np
from PIL import Image


def load_script(name: str):
    """scripts/<name>.py imported as a module (scripts are not a package)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def write_pairs(path: Path, n: int = 8, size: int = 32, seed: int = 0, labels=None, corrupt_rows=(),
                drop_column: str | None = None, scores: bool = False) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    prompts = ["a photo of a red circle", "a photo of two squares", "a photo of a blue triangle",
               "a photo of a circle left of a square"]
    rows = []
    for i in range(n):
        a = (rng.random((size, size, 3)) * 255).astype(np.uint8)
        b = (rng.random((size + 8, size, 3)) * 255).astype(np.uint8)
        row = {"caption": prompts[i % len(prompts)], "jpg_0": png(a, "JPEG"), "jpg_1": png(b, "JPEG"),
               "label_0": float(labels[i]) if labels is not None else float(i % 2)}
        if i in corrupt_rows:
            row["jpg_1"] = b"\xff\xd8\xff\xe0 not really a jpeg"
        if scores:
            row["score_0"], row["score_1"] = float(rng.random()), float(rng.random())
        rows.append(row)
    table = pa.Table.from_pylist(rows)
    if drop_column:
        table = table.drop_columns([drop_column])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def _register_redness():
    from visalign.registry import REWARDS

    @REWARDS.register("test_redness")
    class Redness:
        """Mean red channel minus mean green (a tie-free toy reward for random models)."""

        name, version = "test_redness", "1"

        def __call__(self, images, prompts):
            return (images[:, 0] - images[:, 1]).float().mean((1, 2))

    return Redness


Redness = _register_redness()


def family_variants(all_variants: bool = False) -> list[str]:
    """The tiny variant of every registered visalign family (the first each declares, or all of them):
    tests parametrised over this cover a new family as soon as its file registers it."""
    from visalign.models.tiny import tiny_variants

    out, seen = [], set()
    for variant, cls in tiny_variants().items():
        if cls.__module__.startswith("visalign.") and (all_variants or cls not in seen):
            out.append(variant)
            seen.add(cls)
    return out


def family_of(variant: str):
    """(backbone registry name, backbone class) of a tiny variant."""
    from visalign.models.tiny import tiny_variants
    from visalign.registry import BACKBONES

    cls = tiny_variants()[variant]
    return next(n for n in BACKBONES.names() if BACKBONES.get(n) is cls), cls


def preset_for(backbone_name: str) -> str:
    """The first model preset whose model is ``backbone_name``."""
    from visalign.registry import PRESETS

    return next(p for p in PRESETS.names() if PRESETS.get(p)()["model"]["name"] == backbone_name)


def finetune_args(variant: str, model_dir) -> list[str]:
    """``finetune PRESET model.name=... model.path=DIR`` plus the tiny folder's model kwargs."""
    name, cls = family_of(variant)
    return [preset_for(name), f"model.name={name}", f"model.path={model_dir}",
            *(f"model.{k}={v}" for k, v in cls.tiny_kwargs.items())]


def tiny_pipeline(path):
    """The folder's own diffusers pipeline class from model_index.json, optional parts saved as null left out."""
    import json

    import diffusers

    index = json.loads((Path(path) / "model_index.json").read_text())
    missing = {k: None for k, v in index.items() if not k.startswith("_") and v == [None, None]}
    return getattr(diffusers, index["_class_name"]).from_pretrained(path, **missing)


def run_pipeline(pipe, prompt, resolution: int, **kwargs):
    """A tiny pipeline's images at ``resolution`` ([N, 3, H, W] in [0, 1]), with the options a toy size needs
    where the pipeline has them (no aspect-ratio binning, no caption cleaning, short T5 sequences)."""
    import inspect

    params = inspect.signature(pipe.__call__).parameters
    extra = {"use_resolution_binning": False, "clean_caption": False, "max_sequence_length": 8}
    kwargs = {k: v for k, v in extra.items() if k in params} | kwargs
    return pipe(prompt, height=resolution, width=resolution, output_type="pt", **kwargs).images


def load_lora_into(pipe, lora_dir, prefix: str = "transformer"):
    """``pipe.load_lora_weights`` where the pipeline has it; else plain peft onto the denoiser (PixArt's
    pipelines and transformer have no LoRA loader)."""
    from visalign.models.lora import inject_saved_lora

    if hasattr(pipe, "load_lora_weights"):
        pipe.load_lora_weights(lora_dir)
    else:
        inject_saved_lora(getattr(pipe, prefix), Path(lora_dir) / "pytorch_lora_weights.safetensors", prefix)


def tiny_pickscore(root: Path) -> tuple[Path, Path]:
    """A tiny transformers CLIP (model folder) and its processor folder, as PickScore's are laid out."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from visalign.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    text = {"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
            "num_hidden_layers": 1, "max_position_embeddings": 77, "eos_token_id": tok.eos_token_id,
            "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id}
    vision = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 1,
              "image_size": 32, "patch_size": 8}
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(root / "ps")
    tok.save_pretrained(root / "proc")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "proc")
    return root / "ps", root / "proc"
