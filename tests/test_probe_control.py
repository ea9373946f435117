"""scripts/probe_finetune.py's control: a random adapter with the trained adapter's per-matrix norms."""

import torch
from helpers import load_script
from peft import LoraConfig, inject_adapter_in_model


def _module():
    return load_script("probe_finetune")


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q, self.to_v = torch.nn.Linear(12, 12), torch.nn.Linear(12, 12)


def _trained_adapter() -> torch.nn.Module:
    torch.manual_seed(0)
    model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"]), _Block())
    with torch.no_grad():
        for k, (name, p) in enumerate(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape) * (1 + k))  # a "trained" B, each with its own norm
    return model


def test_random_adapter_keeps_each_norm_and_drops_the_direction():
    model = _trained_adapter()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert _module().randomise_adapter(model, seed=0) == 2
    for name, p in model.named_parameters():
        if "lora_B" in name:
            assert torch.allclose(p.norm(), before[name].norm(), rtol=1e-5)
            cosine = torch.nn.functional.cosine_similarity(p.detach().flatten(), before[name].flatten(), dim=0)
            assert abs(float(cosine)) < 0.5
        else:  # A matrices and the frozen base weights are untouched
            assert torch.equal(p, before[name])


def test_random_adapter_is_fixed_by_its_seed():
    a, b, c = _trained_adapter(), _trained_adapter(), _trained_adapter()
    mod = _module()
    mod.randomise_adapter(a, seed=1)
    mod.randomise_adapter(b, seed=1)
    mod.randomise_adapter(c, seed=2)
    pa, pb, pc = (dict(m.named_parameters())["to_q.lora_B.default.weight"] for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
