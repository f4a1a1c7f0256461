"""Throughput benchmark: the real train/eval steps, the host pipeline, and peers.

Each mode prints ONE JSON line on stdout (progress goes to stderr):

    # train/eval img/s of step.parallel_train_step / parallel_eval_step
    python -m circlemix_jax.bench --batch 16 --res 256 --steps 5 --mix circlemix --dtype float32
    # host pipeline: decode_all (the cache fill) and train_batches iteration
    python -m circlemix_jax.bench --pipeline --manifest ../shared/data/glomeruli-bueno/manifest.csv --res 256
    # the same on the built-in synthetic set of N images, from the decoded cache on disk; peak RssAnon
    python -m circlemix_jax.bench --pipeline --synthetic 10000 --res 256 --cache disk
    # the real training loop (pipeline, copy to the device, step) against the step alone
    python -m circlemix_jax.bench --end-to-end --batch 16 --res 128 --steps 20 --rounds 3
    # project and peer alternated A B A B in fresh processes; medians and ratios
    python -m circlemix_jax.bench --batch 16 --res 128 --steps 5 --peer /tmp/peers/torch/bin/python --rounds 3

The model step is exactly the one training runs (config 'c5' with overrides),
on a fixed random uint8 batch, timed like the peers: two untimed calls, then
`steps` timed calls, img/s = batch * steps / seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PEER_SCRIPT = os.path.join(REPO, "..", "shared", "bench", "peers", "torch_efficientnet_b0.py")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def peak_rss_mib() -> float:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def load_average() -> list[float]:
    """1/5/15-minute load averages: the machine is shared, so every figure carries one."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def _timed(fn, steps: int, warmup: int = 2) -> float:
    """Seconds for `steps` calls of `fn` after `warmup` untimed ones; fn must block."""
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return time.perf_counter() - start


def compiled_cost(compiled) -> dict:
    """XLA's cost analysis of a compiled program: floating-point operations and bytes accessed per call.

    These are XLA's static estimates (every op's flops and operand plus result
    bytes, before caching), so bytes/s against the memory's bandwidth is an upper
    bound on the share of bandwidth used.
    """
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per device program
        cost = cost[0] if cost else {}
    cost = cost or {}
    return {"flops": float(cost.get("flops", 0.0)), "bytes": float(cost.get("bytes accessed", 0.0))}


def program_fingerprint(compiled) -> str:
    """A hash of a compiled program's optimised HLO, blind to names and source locations.

    Two versions of the code with equal fingerprints compile to the same program,
    op for op, so they run at the same speed, whatever a noisy timing on a shared
    machine says: a refactor that keeps the fingerprint changed no computation.

    Returns:
      The first 16 hex digits of the SHA-256 of the normalised HLO text.
    """
    text = re.sub(r", metadata=\{[^}]*\}", "", compiled.as_text())
    text = re.sub(r",? ?stack_frame_id=\d+", "", text)
    # The tables of file names, functions and stack frames: numbered rows.
    text = "\n".join(line for line in text.splitlines() if not re.match(r"\d+ ", line))
    text = re.sub(r"^HloModule \S+", "HloModule", text, flags=re.M)
    # Instruction, computation and parameter names follow the Python names.
    text = re.sub(r"%[\w.-]+", "%", text)
    text = re.sub(r"([(,] ?)[\w.-]+: ", r"\1", text)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def roofline(cost: dict, seconds_per_call: float, peak_tflop_s: float, peak_gb_s: float) -> dict:
    """Achieved FLOP/s and bytes/s of one program, and their fractions of the device's peaks (when given)."""
    tflop_s = cost["flops"] / seconds_per_call / 1e12
    gb_s = cost["bytes"] / seconds_per_call / 1e9
    out = {"gflop": round(cost["flops"] / 1e9, 3), "gbytes": round(cost["bytes"] / 1e9, 4),
           "flop_per_byte": round(cost["flops"] / cost["bytes"], 2) if cost["bytes"] else None,
           "tflop_s": round(tflop_s, 4), "gb_s": round(gb_s, 2)}
    if peak_tflop_s:
        out["flop_fraction"] = round(tflop_s / peak_tflop_s, 4)
    if peak_gb_s:
        out["bandwidth_fraction"] = round(gb_s / peak_gb_s, 4)
    return out


def bench_config(batch: int, res: int, mix: str, dtype: str):
    """The 'c5' training config with the benchmark's batch, size, mixing and dtype."""
    from circlemix_jax import defaults

    config = defaults.get_config("c5", "" if mix == "none" else mix)
    with config.unlocked():
        config.batch_size = batch
        config.eval_batch_size = batch
        config.data.image_size = res
        config.model.dtype = dtype
    return config


