"""`logra log`: encode a dataset, estimate the run, optionally share a storage budget, and log it.

The run prints its size (layers, D, bytes per example, the corpus total) and a time estimate
before writing anything (`--dry-run` stops there); `--budget` sizes each side from a probe pass
(`logra.capture.budget.allocate_k`); `--streaming` reads the data row by row
(`logra.cli.stream_log`); under torchrun each rank logs a contiguous share.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from logra.cli.commands import say, settings_from
from logra.cli.ranks import rank_world
from logra.errors import ConfigError, StoreError


def cmd_log(args: argparse.Namespace) -> int:
    from logra.cli.inputs import check_task_fields, encode, load_model, load_records
    from logra.store.manifest import MANIFEST

    out = Path(args.out)
    if (out / MANIFEST).exists() and not args.resume and not args.dry_run:
        raise StoreError(f"{out} already holds a store; pass --resume to continue it, or choose another --out.")
    settings = settings_from(args)
    if args.streaming:  # the first record is read and checked here: bad data fails before the model loads
        from logra.cli.stream_log import log_stream, stream_records

        if args.budget:
            raise ConfigError("--budget probes the first examples in memory; drop --streaming or --budget.")
        stream = stream_records(args.data, settings, args.split, args.limit)
    else:
        records = load_records(args.data, settings, args.split, args.limit)  # bad data fails before the model loads
    config = _config_from(args)
    model, tokenizer, task = load_model(settings)
    settings.task = task.value
    check_task_fields(task, settings)
    _check_resume(args, out, settings)
    settings.extra = {"data": str(Path(args.data).resolve()), "split": args.split, "limit": args.limit}
    if args.streaming:
        config, correction = _correction(args, model, config)
        return log_stream(args, out, model, tokenizer, task, settings, config, stream, say, correction)
    encoded = encode(records, tokenizer, task, settings.max_length, getattr(model.config, "label2id", None))
    if args.budget:
        config = _budget_config(args, model, encoded, task, settings, config)
    config, correction = _correction(args, model, config)
    estimate = _estimate(args, model, encoded, task, settings, config, correction)
    if args.dry_run:
        return 0
    _log_encoded(args, out, model, encoded, task, settings, config, correction, estimate)
    return 0


def _config_from(args: argparse.Namespace) -> Any:
    """The LoGraConfig of `logra log`'s options."""
    from logra.config import LoGraConfig

    return LoGraConfig(
        k_in=args.k_in or args.k,
        k_out=args.k_out or args.k,
        init=args.init,
        seed=args.seed,
        modules=args.modules,
        exclude=tuple(args.exclude or ()),
        dtype=args.dtype,
        include_bias=args.include_bias,
        nonfinite=args.nonfinite,
        pca_statistics=args.pca_statistics,
    )


def _check_resume(args: argparse.Namespace, out: Path, settings: Any) -> None:
    """With --resume, refuse settings or data other than those the store at `out` was logged with."""
    from logra.cli.inputs import ModelSettings

    saved = ModelSettings.load(out)
    if args.resume and saved is not None and {**vars(saved), "extra": {}} != {**vars(settings), "extra": {}}:
        raise ConfigError(f"--resume with other settings than the store at {out} was logged with: {vars(saved)}.")
    data_path = str(Path(args.data).resolve())
    recorded = (saved.extra.get("data"), saved.extra.get("split")) if saved is not None else None
    if args.resume and recorded is not None and recorded != (data_path, args.split):
        raise ConfigError(
            f"--resume with --data {data_path} (split {args.split}), but the store at {out} was logged from "
            f"{recorded[0]} (split {recorded[1]}); resume with the same data, or log the "
            "other data into a new store."
        )


def _log_encoded(
    args: argparse.Namespace,
    out: Path,
    model: Any,
    encoded: Any,
    task: Any,
    settings: Any,
    config: Any,
    correction: Any,
    estimate: Any,
) -> None:
    """Log this rank's share of `encoded` into the store at `out` (settings saved beside it), and say so."""
    from logra.capture.logger import GradientLogger
    from logra.cli.inputs import log_examples

    rank, world = rank_world()
    total = len(encoded.ids)
    if world > 1:  # this rank's contiguous share: store rows stay in dataset order
        from logra.distributed import split_range

        share = split_range(total, rank, world)
        encoded = replace(encoded, ids=encoded.ids[share.start : share.stop],
                          tokens=encoded.tokens[share.start : share.stop],
                          targets=encoded.targets[share.start : share.stop])  # fmt: skip
    start = time.perf_counter()
    with GradientLogger(  # under a process group: rank and world from it, merged when the block ends
        model, config, store=out, shard_rows=args.shard_rows, statistics=not args.no_statistics, correction=correction
    ) as logger:
        if rank == 0:
            settings.save(out)
        if logger.committed_ids:
            say(f"resuming: {len(logger.committed_ids)} examples already committed are skipped")
        n, _ = log_examples(
            model,
            logger,
            encoded,
            task,
            batch_size=args.batch_size,
            token_reduction=settings.token_reduction,
            desc="logra log",
            timed=(args.time_batches, lambda done, secs: say("estimate: " + estimate.timed(done, secs).describe())),
        )
        layers, dim = logger.layers, logger.dim
    elapsed = time.perf_counter() - start
    count = f"{n} examples" if world == 1 else f"{total} examples on {world} ranks ({n} new on rank 0)"
    say(
        f"logged {count} in {elapsed:.1f} s ({len(layers)} layers, D={dim}, "
        f"{dim * config.dtype.itemsize / 1024:.1f} KiB per example) -> {out}"
    )


