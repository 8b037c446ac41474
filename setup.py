"""Package discovery for the directory mapping in pyproject.toml.

``patches/`` and ``eval/`` live at the top of the repository but ship as
``hf_kan.patches`` and ``hf_kan.eval``; their subpackages are found here so that
adding a folder never needs an edit to the packaging metadata.
"""

from setuptools import find_packages, setup


def _mapped(folder: str, target: str) -> list[str]:
    found = find_packages(include=[folder, f"{folder}.*"])
    return [target + name[len(folder) :] for name in found]


packages = find_packages(include=["hf_kan", "hf_kan.*"])
packages += _mapped("patches", "hf_kan.patches") + _mapped("eval", "hf_kan.eval")
packages += ["hf_kan.model_cards"]

setup(packages=packages)
