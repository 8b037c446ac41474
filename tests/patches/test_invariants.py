"""The engine's invariants as one table: every family x every patch setting x

- off == sdpa: a neutral setting (one that must change nothing) gives sdpa's prefill logits (left and right
  padding) and sdpa's greedy ``generate``;
- padded batch == each sample alone (left and right padding), also for rows that token dropping removed;
- cached conversation == recompute: two turns, the second with a new image, each a cached greedy ``generate`` from the
  cache the previous turn left, equal ``generate(use_cache=False)`` over the whole conversation with every layer seeing
  the keys the cached run kept in it (token-dropping patches off, the dropped prompt positions hidden instead);
- beam search == recompute: the same for beam search (the cache and its ledger are reordered every step);
- chunked prefill is exact or refused: ``generate(..., prefill_chunk_size=N)`` equals the one-forward prefill (and,
  with every patch off, stock ``sdpa`` under the same chunking), or raises an error naming ``prefill_chunk_size``
  before anything runs when a patch needs the image and later prompt text in one forward;
- detach gives stock sdpa: after a patched forward, ``detach`` leaves a model that computes what ``sdpa`` computes.

Settings: all off, each patch's neutral setting, each patch on, all patches on, and pruning + a DyVTE exit dropping
at the same layer. Every setting also checks that its patches really acted (``Setting.checks``), so no cell passes
vacuously. Families: the four supported ones, plus their sliding-window variants (``V.WINDOW_FAMILIES``: every layer,
or the ``sliding_attention`` layers, attend within a window) on the settings in ``WINDOW_SETTINGS``. A new family
(``vlm_models.FAMILY_SPECS``) or a new patch (a neutral and an "on" row here) inherits all of it. Models: 4 decoder
layers, BOS planted with massive activations (VAR's sink), built once per module."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import vlm_models as V
from hf_kan.patches import registry
from hf_kan.patches.dyvte.routers import routers_of
from hf_kan.patches.engine import PatchRuntime, extra_runtime
from hf_kan.patches.var.picture import record_var

import hf_kan  # noqa: F401
from hf_kan import patches as P
from hf_kan.errors import InputLayoutError

LAYERS = 4
PROMPTS = [V.standard_prompt(2, before=1), V.standard_prompt(1, before=5, after=4)]
#: a second user turn with one new image per sample (after the first turn's prompt and answer)
TURN2 = [[V.USER, 30, V.IMG, 31, 32, V.ASSISTANT], [V.USER, 33, 34, V.IMG, 35, V.ASSISTANT]]
GREEDY = dict(max_new_tokens=3, do_sample=False, suppress_tokens=V.SUPPRESS, return_dict_in_generate=True,
              output_logits=True)
BEAM = dict(max_new_tokens=3, do_sample=False, suppress_tokens=V.SUPPRESS, num_beams=3, num_return_sequences=2,
            return_dict_in_generate=True)
#: patches that remove tokens: the recompute reference turns them off and hides what they dropped instead
DROPPING = ("prune", "dyvte")

model_for = V.module_model_cache(LAYERS, prepare=V.plant_sink_dims)


# ------------------------------------------------------------------------------------------- what acted


def _mma_acted(state, trace) -> bool:
    return state.widened and bool((state.layout.span_end > state.layout.position).any())


def _mma_ran_without_widening(state, trace) -> bool:
    return any(rt.name == "mma" for rt in state.runtimes) and not state.widened


def _var_acted(state, trace) -> bool:
    return any(int(s.sum()) > 0 for layer in trace.get("layers", {}).values() for _, s in layer["selected"])


def _pruned(state, trace) -> bool:
    kept = state.row_positions(2)
    return kept is not None and int((kept >= 0).sum()) < int(state.layout.valid.sum())


def _prune_kept_every_real_token(state, trace) -> bool:
    kept = state.row_positions(2)
    return kept is not None and all(
        kept[b][kept[b] >= 0].tolist() == state.layout.valid[b].nonzero().flatten().tolist() for b in range(2))


def _routers_ran_and_never_exited(state, trace) -> bool:
    rec = state.scratch.get("dyvte")
    return rec is not None and len(rec["p_exit"]) == LAYERS - 1 and rec["exit_layer"].tolist() == [-1, -1]


def _samples_exited_at_different_layers(state, trace) -> bool:
    exits = state.scratch["dyvte"]["exit_layer"].tolist()
    return exits[0] != exits[1] and max(exits) >= 0


def _exited_after(layer):
    return lambda state, trace: state.scratch["dyvte"]["exit_layer"].tolist() == [layer, layer]


# ------------------------------------------------------------------------------------------- the settings

MMA = {"assistant_token_ids": [V.ASSISTANT]}
VAR = {"sink_dims": [3, 17], "tau": 1.5, "rho": 0.5, "layers": [1, 2, 3]}
PRUNE = {"layers": [2], "keep_ratios": [0.5]}  # FastV: scored with layer 1's attention
PDROP = {"method": "pdrop", "layers": [1, 2], "keep_ratios": [0.5, 0.25]}  # scored at each stage's own layer
DYVTE = {"router_hidden": 16}


@dataclass(frozen=True)
class Setting:
    name: str
    patches: dict
    #: a setting that must change nothing (off == sdpa)
    neutral: bool = False
    #: checks on a padded-batch prefill (its ``ForwardState`` and ``record_var`` trace) that the patches acted
    checks: tuple[Callable, ...] = ()
    #: DyVTE routers randomised and the threshold put between the two samples' layer-0 exit probabilities
    mixed_exits: bool = False
    #: exact under a chunked prefill that separates the images from the rest of the prompt (else refused)
    chunks_exact: bool = False
    atol: float = 1e-5


SETTINGS = [
    Setting("off", {}, neutral=True, chunks_exact=True, atol=1e-6),
    # MMA for video only, on image prompts: the runtime runs and widens nothing
    Setting("mma-neutral", {"mma": {**MMA, "modalities": ["video"]}}, neutral=True,
            checks=(_mma_ran_without_widening,), chunks_exact=True, atol=1e-6),
    # VAR with p = 1: rows are selected and recomputed with explicit probabilities, and nothing moves
    Setting("var-neutral", {"var": {**VAR, "p": 1.0}}, neutral=True, checks=(_var_acted,), chunks_exact=True),
    Setting("prune-neutral", {"prune": {**PRUNE, "keep_ratios": [1.0]}}, neutral=True,
            checks=(_prune_kept_every_real_token,)),
    # untrained routers output p(exit) = 0.5 exactly and never exit at threshold 0.5
    Setting("dyvte-neutral", {"dyvte": DYVTE}, neutral=True, checks=(_routers_ran_and_never_exited,)),
    Setting("mma", {"mma": MMA}, checks=(_mma_acted,)),
    # VAR's decisions are causal (sinks per position, queries after the first image): chunking cannot change them
    Setting("var", {"var": VAR}, checks=(_var_acted,), chunks_exact=True),
    Setting("prune", {"prune": PDROP}, checks=(_pruned,)),
    Setting("dyvte", {"dyvte": DYVTE}, mixed_exits=True, checks=(_samples_exited_at_different_layers,)),
    # layer 0 holds everything, layers 1 and 2 PDrop's kept visual tokens (ranked under MMA's mask), layer 3 text only
    Setting("all", {"mma": MMA, "var": VAR, "prune": PDROP, "dyvte": {**DYVTE, "force_exit_layer": 2}},
            checks=(_mma_acted, _var_acted, _pruned, _exited_after(2))),
    # FastV pruning and a DyVTE exit both drop rows before layer 2
    Setting("prune+dyvte", {"prune": PRUNE, "dyvte": {**DYVTE, "force_exit_layer": 1}},
            checks=(_pruned, _exited_after(1))),
]
NEUTRAL = [s for s in SETTINGS if s.neutral]
OFF = {name: False for name in registry.names()}
#: the settings the sliding-window variants also run: the window composes with each patch that changes visibility or
#: drops keys, and with all of them at once
WINDOW_SETTINGS = ("off", "mma", "var", "prune", "all")
#: a prefill chunk size that separates PROMPTS' images from the prompt text after them
CHUNK = 7


def cells(settings: list[Setting], window_settings=WINDOW_SETTINGS) -> list:
    """``(family, setting)`` parameters: every family with every setting, and the sliding-window variants with the
    settings in ``window_settings``."""
    out = [pytest.param(f, s, id=f"{f}-{s.name}") for f in V.FAMILIES for s in settings]
    return out + [pytest.param(f, s, id=f"{f}-{s.name}") for f in V.WINDOW_FAMILIES for s in settings
                  if s.name in window_settings]


def configure(family: str, setting: Setting):
    """The module's hf_kan model of ``family`` with exactly ``setting`` applied (fresh, untrained DyVTE routers)."""
    model = model_for(family)
    P.apply(model, **OFF)
    if routers_of(model) is not None:
        del model.hf_kan_dyvte
    P.apply(model, **setting.patches)
    if setting.mixed_exits:
        P.apply(model, dyvte={"threshold": 0.999999})
        for seed in range(1, 20):  # the first random routers whose layer-0 exit probabilities tell the samples apart
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in routers_of(model).parameters():
                    p.copy_(torch.randn(p.shape, generator=gen))
                p0 = model(**V.make_inputs(family, PROMPTS, "left")).hf_kan_state.scratch["dyvte"]["p_exit"][0]
            if abs(float(p0[0] - p0[1])) > 1e-2:
                break
        P.apply(model, dyvte={"threshold": float(p0.mean())})
    return model


