"""Uploads to a local Hub double (no network): KAT with its image processor, KArAt, a patched VLM with evaluation
results (``hf-kan push``), a MoH adapter. Each push runs in a subprocess with ``HF_ENDPOINT`` set to the double."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import tiny_vlm_checkpoint
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification, ViTImageProcessor

from hf_kan.models.karat import KArAtConfig, KArAtForImageClassification
from hf_kan.models.kat import KATConfig, KATForImageClassification


def received(hub, repo_id: str, into: Path) -> Path:
    """Write the double's copy of ``repo_id`` to ``into`` (a directory ``from_pretrained`` can load)."""
    for name, data in hub.repos[repo_id].items():
        (into / name).parent.mkdir(parents=True, exist_ok=True)
        (into / name).write_bytes(data)
    return into


def same_tensors(a: Path, b: Path) -> bool:
    left, right = load_file(str(a)), load_file(str(b))
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def card_body(text: str) -> str:
    return text.split("\n---\n", 1)[1]


@pytest.mark.slow
def test_kat_karat_and_moh_adapter_arrive_complete(hub, run_against_hub, tmp_path):
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_kan import MoHConfig

    torch.manual_seed(0)
    kat_dir, karat_dir, base_dir, adapter_dir = (tmp_path / n for n in ("kat", "karat", "base", "adapter"))
    kat = KATForImageClassification(KATConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                              num_attention_heads=2, rational_groups=4, num_labels=3))
    kat.save_pretrained(kat_dir)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(kat_dir)
    karat = KArAtForImageClassification(KArAtConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                                                    intermediate_size=40, image_size=12, patch_size=4,
                                                    karat_grid_size=2, karat_rank=5, num_labels=4))
    karat.save_pretrained(karat_dir)
    ViTImageProcessor(size={"height": 12, "width": 12}).save_pretrained(karat_dir)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    base.save_pretrained(base_dir)
    get_peft_model(base, MoHConfig(router="learned", router_init_std=0.02)).save_pretrained(adapter_dir)

    script = textwrap.dedent(f"""
        import hf_kan
        from hf_kan import hub
        from peft import PeftModel
        from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoModelForImageClassification

        # KAT: the stock order, model first and its image processor afterwards, in two pushes
        kat = AutoModelForImageClassification.from_pretrained({str(kat_dir)!r})
        kat.push_to_hub("kat-digits", tags=["digits"])
        AutoImageProcessor.from_pretrained({str(kat_dir)!r}).push_to_hub("tester/kat-digits")
        # KArAt: model, processor and card in one commit
        karat = AutoModelForImageClassification.from_pretrained({str(karat_dir)!r})
        hub.push_to_hub(karat, "karat-tiny", processor=AutoImageProcessor.from_pretrained({str(karat_dir)!r}))
        # MoH adapter
        base = AutoModelForCausalLM.from_pretrained({str(base_dir)!r})
        hub.push_to_hub(PeftModel.from_pretrained(base, {str(adapter_dir)!r}), "moh-adapter")
    """)
    run_against_hub(["-c", script])

    # --- KAT: weights, config, processor and the hf-kan card, which the processor push did not replace
    kat_files = hub.repos["tester/kat-digits"]
    assert {"README.md", "config.json", "model.safetensors", "preprocessor_config.json"} <= set(kat_files)
    kat_got = received(hub, "tester/kat-digits", tmp_path / "kat-got")
    assert same_tensors(kat_got / "model.safetensors", kat_dir / "model.safetensors")
    first, last = [c for c in hub.commits if c["repo"] == "tester/kat-digits"]
    assert "README.md" in first["files"] and "preprocessor_config.json" in last["files"]
    card = ModelCard.load(kat_got / "README.md")
    assert card.data.library_name == "transformers" and {"hf-kan", "kat", "digits"} <= set(card.data.tags)
    assert "Kolmogorov-Arnold Transformer" in card.text and "pip install hf-kan" in card.text
    assert "import hf_kan" in card.text and "@inproceedings{yang2025kat" in card.text
    assert card_body(kat_files["README.md"].decode()) == card_body(first["files"]["README.md"].decode())
    model = AutoModelForImageClassification.from_pretrained(kat_got)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(pixels).logits, kat.eval()(pixels).logits)

    # --- KArAt: everything in one commit
    (karat_commit,) = [c for c in hub.commits if c["repo"] == "tester/karat-tiny"]
    assert {"README.md", "config.json", "model.safetensors", "preprocessor_config.json"} <= set(karat_commit["files"])
    karat_card = ModelCard(karat_commit["files"]["README.md"].decode())
    assert "karat" in karat_card.data.tags and "Kolmogorov-Arnold Attention" in karat_card.text

    # --- MoH adapter
    moh_files = hub.repos["tester/moh-adapter"]
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= set(moh_files)
    assert json.loads(moh_files["adapter_config.json"])["peft_type"] == "MOH"
    moh_card = ModelCard(moh_files["README.md"].decode())
    assert moh_card.data.library_name == "peft" and {"hf-kan", "moh"} <= set(moh_card.data.tags)
    assert "Mixture-of-Head" in moh_card.text and "@article{jin2024moh" in moh_card.text
    assert "import hf_kan" in moh_card.text and "PeftModel.from_pretrained" in moh_card.text
    assert same_tensors(received(hub, "tester/moh-adapter", tmp_path / "moh-got") / "adapter_model.safetensors",
                        adapter_dir / "adapter_model.safetensors")


