"""The image-classification trainer: data preparation, CLI, optimizer groups, a short run to a real accuracy, model
selection on validation with one test evaluation at the end, complete saved directories, early Hub checks."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification

from hf_kan.cli import build_parser
from hf_kan.cli import main as cli_main
from hf_kan.data import load_digits_dataset
from hf_kan.errors import HFKanConfigError, HubUnavailableError, InputLayoutError
from hf_kan.train import ImageClassificationArguments, load_classification_data, train_image_classification
from hf_kan.train import image_classification as trainer
from hf_kan.train.cli_args import dataclass_from_namespace, parse_key_values
from hf_kan.train.data import collate_classification
from hf_kan.train.image_classification import build_model, make_optimizer, resolve_config

# A model small enough to train in a few CPU seconds: 16 tokens (8 px digits, patch 2), width 64, one block.
TINY = {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 128}
# Measured: after 6 epochs (120 steps on the 1,257 training digits) the models selected on validation reach 0.889
# (KAT) and 0.872 (ViT) test accuracy (chance is 0.10); the threshold leaves margin for platform numerics.
TINY_ACCURACY = 0.8


@pytest.fixture(autouse=True)
def _eager_rational(monkeypatch):
    """Keep the CPU rational op eager: compiling it costs minutes on a loaded 2-core machine (tested elsewhere)."""
    monkeypatch.setenv("HF_KAN_RATIONAL_CPU_COMPILE", "0")


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny models train fastest on one thread; more threads spin-wait when xdist workers share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_args(tmp_path, model: str = "vit-tiny", **kwargs) -> ImageClassificationArguments:
    values = dict(
        model=model,
        image_size=8,
        patch_size=2,
        num_channels=1,
        config_overrides=dict(TINY),
        output_dir=str(tmp_path / "out"),
        epochs=6,
        batch_size=64,
        learning_rate=3e-3,
        progress_bar=False,
    )
    values.update(kwargs)
    return ImageClassificationArguments(**values)


@pytest.fixture(scope="module")
def image_dataset_dir(tmp_path_factory):
    """The digits as 8x8 PIL images with string labels and only a train split, saved with ``save_to_disk``."""
    import datasets

    data = load_digits_dataset(as_images=True)["train"]
    data = data.cast_column("label", datasets.Value("string"))
    data = data.map(lambda row: {"label": f"digit-{row['label']}"})
    path = tmp_path_factory.mktemp("imgdata") / "digits_images"
    datasets.DatasetDict({"train": data}).save_to_disk(str(path))
    return str(path)


def manual_accuracy(model, pixel_values: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        preds = model.eval()(pixel_values=pixel_values).logits.argmax(-1)
    return (preds == labels).double().mean().item()


def test_digits_loader_batches():
    data = load_classification_data(None, image_size=8, num_channels=1)
    assert data.label_names == [str(i) for i in range(10)]
    assert (len(data.train), len(data.validation), len(data.test)) == (1257, 180, 360)
    # the processor saved with the model maps a digit image to the training pixel values (up to 8-bit rounding)
    image = load_digits_dataset(as_images=True)["test"][0]["image"]
    processed = data.image_processor(image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(processed, data.test.pixel_values[0], atol=2 / 255, rtol=0)
    batch = next(iter(torch.utils.data.DataLoader(data.train, batch_size=7, collate_fn=collate_classification)))
    assert batch["pixel_values"].shape == (7, 1, 8, 8) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == data.train.labels[:7].tolist()
    # rows are the digits preprocessing, unchanged
    reference = load_digits_dataset(image_size=8, num_channels=1)["train"].with_format("torch")[:7]
    torch.testing.assert_close(batch["pixel_values"], reference["pixel_values"])


def test_image_dataset_loader_maps_labels_and_holds_out(image_dataset_dir):
    data = load_classification_data(image_dataset_dir, image_size=8, num_channels=3, validation_fraction=0.25)
    assert data.label_names == [f"digit-{i}" for i in range(10)]
    assert len(data.train) + len(data.validation) == 1257 and len(data.validation) == 315  # ceil(0.25 * 1257)
    assert data.test is None and data.test_source is None
    assert data.validation_source == "25% of 'train' held out, seed 0"
    rows = [data.validation[i] for i in range(5)]
    batch = collate_classification(rows)
    assert batch["pixel_values"].shape == (5, 3, 8, 8)
    # default processor at native size: (pixel / 255 - 0.5) / 0.5 of the 8-bit image, channels repeated
    raw = load_digits_dataset(as_images=True)["train"]
    by_image = {np.asarray(r["image"]).tobytes(): r["label"] for r in raw}
    pixels = ((batch["pixel_values"][:, 0] * 0.5 + 0.5) * 255).round().to(torch.uint8).numpy()
    torch.testing.assert_close(
        (batch["pixel_values"] * 0.5 + 0.5) * 255, torch.from_numpy(pixels)[:, None].float().expand(-1, 3, -1, -1)
    )
    for img, label in zip(pixels, batch["labels"]):
        assert data.label_names[int(label)] == f"digit-{by_image[img.tobytes()]}"


def test_cli_builds_arguments():
    args = build_parser("train").parse_args(
        [
            "train",
            "--model",
            "kat-tiny",
            "--image-size",
            "16",
            "--config-overrides",
            "hidden_size=32,qkv_bias=false",
            "--no-progress-bar",
            "--max-steps",
            "7",
            "--validation-split",
            "dev",
            "--max-grad-norm",
            "0",
        ]
    )
    parsed = dataclass_from_namespace(ImageClassificationArguments, args)
    assert parsed.model == "kat-tiny" and parsed.image_size == 16 and parsed.max_steps == 7
    assert parsed.config_overrides == {"hidden_size": 32, "qkv_bias": False}
    assert parsed.progress_bar is False and parsed.validation_split == "dev" and parsed.patch_size is None
    assert parsed.max_grad_norm is None and parsed.test_split is None and parsed.split_seed == 0
    assert parse_key_values('{"a": [1, 2]}') == {"a": [1, 2]}
    assert parse_key_values("name=abc,x=1.5") == {"name": "abc", "x": 1.5}
    with pytest.raises(HFKanConfigError, match="KEY=VALUE"):
        parse_key_values("hidden_size")


def test_weight_decay_only_on_linear_and_conv_weights(tmp_path):
    args = tiny_args(tmp_path, model="kat-tiny")
    config, from_preset = resolve_config(args)
    model = build_model(args, config, from_preset, [str(i) for i in range(10)])
    decay, no_decay = make_optimizer(model, args).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == args.weight_decay and no_decay["weight_decay"] == 0.0
    assert any("fc1.weight" in n for n in decayed) and any("patch" in n for n in decayed)
    assert not any("rational" in n or "act" in n or n.endswith("bias") or "norm" in n for n in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.fixture
def test_split_spy(monkeypatch):
    """Records every split evaluated, and every row of the test split read (with the evaluation running then)."""
    log = {"evaluations": [], "test_rows": []}
    original_evaluate, original_load = trainer.evaluate, load_classification_data

    def evaluate(model, loader, accelerator, split="validation"):
        log["evaluations"].append(split)
        return original_evaluate(model, loader, accelerator, split)

    class Spy(torch.utils.data.Dataset):
        def __init__(self, inner):
            self.inner = inner

        def __len__(self):
            return len(self.inner)

        def __getitem__(self, index):
            log["test_rows"].append((index, log["evaluations"][-1] if log["evaluations"] else None))
            return self.inner[index]

    def load(*args, **kwargs):
        data = original_load(*args, **kwargs)
        data.test = Spy(data.test) if data.test is not None else None
        return data

    monkeypatch.setattr(trainer, "evaluate", evaluate)
    monkeypatch.setattr("hf_kan.train.data.load_classification_data", load)
    return log


@pytest.mark.parametrize("model_name", ["kat-tiny", "vit-tiny"])
def test_short_training_selects_on_validation_and_tests_once(tmp_path, model_name, test_split_spy):
    args = tiny_args(tmp_path, model=model_name)
    metrics = train_image_classification(args)
    assert metrics["steps"] == 6 * 20 and metrics["num_processes"] == 1  # ceil(1257 / 64) = 20 steps per epoch
    assert [h["validation_samples"] for h in metrics["history"]] == [180] * 6
    best = max(metrics["history"], key=lambda h: h["validation_accuracy"])
    assert metrics["validation_accuracy"] == best["validation_accuracy"] and metrics["best_step"] == best["step"]
    assert metrics["test_accuracy"] >= TINY_ACCURACY, metrics["history"]
    assert metrics["test_samples"] == 360 and metrics["test_source"] == "split 'test'"
    # the test split was read once, row by row, during the single test evaluation after every validation run
    assert test_split_spy["evaluations"] == ["validation"] * 6 + ["test"]
    assert sorted(i for i, _ in test_split_spy["test_rows"]) == list(range(360))
    assert {phase for _, phase in test_split_spy["test_rows"]} == {"test"}
    with open(os.path.join(args.output_dir, "metrics.json")) as handle:
        saved = json.load(handle)
    assert saved["test_accuracy"] == metrics["test_accuracy"] and saved["best_step"] == metrics["best_step"]

    # the saved model is the selected one: it reproduces the selected validation accuracy and the test accuracy
    model = AutoModelForImageClassification.from_pretrained(args.output_dir)
    assert model.config.model_type == model_name.split("-")[0] and model.config.num_labels == 10
    card_info = model.config.model_card_info  # rendered into README.md by hf_kan.hub for hf-kan families
    assert card_info["metrics"] == {"accuracy": round(metrics["test_accuracy"], 4)}
    assert "split 'test', 360 images" in card_info["metrics_dataset"] and "best validation" in card_info["training"]
    digits = load_digits_dataset(image_size=8, num_channels=1)
    for split, key in (("validation", "validation_accuracy"), ("test", "test_accuracy")):
        rows = digits[split].with_format("torch")[:]
        assert manual_accuracy(model, rows["pixel_values"], rows["label"]) == pytest.approx(metrics[key])


def test_early_stopping_on_validation(tmp_path):
    # learning rate 0: the validation accuracy never improves after the first evaluation
    args = tiny_args(tmp_path, learning_rate=0.0, eval_steps=2, early_stopping_patience=2, max_train_samples=256,
                     epochs=5, save_model=False)  # fmt: skip
    metrics = train_image_classification(args)
    assert [h["step"] for h in metrics["history"]] == [2, 4, 6] and metrics["steps"] == 6
    assert metrics["stopped_early"] and metrics["best_step"] == 2
    assert metrics["selection"] == {"metric": "validation_accuracy", "mode": "max", "best_value":
                                    metrics["validation_accuracy"], "best_step": 2, "patience": 2}  # fmt: skip


def test_saved_directories_load_with_pipeline_and_auto_image_processor(tmp_path):
    from transformers import pipeline

    args = tiny_args(tmp_path, model="kat-tiny", num_channels=3, max_steps=3, eval_steps=3)
    train_image_classification(args)
    processor = AutoImageProcessor.from_pretrained(args.output_dir)
    classify = pipeline("image-classification", model=args.output_dir)
    images = [row["image"] for row in load_digits_dataset(as_images=True)["test"].select(range(8))]
    predictions = classify(images, top_k=10)
    # the pipeline's scores are the model's softmax on the saved processor's output
    model = AutoModelForImageClassification.from_pretrained(args.output_dir).eval()
    with torch.no_grad():
        logits = model(**processor([im.convert("RGB") for im in images], return_tensors="pt")).logits
    for prediction, probabilities in zip(predictions, logits.softmax(-1)):
        for entry in prediction:
            assert entry["score"] == pytest.approx(probabilities[int(entry["label"])].item(), abs=1e-5)


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    # 100 samples / batch 16 = 7 micro-batches per epoch -> ceil(7 / 2) = 4 optimizer steps per epoch
    args = tiny_args(
        tmp_path,
        max_train_samples=100,
        batch_size=16,
        gradient_accumulation_steps=2,
        epochs=2,
        save_model=False,
        max_eval_samples=50,
    )
    metrics = train_image_classification(args)
    assert metrics["steps"] == 8 and metrics["history"][-1]["validation_samples"] == 50
    assert metrics["test_samples"] == 50
    assert not os.path.exists(os.path.join(args.output_dir, "model.safetensors"))


def test_clear_errors(tmp_path, image_dataset_dir):
    with pytest.raises(HFKanConfigError, match="neither a registered preset"):
        train_image_classification(
            tiny_args(
                tmp_path,
                model=str(tmp_path / "missing"),
                image_size=None,
                patch_size=None,
                num_channels=None,
                config_overrides={},
            )
        )
    with pytest.raises(HFKanConfigError, match="presets only"):
        resolve_config(tiny_args(tmp_path, model=str(tmp_path)))
    with pytest.raises(InputLayoutError, match="label column"):
        load_classification_data(image_dataset_dir, image_size=8, num_channels=3, label_column="class")
    pixel_dir = str(tmp_path / "pixels")
    load_digits_dataset(image_size=8, num_channels=1).save_to_disk(pixel_dir)
    with pytest.raises(InputLayoutError, match=r"pixel_values have shape \(1, 8, 8\)"):
        load_classification_data(pixel_dir, image_size=8, num_channels=3)
    with pytest.raises(HFKanConfigError, match="batch_size"):
        tiny_args(tmp_path, batch_size=0)
    with pytest.raises(HFKanConfigError, match="validation split 'validation' not found"):
        load_classification_data(image_dataset_dir, image_size=8, num_channels=3, validation_split="validation")
    with pytest.raises(HFKanConfigError, match="overstates"):
        load_classification_data(None, image_size=8, num_channels=1, validation_split="test", test_split="test")
    with pytest.raises(HFKanConfigError, match="max_grad_norm"):
        tiny_args(tmp_path, max_grad_norm=-1.0)


def test_push_to_hub_is_checked_before_training(tmp_path, monkeypatch, capsys):
    out = tmp_path / "never-written"
    command = ["train", "--model", "vit-tiny", "--image-size", "8", "--patch-size", "2", "--push-to-hub",
               "--output-dir", str(out), "--no-progress-bar"]  # fmt: skip
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert cli_main(command) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("hf-kan train: error: --push-to-hub") and "HF_HUB_OFFLINE" in err
    assert not out.exists()  # failed before anything was trained or written

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(HubUnavailableError, match="needs a Hugging Face token"):
        trainer.check_hub_push("me/model")

    monkeypatch.setattr("huggingface_hub.get_token", lambda: "hf_fake")
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")

    def unreachable(self, token=None):
        raise ConnectionError("connection refused")

    monkeypatch.setattr("huggingface_hub.HfApi.whoami", unreachable)
    with pytest.raises(HubUnavailableError, match="not reachable"):
        trainer.check_hub_push("me/model")
