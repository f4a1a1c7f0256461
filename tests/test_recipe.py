"""The from-scratch recipe: schedule, optimiser, EMA, geometry, label smoothing and the config word."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from circlemix_jax import augment, config_check, defaults, step
from circlemix_jax.errors import InputError


def _config(arg="smoke", **optim):
    c = defaults.get_config("binary", arg)
    with c.unlocked():
        c.optim.update(optim)
    return c


# --- config ---------------------------------------------------------------------

def test_paper_defaults_leave_every_recipe_feature_off():
    for stage in ("c5", "binary"):
        c = defaults.get_config(stage, "")
        assert (c.optim.schedule, c.optim.warmup_epochs, c.optim.nesterov) == ("step", 0.0, False)
        assert c.optim.weight_decay == 0.0 and c.optim.ema_decay == 0.0 and c.mix.label_smoothing == 0.0
        assert not c.augment.transpose and not c.augment.translate and c.augment.rotate_degrees == 0.0
        assert c.augment.crop_fraction == 0.0 and c.augment.max_crop == 16
        assert tuple(c.augment.scale) == (1.0, 1.0)
        assert not any(c.augment.colour.values())
        config_check.check_run_config(c)


def test_scratch_combines_with_a_method_and_passes_its_checks():
    for stage in ("c5", "binary"):
        c = defaults.get_config(stage, "scratch,circlemix")
        assert c.mix.method == "circlemix" and c.optim.schedule == "cosine" and c.optim.ema_decay > 0
        assert c.augment.transpose and c.augment.colour.stain > 0
        config_check.check_run_config(c)
    assert defaults.get_config("binary", "scratch").mix.method == "none"
    with pytest.raises(ValueError, match="'scratch'"):
        defaults.get_config("binary", "scrach")


@pytest.mark.parametrize("field,value", [("optim.schedule", "linear"), ("optim.warmup_epochs", 99.0),
                                         ("optim.weight_decay", -1e-4), ("optim.ema_decay", 1.0),
                                         ("augment.rotate_degrees", -5.0), ("augment.crop_fraction", 0.9),
                                         ("augment.colour.hue", 0.7), ("augment.scale", (1.2, 0.9)),
                                         ("augment.scale", (0.1, 1.0)), ("augment.scale", (0.8,))])
def test_bad_recipe_fields_are_named(field, value):
    c = defaults.get_config("binary", "scratch")
    section, _, name = field.rpartition(".")
    with c.unlocked():
        node = c
        for part in section.split("."):
            node = node[part]
        node[name] = value
    with pytest.raises(InputError, match=field.replace(".", r"\.")):
        config_check.check_run_config(c)


def test_best_epoch_is_chosen_from_select_from_on():
    c = _config()
    with c.unlocked():
        c.num_epochs = 10
    assert all(step.selectable_epoch(c, e) for e in range(10))
    with c.unlocked():
        c.select_from = 0.5
    assert [step.selectable_epoch(c, e) for e in range(10)] == [False] * 4 + [True] * 6
    with c.unlocked():
        c.select_from = 1.0
    assert [step.selectable_epoch(c, e) for e in range(10)] == [False] * 9 + [True]
    with c.unlocked():
        c.select_from = 1.5
    with pytest.raises(InputError, match="select_from"):
        config_check.check_run_config(c)


def test_switches_must_be_booleans():
    # ConfigDict already refuses a str for a bool field; a JSON-edited mapping may not.
    with pytest.raises(InputError, match="augment.transpose"):
        augment.check_geometry({"transpose": "yes"})


# --- schedule and optimiser -----------------------------------------------------

def test_cosine_schedule_matches_optax():
    c = _config(lr=0.05, schedule="cosine", warmup_epochs=2.0)
    spe = 7
    with c.unlocked():
        c.num_epochs = 10
    total = c.num_epochs * spe
    ref = optax.warmup_cosine_decay_schedule(0.0, 0.05, warmup_steps=14, decay_steps=total, end_value=0.0)
    ours = [step.learning_rate(c, spe, s) for s in range(total + 1)]
    np.testing.assert_allclose(ours, [float(ref(s)) for s in range(total + 1)], rtol=1e-5, atol=1e-9)


def test_step_schedule_is_the_papers_and_warms_up_when_asked():
    c = _config(lr=0.1, decay_at=0.5, decay_factor=0.1)
    lrs = [step.learning_rate(c, 10, s) for s in range(20)]
    assert lrs == [0.1] * 10 + [pytest.approx(0.01)] * 10
    c = _config(lr=0.1, decay_at=0.5, decay_factor=0.1, warmup_epochs=1.0)
    assert [step.learning_rate(c, 10, s) for s in (0, 5, 10, 19)] == pytest.approx([0.0, 0.05, 0.01, 0.01])


def test_nesterov_and_weight_decay_against_a_hand_computation():
    c = _config(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    tx = step.make_optimizer(c)
    params = {"conv": {"kernel": jnp.full((2, 3), 2.0)}, "bn": {"scale": jnp.full((3,), 2.0),
                                                                "bias": jnp.full((3,), 2.0)}}
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    state = tx.init(params)
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    # By hand: g += wd * w (kernels only); trace = g + m * trace; w -= lr * (g + m * trace).
    m, lr = 0.9, 0.1
    trace = {"k": 0.0, "b": 0.0}
    w = {"k": 2.0, "b": 2.0}
    for _ in range(3):
        for name, wd in (("k", 0.01), ("b", 0.0)):
            g = 1.0 + wd * w[name]
            trace[name] = g + m * trace[name]
            w[name] -= lr * (g + m * trace[name])
    np.testing.assert_allclose(params["conv"]["kernel"], w["k"], rtol=1e-6)
    np.testing.assert_allclose(params["bn"]["scale"], w["b"], rtol=1e-6)
    np.testing.assert_allclose(params["bn"]["bias"], w["b"], rtol=1e-6)
    assert w["k"] != pytest.approx(w["b"])  # the decay did act on the kernel


def test_without_weight_decay_the_state_is_the_papers_sgd():
    params = {"kernel": jnp.ones((2, 2))}
    ours = step.make_optimizer(_config(nesterov=True)).init(params)
    paper = optax.inject_hyperparams(optax.sgd)(learning_rate=0.01, momentum=0.9).init(params)
    assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(paper)


# --- EMA ------------------------------------------------------------------------

def test_ema_update_against_a_hand_computation():
    ema = {"params": {"w": jnp.zeros(())}, "batch_stats": {"m": jnp.full((), 4.0)}}
    want_w, want_m = 0.0, 4.0
    for n in range(30):
        x = float(n + 1)
        ema = step.ema_update(ema, {"w": jnp.asarray(x)}, {"m": jnp.asarray(-x)}, jnp.asarray(n), 0.9)
        d = min(0.9, (1 + n) / (10 + n))
        want_w, want_m = d * want_w + (1 - d) * x, d * want_m + (1 - d) * -x
        np.testing.assert_allclose(ema["params"]["w"], want_w, rtol=1e-5)
        np.testing.assert_allclose(ema["batch_stats"]["m"], want_m, rtol=1e-5)


def test_eval_uses_the_ema_weights():
    import flax.linen as nn

    class Tiny(nn.Module):  # stands in for B0: the test is about which variables eval reads
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(2)(x.mean((1, 2)))

    c = _config()
    model = Tiny()
    x = np.random.default_rng(0).integers(0, 255, (4, 8, 8, 3), np.uint8)
    live = model.init(jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32))
    average = model.init(jax.random.key(1), np.zeros((1, 8, 8, 3), np.float32))
    tx = step.make_optimizer(c)
    state = step.init_state(live, tx, ema=True).replace(ema=average)
    assert step.eval_variables(state) is average
    assert step.eval_variables(step.init_state(live, tx))["params"] is live["params"]
    xn = jnp.asarray((x / 255.0 - np.asarray(c.data.mean)) / np.asarray(c.data.std), jnp.float32)
    logits = jax.jit(lambda s, x: step.eval_step(s, x, config=c, model=model))(state, x)
    np.testing.assert_allclose(logits, model.apply(average, xn), rtol=1e-5, atol=1e-6)
    assert not np.allclose(logits, model.apply(live, xn), atol=1e-3)


# --- geometry -------------------------------------------------------------------

def _distinct_image(b, n):
    return jnp.broadcast_to(jnp.arange(n * n * 3, dtype=jnp.float32).reshape(1, n, n, 3), (b, n, n, 3))


def test_dihedral_draws_all_eight_symmetries_evenly():
    n, b = 6, 800
    x = _distinct_image(b, n)
    out = np.asarray(jax.jit(lambda k, x: augment.basic_augment(k, x, max_crop=0, transpose=True))(
        jax.random.key(0), x))
    img = np.asarray(x[0])
    # The dihedral group from numpy alone: 4 rotations, each with and without a flip.
    group = [np.rot90(f, k) for f in (img, img[:, ::-1]) for k in range(4)]
    assert len({g.tobytes() for g in group}) == 8
    counts = np.zeros(8)
    for o in out:
        match = [i for i, g in enumerate(group) if np.array_equal(o, g)]
        assert len(match) == 1
        counts[match[0]] += 1
    assert counts.min() > b / 8 * 0.7, counts
    without = np.asarray(augment.basic_augment(jax.random.key(0), x, max_crop=0))
    assert not any(np.array_equal(o, np.swapaxes(img, 0, 1)) for o in without)  # flips alone: 4 of 8


def test_translate_is_a_reflected_shift_within_half_the_crop():
    n, b, crop = 10, 400, 6
    x = _distinct_image(b, n)
    out = np.asarray(augment.basic_augment(jax.random.key(1), x, max_crop=crop, translate=True))
    # Every reflect-padded shift and flip, from numpy.
    padded = np.pad(np.asarray(x[0]), ((3, 3), (3, 3), (0, 0)), mode="reflect")
    candidates = {padded[3 + dy:3 + dy + n, 3 + dx:3 + dx + n][::fy, ::fx].tobytes(): (dy, dx)
                  for dy, dx in itertools.product(range(-3, 4), repeat=2)
                  for fy, fx in itertools.product((1, -1), repeat=2)}
    shifts = [candidates.get(o.tobytes()) for o in out]
    assert None not in shifts, "not a reflected shift of the input"
    assert {s[0] for s in shifts} == {s[1] for s in shifts} == set(range(-3, 4))


def test_crop_scales_with_the_image():
    assert augment.crop_pixels(16, 0.0, 96) == 16
    assert augment.crop_pixels(16, 16 / 256, 256) == 16 and augment.crop_pixels(16, 16 / 256, 128) == 8


@pytest.mark.parametrize("deg,scale", [(20.0, (1.0, 1.0)), (20.0, (0.6, 1.3)), (0.0, (0.5, 0.7))])
def test_rotation_and_zoom_against_map_coordinates(deg, scale):
    from scipy import ndimage

    n = 17
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(3, n, n, 2)).astype(np.float32))
    np.testing.assert_array_equal(augment.rotate(jax.random.key(0), x, max_degrees=0.0), x)
    fn = jax.jit(augment.rotate, static_argnames=("max_degrees", "scale"))
    out = np.asarray(fn(jax.random.key(4), x, max_degrees=deg, scale=scale))
    keys = jax.random.split(jax.random.key(4), 3)
    c = (n - 1) / 2
    yy, xx = np.meshgrid(np.arange(n) - c, np.arange(n) - c, indexing="ij")
    for i in range(3):
        a = np.deg2rad(float(jax.random.uniform(keys[i], (), minval=-deg, maxval=deg)))
        u = float(jax.random.uniform(jax.random.fold_in(keys[i], 1), ()))
        zoom = scale[0] * (scale[1] / scale[0]) ** u  # log-uniform
        assert deg == 0 or abs(a) > 0.01
        assert scale[0] <= zoom <= scale[1]
        # An output pixel at distance r from the centre samples the input at r / zoom.
        src = [(np.cos(a) * yy - np.sin(a) * xx) / zoom + c, (np.sin(a) * yy + np.cos(a) * xx) / zoom + c]
        inner = (np.hypot(yy, xx) / zoom < c - 1)  # the disc whose sources stay inside the image
        assert inner.sum() > 30
        for ch in range(2):
            ref = ndimage.map_coordinates(np.asarray(x[i, ..., ch]), src, order=1)
            np.testing.assert_allclose(out[i, ..., ch][inner], ref[inner], atol=1e-5)
    const = jnp.full((2, n, n, 3), 0.7)
    np.testing.assert_allclose(fn(jax.random.key(0), const, max_degrees=30.0, scale=scale), const, atol=1e-6)


def test_zoom_out_shrinks_a_centred_disc_about_the_centre():
    # Zoomed by 0.75 a disc covers 0.5625 of its area and stays centred. The disc is small
    # enough that the mirrored borders (sources up to 16 / 0.75 px out) never reach it.
    n = 33
    yy, xx = np.meshgrid(np.arange(n) - 16.0, np.arange(n) - 16.0, indexing="ij")
    disc = (np.hypot(yy, xx) < 5).astype(np.float32)[None, ..., None]
    out = np.asarray(augment.rotate(jax.random.key(1), jnp.asarray(disc), max_degrees=0.0,
                                    scale=(0.75, 0.75)))[0, ..., 0]
    assert abs(out.sum() / disc.sum() - 0.5625) < 0.05
    assert abs((out * yy).sum() / out.sum()) < 1e-3 and abs((out * xx).sum() / out.sum()) < 1e-3


def test_paper_geometry_draws_are_unchanged_by_the_new_options():
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 16, 16, 3)).astype(np.float32))
    c = _config()
    with c.unlocked():
        c.augment.max_crop = 4
    np.testing.assert_array_equal(step.augment_images(c, jax.random.key(0), x),
                                  augment.basic_augment(jax.random.key(0), x, max_crop=4))


# --- label smoothing ------------------------------------------------------------

@pytest.mark.parametrize("method", augment.METHODS)
def test_label_smoothing_with_every_method(method):
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(8, 16, 16, 3)).astype(np.float32))
    labels = jnp.asarray([0, 1] * 4)
    _, soft, lam = augment.mix(jax.random.key(0), x, labels, num_classes=2, method=method, label_smoothing=0.1)
    np.testing.assert_allclose(soft.sum(-1), 1.0, rtol=1e-6)
    y = np.where(np.eye(2)[np.asarray(labels)] > 0, 0.95, 0.05)
    np.testing.assert_allclose(soft, lam[:, None] * y + (1 - lam[:, None]) * np.roll(y, 1, 0), rtol=1e-6)
    assert float(soft.min()) >= 0.05 - 1e-7


# --- exact resume with EMA on ---------------------------------------------------

def test_exact_resume_with_ema_after_sigkill(tmp_path, scratch_run):
    """The EMA lives in the checkpointed state: a killed and resumed run predicts exactly as an uninterrupted one."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import CACHE, REPO, SCRATCH, run_cli

    whole, manifest = scratch_run  # the uninterrupted run, trained once for the session
    killed = str(tmp_path / "killed")
    cmd = (*SCRATCH, f"--config.data.manifest={manifest}", f"--workdir={killed}")
    proc = subprocess.Popen([sys.executable, "-m", *cmd], cwd=REPO, env=dict(os.environ, CIRCLEMIX_CACHE=CACHE),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = os.path.join(killed, "checkpoints", "latest")
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        # A step folder is whole once Orbax has written its commit marker; killing before
        # that leaves nothing to resume from, and the rerun would start over.
        if os.path.isdir(latest) and any(d.isdigit() and os.path.exists(os.path.join(latest, d, "commit_success.txt"))
                                         for d in os.listdir(latest)):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before its first checkpoint; cannot test a kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(killed, "metrics.json"))
    resumed = run_cli(*cmd, timeout=1200)
    assert resumed.returncode == 0 and "resuming from step" in resumed.stdout, resumed.stderr[-3000:]
    with open(os.path.join(whole, "test_predictions.csv")) as a:
        with open(os.path.join(killed, "test_predictions.csv")) as b:
            assert a.read() == b.read()
    metrics = []
    for workdir in (whole, killed):
        with open(os.path.join(workdir, "metrics.json")) as f:
            metrics.append(json.load(f))
    assert metrics[0].pop("best_val_balanced_accuracy") == pytest.approx(metrics[1].pop("best_val_balanced_accuracy"))
    assert metrics[0] == metrics[1]


