"""DyVTE label rule and router training: hand-checked labels, labels from the masked simulation vs an independent
reference, a short training run that changes only the routers, and the command line (slow: accelerate launch)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from hf_kan.patches.dyvte.data import collate, generate_samples, tiny_llava
from hf_kan.patches.dyvte.routers import router_features, routers_of
from hf_kan.patches.dyvte.train import (
    evaluate_routers,
    exit_label,
    held_out_examples,
    make_exit_examples,
    train_routers,
)

import hf_kan  # noqa: F401
from hf_kan import patches as P
from hf_kan.errors import InputLayoutError

IGN = -100


def onehot_logits(tokens, vocab=4, high=4.0):
    """(1, T, vocab) logits with ``high`` at each token's id (None -> a row of zeros)."""
    out = torch.zeros(1, len(tokens), vocab)
    for t, tok in enumerate(tokens):
        if tok is not None:
            out[0, t, tok] = high
    return out


def test_exit_label_by_hand():
    # sequence of 4 columns; answer = columns 2 and 3 (ids 1, 2), predicted at columns 1 and 2
    labels = torch.tensor([[IGN, IGN, 1, 2]])
    full = onehot_logits([0, 1, 2, 3])
    # identical logits: agreement 1, equal loss (< 1.03x): exit is fine
    same = exit_label(full, full.clone(), labels)
    assert same["label"].tolist() == [1] and same["agreement"].item() == 1.0
    # one of two answer argmaxes differs: agreement 0.5 -> keep
    one_off = exit_label(full, onehot_logits([0, 1, 3, 3]), labels)
    assert one_off["label"].tolist() == [0] and one_off["agreement"].item() == 0.5
    # same argmaxes but less confident: CE rises from ce(4) to ce(3) per token
    ce = [math.log(1 + 3 * math.exp(-h)) for h in (4.0, 3.0)]  # -log softmax of the high entry among 4
    softer = exit_label(full, onehot_logits([0, 1, 2, 3], high=3.0), labels)
    assert math.isclose(softer["full_loss"].item(), ce[0], rel_tol=1e-5)
    assert math.isclose(softer["exit_loss"].item(), ce[1], rel_tol=1e-5)
    assert ce[1] > 1.03 * ce[0] and softer["label"].tolist() == [0]  # loss ratio too high -> keep
    # the loss rule is a ratio: a looser ratio accepts the same exit
    assert exit_label(full, onehot_logits([0, 1, 2, 3], high=3.0), labels, loss_ratio=ce[1] / ce[0] + 1e-3)[
        "label"].tolist() == [1]
    # columns outside the answer never count (logits at column 0 and 3 differ wildly)
    noisy = onehot_logits([3, 1, 2, 0])
    assert exit_label(full, noisy, labels)["label"].tolist() == [1]
    with pytest.raises(InputLayoutError, match="answer"):
        exit_label(full, full, torch.full((1, 4), IGN))


@pytest.fixture(scope="module")
def tiny():
    model = tiny_llava(num_layers=3, hidden=32, image_size=16, seed=0)
    with torch.no_grad():  # a random model's logits are nearly flat: spread them so no argmax is a near-tie
        model.lm_head.weight.mul_(30.0)
    samples = generate_samples(model, 6, answer_len=3, seed=0)
    P.apply(model, dyvte={"router_hidden": 8})
    return model, samples


def test_generated_samples_are_the_models_own_greedy_answers(tiny):
    model, samples = tiny
    s = samples[0]
    answer = s["labels"] != IGN
    assert int(answer.sum()) == 3 and bool(answer[-3:].all())
    ids = s["input_ids"][None]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=s["pixel_values"][None]).logits
    assert logits[0, -4:-1].argmax(-1).tolist() == s["input_ids"][-3:].tolist()


def test_exit_examples_match_an_independent_masked_forward(tiny):
    """Labels, losses and features of make_exit_examples equal those computed from an sdpa copy with explicit
    visual-key masks after the sampled layer, and features read at the last PROMPT token."""
    model, samples = tiny
    batch = collate(samples[:3])
    layers = torch.tensor([[0, 1], [1, 0], [1, 1]])
    rule = dict(agreement=0.5, loss_ratio=1.3)  # looser than the paper's, so this random model gets both labels
    ex = make_exit_examples(model, batch, layers, **rule)
    assert sorted(set(ex["label"].tolist())) == [0, 1]
    assert ex["features"].shape == (6, 64) and ex["layers"].tolist() == [0, 1, 1, 0, 1, 1]

    ref = tiny_llava(num_layers=3, hidden=32, image_size=16, seed=0)  # same weights, no hooks
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if "hf_kan_dyvte" not in k})
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    am = inputs["attention_mask"].bool()
    t = am.shape[1]
    eye = torch.eye(t, dtype=torch.bool)[None]
    base = (torch.ones(t, t, dtype=torch.bool).tril()[None] & am[:, None, :]) | eye
    late = (base & (inputs["input_ids"] != 5)[:, None, :]) | eye  # 5 = image token id

    def masked(exit_layer):
        handles = []
        for i, layer in enumerate(ref.model.language_model.layers):
            m = torch.where(torch.tensor([0 <= int(e) < i for e in exit_layer])[:, None, None], late, base)[:, None]
            handles.append(layer.self_attn.register_forward_pre_hook(
                lambda mod, a, kw, m=m: (a, {**kw, "attention_mask": m}), with_kwargs=True))
        try:
            with torch.no_grad():
                return ref(**inputs, output_hidden_states=True)
        finally:
            for h in handles:
                h.remove()

    full = masked([-1, -1, -1])
    for j in range(2):
        stats = exit_label(full.logits, masked(layers[:, j].tolist()).logits, batch["labels"], **rule)
        for key in ("label", "agreement", "exit_loss", "full_loss"):
            torch.testing.assert_close(ex[key].view(3, 2)[:, j].to(stats[key].dtype), stats[key], rtol=1e-5,
                                       atol=1e-5)
    # features: [mean of the prompt text after the image, without the last prompt token ; last prompt token] of the
    # full run at layer l's output (the authors' rule)
    first_answer = (batch["labels"] != IGN).int().argmax(-1)
    for b in range(3):
        for j in range(2):
            lay = int(layers[b, j])
            h = full.hidden_states[lay + 1][b]  # output of decoder layer `lay` (never the last layer)
            ids = batch["input_ids"][b]
            last = int(first_answer[b]) - 1
            first_img = int((ids == 5).nonzero()[0])
            text = [i for i in range(first_img + 1, last) if int(ids[i]) != 5]
            want = torch.cat([h[text].mean(0), h[last]])
            torch.testing.assert_close(ex["features"].view(3, 2, -1)[b, j], want, rtol=1e-5, atol=1e-5)


