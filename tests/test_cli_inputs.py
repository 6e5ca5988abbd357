"""What a new user meets first (#19, items 5-12), through Typer's CliRunner: importer
roots, large images, Hugging Face ids offline, `edited` in `ask --json`, progress, one
kind of bad value = one exit code and wording, help text."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
from conftest import shape_image
from typer.testing import CliRunner

from reasonedit_cli import cli
from reasonedit_cli.cli import app

runner = CliRunner()


def invoke(*args: str, input: str | None = None, env: dict[str, str] | None = None):
    return runner.invoke(app, list(args), input=input, env=env)


def one_error_line(result) -> str:
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


# ------------------------------------------------------------ 5. importer roots
def _aokvqa(tmp: Path) -> Path:
    """The official A-OKVQA layout with a COCO-named image under coco/val2017/."""
    (tmp / "coco" / "val2017").mkdir(parents=True)
    shape_image(tmp / "coco" / "val2017" / "000000000042.jpg", "circle", "red")
    record = {
        "question_id": "q42",
        "image_id": 42,
        "question": "what color is the shape?",
        "choices": ["blue", "red", "green", "yellow"],
        "correct_choice_idx": 1,
        "direct_answers": ["red"] * 10,
        "rationales": ["The shape is the colour of a tomato.", "Tomatoes are red."],
    }
    path = tmp / "aokvqa_val.json"
    path.write_text(json.dumps([record]))
    return path


def _rationalevqa(tmp: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp / "imgs" / "sub").mkdir(parents=True)
    shape_image(tmp / "imgs" / "sub" / "t.png", "triangle", "blue")
    table = pa.table(
        {
            "uid": ["r1"],
            "image_path": ["sub/t.png"],
            "question": ["what shape is in the image?"],
            "answer": ["triangle"],
            "rationale": ["The shape has three corners. Three corners make a triangle."],
        }
    )
    path = tmp / "rationale_vqa.parquet"
    pq.write_table(table, path)
    return path


@pytest.mark.parametrize("fmt", ["aokvqa", "rationalevqa"])
def test_importers_apply_a_relative_images_root_once(fmt, tmp_path, fake_models, monkeypatch):
    """The README's example with a relative --images-root, run from another folder."""
    data = tmp_path / "data"
    data.mkdir()
    src, root = (
        (_aokvqa(data), data / "coco") if fmt == "aokvqa" else (_rationalevqa(data), data / "imgs")
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative paths are the user's, from here
    result = invoke(
        "add-edit",
        "-c",
        str(tmp_path / "cb"),
        "--from",
        "../data/" + src.name,
        "--format",
        fmt,
        "--images-root",
        "../data/" + root.name + "/",
        "--patches",
        "none",
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["added"] == ["q42" if fmt == "aokvqa" else "r1"]


@pytest.mark.parametrize("fmt", ["aokvqa", "rationalevqa"])
@pytest.mark.parametrize("root_kind", ["relative", "absolute", "default"])
@pytest.mark.parametrize("cwd", ["data", "elsewhere"])
def test_importers_find_the_images_from_any_folder(fmt, root_kind, cwd, tmp_path, monkeypatch):
    from reasonedit_cli.datasets import read_edits

    data = tmp_path / "data"
    data.mkdir()
    src, root = (
        (_aokvqa(data), data / "coco") if fmt == "aokvqa" else (_rationalevqa(data), data / "imgs")
    )
    if root_kind == "default":  # the input file's folder is the root
        for f in root.rglob("*.*"):
            target = data / f.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, target)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / cwd)
    rel = "" if cwd == "data" else "../data/"
    roots = {"relative": Path(rel + root.name), "absolute": root, "default": None}
    [edit], errors = read_edits(rel + src.name, fmt, images_root=roots[root_kind])
    assert not errors and edit.image_path.resolve().is_file()


def test_importer_names_the_missing_image_once_joined(tmp_path, monkeypatch):
    from reasonedit_cli.datasets import read_edits
    from reasonedit_cli.errors import InputError

    src = _aokvqa(tmp_path)
    (tmp_path / "coco" / "val2017" / "000000000042.jpg").unlink()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=r"image coco/000000000042.jpg does not exist"):
        read_edits(src.name, "aokvqa", images_root=Path("coco"))


