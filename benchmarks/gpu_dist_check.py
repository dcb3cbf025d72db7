"""Device checks for distributed logging and scoring, and logging/scoring throughput (run by gpu_check.sh).

    python benchmarks/gpu_dist_check.py reference OUT                 # one process: the reference
    torchrun --nproc_per_node W benchmarks/gpu_dist_check.py dist OUT # W ranks: plain, DDP, FSDP2
    python benchmarks/gpu_dist_check.py compare OUT                   # stores and scores vs reference
    python benchmarks/gpu_dist_check.py throughput OUT                # examples/s and scoring GB/s
    .venv-peers/bin/python benchmarks/gpu_dist_check.py peers OUT     # logging vs bare, LogIX, Bergson
    python benchmarks/gpu_dist_check.py peers OUT --device cpu        # the same at toy size on the CPU

On CUDA every rank uses its own GPU with NCCL (W <= number of GPUs); without CUDA, or with more
ranks than GPUs, the ranks run on the CPU with gloo, so the script can be tried anywhere.
Matmuls run in float32 without TF32 so that the 1-process and W-process results agree to ~1e-4.
`compare` exits non-zero on a mismatch; every mode prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel

import logra
from logra import distributed
from logra.curvature import fit_preconditioner
from logra.score import Scorer

N, Q, T, VOCAB = 48, 4, 16, 64
CONFIG = logra.LoGraConfig(k_in=8, k_out=8, modules=["*mlp*", "*attn.c_attn"])
REL = 1e-4


def setup() -> torch.device:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    on_gpu = torch.cuda.is_available() and torch.cuda.device_count() >= world
    if world > 1:
        dist.init_process_group("nccl" if on_gpu else "gloo")
    if on_gpu:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def model(device: torch.device, layers: int = 2, width: int = 32, vocab: int = VOCAB) -> torch.nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_embd=width, n_head=4, n_positions=max(T, 512), vocab_size=vocab,
                        bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)  # fmt: skip
    config._attn_implementation = "eager"
    return GPT2LMHeadModel(config).to(device).eval()


def tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, T), generator=torch.Generator().manual_seed(seed))


def loss(m: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = m(input_ids=ids).logits[:, :-1].float()
    token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].reshape(-1), reduction="none")
    return token.view(ids.shape[0], -1).sum(dim=1)


def log(m: torch.nn.Module, forward: torch.nn.Module, path: Path, device: torch.device, batch_size: int) -> None:
    rank, world = distributed.rank_world()
    data = tokens(N, seed=1)
    with distributed.distributed_logger(m, CONFIG, path, shard_rows=batch_size) as logger:
        for batch in distributed.split_batches(distributed.split_range(N, rank, world), N, world, batch_size):
            with logger.record(ids=list(batch), param_grads=False):
                loss(forward, data[batch.start : batch.stop].to(device)).sum().backward()


def scores(m: torch.nn.Module, path: Path, device: torch.device) -> dict:
    store = logra.GradientStore.open(path)
    with logra.GradientLogger(m, CONFIG, statistics=False) as logger:
        with logger.record(ids=list(range(Q))) as rec:
            loss(m, tokens(Q, seed=2).to(device)).sum().backward()
    scorer = distributed.DistributedScorer(store, fit_preconditioner(store, "kfac"), device=device)
    top = scorer.top_k(rec, 5)  # the Record: the scorer checks its seed, sizes and model against the store's
    return {"scores": scorer.score(rec).cpu(), "self": scorer.self_influence().cpu(), "top": top.helpful_ids}


def run_reference(out: Path, device: torch.device) -> None:
    m = model(device)
    log(m, m, out / "ref", device, batch_size=5)
    torch.save(scores(m, out / "ref", device), out / "ref.pt")
    print(json.dumps({"mode": "reference", "device": str(device)}))


def run_dist(out: Path, device: torch.device) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    rank, world = distributed.rank_world()
    results = {}
    m = model(device)
    log(m, m, out / "plain", device, batch_size=3)
    results["plain"] = scores(m, out / "plain", device)
    ddp = DistributedDataParallel(model(device), device_ids=[device.index] if device.type == "cuda" else None)
    with ddp.no_sync():
        log(ddp, ddp, out / "ddp", device, batch_size=4)
    results["ddp"] = scores(ddp.module, out / "ddp", device)
    sharded = model(device)
    mesh = init_device_mesh(device.type, (world,))
    for block in sharded.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    log(sharded, sharded, out / "fsdp", device, batch_size=4)
    results["fsdp"] = scores(sharded, out / "fsdp", device)  # every rank logs the queries: FSDP collectives match
    if rank == 0:
        torch.save(results, out / "dist.pt")
        print(json.dumps({"mode": "dist", "world": world, "backend": dist.get_backend(), "device": str(device)}))
    dist.barrier()
    dist.destroy_process_group()


def run_compare(out: Path) -> None:
    ref = logra.GradientStore.open(out / "ref")
    want = dict(zip(ref.ids, ref.rows().float()))
    scale = max(r.abs().max().item() for r in want.values())
    report: dict = {"mode": "compare"}
    ok = True
    for name in ("plain", "ddp", "fsdp"):
        store = logra.GradientStore.open(out / name)
        got = dict(zip(store.ids, store.rows().float()))
        same_ids = set(got) == set(want) and len(store) == len(ref)
        err = max((got[i] - want[i]).abs().max().item() for i in want) / scale if same_ids else float("inf")
        report[f"{name}_rows_rel_err"] = err
        ok &= same_ids and err < REL
    ref_scores = torch.load(out / "ref.pt", weights_only=False)
    for name, res in torch.load(out / "dist.pt", weights_only=False).items():
        err = ((res["scores"] - ref_scores["scores"]).abs().max() / ref_scores["scores"].abs().max()).item()
        report[f"{name}_scores_rel_err"] = err
        report[f"{name}_top_equal"] = res["top"] == ref_scores["top"]
        ok &= err < REL
    report["ok"] = bool(ok)
    print(json.dumps(report))
    sys.exit(0 if ok else 1)


def run_throughput(out: Path, device: torch.device) -> None:
    """Logging examples/s vs a bare forward+backward (GPT-2 124M shape, bf16), and scoring GB/s."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    layers, width, batch, seq, steps = (12, 768, 8, 512, 20) if device.type == "cuda" else (2, 64, 4, 64, 3)
    vocab = 50257 if device.type == "cuda" else 512
    m = model(device, layers, width, vocab).to(dtype)
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    config = logra.LoGraConfig(k_in=64, k_out=64, dtype="bfloat16")

    def timed(fn) -> float:
        fn()  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / steps

    def bare() -> None:
        m.zero_grad(set_to_none=True)
        loss(m, ids).sum().backward()

    report = {"mode": "throughput", "device": str(device), "model": f"gpt2 {layers}x{width} {dtype}", "batch": batch,
              "seq": seq, "bare_examples_per_s": batch / timed(bare)}  # fmt: skip
    with tempfile.TemporaryDirectory(dir=out) as tmp, logra.GradientLogger(m, config, Path(tmp) / "s") as logger:
        counter = iter(range(10**9))

        def logging_pass() -> None:
            start = next(counter) * batch
            with logger.record(ids=list(range(start, start + batch)), param_grads=False):
                loss(m, ids).sum().backward()

        report["logging_examples_per_s"] = batch / timed(logging_pass)
        report["row_bytes"] = logger.dim * 2
    report["logging_over_bare"] = report["bare_examples_per_s"] / report["logging_examples_per_s"]
    report.update(scoring_throughput(out, device))
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in report.items()}))


