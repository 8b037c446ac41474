"""The lmms-free evaluation runner: a vision-language model with hf-kan patches, batched generation, log-likelihoods
and a per-sample efficiency record.

``Runner`` wraps a loaded model and its processor. It formats each :class:`EvalSample` (images + question) with the
processor's chat template, runs left-padded batches through ``generate`` and returns one :class:`Generation` per
sample: the answer text, its token ids, an :class:`EfficiencyRecord` and the batch's timings.

Efficiency is read from ``hf_kan.patches.efficiency_report`` of the sample's own prefill, so the figures are exact per
sample (no padding, no batch mates): for a batch of one it is the ``generate`` call's prefill; in larger batches the
runner runs one extra batch-of-one prefill per sample (``efficiency=False`` skips it). The record holds

- ``visual_tokens``: image/video placeholder tokens in the prompt (N);
- ``visual_tokens_kept``: visual tokens still present in the last decoder layer;
- ``visual_token_budget``: mean over decoder layers of (visual tokens in that layer) / N, the fraction of the
  visual-token work kept (1.0 when nothing is dropped or the sample has no visual tokens);
- ``prefill_flops``: analytical decoder FLOPs of the prefill; ``kv_cache_bytes``: bytes of the KV cache after it;
- ``tokens_per_layer`` and, with DyVTE, ``exit_layer`` (the layer after which the visual tokens exited, -1: never).

Visual tokens kept in layer l = real rows entering layer l minus the sample's text tokens (the patches drop only
visual tokens).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers.utils import logging

from ..errors import HFKanConfigError, UnsupportedModelError
from .settings import PatchSetting

logger = logging.get_logger(__name__)

#: patches under which a continuation's log-likelihood is not defined by a plain forward (see ``loglikelihood``)
LOGLIKELIHOOD_BLOCKERS = ("prune", "dyvte")


@dataclass
class EvalSample:
    """One question about zero or more images. ``answer`` is the reference (None when unknown); ``id`` and ``meta``
    are carried through to the results (e.g. a question type used to group accuracies)."""

    question: str
    images: list = field(default_factory=list)
    answer: str | None = None
    id: Any = None
    meta: dict = field(default_factory=dict)


@dataclass
class EfficiencyRecord:
    """Efficiency of one sample's prefill (see the module docstring)."""

    visual_tokens: int
    visual_tokens_kept: int
    visual_token_budget: float
    prefill_flops: float
    kv_cache_bytes: int
    tokens_per_layer: list[int]
    exit_layer: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Generation:
    """The runner's answer to one sample. ``timing`` describes the batch the sample ran in: ``batch_size``,
    ``prefill_s`` (from the ``generate`` call to the end of its first forward, image encoding included),
    ``decode_s`` (the remaining steps) and ``new_tokens`` (decode steps of the batch)."""

    text: str
    token_ids: list[int]
    efficiency: EfficiencyRecord | None
    timing: dict[str, float]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _truncate(text: str, until: Sequence[str] | None) -> str:
    """``text`` cut at the first occurrence of any stop string in ``until`` (empty strings are ignored)."""
    for stop in until or ():
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text