# --------------------------------------------------------------- 6. large images
@pytest.fixture(scope="module")
def photo_48mp(tmp_path_factory) -> Path:
    """An 8000x6000 (48 MP) JPEG: a red square in the bottom-right corner, like a photo."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (8000, 6000), "white")
    ImageDraw.Draw(img).rectangle((6000, 4000, 7999, 5999), fill="red")
    path = tmp_path_factory.mktemp("photo") / "photo.jpg"
    img.save(path, quality=80)
    return path


def test_a_48mp_photo_is_decoded_reduced_and_deterministically(photo_48mp):
    from reasonedit_cli.edits import (
        DECODE_MAX_SIDE,
        box_to_decoded,
        box_to_original,
        decode_image,
        original_size,
    )

    data = photo_48mp.read_bytes()
    img = decode_image(data, "photo")
    assert max(img.size) <= DECODE_MAX_SIDE and original_size(img) == (8000, 6000)
    assert decode_image(data, "photo").tobytes() == img.tobytes()
    # the red corner is where the original's box says it is
    box = box_to_decoded([6000, 4000, 8000, 6000], img)
    r, g, b = img.crop(tuple(box)).resize((1, 1)).getpixel((0, 0))
    assert r > 200 and g < 60 and b < 60
    assert box_to_original(box, img) == [6000, 4000, 8000, 6000]


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
@pytest.mark.parametrize("large", [False, True])
def test_exif_orientation_is_applied_and_boxes_are_upright(orientation, large, tmp_path):
    """A phone stores a portrait photo as landscape pixels plus an EXIF orientation tag; the
    model must see it upright (as every viewer shows it), and boxes are in that frame."""
    from PIL import Image, ImageDraw

    from reasonedit_cli.edits import box_to_decoded, decode_image, original_size

    w, h = (3000, 4000) if large else (300, 400)  # upright: portrait, red top-left quarter
    upright = Image.new("RGB", (w, h), "white")
    ImageDraw.Draw(upright).rectangle((0, 0, w // 2 - 1, h // 2 - 1), fill="red")
    # what the camera stores: pixels turned so that applying `orientation` gives `upright`
    undo = {1: None, 3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90,
            8: Image.Transpose.ROTATE_270}[orientation]  # fmt: skip
    stored = upright.transpose(undo) if undo is not None else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "photo.jpg"
    stored.save(path, quality=90, exif=exif)

    img = decode_image(path.read_bytes(), "photo")
    assert original_size(img) == (w, h)
    assert img.width < img.height
    box = box_to_decoded([0, 0, w // 2, h // 2], img)
    r, g, b = img.crop(tuple(box)).resize((1, 1)).getpixel((0, 0))
    assert r > 200 and g < 60 and b < 60


def test_a_48mp_photo_is_accepted_and_stored_as_given(photo_48mp, tmp_path, fake_models):
    import hashlib

    from reasonedit_cli.store import Codebook

    cb = tmp_path / "cb"
    result = invoke(
        "add-edit",
        "-c",
        str(cb),
        "-i",
        str(photo_48mp),
        "-q",
        "what color is the square?",
        "-a",
        "red",
        "-r",
        "The square is the colour of a tomato. Tomatoes are red.",
        "--box",
        "6000,4000,8000,6000",
        "--box",
        "none",
        "--patches",
        "none",
        "--json",
    )
    assert result.exit_code == 0, result.output
    book = Codebook.open(cb)
    [edit] = book.edits()
    # the codebook keeps the original bytes: the id hashes them, export gives them back
    assert edit.image_sha256 == hashlib.sha256(photo_48mp.read_bytes()).hexdigest()
    assert book.read_image_bytes(edit.image_sha256) == photo_48mp.read_bytes()
    boxes = [k for k in book.keys_table().to_pylist() if k["kind"] == "patch"]
    assert [k["box"] for k in boxes] == [[6000, 4000, 8000, 6000]]
    asked = invoke("ask", "-c", str(cb), "-i", str(photo_48mp), "-q", "what color?", "--json")
    assert asked.exit_code == 0, asked.output


def test_the_pixel_limit_is_stated_and_can_be_changed(photo_48mp, tmp_path, fake_models):
    model_args: list[str] = []
    args = ["ask", "--no-edit", "-c", str(tmp_path / "none"), "-i", str(photo_48mp), "-q", "x?"]
    low = invoke(*args, "--max-image-pixels", "10000000", *model_args)
    assert low.exit_code == 1
    line = one_error_line(low)
    assert "8000x6000 = 48.0 MP" in line and "limit of 10 MP" in line
    assert "--max-image-pixels" in line and "REASONEDIT_MAX_IMAGE_PIXELS" in line
    by_env = invoke(*args, *model_args, env={"REASONEDIT_MAX_IMAGE_PIXELS": "10000000"})
    assert by_env.exit_code == 1 and "limit of 10 MP" in by_env.output
    ok = invoke(*args, *model_args)  # the next command is back at the default
    assert ok.exit_code == 0, ok.output


# ------------------------------------------------------------ 8. hub ids offline
def _cache_snapshot(hf_home: Path, repo: str, source: Path) -> Path:
    """A Hugging Face cache entry for `repo` holding the files of `source`."""
    org, name = repo.split("/")
    base = hf_home / "hub" / f"models--{org}--{name}"
    sha = "0123456789abcdef0123456789abcdef01234567"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(sha)
    shutil.copytree(source, base / "snapshots" / sha)
    return base / "snapshots" / sha


def test_a_hub_id_is_read_from_the_cache_without_network(tmp_path, tiny_llava, images, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    import huggingface_hub.constants

    # the hub reads its cache location once, when imported (in a new process: from env)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    snap = _cache_snapshot(tmp_path / "hf", "tiny-org/tiny-llava", tiny_llava)
    from reasonedit_cli.hub import resolve_model

    assert resolve_model("tiny-org/tiny-llava") == str(snap)
    args = ["ask", "--no-edit", "-c", str(tmp_path / "none"), "-i", str(images["red_circle"])]
    result = invoke(*args, "-q", "what?", "--model", "tiny-org/tiny-llava", "--device", "cpu")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("offline", [True, False])
def test_a_hub_id_not_cached_fails_at_once_in_one_line(tmp_path, images, monkeypatch, offline):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.perf_counter()
    args = ["ask", "--no-edit", "-c", str(tmp_path / "none"), "-i", str(images["red_circle"])]
    result = invoke(*args, "-q", "what?", "--model", "no-org/no-model", "--device", "cpu")
    elapsed = time.perf_counter() - start
    assert result.exit_code == 1
    line = one_error_line(result)
    assert "no-org/no-model is not in the Hugging Face cache" in line
    assert ("HF_HUB_OFFLINE is set" if offline else "cannot be reached") in line
    assert elapsed < 20, elapsed  # was 28 s of retries; the connect timeout is 3 s


def test_library_logging_stays_off_stderr_unless_verbose(tmp_path, images, model_args):
    args = ["ask", "--no-edit", "-c", str(tmp_path / "none"), "-i", str(images["red_circle"])]
    quiet = invoke(*args, "-q", "what?", *model_args)
    assert quiet.exit_code == 0 and quiet.stderr == "", quiet.stderr
    loud = invoke(*args, "-q", "what?", "--verbose", *model_args)
    assert loud.exit_code == 0 and loud.stderr.strip(), "--verbose showed nothing"
    again = invoke(*args, "-q", "what?", *model_args)  # the next command is quiet again
    assert again.stderr == "", again.stderr


# ------------------------------------------------------------- 9. edited, JSON
@pytest.fixture
def codebook(tmp_path, edits_jsonl, fake_models):
    """Three edits added with the fake backend (these tests are about the CLI's plumbing)."""
    cb = tmp_path / "cb"
    result = invoke("add-edit", "--from", str(edits_jsonl), "-c", str(cb), "--patches", "none")
    assert result.exit_code == 0, result.output
    return cb


def test_edited_means_facts_were_prepended(codebook, images, tmp_path):
    model_args: list[str] = []
    from PIL import Image

    gradient = tmp_path / "gradient.png"
    Image.linear_gradient("L").convert("RGB").resize((64, 64)).save(gradient)
    q = tmp_path / "q.jsonl"
    q.write_text(
        json.dumps({"id": "hit", "image": str(images["red_circle"]), "question": "what shape?"})
        + "\n"
        + json.dumps({"id": "miss", "image": str(gradient), "question": "how many cars?"})
        + "\n"
    )
    result = invoke("ask", "-c", str(codebook), "--from", str(q), "--json", *model_args)
    assert result.exit_code == 0, result.output
    hit, miss = map(json.loads, result.stdout.splitlines())
    assert hit["edited"] is True and hit["facts"] and not hit["rejected"] and hit["searched"]
    assert miss["rejected"] is True and miss["facts"] == []
    assert miss["edited"] is False and miss["searched"] is True
    plain = invoke("ask", "-c", str(codebook), "--from", str(q), "--json", "--no-edit", *model_args)
    for r in map(json.loads, plain.stdout.splitlines()):
        assert r["edited"] is False and r["searched"] is False


# ----------------------------------------------------------- 10. progress, report
def test_evaluate_progress_counts_every_model_answer(
    tmp_path, edits_jsonl, model_args, monkeypatch
):
    """The bar's total is the number of questions the run asks; evaluate also keeps the
    reasonedit codebook in --codebook DIR (no empty version-0 codebook)."""
    from contextlib import contextmanager

    seen: dict[str, int] = {}

    @contextmanager
    def recording(total, label, enabled):
        seen["total"], seen["done"] = total, 0

        def advance(n):
            seen["done"] += n

        yield advance

    monkeypatch.setattr(cli, "_progress", recording)
    probes = tmp_path / "probes.jsonl"
    probes.write_text(
        json.dumps(
            {
                "image": "images/red_circle.png",
                "question": "which shape is this?",
                "answer": "circle",
                "kind": "t_gen",
                "edit_id": "e1",
            }
        )
        + "\n"
        + json.dumps(
            {
                "image": "images/yellow_circle.png",
                "question": "what color is the shape?",
                "answer": "yellow",
                "kind": "loc",
            }
        )
        + "\n"
    )
    kept = tmp_path / "kept"
    result = invoke(
        "evaluate",
        "--from",
        str(edits_jsonl),
        "--probes",
        str(probes),
        "--methods",
        "unedited,reasonedit,grace",
        "--codebook",
        str(kept),
        "--report",
        str(tmp_path / "rep"),
        "--json",
        *model_args,
    )
    assert result.exit_code == 0, result.output
    from reasonedit_cli.evaluation import SWEEP_P

    # (3 edits + 2 probes) x (unedited + reasonedit + grace + the sweep points)
    asked = 5 * (3 + len(SWEEP_P))
    assert seen == {"total": asked, "done": asked}
    from reasonedit_cli.store import Codebook

    assert Codebook.open(kept).edit_ids() == {"e1", "e2", "e3"}
    md = (tmp_path / "rep" / "metrics.md").read_text()
    assert md.startswith("# ") and "## Accuracy per method" in md
    assert (tmp_path / "rep" / "sweep.png").stat().st_size > 1000


def test_evaluate_codebook_left_untouched_when_the_run_fails(tmp_path, model_args):
    kept = tmp_path / "kept"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "nope.png", "question": "q?", "answer": "a", "reasoning": "R."}\n')
    result = invoke("evaluate", "--from", str(bad), "--codebook", str(kept), *model_args)
    assert result.exit_code == 1 and "does not exist" in result.output
    assert not kept.exists()


