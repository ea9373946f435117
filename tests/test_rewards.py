"""The reward zoo on tiny random-init configs (no weights downloaded), the score cache and offline errors."""


import pytest
import torch
from conftest import register_tiny_open_clip
from helpers import tiny_pickscore

from visalign.models.load import ModelLoadError
from visalign.rewards import CachedReward, build_reward

PROMPTS = ["a photo of a red circle", "a photo of two squares", "a cat"]


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    open_clip = pytest.importorskip("open_clip")
    d = tmp_path_factory.mktemp("oc")
    register_tiny_open_clip(open_clip, d)
    torch.manual_seed(0)
    model = open_clip.create_model("visalign-tiny-clip", pretrained=None)
    torch.save({"state_dict": model.state_dict()}, d / "tiny_hps.pt")
    return d


def _images(n=3):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _check(scores, n=3):
    assert scores.shape == (n,) and torch.isfinite(scores).all()


def test_clip_score_tiny(tiny_open_clip):
    r = build_reward({"name": "clip_score", "arch": "visalign-tiny-clip", "pretrained": ""})
    s = r(_images(), PROMPTS)
    _check(s)
    assert (s >= 0).all() and (s <= 100).all()


def test_hpsv2_tiny_checkpoint(tiny_open_clip):
    r = build_reward({"name": "hpsv2", "arch": "visalign-tiny-clip", "checkpoint": str(tiny_open_clip / "tiny_hps.pt")})
    s = r(_images(), PROMPTS)
    _check(s)
    assert (s.abs() <= 1.0 + 1e-5).all()  # a cosine


def test_aesthetic_tiny_head(tiny_open_clip, tmp_path):
    from safetensors.torch import save_file

    from visalign.rewards.clip_models import AestheticMLP

    save_file(AestheticMLP(32).state_dict(), str(tmp_path / "head.safetensors"))
    r = build_reward({"name": "aesthetic", "arch": "visalign-tiny-clip", "pretrained": "",
                      "head": str(tmp_path / "head.safetensors")})
    _check(r(_images(), PROMPTS))
    # prompt-independent
    assert torch.equal(r(_images(), PROMPTS), r(_images(), ["x", "y", "z"]))


def test_pickscore_tiny_transformers_clip(tmp_path):
    model, processor = tiny_pickscore(tmp_path)
    r = build_reward({"name": "pickscore", "model": str(model), "processor": str(processor)})
    _check(r(_images(), PROMPTS))


def test_offline_and_missing_weights_are_one_clear_error(tmp_path):
    pytest.importorskip("open_clip")
    with pytest.raises(ModelLoadError, match="pass clip_score.pretrained="):
        build_reward({"name": "clip_score", "arch": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"})
    with pytest.raises(ModelLoadError, match="pass hpsv2.checkpoint="):
        build_reward({"name": "hpsv2", "checkpoint": str(tmp_path / "nope.pt")})
    with pytest.raises(ModelLoadError, match="pass aesthetic.head="):
        build_reward("aesthetic")
    with pytest.raises(ModelLoadError, match="pickscore"):
        build_reward({"name": "pickscore", "model": "yuvalkirstain/PickScore_v1"})
    with pytest.raises(ModelLoadError, match="image-reward"):
        build_reward("imagereward")


def test_cached_reward_never_rescores(tmp_path):
    calls = []

    class Counting:
        name, version = "count", "1"

        def __call__(self, images, prompts):
            calls.append(len(images))
            return images.mean((1, 2, 3))

    r = CachedReward(Counting(), tmp_path / "cache.sqlite")
    imgs = _images()
    first = r(imgs, PROMPTS)
    again = CachedReward(Counting(), tmp_path / "cache.sqlite")(imgs, PROMPTS)
    assert torch.allclose(first, again) and calls == [3]
    r(torch.cat([imgs[:1], _images(1) * 0.5]), [PROMPTS[0], "new"])
    assert calls == [3, 1]  # only the unseen image was scored
    r(imgs[:1], ["another prompt"])
    assert calls == [3, 1, 1]  # same pixels, different prompt: a different key


def test_reward_server_round_trip_matches_direct_scores():
    import threading

    from visalign.rewards.server import RemoteReward, make_server
    from visalign.worlds.shapes.reward import ShapesReward

    server = make_server(ShapesReward(), "127.0.0.1", 0)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        from visalign.worlds.shapes.detector import record_for_prompt
        from visalign.worlds.shapes.render import render

        prompts = ["a photo of a red circle", "a photo of two squares"]
        imgs = torch.stack([torch.from_numpy(render(record_for_prompt(p), i)[0]).permute(2, 0, 1).float() / 255
                            for i, p in enumerate(prompts)])
        imgs = torch.cat([imgs, torch.rand(1, 3, 32, 32)])
        prompts = prompts + ["a photo of a blue square"]
        remote = RemoteReward(f"http://127.0.0.1:{port}")(imgs, prompts)
        direct = ShapesReward()(imgs, prompts)
        assert torch.allclose(remote, direct) and remote[0] == 1.0
        import urllib.error
        import urllib.request

        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/score", data=b"not json"))
        assert e.value.code == 400
    finally:
        server.shutdown()
    with pytest.raises(ConnectionError, match="reward-server"):
        RemoteReward(f"http://127.0.0.1:{port}", timeout=2)(imgs, prompts)


# The reward contract: every registered reward scores a batch here, on a tiny stand-in where it needs weights.
# A reward that can only run elsewhere says where; a new reward without either fails this test.
ELSEWHERE = {"remote": "test_reward_server_round_trip_matches_direct_scores (a live local server)",
             "vlm_judge": "tests/test_vlm_judge.py (a fake OpenAI-compatible server)",
             "imagereward": "its own environment behind the reward server (pinned old deps); the missing package "
                            "is one error, test_offline_and_missing_weights_are_one_clear_error"}


def _stand_ins(tiny_open_clip, tmp_path) -> dict:
    from safetensors.torch import save_file

    from visalign.rewards.clip_models import AestheticMLP

    save_file(AestheticMLP(32).state_dict(), str(tmp_path / "head.safetensors"))
    clip = {"arch": "visalign-tiny-clip", "pretrained": ""}
    return {"clip_score": clip, "aesthetic": clip | {"head": str(tmp_path / "head.safetensors")},
            "hpsv2": {"arch": "visalign-tiny-clip", "checkpoint": str(tiny_open_clip / "tiny_hps.pt")},
            "pickscore": dict(zip(("model", "processor"), map(str, tiny_pickscore(tmp_path)))),
            "shapes": {}, "constraints": {}, "geneval": {}, "rater": {}, "faithful": {}, "unrequested": {}}


def test_every_registered_reward_scores_a_batch(tiny_open_clip, tmp_path):
    from visalign.registry import REWARDS

    stand_ins = _stand_ins(tiny_open_clip, tmp_path)
    prompts = ["a photo of a red circle", "a photo of two squares", "a photo of three triangles"]
    for name in REWARDS.names():
        if not REWARDS.get(name).__module__.startswith("visalign."):
            continue  # a test plug-in's own reward
        if name in ELSEWHERE:
            continue
        assert name in stand_ins, f"reward {name!r} has no tiny stand-in here and no test elsewhere"
        scores = build_reward({"name": name, **stand_ins[name]})(_images(), prompts)
        assert scores.shape == (3,) and torch.isfinite(scores).all(), name
