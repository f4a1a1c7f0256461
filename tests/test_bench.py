"""The benchmark CLI runs end to end at a tiny size and prints one valid JSON line.

No timing assertions: speed lives in the benchmark itself (BENCHMARKS.md).
"""

import json

import jax
import jax.numpy as jnp
from conftest import run_cli

from circlemix_jax.bench import program_fingerprint

# Only the JSON is checked, so let XLA skip LLVM's optimisations: halves the compile time.
FAST_COMPILE = {"XLA_FLAGS": "--xla_backend_optimization_level=0"}

MODEL_FIELDS = {"train_img_s", "eval_img_s", "compile_s", "peak_rss_mib", "augment_share", "mix_share",
                "device", "jax", "batch", "res", "load_avg", "train_program", "eval_program"}


def _one_json_line(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])


def test_bench_model_prints_json_with_the_fields():
    out = _one_json_line(run_cli("circlemix_jax.bench", "--res", "32", "--batch", "4", "--steps", "1",
                                 "--mix", "circlemix", timeout=600, env=FAST_COMPILE))
    assert MODEL_FIELDS <= set(out), sorted(MODEL_FIELDS - set(out))
    assert out["batch"] == 4 and out["res"] == 32 and out["mix"] == "circlemix"
    assert out["train_img_s"] > 0 and out["eval_img_s"] > 0 and out["compile_s"] > 0
    assert out["peak_rss_mib"] > 0 and 0 <= out["mix_share"] and 0 <= out["augment_share"]


def test_bench_pipeline_prints_json(synthetic_manifest):
    out = _one_json_line(run_cli("circlemix_jax.bench", "--pipeline", "--manifest", synthetic_manifest,
                                 "--res", "32", "--batch", "8", "--max-images", "40", "--epochs", "1",
                                 timeout=120))
    assert out["mode"] == "pipeline" and out["images"] == 40 and out["iterated"] == 40
    assert out["decode_img_s"] > 0 and out["batches_img_s"] > 0


def test_bench_pipeline_needs_a_manifest():
    proc = run_cli("circlemix_jax.bench", "--pipeline", timeout=60)
    assert proc.returncode != 0 and "--manifest" in proc.stderr


def test_bench_end_to_end_prints_the_loop_against_the_step():
    out = _one_json_line(run_cli("circlemix_jax.bench", "--end-to-end", "--res", "32", "--batch", "4", "--steps", "2",
                                 "--rounds", "1", timeout=600, env=FAST_COMPILE))
    assert out["mode"] == "end_to_end" and out["batch"] == 4 and out["res"] == 32
    assert out["loop_img_s"] > 0 and out["step_img_s"] > 0 and out["peak_rss_mib"] > 0
    assert abs(out["ratio"] - out["loop_img_s"] / out["step_img_s"]) < 1e-3
    assert out["prefetch_depth"] >= 2


def test_bench_pipeline_from_the_disk_cache(tmp_path):
    def bench():
        return _one_json_line(run_cli("circlemix_jax.bench", "--pipeline", "--synthetic", "40", "--res", "32",
                                      "--batch", "8", "--cache", "disk", "--cache-dir", str(tmp_path), timeout=300))

    first, second = bench(), bench()
    assert first["cache"] == "disk" and first["cache_built"] and not second["cache_built"]
    assert first["iterated"] == second["iterated"] == first["images"] // 8 * 8  # one epoch of full batches
    assert second["peak_anon_mib"] > 0 and second["batches_img_s"] > 0


def _compiled(fn, *args):
    return jax.jit(fn).lower(*args).compile()


def _scaled_sum(x, w):
    return jnp.tanh(x @ w).sum()


def _renamed(inputs, weights):  # the same computation, other names, other source lines
    hidden = inputs @ weights
    return jnp.tanh(hidden).sum()


def test_program_fingerprint_ignores_names_and_sees_computation():
    x, w = jnp.ones((8, 4)), jnp.ones((4, 3))
    same = program_fingerprint(_compiled(_scaled_sum, x, w))
    assert program_fingerprint(_compiled(_renamed, x, w)) == same
    assert program_fingerprint(_compiled(lambda a, b: jnp.sin(a @ b).sum(), x, w)) != same  # another op
    assert program_fingerprint(_compiled(_scaled_sum, x, jnp.ones((4, 5)))) != same  # another shape