def test_no_progress_bar_when_stderr_is_not_a_terminal(codebook, images, tmp_path):
    model_args: list[str] = []
    q = tmp_path / "q.jsonl"
    q.write_text(
        "".join(
            json.dumps({"image": str(images["red_circle"]), "question": f"what shape {i}?"}) + "\n"
            for i in range(3)
        )
    )
    result = invoke("ask", "-c", str(codebook), "--from", str(q), "--batch-size", "1", *model_args)
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 3 and "Asking" not in result.output


def test_sweep_plot_labels_do_not_pile_up(tmp_path):
    """Ten sweep points at Loc = 1.0 get ten labels that do not overlap."""
    from reasonedit_cli.evaluation import label_positions

    ys = [0.80, 0.85, 0.88, 0.89, 0.893, 0.90, 0.90, 0.90, 0.90, 0.90]
    placed = label_positions(ys, min_gap=0.02)
    assert sorted(placed) == placed or sorted(placed, reverse=True) == placed
    assert all(abs(a - b) >= 0.02 - 1e-9 for a, b in zip(sorted(placed), sorted(placed)[1:]))


# ------------------------------------------------------------- 11. validation
PLACEHOLDERS = ["...", "…", "  ", "TODO", "<reasoning>", "n/a"]


@pytest.mark.parametrize("reason", PLACEHOLDERS)
def test_placeholder_reasoning_is_a_usage_error(reason, tmp_path, images):
    result = invoke(
        "add-edit",
        "-c",
        str(tmp_path / "cb"),
        "-i",
        str(images["red_circle"]),
        "-q",
        "what shape?",
        "-a",
        "circle",
        "-r",
        reason,
        "--model",
        str(tmp_path / "no-model"),  # a model load would fail differently
    )
    assert result.exit_code == 2
    assert "Invalid value for '--reason'" in one_error_line(result)
    assert not (tmp_path / "cb").exists()


