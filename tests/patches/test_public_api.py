"""The two tiers of public names: ``hf_kan.patches`` (user calls and config classes) and ``hf_kan.patches.engine``
(what patch authors build on); the patch commands reachable from ``hf-kan``; the backend registered on import."""

import hf_kan.patches as P
import pytest
from hf_kan.patches import engine, registry

USER_API = [
    "DyVTEConfig", "EfficiencyReport", "HFKanCache", "MMAConfig", "PatchConfig", "PruneConfig", "VARConfig", "apply",
    "calibrate_trend", "detach", "efficiency_report", "exit_layers", "find_sink_dims", "from_pretrained",
    "kept_token_grid", "load_released_routers", "mask_visual_after", "padding_cache", "plot_kept_tokens", "plot_var",
    "record_var", "sink_dim_scores", "status",
]
ENGINE_API = [
    "CONFIG_ATTRIBUTE", "IMAGE", "PAD", "STATE_KWARG", "TEXT", "VIDEO", "ApplyContext", "AttentionMetadata",
    "CliCommand",
    "ForwardState", "HFKanCache", "KVLedger", "PatchConfig", "PatchRuntime", "PatchSpec", "TokenLayout", "VisualItem",
    "argument_options", "base_mask", "build_layout", "check_no_labels", "current_rows", "drop_tokens", "drop_visual",
    "explicit_attention", "extra_runtime", "kernel_compute", "metadata_mask", "modality_codes", "parse_options",
    "sdpa_compute", "select_compute", "visual_outside_last_chunk",
]


def test_public_names_are_pinned():
    assert sorted(P.__all__) == sorted(USER_API)
    assert sorted(engine.__all__) == sorted(ENGINE_API)
    for module in (P, engine):
        assert all(hasattr(module, name) for name in module.__all__)


def test_builtin_patches_are_registered_in_runtime_order():
    assert registry.names() == ("mma", "var", "prune", "dyvte")
    assert [s.config_class for s in registry.specs()] == [P.MMAConfig, P.VARConfig, P.PruneConfig, P.DyVTEConfig]
    assert [s.name for s in registry.specs() if s.changes_visibility] == ["mma"]


def test_patch_commands_are_reachable_from_the_cli_with_the_registry_help(capsys):
    from hf_kan.cli import COMMANDS, main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    listing = "".join(capsys.readouterr().out.split())  # argparse wraps (and hyphen-breaks) the help column
    assert [c.name for c in registry.cli_commands()] == ["calibrate-var", "calibrate-prune", "dyvte-train"]
    for command in registry.cli_commands():
        # the CLI's table is static (so --help imports nothing heavy); it must name what the specs declare
        assert COMMANDS[command.name] == (command.module, command.help)
        assert "".join(f"{command.name} {command.help}".split()) in listing
        with pytest.raises(SystemExit) as exit_info:
            main([command.name, "--help"])
        assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("usage: hf-kan " + command.name)


def test_importing_the_patches_registers_the_backend():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert AttentionInterface._global_mapping["hf_kan"] is engine.backend.hf_kan_attention
    assert AttentionMaskInterface._global_mapping["hf_kan"] is engine.backend.hf_kan_mask
