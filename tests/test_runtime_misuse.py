"""Runtime misuse, table-driven: each bad input to a public runtime function (configs, attach,
detach, set_coeff, state, trainable_parameters, calibration) gets a one-line error of our types
(SpecError for config values, AttachError otherwise) naming the layer or value, and the model is
left exactly as it was (conftest.assert_unchanged: state_dict bits, requires_grad, hooks, every
submodule's own train/eval flag, module attributes, adapter state)."""

from __future__ import annotations

import copy
import dataclasses
import math
import pickle

import pytest
import torch

import lora_lite as ll
from conftest import assert_unchanged, calibration, make_model, small_cfg, snapshot, token_batch
from lora_lite import runtime as rt


def refused(exc_type, fragment: str, fn, *args, **kw):
    """Call fn; require exc_type (exactly one of our types), the fragment, and a one-line message."""
    with pytest.raises(exc_type) as info:
        fn(*args, **kw)
    msg = str(info.value)
    assert fragment in msg, msg
    assert "\n" not in msg and msg.strip() == msg, repr(msg)
    assert isinstance(info.value, (ll.SpecError, ll.AttachError, ll.CheckpointError)), type(info.value)
    return info.value


# --- config values: SpecError (a ValueError) naming the field and value --------------------------

NAN, INF = float("nan"), float("inf")