def test_placeholder_reasoning_in_a_file_names_file_and_line(tmp_path, images):
    f = tmp_path / "e.jsonl"
    rec = {"image": str(images["red_circle"]), "question": "q?", "answer": "a"}
    f.write_text(
        json.dumps({**rec, "reasoning": "It is round."})
        + "\n"
        + json.dumps({**rec, "reasoning": ["It is round.", "..."]})
        + "\n"
    )
    result = invoke("add-edit", "-c", str(tmp_path / "cb"), "--from", str(f))
    assert result.exit_code == 1
    assert "e.jsonl:2: reasoning sentence 2 '...' is a placeholder" in one_error_line(result)


@pytest.mark.parametrize(
    "args, flag",
    [
        (["ask", "-i", "x.png", "-q", ""], "'--question'"),
        (["ask", "-i", "x.png", "-q", "   "], "'--question'"),
        (["add-edit", "-i", "x.png", "-q", "", "-a", "a", "-r", "R."], "'--question'"),
        (["add-edit", "-i", "x.png", "-q", "q?", "-a", "  ", "-r", "R."], "'--answer'"),
        (["add-edit", "-i", "x.png", "-q", "q?", "-a", "?!", "-r", "R."], "'--answer'"),
        (["ask", "-i", "x.png", "-q", "q?", "--percentile", "150"], "'--percentile'"),
        (["evaluate", "--dataset", "easy-vqa", "--percentile", "150"], "'--percentile'"),
        (["ask", "-i", "x.png", "-q", "q?", "--device", "tpu"], "'--device'"),
        (["add-edit", "--from", "x.jsonl", "--device", "tpu"], "'--device'"),
        (["evaluate", "--dataset", "easy-vqa", "--device", "tpu"], "'--device'"),
        (["calibrate", "--device", "tpu"], "'--device'"),
        (["ask", "-i", "x.png", "-q", "q?", "--dtype", "float8"], "'--dtype'"),
        (["add-edit", "--from", "x.jsonl", "--engine", "spark"], "'--engine'"),
    ],
)
def test_bad_values_are_usage_errors_before_any_model_loads(args, flag, tmp_path):
    start = time.perf_counter()
    result = invoke(*args, "--model", str(tmp_path / "no-model"))
    assert result.exit_code == 2, result.output
    assert f"Invalid value for {flag}" in one_error_line(result)
    assert time.perf_counter() - start < 5


