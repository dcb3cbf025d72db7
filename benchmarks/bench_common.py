"""Shared pieces of the side-by-side benchmarks: the model, its batches, clocks, memory, children.

The speed benchmarks (`throughput.py`, `e2e.py`) use one Llama-shaped model: 4 layers, width
256, MLP 688, 4 heads, vocabulary 8,192 (untied head), batches of 8 x 128 tokens, one torch
thread. Every tool attributes through the same 28 Linear layers of the decoder blocks (q, k, v,
o, gate, up, down); embeddings, norms and the head are not logged.

Every measured run happens in a fresh child process (`run_child`), so that peak memory
(VmHWM, reset through /proc/self/clear_refs; Linux only) belongs to that run alone and a peer
that edits the model or keeps global state cannot affect the next one. Times are process CPU
seconds (`CLOCK`), robust to other load on a shared machine; each is reported as a ratio to a
bare forward+backward over the same batches, measured in the same child.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from logging_overhead import CLOCK, reset_peak, rss_kib  # noqa: E402  (shared with the logra-only benchmark)

RESULTS = HERE / "results"
LLAMA = dict(
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
BATCH, SEQ = 8, 128
BLOCK_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
LOGGED = [f"model.layers.{i}.{m}" for i in range(LLAMA["num_hidden_layers"]) for m in BLOCK_LINEARS]
__all__ = ["CLOCK", "reset_peak", "rss_kib"]


def set_threads() -> None:
    """One torch thread, as the targets are stated (override with BENCH_THREADS)."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))


def llama(seed: int = 0) -> nn.Module:
    """The benchmark model, randomly initialised from `seed`, in eval mode (no dropout)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA, attn_implementation="eager"))
    return model.eval()


def token_batches(n_examples: int, seed: int = 1) -> list[Tensor]:
    """ceil(n / BATCH) batches of random token ids [<= BATCH, SEQ]."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, LLAMA["vocab_size"], (n_examples, SEQ), generator=gen)
    return list(ids.split(BATCH))


def lm_loss(model: nn.Module, ids: Tensor) -> Tensor:
    """(B,) each sequence's next-token cross-entropy summed over its tokens.

    Taken over the (B·(T-1), V) logits, vocabulary last, as Bergson's own loop and logra's
    `causal_lm_loss` take it: with the vocabulary in the middle (`logits.transpose(1, 2)`) the
    log-softmax strides across it, which on one CPU thread costs about a fifth of a bare pass on
    this model and would make every pass that uses it look cheaper relative to one that does not.
    """
    logits = model(input_ids=ids).logits[:, :-1]
    B, T, V = logits.shape
    return F.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1), reduction="none").view(B, T).sum(dim=1)


def bare_pass(model: nn.Module, batches: list[Tensor]) -> float:
    """CPU seconds of a plain forward+backward (weight gradients included) over `batches`."""
    start = CLOCK()
    for ids in batches:
        model.zero_grad(set_to_none=True)
        lm_loss(model, ids).sum().backward()
    model.zero_grad(set_to_none=True)
    return CLOCK() - start


def floor_pass(model: nn.Module, batches: list[Tensor]) -> float:
    """CPU seconds of a forward+backward that computes activation gradients only (every parameter
    frozen, gradients flowing from the loss down to the embeddings' output): what any per-example
    logging pass must at least do. No weight gradients, no hooks."""
    frozen = [p for p in model.parameters() if p.requires_grad]
    handle = model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
    start = CLOCK()
    try:
        for p in frozen:
            p.requires_grad_(False)
        for ids in batches:
            lm_loss(model, ids).sum().backward()
    finally:
        handle.remove()
        for p in frozen:
            p.requires_grad_(True)
    return CLOCK() - start


def measured(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(fn(), CPU seconds, peak resident memory in MiB during the call: VmHWM after a reset)."""
    reset_peak()
    start = CLOCK()
    out = fn()
    seconds = CLOCK() - start
    return out, seconds, rss_kib("VmHWM") / 1024


def dir_bytes(path: str | os.PathLike[str]) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def run_child(
    script: str, args: list[str], python: str | None = None, timeout: float = 1800, strict_malloc: bool = True
) -> dict[str, Any]:
    """Run `script --child ARGS` in a fresh process; return the JSON of its last stdout line.

    strict_malloc: glibc returns every block of 64 KiB or more to the system when freed, so that
    the peak resident memory is the memory in use, not what the allocator keeps cached. It also
    makes every large tensor a fresh mapping whose pages the kernel faults in and zeroes: that
    adds up to half again to the CPU time of a pass, unevenly from run to run. Time is therefore
    measured with the default allocator (strict_malloc=False) and memory with the strict one.

    A failure comes back as {"error": <the last lines of stderr>} so that the table can say why.
    """
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if strict_malloc:
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [python or sys.executable, str(HERE / script), "--child", *args]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-6:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)[-600:]}
    return json.loads(lines[-1])


def versions() -> dict[str, str]:
    """Installed versions of logra, torch, transformers and each peer ('-' when absent)."""
    out = {}
    for dist in ("logra", "torch", "transformers", "logix-ai", "kronfluence", "traker", "bergson"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "-"
    return out


def machine() -> dict[str, Any]:
    """Date, CPU model, cores, memory, Python and package versions: the header of every table."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem, 1),
        "python": platform.python_version(),
        "threads": int(os.environ.get("BENCH_THREADS", "1")),
        "versions": versions(),
    }


def merged_rows(
    name: str, rows: list[dict[str, Any]], remeasured: Callable[[dict[str, Any]], bool]
) -> list[dict[str, Any]]:
    """The rows of results/<name>.json that were not re-measured now (`remeasured(row)` false), each
    marked with the date it was measured, followed by `rows`: for re-running one tool of a table.
    Every time figure is a ratio to a bare pass of its own process, so rows of two runs compare."""
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return rows
    old = json.loads(path.read_text())
    today = datetime.date.today().isoformat()
    kept = []
    for r in old["rows"]:
        if not remeasured(r):
            r = {**r, "measured": r.get("measured", old["machine"]["date"])}
            if r["measured"] == today:  # a row of today's runs is not an earlier measurement
                del r["measured"]
            kept.append(r)
    return kept + rows


def save(name: str, payload: dict[str, Any]) -> Path:
    """Write benchmarks/results/<name>.json with the machine header."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=1))
    return path