CONFIG_CASES = {
    "alpha nan through from_spec": (lambda: ll.from_spec("lora", alpha=NAN), "lora.alpha=nan is not finite"),
    "alpha inf typed config": (lambda: ll.LoRAConfig(alpha=INF), "lora.alpha=inf is not finite"),
    "alpha -inf": (lambda: ll.from_spec("dora", alpha=-INF), "dora.alpha=-inf is not finite"),
    "coeff nan": (lambda: ll.from_spec("antipasto", coeff=NAN), "antipasto.coeff=nan is not finite"),
    "lambda0 inf": (lambda: ll.from_spec("delora", lambda0=INF), "delora.lambda0=inf is not finite"),
    "rank below the spec's minimum": (lambda: ll.from_spec("lora", r=0), "lora.r=0 is below its minimum 1"),
    "hra rank below its minimum": (lambda: ll.from_spec("hra", r=1), "hra.r=1 is below its minimum 2"),
    "rank given as a bool": (lambda: ll.from_spec("lora", r=True), "lora.r: expected int, got True"),
    "rank given as a string": (lambda: ll.LoRAConfig(r="8"), "lora.r: expected int, got '8'"),
    "alpha given as a string": (lambda: ll.LoRAConfig(alpha="16"), "lora.alpha: expected float, got '16'"),
    "alpha given as a tensor": (lambda: ll.LoRAConfig(alpha=torch.tensor(1.0)), "lora.alpha: expected float"),
    "alpha an int past float range": (lambda: ll.LoRAConfig(alpha=10**400), "lora.alpha: an int of 401 digits"),
    "target_names not strings": (lambda: ll.LoRAConfig(target_names=5), "lora.target_names: expected non-empty"),
    "target_names empty": (lambda: ll.LoRAConfig(target_names=()), "lora.target_names: expected non-empty"),
    "layers a float": (lambda: ll.LoRAConfig(layers=2.0), "lora.layers: expected integers, got 2.0"),
    "layers with a bool": (lambda: ll.LoRAConfig(layers=[True]), "lora.layers: expected integers"),
    "residual unhashable": (lambda: ll.LoRAConfig(residual=["crop"]), "lora.residual: ['crop'] is not one of"),
    "residual the variant lacks": (lambda: ll.LoRAConfig(residual="crop"), "residual='crop': lora takes ['none']"),
    "dtype not a dtype": (lambda: ll.LoRAConfig(dtype=5), "lora.dtype: unknown dtype 5"),
    "dtype an integer dtype": (lambda: ll.LoRAConfig(dtype=torch.int8), "torch.int8 is not a floating-point dtype"),
    "the base class": (lambda: ll.AdapterConfig(), "AdapterConfig is the base class"),
    "unknown keyword typed config": (
        lambda: ll.LoRAConfig(rr=3),
        "lora: unknown override 'rr'; allowed: r, alpha, dtype, target_names, layers, residual",
    ),
    "unknown keyword beside valid ones": (
        lambda: ll.PiSSAConfig(r=4, foo=1),
        "pissa: unknown override 'foo'; allowed: r, alpha, svd_niter, dtype",
    ),
    "unknown keyword in dataclasses.replace": (
        lambda: dataclasses.replace(ll.IA3Config(), r=2),
        "ia3: unknown override 'r'; allowed: dtype, target_names, layers, residual",
    ),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_config_values_are_one_line_spec_errors(case):
    fn, fragment = CONFIG_CASES[case]
    refused(ll.SpecError, fragment, fn)


@pytest.mark.parametrize("name", ["lora", "pissa", "vera"])
def test_a_typed_config_refuses_an_unknown_keyword_as_from_spec_does(name):
    cls = ll.variant_module(name).Config
    typed = refused(ll.SpecError, "unknown override 'rr'", cls, rr=3)
    assert str(typed) == str(refused(ll.SpecError, "unknown override 'rr'", ll.from_spec, name, rr=3))


def test_typed_configs_still_pickle_copy_replace_and_stay_frozen():
    cfg = ll.LoRAConfig(r=4, alpha=2.0, target_names=["q_proj"], dtype=torch.bfloat16)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        assert pickle.loads(pickle.dumps(cfg, protocol=protocol)) == cfg
    assert copy.deepcopy(cfg) == cfg and copy.copy(cfg) == cfg
    assert dataclasses.replace(cfg, r=2) == ll.LoRAConfig(r=2, alpha=2.0, target_names=["q_proj"], dtype="bf16")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.r = 2


def test_config_bounds_come_from_the_generated_module(monkeypatch):
    gen = ll.variant_module("lora")
    monkeypatch.setitem(gen.BOUNDS, "alpha", (0.5, 64.0))
    refused(ll.SpecError, "lora.alpha=128.0 is above its maximum 64.0", ll.LoRAConfig, alpha=128)
    refused(ll.SpecError, "lora.alpha=0.25 is below its minimum 0.5", ll.LoRAConfig, alpha=0.25)
    assert ll.LoRAConfig(alpha=64).alpha == 64.0 and math.isfinite(ll.LoRAConfig().alpha)


def test_config_errors_are_value_errors_as_before():
    assert issubclass(ll.SpecError, ValueError)
    with pytest.raises(ValueError, match="not finite"):
        ll.LoRAConfig(alpha=NAN)


# --- runtime: AttachError naming the layer or value, the model exactly as it was ----------------

Q0 = "model.layers.0.self_attn.q_proj"


def mixed_model(n_layers: int = 2):
    """A model whose flags a careless refusal would flatten: train mode except one eval block,
    one frozen parameter, and a user's own forward hook and pre-hook."""
    model = make_model(n_layers=n_layers).train()
    model.model.layers[1].eval()
    model.model.embed_tokens.weight.requires_grad_(False)
    model.model.layers[0].mlp.register_forward_hook(lambda m, a, y: None)
    model.model.layers[0].self_attn.register_forward_pre_hook(lambda m, a: None)
    return model


def layer(model, i: int = 0, proj: str = "q_proj"):
    return getattr(model.model.layers[i].self_attn, proj)


def attached(name: str = "lora", **kw):
    model = mixed_model()
    ll.attach(model, small_cfg(name, **kw), calibration_data=calibration(), progress=False)
    return model


def lost_state(name: str = "lora"):
    """An adapted model whose adapter state is gone (a failed attach, a half-copied model): its
    tensors and hooks are left with nothing accounting for them."""
    model = attached(name)
    del model.__dict__[rt.STATE_ATTR]
    return model


def only_hooks_left():
    model = lost_state("ia3")
    for m in model.modules():
        m._parameters.pop("lora_ia3", None)
    return model


def with_extra(where: str, value):
    """A mixed model with `value` set as attribute `where` ("layers.0.q_proj.lora_A")."""
    model = mixed_model()
    *path, attr = where.split(".")
    mod = model.model
    for p in path:
        mod = mod[int(p)] if p.isdigit() else getattr(mod, p)
    setattr(mod, attr, value)
    return model


def tied(a: tuple[int, str], b: tuple[int, str]):
    model = mixed_model()
    layer(model, *a).weight = layer(model, *b).weight
    return model


def under_inference_mode(fn):
    def run(*args, **kw):
        with torch.inference_mode():
            return fn(*args, **kw)

    return run


def built_under_inference_mode():
    with torch.inference_mode():
        return make_model()


def half_meta():
    model = mixed_model()
    layer(model).to("meta")
    return model


def peft_wrapped():
    from peft import LoraConfig, inject_adapter_in_model

    model = mixed_model()
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj"]), model)
    return model


def crop_tensor_removed():
    model = attached("pissa")
    del layer(model).lora_A0
    return model


def named(spec: str = "lora", adapter: str = "math", **kw):
    """A mixed model with a default lora adapter and a named `spec` adapter."""
    model = attached()
    ll.attach(model, small_cfg(spec, **kw), calibration_data=calibration(), progress=False, name=adapter)
    return model


def lost_named_state():
    """A named adapter's slot tensors left with no state accounting for them (hooks removed)."""
    model = named()
    for t in model.__dict__.pop(rt.NAMED_ATTR)["math"].targets.values():
        t.handle.remove()
    return model


def peft_dir(tmp_path, config=None, weights=None):
    """A PEFT adapter directory exported from a lora adapter, then broken: `config` replaces
    adapter_config.json's bytes, `weights` adapter_model.safetensors' (b"" removes the file)."""
    source = attached()
    out = tmp_path / "peft"
    ll.export_peft(source, out)
    for name, data in (("adapter_config.json", config), ("adapter_model.safetensors", weights)):
        if data == b"":
            (out / name).unlink()
        elif data is not None:
            (out / name).write_bytes(data)
    return out


def saved(tmp_path, name: str = "lora"):
    model = attached(name)
    return ll.save(model, tmp_path / f"{name}.safetensors")


# (setup() -> model, call(model, tmp_path), error type, message fragment); model None: not a model
RUNTIME_CASES = {
    # what is passed is not what the function takes
    "attach: a spec name instead of a config": (
        mixed_model,
        lambda m, _: ll.attach(m, "lora"),
        ll.AttachError,
        "attach: expected a config from ll.from_spec(...) or ll.LoRAConfig(...), got str",
    ),
    "attach: a dict instead of a config": (
        mixed_model,
        lambda m, _: ll.attach(m, {"r": 8}),
        ll.AttachError,
        "got dict",
    ),
    "attach: not a model": (
        None,
        lambda m, _: ll.attach("model", ll.LoRAConfig()),
        ll.AttachError,
        "attach: expected a torch.nn.Module, got str",
    ),
    "detach: not a model": (None, lambda m, _: ll.detach(42), ll.AttachError, "detach: expected a torch.nn.Module"),
    "set_coeff: not a model": (
        None,
        lambda m, _: ll.set_coeff([], 0.5),
        ll.AttachError,
        "set_coeff: expected a torch.nn.Module, got list",
    ),
    "state: not a model": (None, lambda m, _: ll.state("x"), ll.AttachError, "expected a torch.nn.Module, got str"),
    "trainable_parameters: not a model": (
        None,
        lambda m, _: ll.trainable_parameters(None),
        ll.AttachError,
        "trainable_parameters: expected a torch.nn.Module, got NoneType",
    ),
    "refresh_row_norms: not a model": (
        None,
        lambda m, _: rt.refresh_row_norms("model"),
        ll.AttachError,
        "refresh_row_norms: expected a torch.nn.Module, got str",
    ),
    # nothing attached, or attached already
    "detach with nothing attached": (
        mixed_model,
        lambda m, _: ll.detach(m),
        ll.AttachError,
        "detach: no lora-lite adapter is attached",
    ),
    "set_coeff with nothing attached": (
        mixed_model,
        lambda m, _: ll.set_coeff(m, 0.5),
        ll.AttachError,
        "set_coeff: no lora-lite adapter is attached",
    ),
    "attach twice": (
        attached,
        lambda m, _: ll.attach(m, ll.IA3Config()),
        ll.AttachError,
        "already has a lora adapter attached; call ll.detach(model) first",
    ),
    # torch.inference_mode
    "attach under inference_mode": (
        mixed_model,
        under_inference_mode(lambda m, _: ll.attach(m, ll.LoRAConfig())),
        ll.AttachError,
        "attach: refused under torch.inference_mode",
    ),
    "detach under inference_mode": (
        attached,
        under_inference_mode(lambda m, _: ll.detach(m)),
        ll.AttachError,
        "detach: refused under torch.inference_mode",
    ),
    "load under inference_mode": (
        mixed_model,
        lambda m, tmp: under_inference_mode(ll.load)(m, saved(tmp)),
        ll.AttachError,
        "load: refused under torch.inference_mode",
    ),
    "attach to a model built under inference_mode": (
        built_under_inference_mode,
        lambda m, _: ll.attach(m, ll.LoRAConfig()),
        ll.AttachError,
        "parameter model.embed_tokens.weight was made under torch.inference_mode",
    ),
    # weights that cannot be adapted
    "attach to a meta-device weight": (
        half_meta,
        lambda m, _: ll.attach(m, ll.LoRAConfig()),
        ll.AttachError,
        f"lora: {Q0}: weight is on the meta device",
    ),
    "load onto a meta-device weight": (
        half_meta,
        lambda m, tmp: ll.load(m, saved(tmp)),
        ll.AttachError,
        f"{Q0}: weight is on the meta device",
    ),
    # a target already holds something with an adapter tensor's name
    "a PEFT-wrapped layer (lora_A ModuleDict)": (
        peft_wrapped,
        lambda m, _: ll.attach(m, ll.LoRAConfig()),
        ll.AttachError,
        f"lora: {Q0} already has a child module (ModuleDict) named 'lora_A' (a PEFT-wrapped layer?)",
    ),
    "a target with an attribute named like an adapter tensor": (
        lambda: with_extra("layers.0.self_attn.q_proj.lora_B", 3),
        lambda m, _: ll.attach(m, ll.LoRAConfig()),
        ll.AttachError,
        f"lora: {Q0} already has an attribute named 'lora_B'",
    ),
    "a target with a child named like an adapter tensor": (
        lambda: with_extra("layers.0.self_attn.v_proj.lora_magnitude_vector", torch.nn.Identity()),
        lambda m, _: ll.attach(m, ll.from_spec("dora", r=2)),
        ll.AttachError,
        "v_proj already has a child module (Identity) named 'lora_magnitude_vector'",
    ),
    # residual crop would rewrite a weight held elsewhere too
    "two cropping targets on one weight": (
        lambda: tied((1, "q_proj"), (0, "q_proj")),
        lambda m, _: ll.attach(m, ll.from_spec("pissa", r=2)),
        ll.AttachError,
        f"pissa: {Q0}.weight shares its storage with model.layers.1.self_attn.q_proj.weight, so residual crop",
    ),
    "a cropping target tied to a non-target weight": (
        lambda: tied((0, "o_proj"), (0, "q_proj")),
        lambda m, _: ll.attach(m, ll.from_spec("antipasto", r=2)),
        ll.AttachError,
        f"antipasto: {Q0}.weight shares its storage with model.layers.0.self_attn.o_proj.weight",
    ),
    "a cropping target reachable under two names": (
        lambda: _aliased(),
        lambda m, _: ll.attach(m, ll.from_spec("pissa", r=2)),
        ll.AttachError,
        f"{Q0}.weight shares its storage with model.alias.weight",
    ),
    "load with crop onto tied weights": (
        lambda: tied((1, "q_proj"), (0, "q_proj")),
        lambda m, tmp: ll.load(m, _saved_untied(tmp)),
        ll.AttachError,
        "shares its storage with model.layers.1.self_attn.q_proj.weight",
    ),
    # lora-lite tensors or hooks nothing accounts for
    "adapter tensors left without a state": (
        lost_state,
        lambda m, _: ll.attach(m, ll.LoRAConfig()),
        ll.AttachError,
        f"attach: {Q0} holds lora_A, which no attached lora-lite adapter accounts for",
    ),
    "a lora-lite hook left without a state": (
        only_hooks_left,
        lambda m, _: ll.attach(m, ll.LoRAConfig()),
        ll.AttachError,
        "attach: model.layers.0.self_attn.k_proj has a lora-lite hook, which no attached lora-lite adapter",
    ),
    "a deep copy of one adapted block": (
        lambda: copy.deepcopy(attached().model.layers[0]),
        lambda m, _: ll.attach(m, ll.LoRAConfig()),
        ll.AttachError,
        "attach: self_attn.q_proj holds lora_A, which no attached lora-lite adapter accounts for",
    ),
    "an adapter tensor copied onto a non-target layer": (
        lambda: with_extra("layers.1.mlp.up_proj.lora_A", torch.nn.Parameter(torch.zeros(2, 32))),
        lambda m, _: ll.attach(m, ll.LoRAConfig()),
        ll.AttachError,
        "attach: model.layers.1.mlp.up_proj holds lora_A, which no attached",
    ),
    "load into a model with stray adapter tensors": (
        lost_state,
        lambda m, tmp: ll.load(m, _saved_plain(tmp)),
        ll.AttachError,
        "load: model.layers.0.self_attn.q_proj holds lora_A, which no attached",
    ),
    # detach and set_coeff on an adapter they cannot handle
    "detach a cropping target whose frozen tensor was removed": (
        crop_tensor_removed,
        lambda m, _: ll.detach(m),
        ll.AttachError,
        f"detach: {Q0} lacks lora_A0, which restoring its cropped weight needs",
    ),
    "set_coeff on a variant without coeff": (
        attached,
        lambda m, _: ll.set_coeff(m, 0.5),
        ll.AttachError,
        "set_coeff: lora has no runtime 'coeff' knob",
    ),
    "set_coeff nan": (
        lambda: attached("antipasto"),
        lambda m, _: ll.set_coeff(m, float("nan")),
        ll.SpecError,
        "set_coeff: coeff must be a finite number, got nan",
    ),
    "set_coeff inf": (
        lambda: attached("antipasto"),
        lambda m, _: ll.set_coeff(m, float("inf")),
        ll.SpecError,
        "got inf",
    ),
    "set_coeff an int past float range": (
        lambda: attached("antipasto"),
        lambda m, _: ll.set_coeff(m, 10**400),
        ll.SpecError,
        "set_coeff: coeff must be a finite number, got 1000",
    ),
    "set_coeff a bool": (lambda: attached("antipasto"), lambda m, _: ll.set_coeff(m, True), ll.SpecError, "got True"),
    # named adapters, ll.set_active, ll.scale, ll.export_peft, ll.load_peft
    "attach: a name that is not an identifier": (
        attached,
        lambda m, _: ll.attach(m, ll.IA3Config(), name="my adapter"),
        ll.AttachError,
        "adapter name must be an identifier like 'math', got 'my adapter'",
    ),
    "attach: a name already attached": (
        named,
        lambda m, _: ll.attach(m, ll.IA3Config(), name="math"),
        ll.AttachError,
        "already has a lora adapter named 'math' attached; call ll.detach(model, name='math') first",
    ),
    "attach: a second crop on a cropped layer": (
        lambda: attached("pissa"),
        lambda m, _: ll.attach(m, small_cfg("pissa"), name="more"),
        ll.AttachError,
        f"pissa: {Q0} is already cropped by adapter 'default'",
    ),
    "attach: a named adapter's tensors left without its state": (
        lost_named_state,
        lambda m, _: ll.attach(m, ll.IA3Config(), name="other"),
        ll.AttachError,
        f"attach: {Q0}.lora_lite_math holds lora_A, which no attached lora-lite adapter accounts for",
    ),
    "load: a name already attached": (
        named,
        lambda m, p: ll.load(m, saved(p), name="math"),
        ll.AttachError,
        "load: model already has a lora adapter named 'math' attached",
    ),
    "detach: an unknown name": (
        named,
        lambda m, _: ll.detach(m, name="code"),
        ll.AttachError,
        "detach: no adapter named 'code' (attached: ['default', 'math'])",
    ),
    "set_active: an unknown name": (
        named,
        lambda m, _: ll.set_active(m, ["math", "code"]),
        ll.AttachError,
        "set_active: no adapter named 'code' (attached: ['default', 'math'])",
    ),
    "set_active: not a name": (
        named,
        lambda m, _: ll.set_active(m, 3),
        ll.AttachError,
        "set_active: expected an adapter name or a list of names, got 3",
    ),
    "scale nan": (
        attached,
        lambda m, _: ll.scale(m, NAN),
        ll.AttachError,
        "scale: value must be a finite number, got nan",
    ),
    "scale inf": (named, lambda m, _: ll.scale(m, -INF, name="math"), ll.AttachError, "got -inf"),
    "scale a bool": (attached, lambda m, _: ll.scale(m, True), ll.AttachError, "got True"),
    "scale an int past float range": (attached, lambda m, _: ll.scale(m, 10**400), ll.AttachError, "got 1000"),
    "scale an unknown name": (
        named,
        lambda m, _: ll.scale(m, 0.5, name="code"),
        ll.AttachError,
        "no adapter named 'code'",
    ),
    "scale with nothing attached": (mixed_model, lambda m, _: ll.scale(m, 0.5), ll.AttachError, "scale: no lora-lite"),
    "export_peft with nothing attached": (
        mixed_model,
        lambda m, p: ll.export_peft(m, p / "out"),
        ll.AttachError,
        "export_peft: no lora-lite adapter is attached to this model",
    ),
    "load_peft: an empty directory": (
        mixed_model,
        lambda m, p: ll.load_peft(m, p),
        ll.CheckpointError,
        "adapter_config.json: not a readable adapter config (FileNotFoundError",
    ),
    "load_peft: a config that is not JSON": (
        mixed_model,
        lambda m, p: ll.load_peft(m, peft_dir(p, config=b'{"r": 8,\n')),
        ll.CheckpointError,
        "adapter_config.json: not a readable adapter config (JSONDecodeError",
    ),
    "load_peft: a config that is not UTF-8": (
        mixed_model,
        lambda m, p: ll.load_peft(m, peft_dir(p, config=b'{"r": "\xff"}')),
        ll.CheckpointError,
        "adapter_config.json: not a readable adapter config (UnicodeDecodeError",
    ),
    "load_peft: a rank that is not a number": (
        mixed_model,
        lambda m, p: ll.load_peft(
            m, peft_dir(p, config=b'{"peft_type": "LORA", "r": "x", "target_modules": ["q_proj"]}')
        ),
        ll.CheckpointError,
        "adapter_config.json: r='x': expected an integer",
    ),
    "load_peft: weights that are not safetensors": (
        mixed_model,
        lambda m, p: ll.load_peft(m, peft_dir(p, weights=b"\x80\x04 not safetensors")),
        ll.CheckpointError,
        "not a readable PEFT adapter (SafetensorError",
    ),
    "load_peft: the weights missing": (
        mixed_model,
        lambda m, p: ll.load_peft(m, peft_dir(p, weights=b"")),
        ll.CheckpointError,
        "adapter_model.safetensors: missing",
    ),
    "load_peft: a name already attached": (
        attached,
        lambda m, p: ll.load_peft(m, peft_dir(p)),
        ll.AttachError,
        "load_peft: model already has a lora adapter attached; call ll.detach(model) first",
    ),
    # a path argument that is no path (pathlib's TypeError named neither function nor argument)
    "save: a path that is an int": (
        attached,
        lambda m, _: ll.save(m, 3),
        ll.CheckpointError,
        "save: path must be a str or os.PathLike path, got int 3",
    ),
    "load: a path that is None": (
        mixed_model,
        lambda m, _: ll.load(m, None),
        ll.CheckpointError,
        "load: path must be a str or os.PathLike path, got NoneType None",
    ),
    "read_metadata: a path that is a list": (
        None,
        lambda m, _: ll.read_metadata(["a.safetensors"]),
        ll.CheckpointError,
        "read_metadata: path must be a str or os.PathLike path, got list ['a.safetensors']",
    ),
    "export_peft: an out_dir that is an int": (
        attached,
        lambda m, _: ll.export_peft(m, 3),
        ll.CheckpointError,
        "export_peft: out_dir must be a str or os.PathLike path, got int 3",
    ),
    "load_peft: a peft_dir that is None": (
        mixed_model,
        lambda m, _: ll.load_peft(m, None),
        ll.CheckpointError,
        "load_peft: peft_dir must be a str or os.PathLike path, got NoneType None",
    ),
    "load_peft: a peft_dir that is bytes": (
        mixed_model,
        lambda m, p: ll.load_peft(m, bytes(peft_dir(p))),
        ll.CheckpointError,
        "load_peft: peft_dir must be a str or os.PathLike path, got bytes b'/",
    ),
    # a directory given to ll.load
    "load: a PEFT adapter directory": (
        mixed_model,
        lambda m, p: ll.load(m, peft_dir(p)),
        ll.CheckpointError,
        "peft: a directory holding adapter_config.json (a PEFT adapter): attach it with ll.load_peft(model, dir); "
        "ll.load takes the .safetensors file ll.save wrote",
    ),
    "load: another directory": (
        mixed_model,
        lambda m, p: ll.load(m, p),
        ll.CheckpointError,
        "a directory, not a regular file: ll.load takes the .safetensors file ll.save wrote",
    ),
    "set_coeff a string": (lambda: attached("antipasto"), lambda m, _: ll.set_coeff(m, "1"), ll.SpecError, "got '1'"),
    "set_coeff a tensor": (
        lambda: attached("antipasto"),
        lambda m, _: ll.set_coeff(m, torch.tensor(1.0)),
        ll.SpecError,
        "got tensor(1.)",
    ),
}


def _aliased():
    model = mixed_model()
    model.model.alias = layer(model)  # the same module under a second name
    return model


def _saved_untied(tmp_path):
    model = make_model()
    ll.attach(model, ll.from_spec("pissa", r=2, layers=[0]))
    return ll.save(model, tmp_path / "pissa.safetensors")


def _saved_plain(tmp_path):
    model = make_model()
    ll.attach(model, ll.LoRAConfig(r=2))
    return ll.save(model, tmp_path / "lora.safetensors")


@pytest.mark.parametrize("case", RUNTIME_CASES)
def test_runtime_misuse_is_refused_and_changes_nothing(case, tmp_path):
    setup, call, exc_type, fragment = RUNTIME_CASES[case]
    model = setup() if setup else None
    snap = snapshot(model) if model is not None else None
    refused(exc_type, fragment, call, model, tmp_path)
    if model is not None:
        assert_unchanged(model, snap)


# --- calibration: AttachError naming the batch or layer, every module's own mode restored --------


def ids(*shape, low=0, high=64, dtype=torch.long):
    return torch.randint(low, high, shape, generator=torch.Generator().manual_seed(0)).to(dtype)


def good(seed=0):
    return token_batch(seed=seed, batch=2, seq=16)


def failing_generator():
    yield good()
    raise OSError("disk gone")


# (calibration_data, message fragment); each attaches antipasto_corda (calibration required)
CALIBRATION_CASES = {
    "input_ids past the vocabulary": ([{"input_ids": torch.tensor([[3, 70, 65]])}], "batch 0: input_ids holds 70"),
    "negative input_ids": ([good(), {"input_ids": ids(2, 8) - 64}], "batch 1: input_ids holds -64, outside"),
    "tensor batch past the vocabulary": (
        [torch.tensor([[1, 64, 2]])],
        "batch 0: token ids holds 64, outside the vocab",
    ),
    "tuple batch past the vocabulary": ([(torch.tensor([[1, 2, 99]]),)], "batch 0: token ids holds 99"),
    "float input_ids": ([{"input_ids": ids(2, 8, dtype=torch.float32)}], "input_ids must be an integer tensor"),
    "input_ids a list": (
        [{"input_ids": [[1, 2, 3]], "attention_mask": torch.ones(1, 3, dtype=torch.long)}],
        "batch 0: input_ids must be an integer tensor, got list",
    ),
    "empty input_ids": ([{"input_ids": ids(0, 8)}], "batch 0: input_ids is empty (shape (0, 8))"),
    "empty tensor batch": ([ids(2, 0)], "batch 0: empty tensor of shape (2, 0)"),
    "empty tuple batch": ([()], "batch 0: a tuple batch must start with a tensor"),
    "a dict without tensors": ([{"text": "hello"}], "batch 0: no tensors in ['text']"),
    "a batch of another type": ([good(), "hello"], "batch 1 is a str: expected a dict"),
    "no batches": ([], "calibration_data is empty (no batches)"),
    "not iterable": (5, "calibration_data is a int: expected an iterable of batches"),
    "a string": ("some text", "calibration_data is a str"),
    "per-token labels of another shape": (
        [dict(good(), labels=torch.zeros(2, 5, dtype=torch.long))],
        "batch 0: labels has shape (2, 5), input_ids (2, 16)",
    ),
    "mask of another shape": (
        [dict(good(), attention_mask=torch.ones(2, 5, dtype=torch.long))],
        "batch 0: attention_mask has shape (2, 5), input_ids (2, 16)",
    ),
    "mask with values other than 0/1": (
        [dict(good(), attention_mask=torch.full((2, 16), 2))],
        "batch 0: attention_mask must hold 0/1",
    ),
    "float mask": (
        [dict(good(), attention_mask=torch.ones(2, 16))],
        "attention_mask must hold 0/1 integers or bools (dtype torch.float32)",
    ),
    "every token masked": (
        [dict(good(), attention_mask=torch.zeros(2, 16, dtype=torch.long))],
        f"calibration: {Q0} saw no (non-padding) tokens",
    ),
    "a key the model does not take": (
        [dict(good(), pixel_values=torch.ones(1))],
        "batch 0: the model raised TypeError:",
    ),
    "a generator that fails": (failing_generator(), "reading batch 1 raised OSError: disk gone"),
}


@pytest.mark.parametrize("case", CALIBRATION_CASES)
def test_bad_calibration_data_is_refused_before_anything_changes(case):
    data, fragment = CALIBRATION_CASES[case]
    if case == "a generator that fails":
        data = failing_generator()  # a fresh one per run
    model = mixed_model()
    snap = snapshot(model)
    err = refused(ll.AttachError, fragment, ll.attach, model, small_cfg("antipasto_corda"), data, progress=False)
    assert isinstance(err, ValueError)  # calibration errors were ValueErrors; they still are
    assert_unchanged(model, snap)


def test_non_finite_activations_name_the_layer_and_change_nothing():
    model = mixed_model()
    bad = good()
    with torch.no_grad():
        model.model.embed_tokens.weight[bad["input_ids"][0, 0]] = float("nan")
    snap = snapshot(model)
    refused(ll.AttachError, f"calibration: non-finite activations at the input of {Q0}", ll.attach, model,
            small_cfg("eva"), [bad], progress=False)  # fmt: skip
    assert_unchanged(model, snap)


def test_calibration_restores_each_submodules_own_mode():
    model = mixed_model()
    model.model.layers[0].self_attn.eval()  # one more module whose flag differs from its parent's
    modes = {n: m.training for n, m in model.named_modules()}
    assert len(set(modes.values())) == 2
    ll.attach(model, small_cfg("eva"), calibration_data=calibration(), progress=False)
    assert {n: m.training for n, m in model.named_modules()} == modes
    ll.detach(model)
    snap = snapshot(model)
    data = [good(), {"input_ids": ids(1, 4) + 99}]  # raises midway, after a batch ran with its hooks
    refused(ll.AttachError, "batch 1: input_ids holds", ll.attach, model, small_cfg("eva"), data, progress=False)
    assert_unchanged(model, snap)  # modes, and no calibration hook left


# --- failures inside attach: nothing installed, or everything taken back out ---------------------


def failing_on_call(fn, n: int, error: Exception):
    """fn, except that its n-th call raises `error`."""
    calls = [0]

    def wrapped(*args, **kw):
        calls[0] += 1
        if calls[0] == n:
            raise error
        return fn(*args, **kw)

    return wrapped


@pytest.mark.parametrize("name", ["lora", "pissa", "antipasto"])
@pytest.mark.parametrize(
    "error, fragment",
    [
        (ValueError("too few tokens"), "too few tokens"),
        (RuntimeError("CUDA out of memory"), "init failed: RuntimeError: CUDA out of memory"),
        (KeyError("lora_U"), "init failed: KeyError: 'lora_U'"),
    ],
)
def test_a_variant_init_failing_on_the_third_layer_changes_nothing(name, error, fragment, monkeypatch):
    gen = ll.variant_module(name)
    monkeypatch.setattr(gen, "init", failing_on_call(gen.init, 3, error))
    model = mixed_model()
    snap = snapshot(model)
    third = list(rt.find_targets(model, small_cfg(name)))[2]
    refused(ll.AttachError, f"{name}: {third}: {fragment}", ll.attach, model, small_cfg(name), progress=False)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("name", ["pissa", "antipasto_arrow"])
def test_a_crop_failing_on_the_third_layer_takes_everything_back_out(name, monkeypatch):
    gen = ll.variant_module(name)
    monkeypatch.setattr(gen, "frozen_weight", failing_on_call(gen.frozen_weight, 3, RuntimeError("out of memory")))
    model = mixed_model()
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="out of memory"):
        ll.attach(model, small_cfg(name), progress=False)
    # the two cropped weights are restored as detach restores them: within fp32 rounding
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, snap.state_dict[k], atol=1e-6, rtol=0)
    assert_unchanged(model, snap._replace(state_dict=model.state_dict()))  # tensors, hooks, flags: exact


