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


def trained_moh_directory(path: Path) -> dict:
    """A saved MoH adapter directory as ``hf-kan moh-tune`` leaves it (base model, adapter, its card written by the
    trainer's card writer), without training: returns the metrics the card was written with."""
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_kan.moh import MoHConfig
    from hf_kan.moh.card import write_adapter_card
    from hf_kan.moh.train import MoHTuneArguments

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    base.save_pretrained(path / "base_model")
    base.name_or_path = base.config.name_or_path = str((path / "base_model").resolve())
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    peft_model = get_peft_model(base, MoHConfig(task_type="CAUSAL_LM", lora_config=lora))
    peft_model.save_pretrained(path)
    metrics = {"steps": 3, "num_processes": 1, "best_step": 2, "validation_source": "split 'validation'",
               "validation_loss": 3.125, "validation_perplexity": 22.76, "validation_blocks": 4,
               "test_source": "split 'test'", "test_loss": 3.25, "test_perplexity": 25.79, "test_blocks": 5}
    write_adapter_card(peft_model, str(path), args=MoHTuneArguments(output_dir=str(path)), metrics=metrics)
    return metrics


def test_hf_kan_push_keeps_the_trained_moh_card_and_merges_eval_results(hub, run_against_hub, tmp_path):
    adapter_dir = tmp_path / "moh"
    metrics = trained_moh_directory(adapter_dir)
    saved = (adapter_dir / "README.md").read_text()
    results = {"results": [{"task": "hf_kan_digits", "split": "test", "setting": {"name": "checkpoint"},
                            "num_samples": 8, "metrics": {"answer_accuracy": 0.375, "prefill_seconds": 0.2}}]}
    (tmp_path / "results.json").write_text(json.dumps(results))

    run_against_hub(["-m", "hf_kan.cli", "push", str(adapter_dir), "tester/moh-trained",
                     "--eval-results", str(tmp_path / "results.json")])
    files = hub.repos["tester/moh-trained"]
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "base_model/config.json"} <= set(files)
    got = received(hub, "tester/moh-trained", tmp_path / "got")
    card = ModelCard.load(got / "README.md")
    # the trainer's sections arrive as written: method table, training, validation / test figures
    for section in ("## Method", "| heads per attention block | 4: 2 shared (always on) + top 1 of 2 routed |",
                    "## Training", "Continue-tuned with `hf-kan moh-tune`", "| validation (split 'validation') | "
                    "3.1250 | 22.76 | 4 | selected on this split |", "| test (split 'test') | 3.2500 | 25.79 |"):
        assert section in saved and section in card.text, section
    assert card_body(saved).split("## Evaluation")[0].replace("path/to/this/adapter", "tester/moh-trained") == \
        card.text.split("## Evaluation")[0]  # only the load location changed above the Evaluation section
    assert 'AutoPeftModelForCausalLM.from_pretrained("tester/moh-trained")' in card.text
    # model-index: the trained test figures and the eval result (timings left out)
    assert sorted((r.metric_type, r.metric_value) for r in card.data.eval_results) == [
        ("answer_accuracy", 0.375), ("test_loss", metrics["test_loss"]),
        ("test_perplexity", metrics["test_perplexity"])]
    assert "| hf_kan_digits | test | `checkpoint` | answer_accuracy | 0.375 | 8 |" in card.text
    assert card.data.library_name == "peft" and {"hf-kan", "moh", "lora"} <= set(card.data.tags)


def test_generic_or_missing_readme_is_rendered_and_hf_kan_card_kept(tmp_path):
    from hf_kan import hub as hf_kan_hub

    adapter_dir = tmp_path / "moh"
    trained_moh_directory(adapter_dir)
    kept = hf_kan_hub.upload_card(adapter_dir, "me/moh")
    assert "## Training" in kept and "Continue-tuned" in kept and 'from_pretrained("me/moh")' in kept
    # PEFT's blank template (no hf-kan tag) is replaced by a card rendered from adapter_config.json
    (adapter_dir / "README.md").write_text("---\nlibrary_name: peft\ntags:\n- lora\n---\n# Model Card\n\n"
                                           "[More Information Needed]\n")
    rendered = ModelCard(hf_kan_hub.upload_card(adapter_dir, "me/moh"))
    assert {"hf-kan", "moh"} <= set(rendered.data.tags) and "More Information Needed" not in rendered.text
    assert "How this adapter was trained was not recorded." in rendered.text and "${" not in rendered.text
    (adapter_dir / "README.md").unlink()
    assert hf_kan_hub.upload_card(adapter_dir, "me/moh") == str(rendered)