# --- mask-weighted lambda (issue section 4) --------------------------------------

def test_mask_lam_against_a_hand_count():
    region = jnp.zeros((2, 4, 4), bool).at[:, :, :2].set(True)  # A shows in the left half
    masks = jnp.zeros((2, 4, 4)).at[0, :, :1].set(1.0).at[1, :, :].set(1.0)
    # Example 0: A's glomerulus 4 px in the region; its partner (example 1) 8 px outside: 4 / 12.
    # Example 1: A's 8 px in the region; its partner (example 0) has none outside: 1.
    lam = augment.mask_lam(region, masks, jnp.array([0.5, 0.5]))
    np.testing.assert_allclose(lam, [4 / 12, 1.0], rtol=1e-6)
    empty = augment.mask_lam(region, jnp.zeros((2, 4, 4)), jnp.array([0.3, 0.7]))
    np.testing.assert_allclose(empty, [0.3, 0.7])


@pytest.mark.parametrize("method", ["cutmix", "circlemix"])
def test_mix_with_mask_lambda(method):
    n = 24
    ones, zeros = jnp.ones((1, n, n, 3)), jnp.zeros((1, n, n, 3))
    x = jnp.concatenate([ones, zeros, ones, zeros])
    yy, xx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    disc = ((yy - n / 2 + 0.5) ** 2 + (xx - n / 2 + 0.5) ** 2 < (n / 3) ** 2).astype(np.float32)
    corner = np.zeros((n, n), np.float32)
    corner[:8, :8] = 1.0
    masks = jnp.asarray(np.stack([disc, corner, disc, corner]))
    labels = jnp.array([0, 1, 0, 1])
    for seed in range(4):
        kw = {"num_classes": 2, "method": method, "granularity": "example"}
        out, soft, lam = augment.mix(jax.random.key(seed), x, labels, lam_mode="mask", masks=masks, **kw)
        _, _, lam_px = augment.mix(jax.random.key(seed), x, labels, lam_mode="pixels", **kw)
        region = np.asarray(out[..., 0]) == np.asarray(x[..., 0])  # pixels of the example itself
        m, partner = np.asarray(masks), np.roll(np.asarray(masks), 1, 0)
        own, other = (m * region).sum((1, 2)), (partner * ~region).sum((1, 2))
        want = np.where(own + other > 0, own / np.maximum(own + other, 1e-9), np.asarray(lam_px))
        np.testing.assert_allclose(lam, want, rtol=1e-5)
        np.testing.assert_allclose(soft[:, 0], np.where(labels == 0, lam, 1 - lam), rtol=1e-5)
    full = jnp.ones((4, n, n))
    _, _, lam_full = augment.mix(jax.random.key(0), x, labels, lam_mode="mask", masks=full, **kw)
    np.testing.assert_allclose(lam_full, lam_px_of(kw, x, labels), rtol=1e-5)  # full masks: pixel shares
    with pytest.raises(ValueError, match="lam_mode='mask'"):
        augment.mix(jax.random.key(0), x, labels, num_classes=2, method="mixup", lam_mode="mask", masks=masks)


