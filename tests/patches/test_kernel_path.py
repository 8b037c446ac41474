"""The fused Triton path of the hf_kan backend equals its SDPA path, whole model.

Every family (and a sliding-window variant) x patch setting: prefill logits (left-padded batch, fp32) and a cached
greedy ``generate`` computed with ``HF_KAN_ATTENTION_BACKEND=triton`` (the kernel, in Triton's interpreter on CPU:
``TRITON_INTERPRET=1``) equal the default SDPA path to 1e-5, and the kernel really ran every decoder layer (VAR
applied in the kernel, pruning stages scored in layer K-1 with ``attention_taps`` from its log-sum-exp; PDrop's
own-layer scoring recomputes). Plus the dispatch rules
(``engine.compute.select_compute``) and the errors an explicit request that cannot run raises.

The interpreter runs each program in Python (tens of milliseconds each), so the models have 3 decoder layers and the
kernels get tiles covering these short sequences whole (``_fwd_config``); tiling itself is tested in
``tests/ops/test_attention_triton.py``, and one case here keeps the default 16 x 16 interpreter tiles.
"""

from __future__ import annotations

import pytest
import torch
import vlm_models as V

pytest.importorskip("triton")

from hf_kan.patches import registry  # noqa: E402
from hf_kan.patches.dyvte.routers import routers_of  # noqa: E402
from hf_kan.patches.engine import select_compute  # noqa: E402
from hf_kan.patches.var.picture import record_var  # noqa: E402

import hf_kan  # noqa: E402, F401
from hf_kan import patches as P  # noqa: E402
from hf_kan.errors import BackendUnavailableError  # noqa: E402
from hf_kan.ops import attention as A  # noqa: E402
from hf_kan.ops.attention import triton as at  # noqa: E402

LAYERS = 3
PROMPTS = [V.standard_prompt(2, before=1), V.standard_prompt(1, before=5, after=4)]
GREEDY = dict(max_new_tokens=2, do_sample=False, suppress_tokens=V.SUPPRESS, return_dict_in_generate=True,
              output_logits=True)
OFF = {name: False for name in registry.names()}
MMA = {"assistant_token_ids": [V.ASSISTANT]}
VAR = {"sink_dims": [3, 17], "tau": 1.5, "rho": 0.5, "layers": [1, 2]}
FASTV = {"layers": [2], "keep_ratios": [0.5]}
PDROP = {"scorer": "pdrop", "layers": [1, 2], "keep_ratios": [0.5, 0.25]}
SETTINGS = {
    "off": {},
    "mma": {"mma": MMA},
    "var": {"var": VAR},
    "fastv": {"prune": FASTV},
    "pdrop": {"prune": PDROP},  # scored at each stage's own layer (PDrop's default): recomputed, no taps
    "pdrop-previous": {"prune": {**PDROP, "score_layer": "previous"}},  # two stages read from the kernel's lse
    "dyvte-exit": {"dyvte": {"router_hidden": 16, "force_exit_layer": 1}},
    "all": {"mma": MMA, "var": VAR, "prune": FASTV},
    # FastV's text-mean voter: several voting rows read from the kernel's lse at once
    "all-textmean": {"mma": MMA, "var": VAR, "prune": {**FASTV, "scorer": "fastv_text_mean"}},
}
#: (family, setting): every family with every patch that acts in the attention call at once (one with FastV's
#: text-mean voter); the token-dropping patches alone (PDrop's two stages, a DyVTE exit) on a LLaVA and a Qwen
#: family; every patch alone and none on LLaVA; a sliding-window variant of each kind (``V.WINDOW_FAMILIES``: every
#: layer / the ``sliding_attention`` layers)
CELLS = ([(family, "all-textmean" if family == "qwen2_5_vl" else "all") for family in V.FAMILIES]
         + [(family, name) for family in ("llava", "qwen2_vl") for name in ("pdrop", "dyvte-exit")]
         + [("llava", name) for name in ("off", "mma", "var", "fastv", "pdrop-previous")]
         + [("qwen2_vl_window", "all"), ("llava_next_mistral", "all")])
#: the long-sequence cells (LLaVA-NeXT's tiles): still run in CI, marked slow
SLOW = {("llava_next_mistral", "all")}

model_for = V.module_model_cache(LAYERS, prepare=V.plant_sink_dims)


def cells() -> list:
    return [pytest.param(f, s, id=f"{f}-{s}", marks=[pytest.mark.slow] if (f, s) in SLOW else []) for f, s in CELLS]