def test_a_named_adapter_failing_midway_leaves_the_other_adapters_as_they_were(monkeypatch):
    gen = ll.variant_module("pissa")
    monkeypatch.setattr(gen, "frozen_weight", failing_on_call(gen.frozen_weight, 3, RuntimeError("out of memory")))
    model = attached()  # a default lora adapter, its tensors trainable
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="out of memory"):
        ll.attach(model, small_cfg("pissa"), progress=False, name="math")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, snap.state_dict[k], atol=1e-6, rtol=0)
    assert_unchanged(model, snap._replace(state_dict=model.state_dict()))  # no slot left, flags as they were
    assert any(p.requires_grad for p in ll.trainable_parameters(model))


def test_subtract_may_share_a_weight_that_crop_may_not():
    model = tied((1, "q_proj"), (0, "q_proj"))
    with pytest.raises(ll.AttachError, match="shares its storage"):
        ll.attach(model, ll.from_spec("pissa", r=2))
    snap = snapshot(model)
    ll.attach(model, ll.from_spec("pissa", r=2, residual="subtract"))  # W is never written
    ll.detach(model)
    assert_unchanged(model, snap)


def test_an_adapter_on_a_submodule_accounts_for_its_tensors():
    model = mixed_model()
    ll.attach(model.model.layers[0], ll.LoRAConfig(r=2))
    ll.attach(model, ll.LoRAConfig(r=2, layers=[1]))  # other targets: nothing stray, both attached
    assert sorted(ll.state(model).targets) == [f"model.layers.1.self_attn.{p}" for p in ("q_proj", "v_proj")]
    refused(
        ll.AttachError, "attached through another module", ll.attach, make_model(), ll.LoRAConfig()
    ) if False else None
    ll.detach(model)
    ll.detach(model.model.layers[0])
    assert not any(k.startswith("lora_") for k, _ in model.named_parameters())


