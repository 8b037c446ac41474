"""Continue-tune a causal language model into Mixture-of-Head attention, under ``accelerate launch`` or plain Python.

Command line::

    hf-kan moh-tune --output-dir runs/moh                       # embedded corpus, tiny Llama, 1 process
    accelerate launch --num_processes 1 -m hf_kan.moh.train --output-dir runs/moh
    accelerate launch --multi_gpu --num_processes 2 -m hf_kan.moh.train --output-dir runs/moh   # 2 processes

The model is a local directory / Hub id loaded with ``AutoModelForCausalLM`` (``--model``) or, by default, a tiny
Llama built from a config with a word-level tokenizer trained on the data (random weights: a smoke-test default
that needs no download). The data is the corpus shipped in ``hf_kan/data/moh_corpus.txt`` (a fixed split of its
lines: 80 % train, 10 % validation, 10 % test) or a ``datasets`` data set (``--dataset text --data-files a.txt``,
or a Hub name when online), tokenised, concatenated and cut into ``--seq-len`` blocks per split. MoH (``--router
query_norm`` or ``learned``) is wrapped around LoRA (``--lora-r``, 0 to disable); the loss is the LM loss plus
``moh_aux_loss`` (the weighted load-balance loss of the learned router).

Model selection follows :mod:`hf_kan.train.splits`: the LM loss on the validation split (carved from train when the
data set has none) is measured every ``--eval-steps`` steps and at the end; the adapter weights of the best
evaluation are kept (optional early stopping), and the test split, if any, is evaluated once on them after training.
The adapter (MoH routers and LoRA weights in one PEFT adapter) is written to ``output_dir`` with an hf-kan model
card (``README.md``), the tokenizer, the generated base model (``base_model/``, when built here) and
``metrics.json``. ``adapter_config.json`` names the base model (the absolute path of ``base_model/``, of a local
``--model`` directory, or the Hub id), so ``AutoPeftModelForCausalLM.from_pretrained(output_dir)`` and
``PeftModel.from_pretrained(base, output_dir)`` reload it offline (after ``import hf_kan``).

Several CPU processes: ``accelerate launch --multi_gpu --num_processes N`` (accelerate 1.15 starts N processes
with torchrun; ``--cpu --num_processes N`` starts only ONE process). Without GPUs accelerate would treat each of
those processes as a lone run, so this module creates the ``Accelerator`` with ``cpu=True`` when it sees
``WORLD_SIZE > 1`` and no device, which makes them one gloo (``MULTI_CPU``) group with a sharded data loader
(:func:`hf_kan.train.runtime.make_accelerator`); every process destroys the group before it exits.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import HFKanConfigError
from ..train.cli_args import add_dataclass_arguments, dataclass_from_namespace
from ..train.runtime import finish, is_rank_zero, make_accelerator, write_run_files
from ..train.splits import DEFAULT_SPLIT_SEED, DEFAULT_VALIDATION_FRACTION, resolve_splits, split_indices

# PEFT, Transformers and the MoH modules are imported where they are used: ``hf-kan moh-tune --help`` loads none.
logger = logging.getLogger(__name__)

CORPUS = "moh_corpus.txt"
CORPUS_TEST_FRACTION = 0.1
DESCRIPTION = (
    "Continue-tune a causal language model into Mixture-of-Head attention (MoH, arXiv 2410.11842) as a PEFT "
    "adapter: MoH routers wrapped around LoRA, trained with the LM loss plus the load-balance loss, selected on "
    "the validation loss, tested once at the end. Default: a tiny random Llama on the embedded corpus (a smoke "
    "test, no download). Several processes: accelerate launch -m hf_kan.moh.train ..."
)


@dataclass
class MoHTuneArguments:
    """Options of ``hf-kan moh-tune`` (each field is a ``--field-name`` flag)."""

    output_dir: str = field(default="moh-output", metadata={"help": "where the adapter and metrics are written"})
    model: str | None = field(default=None, metadata={"help": "causal-LM directory / Hub id; unset = a tiny Llama"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer directory / Hub id; unset = --model"})
    dataset: str | None = field(
        default=None, metadata={"help": "datasets name (e.g. 'text'); unset = the embedded corpus"}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "datasets config name"})
    data_files: str | None = field(default=None, metadata={"help": "data files for --dataset text/json/csv"})
    split: str = field(default="train", metadata={"help": "training split"})
    validation_split: str | None = field(
        default=None,
        metadata={
            "help": "split the adapter is selected on; unset = the first of validation/valid/val/dev, else "
            "--validation-fraction of the training texts are held out"
        },
    )
    validation_fraction: float = field(
        default=DEFAULT_VALIDATION_FRACTION, metadata={"help": "share of training texts held out for validation"}
    )
    test_split: str | None = field(
        default=None, metadata={"help": "split evaluated once after training; unset = 'test' if present"}
    )
    split_seed: int = field(default=DEFAULT_SPLIT_SEED, metadata={"help": "seed of the held-out splits"})
    text_column: str = field(default="text", metadata={"help": "column holding the text"})
    router: str = field(default="query_norm", metadata={"help": "query_norm (continue-tuning) or learned"})
    active_fraction: float = field(default=0.75, metadata={"help": "fraction of heads active per token"})
    num_shared_heads: int | None = field(
        default=None, metadata={"help": "always-on heads; unset = MoHConfig's default"}
    )
    top_k: int | None = field(default=None, metadata={"help": "routed heads per token (overrides the fraction)"})
    load_balance_weight: float = field(default=0.01, metadata={"help": "weight of the load-balance loss"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank on q/k/v/o projections; 0 = no LoRA"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    max_steps: int = field(default=30, metadata={"help": "optimizer steps"})
    eval_steps: int = field(default=10, metadata={"help": "evaluate on the validation split every N steps"})
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "stop after N evaluations in a row without improvement; unset = never"}
    )
    batch_size: int = field(default=8, metadata={"help": "blocks per process and step"})
    seq_len: int = field(default=32, metadata={"help": "tokens per block"})
    learning_rate: float = field(default=3e-3, metadata={"help": "AdamW learning rate"})
    seed: int = field(default=0, metadata={"help": "random seed (initialisation, shuffling)"})
    hidden_size: int = field(default=64, metadata={"help": "tiny default model: hidden size"})
    num_layers: int = field(default=2, metadata={"help": "tiny default model: decoder layers"})
    num_heads: int = field(default=8, metadata={"help": "tiny default model: attention heads"})
    num_kv_heads: int = field(default=4, metadata={"help": "tiny default model: key/value heads (GQA)"})
    cpu: bool = field(default=False, metadata={"help": "force CPU even when a GPU is present"})

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.batch_size < 1 or self.seq_len < 2 or self.eval_steps < 1:
            raise HFKanConfigError("max_steps, eval_steps and batch_size must be >= 1 and seq_len >= 2.")
        if self.lora_r < 0:
            raise HFKanConfigError(f"lora_r must be >= 0, got {self.lora_r}.")
        if self.lora_r == 0 and self.router == "query_norm":
            raise HFKanConfigError(
                "The query_norm router has no parameters; with --lora-r 0 nothing would train. "
                "Use --lora-r > 0 or --router learned."
            )
        if not 0.0 < self.validation_fraction < 1.0:
            raise HFKanConfigError(f"validation_fraction must be in (0, 1), got {self.validation_fraction}.")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise HFKanConfigError(f"early_stopping_patience must be >= 1, got {self.early_stopping_patience}.")


def embedded_corpus() -> list[str]:
    """The lines of the small English corpus shipped with hf-kan (``hf_kan/data/moh_corpus.txt``)."""
    text = (Path(__file__).resolve().parent.parent / "data" / CORPUS).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def embedded_corpus_splits(seed: int = DEFAULT_SPLIT_SEED) -> dict[str, list[str]]:
    """The embedded corpus split by lines: ``"test"`` (10 %), ``"validation"`` (10 %), ``"train"`` (the rest);
    fixed for a given ``seed``."""
    lines = embedded_corpus()
    rest, test = split_indices(len(lines), CORPUS_TEST_FRACTION, seed)
    train, validation = split_indices(len(rest), len(test), seed)
    return {
        "train": [lines[i] for i in rest[train]],
        "validation": [lines[i] for i in rest[validation]],
        "test": [lines[i] for i in test],
    }


def load_text_splits(args: MoHTuneArguments) -> Any:
    """The texts of each split (:class:`hf_kan.train.splits.Splits` of lists of strings): the embedded corpus, or
    ``args.text_column`` of a ``datasets`` data set, with a validation split carved from train when it has none."""
    if args.dataset is None:
        raw: dict[str, list[str]] = embedded_corpus_splits(args.split_seed)
    else:
        import datasets

        data = datasets.load_dataset(args.dataset, args.dataset_config, data_files=args.data_files)
        if isinstance(data, datasets.Dataset):
            data = datasets.DatasetDict({args.split: data})
        raw = {}
        for name, part in data.items():
            if args.text_column not in part.column_names:
                raise HFKanConfigError(
                    f"split {name!r} has no column {args.text_column!r} (columns: {part.column_names}); "
                    "pass --text-column."
                )
            raw[name] = [t for t in part[args.text_column] if t and t.strip()]
    return resolve_splits(
        raw,
        train_split=args.split,
        validation_split=args.validation_split,
        test_split=args.test_split,
        validation_fraction=args.validation_fraction,
        seed=args.split_seed,
    )


def build_word_tokenizer(texts: Sequence[str]) -> Any:
    """A lower-cased word-level fast tokenizer trained on ``texts`` (ids 0-2: <pad>, <bos>, <eos>, 3: <unk>)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=specials))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def build_tiny_llama(args: MoHTuneArguments, tokenizer: Any) -> Any:
    """A tiny random-weight Llama (GQA) sized by ``args`` for the tokenizer's vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=2 * args.hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        max_position_embeddings=max(2 * args.seq_len, 64),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def make_blocks(texts: Sequence[str], tokenizer: Any, seq_len: int) -> torch.Tensor:
    """Tokenise, join with EOS and cut into [num_blocks, seq_len] blocks (a partial last block is dropped)."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    num_blocks = len(ids) // seq_len
    if num_blocks == 0:
        raise HFKanConfigError(f"the data has {len(ids)} tokens, fewer than one block of --seq-len {seq_len}.")
    return torch.tensor(ids[: num_blocks * seq_len]).view(num_blocks, seq_len)