def lam_px_of(kw, x, labels):
    return augment.mix(jax.random.key(0), x, labels, lam_mode="pixels", **kw)[2]


def test_mask_channel_follows_the_geometry_and_is_split_off(tmp_path):
    from PIL import Image

    from circlemix_jax import masks as masklib

    rng = np.random.default_rng(0)
    rows = ["path,mask,label,subject"]
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), np.uint8)).save(tmp_path / f"i{i}.png")
        Image.fromarray((rng.uniform(size=(20, 20)) > 0.5).astype(np.uint8) * 255).save(tmp_path / f"m{i}.png")
        rows.append(f"i{i}.png,m{i}.png,normal,s{i}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    paths = [str(tmp_path / f"i{i}.png") for i in range(2)]
    mpaths = masklib.mask_paths(str(tmp_path / "m.csv"), paths)
    images = np.stack([np.asarray(Image.open(p)) for p in paths])
    four = masklib.with_mask_channel(images, mpaths, workers=1)
    assert four.shape == (2, 20, 20, 4)
    np.testing.assert_array_equal(four[..., 3], np.stack([np.asarray(Image.open(p)) for p in mpaths]))
    c = _config("smoke,scratch,cutmix")
    with c.unlocked():
        c.mix.lam_mode = "mask"
        c.augment.rotate_degrees = 0.0
    copy = np.concatenate([images, images[..., :1]], -1)  # mask = the red channel
    moved = np.asarray(step.augment_geometry(c, jax.random.key(0), jnp.asarray(copy, jnp.float32)))
    np.testing.assert_array_equal(moved[..., 3], moved[..., 0])
    x, soft, _ = step.prepare_images(c, jax.random.key(0), jnp.asarray(four), jnp.array([0, 1]))
    assert x.shape == (2, 20, 20, 3) and soft.shape == (2, 2)
    (tmp_path / "bad.csv").write_text("path,label,subject\ni0.png,normal,s0\n")
    with pytest.raises(InputError, match="'mask' column"):
        masklib.mask_paths(str(tmp_path / "bad.csv"), paths)


# --- the train step with EMA and logit adjustment, on a tiny stand-in model ------

def _tiny_model():
    import flax.linen as nn

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            h = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x.mean((1, 2)))
            return nn.Dense(2)(h)

    return Tiny()


