"""KAT and KArAt under Transformers' own common model tests (``ModelTesterMixin``, ``ConfigTester``,
``BackboneTesterMixin``), set up the way Transformers' ViT tests set them up, with tiny configs.

The helpers come from the source distribution of the installed Transformers release, fetched and cached at
collection by :mod:`transformers_test_helpers` (a failed download fails collection, it never skips).

Every skip, and why it is right for these models (the mixin skips most of them itself, from the model's flags):

- no token inputs (pixel_values only): ``test_inputs_embeds``, ``test_inputs_embeds_matches_input_ids`` (skipped
  here); no vocabulary to resize (``test_resize_embeddings = False``): ``test_resize_tokens_embeddings``,
  ``test_resize_embeddings_untied``, ``test_resize_embeddings_untied_no_reinit_on_post_init`` and the four
  ``*_with_deepspeed*`` variants (which also need deepspeed); the position embedding is resized by interpolation
  (``interpolate_pos_encoding``), not by ``resize_position_embeddings``: ``test_resize_position_vector_embeddings``.
- no KV cache, no generation, no LM head: ``test_bc_cache_name_forward``, ``test_causal_lm_loss_honors_shift_labels``,
  ``test_encoder_decoder_loss_no_double_shift``.
- learned absolute position embedding, no RoPE: ``test_model_rope_scaling_frequencies``,
  ``test_model_rope_scaling_from_config``, ``test_model_rope_with_partial_rotation``, ``test_vision_axial_rope``.
- no mixture of experts: ``test_moe_models_record_router_logits``, ``test_output_router_logits_from_config``,
  ``test_eager_matches_batched_and_grouped_inference``.
- one config, no sub-models: ``test_attn_implementation_composite_models``,
  ``test_can_set_attention_dynamically_composite_model``, ``test_sdpa_can_dispatch_composite_models``,
  ``test_internal_model_config_and_subconfig_are_same``; full attention, no sliding window:
  ``test_sliding_window_mask``.
- no legacy checkpoint layout registered with Transformers' key-conversion mapping (timm checkpoints go through
  hf-kan's own converter): ``test_can_load_from_already_mapped_keys``, ``test_reverse_loading_mapping``.
- no tensor-parallel plan (a multi-GPU feature): ``test_tp_plan_matches_params``.
- KArAt only: its attention is the learnable Fourier-KArAt operator, not softmax, so it declares no SDPA / flash /
  flex support: every ``test_eager_matches_sdpa_inference_*``, ``test_sdpa_can_dispatch_non_composite_models``,
  ``test_can_set_attention_dynamically``; it keeps no module in fp32: ``test_keep_in_fp32_modules``,
  ``test_keep_in_fp32_modules_exist``, ``test_keep_in_fp32_modules_strict_also_hardcode_fp32``.
- hardware / optional packages (Transformers' own ``require_*`` decorators): a GPU or other accelerator (offload,
  device-context loading, flex attention with grads, SDPA-on-flash, torch.compile tests; the three ``@slow`` ones
  here, ``test_torch_compile_for_training``, also need one), several accelerators (``test_model_parallelism``),
  flash attention 2 / 3 / 4, the ``kernels`` library, Apple MPS.
"""

from __future__ import annotations

import dataclasses
import unittest
from unittest import mock

import pytest
import torch
from transformers import PreTrainedConfig
from transformers.models.auto import modeling_auto
from transformers_test_helpers import load_transformers_test_helpers
from transformers_test_stand_ins import NOT_COMMON_KWARGS, config_common_kwargs

import hf_kan  # noqa: F401  (registers the model types with the Auto classes)
from hf_kan.models.karat import KArAtConfig, KArAtForImageClassification, KArAtModel
from hf_kan.models.kat import KATBackbone, KATConfig, KATForImageClassification, KATModel

