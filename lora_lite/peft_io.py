"""PEFT-format adapter directories: ll.export_peft writes one, ll.load_peft attaches one.

A PEFT directory holds `adapter_config.json` and `adapter_model.safetensors`, keys
`base_model.model.<module>.<tensor>` with no adapter name (PEFT's `save_pretrained` layout), and
loads with `peft.PeftModel.from_pretrained(base, dir)` or a server (vLLM, SGLang: plain LoRA only).

Export routes, by spec (ROUTES):
    direct      lora, eva, lora_fa (LoRA; LoRA-FA's frozen A is an ordinary lora_A), rslora (LoRA,
                alpha / sqrt(r) folded into lora_alpha), dora (LoRA + use_dora), ia3, ia3_ff
                (IA3), hra (HRA), delora (DELORA), vera (VERA), loha (LOHA), lokr (LOKR: w2 as
                w2_a, w2_b where r < max(k, n) / 2, else the full w2_a w2_b, as PEFT builds it),
                oft (OFT), boft (BOFT; PEFT loads factors >= 2 only with its CUDA extension),
                road (ROAD)
    composed    a spec not shipped whose parts are a PEFT LoRA (lowrank core, lora_A/lora_B,
                scale alpha / r, alpha / sqrt(r) or alpha, frozen, dropout, magnitude: use_dora)
    refused     hra_dora (PEFT's HRA has no DoRA magnitude) and any other composition
    converted   pissa, milora, olora: trained on W_res = W - s B0 A0, so on the original W the
                change is s (B A - B0 A0) = s [B, -B0] [A; A0]: rank and lora_alpha doubled,
                init_lora_weights true (as PEFT's path_initial_model_for_weight_conversion);
                pissa_dora the same with use_dora (W_res + s B A = W + s (B A - B0 A0): the
                same adapted weight, so the same norm)
    as-LoRA     antipasto, antipasto_corda (lora_B = U diag(S_eff - S), lora_A = Vh or P),
                antipasto_dora (the same with use_dora and the magnitude),
                lora_xs (lora_B = U diag(S) M, lora_A = Vh),
                antipasto_arrow, corda_arrow (lora_B = U D diag(S), D the core minus I),
                antipasto_ablate (rank k: lora_B = U Chat diag(-coeff strength), lora_A = Chat^T diag(S) Vh);
                exact at the current coeff and scale, for serving: the parametrisation is gone
Every LoRA-form export keeps each layer's scaling at lora_alpha / r (per-layer ranks go to
rank_pattern with a matching alpha_pattern, any other factor into lora_B), so a server that
reads only `r` and `lora_alpha` (vLLM) computes what PEFT computes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .checkpoint import CheckpointError, as_path
from .codegen import SpecError
from .registry import variant_module
from .runtime import (
    EXCLUDE,
    AdapterSlot,
    AttachError,
    base_weight,
    check_model,
    check_name,
    check_quantized,
    install,
    is_conv1d,
    is_embedding,
    is_linear_like,
    is_quantized,
    layer_dims,
    shared_shapes,
    states,
    target_info,
)
from .wrappers import unwrap

PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


# ---------------------------------------------------------------- export: per-spec routes
# Each returns the PEFT tensors of one target as {suffix: tensor}, plus its LoRA scaling s_t
# (None for non-LoRA types). Inputs are the target `t` (module, cfg) and the ll.scale value v.


def _lowrank(t, v):
    """LoRA, EVA, DoRA: (A, B, s) as trained; v folds into B (DoRA refuses v != 1 earlier)."""
    m, cfg = t.holder, t.cfg
    out = {"lora_A.weight": m.lora_A.detach(), "lora_B.weight": m.lora_B.detach() * v}
    if hasattr(m, "lora_magnitude_vector"):
        out["lora_magnitude_vector"] = m.lora_magnitude_vector.detach()
    return out, cfg.alpha / cfg.r


def _magnitude(out: dict, m) -> dict:
    """DoRA's magnitude (o,) added to a LoRA export when the adapter has one (use_dora)."""
    if hasattr(m, "lora_magnitude_vector"):
        out["lora_magnitude_vector"] = m.lora_magnitude_vector.detach()
    return out


def _rslora(t, v):
    """rsLoRA: LoRA at s = alpha / sqrt(r) (lora_alpha carries it: s r, so PEFT's alpha / r is s)."""
    out, _ = _lowrank(t, v)
    return out, t.cfg.alpha / math.sqrt(t.cfg.r)


def _pissa(t, v):
    """PiSSA, MiLoRA, OLoRA (+DoRA) on the original W: s B A - s B0 A0 = s [B, -B0] [A; A0] (rank 2r)."""
    m, cfg = t.holder, t.cfg
    A = torch.cat([m.lora_A.detach(), m.lora_A0.detach()], 0)  # (2r, i)
    B = torch.cat([m.lora_B.detach(), -m.lora_B0.detach()], 1) * v  # (o, 2r)
    return _magnitude({"lora_A.weight": A, "lora_B.weight": B}, m), cfg.alpha / cfg.r


def _gain(t, v):
    """AntiPaSTO (+CorDA, +DoRA): the change U diag(S_eff - S) basis."""
    m, cfg = t.holder, t.cfg
    basis = m.lora_P if hasattr(m, "lora_P") else m.lora_Vh  # (r, i)
    g = m.lora_g.float().clamp(max=0.0) if cfg.suppress_only else m.lora_g.float()  # (r,)
    S = m.lora_S.float()
    S_eff = S * (1.0 + nn.functional.elu(cfg.coeff * g))  # (r,)
    B = m.lora_U.float() * (S_eff - S) * v  # (o, r)
    return _magnitude({"lora_A.weight": basis.detach().float(), "lora_B.weight": B}, m), 1.0


def _dense(t, v):
    """LoRA-XS: the change U diag(S) M Vh (M the trained r x r matrix)."""
    m = t.holder
    B = ((m.lora_U.float() * m.lora_S.float()) @ m.lora_M.float()) * v  # (o, r)
    return {"lora_A.weight": m.lora_Vh.detach().float(), "lora_B.weight": B}, 1.0


def _arrow(t, v):
    """Arrow core on an SVD/CorDA basis: the change U D diag(S) basis, D = blockdiag(coeff M, ELU(coeff g))."""
    m, cfg = t.holder, t.cfg
    basis = m.lora_P if hasattr(m, "lora_P") else m.lora_Vh  # (r, i)
    b = cfg.block
    g = m.lora_g.float().clamp(max=0.0) if cfg.suppress_only else m.lora_g.float()  # (r - b,)
    D = torch.diag(nn.functional.elu(cfg.coeff * torch.cat([g.new_zeros(b), g])))  # (r, r)
    D[:b, :b] = cfg.coeff * m.lora_M.float()  # (b, b) the dense block
    B = (m.lora_U.float() @ D) * m.lora_S.float() * v  # (o, r)
    return {"lora_A.weight": basis.detach().float(), "lora_B.weight": B}, 1.0


def _ablate(t, v):
    """Ablation of k directions: the change U Chat diag(-coeff strength) Chat^T diag(S) Vh, rank k."""
    m, cfg = t.holder, t.cfg
    c = m.lora_c.float()  # (r, k)
    Chat = c / torch.linalg.vector_norm(c) if cfg.k == 1 else torch.linalg.qr(c)[0]  # (r, k) orthonormal
    w = -cfg.coeff * torch.sigmoid(m.lora_strength_logit.float())  # (k,)
    B = (m.lora_U.float() @ Chat) * w * v  # (o, k)
    A = (Chat.T * m.lora_S.float()) @ m.lora_Vh.float()  # (k, i)
    return {"lora_A.weight": A, "lora_B.weight": B}, 1.0


