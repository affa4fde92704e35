"""Packed fine-tuning examples kept apart: a block-diagonal mask over packed windows vs one example
per row (padded), against plain packing (attention crossing examples) as the baseline.

The model is the Llama-shaped base of bench/lora_vs_full.py (~30M parameters), the data its chat
rows: once short (one exchange, ~41 tokens), once of mixed lengths (1-8 exchanges). Each way does forward + backward over the same examples with 2 threads;
the figure is real (non-padding) tokens per second, median of 10 batches after 2.
Run: python bench/packed_attention.py
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from common import save_result, scratch
from lora_vs_full import base_model, chat_rows

from bigray.config import FinetuneDataConfig, TextDataConfig
from bigray.data.documents import load_tokenizer
from bigray.data.finetune import prepare_finetune_data
from bigray.data.text import prepare_text
from bigray.train.gpt import isolated_examples

BLOCK, ROWS = 256, 8


def tokens_per_s(model, batches) -> float:
    """Median real tokens/s of forward + backward over ``batches`` of (kwargs, real token count)."""
    times = []
    for kwargs, real in batches:
        t0 = time.perf_counter()
        model(**kwargs).logits.float().mean().backward()
        times.append(real / (time.perf_counter() - t0))
        model.zero_grad(set_to_none=True)
    return statistics.median(times[2:])


def measure(model, data) -> dict:
    """The three ways over the same examples of one dataset; prints and returns tokens/s and ratios."""
    end = load_tokenizer(data.tokenizer_dir).eos_token_id
    tokens = torch.from_numpy(np.asarray(data.tokens("train")).astype(np.int64))
    starts = torch.from_numpy(np.asarray(data.example_starts("train")).astype(bool))
    n_batches = 12
    packed = [
        (
            tokens[i * ROWS * BLOCK : (i + 1) * ROWS * BLOCK].view(ROWS, BLOCK),
            starts[i * ROWS * BLOCK : (i + 1) * ROWS * BLOCK].view(ROWS, BLOCK),
        )
        for i in range(n_batches)
    ]
    # The same tokens as whole examples, one per row, padded to the longest in each batch.
    firsts = starts.nonzero().flatten().tolist() + [len(tokens)]
    examples = [tokens[a:b] for a, b in zip(firsts, firsts[1:])]
    per_row, i = [], 0
    for _ in range(n_batches):
        group, count = [], 0
        while count < ROWS * BLOCK:
            group.append(examples[i])
            count, i = count + len(examples[i]), i + 1
        width = max(len(e) for e in group)
        ids = torch.stack([torch.cat([e, e.new_full((width - len(e),), end)]) for e in group])
        mask = torch.stack([torch.arange(width) < len(e) for e in group]).long()
        per_row.append(({"input_ids": ids, "attention_mask": mask}, count))
    rows = {
        "packed, attention crosses examples (baseline)": tokens_per_s(
            model, [({"input_ids": x}, x.numel()) for x, _ in packed]
        ),
        "packed, block-diagonal mask + restarted positions": tokens_per_s(
            model,
            [
                (dict(zip(("attention_mask", "position_ids"), isolated_examples(first)), input_ids=x), x.numel())
                for x, first in packed
            ],
        ),
        "one example per row, padded": tokens_per_s(model, per_row),
    }
    baseline = rows["packed, attention crosses examples (baseline)"]
    mean_len = statistics.mean(len(e) for e in examples)
    print(
        f"\nreal tokens/s, forward + backward, Llama-shaped ~30M, block {BLOCK} x {ROWS} rows, chat examples of {mean_len:.0f} tokens on average"
    )
    for name, value in rows.items():
        print(f"{name:52s} {value:9.0f} tok/s  x{value / baseline:.3f}")
    return {
        "mean_example_tokens": round(mean_len, 1),
        "tokens_per_s": {k: round(v) for k, v in rows.items()},
        "ratio_to_baseline": {k: round(v / baseline, 3) for k, v in rows.items()},
    }


def main() -> dict:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    tmp = scratch("packed-attention")
    text, _ = prepare_text(TextDataConfig(cache_dir=str(tmp / "text"), max_chars=2_000_000))
    base = base_model(tmp / "base", text.tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(str(base), attn_implementation="sdpa").train()
    result = {"benchmark": "packed_attention", "block": BLOCK, "rows": ROWS}
    for exchanges in (1, 8):
        rows_file = chat_rows(tmp / f"chat-{exchanges}.jsonl", max_exchanges=exchanges)
        data = prepare_finetune_data(
            FinetuneDataConfig(format="chat", train_files=[str(rows_file)], cache_dir=str(tmp / "data")), base
        )
        result[f"up to {exchanges} exchanges"] = measure(model, data)
    save_result("packed_attention", result)
    return result


if __name__ == "__main__":
    main()
