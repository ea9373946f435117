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