def _ia3(t, v):
    """IA3 / IA3-FF: gain g, scaled as 1 + v (g - 1) (y + v (y g - y) = y (1 + v (g - 1)))."""
    g = 1.0 + v * (t.holder.lora_ia3.detach().float() - 1.0)
    return {"ia3_l": g[None, :] if t.cfg.variant().HOOK == "input" else g[:, None]}, None  # (1, i) / (o, 1)


def _hra(t, v):
    return {"hra_u": t.holder.lora_hra_u.detach()}, None  # (i, r)


def _delora(t, v):
    """DeLoRA: lambda is linear in the update (B's norm is divided out), so v folds into lambda."""
    m = t.holder
    return {
        "delora_A": m.lora_A.detach(),
        "delora_B": m.lora_B.detach(),
        "delora_lambda": m.lora_lambda.detach() * v,
        "delora_w_norm": m.lora_w_norm.detach(),
    }, None


def _vera(t, v):
    """VeRA: the per-target lambdas (lambda_b is linear in the update, so v folds into it); the
    shared A and B are added once by _payload (PEFT's base_model.vera_A / vera_B)."""
    m = t.holder
    return {"vera_lambda_b": m.lora_vera_lambda_b.detach() * v, "vera_lambda_d": m.lora_vera_lambda_d.detach()}, None


def _loha(t, v):
    """LoHa: PEFT's hada_w{1,2}_{a,b} as trained; v folds into w2_b (the update is linear in it)."""
    m = t.holder
    out = {f"hada_w{k}_{side}": getattr(m, f"lora_hada_w{k}_{side}").detach() for k in (1, 2) for side in "ab"}
    out["hada_w2_b"] = out["hada_w2_b"] * v
    return out, None


def _lokr(t, v):
    """LoKr: w1 (l, m) with v folded in, and w2 in the layout PEFT builds for this layer's r: the
    factors w2_a (k, r), w2_b (r, n) where r < max(k, n) / 2, else the full w2 = w2_a w2_b (k, n)
    (PEFT's LoKrLayer.update_layer, decompose_both false): the same kron(w1, w2) either way."""
    m = t.holder
    w2_a, w2_b = m.lora_lokr_w2_a.detach(), m.lora_lokr_w2_b.detach()  # (k, r), (r, n)
    out = {"lokr_w1": m.lora_lokr_w1.detach() * v}
    if w2_a.shape[1] < max(w2_a.shape[0], w2_b.shape[1]) / 2:
        return out | {"lokr_w2_a": w2_a, "lokr_w2_b": w2_b}, None
    return out | {"lokr_w2": w2_a.float() @ w2_b.float()}, None  # (k, n)


def _oft(t, v):
    return {"oft_R.weight": t.holder.lora_oft_R.detach()}, None  # (d_in / b, b (b - 1) / 2)


def _boft(t, v):
    m = t.holder
    return {"boft_R": m.lora_boft_R.detach(), "boft_s": m.lora_boft_s.detach()}, None  # (f, d_in / b, b, b), (o, 1)


def _road(t, v):
    m = t.holder
    return {"road_theta": m.lora_theta.detach(), "road_alpha": m.lora_alpha.detach()}, None  # (o v / 2,) each


# spec -> (route, PEFT type, tensors, whether ll.scale != 1 is representable)
ROUTES = {
    "lora": ("direct", "LORA", _lowrank, True),
    "eva": ("direct", "LORA", _lowrank, True),
    "lora_fa": ("direct", "LORA", _lowrank, True),
    "rslora": ("direct", "LORA", _rslora, True),
    "dora": ("direct", "LORA", _lowrank, False),
    "ia3": ("direct", "IA3", _ia3, True),
    "ia3_ff": ("direct", "IA3", _ia3, True),
    "hra": ("direct", "HRA", _hra, False),
    "delora": ("direct", "DELORA", _delora, True),
    "vera": ("direct", "VERA", _vera, True),
    "pissa": ("converted", "LORA", _pissa, True),
    "milora": ("converted", "LORA", _pissa, True),
    "olora": ("converted", "LORA", _pissa, True),
    "pissa_dora": ("converted", "LORA", _pissa, False),
    "eva_dora": ("direct", "LORA", _lowrank, False),
    "corda_lora": ("converted", "LORA", _pissa, True),
    "corda_dora": ("converted", "LORA", _pissa, False),
    "lora_xs": ("as-LoRA", "LORA", _dense, True),
    "antipasto_dora": ("as-LoRA", "LORA", _gain, False),
    "antipasto": ("as-LoRA", "LORA", _gain, True),
    "antipasto_corda": ("as-LoRA", "LORA", _gain, True),
    "antipasto_arrow": ("as-LoRA", "LORA", _arrow, True),
    "corda_arrow": ("as-LoRA", "LORA", _arrow, True),
    "antipasto_ablate": ("as-LoRA", "LORA", _ablate, True),
    "loha": ("direct", "LOHA", _loha, True),
    "lokr": ("direct", "LOKR", _lokr, True),
    "oft": ("direct", "OFT", _oft, False),
    "boft": ("direct", "BOFT", _boft, False),
    "road": ("direct", "ROAD", _road, False),
}

# Shipped specs without a route, and why (refused, pointing to ll.merge).
NO_ROUTE = {
    "hra_dora": "PEFT's HRA has no DoRA magnitude (use_dora is LoRA's only), so no PEFT type computes its forward"
}
LORA_PARAMS = {"lora_A", "lora_B", "lora_magnitude_vector"}

# adapter_config.json keys export_peft writes, per PEFT type: each a field of that type's config
# dataclass (peft/tuners/<type>/config.py and PeftConfig's own), so PeftModel.from_pretrained
# reads every key and warns about none (PEFT takes a key its class lacks for one written by a
# newer PEFT, and tells the user to upgrade). A fixed list: export needs no PEFT installed.
# tests/test_deploy.py checks it against the installed PEFT's fields.
_COMMON_KEYS = ("peft_type", "task_type", "target_modules", "inference_mode", "base_model_name_or_path", "revision")
_LAYERS_KEYS = ("modules_to_save", "layers_to_transform", "layers_pattern")
PEFT_KEYS = {
    "LORA": ("exclude_modules", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora",
             "fan_in_fan_out", "bias", "lora_bias", "lora_dropout", "init_lora_weights", *_LAYERS_KEYS),
    "IA3": ("exclude_modules", "feedforward_modules", "fan_in_fan_out", "init_ia3_weights", "modules_to_save"),
    "HRA": ("exclude_modules", "r", "apply_GS", "init_weights", "bias", *_LAYERS_KEYS),
    "DELORA": ("exclude_modules", "r", "delora_lambda", "rank_pattern", "lambda_pattern", "module_dropout",
               "init_weights", "bias", *_LAYERS_KEYS),
    "VERA": ("r", "d_initial", "save_projection", "projection_prng_key", "vera_dropout", "init_weights",
             "fan_in_fan_out", "bias", *_LAYERS_KEYS),  # no exclude_modules
    "LOHA": ("exclude_modules", "r", "alpha", "rank_pattern", "alpha_pattern", "rank_dropout", "module_dropout",
             "use_effective_conv2d", "init_weights", *_LAYERS_KEYS),  # no bias
    "LOKR": ("exclude_modules", "r", "alpha", "rank_pattern", "alpha_pattern", "rank_dropout", "module_dropout",
             "use_effective_conv2d", "init_weights", "decompose_both", "decompose_factor", "rank_dropout_scale",
             *_LAYERS_KEYS),  # no bias
    "OFT": ("exclude_modules", "r", "oft_block_size", "use_cayley_neumann", "num_cayley_neumann_terms", "coft",
            "eps", "block_share", "module_dropout", "fan_in_fan_out", "init_weights", "bias", "peft_version",
            *_LAYERS_KEYS),
    "BOFT": ("exclude_modules", "boft_block_size", "boft_block_num", "boft_dropout", "boft_n_butterfly_factor",
             "fan_in_fan_out", "init_weights", "bias", *_LAYERS_KEYS),
    "ROAD": ("variant", "group_size", "init_weights", "modules_to_save"),  # no exclude_modules, bias, layers
}  # fmt: skip
PEFT_KEYS = {k: frozenset(_COMMON_KEYS + v) for k, v in PEFT_KEYS.items()}
# PEFT 0.18 changed OFT's Cayley-Neumann series (lora-lite computes the new one); an OFT config
# without peft_version >= 0.18 makes PEFT warn that the adapter needs retraining.
OFT_CAYLEY_NEUMANN_VERSION = "0.18.0"
LORA_SCALES = {"alpha_over_r": lambda c: c.alpha / c.r, "alpha_over_sqrt_r": lambda c: c.alpha / math.sqrt(c.r)}
LORA_SCALES["constant"] = lambda c: c.alpha