def bench_model(batch: int, res: int, steps: int, mix: str, dtype: str, peak_tflop_s: float = 0.0,
                peak_gb_s: float = 0.0) -> dict:
    """img/s of the train and eval steps, compile time and the augmentation share.

    The augmentation share compares the jitted `prepare_images` (flips, crop,
    normalisation and mixing) and `augment.mix` alone against the full train
    step on the same batch; inside the step XLA may fuse them differently, so
    the shares are upper-bound estimates rather than an exact split.

    `train_cost` and `eval_cost` hold XLA's flops and bytes of each compiled step
    and what the timed steps achieved (`roofline`), as fractions of
    `peak_tflop_s` and `peak_gb_s` when those are given.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax
    from jax.sharding import PartitionSpec as P

    from circlemix_jax import augment, step

    config = bench_config(batch, res, mix, dtype)
    mesh = step.make_mesh()
    if batch % mesh.size:
        raise SystemExit(f"--batch {batch} must be divisible by the {mesh.size} devices")
    model = step.make_model(config)
    tx = step.make_optimizer(config)
    t0 = time.perf_counter()
    dummy = jnp.zeros((1, res, res, 3), jnp.float32)
    # An 'rbg' key: initial values only need to be a valid init here, and it compiles
    # model.init in about 2/3 of threefry's CPU time (measured 16.7 s vs 24.7 s).
    variables = jax.jit(lambda k: model.init(k, dummy, train=False))(jax.random.key(0, impl="rbg"))
    state = step.replicate(step.init_state(variables, tx, ema=step.ema_enabled(config),
                                           log_prior=step.log_prior(config, np.arange(len(config.classes)))), mesh)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0

    rng = np.random.default_rng(0)
    host = {"image": rng.integers(0, 256, (batch, res, res, 3), dtype=np.uint8),
            "label": rng.integers(0, len(config.classes), (batch,), dtype=np.int32)}
    data = step.shard_batch(host, mesh)
    key = jax.random.key(1)
    lr = np.float32(config.optim.lr)

    # Compile explicitly so compile time is not mixed into the first step's time.
    t0 = time.perf_counter()
    train = step.parallel_train_step(config, model, tx, mesh).lower(state, data, key, lr).compile()
    compile_train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    evaluate = step.parallel_eval_step(config, model, mesh).lower(state, data["image"]).compile()
    compile_eval_s = time.perf_counter() - t0

    holder = {"state": state}  # the train step donates its state: keep the returned one

    def train_once():
        holder["state"], metrics = train(holder["state"], data, key, lr)
        jax.block_until_ready(metrics["loss"])

    train_s = _timed(train_once, steps)
    eval_s = _timed(lambda: jax.block_until_ready(evaluate(holder["state"], data["image"])), steps)

    def sharded(fn, n_out):
        mapped = jax.shard_map(fn, mesh=mesh, in_specs=(P(step.AXIS), P(step.AXIS), P()),
                               out_specs=(P(step.AXIS),) * n_out)
        return jax.jit(mapped)

    def prep(images, labels, k):
        return step.prepare_images(config, jax.random.fold_in(k, lax.axis_index(step.AXIS)), images, labels)

    def mix_only(images, labels, k):
        return augment.mix(k, images, labels, num_classes=len(config.classes), **config.mix.to_dict())

    prep_fn = sharded(prep, 3)
    mix_fn = sharded(mix_only, 3)
    floats = step.shard_batch({"x": host["image"].astype(np.float32) / 255.0}, mesh)["x"]
    prep_s = _timed(lambda: jax.block_until_ready(prep_fn(data["image"], data["label"], key)), steps)
    mix_s = _timed(lambda: jax.block_until_ready(mix_fn(floats, data["label"], key)), steps)
    return {
        "mode": "model", "train_img_s": round(batch * steps / train_s, 3),
        "eval_img_s": round(batch * steps / eval_s, 3),
        "compile_s": round(compile_train_s + compile_eval_s, 2),
        "compile_train_s": round(compile_train_s, 2), "compile_eval_s": round(compile_eval_s, 2),
        "init_s": round(init_s, 2), "peak_rss_mib": peak_rss_mib(),
        "step_ms": round(1000 * train_s / steps, 1),
        "augment_ms": round(1000 * prep_s / steps, 2), "mix_ms": round(1000 * mix_s / steps, 2),
        "augment_share": round(prep_s / train_s, 4), "mix_share": round(mix_s / train_s, 4),
        "mix": mix, "dtype": dtype, "batch": batch, "res": res, "steps": steps,
        "devices": mesh.size, "eval_pieces": step.eval_pieces(batch // mesh.size),
        "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
        "train_cost": roofline(compiled_cost(train), train_s / steps, peak_tflop_s, peak_gb_s),
        "eval_cost": roofline(compiled_cost(evaluate), eval_s / steps, peak_tflop_s, peak_gb_s),
        "train_program": program_fingerprint(train), "eval_program": program_fingerprint(evaluate),
    }


def rss_anon_mib() -> float:
    """This process's anonymous resident memory (RssAnon): page-cache pages of mapped files do not count."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