common = load_transformers_test_helpers()
ModelTesterMixin = common.ModelTesterMixin
ConfigTester = common.ConfigTester
BackboneTesterMixin = common.BackboneTesterMixin
floats_tensor = common.floats_tensor
ids_tensor = common.ids_tensor


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny models: one intra-op thread per xdist worker avoids oversubscribing a 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ViTLikeModelTester:
    """Tiny config and inputs for a ViT-shaped hf-kan family (KAT or KArAt): 16 px images, patch 4, so 17 tokens
    (16 patches + class token), width 32, 2 blocks of 4 heads, MLP width 48, dropout on as in the ViT tests."""

    config_class: type[PreTrainedConfig]

    def __init__(self, parent: unittest.TestCase, batch_size: int = 3, num_labels: int = 5, **config_overrides):
        self.parent = parent
        self.batch_size = batch_size
        self.num_labels = num_labels
        self.image_size = 16
        self.patch_size = 4
        self.num_channels = 3
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.intermediate_size = 48
        self.is_training = True
        self.seq_length = (self.image_size // self.patch_size) ** 2 + 1
        self.config_overrides = config_overrides

    def get_config(self) -> PreTrainedConfig:
        return self.config_class(
            image_size=self.image_size,
            patch_size=self.patch_size,
            num_channels=self.num_channels,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            hidden_dropout_prob=0.1,
            attention_probs_dropout_prob=0.1,
            num_labels=self.num_labels,
            **self.config_overrides,
        )

    def prepare_config_and_inputs(self):
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        labels = ids_tensor([self.batch_size], self.num_labels)
        return self.get_config(), pixel_values, labels

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values, _ = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}

    def create_and_check_model(self, model_class, config, pixel_values, labels):
        model = model_class(config).eval()
        with torch.no_grad():
            result = model(pixel_values)
        expected = (self.batch_size, self.seq_length, self.hidden_size)
        self.parent.assertEqual(result.last_hidden_state.shape, expected)
        self.parent.assertEqual(result.pooler_output.shape, (self.batch_size, self.hidden_size))

    def create_and_check_for_image_classification(self, model_class, config, pixel_values, labels):
        model = model_class(config).eval()
        with torch.no_grad():
            result = model(pixel_values, labels=labels)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.num_labels))
        self.parent.assertTrue(torch.isfinite(result.loss))


class KATModelTester(ViTLikeModelTester):
    config_class = KATConfig

    def __init__(self, parent, **kwargs):
        kwargs.setdefault("rational_groups", 4)
        kwargs.setdefault("out_features", ["stem", "stage2"])
        super().__init__(parent, **kwargs)


class KArAtModelTester(ViTLikeModelTester):
    config_class = KArAtConfig

    def __init__(self, parent, karat_sharing: str = "blockwise", **kwargs):
        super().__init__(parent, karat_sharing=karat_sharing, karat_grid_size=2, karat_rank=3, **kwargs)


def test_config_common_kwargs_stand_in_covers_pretrained_config():
    """The stand-in ``config_common_kwargs`` gives a non-default value for every ``PreTrainedConfig`` argument of the
    installed release, so ``ConfigTester.check_config_arguments_init`` checks them all."""
    default = PreTrainedConfig()
    fields = {f.name for f in dataclasses.fields(PreTrainedConfig)} | {"output_attentions"}
    assert sorted(fields - set(NOT_COMMON_KWARGS)) == sorted(config_common_kwargs)
    for key, value in config_common_kwargs.items():
        assert getattr(default, key) != value, key


# The common tests tell a model's role (base model, image classifier, backbone) by its class name in Transformers'
# built-in Auto tables (labels for the training tests, base-model checks); the Auto registrations hf-kan makes do not
# reach those name tables, so each test adds the hf-kan families to them for its own duration.
AUTO_NAME_TABLES = {
    "MODEL_MAPPING_NAMES": {"kat": "KATModel", "karat": "KArAtModel"},
    "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES": {
        "kat": "KATForImageClassification", "karat": "KArAtForImageClassification",
    },
    "MODEL_FOR_BACKBONE_MAPPING_NAMES": {"kat": "KATBackbone"},
}


def register_auto_names(test: unittest.TestCase) -> None:
    """Add the hf-kan classes to the built-in Auto name tables until ``test`` ends."""
    for table, names in AUTO_NAME_TABLES.items():
        patcher = mock.patch.dict(getattr(modeling_auto, table), names)
        patcher.start()
        test.addCleanup(patcher.stop)


