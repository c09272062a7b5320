"""The model's own state_dict / save_pretrained never present a cropped W_res as the base weight."""

from __future__ import annotations

import pytest
import torch

import lora_lite as ll
from conftest import attach_small, crop_specs, hf_llama, logits, make_model, perturb

CROP = crop_specs()


def test_some_shipped_specs_crop():
    assert "pissa" in CROP and "antipasto" in CROP


@pytest.mark.parametrize("name", CROP)
def test_state_dict_holds_the_base_weight_not_w_res(name):
    model = make_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    attach_small(model, name)
    perturb(model)
    sd = model.state_dict()
    for target in ll.state(model).targets:
        w = sd[f"{target}.weight"]
        assert not torch.equal(w, model.get_submodule(target).weight)  # the layer holds W_res
        assert torch.allclose(w, base[f"{target}.weight"], atol=1e-6, rtol=0), target
    others = [k for k in base if not any(k.startswith(t + ".") for t in ll.state(model).targets)]
    assert others and all(torch.equal(sd[k], base[k]) for k in others)


@pytest.mark.parametrize("name", CROP)
def test_load_state_dict_of_own_state_dict_changes_no_output(name):
    model = make_model()
    attach_small(model, name)
    perturb(model)
    ref = logits(model)
    model.load_state_dict(model.state_dict())
    assert (logits(model) - ref).abs().max() < 1e-5


@pytest.mark.parametrize("name", CROP)
def test_state_dict_moves_a_trained_crop_adapter_between_models(name):
    trained, fresh = make_model(), make_model()
    attach_small(trained, name)
    perturb(trained)
    attach_small(fresh, name)
    fresh.load_state_dict(trained.state_dict())
    assert (logits(fresh) - logits(trained)).abs().max() < 1e-5
    ll.detach(fresh)
    assert (logits(fresh) - logits(make_model())).abs().max() < 1e-5


def test_save_pretrained_of_an_adapted_model_reloads_as_the_base(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = hf_llama()
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        base = model(input_ids=ids).logits
    ll.attach(model, ll.from_spec("pissa", r=4))
    perturb(model)
    model.save_pretrained(tmp_path)
    fresh = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert (fresh(input_ids=ids).logits - base).abs().max() < 1e-5


def test_a_deep_copy_detaches_its_own_state_dict_hooks():
    import copy

    model = make_model()
    attach_small(model, "pissa")
    perturb(model)
    clone = copy.deepcopy(model)
    ll.detach(clone)
    assert all(not m._state_dict_hooks and not m._load_state_dict_pre_hooks for m in clone.modules())
    assert sum(bool(m._state_dict_hooks) for m in model.modules()) == len(ll.state(model).targets)
    key = f"{next(iter(ll.state(model).targets))}.weight"
    assert torch.equal(model.state_dict()[key], clone.state_dict()[key])  # both the base W