def scoring_throughput(out: Path, device: torch.device) -> dict:
    """Score 64 queries against a synthetic bf16 store (N x D = 131072 x 8192 on GPU: 2 GiB)."""
    from logra.store import StoreWriter
    from logra.types import LayerInfo

    n, n_layers, k = (131072, 8, 32) if device.type == "cuda" else (4096, 4, 16)
    layers = [LayerInfo(f"l{i}", "Linear", k, k, k, k, False, i * k * k) for i in range(n_layers)]
    config = logra.LoGraConfig(k_in=k, k_out=k, dtype="bfloat16")
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        writer = StoreWriter(Path(tmp) / "s", config, "synthetic", layers, shard_rows=16384)
        gen = torch.Generator().manual_seed(0)
        for start in range(0, n, 16384):
            writer.append(list(range(start, start + 16384)), torch.randn(16384, n_layers * k * k, generator=gen))
            writer.commit_if_full(None)
        writer.commit(None)
        store = logra.GradientStore.open(Path(tmp) / "s")
        scorer = Scorer(store, fit_preconditioner(store, "identity"), chunk_rows=16384, device=device)
        queries = torch.randn(64, store.dim, generator=gen)
        scorer.score(queries)  # warm-up: page cache and kernels
        start = time.perf_counter()
        scorer.score(queries)
        seconds = time.perf_counter() - start
    gib = n * store.dim * 2 / 2**30
    return {"score_rows": n, "score_dim": store.dim, "score_s": seconds, "score_gib_per_s": gib / seconds}


