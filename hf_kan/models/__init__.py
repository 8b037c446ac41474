"""Model families hf-kan registers with the Transformers Auto classes.

Importing a family's package registers it (idempotent, ``exist_ok=True``).
"""

from . import karat, kat  # noqa: F401,E402  (registers model_types "karat" and "kat")
