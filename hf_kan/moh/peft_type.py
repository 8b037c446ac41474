"""``PeftType.MOH``: the ONLY place that touches PEFT's closed ``PeftType`` enum.

Why this shim exists: PEFT 0.21's ``register_peft_method`` only accepts names that are already members of its
closed ``PeftType`` enum (``ValueError: Unknown PEFT type``), and ``PeftModel`` code reads ``config.peft_type.value``
and compares ``peft_type`` against enum members. A third-party tuner therefore needs a real ``PeftType`` member
before it can be registered. We add one member, ``PeftType.MOH`` (value ``"MOH"``), by the same bookkeeping the
``enum`` module does for members created in the class body; ``registration.register_moh`` then calls PEFT's own
``register_peft_method``. Everything else in PEFT (``get_peft_model``, ``save_pretrained``,
``PeftModel.from_pretrained``, which looks the type up from the saved ``adapter_config.json`` string ``"MOH"``) then
works unchanged. Idempotent.

This module imports nothing from ``hf_kan.moh``; the MoH modules depend on each other one way only:
``peft_type`` <- ``config`` <- ``router`` / ``layer`` / ``skip`` <- ``model`` <- ``registration``.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType

MOH_NAME = "moh"
MOH_PREFIX = "moh_"


def moh_peft_type() -> PeftType:
    """Return ``PeftType.MOH``, adding that member to PEFT's closed enum the first time it is needed."""
    member = PeftType._member_map_.get(MOH_NAME.upper())
    if member is not None:
        return member
    value = MOH_NAME.upper()
    member = str.__new__(PeftType, value)
    member._name_ = value
    member._value_ = value
    member.__objclass__ = PeftType
    member.__init__(value)
    member._sort_order_ = len(PeftType._member_names_)
    # EnumType.__setattr__ forbids assigning members; type.__setattr__ makes ``PeftType.MOH`` resolve like any member.
    type.__setattr__(PeftType, value, member)
    PeftType._member_map_[value] = member
    PeftType._value2member_map_[value] = member
    PeftType._member_names_.append(value)
    return member


__all__ = ["MOH_NAME", "MOH_PREFIX", "moh_peft_type"]
