"""Stand-ins for the three modules Transformers' common-test helpers import but its source distribution lacks.

``tests/test_modeling_common.py`` and ``tests/test_configuration_common.py`` import, relatively,
``exporters/test_export.py``, ``generation/test_utils.py`` and ``utils/test_configuration_utils.py``; only the
top-level ``tests/*.py`` files are in the sdist. :mod:`transformers_test_helpers` maps those three module names to
this one. What each stand-in leaves out:

- ``ExportTesterMixin`` (base class of ``ModelTesterMixin``): empty, so its export tests do not exist here:
  ``test_torch_export``, ``test_onnx_export``, ``test_openvino_export`` and ``test_executorch_export``. (In
  Transformers' own CI they are ``@slow`` and need onnxscript / onnxruntime / openvino / executorch.)
- ``GenerationTesterMixin``: empty. The common tests only check ``issubclass(test_class, GenerationTesterMixin)``,
  which must be False for models that cannot ``generate()``, as KAT and KArAt; nothing is disabled.
- ``config_common_kwargs``: one non-default value for every argument ``PreTrainedConfig`` itself takes in this
  release (``ConfigTester.check_config_arguments_init`` checks that a config keeps them). The hf-kan test module
  checks that the dict still covers every such field, so a new field in a later release fails loudly.
"""

from __future__ import annotations


class ExportTesterMixin:
    """Empty stand-in: no export tests (see the module docstring)."""


class GenerationTesterMixin:
    """Empty stand-in: the common tests only test subclassing against it (see the module docstring)."""


config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 3,
    "architectures": ["KATForImageClassification"],
    "id2label": {0: "zero"},
    "label2id": {"zero": 0},
    "problem_type": "regression",
}

# PreTrainedConfig fields that are not constructor arguments a model config is expected to keep as given
NOT_COMMON_KWARGS = ("transformers_version", "is_encoder_decoder")

__all__ = ["ExportTesterMixin", "GenerationTesterMixin", "NOT_COMMON_KWARGS", "config_common_kwargs"]
