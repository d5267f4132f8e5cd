"""`diffserve generate` and `diffserve.generate`: files with the requested size/frames, one-line errors
with exit status 2 (checked in a real subprocess: no traceback), the default model, the progress bar."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys

import av
import pytest
from PIL import Image

from diffserve.cli import main
from diffserve.runtime import loader


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "diffserve", "generate", *args], capture_output=True, text=True, timeout=300
    )


def _assert_one_line_error(stderr: str, expected: str):
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines == [lines[-1]] and lines[-1].startswith("diffserve generate: error: "), stderr
    assert expected in lines[-1]


def test_cli_image(tiny_flux_dir, tmp_path, capsys):
    out = tmp_path / "fox.png"
    code = main(
        [
            "generate",
            "--model",
            str(tiny_flux_dir),
            "--prompt",
            "a fox",
            "--size",
            "96x64",
            "--steps",
            "3",
            "--seed",
            "1",
            "-o",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert Image.open(out).size == (96, 64)
    assert "seed 1" in captured.out and str(out) in captured.out
    assert "denoising" in captured.err and "3/3" in captured.err  # the progress bar


def test_cli_same_seed_same_file_and_jpeg(tiny_flux_dir, tmp_path):
    args = [
        "generate",
        "--model",
        str(tiny_flux_dir),
        "--prompt",
        "a fox",
        "--size",
        "32x32",
        "--steps",
        "2",
        "--seed",
        "7",
        "-q",
    ]
    assert main([*args, "-o", str(tmp_path / "a.png")]) == 0
    assert main([*args, "-o", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert main([*args, "--num-outputs", "2", "-o", str(tmp_path / "c.jpg")]) == 0
    assert [Image.open(tmp_path / f"c-{i}.jpg").format for i in range(2)] == ["JPEG", "JPEG"]


def test_cli_prints_the_drawn_seed_and_it_reproduces(tiny_flux_dir, tmp_path, capsys):
    args = ["generate", "--model", str(tiny_flux_dir), "--prompt", "a fox", "--size", "32x32", "--steps", "2"]
    assert main([*args, "-q", "-o", str(tmp_path / "a.png")]) == 0
    seed = re.search(r", seed (\d+),", capsys.readouterr().out).group(1)
    assert main([*args, "-q", "--seed", seed, "-o", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_cli_image_to_image(tiny_flux_dir, tmp_path):
    src = tmp_path / "in.png"
    Image.new("RGB", (70, 40), (120, 30, 200)).save(src)
    out = tmp_path / "out.webp"
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_flux_dir),
                "--prompt",
                "x",
                "--image",
                str(src),
                "--strength",
                "0.5",
                "--steps",
                "2",
                "-q",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    assert Image.open(out).size == (64, 32)


def test_cli_video(tiny_wan_dir, tmp_path):
    out = tmp_path / "waves.mp4"
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_wan_dir),
                "--prompt",
                "waves",
                "--size",
                "64x48",
                "--frames",
                "9",
                "--steps",
                "2",
                "--fps",
                "8",
                "-q",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.average_rate) == ("h264", 8)
        frames = list(container.decode(video=0))
    assert len(frames) == 9 and (frames[0].width, frames[0].height) == (64, 48)


def test_cli_uses_bundled_default_model(tiny_flux_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "x.png"
    args = ["generate", "--prompt", "x", "--size", "32x32", "--steps", "1", "-q", "-o", str(out)]
    monkeypatch.setattr(loader, "default_model_path", lambda: tmp_path / "not-installed")
    assert main(args) == 2
    _assert_one_line_error(capsys.readouterr().err, "bundled default model is not installed")
    monkeypatch.setattr(loader, "default_model_path", lambda: tiny_flux_dir)
    assert main(args) == 0
    assert Image.open(out).size == (32, 32)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--size", "100x64"], "must be multiples of 16"),
        (["--frames", "9"], "'num_frames' is not accepted"),
        (["--dtype", "int4"], "unknown dtype 'int4'"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--attention-backend", "magic"], "unknown attention backend 'magic'"),
    ],
)
def test_cli_invalid_requests_exit_2(tiny_flux_dir, tmp_path, capsys, extra, expected):
    code = main(
        [
            "generate",
            "--model",
            str(tiny_flux_dir),
            "--prompt",
            "x",
            "--steps",
            "1",
            "-q",
            *extra,
            "-o",
            str(tmp_path / "x.png"),
        ]
    )
    assert code == 2
    _assert_one_line_error(capsys.readouterr().err, expected)


def test_cli_wrong_output_kind(tiny_wan_dir, tiny_flux_dir, tmp_path, capsys):
    assert (
        main(["generate", "--model", str(tiny_wan_dir), "--prompt", "x", "-o", str(tmp_path / "x.png")]) == 2
    )
    _assert_one_line_error(capsys.readouterr().err, "makes videos: use an output file ending in .mp4")
    assert (
        main(["generate", "--model", str(tiny_flux_dir), "--prompt", "x", "-o", str(tmp_path / "x.gif")]) == 2
    )
    _assert_one_line_error(capsys.readouterr().err, "cannot tell the output format")


def test_cli_bad_size_syntax(capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", "--prompt", "x", "--size", "big", "-o", "x.png"])
    assert info.value.code == 2 and "WIDTHxHEIGHT" in capsys.readouterr().err


def test_cli_bad_model_directories_in_a_subprocess(tiny_flux_dir, tmp_path):
    """The real process: exit status 2, one line on stderr, no traceback."""
    missing = _run_cli("--model", str(tmp_path / "nope"), "--prompt", "x", "-o", str(tmp_path / "x.png"))
    assert missing.returncode == 2
    _assert_one_line_error(missing.stderr, f"model directory not found: {tmp_path / 'nope'}")

    broken = tmp_path / "broken"
    shutil.copytree(tiny_flux_dir, broken)
    weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    index = json.loads((broken / "model_index.json").read_text())
    truncated = _run_cli("--model", str(broken), "--prompt", "x", "-o", str(tmp_path / "x.png"))
    assert truncated.returncode == 2 and index["_class_name"] == "FluxPipeline"
    _assert_one_line_error(truncated.stderr, "is truncated")


def test_python_api(tiny_flux_dir, tmp_path):
    import diffserve

    out = tmp_path / "api.png"
    result = diffserve.generate(
        "a fox", model=str(tiny_flux_dir), width=32, height=48, num_inference_steps=2, seed=3, output=out
    )
    assert result.images[0].size == (32, 48)
    png = io.BytesIO(out.read_bytes())
    assert Image.open(png).size == (32, 48)
    again = diffserve.generate(
        "a fox", model=str(tiny_flux_dir), width=32, height=48, num_inference_steps=2, seed=3
    )
    assert again.images[0].tobytes() == result.images[0].tobytes()


def test_import_diffserve_stays_light():
    code = "import sys, diffserve; assert callable(diffserve.__getattr__); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cli_step_cache_reports_forwards(tiny_flux_dir, tmp_path, capsys):
    """`--step-cache-threshold 1` on 10 steps: steps 6 and 7 reused (warm-up 6, at most 2 in a row, last step
    computed; StepCacheConfig's defaults), and the summary line says so; without the flag none are."""
    args = [
        "generate",
        "--model",
        str(tiny_flux_dir),
        "--prompt",
        "a fox",
        "--size",
        "64x64",
        "--steps",
        "10",
    ]
    assert main([*args, "-o", str(tmp_path / "a.png"), "-q", "--step-cache-threshold", "1"]) == 0
    assert "DiT forwards 8 computed / 2 cached" in capsys.readouterr().out
    assert main([*args, "-o", str(tmp_path / "b.png"), "-q"]) == 0
    assert "DiT forwards 10 computed / 0 cached" in capsys.readouterr().out


def test_cli_refuses_acceleration_on_the_generic_path(tmp_path):
    """--quantization / --step-cache need our DiTs: a diffusers-only family gets one line, exit 2."""
    from diffserve.testing import make_tiny_model

    model = make_tiny_model("sd3", tmp_path / "sd3")
    for flag in (["--quantization", "fp8"], ["--step-cache", "first-block"]):
        r = _run_cli("--model", str(model), "--prompt", "x", "-o", str(tmp_path / "x.png"), *flag)
        assert r.returncode == 2
        _assert_one_line_error(r.stderr, f"{flag[0]} needs a native FLUX or Wan model")