@pytest.fixture
def interpreter(monkeypatch):
    """The kernels in Triton's CPU interpreter, with tiles that cover these short sequences whole."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(at, "_fwd_config", lambda *args: (64, 64, 1, 1))
    monkeypatch.setattr(at, "_bwd_config", lambda *args: (64, 64, 1, 1))
    calls = {"forward": 0, "taps": 0}
    forward, taps = at.attention_forward, at.attention_taps_forward

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(at, "attention_forward", counted("forward", forward))
    monkeypatch.setattr(at, "attention_taps_forward", counted("taps", taps))
    return calls


def configure(family: str, setting: str):
    model = model_for(family)
    P.apply(model, **OFF)
    if routers_of(model) is not None:
        del model.hf_kan_dyvte
    P.apply(model, **SETTINGS[setting])
    return model


def by_position(out) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at their original columns (NaN where a row was dropped) and which columns have a row."""
    rows = out.hf_kan_state.row_positions(LAYERS - 1)
    if rows is None:
        return out.logits, torch.ones(out.logits.shape[:2], dtype=torch.bool)
    length = out.hf_kan_state.layout.length
    logits = out.logits.new_full((rows.shape[0], length, out.logits.shape[-1]), float("nan"))
    present = rows.new_zeros(rows.shape[0], length, dtype=torch.bool)
    for b in range(rows.shape[0]):
        ok = rows[b] >= 0
        logits[b, rows[b][ok]] = out.logits[b, ok]
        present[b, rows[b][ok]] = True
    return logits, present


def run(model, inputs: dict, backend: str, monkeypatch):
    """Prefill (with the VAR trace) and a cached greedy generate on ``backend``."""
    monkeypatch.setenv(A.BACKEND_ENV_VAR, backend)
    with record_var(model) as trace, torch.no_grad():
        out = model(**inputs)
    return out, trace, model.generate(**inputs, **GREEDY)


def _var_selected(trace) -> int:
    return sum(int(s.sum()) for layer in trace.get("layers", {}).values() for _, s in layer["selected"])


@pytest.mark.parametrize("family, setting", cells())
def test_kernel_path_equals_sdpa_path(family, setting, interpreter, monkeypatch):
    model = configure(family, setting)
    inputs = V.make_inputs(family, PROMPTS, "left")
    ref, ref_trace, ref_gen = run(model, inputs, "sdpa", monkeypatch)
    assert interpreter == {"forward": 0, "taps": 0}
    out, trace, gen = run(model, inputs, "triton", monkeypatch)
    # the prefill ran every decoder layer in the kernel; then the generate's prefill and one decode step
    assert interpreter["forward"] == 3 * LAYERS
    prune = SETTINGS[setting].get("prune", {})
    scoring = len(prune.get("layers", ()))
    own_layer = prune.get("score_layer", "own" if prune.get("scorer") == "pdrop" else "previous") == "own"
    # stages scored in layer K-1's attention call read the kernel's lse; own-layer scoring recomputes (layer K's
    # attention has not run when its tokens are chosen)
    assert interpreter["taps"] == (0 if own_layer else 2 * scoring)
    state = out.hf_kan_state
    if "mma" in SETTINGS[setting]:
        assert state.widened
    if "var" in SETTINGS[setting]:
        assert _var_selected(trace) > 0 and _var_selected(trace) == _var_selected(ref_trace)
    if "prune" in SETTINGS[setting] or "dyvte" in SETTINGS[setting]:
        assert state.row_positions(LAYERS - 1) is not None
    if "prune" in SETTINGS[setting]:  # the votes read from the kernel's lse equal the recomputed ones
        scores, ref_scores = state.scratch["prune"]["scores"], ref.hf_kan_state.scratch["prune"]["scores"]
        assert scores.keys() == ref_scores.keys() and len(scores) == scoring
        for stage, votes in scores.items():
            torch.testing.assert_close(votes, ref_scores[stage], rtol=0, atol=1e-6)
    logits, present = by_position(out)
    ref_logits, ref_present = by_position(ref)
    valid = inputs["attention_mask"].bool()
    assert torch.equal(present, ref_present)  # pruning kept the same tokens
    torch.testing.assert_close(logits[present & valid], ref_logits[present & valid], rtol=0, atol=1e-5)
    assert torch.equal(gen.sequences, ref_gen.sequences)
    for x, y in zip(gen.logits, ref_gen.logits):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5)