def run_peers(out: Path, device: torch.device) -> None:
    """Logging examples/s of logra (k=64, with and without statistics), LogIX (k=64, KFAC and none)
    and Bergson's build (k=64; + its KFAC covariance pass) against a bare forward+backward and the
    activation-gradient floor, on a Llama-shaped model (every decoder Linear logged), float32 with
    TF32 matmuls. Each tool's pass runs twice (warm-up, then timed), setup untimed. Needs the peers
    installed (.venv-peers); a tool that fails is reported with its error, not as a number."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_common import BLOCK_LINEARS, floor_pass, lm_loss
    from peers import Workload, fresh, logix_log, logix_setup, logra_config, logra_run
    from peers_bergson import bergson_build, bergson_covariance, bergson_setup
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = True
    gpu = device.type == "cuda"
    layers, width, mlp, heads, vocab, batch, seq, steps = (
        (8, 1024, 2816, 16, 32000, 8, 512, 8) if gpu else (2, 64, 128, 4, 512, 4, 32, 2)
    )
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=seq,
                         tie_word_embeddings=False, attn_implementation="sdpa")  # fmt: skip
    m = LlamaForCausalLM(config).to(device).eval()
    logged = [f"model.layers.{i}.{name}" for i in range(layers) for name in BLOCK_LINEARS]
    gen = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, vocab, (batch, seq), generator=gen).to(device) for _ in range(steps)]
    w = Workload(m, logged, "lm", [(b,) for b in ids])

    def sync() -> None:
        if gpu:
            torch.cuda.synchronize()

    def bare() -> None:
        for b in ids:
            m.zero_grad(set_to_none=True)
            lm_loss(m, b).sum().backward()
        m.zero_grad(set_to_none=True)

    def timed(setup, run) -> float:  # seconds of run(setup()), after one warm-up pass
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            run(setup(Path(tmp) / "warm"))
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            state = setup(Path(tmp) / "timed")
            sync()
            start = time.perf_counter()
            run(state)
            sync()
            return time.perf_counter() - start

    def logra_tool(statistics: bool):
        return (lambda root: logra.GradientLogger(m, logra_config(w, 64), store=root, statistics=statistics),
                lambda logger: logra_run(w, logger))  # fmt: skip

    def logix_tool(hessian: str):
        def setup(root: Path):
            copy = fresh(w)
            root.mkdir(parents=True)
            return copy, logix_setup(copy, 64, hessian, str(root))

        return setup, lambda state: logix_log(*state)

    def bergson_tool(kfac: bool):
        def run(state) -> None:
            bergson_build(state, 64)
            if kfac:
                bergson_covariance(state)

        return (lambda root: bergson_setup(w, str(root))), run

    tools = {
        "floor": ((lambda root: None), lambda _: floor_pass(m, ids)),
        "logra_stats": logra_tool(True),
        "logra_no_stats": logra_tool(False),
        "logix_kfac": logix_tool("kfac"),
        "logix_none": logix_tool("none"),
        "bergson_build": bergson_tool(False),
        "bergson_build_kfac": bergson_tool(True),
    }
    bare()  # warm-up
    sync()
    start = time.perf_counter()
    bare()
    sync()
    bare_s = time.perf_counter() - start
    report: dict = {"mode": "peers", "device": str(device), "model": f"llama {layers}x{width} fp32+tf32",
                    "batch": batch, "seq": seq, "steps": steps, "k": 64,
                    "bare_examples_per_s": batch * steps / bare_s}  # fmt: skip
    for name, (setup_fn, run_fn) in tools.items():
        try:
            seconds = timed(setup_fn, run_fn)
            report[f"{name}_over_bare"] = seconds / bare_s
            report[f"{name}_examples_per_s"] = batch * steps / seconds
        except Exception as exc:  # a peer that cannot run on this device is reported, never timed as zero
            report[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:300]
    for peer in ("logix_kfac", "bergson_build", "bergson_build_kfac"):
        if f"{peer}_over_bare" in report and "logra_stats_over_bare" in report:
            report[f"logra_stats_speedup_vs_{peer}"] = report[f"{peer}_over_bare"] / report["logra_stats_over_bare"]
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in report.items()}))


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    if mode == "compare":
        run_compare(out)
        return
    if "--device" in sys.argv[3:]:  # a forced device: the CPU, to try the script without a GPU
        device = torch.device(sys.argv[sys.argv.index("--device") + 1])
    else:
        device = setup()
    modes = {"reference": run_reference, "dist": run_dist, "throughput": run_throughput, "peers": run_peers}
    if mode not in modes:
        raise SystemExit(f"unknown mode {mode!r}; choose from {sorted(modes) + ['compare']}")
    modes[mode](out, device)


if __name__ == "__main__":
    main()
