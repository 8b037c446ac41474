"""Layers holding the same positions share one ledger tensor (so key layouts and masks are built once per group),
and stop sharing when a later drop makes them differ; decoding stays equal to the masked sdpa reference."""

import torch
import vlm_models as V
from hf_kan.patches.engine.cache import KVLedger
from hf_kan.patches.engine.layout import build_layout

import hf_kan  # noqa: F401
from hf_kan import patches as P

LAYERS = 4
PROMPTS = [V.standard_prompt(2, before=1), V.standard_prompt(1, before=5, after=4)]
GEN = dict(max_new_tokens=3, do_sample=False, suppress_tokens=V.SUPPRESS, return_dict_in_generate=True,
           output_logits=True)


def test_ledger_shares_appends_and_splits_on_divergence():
    ledger = KVLedger(3)
    ledger.extend(build_layout(torch.full((2, 5), 7), None, []))
    kept = torch.tensor([[0, 2, 4], [-1, 1, 3]])
    for layer in range(3):
        ledger.record(layer, None if layer == 0 else kept, 0, 5)
    assert ledger.held[0] is None and ledger.held[1] is ledger.held[2]
    ledger.extend(build_layout(torch.full((2, 1), 7), None, [], offset=5))
    for layer in range(3):
        ledger.record(layer, None, 5, 1)
    assert ledger.held[1] is ledger.held[2]
    assert ledger.held[1].tolist() == [[0, 2, 4, 5], [-1, 1, 3, 5]]
    # a second drop in layer 2 only: the group splits, each layer keeps its own positions from then on
    ledger.set_layer(2, ledger.held[2][:, 1:])
    ledger.extend(build_layout(torch.full((2, 1), 7), None, [], offset=6))
    for layer in range(3):
        ledger.record(layer, None, 6, 1)
    assert ledger.held[1] is not ledger.held[2]
    assert ledger.held[1].tolist() == [[0, 2, 4, 5, 6], [-1, 1, 3, 5, 6]]
    assert ledger.held[2].tolist() == [[2, 4, 5, 6], [1, 3, 5, 6]]
    # batch operations and crop keep a shared tensor shared
    ledger.set_layer(2, ledger.held[1])
    ledger.select_batch(torch.tensor([1, 0]))
    assert ledger.held[1] is ledger.held[2] and ledger.held[1].tolist() == [[-1, 1, 3, 5, 6], [0, 2, 4, 5, 6]]
    ledger.crop(2)
    assert ledger.held[1] is ledger.held[2] and ledger.held[1].tolist() == [[-1, 1, 3], [0, 2, 4]]


def masked_reference(inputs, kept_from: dict[int, torch.Tensor], prompt_len: int):
    """sdpa logits where layer l >= each drop layer sees only the prompt keys kept by the latest drop at or before
    l (per sample, original positions); generated tokens are always visible."""
    ref = _model("sdpa")
    am = inputs["attention_mask"].bool()
    t = am.shape[1]
    eye = torch.eye(t, dtype=torch.bool)[None]
    base = (torch.ones(t, t, dtype=torch.bool).tril()[None] & am[:, None, :]) | eye
    handles = []
    for i, layer in enumerate(ref.model.language_model.layers):
        mask = base
        starts = [k for k in kept_from if k <= i]
        if starts:
            kept = kept_from[max(starts)]
            keep_key = torch.arange(t)[None].expand(am.shape[0], -1) >= prompt_len
            for b in range(am.shape[0]):
                keep_key[b, kept[b][kept[b] >= 0]] = True
            mask = (base & keep_key[:, None, :]) | eye
        handles.append(layer.self_attn.register_forward_pre_hook(
            lambda mod, args, kwargs, m=mask[:, None]: (args, {**kwargs, "attention_mask": m}), with_kwargs=True))
    try:
        with torch.no_grad():
            return ref(**inputs).logits
    finally:
        for h in handles:
            h.remove()


_MODELS: dict = {}


def _model(impl):
    if impl not in _MODELS:
        _MODELS[impl] = V.build("llava", impl, num_layers=LAYERS)
    return _MODELS[impl]


def _generate_and_check(prune: dict, shared_groups: list[list[int]]):
    model = _model("hf_kan")
    P.apply(model, mma=False, prune=prune)
    inputs = V.make_inputs("llava", PROMPTS, "left")  # padded batch, samples keep different counts (-1 slots)
    gen = model.generate(**inputs, **GEN)
    held = gen.cache.ledger.held
    for group in shared_groups:
        assert all(held[group[0]] is held[i] for i in group)
    distinct = {id(held[g[0]]) for g in shared_groups}
    assert len(distinct) == len(shared_groups)
    kept = gen.cache.hf_kan_prefill_state.scratch["prune"]["kept"]  # stage -> (B, T') kept positions
    kept = {prune["layers"][stage]: positions for stage, positions in kept.items()}
    prompt_len = inputs["input_ids"].shape[1]
    seq = gen.sequences[:, :-1]
    full = dict(inputs, input_ids=seq)
    full["attention_mask"] = torch.cat(
        [inputs["attention_mask"], torch.ones(2, seq.shape[1] - prompt_len, dtype=torch.long)], 1)
    expected = masked_reference(full, kept, prompt_len)
    for step, logits in enumerate(gen.logits):
        torch.testing.assert_close(logits, expected[:, prompt_len - 1 + step], rtol=1e-4, atol=1e-4)
    assert any((kept[k] < 0).any() for k in kept)  # the padded batch really had empty slots


def test_fastv_layers_share_one_tensor_and_decode_equals_reference():
    _generate_and_check({"layers": [1], "keep_ratios": [0.5]}, [[1, 2, 3]])


def test_pdrop_stages_split_groups_and_decode_equals_reference():
    _generate_and_check({"method": "pdrop", "layers": [1, 2], "keep_ratios": [0.5, 0.25]}, [[1], [2, 3]])
