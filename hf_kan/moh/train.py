"""Continue-tune a causal language model into Mixture-of-Head attention, under ``accelerate launch`` or plain Python.

Command line::

    hf-kan moh-tune --output-dir runs/moh                       # embedded corpus, tiny Llama, 1 process
    accelerate launch --num_processes 1 -m hf_kan.moh.train --output-dir runs/moh
    accelerate launch --multi_gpu --num_processes 2 -m hf_kan.moh.train --output-dir runs/moh   # 2 processes

The model is a local directory / Hub id loaded with ``AutoModelForCausalLM`` (``--model``) or, by default, a tiny
Llama built from a config with a word-level tokenizer trained on the data (random weights: a smoke-test default
that needs no download). The data is the corpus shipped in ``hf_kan/data/moh_corpus.txt`` or a ``datasets`` data set
(``--dataset text --data-files a.txt``, or a Hub name when online), tokenised, concatenated and cut into
``--seq-len`` blocks. MoH (``--router query_norm`` or ``learned``) is wrapped around LoRA (``--lora-r``, 0 to
disable); the loss is the LM loss plus ``moh_aux_loss`` (the weighted load-balance loss of the learned router).
The adapter (MoH routers and LoRA weights in one PEFT adapter, reloadable with ``PeftModel.from_pretrained``) is
written to ``output_dir`` with the tokenizer, the generated base model (``base_model/``, when built here) and
``metrics.json``.

Several CPU processes: ``accelerate launch --multi_gpu --num_processes N`` (accelerate 1.15 starts N processes
with torchrun; ``--cpu --num_processes N`` starts only ONE process). Without GPUs accelerate would treat each of
those processes as a lone run, so this module creates the ``Accelerator`` with ``cpu=True`` when it sees
``WORLD_SIZE > 1`` and no device, which makes them one gloo (``MULTI_CPU``) group with a sharded data loader
(:func:`hf_kan.train.runtime.make_accelerator`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

from ..errors import HFKanConfigError
from ..train.cli_args import add_dataclass_arguments, dataclass_from_namespace
from ..train.runtime import is_rank_zero, make_accelerator, write_run_files

logger = logging.get_logger(__name__)

CORPUS = "moh_corpus.txt"


@dataclass
class MoHTuneArguments:
    """Options of ``hf-kan moh-tune`` (each field is a ``--field-name`` flag)."""

    output_dir: str = field(default="moh-output", metadata={"help": "where the adapter and metrics are written"})
    model: str | None = field(default=None, metadata={"help": "causal-LM directory / Hub id; default: tiny Llama"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer directory / Hub id; default: --model"})
    dataset: str | None = field(default=None, metadata={"help": "datasets name (e.g. 'text'); default: corpus"})
    dataset_config: str | None = field(default=None, metadata={"help": "datasets config name"})
    data_files: str | None = field(default=None, metadata={"help": "data files for --dataset text/json/csv"})
    split: str = field(default="train", metadata={"help": "dataset split"})
    text_column: str = field(default="text", metadata={"help": "column holding the text"})
    router: str = field(default="query_norm", metadata={"help": "query_norm (continue-tuning) or learned"})
    active_fraction: float = field(default=0.75, metadata={"help": "fraction of heads active per token"})
    num_shared_heads: int | None = field(default=None, metadata={"help": "always-on heads (default H // 2)"})
    top_k: int | None = field(default=None, metadata={"help": "routed heads per token (overrides fraction)"})
    load_balance_weight: float = field(default=0.01, metadata={"help": "weight of the load-balance loss"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank on q/k/v/o projections; 0 = no LoRA"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    max_steps: int = field(default=30, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "blocks per process and step"})
    seq_len: int = field(default=32, metadata={"help": "tokens per block"})
    learning_rate: float = field(default=3e-3, metadata={"help": "AdamW learning rate"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    hidden_size: int = field(default=64, metadata={"help": "tiny default model: hidden size"})
    num_layers: int = field(default=2, metadata={"help": "tiny default model: decoder layers"})
    num_heads: int = field(default=8, metadata={"help": "tiny default model: attention heads"})
    num_kv_heads: int = field(default=4, metadata={"help": "tiny default model: key/value heads (GQA)"})
    cpu: bool = field(default=False, metadata={"help": "force CPU even when a GPU is present"})

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.batch_size < 1 or self.seq_len < 2:
            raise HFKanConfigError("max_steps and batch_size must be >= 1 and seq_len >= 2.")
        if self.lora_r < 0:
            raise HFKanConfigError(f"lora_r must be >= 0, got {self.lora_r}.")
        if self.lora_r == 0 and self.router == "query_norm":
            raise HFKanConfigError(
                "The query_norm router has no parameters; with --lora-r 0 nothing would train. "
                "Use --lora-r > 0 or --router learned."
            )


def embedded_corpus() -> list[str]:
    """The lines of the small English corpus shipped with hf-kan (``hf_kan/data/moh_corpus.txt``)."""
    text = (Path(__file__).resolve().parent.parent / "data" / CORPUS).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_texts(args: MoHTuneArguments) -> list[str]:
    """The training texts: the embedded corpus, or ``args.text_column`` of a ``datasets`` split."""
    if args.dataset is None:
        return embedded_corpus()
    import datasets

    data = datasets.load_dataset(args.dataset, args.dataset_config, data_files=args.data_files, split=args.split)
    if args.text_column not in data.column_names:
        raise HFKanConfigError(
            f"dataset has no column {args.text_column!r} (columns: {data.column_names}); pass --text-column."
        )
    return [t for t in data[args.text_column] if t and t.strip()]


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


def run_moh_tuning(args: MoHTuneArguments) -> dict[str, Any]:
    """Continue-tune into MoH as described in the module docstring; returns the metrics written to metrics.json."""
    from accelerate.utils import set_seed
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .config import MoHConfig
    from .model import moh_aux_loss

    accelerator = make_accelerator(cpu=args.cpu)
    set_seed(args.seed)
    texts = load_texts(args)
    if args.model is None:
        tokenizer = build_word_tokenizer(texts)
        base = build_tiny_llama(args, tokenizer)
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
        base = AutoModelForCausalLM.from_pretrained(args.model)
    blocks = make_blocks(texts, tokenizer, args.seq_len)
    if args.model is None and accelerator.is_main_process:
        # The generated random base is needed to reload the adapter: save it before PEFT wraps it.
        base.save_pretrained(os.path.join(args.output_dir, "base_model"))

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

    loader = torch.utils.data.DataLoader(blocks, batch_size=args.batch_size, shuffle=True, drop_last=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    peft_model = accelerator.unwrap_model(model)

    model.train()
    step, losses, aux_losses = 0, [], []
    progress = tqdm(total=args.max_steps, desc="moh-tune", disable=not accelerator.is_local_main_process)
    while step < args.max_steps:
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
            if step >= args.max_steps:
                break
    progress.close()

    metrics = {
        "steps": step,
        "num_processes": accelerator.num_processes,
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "final_aux_loss": aux_losses[-1],
        "router": args.router,
        "active_fraction": args.active_fraction,
        "lora_r": args.lora_r,
        "perplexity_final": math.exp(min(losses[-1], 50.0)),
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        peft_model.eval()
        peft_model.save_pretrained(args.output_dir)
        tokenizer.save_pretrained(args.output_dir)
        write_run_files(args.output_dir, metrics=metrics, args=args)
        logger.info("MoH adapter written to %s: %s", args.output_dir, metrics)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def _run(namespace: argparse.Namespace) -> int:
    metrics = run_moh_tuning(dataclass_from_namespace(MoHTuneArguments, namespace))
    if is_rank_zero():
        print(json.dumps(metrics))
    return 0


def add_subparser(subparsers: Any) -> None:
    """Add ``hf-kan moh-tune``."""
    parser = subparsers.add_parser("moh-tune", help="continue-tune a causal LM into Mixture-of-Head attention")
    add_dataclass_arguments(parser, MoHTuneArguments)
    parser.set_defaults(func=_run)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for ``python -m hf_kan.moh.train`` / ``accelerate launch -m hf_kan.moh.train``."""
    parser = argparse.ArgumentParser(prog="hf_kan.moh.train", description=__doc__.split("\n\n")[0])
    add_dataclass_arguments(parser, MoHTuneArguments)
    return _run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