@contextlib.contextmanager
def anon_peak(interval_s: float = 0.02):
    """Samples RssAnon in a thread while the block runs; yields a dict whose 'mib' is the peak so far."""
    import threading

    peak, done = {"mib": rss_anon_mib()}, threading.Event()

    def sample():
        while not done.wait(interval_s):
            peak["mib"] = max(peak["mib"], rss_anon_mib())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        done.set()
        thread.join()
        peak["mib"] = max(peak["mib"], rss_anon_mib())


def bench_pipeline(manifest: str, res: int, batch: int, workers: int, max_images: int, epochs: int,
                   cache: str = "memory", cache_dir: str = "", budget_mib: float = 8192) -> dict:
    """img/s of filling the decoded cache and of iterating `train_batches` over it, and peak RssAnon.

    With `cache` 'disk' the images come from image_cache's memory-mapped file (built on
    first use, reused after: `cache_built` says which); 'auto' picks as training does.
    """
    from circlemix_jax import data, defaults
    from circlemix_jax.data import image_cache, pipeline
    from circlemix_jax.errors import InputError

    try:
        records = data.read_manifest(manifest, defaults.FIVE_CLASSES)
    except InputError:  # a binary-labelled manifest (e.g. glomeruli-bueno)
        records = data.read_manifest(manifest, defaults.BINARY_CLASSES)
    paths, labels = records.paths, records.labels
    if max_images:
        paths, labels = paths[:max_images], labels[:max_images]
    mode = image_cache.choose(cache, len(paths), res, budget_mib)
    with anon_peak() as peak:
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # decode_all reports on stdout; ours is the JSON line
            if mode == "disk":
                store, row_of, built = image_cache.open_or_build(paths, res, workers, cache_dir)
                images = image_cache.ImageRows(store, [row_of[str(p)] for p in paths])
            else:
                built, images = True, pipeline.decode_all(list(paths), res, workers)
        decode_s = time.perf_counter() - t0
        decode_peak = peak["mib"]
        n, t0 = 0, time.perf_counter()
        for epoch in range(epochs):
            for b in pipeline.train_batches(images, labels, batch, seed=0, epoch=epoch, workers=workers):
                n += len(b["label"])
        iter_s = time.perf_counter() - t0
    return {"mode": "pipeline", "cache": mode, "cache_built": built,
            "decode_img_s": round(len(paths) / decode_s, 1), "decode_s": round(decode_s, 2),
            "batches_img_s": round(n / iter_s, 1), "images": len(paths), "iterated": n, "epochs": epochs,
            "workers": workers, "batch": batch, "res": res, "cache_mib": round(images.nbytes / 2**20, 1),
            "peak_anon_mib": round(peak["mib"], 1), "peak_anon_mib_decode": round(decode_peak, 1),
            "peak_rss_mib": peak_rss_mib()}