def test_same_wording_for_the_same_bad_value_in_every_command(tmp_path):
    ask = invoke("ask", "-i", "x.png", "-q", "q?", "--percentile", "150")
    ev = invoke("evaluate", "--dataset", "easy-vqa", "--percentile", "150")
    strip = [one_error_line(r).split(" (see ")[0] for r in (ask, ev)]
    assert strip[0] == strip[1]


def test_old_option_names_are_hidden_aliases(tmp_path):
    help_text = invoke("evaluate", "--help").output + invoke("calibrate", "--help").output
    options = set(re.findall(r"(--[a-z-]+)", help_text))
    assert "--from" in options and "--edits" not in options and "--pairs" not in options
    both = invoke("calibrate", "-c", str(tmp_path), "--from", "a.jsonl", "--pairs", "b.jsonl")
    assert both.exit_code == 2 and "--pairs is another name for --from" in both.output
    old = invoke("evaluate", "--edits", str(tmp_path / "missing.jsonl"), "--model", "/nope")
    assert old.exit_code == 2 and "model directory /nope does not exist" in old.output


# --------------------------------------------------------------- 12. help, -c
COMMANDS = ["add-edit", "ask", "calibrate", "merge-keys", "evaluate", "doctor", "history"]


@pytest.mark.parametrize("command", [[], *([c] for c in COMMANDS)])
def test_help_shows_flags_as_flags(command):
    result = invoke(*command, "--help", env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "<bool>" not in result.output and "DESIGN" not in result.output


def test_engine_help_shows_the_ray_extra():
    result = invoke("add-edit", "--help", env={"COLUMNS": "200"})
    assert "pip install 'reasonedit-cli[ray]'" in result.output


def test_codebook_may_come_before_the_command(codebook, tmp_path):
    result = invoke("-c", str(codebook), "history", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[-1]["current"] is True
    other = tmp_path / "other"
    here = invoke("-c", str(codebook), "history", "-c", str(other))  # the command's wins
    assert here.exit_code != 0 and str(other) in here.output


def test_messages_do_not_name_internals(tmp_path, images):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    rec = {"image": str(bad), "question": "q?", "answer": "a", "reasoning": ["R.", 3]}
    f = tmp_path / "e.jsonl"
    f.write_text(json.dumps({**rec, "reasoning": "R."}) + "\n" + json.dumps(rec) + "\n")
    first = one_error_line(invoke("add-edit", "-c", str(tmp_path / "cb"), "--from", str(f)))
    assert "not a readable image" in first and "Error(" not in first
    assert "UnidentifiedImageError" not in first
    f.write_text(json.dumps({**rec, "image": str(images["red_circle"])}) + "\n")
    second = one_error_line(invoke("add-edit", "-c", str(tmp_path / "cb"), "--from", str(f)))
    assert "reasoning[" not in second and "item 2 of the list" in second


def test_readme_names_real_ids_and_in_repo_docs():
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    ids = {json.loads(line)["id"] for line in (root / "sample_edits" / "edits.jsonl").open()}
    named = set(re.findall(r"reasonedit remove-edit ([\w.:-]+)", readme))
    assert named and named <= ids, named - ids
    assert "DESIGN" not in readme  # the design notes are not in the repository
    for link in re.findall(r"\]\((docs/[\w.-]+\.md)", readme):
        assert (root / link).is_file(), link
    assert "`--one-thread`" not in readme  # a benchmark flag, not a CLI option


def _png_bytes(width: int, height: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(buf, format="PNG")
    return buf.getvalue()


def test_ray_workers_decode_with_the_drivers_pixel_limit():
    """A Ray worker is another process: the driver's --max-image-pixels travels in the
    worker settings, which `EditBatchWorker` applies first, or a worker would decode with
    the default limit."""
    from reasonedit_cli import edits as E
    from reasonedit_cli.distributed import start_worker, worker_settings
    from reasonedit_cli.editor import Editor
    from reasonedit_cli.errors import InputError

    E.set_max_image_pixels(5_000)
    try:
        settings = worker_settings(Editor(None), patches="none", top_k_patches=0, w=None)
    finally:
        E.set_max_image_pixels(None)  # a fresh worker process starts at the default
    assert settings["max_image_pixels"] == 5_000
    try:
        start_worker(settings)
        assert E.max_image_pixels() == 5_000
        with pytest.raises(InputError, match="too many pixels"):
            E.decode_image(_png_bytes(100, 100), "image")
    finally:
        E.set_max_image_pixels(None)