@pytest.mark.slow
def test_hf_kan_push_patched_vlm_with_eval_results(hub, run_against_hub, tmp_path):
    from hf_kan.eval import Runner, evaluate_task, task_samples
    from transformers import AutoModelForImageTextToText

    from hf_kan import patches

    source = tiny_vlm_checkpoint.save(tmp_path / "tiny")
    runner = Runner.from_pretrained(str(source), batch_size=4, max_new_tokens=1)
    results = evaluate_task(runner, "hf_kan_digits", ["off", "prune=fastv,mma=true"], limit=4)
    (tmp_path / "results.json").write_text(json.dumps({"results": [r.as_dict() for r in results]}))
    vlm_dir = tmp_path / "vlm"
    runner.model.save_pretrained(vlm_dir)  # saved with the last setting: FastV + MMA
    runner.processor.save_pretrained(vlm_dir)

    out = run_against_hub(["-m", "hf_kan.cli", "push", str(vlm_dir), "tester/vlm-fastv",
                           "--eval-results", str(tmp_path / "results.json")])
    assert "tester/vlm-fastv/commit/" in out.stdout
    (commit,) = [c for c in hub.commits if c["repo"] == "tester/vlm-fastv"]
    files = commit["files"]
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json", "processor_config.json",
            "chat_template.jinja"} <= set(files)
    section = json.loads(files["config.json"])["text_config"]["hf_kan"]
    assert section["prune"]["method"] == "fastv" and section["mma"]["assistant_token_ids"]

    card = ModelCard(files["README.md"].decode())
    assert card.data.pipeline_tag == "image-text-to-text" and "hf-kan-prune" in card.data.tags
    by_setting = {(r.metric_config, r.metric_type): r.metric_value for r in card.data.eval_results}
    for result in results:
        for metric in ("answer_accuracy", "visual_tokens_kept", "prefill_flops", "kv_cache_bytes"):
            assert by_setting[(result.setting["name"], metric)] == pytest.approx(result.metrics[metric])
    assert not any("seconds" in metric for _, metric in by_setting)  # timings are machine-dependent: not in the card
    assert all(r.dataset_name == "hf_kan_digits" and r.dataset_split == "test" for r in card.data.eval_results)
    for text in ("pip install hf-kan", "import hf_kan", "patches.from_pretrained(AutoModelForImageTextToText",
                 "`prune` | `keep_ratios` | `[0.5]`", "@article{chen2024fastv", "@article{aki2025mma"):
        assert text in card.text, text

    got = received(hub, "tester/vlm-fastv", tmp_path / "vlm-got")
    loaded = patches.from_pretrained(AutoModelForImageTextToText, str(got))
    assert patches.status(loaded)["active"] == ["mma", "prune"]
    again = Runner(loaded, runner.processor, batch_size=4, max_new_tokens=1)  # answers as it did before the upload
    answers = again.generate(task_samples("hf_kan_digits", limit=4))
    assert [g.text for g in answers] == [r["prediction"] for r in results[1].samples]