def projection_grad(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """Gradient of the patch projection's weight for the sum of the model's first output (loss, last hidden state
    or, for a backbone, last feature map)."""
    model.zero_grad(set_to_none=True)
    outputs = model(**inputs)
    first = outputs.feature_maps[-1] if hasattr(outputs, "feature_maps") else outputs[0]
    first.sum().backward()
    return model.get_input_embeddings().projection.weight.grad.clone()


class ViTLikeCommonTests:
    """Overrides shared by the KAT and KArAt test classes (ViT-style: no token inputs)."""

    def setUp(self):
        super().setUp()
        register_auto_names(self)

    test_resize_embeddings = False  # patch embeddings: no vocabulary to resize
    test_torch_exportable = False  # the export tests are not in the sdist (see transformers_test_stand_ins)
    # the mixin runs this check only for models whose config file carries a copyright year >= 2023; hf-kan's files
    # carry none, so opt in
    test_can_init_all_missing_weights_before_2023 = True

    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skip(reason="vision model: takes pixel_values, has no inputs_embeds")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="vision model: takes pixel_values, has no inputs_embeds")
    def test_inputs_embeds_matches_input_ids(self):
        pass

    def test_enable_input_require_grads_with_gradient_checkpointing(self):
        # The common test reads `get_input_embeddings().weight`, which a patch embedding (a module around a
        # convolution, as in ViT) does not have, and then skips; this is the same check on the patch projection.
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
        for model_class in self.all_model_classes:
            model = model_class(config).train()
            inputs = self._prepare_for_class(inputs_dict, model_class, return_labels=True)
            baseline = projection_grad(model, inputs)
            self.assertGreater(baseline.abs().sum().item(), 0)
            model.activation_checkpointing_enable()
            model.enable_input_require_grads()
            torch.testing.assert_close(projection_grad(model, inputs), baseline, msg=model_class.__name__)

    def test_model_get_set_embeddings(self):
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            self.assertIsInstance(model.get_input_embeddings(), torch.nn.Module)
            output_embeddings = model.get_output_embeddings()
            self.assertTrue(output_embeddings is None or isinstance(output_embeddings, torch.nn.Linear))


class KATModelTest(ViTLikeCommonTests, ModelTesterMixin, unittest.TestCase):
    all_model_classes = (KATModel, KATForImageClassification, KATBackbone)

    def setUp(self):
        super().setUp()
        self.model_tester = KATModelTester(self)
        self.config_tester = ConfigTester(
            self, config_class=KATConfig, has_text_modality=False, hidden_size=40, num_attention_heads=5,
            rational_groups=5,
        )

    def test_model(self):
        self.model_tester.create_and_check_model(KATModel, *self.model_tester.prepare_config_and_inputs())

    def test_for_image_classification(self):
        self.model_tester.create_and_check_for_image_classification(
            KATForImageClassification, *self.model_tester.prepare_config_and_inputs()
        )


class KATBackboneTest(BackboneTesterMixin, unittest.TestCase):
    all_model_classes = (KATBackbone,)
    config_class = KATConfig
    has_attentions = True

    def setUp(self):
        register_auto_names(self)
        self.model_tester = KATModelTester(self)


class KArAtBlockwiseModelTest(ViTLikeCommonTests, ModelTesterMixin, unittest.TestCase):
    all_model_classes = (KArAtModel, KArAtForImageClassification)
    karat_sharing = "blockwise"

    def setUp(self):
        super().setUp()
        self.model_tester = KArAtModelTester(self, karat_sharing=self.karat_sharing)
        self.config_tester = ConfigTester(
            self, config_class=KArAtConfig, has_text_modality=False, hidden_size=40, num_attention_heads=5,
            karat_sharing=self.karat_sharing,
        )

    def test_model(self):
        self.model_tester.create_and_check_model(KArAtModel, *self.model_tester.prepare_config_and_inputs())

    def test_for_image_classification(self):
        self.model_tester.create_and_check_for_image_classification(
            KArAtForImageClassification, *self.model_tester.prepare_config_and_inputs()
        )


class KArAtUniversalModelTest(KArAtBlockwiseModelTest):
    karat_sharing = "universal"
