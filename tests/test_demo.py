"""The demo runs the whole gallery end to end: a smoke test of capture, autograd and the masks."""

import re

import pytest
from PIL import Image  # the test extra installs Pillow; a missing one must fail, not skip

from inductor_flex import demo
from inductor_flex.__main__ import main
from inductor_flex.gallery import GALLERY, Variant


def run_demo(out_dir, capsys):
    exit_code = main(["demo", "--small", "--device", "cpu", "--out", str(out_dir)])
    return exit_code, capsys.readouterr().out


def colour_at(picture, x, y):
    return tuple(picture.convert("RGB").getpixel((x, y)))


def test_demo_small_passes_and_draws_every_variant(tmp_path, capsys):
    exit_code, printed = run_demo(tmp_path, capsys)

    assert exit_code == 0, printed
    side = demo.picture_side(demo.SMALL_SIZES.seq_len)
    for variant in GALLERY:
        assert re.search(rf"^{variant.name}\s.*\sPASS$", printed, re.MULTILINE), printed
        with Image.open(tmp_path / f"{variant.name}.png") as picture:
            picture.verify()
        with Image.open(tmp_path / f"{variant.name}.png") as picture:
            assert picture.size == (side, side)
    assert str(tmp_path.resolve()) in printed

    with Image.open(tmp_path / "causal.png") as causal:
        assert colour_at(causal, side - 2, 1) == demo.EMPTY_BLOCK  # above the diagonal, skipped block
        assert colour_at(causal, 1, side - 2) == demo.FULL_BLOCK  # below it, a full block
        assert colour_at(causal, 10, 20) == demo.PARTIAL_ALLOWED  # diagonal block, allowed position
        assert colour_at(causal, 20, 10) == demo.PARTIAL_MASKED  # diagonal block, masked position


def test_demo_fails_on_an_error_over_tolerance(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "GALLERY", GALLERY[1:2])
    monkeypatch.setitem(demo.TOLERANCE_IN_EPS, demo.torch.float32, 0)

    exit_code, printed = run_demo(tmp_path, capsys)

    assert exit_code == 1
    assert re.search(rf"^{GALLERY[1].name}\s.*\sFAIL$", printed, re.MULTILINE), printed


def test_demo_reports_a_variant_that_raises_and_runs_the_rest(tmp_path, capsys, monkeypatch):
    def wrong_arity_mask(b, h, q_idx):
        return q_idx >= 0

    broken = Variant("broken", "mask_mod with three arguments", lambda sizes, captured: (None, wrong_arity_mask))
    monkeypatch.setattr(demo, "GALLERY", (broken, GALLERY[0]))

    exit_code, printed = run_demo(tmp_path, capsys)

    assert exit_code == 1
    assert re.search(r"^broken\s.*\sFAIL$", printed, re.MULTILINE), printed
    assert "broken raised TypeError: mask_mod takes 3 positional arguments" in printed
    assert re.search(rf"^{GALLERY[0].name}\s.*\sPASS$", printed, re.MULTILINE), printed


def test_help_lists_the_demo_command(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    assert exit.value.code == 0
    assert "demo" in capsys.readouterr().out
