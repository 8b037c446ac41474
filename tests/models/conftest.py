"""pytest markers that Transformers' common-test helpers put on their tests (see test_transformers_common.py);
registered here because the suite runs with ``--strict-markers``."""

TRANSFORMERS_TEST_MARKERS = {
    "accelerate_tests": "Transformers common test: needs accelerate's big-model utilities",
    "flash_attn_test": "Transformers common test: flash attention 2",
    "flash_attn_3_test": "Transformers common test: flash attention 3",
    "flash_attn_4_test": "Transformers common test: flash attention 4",
    "torch_compile_test": "Transformers common test: torch.compile",
}


def pytest_configure(config):
    for name, description in TRANSFORMERS_TEST_MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")