def load_model(path: str, *, dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
               **from_pretrained_kwargs: Any):
    """Load the vision-language model at ``path`` (a local directory or Hub id) with its text attention on
    ``"hf_kan"`` and its saved patches re-attached (``hf_kan.patches.from_pretrained``), plus its processor.

    Returns ``(model, processor)``; the model is in eval mode on ``device`` (default: CPU).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .. import patches

    kwargs = dict(from_pretrained_kwargs)
    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise HFKanConfigError(f"unknown dtype {dtype!r}; use a torch dtype name such as 'float32' or 'bfloat16', "
                                   "or 'auto'")
        dtype = getattr(torch, dtype)
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = patches.from_pretrained(AutoModelForImageTextToText, path, **kwargs)
    model.to(torch.device(device) if device is not None else torch.device("cpu")).eval()
    processor = AutoProcessor.from_pretrained(path)
    return model, processor


class Runner:
    """Evaluate a patched vision-language model sample by sample, batched.

    Args:
        model: a model of a family ``hf_kan.patches`` supports, loaded with the text attention on ``"hf_kan"``
            (``load_model`` or ``Runner.from_pretrained`` do that).
        processor: its processor (tokenizer + image processor, with a chat template; without one, prompts are the
            image placeholders followed by the question).
        batch_size: samples per ``generate`` / log-likelihood forward (left-padded).
        max_new_tokens: default answer length.
        efficiency: record an :class:`EfficiencyRecord` per sample.
        progress: show a tqdm progress bar.
    """

    def __init__(self, model, processor, *, batch_size: int = 1, max_new_tokens: int = 16, efficiency: bool = True,
                 progress: bool = False):
        from .. import patches

        if int(batch_size) < 1:
            raise HFKanConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.tokenizer.padding_side = "left"
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.efficiency = efficiency
        self.progress = progress
        self.saved_patches = patches.status(model)["patches"]
        """the patch options saved in the checkpoint (``None`` fields of a ``PatchSetting`` fall back to these)"""
        self.setting = PatchSetting(name="checkpoint")
        ids = (getattr(model.config, "image_token_id", None), getattr(model.config, "video_token_id", None))
        self._visual_ids = [i for i in ids if i is not None]

    @classmethod
    def from_pretrained(cls, path: str, *, setting: PatchSetting | str | None = None, dtype=None, device=None,
                        **runner_kwargs: Any) -> Runner:
        """``Runner(*load_model(path, dtype=dtype, device=device), **runner_kwargs)``, then :meth:`apply`
        ``setting``."""
        model, processor = load_model(path, dtype=dtype, device=device)
        runner = cls(model, processor, **runner_kwargs)
        if setting is not None:
            runner.apply(setting)
        return runner

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------------------------------------- patches
    def apply(self, setting: PatchSetting | str):
        """Switch the model to ``setting`` (a :class:`PatchSetting` or its text form); returns the ``PatchConfig``."""
        from .. import patches

        setting = PatchSetting.parse(setting)
        config = patches.apply(self.model, processor=self.processor, **setting.patch_arguments(self.saved_patches))
        self.setting = setting
        return config

    def active_patches(self) -> list[str]:
        from .. import patches

        return list(patches.status(self.model)["active"])

    # ------------------------------------------------------------------------------------------------- inputs
    def format_prompt(self, question: str, num_images: int) -> str:
        """The prompt text of one user turn (``num_images`` image placeholders, then ``question``) ending where the
        assistant's answer starts: the processor's chat template, else the tokenizer's, else
        ``"<image> ... <image> question"``. A question that already holds its ``num_images`` image placeholders (as
        some lmms-eval tasks write them) gets none added."""
        image_token = getattr(self.processor, "image_token", None) or "<image>"
        if num_images and question.count(image_token) == num_images:
            num_images = 0
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        template = getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        if template is not None and hasattr(self.processor, "apply_chat_template"):
            return self.processor.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                                      tokenize=False)
        return " ".join([image_token] * num_images + [question])

    def _encode(self, texts: list[str], samples: Sequence[EvalSample]) -> dict[str, torch.Tensor]:
        images = [list(s.images) for s in samples]
        kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
        if any(images):
            kwargs["images"] = [im for ims in images for im in ims]
        inputs = self.processor(**kwargs)
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in inputs.items()}

    def _batches(self, items: Sequence, desc: str) -> Iterator[tuple[int, Sequence]]:
        from tqdm.auto import tqdm

        starts = range(0, len(items), self.batch_size)
        for start in tqdm(starts, desc=desc, disable=not self.progress, unit="batch"):
            yield start, items[start:start + self.batch_size]

    # ------------------------------------------------------------------------------------------------- generate
    @torch.no_grad()
    def generate(self, samples: Sequence[EvalSample], *, max_new_tokens: int | None = None,
                 until: Sequence[str] | None = None, **generate_kwargs: Any) -> list[Generation]:
        """Answer every sample (greedy unless ``generate_kwargs`` say otherwise), in order, ``batch_size`` at a time.

        The answer is the decoded new tokens (special tokens skipped), cut at the first string of ``until`` and
        stripped. ``generate_kwargs`` go to ``model.generate`` (e.g. ``do_sample``, ``num_beams``).
        """
        max_new = self.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        generate_kwargs.setdefault("do_sample", False)
        out: list[Generation] = []
        for _, batch in self._batches(samples, "generate"):
            out += self._generate_batch(batch, max_new, until, generate_kwargs)
        return out

    def _generate_batch(self, batch: Sequence[EvalSample], max_new: int, until, generate_kwargs) -> list[Generation]:
        texts = [self.format_prompt(s.question, len(s.images)) for s in batch]
        inputs = self._encode(texts, batch)
        device = self.device
        marks: list[float] = []

        def mark_first_forward(module, args, output):
            if not marks:
                _synchronize(device)
                marks.append(time.perf_counter())

        handle = self.model.register_forward_hook(mark_first_forward)
        try:
            _synchronize(device)
            start = time.perf_counter()
            result = self.model.generate(**inputs, max_new_tokens=max_new, return_dict_in_generate=True,
                                         pad_token_id=self.tokenizer.pad_token_id, **generate_kwargs)
            _synchronize(device)
            end = time.perf_counter()
        finally:
            handle.remove()
        first = marks[0] if marks else end
        new_ids = result.sequences[:, inputs["input_ids"].shape[1]:]
        timing = {"batch_size": len(batch), "prefill_s": first - start, "decode_s": end - first,
                  "new_tokens": int(new_ids.shape[1])}
        if not self.efficiency:
            records: list[EfficiencyRecord | None] = [None] * len(batch)
        elif len(batch) == 1:
            records = [self._efficiency(result, inputs["input_ids"], inputs["attention_mask"])]
        else:
            records = [self._sample_efficiency(s) for s in batch]
        gens = []
        for b in range(len(batch)):
            ids = new_ids[b].tolist()
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            gens.append(Generation(_truncate(text, until).strip(), ids, records[b], dict(timing)))
        return gens

    # ------------------------------------------------------------------------------------------------- efficiency
    def _sample_efficiency(self, sample: EvalSample) -> EfficiencyRecord:
        """The efficiency record of ``sample``'s own batch-of-one prefill."""
        inputs = self._encode([self.format_prompt(sample.question, len(sample.images))], [sample])
        output = self.model(**inputs, use_cache=True)
        return self._efficiency(output, inputs["input_ids"], inputs["attention_mask"])

    def _efficiency(self, output, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> EfficiencyRecord:
        from .. import patches

        report = patches.efficiency_report(self.model, output)
        real = attention_mask[0].bool()
        visual = int(torch.isin(input_ids[0][real], torch.tensor(self._visual_ids, device=input_ids.device)).sum())
        text = int(real.sum()) - visual
        kept = [max(n - text, 0) for n in report.tokens_per_layer]
        budget = sum(kept) / (len(kept) * visual) if visual and kept else 1.0
        exit_layer = None
        if "dyvte" in self.active_patches():
            exits = patches.exit_layers(output)
            exit_layer = None if exits is None else int(exits[0])
        return EfficiencyRecord(visual_tokens=visual, visual_tokens_kept=kept[-1] if kept else visual,
                                visual_token_budget=float(budget), prefill_flops=float(report.flops),
                                kv_cache_bytes=int(report.kv_cache_bytes),
                                tokens_per_layer=list(report.tokens_per_layer), exit_layer=exit_layer)

    # ------------------------------------------------------------------------------------------------- likelihood
    @torch.no_grad()
    def loglikelihood(self, samples: Sequence[EvalSample], continuations: Sequence[str]) -> list[tuple[float, bool]]:
        """For each sample, ``(log p(continuation | prompt), is_greedy)``: the summed log-probability of the
        continuation's tokens after the formatted prompt, and whether greedy decoding would produce exactly them.

        The continuation is appended to the prompt text (write a leading space where the tokenizer needs one).
        Refused (``UnsupportedModelError``) while token pruning or DyVTE is active: they choose the visual tokens to
        keep from the last prompt position, which in a forward over prompt + continuation is the continuation itself,
        and their logits cover only the kept rows; a score computed that way is not the one ``generate`` acts on.
        """
        if len(samples) != len(continuations):
            raise HFKanConfigError(f"got {len(samples)} samples but {len(continuations)} continuations")
        blockers = [p for p in self.active_patches() if p in LOGLIKELIHOOD_BLOCKERS]
        if blockers:
            raise UnsupportedModelError(
                f"loglikelihood is not defined under the active patch(es) {blockers}: they select the visual tokens "
                "from the last prompt position, which in a forward over prompt + continuation would be the answer "
                "itself. Evaluate with generation tasks (generate_until), or turn them off "
                f"({', '.join(f'{p}=false' for p in blockers)})."
            )
        pairs = list(zip(samples, continuations))
        out: list[tuple[float, bool]] = []
        for _, batch in self._batches(pairs, "loglikelihood"):
            prompts = [self.format_prompt(s.question, len(s.images)) for s, _ in batch]
            full = [p + c for p, (_, c) in zip(prompts, batch)]
            lengths = [self._continuation_length(p, f) for p, f in zip(prompts, full)]
            inputs = self._encode(full, [s for s, _ in batch])
            logits = self.model(**inputs, use_cache=False).logits.float()
            ids = inputs["input_ids"]
            for b, n in enumerate(lengths):
                logprobs = torch.log_softmax(logits[b, -n - 1:-1], dim=-1)
                target = ids[b, -n:]
                score = logprobs.gather(-1, target[:, None]).sum().item()
                out.append((float(score), bool((logprobs.argmax(-1) == target).all())))
        return out

    def _continuation_length(self, prompt: str, full: str) -> int:
        n_prompt = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        n_full = len(self.tokenizer(full, add_special_tokens=False)["input_ids"])
        if n_full <= n_prompt:
            raise HFKanConfigError(f"the continuation adds no tokens to the prompt {prompt!r}")
        return n_full - n_prompt


__all__ = ["EfficiencyRecord", "EvalSample", "Generation", "LOGLIKELIHOOD_BLOCKERS", "Runner", "load_model"]
