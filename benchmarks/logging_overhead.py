"""Cost of a LoGra logging pass relative to a bare forward+backward on the same batches.

For each model and projection size k this measures, in one process:
  time ratio   = (logging pass: capture + statistics + store writes) / (bare forward+backward),
                 in process CPU time; also with `record(param_grads=False)`, the pure logging pass
                 that skips weight gradients
  memory ratio = peak resident memory growth of the logging pass / that of the bare pass
The median over interleaved rounds is reported. Memory is read from /proc (VmHWM, reset through
/proc/self/clear_refs) with glibc's mmap threshold pinned so that freed tensors leave the RSS;
it is Linux-only. Run:

    .venv/bin/python benchmarks/logging_overhead.py              # both models, k = 16, 64, 128
    .venv/bin/python benchmarks/logging_overhead.py --quick      # a small model, for a smoke run
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {
    # name: (constructor, batch, seq)
    "gpt2-6x512": ("gpt2", dict(n_layer=6, n_embd=512, n_head=8, n_positions=256), 4, 256),
    "smollm2-135m-shape": (
        "llama",
        dict(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
        ),
        2,
        256,
    ),  # fmt: skip
    "tiny": ("gpt2", dict(n_layer=2, n_embd=128, n_head=4, n_positions=64), 4, 64),
}


def build(name: str):  # noqa: ANN201 - benchmark helper
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    kind, kwargs, batch, seq = MODELS[name]
    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(**kwargs))
        vocab = model.config.vocab_size
    else:
        model = LlamaForCausalLM(LlamaConfig(**kwargs))
        vocab = model.config.vocab_size
    model.eval()  # no dropout: bare and logged passes do identical work
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, vocab, (batch, seq), generator=gen) for _ in range(3)]
    return model, batches


def per_example_loss(model, ids):  # noqa: ANN001, ANN201
    import torch.nn.functional as F

    logits = model(input_ids=ids).logits[:, :-1]  # vocabulary last: see bench_common.lm_loss
    B, T, V = logits.shape
    loss = F.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1), reduction="none").view(B, T)
    return loss.sum(dim=1)  # (B,)


# CPU time of this process: robust to other load on a shared machine (the ratio is what counts).
CLOCK = time.process_time


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> int:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return rss_kib("VmRSS")


def child(model_name: str, ks: list[int], rounds: int) -> dict:
    import torch

    import logra

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    model, batches = build(model_name)

    def bare() -> None:
        for ids in batches:
            model.zero_grad(set_to_none=True)
            per_example_loss(model, ids).sum().backward()

    def logged(k: int, param_grads: bool = True) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = logra.LoGraConfig(k_in=k, k_out=k)
            logger = logra.GradientLogger(model, cfg, store=tmp)
            start = CLOCK()
            for b, ids in enumerate(batches):
                model.zero_grad(set_to_none=True)
                with logger.record(ids=list(range(b * len(ids), (b + 1) * len(ids))), param_grads=param_grads):
                    per_example_loss(model, ids).sum().backward()
            logger.close()
            return CLOCK() - start

    def timed_bare() -> float:
        start = CLOCK()
        bare()
        return CLOCK() - start

    bare()  # warm-up
    out: dict = {"model": model_name, "tokens_per_batch": batches[0].numel(), "batches": len(batches), "k": {}}
    for k in ks:
        logged(k)  # warm-up
        ratios, ratios_nopg, t_bare, t_log = [], [], [], []
        for _ in range(rounds):
            tb = timed_bare()
            tl = logged(k)
            tn = logged(k, param_grads=False)
            ratios.append(tl / tb)
            ratios_nopg.append(tn / tb)
            t_bare.append(tb)
            t_log.append(tl)
        # Both passes start from the same state: no .grad tensors held (they are part of each pass).
        model.zero_grad(set_to_none=True)
        base = reset_peak()
        bare()
        mem_bare = rss_kib("VmHWM") - base
        model.zero_grad(set_to_none=True)
        base = reset_peak()
        logged(k)
        mem_log = rss_kib("VmHWM") - base
        tokens = batches[0].numel() * len(batches)
        out["k"][k] = {
            "time_ratio": statistics.median(ratios),
            "time_ratio_no_param_grads": statistics.median(ratios_nopg),
            "mem_ratio": mem_log / max(mem_bare, 1),
            "bare_s": statistics.median(t_bare),
            "log_s": statistics.median(t_log),
            "tokens_per_s": tokens / statistics.median(t_log),
            "mem_bare_mib": mem_bare / 1024,
            "mem_log_mib": mem_log / 1024,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["gpt2-6x512", "smollm2-135m-shape"], choices=list(MODELS))
    parser.add_argument("--k", nargs="*", type=int, default=[16, 64, 128])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="the tiny model, k=16 and 64, 2 rounds")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.k, args.rounds)))
        return
    if args.quick:
        args.models, args.k, args.rounds = ["tiny"], [16, 64], 2
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    results = []
    for name in args.models:
        cmd = [sys.executable, __file__, "--child", name, "--rounds", str(args.rounds), "--k", *map(str, args.k)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.exit(f"benchmark child for {name} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    import torch

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, threads={os.environ.get('BENCH_THREADS', '2')}")
    header = ["model", "tokens/batch", "k", "time ratio", "time ratio, param_grads=False", "memory ratio",
              "logged tokens per CPU-second"]  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        for k, v in r["k"].items():
            cells = [
                r["model"],
                r["tokens_per_batch"],
                k,
                f"{v['time_ratio']:.3f}",
                f"{v['time_ratio_no_param_grads']:.3f}",
                f"{v['mem_ratio']:.3f}",
                f"{v['tokens_per_s']:.0f}",
            ]
            print("| " + " | ".join(map(str, cells)) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