def test_set_coeff_keeps_to_the_specs_bounds_and_changes_nothing_on_refusal(monkeypatch):
    model = attached("antipasto")
    monkeypatch.setitem(ll.variant_module("antipasto").BOUNDS, "coeff", (-1.0, 1.0))
    snap = snapshot(model)
    refused(ll.SpecError, "set_coeff: antipasto.coeff=2.0 is above its maximum 1.0", ll.set_coeff, model, 2.0)
    assert_unchanged(model, snap)  # the state's config and every target's
    ll.set_coeff(model, -1)
    assert {t.cfg.coeff for t in ll.state(model).targets.values()} == {ll.state(model).cfg.coeff} == {-1.0}


def test_a_spec_whose_tensors_dwarf_the_layer_is_refused_before_allocating(tmp_path, monkeypatch):
    """A user spec may declare any shape within 2**31 per dimension (and an r up to 65536 that is
    not clamped); attach refuses a tensor far larger than the layer's weight before calling init,
    so no spec can exhaust memory."""
    monkeypatch.setenv("LORA_LITE_CACHE", str(tmp_path / "cache"))
    spec = ll.registry.shipped_specs_dir() / "lora.yaml"
    text = (
        spec.read_text(encoding="utf-8")
        .replace("name: lora", "name: bomb")
        .replace("max: 65536, rank: true", "max: 65536")
    )
    path = tmp_path / "bomb.yaml"
    path.write_text(text, encoding="utf-8")
    cfg = ll.from_spec(path, r=65536)
    model = make_model()
    snap = snapshot(model)
    refused(ll.AttachError, "more than 16x the layer's", ll.attach, model, cfg)
    assert_unchanged(model, snap)