def by_position(out, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A forward's logits placed at their original columns ``(B, length, V)`` and which columns have a row: after a
    drop the logits cover only the rows that reached the last layer."""
    state = out.hf_kan_state
    rows = state.row_positions(LAYERS - 1)
    if rows is None:
        return out.logits, torch.ones(out.logits.shape[:2], dtype=torch.bool)
    logits = out.logits.new_full((rows.shape[0], length, out.logits.shape[-1]), float("nan"))
    present = torch.zeros(rows.shape[0], length, dtype=torch.bool)
    for b in range(rows.shape[0]):
        ok = rows[b] >= 0
        logits[b, rows[b][ok] - state.seen_before] = out.logits[b, ok]
        present[b, rows[b][ok] - state.seen_before] = True
    return logits, present


@functools.cache
def sdpa_reference(family: str, kind: str):
    """sdpa's prefill logits (``kind`` = padding side) or greedy generate (``kind = "generate"``)."""
    ref = model_for(family, "sdpa")
    if kind == "generate":
        return ref.generate(**V.make_inputs(family, PROMPTS, "left"), **GREEDY)
    with torch.no_grad():
        return ref(**V.make_inputs(family, PROMPTS, kind)).logits


class KeepOnly(PatchRuntime):
    """Layer ``l`` sees only the prompt positions ``rows[l]`` (a cached prefill's rows, ``-1`` = empty; ``None`` =
    all) plus every generated token; each query keeps its own key."""

    layer_dependent_mask = True

    def __init__(self, rows: list, prompt_len: int):
        super().__init__(None)
        self.rows, self.prompt_len = rows, prompt_len

    def changes_mask(self, state):
        return any(r is not None for r in self.rows)

    def mask_rule(self, state, layer_idx, q, k, allowed):
        rows = self.rows[layer_idx]
        if rows is None:
            return allowed
        kept = ((k.position[:, :, None] == rows[:, None, :]) & (rows >= 0)[:, None, :]).any(-1)
        kept |= k.position >= self.prompt_len
        own = q.position[:, :, None] == k.position[:, None, :]
        return allowed & (kept[:, None, :] | own)


def recompute(model, setting: Setting, inputs: dict, rows: list, **generate_kwargs):
    """``generate(use_cache=False)`` under ``setting`` with its token-dropping patches replaced by ``KeepOnly`` over
    ``rows`` (per layer, the original positions a cached run kept; ``None`` = all)."""
    dropping = [name for name in setting.patches if name in DROPPING]
    P.apply(model, **{name: False for name in dropping})
    with extra_runtime(model, KeepOnly(rows, inputs["input_ids"].shape[1])):
        return model.generate(**inputs, use_cache=False, **generate_kwargs)


def held(cache) -> list:
    """Per layer, the original positions a cache holds now (``None``: every position); held tensors are never
    changed in place, so this list is a snapshot."""
    return list(cache.ledger.held)


def assert_same_generation(cached, full):
    assert torch.equal(cached.sequences, full.sequences)
    for x, y in zip(cached.logits, full.logits):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- the table


@pytest.mark.parametrize("family, setting", cells(NEUTRAL))
def test_neutral_setting_equals_sdpa(family, setting):
    model = configure(family, setting)
    for side in ("left", "right"):
        inputs = V.make_inputs(family, PROMPTS, side)
        with record_var(model) as trace, torch.no_grad():
            out = model(**inputs)
        assert all(check(out.hf_kan_state, trace) for check in setting.checks)
        logits, present = by_position(out, inputs["input_ids"].shape[1])
        valid = inputs["attention_mask"].bool()
        assert present[valid].all()
        torch.testing.assert_close(logits[valid], sdpa_reference(family, side)[valid], rtol=0, atol=setting.atol)
    gen = model.generate(**V.make_inputs(family, PROMPTS, "left"), **GREEDY)
    ref = sdpa_reference(family, "generate")
    assert torch.equal(gen.sequences, ref.sequences)
    for x, y in zip(gen.logits, ref.logits):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family, setting", cells(SETTINGS))
def test_padded_batch_equals_each_sample_alone(family, setting):
    model = configure(family, setting)
    for side in ("left", "right"):
        inputs = V.make_inputs(family, PROMPTS, side)
        length = inputs["input_ids"].shape[1]
        with record_var(model) as trace, torch.no_grad():
            out = model(**inputs)
        assert all(check(out.hf_kan_state, trace) for check in setting.checks)
        batch, present = by_position(out, length)
        for b in range(2):
            valid = inputs["attention_mask"][b].bool()
            with torch.no_grad():
                alone = model(**V.sample_inputs(family, inputs, b))
            alone_logits, alone_present = by_position(alone, int(valid.sum()))
            assert torch.equal(present[b][valid], alone_present[0])  # the same tokens survive
            torch.testing.assert_close(batch[b][valid][alone_present[0]], alone_logits[0][alone_present[0]],
                                       rtol=setting.atol, atol=setting.atol)


@pytest.mark.parametrize("family, setting", cells(SETTINGS))
def test_cached_conversation_equals_recompute(family, setting):
    """Two turns, the second with a new image, each generated from the cache the previous one left."""
    model = configure(family, setting)
    first = V.make_inputs(family, PROMPTS, "left")
    turn1 = model.generate(**first, **GREEDY)
    assert isinstance(turn1.cache, P.HFKanCache) and turn1.cache.ledger.seen == turn1.sequences.shape[1] - 1
    rows1 = held(turn1.cache)
    cached, full = V.next_turn(family, model, first, turn1.sequences, TURN2)
    turn2 = model.generate(**cached, cache=turn1.cache, **GREEDY)
    assert turn2.cache.ledger.seen == turn2.sequences.shape[1] - 1
    assert bool((cached["input_ids"][:, turn1.sequences.shape[1]:] == V.IMAGE).any(-1).all())  # new images
    rows2 = held(turn2.cache)
    assert_same_generation(turn1, recompute(model, setting, first, rows1, **GREEDY))
    assert_same_generation(turn2, recompute(model, setting, full, rows2, **GREEDY))


@pytest.mark.parametrize("family, setting", cells(SETTINGS, window_settings=("off", "all")))
def test_beam_search_equals_recompute(family, setting):
    model = configure(family, setting)
    inputs = V.make_inputs(family, PROMPTS, "left")
    cached = model.generate(**inputs, **BEAM)
    prefill = cached.cache.hf_kan_prefill_state
    full = recompute(model, setting, inputs, [prefill.row_positions(layer) for layer in range(LAYERS)], **BEAM)
    assert torch.equal(cached.sequences, full.sequences)


def late_images(family: str) -> tuple[dict, int]:
    """Prompts whose image comes after more than half of the text, and the chunk size that puts every image token,
    with everything after it, in the last of two chunks (the first holds text only)."""
    def prompt(before):
        return [V.BOS, V.USER, *(10 + i % 50 for i in range(before)), V.IMG, 20, 21, 22, V.ASSISTANT]

    for before in range(20, 400, 10):
        inputs = V.make_inputs(family, [prompt(before), prompt(before + 2)])
        first = int((inputs["input_ids"] == V.IMAGE).to(torch.int8).argmax(-1).min())
        if 2 * first >= inputs["input_ids"].shape[1]:
            return inputs, first
    raise AssertionError("no late-image prompt found")


@pytest.mark.parametrize("family, setting", cells(SETTINGS))
def test_chunked_prefill_is_exact_or_refused(family, setting):
    model = configure(family, setting)
    inputs = V.make_inputs(family, PROMPTS, "left")
    if setting.chunks_exact:
        chunked = model.generate(**inputs, prefill_chunk_size=CHUNK, **GREEDY)
        assert_same_generation(chunked, model.generate(**inputs, **GREEDY))
        if not setting.patches:  # every patch off: what stock sdpa computes under the same chunking
            assert_same_generation(chunked, model_for(family, "sdpa").generate(**inputs, prefill_chunk_size=CHUNK,
                                                                                **GREEDY))
        return
    with pytest.raises(InputLayoutError, match="prefill_chunk_size"):
        model.generate(**inputs, prefill_chunk_size=CHUNK, **GREEDY)
    # every image in the last chunk, with the whole rest of the prompt: exact for these patches too
    late, chunk = late_images(family)
    assert_same_generation(model.generate(**late, prefill_chunk_size=chunk, **GREEDY), model.generate(**late, **GREEDY))


@pytest.mark.parametrize("family, setting", cells(SETTINGS))
def test_detach_gives_stock_sdpa(family, setting):
    model = configure(family, setting)
    inputs = V.make_inputs(family, PROMPTS, "left")
    with torch.no_grad():
        model(**inputs)  # a patched forward
    P.detach(model)
    assert not P.status(model)["running"] and P.status(model)["active"] == sorted(setting.patches, key=list(
        registry.names()).index)
    with torch.no_grad():
        logits = model(**inputs).logits
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits[valid], sdpa_reference(family, "left")[valid], rtol=0, atol=1e-6)
    assert_same_generation(model.generate(**inputs, **GREEDY), sdpa_reference(family, "generate"))
