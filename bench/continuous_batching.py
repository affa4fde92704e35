"""GPT generation: continuous batching (runners.DecodeBatch, what the Serve deployment runs) vs
request-level batching (a batch decodes to its longest before the next starts: bigray's engine
before continuous batching) vs one request at a time with transformers' ``generate``.

In-process, on the model runner (no HTTP: the policies are what differ), one torch thread as a
1-CPU replica has. The model is GPT-2-shaped with random weights (n_embd 256, 4 layers, 512
positions, a byte-level BPE of 2,048 tokens trained here): timing needs shape, not quality.
Closed-loop load: `concurrency` requests in flight, a new one arriving as one finishes, 4 x
concurrency requests in all, max_tokens drawn from 16-128 (fixed seed), sampling at temperature 1.

Time to first token: a 256-token generation runs while 16 short requests arrive one at a time at
random moments; each one's wait until its first token, against the decode-step time.
Run: python bench/continuous_batching.py
"""

from __future__ import annotations

import random
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from common import REPO, save_result, scratch

sys.path.insert(0, str(REPO))

from bigray.serve.protocol import GenerationParams  # noqa: E402
from bigray.serve.runners import DecodeBatch, GPTRunner, joinable  # noqa: E402

WORDS = "the king queen lord lady fair sweet love death night day heart hand eye good life world god man time".split()


def build_model(out: Path) -> Path:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(2000)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(lines, vocab_size=2048, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    tok.save_pretrained(str(out))
    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tok),
            n_positions=512,
            n_embd=256,
            n_layer=4,
            n_head=4,
            bos_token_id=tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    ).save_pretrained(str(out))
    return out


def jobs(n: int, seed: int) -> list[GenerationParams]:
    rng = random.Random(seed)
    return [
        GenerationParams(
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 24))), rng.randint(16, 128), 1.0, 1.0, [], i
        )
        for i in range(n)
    ]


def continuous(runner: GPTRunner, work: list[GenerationParams], concurrency: int) -> tuple[int, float]:
    pending, batch, tokens = [runner.encode(j) for j in work], DecodeBatch(runner), 0
    t0 = time.perf_counter()
    while pending or len(batch):
        if len(batch):
            tokens += len(batch.step())
        room = joinable(len(batch), concurrency, len(pending))
        if room:
            joining, pending = pending[:room], pending[room:]
            tokens += len(batch.add(joining))
    return tokens, time.perf_counter() - t0


def request_level(runner: GPTRunner, work: list[GenerationParams], concurrency: int) -> tuple[int, float]:
    tokens, t0 = 0, time.perf_counter()
    for start in range(0, len(work), concurrency):
        for step in runner.generate([runner.encode(j) for j in work[start : start + concurrency]]):
            tokens += sum(d is not None for d in step)
    return tokens, time.perf_counter() - t0