@torch.no_grad()
def evaluate_lm(model: Any, loader: Any, accelerator: Any, split: str) -> dict[str, float]:
    """``{split}_loss`` (mean next-token cross-entropy over every predicted token of the split, gathered across
    processes), ``{split}_perplexity`` = exp(loss) and ``{split}_blocks``. The load-balance loss is not included."""
    model.eval()
    total, tokens, blocks = 0.0, 0, 0
    for batch in loader:
        logits = model(input_ids=batch).logits.float()
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
        ).view(batch.shape[0], -1)
        per_block = accelerator.gather_for_metrics(losses.sum(1))  # drops the rows the sampler duplicated
        total += per_block.double().sum().item()
        blocks += per_block.numel()
        tokens += per_block.numel() * losses.shape[1]
    model.train()
    loss = total / max(tokens, 1)
    return {f"{split}_loss": loss, f"{split}_perplexity": math.exp(min(loss, 50.0)), f"{split}_blocks": blocks}


def _base_model_reference(args: MoHTuneArguments, generated_dir: str | None) -> str:
    """What ``adapter_config.json`` records as the base model: an absolute local path, or the Hub id."""
    if generated_dir is not None:
        return os.path.abspath(generated_dir)
    return os.path.abspath(args.model) if os.path.isdir(args.model) else args.model