def test_router_features_fall_back_to_the_last_token_without_text_after_the_image():
    from hf_kan.patches.engine.layout import IMAGE, TEXT, TokenLayout

    mod = torch.tensor([[TEXT, IMAGE, IMAGE]])
    z = torch.zeros_like(mod)
    lay = TokenLayout(modality=mod, position=torch.arange(3)[None], image_index=z, grid=z, row=z, col=z,
                      newline=z.bool(), span_end=torch.arange(3)[None])
    hidden = torch.arange(6.0).view(1, 3, 2)
    assert router_features(hidden, lay).tolist() == [[4.0, 5.0, 4.0, 5.0]]


def test_short_training_changes_only_the_routers(tiny):
    model, samples = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = torch.utils.data.DataLoader(samples, batch_size=3, collate_fn=collate)
    metrics = train_routers(model, loader, learning_rate=1e-2, layers_per_sample=2, max_steps=2)
    assert metrics["steps"] == 2 and math.isclose(metrics["first_loss"], math.log(2), rel_tol=1e-5)
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith("hf_kan_dyvte.routers.") for k in changed)
    assert any("fc2" in k for k in changed)  # the zero-initialised output layer moved
    assert not any(p.requires_grad for p in model.parameters())  # everything frozen again afterwards
    assert routers_of(model).routers["0"].fc2.weight.any()


def test_routers_are_selected_on_validation_and_tested_once(tiny):
    """Validation every step: the kept routers are the lowest-validation-loss step's (its loss re-measured on the
    final routers), and the test metrics are those of the kept routers on the test examples."""
    model, samples = tiny
    P.apply(model, dyvte=False)
    del model.hf_kan_dyvte
    P.apply(model, dyvte={"router_hidden": 8})
    rule = dict(agreement=0.5, loss_ratio=1.3)
    train = torch.utils.data.DataLoader(samples[:2] * 3, batch_size=2, collate_fn=collate)
    validation = [collate(samples[2:4])]
    test = [collate(samples[4:6])]
    metrics = train_routers(model, train, validation=validation, test=test, learning_rate=0.3, eval_steps=1,
                            seed=0, **rule)
    history = metrics["history"]
    assert [h["step"] for h in history] == [1, 2, 3] and metrics["steps"] == 3
    best = min(history, key=lambda h: h["validation_loss"])
    assert metrics["best_step"] == best["step"] and metrics["validation_loss"] == best["validation_loss"]
    assert len({round(h["validation_loss"], 6) for h in history}) > 1  # the steps really differed
    routers = routers_of(model)
    layers = len(routers.layers)  # held-out examples cover every router layer of each sample
    val = held_out_examples(model, validation, seed=1, **rule)
    assert val["layers"].tolist() == list(routers.layers) * 2
    assert evaluate_routers(routers, val, "validation")["validation_loss"] == pytest.approx(best["validation_loss"])
    tested = evaluate_routers(routers, held_out_examples(model, test, seed=2, **rule), "test")
    assert metrics["test_loss"] == pytest.approx(tested["test_loss"]) and metrics["test_examples"] == 2 * layers
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["selection"]["metric"] == "validation_loss"


@pytest.mark.slow
def test_cli_under_accelerate_launch_saves_reloadable_routers(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
           "-m", "hf_kan.patches.dyvte.train", "--output-dir", str(out), "--num-samples", "8", "--batch-size", "4",
           "--learning-rate", "1e-2", "--router-hidden", "8", "--num-test-samples", "2"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["train_samples"] == 7  # 1 of the 8 samples held out for validation
    assert metrics["best_step"] in (1, 2) and metrics["validation_examples"] == 3  # 1 sample x 3 router layers
    assert metrics["test_examples"] == 6 and metrics["test_source"] == "split 'test'"
    from transformers import LlavaForConditionalGeneration

    model = P.from_pretrained(LlavaForConditionalGeneration, out)
    assert P.status(model)["patches"]["dyvte"]["router_hidden"] == 8
    assert routers_of(model).routers["0"].fc2.weight.any()  # trained, not the zero init