def transformers_cb(runner: GPTRunner, work: list[GenerationParams], concurrency: int) -> tuple[int, float]:
    """transformers' own continuous-batching manager (paged KV cache), closed loop like the others.
    It samples with one generator per manager (no per-request seed) and knows no stop strings."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        do_sample=True, temperature=1.0, top_p=1.0, max_new_tokens=128, eos_token_id=runner.eos, pad_token_id=runner.eos
    )
    manager = runner.model.init_continuous_batching(generation_config=config)
    manager.start()
    try:
        pending, in_flight, tokens = list(work), 0, 0
        t0 = time.perf_counter()
        while pending or in_flight:
            while pending and in_flight < concurrency:
                job = pending.pop(0)
                manager.add_request(runner.encode(job).ids, max_new_tokens=job.max_tokens)
                in_flight += 1
            out = manager.get_result(timeout=60)
            if out is None:
                raise RuntimeError("transformers' continuous batching returned nothing within 60 s")
            if out.is_finished():
                in_flight -= 1
                tokens += len(out.generated_tokens)
        return tokens, time.perf_counter() - t0
    finally:
        manager.stop(block=True)
        if hasattr(runner.model, "destroy_cached_continuous_batching_manager"):
            runner.model.destroy_cached_continuous_batching_manager()


def one_by_one(runner: GPTRunner, work: list[GenerationParams]) -> tuple[int, float]:
    tokens, t0 = 0, time.perf_counter()
    for job in work:
        ids = torch.tensor([runner.encode(job).ids])
        with torch.no_grad():
            out = runner.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                max_new_tokens=job.max_tokens,
                pad_token_id=runner.eos,
            )
        tokens += out.shape[1] - ids.shape[1]
    return tokens, time.perf_counter() - t0


def main() -> dict:
    torch.set_num_threads(1)
    runner = GPTRunner(build_model(scratch("cb")), max_prompt_tokens=64)
    result: dict = {"benchmark": "continuous_batching", "threads": 1}
    for concurrency in (8, 32):
        work = jobs(4 * concurrency, seed=concurrency)
        continuous(runner, work[:concurrency], concurrency)  # warm-up
        rows = {
            "continuous": continuous(runner, work, concurrency),
            "request_level": request_level(runner, work, concurrency),
            "one_by_one_generate": one_by_one(runner, work),
        }
        try:
            rows["transformers_continuous_batching"] = transformers_cb(runner, work, concurrency)
        except Exception as e:  # recorded, not fatal: it is a comparison
            result.setdefault("transformers_cb_error", f"{type(e).__name__}: {e}"[:500])
        tps = {k: round(t / s, 1) for k, (t, s) in rows.items()}
        result[f"concurrency_{concurrency}"] = {
            "tokens_per_s": tps,
            "tokens": {k: t for k, (t, _) in rows.items()},
            "continuous_vs_one_by_one": round(tps["continuous"] / tps["one_by_one_generate"], 2),
            "continuous_vs_request_level": round(tps["continuous"] / tps["request_level"], 2),
        }
        print(result[f"concurrency_{concurrency}"], flush=True)
    result["ttft"] = ttft_summary(runner)
    save_result("continuous_batching", result)
    return result


def ttft_summary(runner: GPTRunner) -> dict:
    raw = time_to_first_token_timed(runner)
    waits = sorted(raw["waits"])
    step = statistics.median(raw["steps"])
    p50 = statistics.median(waits)
    return {
        "arrivals": len(waits),
        "decode_step_ms": round(1000 * step, 2),
        "ttft_p50_ms": round(1000 * p50, 2),
        "ttft_max_ms": round(1000 * waits[-1], 2),
        "p50_in_steps": round(p50 / step, 2),
        "long_generation_s": round(raw["long_s"], 2),
    }


def time_to_first_token_timed(runner: GPTRunner, arrivals: int = 16) -> dict:
    """A decode loop in a thread (as the deployment's) with a 256-token greedy generation in it;
    short requests are submitted from this thread at random moments and each one's wait for its
    first token is recorded."""
    batch, lock = DecodeBatch(runner), threading.Lock()
    waiting: list = []
    arrived: dict[int, float] = {}
    first: dict[int, float] = {}
    steps: list[float] = []
    long_done = threading.Event()
    stop = threading.Event()
    long = runner.encode(GenerationParams("the king", 256, 0.0, 1.0, ["\x00"], 0))

    def loop() -> None:
        while not stop.is_set():
            with lock:
                joining, waiting[:] = list(waiting), []
            if len(batch):
                t = time.perf_counter()
                produced = batch.step()
                steps.append(time.perf_counter() - t)
            else:
                produced = []
            if joining:
                produced += batch.add(joining)
            now = time.perf_counter()
            for prompt, delta in produced:
                first.setdefault(id(prompt), now)
                if prompt is long and delta.finish_reason:
                    long_done.set()
            if not len(batch) and not joining:
                time.sleep(0.0005)

    thread = threading.Thread(target=loop)
    t_long = time.perf_counter()
    with lock:
        waiting.append(long)
    thread.start()
    rng = random.Random(1)
    time.sleep(0.1)
    shorts = []
    for i in range(arrivals):
        time.sleep(rng.uniform(0.01, 0.05))
        if long_done.is_set():
            break
        p = runner.encode(GenerationParams("good night", 4, 1.0, 1.0, [], i + 1))
        with lock:
            arrived[id(p)] = time.perf_counter()
            waiting.append(p)
        shorts.append(p)
    long_done.wait(timeout=120)
    long_s = time.perf_counter() - t_long
    time.sleep(0.2)
    stop.set()
    thread.join()
    return {
        "waits": [first[id(p)] - arrived[id(p)] for p in shorts if id(p) in first],
        "steps": steps,
        "long_s": long_s,
    }


if __name__ == "__main__":
    main()