def test_default_interpreter_tiles(monkeypatch):
    """Several 16 x 16 tiles per program (the kernels' own interpreter configuration), every patch at once."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = configure("qwen2_vl", "all")
    inputs = V.make_inputs("qwen2_vl", PROMPTS, "left")
    monkeypatch.setenv(A.BACKEND_ENV_VAR, "sdpa")
    with torch.no_grad():
        ref = model(**inputs)
    monkeypatch.setenv(A.BACKEND_ENV_VAR, "triton")
    with torch.no_grad():
        out = model(**inputs)
    (logits, present), (ref_logits, ref_present) = by_position(out), by_position(ref)
    assert torch.equal(present, ref_present)
    torch.testing.assert_close(logits[present], ref_logits[present], rtol=0, atol=1e-5)


def test_mma_gradients_equal_sdpa(interpreter, monkeypatch):
    """Training through the kernel (mask-only backward): MMA's parameter gradients equal the SDPA path's."""
    model = configure("llava", "all")
    P.apply(model, var=False, prune=False)
    inputs = V.make_inputs("llava", PROMPTS, "left")
    grads = {}
    for backend in ("sdpa", "triton"):
        monkeypatch.setenv(A.BACKEND_ENV_VAR, backend)
        model.zero_grad()
        model(**inputs).logits[inputs["attention_mask"].bool()].square().mean().backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters()
                          if p.grad is not None and "language_model" in n}
    model.zero_grad()
    assert interpreter["forward"] == LAYERS and grads["sdpa"].keys() == grads["triton"].keys()
    for name, g in grads["sdpa"].items():
        torch.testing.assert_close(grads["triton"][name], g, rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------- dispatch


def test_select_compute_rules(monkeypatch):
    q = torch.zeros(1, 2, 3, 8)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert select_compute("auto", q) == "sdpa"  # CPU tensors: SDPA, the default and reference
    assert select_compute("sdpa", q, var=True) == select_compute("reference", q) == "sdpa"
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        select_compute("triton", q)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_compute("auto", q) == select_compute("triton", q, var=True) == "triton"
    assert select_compute("auto", q, var=True, grad=True) == "sdpa"  # no backward through VAR in the kernel
    with pytest.raises(BackendUnavailableError, match="VAR"):
        select_compute("triton", q, var=True, grad=True)
    assert select_compute("auto", q, blocker="attention dropout (0.1)") == "sdpa"
    with pytest.raises(BackendUnavailableError, match="attention dropout"):
        select_compute("triton", q, blocker="attention dropout (0.1)")
    assert select_compute("auto", q.double()) == "sdpa"
    assert select_compute("auto", q, patched=False) == "sdpa"  # every patch off: exactly "sdpa"
    assert select_compute("triton", q, patched=False) == "triton"


def test_explicit_requests_that_cannot_run_raise(monkeypatch):
    model = configure("llava", "off")
    inputs = V.make_inputs("llava", PROMPTS, "left")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv(A.BACKEND_ENV_VAR, "triton")
    with pytest.raises(BackendUnavailableError, match="CUDA"), torch.no_grad():
        model(**inputs)
    monkeypatch.setenv(A.BACKEND_ENV_VAR, "fused")
    with pytest.raises(BackendUnavailableError, match="unknown attention backend"), torch.no_grad():
        model(**inputs)
    # a patch's mask_rule (DyVTE's masked exit simulation) has no kernel form
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(A.BACKEND_ENV_VAR, "triton")
    with pytest.raises(BackendUnavailableError, match="mask_rule"), torch.no_grad():
        with P.mask_visual_after(model, 0, batch_size=2):
            model(**inputs)


def test_auto_runs_what_the_kernel_cannot_on_sdpa(interpreter, monkeypatch):
    """Under ``auto`` a forward with a ``mask_rule`` runs on SDPA; a VAR layer whose probabilities ``record_var``
    keeps runs on the explicit path, the other layers in the kernel."""
    model = configure("llava", "all")
    P.apply(model, mma=False, prune=False)
    inputs = V.make_inputs("llava", PROMPTS, "left")
    monkeypatch.setenv(A.BACKEND_ENV_VAR, "sdpa")
    with torch.no_grad(), P.mask_visual_after(model, 0, batch_size=2):
        ref = model(**inputs).logits
    monkeypatch.setenv(A.BACKEND_ENV_VAR, "auto")
    with torch.no_grad(), P.mask_visual_after(model, 0, batch_size=2):
        out = model(**inputs).logits
    assert interpreter["forward"] == 0
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    with record_var(model, keep_probs_layer=1) as trace, torch.no_grad():
        model(**inputs)
    assert interpreter["forward"] == LAYERS - 1 and trace["layers"][1]["before"]