def _spec_of(gen):
    """The parsed Spec of a variant module (a user's from its verified text, a shipped one from its file)."""
    from .codegen.spec import load_spec, parse_spec, shipped_specs_dir

    text = getattr(gen, "SPEC_TEXT", None)
    if text is not None:
        return parse_spec(text, where=f"<spec {gen.NAME}>", stem=gen.NAME)
    return load_spec(shipped_specs_dir() / f"{gen.NAME}.yaml")


def _route(gen) -> tuple:
    """ROUTES' entry for this variant: by its name for a shipped module, or, for a spec ROUTES
    does not name or a user's spec (even one named as a shipped spec, whose math may differ), by its
    parts when they are a PEFT LoRA (no residual, a lowrank core with only lora_A, lora_B and
    optionally lora_magnitude_vector, modifiers among scale (alpha / r, alpha / sqrt(r): use_rslora,
    or alpha), frozen, dropout and magnitude: use_dora). AttachError with the reason otherwise."""
    user = getattr(gen, "SPEC_TEXT", None) is not None  # compiled from a user's text, whatever its name
    if gen.NAME in ROUTES and not user:
        return ROUTES[gen.NAME]
    why = None if user else NO_ROUTE.get(gen.NAME)
    if why is None:
        try:
            spec = _spec_of(gen)
        except (SpecError, OSError):
            spec = None
        why = _not_lora(spec, gen.BOUNDS)
    if why is None:
        rule = next((x.get("rule") for x in spec.modifiers if x["kind"] == "scale"), "alpha_over_r")
        magnitude = any(x["kind"] == "magnitude" for x in spec.modifiers)

        def fn(t, v):
            out, _ = _lowrank(t, v)
            return out, LORA_SCALES[rule](t.cfg)

        return ("composed", "LORA", fn, not magnitude)
    raise AttachError(
        f"export_peft: {gen.NAME} has no PEFT route ({why}); use ll.merge(model) and save_pretrained for a plain model"
    )


def _not_lora(spec, bounds: dict) -> str | None:
    """Why a spec's composition is not a PEFT LoRA (None when it is one)."""
    if spec is None:
        return "its spec text is not available to read its parts"
    if spec.core != "lowrank":
        return f"a spec not shipped exports only as a PEFT LoRA composition, and its core {spec.core!r} is not lowrank"
    if spec.residual != "none" or spec.hook != "output":
        return f"residual {spec.residual!r} with a {spec.hook} hook is not a PEFT LoRA forward"
    names = {p.name for p in spec.params}
    if not {"lora_A", "lora_B"} <= names or names - LORA_PARAMS:
        return f"its tensors {sorted(names)} are not PEFT LoRA's lora_A, lora_B (lora_magnitude_vector)"
    for x in spec.modifiers:
        if x["kind"] not in ("scale", "frozen", "dropout", "magnitude"):
            return f"its {x['kind']} modifier has no PEFT LoRA option"
        if x["kind"] == "scale" and x.get("rule") not in LORA_SCALES:
            return f"its scale rule {x.get('rule')!r} has no PEFT LoRA option"
    if not {"r", "alpha"} <= set(bounds):
        return "it has no r and alpha for PEFT's r and lora_alpha"
    return None


def _fan_in_fan_out(st, peft_type: str) -> bool:
    """PEFT's fan_in_fan_out for the adapter's targets: True when they are transformers Conv1D
    (weight stored (d_in, d_out); lora_A/lora_B keep their (r, i)/(o, r) shapes). AttachError
    when Conv1D and linear targets are mixed (PEFT has one flag per adapter) or for a PEFT type
    with no Conv1D layer (HRA, DeLoRA)."""
    conv = [n for n, t in st.targets.items() if is_conv1d(t.module)]
    if not conv:
        return False
    if peft_type not in ("LORA", "IA3", "VERA"):
        raise AttachError(
            f"export_peft: {st.variant.NAME}: {conv[0]} is a transformers Conv1D, which PEFT's {peft_type} "
            "does not adapt; use ll.merge(model) and save_pretrained"
        )
    linear = [n for n, t in st.targets.items() if n not in conv and not is_embedding(t.module)]
    if linear:
        raise AttachError(
            f"export_peft: {conv[0]} is a Conv1D (fan_in_fan_out) and {linear[0]} is not; PEFT takes one "
            "fan_in_fan_out per adapter: attach separate adapters to each kind"
        )
    return True


def _pattern_key(name: str) -> str:
    """A rank_pattern/alpha_pattern key PEFT matches to exactly this module (it uses re.match)."""
    return re.escape(name)


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _lora_layout(st, per: dict) -> tuple[dict, dict]:
    """Uniform scaling lora_alpha / r across layers; fold each layer's own factor into lora_B."""
    ranks = {n: p[0]["lora_A.weight"].shape[0] for n, p in per.items()}
    r = max(ranks.values())
    s = next(per[n][1] for n in per if ranks[n] == r)
    rank_pattern, alpha_pattern, tensors = {}, {}, {}
    for n, (ts, s_t) in per.items():
        ts = dict(ts)
        if s_t != s:
            ts["lora_B.weight"] = ts["lora_B.weight"] * (s_t / s)
        if ranks[n] != r:
            rank_pattern[_pattern_key(n)] = ranks[n]
            alpha_pattern[_pattern_key(n)] = _number(s * ranks[n])
        tensors[n] = ts
    cfg = {
        "r": r,
        "lora_alpha": _number(s * r),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": False,
        "use_dora": any("lora_magnitude_vector" in ts for ts in tensors.values()),
        "fan_in_fan_out": _fan_in_fan_out(st, "LORA"),
        "bias": "none",
        "lora_bias": False,
        "lora_dropout": 0.0,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": None,
    }
    return cfg, tensors