def run_moh_tuning(args: MoHTuneArguments) -> dict[str, Any]:
    """Continue-tune into MoH as described in the module docstring; returns the metrics written to metrics.json."""
    accelerator = make_accelerator(cpu=args.cpu)
    try:
        metrics = _run_tuning(args, accelerator)
    except BaseException:
        finish(accelerator, wait=False)
        raise
    finish(accelerator)
    return metrics


def _run_tuning(args: MoHTuneArguments, accelerator: Any) -> dict[str, Any]:
    from accelerate.utils import set_seed
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..train.selection import ModelSelector
    from .card import write_adapter_card
    from .config import MoHConfig
    from .model import moh_aux_loss

    set_seed(args.seed)
    splits = load_text_splits(args)
    generated_dir = None
    if args.model is None:
        tokenizer = build_word_tokenizer(splits.train)  # vocabulary from the training texts only
        base = build_tiny_llama(args, tokenizer)
        generated_dir = os.path.join(args.output_dir, "base_model")
        if accelerator.is_main_process:
            # The generated random base is needed to reload the adapter: save it before PEFT wraps it.
            base.save_pretrained(generated_dir)
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
        base = AutoModelForCausalLM.from_pretrained(args.model)
    # PEFT writes this into adapter_config.json (base_model_name_or_path): what AutoPeftModel loads offline
    base.name_or_path = base.config.name_or_path = _base_model_reference(args, generated_dir)
    blocks = {"train": make_blocks(splits.train, tokenizer, args.seq_len)}
    for name, texts in (("validation", splits.validation), ("test", splits.test)):
        if texts is not None:
            try:
                blocks[name] = make_blocks(texts, tokenizer, args.seq_len)
            except HFKanConfigError as err:
                raise HFKanConfigError(
                    f"the {name} split is too small: {err} Use a smaller --seq-len or a larger "
                    "--validation-fraction."
                ) from err

    lora_config = None
    if args.lora_r > 0:
        lora_config = LoraConfig(
            r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
        )
    moh_config = MoHConfig(
        router=args.router,
        active_fraction=args.active_fraction,
        num_shared_heads=args.num_shared_heads,
        top_k=args.top_k,
        load_balance_weight=args.load_balance_weight,
        lora_config=lora_config,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, moh_config)

    loader = torch.utils.data.DataLoader(blocks["train"], batch_size=args.batch_size, shuffle=True, drop_last=False)
    validation_loader = torch.utils.data.DataLoader(blocks["validation"], batch_size=args.batch_size)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
    model, optimizer, loader, validation_loader = accelerator.prepare(model, optimizer, loader, validation_loader)
    peft_model = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        test = f"{len(splits.test)} test texts ({splits.test_source})" if splits.test is not None else "no test split"
        logger.info(
            f"MoH continue-tuning for {args.max_steps} steps on {accelerator.num_processes} process(es): "
            f"{len(splits.train)} train texts, {len(splits.validation)} validation ({splits.validation_source}), {test}"
        )

    selector = ModelSelector("validation_loss", "min", patience=args.early_stopping_patience, trainable_only=True)
    history: list[dict[str, Any]] = []

    def validate() -> None:
        result = evaluate_lm(model, validation_loader, accelerator, "validation") | {"step": step}
        history.append(result)
        selector.update(peft_model, result, step)

    model.train()
    step, losses, aux_losses = 0, [], []
    progress = tqdm(total=args.max_steps, desc="moh-tune", disable=not accelerator.is_local_main_process)
    while step < args.max_steps and not selector.should_stop:
        for batch in loader:
            out = model(input_ids=batch, labels=batch)
            aux = moh_aux_loss(peft_model)
            loss = out.loss + aux
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            lm_loss = accelerator.reduce(out.loss.detach(), reduction="mean").item()
            losses.append(lm_loss)
            aux_losses.append(float(aux.detach()))
            progress.update(1)
            progress.set_postfix(loss=f"{lm_loss:.3f}")
            if step % args.eval_steps == 0:
                validate()
            if step >= args.max_steps or selector.should_stop:
                break
    progress.close()
    if not history or history[-1]["step"] != step:
        validate()

    # the selected adapter; the test split is seen here for the first and only time
    selector.restore(peft_model)
    test_metrics: dict[str, Any] = {"test_loss": None, "test_perplexity": None, "test_blocks": 0}
    if "test" in blocks:
        test_loader = accelerator.prepare(torch.utils.data.DataLoader(blocks["test"], batch_size=args.batch_size))
        test_metrics = evaluate_lm(model, test_loader, accelerator, "test")
    best = selector.best_metrics
    metrics = {
        **test_metrics,
        "validation_loss": best["validation_loss"],
        "validation_perplexity": best["validation_perplexity"],
        "validation_blocks": best["validation_blocks"],
        "best_step": selector.best_step,
        "stopped_early": selector.should_stop,
        "selection": selector.summary(),
        "validation_source": splits.validation_source,
        "test_source": splits.test_source,
        "steps": step,
        "num_processes": accelerator.num_processes,
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "final_aux_loss": aux_losses[-1],
        "router": args.router,
        "active_fraction": args.active_fraction,
        "lora_r": args.lora_r,
        "history": history,
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        peft_model.eval()
        peft_model.save_pretrained(args.output_dir)
        tokenizer.save_pretrained(args.output_dir)
        write_adapter_card(peft_model, args.output_dir, args=args, metrics=metrics)
        write_run_files(args.output_dir, metrics=metrics, args=args)
        test_text = f"test loss {metrics['test_loss']:.4f}" if metrics["test_loss"] is not None else "no test split"
        logger.info(
            f"selected step {selector.best_step} (validation loss {best['validation_loss']:.4f}); {test_text}; "
            f"adapter written to {args.output_dir}"
        )
    return metrics


def _run(namespace: argparse.Namespace) -> int:
    metrics = run_moh_tuning(dataclass_from_namespace(MoHTuneArguments, namespace))
    if is_rank_zero():
        print(json.dumps({k: v for k, v in metrics.items() if k != "history"}))
    return 0


def add_subparser(subparsers: Any) -> None:
    """Add ``hf-kan moh-tune``."""
    parser = subparsers.add_parser(
        "moh-tune",
        help="continue-tune a causal LM into Mixture-of-Head attention (a PEFT adapter)",
        description=DESCRIPTION,
    )
    add_dataclass_arguments(parser, MoHTuneArguments)
    parser.set_defaults(func=_run)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for ``python -m hf_kan.moh.train`` / ``accelerate launch -m hf_kan.moh.train``."""
    from ..cli import HelpFormatter, run_command

    parser = argparse.ArgumentParser(prog="hf_kan.moh.train", description=DESCRIPTION, formatter_class=HelpFormatter)
    add_dataclass_arguments(parser, MoHTuneArguments)
    parser.set_defaults(func=_run)
    return run_command(parser.prog, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
