"""The options of ``hf-kan vlm-train`` (:class:`VLMTrainingArguments`), apart from the trainer so that the model card
(``card.py``) can read their defaults without importing the trainer."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..data.shapes_vqa import QUESTION_TYPES
from ..errors import HFKanConfigError
from .modeling import TOWERS, VLMShape

DEFAULT_CURRICULUM = "0:1,0.04:2,0.08:3,0.12:4,0.16:6"


@dataclass
class VLMTrainingArguments:
    """Options of ``hf-kan vlm-train`` (each field is a ``--field-name`` flag); the defaults are the shipped recipe."""

    output_dir: str = field(default="outputs/shapes-vlm-kat", metadata={"help": "where the best model goes"})
    tower: str = field(default="kat", metadata={"help": "vision tower: kat (KAT) or vit (same-size CLIP ViT)"})
    mma: bool = field(default=False, metadata={"help": "train with modality-mutual attention (AKI) on"})
    # data
    train_size: int = field(default=60_000, metadata={"help": "training rows (Shapes VQA train split)"})
    validation_size: int = field(default=2_000, metadata={"help": "validation rows (model selection)"})
    test_size: int = field(default=5_000, metadata={"help": "test rows (scored once, at the end)"})
    data_seed: int = field(default=0, metadata={"help": "seed of the generated data set"})
    question_types: str = field(
        default=",".join(QUESTION_TYPES),
        metadata={"help": "comma-separated question types to train, select and test on (default: all five)"},
    )
    describe: bool = field(default=True, metadata={"help": "add the auxiliary 'describe' questions to training"})
    curriculum: str = field(
        default=DEFAULT_CURRICULUM,
        metadata={"help": "FRACTION:MAX_OBJECTS,... object-count stages ('' = all scenes from the start)"},
    )
    # model
    image_size: int = field(default=VLMShape.image_size, metadata={"help": "image side in pixels"})
    patch_size: int = field(default=VLMShape.patch_size, metadata={"help": "tower patch size"})
    vision_hidden_size: int = field(default=VLMShape.vision_hidden_size, metadata={"help": "tower width"})
    vision_layers: int = field(default=VLMShape.vision_layers, metadata={"help": "tower blocks"})
    vision_heads: int = field(default=VLMShape.vision_heads, metadata={"help": "tower attention heads"})
    text_hidden_size: int = field(default=VLMShape.text_hidden_size, metadata={"help": "Llama width"})
    text_layers: int = field(default=VLMShape.text_layers, metadata={"help": "Llama decoder layers"})
    text_heads: int = field(default=VLMShape.text_heads, metadata={"help": "Llama attention heads"})
    text_kv_heads: int = field(default=VLMShape.text_kv_heads, metadata={"help": "Llama key/value heads"})
    vision_pretrain_steps: int = field(
        default=0, metadata={"help": "steps of the first stage: tower + projector classify each cell (0 = skip)"}
    )
    # optimisation
    max_steps: int = field(default=20_000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=64, metadata={"help": "training batch size per process"})
    eval_batch_size: int = field(default=250, metadata={"help": "evaluation batch size per process"})
    learning_rate: float = field(default=2e-3, metadata={"help": "peak AdamW learning rate"})
    projector_lr_scale: float = field(default=3.0, metadata={"help": "projector learning rate / learning rate"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (matrices only)"})
    warmup_steps: int = field(default=500, metadata={"help": "linear warm-up steps"})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "gradient clipping norm (unset = none)"})
    eval_steps: int = field(default=1_000, metadata={"help": "evaluate on validation every N steps"})
    seed: int = field(default=0, metadata={"help": "seed of the initialisation and the batch order"})
    mixed_precision: str | None = field(
        default=None, metadata={"help": "no/fp16/bf16; unset = whatever `accelerate launch`/config says"}
    )
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads per process"})
    cpu: bool = field(default=False, metadata={"help": "force CPU even when a GPU is present"})
    progress_bar: bool = field(default=True, metadata={"help": "show a tqdm bar (main process only)"})
    save_model: bool = field(default=True, metadata={"help": "write the best model to output_dir"})
    init_from: str | None = field(
        default=None,
        metadata={"help": "continue from the weights of a model directory this trainer saved (tower and sizes must "
                  "match; the learning-rate schedule and the step count start afresh)"},
    )

    def __post_init__(self) -> None:
        if self.tower not in TOWERS:
            raise HFKanConfigError(f"tower={self.tower!r} is unknown; choose one of {', '.join(TOWERS)}")
        for name in ("train_size", "validation_size", "test_size", "max_steps", "batch_size", "eval_batch_size",
                     "eval_steps"):
            if getattr(self, name) < 1:
                raise HFKanConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0 or self.projector_lr_scale <= 0:
            raise HFKanConfigError("learning_rate and projector_lr_scale must be > 0")
        if self.warmup_steps < 0:
            raise HFKanConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        _ = self.shape  # VLMShape validates the model sizes
        _ = self.types  # the question types exist

    @property
    def types(self) -> tuple[str, ...]:
        """The evaluated question types (``question_types`` parsed)."""
        types = tuple(t.strip() for t in self.question_types.split(",") if t.strip())
        unknown = [t for t in types if t not in QUESTION_TYPES]
        if not types or unknown:
            raise HFKanConfigError(f"question_types={self.question_types!r}: choose from {', '.join(QUESTION_TYPES)}")
        return types

    @property
    def shape(self) -> VLMShape:
        return VLMShape(
            image_size=self.image_size, patch_size=self.patch_size, vision_hidden_size=self.vision_hidden_size,
            vision_layers=self.vision_layers, vision_heads=self.vision_heads,
            text_hidden_size=self.text_hidden_size, text_layers=self.text_layers, text_heads=self.text_heads,
            text_kv_heads=self.text_kv_heads,
        )


__all__ = ["DEFAULT_CURRICULUM", "VLMTrainingArguments"]