def export_peft(model: nn.Module, out_dir: str | os.PathLike, name: str | None = None) -> Path:
    """Write the attached adapters as PEFT adapter directories in PEFT's layout (`default` in
    out_dir, adapter `name` in out_dir/name); name None: every attached adapter. Returns `out_dir`.

    Files: adapter_config.json (peft_type, r, lora_alpha, target_modules as exact module names,
    use_rslora, use_dora, rank_pattern/alpha_pattern, ...) and adapter_model.safetensors (keys
    `base_model.model.<module>.lora_A.weight` (r, i), `lora_B.weight` (o, r), DoRA's (and
    PiSSA-DoRA's, AntiPaSTO-DoRA's)
    `lora_magnitude_vector` (o,), IA3's `ia3_l` (o, 1) or (1, i), HRA's `hra_u` (i, r), DeLoRA's
    `delora_A/B/lambda/w_norm`, LoHa's `hada_w{1,2}_{a,b}`, LoKr's `lokr_w1` and `lokr_w2_a/b` or
    `lokr_w2`, OFT's `oft_R.weight`, BOFT's `boft_R/boft_s`, RoAd's `road_theta/road_alpha`),
    each written atomically (temp file + rename). The config holds only keys the PEFT type's
    config class defines (PEFT_KEYS), so PEFT loads it without an "upgrade PEFT" warning; an OFT
    with Cayley-Neumann carries peft_version 0.18.0 (the series lora-lite computes). The export is of
    the adapter as it acts now (coeff, ll.scale): `peft.PeftModel.from_pretrained(base, out_dir)`
    on the original base model gives this model's logits (measured within 1e-6 of max|y| in
    fp32, tests/test_deploy.py). The routes per spec are in this module's docstring.
    Conv1D targets (GPT-2) export with fan_in_fan_out: true (LoRA-form and IA3 routes only).
    `model` may be wrapped (torch.compile, DDP, accelerate, FSDP2).
    Raises AttachError, writing nothing, when nothing is attached, `name` is not an attached
    adapter, an adapter is switched off (ll.disabled), a spec has no route (use ll.merge), a
    DoRA-type, HRA, OFT, BOFT or RoAd adapter has ll.scale != 1 (not representable), or HRA ranks
    differ per layer (PEFT's HRA has no rank_pattern); CheckpointError, writing nothing, when a
    tensor to export holds NaN or inf (as ll.save) or the folder cannot be written, and when
    `out_dir` is no str or os.PathLike (naming it and the type).
    Source: PEFT's save_pretrained layout (peft/utils/save_and_load.py) and, for PiSSA,
    LoraModel._convert_state_dict_for_initial_model (peft/tuners/lora/model.py).
    """
    model = unwrap(model) if isinstance(model, nn.Module) else model
    every = states(model)
    if not every:
        raise AttachError("export_peft: no lora-lite adapter is attached to this model")
    if name is not None and name not in every:
        raise AttachError(f"export_peft: no adapter named {repr(name)[:60]} (attached: {list(every)})")
    out = as_path(out_dir, "export_peft", "out_dir")
    files = {n: _payload(model, st) for n, st in every.items() if name in (None, n)}  # all checked first
    for n, (flat, provenance, text) in files.items():
        d = out if n == "default" else out / n
        meta = {"format": "pt", "lora_lite": json.dumps(provenance)}
        try:
            d.mkdir(parents=True, exist_ok=True)
            _atomic(d / WEIGHTS_FILE, lambda p: save_file(flat, p, metadata=meta))
            _atomic(d / CONFIG_FILE, lambda p: Path(p).write_text(text))
        except OSError as e:
            raise CheckpointError(f"{d}: cannot write: {e.strerror or _line(e)}") from None
    return out


