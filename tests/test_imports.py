"""``import hf_kan`` is cheap and still registers everything, in whatever order the libraries are imported.

Each scenario runs in a fresh interpreter: what matters is which modules a process has loaded, and in which order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch


def run_python(code: str, *argv: str, flags: tuple[str, ...] = (), timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh offline interpreter (``flags`` before ``-c``, ``argv`` after); it must succeed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "error::RuntimeWarning"}
    command = [sys.executable, *flags, "-c", textwrap.dedent(code), *argv]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "hf_kan: registration" not in result.stderr, result.stderr[-5000:]  # logged when a registration fails
    return result


def imported_modules(importtime_stderr: str) -> set[str]:
    """Module names from ``python -X importtime`` output (``import time: self | cumulative | name``)."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


def test_import_hf_kan_loads_no_heavy_library():
    out = run_python(
        """
        import sys
        import hf_kan
        print(sorted(m for m in ("torch", "transformers", "peft", "datasets", "hf_kan.patches") if m in sys.modules))
        print(hf_kan.__version__, "KATConfig" in dir(hf_kan))
        """
    )
    assert out.stdout.split("\n")[:2] == ["[]", "0.1.0 True"]


def test_import_rational_op_loads_neither_peft_nor_patches():
    result = run_python("import hf_kan.ops.rational", flags=("-X", "importtime"))
    modules = imported_modules(result.stderr)
    assert "hf_kan.ops.rational" in modules and "torch" in modules
    loaded = sorted(m for m in modules if m.split(".")[0] == "peft" or m.startswith("hf_kan.patches"))
    assert loaded == []
    assert "transformers" not in modules and "hf_kan.moh" not in modules


def test_registration_when_transformers_is_imported_after_hf_kan():
    # pipeline() first: Transformers imports its auto modules from inside half-initialised modules
    # (image_processing_utils, modeling_utils); registration must wait until those imports are complete.
    out = run_python(
        """
        import json, sys
        import hf_kan
        from transformers import pipeline  # noqa: F401
        import torch
        from transformers import AutoBackbone, AutoConfig, AutoModelForImageClassification, LlamaConfig
        from transformers import LlamaForCausalLM
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        report = {"patches_before": "hf_kan.patches" in sys.modules}
        report["configs"] = [type(AutoConfig.for_model(t)).__name__ for t in ("kat", "karat")]
        config = hf_kan.config_from_preset("kat-tiny", num_labels=3, image_size=16, patch_size=8, num_hidden_layers=1)
        report["model"] = type(AutoModelForImageClassification.from_config(config)).__name__
        report["backbone"] = type(AutoBackbone.from_config(config)).__name__
        report["attention"] = ALL_ATTENTION_FUNCTIONS["hf_kan"].__module__
        report["mask"] = ALL_MASK_ATTENTION_FUNCTIONS["hf_kan"].__module__

        # the thin registered functions load the patches' backend on first use and equal sdpa with no patch on
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
        sdpa = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()
        ours = LlamaForCausalLM._from_config(cfg, attn_implementation="hf_kan").eval()
        ours.load_state_dict(sdpa.state_dict())
        ids = torch.randint(1, 32, (2, 7))
        mask = torch.ones_like(ids)
        mask[0, :2] = 0
        with torch.no_grad():
            diff = (ours(ids, attention_mask=mask).logits - sdpa(ids, attention_mask=mask).logits)[mask.bool()]
        report["max_diff"] = diff.abs().max().item()
        report["patches_after"] = "hf_kan.patches" in sys.modules
        print(json.dumps(report))
        """
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["configs"] == ["KATConfig", "KArAtConfig"]
    assert (report["model"], report["backbone"]) == ("KATForImageClassification", "KATBackbone")
    assert report["attention"] == report["mask"] == "hf_kan._registration"
    assert not report["patches_before"] and report["patches_after"]
    assert report["max_diff"] < 1e-5


@pytest.fixture(scope="module")
def moh_adapter(tmp_path_factory):
    """A saved tiny Llama, an MoH adapter trained for nothing but with routers that change the output, and the
    adapted model's logits on fixed ids."""
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_kan import MoHConfig

    root = tmp_path_factory.mktemp("moh")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)  # fmt: skip
    base = LlamaForCausalLM(config).eval()
    base.save_pretrained(root / "base")
    model = get_peft_model(base, MoHConfig(router="learned", active_fraction=0.5)).eval()
    model.save_pretrained(root / "adapter")
    ids = torch.arange(1, 13).view(2, 6)
    with torch.no_grad():
        expected = model(ids).logits
    torch.save({"ids": ids, "logits": expected}, root / "expected.pt")
    return root


MOH_CHECK = """
    import sys, torch
    root = sys.argv[1]
    data = torch.load(root + "/expected.pt")
    {load}
    with torch.no_grad():
        diff = (model.eval()(data["ids"]).logits - data["logits"]).abs().max().item()
    # and a new MoH adapter on a fresh model
    from peft import get_peft_model
    from transformers import AutoConfig, LlamaForCausalLM
    fresh = get_peft_model(LlamaForCausalLM.from_pretrained(root + "/base"), hf_kan.MoHConfig())
    print(type(model.peft_config["default"]).__name__, diff, type(fresh.base_model).__name__,
          type(AutoConfig.for_model("karat")).__name__)
"""


@pytest.mark.parametrize(
    "load",
    [
        # the README's order: import hf_kan, then PEFT's own loading call
        "import hf_kan\n"
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM\n"
        "model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root + '/base'), root + '/adapter')",
        # PEFT (and with it Transformers' auto classes) imported before hf_kan: registered at once
        "import peft\n"
        "import hf_kan\n"
        "from transformers import AutoModelForCausalLM\n"
        "model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root + '/base'), root + "
        "'/adapter')",
    ],
    ids=["hf_kan-then-peft", "peft-then-hf_kan"],
)
def test_moh_adapter_reloads_and_attaches_in_a_fresh_process(moh_adapter, load):
    out = run_python(MOH_CHECK.format(load=textwrap.indent(load, "    ").strip()), str(moh_adapter))
    name, diff, tuner, karat = out.stdout.split()[-4:]
    assert name == "MoHConfig" and float(diff) < 1e-5 and tuner == "MoHModel" and karat == "KArAtConfig"


def test_get_peft_model_when_the_moh_config_module_imports_peft():
    # importing the config module is what first imports PEFT here: registration must wait for it to finish
    out = run_python(
        """
        from hf_kan.moh.config import MoHConfig
        from peft import get_peft_model
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2)
        model = get_peft_model(LlamaForCausalLM(cfg), MoHConfig())
        print(type(model.base_model).__name__, model.peft_config["default"].peft_type.value)
        """
    )
    assert out.stdout.strip().splitlines()[-1] == "MoHModel MOH"


def test_public_names_are_pinned_and_resolve():
    import hf_kan

    assert sorted(hf_kan.__all__) == sorted([
        "FourierKArAtOperator", "GroupRational", "HFKanError", "KArAtConfig", "KArAtForImageClassification",
        "KArAtModel", "KATConfig", "KATForImageClassification", "KATModel", "MoHConfig", "__version__",
        "available_presets", "config_from_preset", "errors", "models", "moh", "moh_aux_loss", "register_preset",
    ])  # fmt: skip
    for name in hf_kan.__all__:
        assert getattr(hf_kan, name) is not None, name
    assert hf_kan.KATConfig.model_type == "kat" and callable(hf_kan.moh_aux_loss)
    assert set(hf_kan.__all__) <= set(dir(hf_kan))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        hf_kan.nope
