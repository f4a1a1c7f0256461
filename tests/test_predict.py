"""The predict command on real patches from the shared set, with the mini protocol's models; summary helpers."""

import csv
import os
import re

import numpy as np
import pytest
from conftest import run_cli
from sklearn.metrics import balanced_accuracy_score
from test_experiments import mini_protocol

from circlemix_jax import predict
from circlemix_jax.errors import InputError

FIVE = ("normal", "periglomerular_fibrosis", "obsolescent", "solidified", "disappearing")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The mini protocol's runs (trained once per session, shared with test_experiments)."""
    return mini_protocol(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def few_images(shared_manifest):
    """Six patches of the shared set: three from each of two subjects."""
    with open(shared_manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    subjects = sorted({r["subject"] for r in rows})[:2]
    root = os.path.dirname(shared_manifest)
    return [(os.path.join(root, r["path"]), r["subject"], r["label"])
            for s in subjects for r in [r for r in rows if r["subject"] == s][:3]]


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_folder_merged_through_a_child(models, few_images, tmp_path):
    folder = tmp_path / "slides"
    for path, subject, _ in few_images:  # folder name = subject
        (folder / subject).mkdir(parents=True, exist_ok=True)
        os.symlink(path, folder / subject / os.path.basename(path))
    out = tmp_path / "out" / "preds.csv"
    result = run_cli("circlemix_jax.predict", f"--workdir={models}/c5/baseline/fold0",
                     f"--child={models}/nc2/baseline/fold0", f"--images={folder}", f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _read(out)
    assert len(rows) == 6
    expected = {f"p_{n}" for n in FIVE} | {"nc2_p_normal", "nc2_p_periglomerular_fibrosis", "pred", "pred_name"}
    assert expected <= set(rows[0])
    for r in rows:
        p5 = np.array([float(r[f"p_{n}"]) for n in FIVE])
        assert p5.sum() == pytest.approx(1, abs=1e-4)
        parent_pred = int(p5.argmax())
        if parent_pred in (0, 1):  # the child re-decides normal vs fibrosis
            child = [float(r["nc2_p_normal"]), float(r["nc2_p_periglomerular_fibrosis"])]
            assert int(r["pred"]) == int(np.argmax(child))
        else:
            assert int(r["pred"]) == parent_pred
        assert r["pred_name"] == FIVE[int(r["pred"])]
    summary = _read(tmp_path / "out" / "preds_subjects.csv")
    assert sorted(s["subject"] for s in summary) == sorted({s for _, s, _ in few_images})
    for s in summary:
        mine = [r for r in rows if r["subject"] == s["subject"]]
        assert int(s["glomeruli"]) == len(mine) == sum(int(s[f"n_{n}"]) for n in FIVE)
        sclerotic = sum(r["pred_name"] in FIVE[2:] for r in mine)
        assert float(s["pct_globally_sclerotic"]) == pytest.approx(100 * sclerotic / len(mine), abs=0.05)
    assert "% globally sclerotic" in result.stdout


def test_predict_manifest_without_children(models, few_images, tmp_path):
    # Labels in the model's own class names, so predict scores them.
    as_five = {"global_sclerosis": "obsolescent", "non_sclerotic": "normal"}
    few_images = [(p, s, as_five[y]) for p, s, y in few_images]
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,subject,label\n" + "".join(f"{p},{s},{y}\n" for p, s, y in few_images))
    out = tmp_path / "b.csv"
    result = run_cli("circlemix_jax.predict", f"--workdir={models}/c5/baseline/fold0", f"--manifest={manifest}",
                     f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _read(out)
    assert [r["path"] for r in rows] == [os.path.normpath(p) for p, _, _ in few_images]
    assert [r["label"] for r in rows] == [y for _, _, y in few_images]  # copied through for checking
    for r in rows:
        probs = [float(r[f"p_{n}"]) for n in FIVE]
        assert int(r["pred"]) == int(np.argmax(probs)) and not any(k.startswith("nc2_") for k in r)
    summary = _read(tmp_path / "b_subjects.csv")
    for s in summary:
        mine = [r for r in rows if r["subject"] == s["subject"]]
        assert int(s["globally_sclerotic"]) == sum(r["pred_name"] in FIVE[2:] for r in mine)
    scored = re.search(r"^LABELS: balanced accuracy ([0-9.]+) .* on 6 labelled images", result.stdout, re.M)
    assert scored, result.stdout[-2000:]
    expected = balanced_accuracy_score([r["label"] for r in rows], [r["pred_name"] for r in rows])
    assert float(scored.group(1)) == pytest.approx(expected, abs=1e-4)


def test_predict_bad_input_is_one_line(models, tmp_path):
    result = run_cli("circlemix_jax.predict", f"--workdir={tmp_path / 'nothing'}", f"--images={tmp_path}",
                     f"--out={tmp_path / 'x.csv'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no images" in result.stderr or "does not exist" in result.stderr


def test_subject_summary_counts_global_sclerosis():
    rows = predict.subject_summary(["a", "a", "b", "a"], np.array([2, 0, 4, 3]), FIVE)
    a, b = rows
    assert (a["subject"], a["glomeruli"], a["globally_sclerotic"], a["pct_globally_sclerotic"]) == ("a", 3, 2, "66.7")
    assert a["n_obsolescent"] == 1 and a["n_solidified"] == 1 and a["n_normal"] == 1
    assert (b["glomeruli"], b["pct_globally_sclerotic"]) == (1, "100.0")
    assert predict.sclerotic_ids(("non_sclerotic", "global_sclerosis")) == [1]


def test_read_inputs_needs_exactly_one_source(tmp_path):
    with pytest.raises(InputError, match="exactly one"):
        predict.read_inputs(None, None)
    (tmp_path / "m.csv").write_text("file,subject\nx.png,s\n")
    with pytest.raises(InputError, match="missing column 'path'"):
        predict.read_inputs(str(tmp_path / "m.csv"), None)


BINARY = ("non_sclerotic", "global_sclerosis")


def test_score_labels_by_hand():
    labels = ["non_sclerotic", "global_sclerosis", "global_sclerosis", "", "non_sclerotic", "non_sclerotic"]
    subjects = ["a", "a", "b", "b", "c", "c"]
    pred = np.array([0, 1, 0, 1, 1, 0])  # row 3 has no label and is left out
    line = predict.score_labels(labels, subjects, pred, BINARY)
    # recall: non_sclerotic 2/3, global_sclerosis 1/2 -> (2/3 + 1/2) / 2
    assert line.startswith("LABELS: balanced accuracy 0.5833 [95% CI ")
    assert "over 3 subjects] on 5 labelled images" in line
    assert line.endswith("found per class: non_sclerotic 2/3, global_sclerosis 1/2")
    # One subject: a bootstrap over it only redraws it, so no interval is claimed.
    one = predict.score_labels(labels, ["a"] * 6, pred, BINARY)
    assert "balanced accuracy 0.5833 [no interval: every image is of one subject" in one and "CI" not in one


def test_score_labels_through_the_models_label_map():
    label_map = {"obsolescent": "global_sclerosis", "normal": "non_sclerotic"}
    line = predict.score_labels(["obsolescent", "normal"], ["a", "b"], np.array([1, 1]), BINARY, label_map)
    assert "balanced accuracy 0.5000" in line and "global_sclerosis 1/1" in line and "non_sclerotic 0/1" in line
    assert predict.score_labels(["1", "0"], ["a", "b"], np.array([1, 1]), BINARY) == line  # integer ids


def test_score_labels_says_why_it_cannot_score():
    assert predict.score_labels(None, ["a"], np.array([0]), BINARY) is None
    assert predict.score_labels(["", ""], ["a", "b"], np.array([0, 1]), BINARY) is None
    line = predict.score_labels(["sclerotic", "normal", "sclerotic"], ["a"] * 3, np.array([0, 1, 0]), BINARY)
    assert line == ("labels not scored: 'normal', 'sclerotic' are not among the model's classes "
                    "['non_sclerotic', 'global_sclerosis']")


def test_greyscale_images_are_named():
    from circlemix_jax import defaults

    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    grey = colour.copy()
    grey[1] = grey[1, ..., :1]  # one channel copied into all three
    paper, recipe = defaults.get_config("binary"), defaults.get_config("binary", "scratch")
    assert predict.greyscale_warning(["a", "b", "c"], colour, recipe) is None
    line = predict.greyscale_warning(["a", "b", "c"], grey, paper)
    assert line.startswith("WARNING: 1 of 3 images are greyscale (b): the model never saw a grey image")
    line = predict.greyscale_warning(["a", "b", "c"], grey, recipe)
    assert "only as a training augmentation (10% of them)" in line
    recipe.data.input_norm = "gray_per_image"
    assert predict.greyscale_warning(["a", "b", "c"], grey, recipe) is None


def test_masks_among_the_images_are_named(tmp_path):
    from PIL import Image, ImageDraw

    from circlemix_jax.data import pipeline

    big = Image.new("L", (224, 224), 0)  # a glomerulus mask as data sets keep them: a white disc on black
    ImageDraw.Draw(big).ellipse((20, 30, 200, 210), fill=255)
    big.convert("RGB").save(tmp_path / "mask.png")
    rng = np.random.default_rng(0)
    tissue = rng.normal(150, 40, (224, 224)).clip(0, 255).astype(np.uint8)  # a grey scan: mid-tones
    Image.fromarray(tissue).convert("RGB").save(tmp_path / "grey.png")
    stained = np.stack([tissue, tissue // 2, tissue], -1)  # colour, with near-black and near-white pixels
    Image.fromarray(stained).save(tmp_path / "stained.png")
    paths = [str(tmp_path / n) for n in ("stained.png", "mask.png", "grey.png")]
    for size in (32, 96, 224):
        images = np.stack([pipeline.load_image(p, size) for p in paths])
        line = predict.mask_warning(paths, images)
        assert line.startswith("WARNING: 1 of 3 images look like masks") and paths[1] in line
        assert predict.mask_warning([paths[0], paths[2]], images[[0, 2]]) is None


def test_the_public_sets_masks_are_told_from_its_images(shared_manifest):
    from circlemix_jax.data import manifest, pipeline

    rows = manifest.read_csv(shared_manifest)[1][::10]
    images = [manifest.resolve_path(shared_manifest, r["path"]) for r in rows]
    masks = [manifest.resolve_path(shared_manifest, r["mask"]) for r in rows]
    for size in (32, 96):
        assert predict.mask_warning(images, pipeline.decode_all(images, size)) is None
        grey = pipeline.decode_all(images, size).mean(-1, keepdims=True).repeat(3, -1).astype(np.uint8)
        assert predict.mask_warning(images, grey) is None
        assert predict.mask_warning(masks, pipeline.decode_all(masks, size)).startswith(
            f"WARNING: {len(masks)} of {len(masks)} images look like masks")