def _correction(args: argparse.Namespace, model: Any, config: Any) -> tuple[Any, Any]:
    """(config, OptimizerCorrection) with --optimizer-state (required by --preset trackstar), else (config, None)."""
    from logra.curvature.optimizer import trainer_second_moments
    from logra.presets import Preset, trackstar_config

    if args.preset == Preset.TRACKSTAR.value and not args.optimizer_state:
        raise ConfigError(
            "--preset trackstar divides gradients by Adam's second moments: pass --optimizer-state with the "
            "Trainer checkpoint directory (holding optimizer.pt) of the model's training run."
        )
    if not args.optimizer_state:
        return config, None
    moments = trainer_second_moments(args.optimizer_state, model)
    config, correction = trackstar_config(model, config, moments, power=args.correction_power)
    say(f"optimizer correction {correction.fingerprint()} from {args.optimizer_state} (Adam's factorised sqrt(v))")
    return config, correction


def _estimate(
    args: argparse.Namespace, model: Any, encoded: Any, task: Any, settings: Any, config: Any, correction: Any = None
) -> Any:
    """Say D, bytes per example and the corpus total; with --dry-run also time --time-batches batches in memory."""
    from logra.capture.logger import GradientLogger
    from logra.cli.inputs import log_examples
    from logra.estimate import estimate_run

    with GradientLogger(model, config, statistics=not args.no_statistics, correction=correction) as probe:
        estimate = estimate_run(probe, len(encoded.ids))
        if args.dry_run:
            n = min(len(encoded.ids), args.time_batches * args.batch_size)
            sample = replace(encoded, ids=encoded.ids[:n], tokens=encoded.tokens[:n], targets=encoded.targets[:n])
            warm: list[tuple[int, float]] = []  # after the first batch (warm-up), when there are more
            start = time.perf_counter()
            log_examples(model, probe, sample, task, batch_size=args.batch_size,
                         token_reduction=settings.token_reduction, desc="logra timing",
                         timed=(1, lambda done, secs: warm.append((done, secs))))  # fmt: skip
            elapsed = time.perf_counter() - start
            first, first_secs = warm[0] if warm and warm[0][0] < n else (0, 0.0)
            estimate = estimate.timed(n - first, elapsed - first_secs)
    say(("dry run, nothing written: " if args.dry_run else "estimate: ") + estimate.describe())
    return estimate


PROBE_K = 2048  # the probe's sketch size per side: sides up to this wide are seen in full


def _budget_config(
    args: argparse.Namespace, model: Any, encoded: Any, task: Any, settings: Any, config: Any
) -> Any:
    """`config` with `layer_k` from `allocate_k`: the row width of uniform --k, shared by curvature."""
    from logra.capture.budget import allocate_k
    from logra.capture.logger import GradientLogger
    from logra.cli.inputs import log_examples

    if args.k_in or args.k_out or config.layer_k:
        raise ConfigError("--budget sizes each side itself from the budget of uniform --k; drop --k-in/--k-out.")
    with GradientLogger(model, config, statistics=False) as uniform:
        budget = uniform.dim
    probe_config = replace(config, k_in=PROBE_K, k_out=PROBE_K, init="gaussian", pca_statistics=None)
    sample = replace(encoded, ids=encoded.ids[: args.probe_examples], tokens=encoded.tokens[: args.probe_examples],
                     targets=encoded.targets[: args.probe_examples])  # fmt: skip
    with GradientLogger(model, probe_config, store=None, statistics=True) as probe:
        log_examples(model, probe, sample, task, batch_size=args.batch_size,
                     token_reduction=settings.token_reduction, desc="logra probe")  # fmt: skip
        step = min(8, args.k)  # sides grow in steps of 8 rows, or of k itself below that
        layer_k = allocate_k(probe.statistics(), probe.layers, budget, k_min=step, step=step)
    say(f"budget of D={budget} (uniform k={args.k}) shared across layers: " +
         ", ".join(f"{n} {ki}x{ko}" for n, (ki, ko) in layer_k.items()))  # fmt: skip
    return replace(config, layer_k=layer_k)
