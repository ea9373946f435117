import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
    except Exception:
        pass


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Build each tiny pipeline once per session: tiny_dir('sd15') -> Path."""
    from visalign.models.tiny import build_tiny

    root = tmp_path_factory.mktemp("tiny")
    cache = {}

    def get(family: str, **kwargs):
        key = (family, tuple(sorted(kwargs.items())))
        if key not in cache:
            name = family + "".join(f"-{k}-{v}" for k, v in sorted(kwargs.items()))
            cache[key] = build_tiny(family, root / name, **kwargs)
        return cache[key]

    return get


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory):
    os.environ["VISALIGN_CACHE"] = str(tmp_path_factory.mktemp("visalign-cache"))


def register_tiny_open_clip(open_clip, folder) -> str:
    """Register the tiny open_clip architecture 'visalign-tiny-clip' (32 px, one layer) from a config file."""
    vision = {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16}
    cfg = {"embed_dim": 32, "vision_cfg": vision,
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "visalign-tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    return "visalign-tiny-clip"


@pytest.fixture(scope="session")
def tiny_owl(tmp_path_factory):
    """A tiny OWLv2 folder and a tiny open_clip architecture, built from configs (no real weights here)."""
    open_clip = pytest.importorskip("open_clip")
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor

    from visalign.models.tiny import tiny_tokenizer

    root = tmp_path_factory.mktemp("owl")
    register_tiny_open_clip(open_clip, root / "clip")
    tok = tiny_tokenizer(max_length=16)
    small = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 1}
    cfg = Owlv2Config(text_config=small | {"vocab_size": len(tok), "max_position_embeddings": 16,
                                           "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id,
                                           "pad_token_id": tok.pad_token_id},
                      vision_config=small | {"image_size": 32, "patch_size": 8}, projection_dim=32)
    owl = root / "owl"
    Owlv2ForObjectDetection(cfg).save_pretrained(owl)
    Owlv2ImageProcessor(size={"height": 32, "width": 32}).save_pretrained(owl)
    tok.save_pretrained(owl)
    return owl