def _payload(model: nn.Module, st) -> tuple[dict, dict, str]:
    """(safetensors tensors, provenance, adapter_config.json text) of one adapter; AttachError
    when it has no PEFT form (see export_peft)."""
    spec = st.variant.NAME
    route, peft_type, fn, scalable = _route(st.variant)
    _fan_in_fan_out(st, peft_type)  # Conv1D targets: one layout for all, and a PEFT type that takes them
    per = {}
    for n, t in st.targets.items():
        if not t.enabled:
            raise AttachError(f"export_peft: adapter {st.name!r} is switched off (ll.disabled or ll.set_active) at {n}")
        if t.scale != 1.0 and not scalable:
            raise AttachError(
                f"export_peft: {spec} at ll.scale {t.scale} is not a {peft_type} adapter "
                f"({n}); ll.scale(model, 1.0) first, or ll.merge"
            )
        per[n] = fn(t, t.scale)
    names = list(per)
    common = {
        "peft_type": peft_type,
        "task_type": None,
        "target_modules": names,
        "exclude_modules": None,  # written where the type defines it (PEFT_KEYS)
        "inference_mode": True,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "revision": None,
    }
    if peft_type == "LORA":
        cfg, tensors = _lora_layout(st, per)
    else:
        tensors = {n: p[0] for n, p in per.items()}
        if peft_type == "IA3":
            cfg = {
                "feedforward_modules": names if spec == "ia3_ff" else [],
                "fan_in_fan_out": _fan_in_fan_out(st, "IA3"),
            }
            cfg |= {"init_ia3_weights": True, "modules_to_save": None}
        elif peft_type == "HRA":
            ranks = {n: ts["hra_u"].shape[1] for n, ts in tensors.items()}
            r = ranks[names[0]]
            odd = [n for n in names if ranks[n] != r]
            if odd:
                raise AttachError(
                    f"export_peft: hra: {odd[0]} has r={ranks[odd[0]]}, {names[0]} r={r}; "
                    "PEFT's HRA takes one r for all layers (no rank_pattern): use ll.merge"
                )
            cfg = {"r": r, "apply_GS": False, "init_weights": True, "bias": "none", "modules_to_save": None}
            cfg |= {"layers_to_transform": None, "layers_pattern": None}
        elif peft_type == "VERA":  # one r for all layers; A and B saved once (save_projection)
            cfg = {"r": st.cfg.r, "d_initial": _number(st.cfg.d_initial), "save_projection": True}
            cfg |= {"projection_prng_key": st.cfg.projection_prng_key, "vera_dropout": 0.0, "init_weights": True}
            cfg |= {"fan_in_fan_out": _fan_in_fan_out(st, "VERA"), "bias": "none", "modules_to_save": None}
            cfg |= {"layers_to_transform": None, "layers_pattern": None}
        elif peft_type in ("LOHA", "LOKR"):  # per-layer r and alpha (clamped ranks) as patterns
            cfg = _rank_layout(st)
            cfg |= {"rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": False, "init_weights": True}
            if peft_type == "LOKR":
                cfg |= {
                    "decompose_both": False,
                    "decompose_factor": st.cfg.decompose_factor,
                    "rank_dropout_scale": False,
                }
        elif peft_type == "OFT":
            cfg = {"r": 0, "oft_block_size": st.cfg.oft_block_size, "use_cayley_neumann": st.cfg.use_cayley_neumann}
            cfg |= {"num_cayley_neumann_terms": st.cfg.num_cayley_neumann_terms, "coft": False, "eps": 6e-05}
            cfg |= {"block_share": False, "module_dropout": 0.0, "fan_in_fan_out": False, "init_weights": True}
            cfg |= {"bias": "none", "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None}
            if st.cfg.use_cayley_neumann:  # the series of PEFT >= 0.18, which PEFT checks by this key
                cfg["peft_version"] = OFT_CAYLEY_NEUMANN_VERSION
        elif peft_type == "BOFT":  # factors >= 2 load in PEFT only where its CUDA extension builds
            cfg = {"boft_block_size": st.cfg.boft_block_size, "boft_block_num": 0, "boft_dropout": 0.0}
            cfg |= {"boft_n_butterfly_factor": st.cfg.boft_n_butterfly_factor, "fan_in_fan_out": False}
            cfg |= {"init_weights": True, "bias": "none", "modules_to_save": None}
            cfg |= {"layers_to_transform": None, "layers_pattern": None}
        elif peft_type == "ROAD":
            cfg = {"variant": f"road_{st.cfg.road_variant}", "group_size": st.cfg.group_size, "init_weights": True}
            cfg |= {"modules_to_save": None}
        else:  # DELORA
            ranks = {n: ts["delora_A"].shape[0] for n, ts in tensors.items()}
            r = max(ranks.values())
            cfg = {
                "r": r,
                "delora_lambda": _number(st.cfg.lambda0),
                "rank_pattern": {_pattern_key(n): k for n, k in ranks.items() if k != r},
                "lambda_pattern": {},
                "module_dropout": 0.0,
                "init_weights": True,
                "bias": "none",
                "modules_to_save": None,
                "layers_to_transform": None,
                "layers_pattern": None,
            }
    flat = {
        f"{PREFIX}{n}.{_embedding_key(k) if is_embedding(st.targets[n].module) else k}": v.detach()
        .to(device="cpu", dtype=st.cfg.dtype)
        .contiguous()
        for n, ts in tensors.items()
        for k, v in ts.items()
    }
    holder = next(iter(st.targets.values())).holder
    for k in st.variant.SHARED:  # VeRA's A, B: one tensor each, under PEFT's base_model.vera_A / vera_B
        flat["base_model." + k.removeprefix("lora_")] = getattr(holder, k).detach().to("cpu", st.cfg.dtype).contiguous()
    bad = [k for k, v in flat.items() if not bool(torch.isfinite(v).all())]  # as ll.save: never written
    if bad:
        raise CheckpointError(f"export_peft: tensor {bad[0]!r} holds NaN/inf values; not exported ({st.name!r})")
    provenance = {"spec": spec, "route": route, "scale": [t.scale for t in st.targets.values()][0]}
    if "coeff" in st.variant.RUNTIME_KNOBS:
        provenance["coeff"] = st.cfg.coeff
    config = {k: v for k, v in sorted({**common, **cfg}.items()) if k in PEFT_KEYS[peft_type]}
    lost = [k for k, v in {**common, **cfg}.items() if k not in config and v is not None]  # only unset ones drop
    if lost:
        raise AttachError(f"export_peft: PEFT's {peft_type} config has no {lost[0]!r} for {spec} ({st.name!r})")
    return flat, provenance, json.dumps(config, indent=2) + "\n"


def _rank_layout(st) -> dict:
    """LoHa/LoKr: r and alpha of the largest-rank target, rank_pattern/alpha_pattern for the rest."""
    ranks = {n: t.cfg.r for n, t in st.targets.items()}
    r = max(ranks.values())
    alpha = next(t.cfg.alpha for n, t in st.targets.items() if ranks[n] == r)
    rank_pattern = {_pattern_key(n): k for n, k in ranks.items() if k != r}
    alpha_pattern = {_pattern_key(n): _number(t.cfg.alpha) for n, t in st.targets.items() if t.cfg.alpha != alpha}
    cfg = {"r": r, "alpha": _number(alpha), "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
    return cfg | {"modules_to_save": None, "layers_to_transform": None, "layers_pattern": None}  # no bias key


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ---------------------------------------------------------------- load_peft

# adapter_config.json keys read below, and keys that change nothing in the math
HANDLED = {
    "peft_type", "r", "lora_alpha", "target_modules", "exclude_modules", "layers_to_transform",
    "layers_pattern", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "init_lora_weights",
    "feedforward_modules", "apply_GS", "delora_lambda", "lambda_pattern", "eva_config", "fan_in_fan_out",
    "d_initial", "projection_prng_key", "save_projection", "alpha", "decompose_factor", "oft_block_size",
    "use_cayley_neumann", "num_cayley_neumann_terms", "boft_block_size", "boft_n_butterfly_factor",
    "group_size", "variant",
}  # fmt: skip
HARMLESS = {
    "auto_mapping", "base_model_name_or_path", "revision", "inference_mode", "task_type", "peft_version",
    "lora_dropout", "module_dropout", "megatron_core", "qalora_group_size", "init_weights", "init_ia3_weights",
    "rank_dropout", "boft_dropout", "eps",  # dropout: training only; eps: read only with coft (refused)
}  # fmt: skip
AS_LORA_INITS = (True, False, "gaussian", "eva", "orthogonal")  # init only: the saved tensors replace it
# JSON types of the numeric and flag keys read below (PEFT writes exactly these; coercing another,
# int(4.5) or bool("no"), would load an adapter that computes something else)
INTS = ("r", "oft_block_size", "boft_block_size", "boft_n_butterfly_factor", "group_size", "decompose_factor",
        "num_cayley_neumann_terms", "projection_prng_key")  # fmt: skip
NUMBERS = ("lora_alpha", "alpha", "d_initial", "delora_lambda")
FLAGS = ("use_rslora", "use_dora", "use_cayley_neumann", "fan_in_fan_out", "save_projection", "apply_GS")
PATTERNS = {"rank_pattern": "an integer", "alpha_pattern": "a number", "lambda_pattern": "a number"}


def _is(value, kind: str) -> bool:
    """True when a JSON value is of `kind`: "an integer", "a number" (bool is neither) or "true or false"."""
    if kind == "true or false":
        return isinstance(value, bool)
    types = int if kind == "an integer" else (int, float)
    return isinstance(value, types) and not isinstance(value, bool)


def _check_types(path: Path, c: dict) -> None:
    """CheckpointError naming the first key of INTS, NUMBERS, FLAGS or PATTERNS holding another JSON type."""
    kinds = {**dict.fromkeys(INTS, "an integer"), **dict.fromkeys(NUMBERS, "a number")}
    kinds |= dict.fromkeys(FLAGS, "true or false")
    for key, kind in kinds.items():
        if key in c and not _is(c[key], kind):
            raise CheckpointError(f"{path}: {key}={c[key]!r}: expected {kind}")
    for key, kind in PATTERNS.items():
        value = c.get(key)
        if value is not None and not (isinstance(value, dict) and all(_is(v, kind) for v in value.values())):
            raise CheckpointError(f"{path}: {key}={value!r}: expected an object of module patterns to {kind}")


def _refuse(path, key, value, why: str):
    raise CheckpointError(f"{path}: {key}={value!r} is not supported: {why}")


def _at_least(version, minimum: str) -> bool:
    """True when a PEFT version string ("0.18.0", "0.18.1.dev0@abc") is at least `minimum`;
    False when it is missing or unreadable (PEFT reads a missing one as 0.0.0)."""
    got = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?(.*)", str(version)) if isinstance(version, str) else None
    if got is None:
        return False
    have, want = tuple(int(x or 0) for x in got.groups()[:3]), tuple(int(x) for x in minimum.split("."))
    pre = re.match(r"\.?(dev|a|b|rc)", got.group(4))  # 0.18.0.dev0, 0.18.0rc1: before 0.18.0, as PEFT reads them
    return have > want or (have == want and pre is None)


def _check_config(path: Path, c: dict) -> str:
    """The lora-lite spec for this PEFT config; CheckpointError naming the first unsupported key
    (or the peft_type, first, when lora-lite has no import route for it)."""
    kind = c.get("peft_type")
    if kind not in IMPORTS:
        raise CheckpointError(
            f"{path}: load_peft: PEFT type {str(kind)[:40]} has no import route yet; "
            f"lora-lite loads {', '.join(IMPORTS)} adapters (merge it in PEFT and save the plain model instead)"
        )
    for key, value in c.items():
        if key in HANDLED or key in HARMLESS:
            continue
        if key == "bias" and value != "none":
            _refuse(path, key, value, "trained biases are not a lora-lite adapter")
        if key == "modules_to_save" and value:
            _refuse(path, key, value, "fully trained modules are not a lora-lite adapter")
        if key in ("bias", "modules_to_save") or value in (None, False, {}, [], ""):
            continue  # an option left off
        _refuse(path, key, value, "lora-lite does not implement this option")
    _check_types(path, c)
    if kind == "LORA":
        init = c.get("init_lora_weights", True)
        if c.get("use_dora") and init not in AS_LORA_INITS:
            _refuse(path, "init_lora_weights", init, "no lora-lite spec combines it with use_dora")
        if init == "pissa":
            return "pissa"
        if init not in AS_LORA_INITS:
            why = (
                "PEFT's randomized SVD cannot be reproduced: save it from PEFT with "
                "path_initial_model_for_weight_conversion (plain LoRA) or use init 'pissa'"
                if str(init).startswith("pissa_niter")
                else "it re-initialises the base weight in a way lora-lite does not reproduce"
            )
            _refuse(path, "init_lora_weights", init, why)
        return "dora" if c.get("use_dora") else "lora"
    if kind == "IA3":
        return "ia3"  # or ia3_ff, decided per target below
    if kind == "HRA":
        if c.get("apply_GS"):
            _refuse(path, "apply_GS", True, "lora-lite's HRA has no Gram-Schmidt option")
        return "hra"
    if kind == "DELORA":
        return "delora"
    if kind == "VERA":
        if c.get("save_projection") is False:
            _refuse(path, "save_projection", False, "lora-lite loads VeRA with its A and B saved in the file")
        return "vera"
    if kind == "OFT":
        if not c.get("oft_block_size"):
            _refuse(path, "oft_block_size", c.get("oft_block_size"), "lora-lite's OFT is set by its block size (not r)")
        if c.get("use_cayley_neumann", True) and not _at_least(c.get("peft_version"), OFT_CAYLEY_NEUMANN_VERSION):
            warnings.warn(  # PEFT warns alike and loads it with the new series too
                f"{path}: load_peft: an OFT adapter with Cayley-Neumann saved before PEFT "
                f"{OFT_CAYLEY_NEUMANN_VERSION} (peft_version {c.get('peft_version')!r}) was trained with the old "
                "series; lora-lite computes the new one, so its outputs differ slightly from training",
                stacklevel=3,
            )
        return "oft"
    if kind == "BOFT":
        if not c.get("boft_block_size"):
            _refuse(path, "boft_block_size", c.get("boft_block_size"), "lora-lite's BOFT is set by its block size")
        return "boft"
    if kind == "ROAD":
        if c.get("variant", "road_1") not in ("road_1", "road_2", "road_4"):
            _refuse(path, "variant", c.get("variant"), "lora-lite's RoAd has road_1, road_2 and road_4")
        return "road"
    return {"LOHA": "loha", "LOKR": "lokr"}[kind]


IMPORTS = ("LORA", "IA3", "HRA", "DELORA", "VERA", "LOHA", "LOKR", "OFT", "BOFT", "ROAD")  # PEFT types load_peft reads


def _pattern_get(pattern: dict, name: str, default):
    """PEFT's get_pattern_key: the value of the first key k with re.match(r'(.*\\.)?(k)$', name)."""
    return next(iter(_pattern_item(pattern, name).values()), default)


def _pattern_item(pattern: dict, name: str) -> dict:
    """{k: v} of the first pattern key k that PEFT matches to `name` ({} when none does)."""
    for k, v in (pattern or {}).items():
        if re.match(rf"(.*\.)?({k})$", name):
            return {k: v}
    return {}


def _matches(c: dict, name: str) -> bool:
    """PEFT's check_target_module_exists (peft/tuners/tuners_utils.py) for one module name."""
    ex = c.get("exclude_modules")
    if ex and (re.fullmatch(ex, name) if isinstance(ex, str) else any(name == e or name.endswith("." + e) for e in ex)):
        return False
    tm = c.get("target_modules")
    if tm is None:
        return False
    if isinstance(tm, str):
        return re.fullmatch(tm, name) is not None
    if name in tm:
        return True
    if not any(name.endswith("." + k) for k in tm):
        return False
    layers = c.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    patterns = c.get("layers_pattern")
    if not patterns:
        found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        found = None
        for p in [patterns] if isinstance(patterns, str) else patterns:
            found = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name)
            if found:
                break
    if not found:
        return False
    idx = int(found.group("idx"))
    return idx == layers if isinstance(layers, int) else idx in layers


def _resolve(peft_dir, name: str) -> Path:
    d = Path(peft_dir)
    if not d.is_dir():
        try:  # a hub id, when the hub is reachable
            from huggingface_hub import snapshot_download

            sub = "" if name == "default" else f"{name}/"
            d = Path(snapshot_download(str(peft_dir), allow_patterns=[f"{sub}{CONFIG_FILE}", f"{sub}{WEIGHTS_FILE}"]))
        except Exception as e:  # offline, unknown repo, no huggingface_hub
            raise CheckpointError(
                f"{peft_dir}: not a local directory, and the hub did not give it ({type(e).__name__})"
            ) from None
    return d if name == "default" else d / name


def load_peft(model: nn.Module, peft_dir: str | os.PathLike, name: str = "default") -> nn.Module:
    """Attach a PEFT adapter directory (LoRA, rsLoRA, DoRA, PiSSA, IA3, HRA, DeLoRA, VeRA, LoHa, LoKr,
    OFT, BOFT, RoAd) as the matching
    lora-lite spec; returns `model`. Logits equal PEFT's on the same base (tests/test_deploy.py).

    peft_dir: a local directory (PEFT's layout: `default` in it, adapter `name` in peft_dir/name),
    or a hub id when the hub is reachable; attached as adapter `name` (see ll.attach).
    Read: target_modules (list: exact name or '.'-suffix; str: a regex PEFT full-matches),
    exclude_modules, layers_to_transform/layers_pattern,
    rank_pattern/alpha_pattern (lambda_pattern), use_rslora (as alpha sqrt(r)), use_dora,
    feedforward_modules (all or none of the targets), init_lora_weights 'pissa' (loads as our
    pissa: W_res recomputed from this model's W, as PEFT does; A and B from the file; on a
    bitsandbytes base, or on layers another adapter crops, with residual 'subtract').
    Raises CheckpointError naming the key, leaving the model unchanged, for what lora-lite does
    not reproduce: pissa_niter_*, olora, corda, loftq, modules_to_save, bias other than "none",
    trainable_token_indices, any other option that is switched on, pickle weights
    (adapter_model.bin), a missing, extra or misshapen tensor, a target that is not a linear
    layer, PEFT's copy of an embedding target's base weight (save_embedding_layers) that is not
    the model's own, a value of another JSON type than PEFT writes (r 4.5, "8", true as an
    integer: never coerced), a value outside the spec's range (r -1, rank_pattern {'v_proj': 0}:
    the message names the file and key), hyperparameters a layer cannot take (the spec's check, as at attach),
    or anything else malformed in the directory, or a `peft_dir` that is no str or os.PathLike
    (naming it and the type); AttachError (before anything changes) when
    an adapter `name` is already attached or for whatever runtime.preflight refuses.
    `model` may be wrapped (torch.compile, DDP, accelerate, FSDP2); the wrapper is returned.
    fan_in_fan_out: true is read for transformers Conv1D targets and refused for any other.
    A target's own weight saved beside it (`<module>.base_layer.weight`: PEFT's default
    save_embedding_layers writes embed_tokens') is checked against this model's and refused,
    naming it, when its shape or values differ (another base: a resized vocabulary).
    A peft_type without an import route is refused naming the type.
    LoKr: a full lokr_w2 (PEFT's layout where r >= max(k, n) / 2) is read by its SVD as w2_a w2_b
    at rank max(r, min(k, n)) for that layer (alpha scaled alike: the same s and update). OFT and
    BOFT by their block size (r / boft_block_num refused); decompose_both, coft, block_share refused.
    VeRA: base_model.vera_A / vera_B (save_projection true; false is refused) shaped for r and the
    largest target, as PEFT's VeraModel._find_dim.
    Source: PEFT's LoraModel/IA3Model/HRAModel/DeloraModel/VeraModel _create_and_replace and
    check_target_module_exists (peft/tuners/).
    """
    check_model(model, "load_peft")
    wrapper, model = model, unwrap(model)
    check_name(name)
    as_path(peft_dir, "load_peft", "peft_dir")  # a local directory or a hub id: a str or os.PathLike
    try:  # the directory is untrusted input: whatever it breaks is one CheckpointError line
        cfg, per_target, shared = _read_peft(model, peft_dir, name)
    except (CheckpointError, AttachError, SpecError):
        raise
    except Exception as e:  # noqa: BLE001 (a malformed file or value; no other type may escape)
        lines = str(e).strip().splitlines() or [""]
        raise CheckpointError(
            f"{peft_dir}: not a readable PEFT adapter ({type(e).__name__}: {lines[0][:200]})"
        ) from None
    install(model, cfg, per_target, op="load_peft", name=name, shared=shared)
    return wrapper


def _read_peft(model: nn.Module, peft_dir, name: str) -> tuple:
    """(adapter config, install's per_target) from a PEFT adapter directory; changes nothing."""
    d = _resolve(peft_dir, name)
    cpath, wpath = d / CONFIG_FILE, d / WEIGHTS_FILE
    try:
        c = json.loads(cpath.read_text())
    except (OSError, ValueError) as e:  # missing, a folder, bad UTF-8 or JSON
        raise CheckpointError(f"{cpath}: not a readable adapter config ({type(e).__name__}: {_line(e)})") from None
    if not isinstance(c, dict):
        raise CheckpointError(f"{cpath}: expected a JSON object")
    if not wpath.exists():
        if (d / "adapter_model.bin").exists():
            raise CheckpointError(
                f"{d / 'adapter_model.bin'}: pickle weights are refused (loading them can run code); "
                "save the adapter as safetensors (PEFT's default)"
            )
        raise CheckpointError(f"{wpath}: missing")
    spec = _check_config(cpath, c)
    modules = {n: m for n, m in model.named_modules() if not isinstance(m, AdapterSlot)}  # slots: never targets
    found = [n for n in modules if n and _matches(c, n)]
    if not found:
        raise CheckpointError(f"{cpath}: target_modules={c.get('target_modules')!r} matches no module of this model")
    for n in found:
        if is_embedding(modules[n]):
            continue  # refused below unless the spec adapts embeddings
        if not is_linear_like(modules[n]) or EXCLUDE.search(n):
            raise CheckpointError(f"{cpath}: target {n} is not a linear layer lora-lite adapts")
        if c.get("fan_in_fan_out") and not is_conv1d(modules[n]):  # PEFT would transpose W of a Linear
            _refuse(cpath, "fan_in_fan_out", True, f"target {n} is a {type(modules[n]).__name__}, not a Conv1D")
    if c["peft_type"] == "IA3":
        ff = c.get("feedforward_modules") or []
        is_ff = [bool(re.fullmatch(ff, n)) if isinstance(ff, str) else any(n.endswith(k) for k in ff) for n in found]
        if any(is_ff) and not all(is_ff):
            _refuse(cpath, "feedforward_modules", ff, "some targets but not all (one lora-lite spec per model)")
        spec = "ia3_ff" if all(is_ff) else "ia3"
    gen = variant_module(spec)
    embeddings = [n for n in found if is_embedding(modules[n])]
    if embeddings and not gen.EMBEDDING:
        raise CheckpointError(
            f"{cpath}: target {embeddings[0]} is an nn.Embedding, which lora-lite's {spec} does not adapt"
        )
    base = {"target_names": tuple(f"^{re.escape(n)}$" for n in found)}
    cropped = {t for st in states(model).values() for t, x in st.targets.items() if x.cfg.residual == "crop"}
    if spec == "pissa" and any(is_quantized(modules[n]) or n in cropped for n in found):
        base["residual"] = "subtract"  # W stays as it is (quantized, or another adapter's W_res)
    per_target = {}
    with safe_open(str(wpath), framework="pt") as f:
        keys = set(f.keys())
        for n in found:
            m = modules[n]
            cfg_t = _config(gen, cpath, c, spec, n, base)
            try:  # what init checks at attach (RoAd's group_size dividing d_out, ...): the tensors can fit a misfit
                gen.check(cfg_t, *layer_dims(m))
            except ValueError as e:
                raise CheckpointError(f"{cpath}: {gen.NAME} does not fit {n}: {e}") from None
            check_quantized(gen, cfg_t, n, m, fix="load the base in float")
            want = {k: v for k, v in gen.shapes(cfg_t, *layer_dims(m)).items() if k not in gen.SHARED}
            tensors = {}
            full_w2 = f"{PREFIX}{n}.lokr_w2"
            if spec == "lokr" and full_w2 in keys:  # PEFT's full w2 (r >= max(k, n) / 2)
                cfg_t, want, tensors = _lokr_full_w2(f, wpath, full_w2, gen, cfg_t, m, want)
                keys.discard(full_w2)
            for ours, suffix in _names(spec).items():
                if ours in tensors:
                    continue
                suffix = tuple(_embedding_key(s) for s in suffix) if is_embedding(m) else suffix
                key = next((f"{PREFIX}{n}.{s}" for s in suffix if f"{PREFIX}{n}.{s}" in keys), None)
                if key is None:
                    raise CheckpointError(f"{wpath}: tensor {PREFIX}{n}.{suffix[0]} is missing")
                t = f.get_tensor(key)
                w = tuple(want[ours])  # matrices exactly; vectors as PEFT stores them, (o, 1), (1, i), (1,)
                if (tuple(t.shape) != w) if len(w) == 2 else (t.numel() != math.prod(w)):
                    raise CheckpointError(f"{wpath}: {key} has shape {tuple(t.shape)}, expected {tuple(want[ours])}")
                if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                    raise CheckpointError(f"{wpath}: {key} is not finite floating point; refusing to load")
                tensors[ours] = t.float().reshape(want[ours])
                keys.discard(key)
            W = base_weight(m)
            if spec == "pissa":  # W_res from this model's W, as PEFT's init_lora_weights='pissa'
                init = gen.init(W, cfg_t)
                tensors["lora_A0"], tensors["lora_B0"] = init["lora_A0"], init["lora_B0"]
            per_target[n] = (m, cfg_t, tensors, target_info(m, W))
        shared = _read_shared(f, wpath, gen, per_target, keys)
        _check_saved_bases(f, wpath, modules, per_target, keys)
        if keys:
            raise CheckpointError(f"{wpath}: tensor {sorted(keys)[0]} belongs to no target of adapter_config.json")
    return per_target[found[0]][1], per_target, shared


def _config(gen, cpath: Path, c: dict, spec: str, name: str, base: dict):
    """gen.Config for target `name` from PEFT's config; a value out of the spec's range is a
    CheckpointError naming the file and the key it came from (r=-1, rank_pattern['v_proj']=0)."""
    hyper = _hyper(c, spec, name)
    try:
        return gen.Config(**base, **hyper)
    except SpecError as e:
        field = next((f for f in hyper if str(e).startswith(f"{gen.NAME}.{f}")), None)
        where = "" if field is None else "{}={!r}: ".format(*_source(c, spec, name, field))
        raise CheckpointError(f"{cpath}: {where}{e}") from None


def _source(c: dict, spec: str, name: str, field: str) -> tuple[str, object]:
    """(key path in adapter_config.json, its value) that _hyper read our `field` of target `name` from."""
    key = {"alpha": "alpha" if spec in ("loha", "lokr") else "lora_alpha", "lambda0": "delora_lambda"}.get(field)
    key = {"road_variant": "variant"}.get(field, key or field)
    pattern = {"r": "rank_pattern", "alpha": "alpha_pattern", "lambda0": "lambda_pattern"}.get(field)
    item = _pattern_item(c.get(pattern), name) if pattern and spec != "vera" else {}  # VeRA: one r
    return next(((f"{pattern}[{k!r}]", v) for k, v in item.items()), (key, c.get(key)))


def _lokr_full_w2(f, wpath: Path, key: str, gen, cfg_t, m, want: dict) -> tuple:
    """PEFT's full LoKr w2 (k, n) as our w2_a (k, r') w2_b (r', n) by its SVD, exactly: r' = the
    larger of the config's r and min(k, n) (alpha scaled by r' / r, so s = alpha / r stays).
    Returns (cfg_t, want, {w2_a, w2_b})."""
    k, n = want["lora_lokr_w2_a"][0], want["lora_lokr_w2_b"][1]
    w2 = f.get_tensor(key)
    if tuple(w2.shape) != (k, n):
        raise CheckpointError(f"{wpath}: {key} has shape {tuple(w2.shape)}, expected {(k, n)}")
    if not w2.is_floating_point() or not bool(torch.isfinite(w2).all()):
        raise CheckpointError(f"{wpath}: {key} is not finite floating point; refusing to load")
    r = max(cfg_t.r, min(k, n))
    if r != cfg_t.r:
        cfg_t = dataclasses.replace(cfg_t, r=r, alpha=cfg_t.alpha * r / cfg_t.r)
    want = {x: v for x, v in gen.shapes(cfg_t, *layer_dims(m)).items() if x not in gen.SHARED}
    U, S, Vh = torch.linalg.svd(w2.double(), full_matrices=False)  # (k, q), (q,), (q, n); q = min(k, n)
    q = S.shape[0]
    w2_a, w2_b = torch.zeros(k, r, dtype=torch.float64), torch.zeros(r, n, dtype=torch.float64)
    w2_a[:, :q], w2_b[:q] = U * S, Vh
    return cfg_t, want, {"lora_lokr_w2_a": w2_a.float(), "lora_lokr_w2_b": w2_b.float()}


def _read_shared(f, wpath: Path, gen, per_target: dict, keys: set) -> dict:
    """The variant's SHARED tensors from PEFT's `base_model.vera_A` / `vera_B` (saved once),
    shaped for r and the largest target (PEFT's _find_dim); taken out of `keys`."""
    if not gen.SHARED:
        return {}
    cfg = next(iter(per_target.values()))[1]
    _, _, want = shared_shapes(gen, cfg, (layer_dims(m) for m, *_ in per_target.values()))
    out = {}
    for k, shape in want.items():
        key = "base_model." + k.removeprefix("lora_")
        if key not in keys:
            raise CheckpointError(f"{wpath}: tensor {key} is missing")
        t = f.get_tensor(key)
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{wpath}: {key} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{wpath}: {key} is not finite floating point; refusing to load")
        out[k] = t.float()
        keys.discard(key)
    return out


BASE_SUFFIX = ".base_layer.weight"


def _check_saved_bases(f, wpath: Path, modules: dict, per_target: dict, keys: set) -> None:
    """A target's own weight saved beside its adapter (PEFT's save_embedding_layers, 'auto' for
    an adapted embed_tokens): `<module>.base_layer.weight`, taken out of `keys` when it equals
    this model's weight (exactly after a cast to its dtype, or within the rounding of the coarser
    dtype); CheckpointError naming the tensor when the shapes (a resized vocabulary) or values
    differ: the adapter belongs to another base, which load_peft does not install."""
    for key in sorted(keys):
        n = key[len(PREFIX) : -len(BASE_SUFFIX)] if key.startswith(PREFIX) and key.endswith(BASE_SUFFIX) else None
        if n not in per_target:
            continue
        m = modules[n]
        W = m.weight if m.weight.is_floating_point() and not is_quantized(m) else base_weight(m)
        t = f.get_tensor(key)
        if tuple(t.shape) != tuple(W.shape):
            raise CheckpointError(
                f"{wpath}: {key} has shape {tuple(t.shape)}, this model's {n}.weight {tuple(W.shape)} "
                "(a resized vocabulary?); load the adapter onto the base it was saved with"
            )
        W = W.detach()
        if torch.equal(t.to(W.dtype), W):
            keys.discard(key)
            continue
        eps = max(torch.finfo(t.dtype).eps, torch.finfo(W.dtype).eps) if t.is_floating_point() else 0.0
        diff = float((t.float() - W.float()).abs().max()) if t.is_floating_point() else math.inf
        if not diff <= eps * float(W.float().abs().max()):
            raise CheckpointError(
                f"{wpath}: {key} differs from this model's {n}.weight (max|diff| {diff:.3g}); "
                "load the adapter onto the base it was saved with"
            )
        keys.discard(key)


# PEFT's names for the LoRA pair on an nn.Embedding (peft/tuners/lora/layer.py, class Embedding):
# the same shapes as ours, lora_embedding_A (r, num_embeddings) and lora_embedding_B (embedding_dim, r).
EMBEDDING_KEYS = {"lora_A.weight": "lora_embedding_A", "lora_B.weight": "lora_embedding_B"}


def _embedding_key(k: str) -> str:
    """PEFT's saved key suffix for tensor `k` of an nn.Embedding target (lora_A.weight -> lora_embedding_A)."""
    return EMBEDDING_KEYS.get(k, k)


def _line(e: BaseException) -> str:
    lines = str(e).strip().splitlines() or [""]
    return lines[0][:200]


def _names(spec: str) -> dict[str, tuple[str, ...]]:
    """Our tensor -> PEFT's saved key suffixes (the first is today's; older PEFT used the others)."""
    lora = {"lora_A": ("lora_A.weight",), "lora_B": ("lora_B.weight",)}
    return {
        "lora": lora,
        "pissa": lora,
        "dora": {**lora, "lora_magnitude_vector": ("lora_magnitude_vector", "lora_magnitude_vector.weight")},
        "ia3": {"lora_ia3": ("ia3_l",)},
        "ia3_ff": {"lora_ia3": ("ia3_l",)},
        "hra": {"lora_hra_u": ("hra_u",)},
        "vera": {"lora_vera_lambda_d": ("vera_lambda_d",), "lora_vera_lambda_b": ("vera_lambda_b",)},
        "loha": {f"lora_hada_w{k}_{side}": (f"hada_w{k}_{side}",) for k in (1, 2) for side in "ab"},
        "lokr": {f"lora_lokr_{k}": (f"lokr_{k}",) for k in ("w1", "w2_a", "w2_b")},
        "oft": {"lora_oft_R": ("oft_R.weight",)},
        "boft": {"lora_boft_R": ("boft_R",), "lora_boft_s": ("boft_s",)},
        "road": {"lora_theta": ("road_theta",), "lora_alpha": ("road_alpha",)},
        "delora": {
            "lora_A": ("delora_A",),
            "lora_B": ("delora_B",),
            "lora_lambda": ("delora_lambda",),
            "lora_w_norm": ("delora_w_norm",),
        },
    }[spec]


def _hyper(c: dict, spec: str, name: str) -> dict:
    """Our hyperparameters for one target from PEFT's config and its patterns."""
    if spec in ("ia3", "ia3_ff"):
        return {}
    r = int(_pattern_get(c.get("rank_pattern"), name, c.get("r", 8)))
    if spec == "hra":
        return {"r": r}
    if spec == "vera":  # one r for every layer (the shared A has r rows; PEFT's VeRA has no rank_pattern)
        return {"r": int(c.get("r", 256)), "d_initial": float(c.get("d_initial", 0.1))} | {
            "projection_prng_key": int(c.get("projection_prng_key", 0))
        }
    if spec in ("loha", "lokr"):
        alpha = float(_pattern_get(c.get("alpha_pattern"), name, c.get("alpha", 8)))
        return {"r": r, "alpha": alpha} | (
            {"decompose_factor": int(c.get("decompose_factor", -1))} if spec == "lokr" else {}
        )
    if spec == "oft":
        out = {
            "oft_block_size": int(c["oft_block_size"]),
            "use_cayley_neumann": bool(c.get("use_cayley_neumann", True)),
        }
        return out | {"num_cayley_neumann_terms": int(c.get("num_cayley_neumann_terms", 5))}
    if spec == "boft":
        return {
            "boft_block_size": int(c["boft_block_size"]),
            "boft_n_butterfly_factor": int(c.get("boft_n_butterfly_factor", 1)),
        }
    if spec == "road":
        return {"group_size": int(c.get("group_size", 64)), "road_variant": int(str(c.get("variant", "road_1"))[5:])}
    if spec == "delora":
        return {"r": r, "lambda0": float(_pattern_get(c.get("lambda_pattern"), name, c.get("delora_lambda", 15)))}
    alpha = float(_pattern_get(c.get("alpha_pattern"), name, c.get("lora_alpha", 8)))
    if c.get("use_rslora"):
        alpha *= math.sqrt(r)  # s = alpha / sqrt(r) = (alpha sqrt(r)) / r
    return {"r": r, "alpha": alpha}