def bench_end_to_end(batch: int, res: int, steps: int, mix: str, dtype: str, manifest: str, rounds: int) -> dict:
    """img/s of the real training loop (`epoch_steps.run_steps`) against the train step alone.

    The loop runs on fold 0 of the manifest (or of the built-in synthetic set),
    epoch after epoch as training does: Grain batches from the decoded cache,
    the copy to the device and the step. The step alone is timed as
    `bench_model` times it, on one batch already on the device. The two
    alternate `rounds` times in this one process, so the machine's load moves
    both; the ratio is of the medians.
    """
    import itertools
    import tempfile

    import jax
    import numpy as np

    from circlemix_jax import checkpoint, epoch_steps, step as steplib, train
    from circlemix_jax.cli import StopRequest, configure_compilation_cache
    from circlemix_jax.data import pipeline
    from circlemix_jax.progress import Progress
    from circlemix_jax.summary import SummaryWriter

    configure_compilation_cache()  # as training does: no figure here includes the compile
    config = bench_config(batch, res, mix, dtype)
    with config.unlocked():
        config.data.manifest = manifest
    with tempfile.TemporaryDirectory(prefix="circlemix-bench-") as workdir, \
            contextlib.redirect_stdout(sys.stderr):  # the run's progress lines; stdout is the JSON line
        inputs = train.check(config, workdir)
        ckpts = checkpoint.RunCheckpoints(workdir)
        m, state, _ = train.prepare(inputs, ckpts)
        x, y = inputs.images["train"], inputs.parts["train"].labels
        meter = Progress(3 + rounds * steps, 0, batch, config.log_every_steps)
        loop = epoch_steps.Loop(config, m, inputs.steps_per_epoch, jax.random.key(config.seed),
                          SummaryWriter(workdir, enabled=False), meter, ckpts, StopRequest(), workdir)
        workers = pipeline.loader_threads(config.data.workers)
        stream = itertools.chain.from_iterable(
            pipeline.train_batches(x, y, batch, config.seed, epoch, workers=workers) for epoch in itertools.count())
        t0 = time.perf_counter()
        state, step = epoch_steps.run_steps(loop, state, itertools.islice(stream, 3), 0, 0, {})  # compile + 2 warm
        warmup_s = time.perf_counter() - t0

        data = steplib.shard_batch(next(stream), m.mesh)
        lr = np.float32(config.optim.lr)
        holder = {"state": state}

        def step_once():
            holder["state"], metrics = m.train_fn(holder["state"], data, loop.root_rng, lr)
            jax.block_until_ready(metrics["loss"])

        step_s, loop_s = [], []
        for _ in range(rounds):
            step_s.append(_timed(step_once, steps, warmup=0))
            t0 = time.perf_counter()
            timed = itertools.islice(stream, steps)
            holder["state"], step = epoch_steps.run_steps(loop, holder["state"], timed, step, 0, {})
            loop_s.append(time.perf_counter() - t0)
        ckpts.close()
    step_img_s = batch * steps / statistics.median(step_s)
    loop_img_s = batch * steps / statistics.median(loop_s)
    return {"mode": "end_to_end", "loop_img_s": round(loop_img_s, 3), "step_img_s": round(step_img_s, 3),
            "ratio": round(loop_img_s / step_img_s, 4),
            "loop_runs_img_s": [round(batch * steps / s, 3) for s in loop_s],
            "step_runs_img_s": [round(batch * steps / s, 3) for s in step_s],
            "warmup_s": round(warmup_s, 2), "peak_rss_mib": peak_rss_mib(), "batch": batch, "res": res,
            "steps": steps, "rounds": rounds, "mix": mix, "dtype": dtype, "loader_threads": workers,
            "prefetch_depth": epoch_steps.PREFETCH_DEPTH, "log_every_steps": config.log_every_steps,
            "train_images": len(y), "manifest": manifest or "synthetic", "devices": m.mesh.size,
            "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend()}


def _run_json(cmd: list[str]) -> dict:
    """Runs a benchmark process and parses the last JSON line it prints."""
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def bench_against_peer(args) -> dict:
    """Alternates project and peer runs (A B A B ...) and compares their medians.

    Each run is a fresh process, so neither inherits the other's caches or
    thread pools, and slow drifts in the shared machine's load hit both sides.
    """
    ours_cmd = [sys.executable, "-m", "circlemix_jax.bench", "--batch", str(args.batch), "--res", str(args.res),
                "--steps", str(args.steps), "--mix", args.mix, "--dtype", args.dtype,
                "--peak-tflops", str(args.peak_tflops), "--peak-gb-s", str(args.peak_gb_s)]
    peer_cmd = [args.peer, args.peer_script, "--batch", str(args.batch), "--res", str(args.res),
                "--steps", str(args.steps)] + ([] if args.no_channels_last else ["--channels-last"]) + args.peer_arg
    ours, peer, loads = [], [], []
    for r in range(args.rounds):
        for name, cmd, out in (("project", ours_cmd, ours), ("peer", peer_cmd, peer)):
            loads.append(load_average()[:1])
            result = _run_json(cmd)
            out.append(result)
            _log(f"round {r + 1}/{args.rounds} {name}: train {result['train_img_s']} img/s, "
                 f"eval {result['eval_img_s']} img/s (load {loads[-1]})")

    def med(runs, field):
        return round(statistics.median(run[field] for run in runs), 3)

    summary = {"mode": "versus_peer", "batch": args.batch, "res": args.res, "steps": args.steps,
               "mix": args.mix, "dtype": args.dtype, "rounds": args.rounds, "peer": peer[0].get("peer"),
               "peer_cmd": " ".join(peer_cmd)}
    for field in ("train_img_s", "eval_img_s"):
        summary[f"project_{field}"] = med(ours, field)
        summary[f"peer_{field}"] = med(peer, field)
        summary[f"{field.split('_')[0]}_ratio"] = round(med(ours, field) / med(peer, field), 3)
    summary["project_train_runs"] = [r["train_img_s"] for r in ours]
    summary["peer_train_runs"] = [r["train_img_s"] for r in peer]
    summary["project_eval_runs"] = [r["eval_img_s"] for r in ours]
    summary["peer_eval_runs"] = [r["eval_img_s"] for r in peer]
    for field in ("compile_s", "augment_share", "mix_share", "step_ms"):
        summary[f"project_{field}"] = med(ours, field)
    summary["project_peak_rss_mib"] = med(ours, "peak_rss_mib")
    by_train = sorted(ours, key=lambda run: run["train_img_s"])
    summary["project_train_cost"] = by_train[len(by_train) // 2].get("train_cost")  # of the median run
    summary["load_1min_before_runs"] = [v for load in loads for v in load]
    return summary


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m circlemix_jax.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16, help="global batch size")
    p.add_argument("--res", type=int, default=256, help="image side in pixels")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after 2 untimed ones)")
    p.add_argument("--mix", default="circlemix", choices=("none", "mixup", "cutmix", "circlemix"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    p.add_argument("--pipeline", action="store_true", help="benchmark the host input pipeline instead")
    p.add_argument("--end-to-end", action="store_true",
                   help="the real training loop (pipeline, copy to the device, step) against the step alone")
    p.add_argument("--manifest", default="", help="manifest CSV for --pipeline or --end-to-end")
    p.add_argument("--synthetic", type=int, default=0,
                   help="--pipeline on the built-in synthetic set of this many images (generated on first use)")
    p.add_argument("--cache", default="memory", choices=("auto", "memory", "disk"),
                   help="--pipeline: where the decoded images live (training's config field data.cache)")
    p.add_argument("--cache-dir", default="", help="--pipeline: the disk cache's folder ('' = the default)")
    p.add_argument("--cache-memory-mib", type=float, default=8192, help="--cache auto: the memory budget")
    p.add_argument("--workers", type=int, default=0, help="pipeline threads (0: the training default)")
    p.add_argument("--max-images", type=int, default=0, help="decode at most this many (0: all)")
    p.add_argument("--epochs", type=int, default=0,
                   help="passes over the cache for --pipeline (0: 1 with --synthetic, else 3)")
    p.add_argument("--peer", default="", help="python of the peer's venv: alternate project and peer runs")
    p.add_argument("--peer-script", default=DEFAULT_PEER_SCRIPT, help="peer benchmark script")
    p.add_argument("--no-channels-last", action="store_true", help="run the peer without --channels-last")
    p.add_argument("--rounds", type=int, default=3, help="A B rounds with --peer or --end-to-end")
    p.add_argument("--peer-arg", action="append", default=[],
                   help="an extra argument for the peer script (repeatable), e.g. --peer-arg=--compile")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="the device's peak TFLOP/s at --dtype: train_cost/eval_cost then give flop_fraction")
    p.add_argument("--peak-gb-s", type=float, default=0.0,
                   help="the device's memory bandwidth in GB/s: train_cost/eval_cost then give bandwidth_fraction")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.peer:
        result = bench_against_peer(args)
    elif args.end_to_end:
        result = bench_end_to_end(args.batch, args.res, args.steps, args.mix, args.dtype, args.manifest,
                                  args.rounds)
    elif args.pipeline:
        if not args.manifest and not args.synthetic:
            raise SystemExit("--pipeline needs --manifest PATH or --synthetic N")
        from circlemix_jax.data import pipeline, synthetic

        manifest = args.manifest
        if args.synthetic:
            with contextlib.redirect_stdout(sys.stderr):
                manifest = synthetic.ensure(args.synthetic)
        workers = args.workers or pipeline.default_workers()
        epochs = args.epochs or (1 if args.synthetic else 3)
        result = bench_pipeline(manifest, args.res, args.batch, workers, args.max_images, epochs, args.cache,
                                args.cache_dir, args.cache_memory_mib)
        result["synthetic"] = args.synthetic
    else:
        result = bench_model(args.batch, args.res, args.steps, args.mix, args.dtype, args.peak_tflops,
                             args.peak_gb_s)
    import jax

    result.update({"jax": jax.__version__, "python": platform.python_version(), "nproc": os.cpu_count(),
                   "load_avg": load_average()})
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