def test_train_step_keeps_the_ema_and_adjusts_the_loss_by_the_prior():
    c = _config(ema_decay=0.9, logit_adjust=1.0)
    with c.unlocked():
        c.augment.basic = False
    model = _tiny_model()
    x = np.random.default_rng(0).integers(0, 255, (8, 8, 8, 3), np.uint8)
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int32)
    variables = model.init(jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32))
    tx = step.make_optimizer(c)
    prior = step.log_prior(c, labels)
    np.testing.assert_allclose(prior, np.log([7 / 10, 3 / 10]), rtol=1e-6)
    assert step.log_prior(_config(), labels) is None
    # Batches balanced over (centre, class) hold the classes half and half: the adjustment is flat.
    from circlemix_jax.data import pipeline

    balanced = pipeline.balanced_probs(labels, np.array(list("AABBBBAB")))
    np.testing.assert_allclose(step.log_prior(c, labels, balanced), np.log([0.5, 0.5]), rtol=1e-6)
    state = step.init_state(variables, tx, ema=True, log_prior=prior)
    mesh = step.make_mesh(1)
    train = step.parallel_train_step(c, model, tx, mesh)
    new, metrics = train(step.replicate(state, mesh), step.shard_batch({"image": x, "label": labels}, mesh),
                         jax.random.key(0), np.float32(0.1))
    xn = jnp.asarray((x / 255.0 - np.asarray(c.data.mean)) / np.asarray(c.data.std), jnp.float32)
    logits, _ = model.apply(variables, xn, train=True, mutable=["batch_stats"])
    want = optax.softmax_cross_entropy(logits + prior, jax.nn.one_hot(labels, 2)).mean()
    np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)
    unadjusted = optax.softmax_cross_entropy(logits, jax.nn.one_hot(labels, 2)).mean()
    assert abs(float(want) - float(unadjusted)) > 1e-3
    new = jax.device_get(new)
    ema = step.ema_update(variables, new.params, new.batch_stats, jnp.asarray(0), 0.9)
    for a, b in zip(jax.tree_util.tree_leaves(new.ema), jax.tree_util.tree_leaves(ema)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(new.log_prior, prior)
    assert not np.allclose(new.ema["params"]["Dense_0"]["kernel"], new.params["Dense_0"]["kernel"])


def test_checkpoints_from_before_the_optional_fields_still_restore(tmp_path):
    from typing import Any

    from flax import struct

    from circlemix_jax import checkpoint

    @struct.dataclass
    class OldState:  # the train state as it was before `ema` and `log_prior`
        step: Any
        params: Any
        batch_stats: Any
        opt_state: Any

    tx = step.make_optimizer(_config())
    params = {"w": jnp.arange(3.0)}
    old = OldState(step=jnp.asarray(5), params=params, batch_stats={"m": jnp.ones(2)}, opt_state=tx.init(params))
    ckpts = checkpoint.RunCheckpoints(str(tmp_path))
    ckpts.save(checkpoint.LATEST, 5, old, {"epochs_done": 1})
    ckpts.wait()
    abstract = jax.eval_shape(lambda: step.init_state({"params": params, "batch_stats": {"m": jnp.ones(2)}}, tx))
    state, progress = ckpts.restore(checkpoint.LATEST, abstract)
    ckpts.close()
    assert isinstance(state, step.TrainState) and state.ema is None and state.log_prior is None
    assert int(state.step) == 5 and progress["epochs_done"] == 1
    np.testing.assert_array_equal(state.params["w"], np.arange(3.0))
