"""The command line, as a user runs it (in a subprocess, like a shell would)."""

import json
import os
import subprocess
import sys

import imageio.v3 as iio
import pytest

PROMPT = "a red circle moving left over a blue sky"


def run_cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "supergen", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ),
    )


def test_generate_writes_video_and_metrics(tmp_path):
    out, metrics = tmp_path / "out.mp4", tmp_path / "m.json"
    res = run_cli("generate", "--prompt", PROMPT, "--steps", "3", "--output", str(out), "--metrics-json", str(metrics))
    assert res.returncode == 0, res.stderr
    assert "tile-steps computed" in res.stdout
    assert "4 tiles x 3 refine steps (of 3)" in res.stdout
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # as open() would make it, not mkstemp's 0600
    frames = iio.imread(out)
    # Default size: twice the native 64x96, native 9 frames.
    assert frames.shape == (9, 128, 192, 3)
    m = json.loads(metrics.read_text())
    assert m["height"] == 128 and m["width"] == 192 and m["tiles"]["count"] == 4
    assert "tiles (1x2x2 over F,H,W)" in res.stderr  # the tile plan is logged
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


@pytest.mark.parametrize(
    "args,message",
    [
        (["--height", "100"], "height 100 is not a multiple of 16"),
        (["--model", "no-such-model"], "unknown model"),
        (["--output", "/no/such/dir/out.mp4"], "does not exist"),
        (["--strength", "0"], "strength"),
        (["--tile-overlap", "96", "--tile-width", "96"], "overlap=96 must be smaller"),
    ],
)
def test_generate_bad_input_exits_2_with_message(tmp_path, args, message):
    res = run_cli("generate", "--prompt", PROMPT, "--steps", "1", "--output", str(tmp_path / "o.mp4"), *args)
    assert res.returncode == 2
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "o.mp4").exists()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_summary_counts_the_refinement_steps_that_ran(tmp_path):
    out = tmp_path / "toy.mp4"
    res = run_cli("generate", "--model", "toy", "--strength", "0.5", "--steps", "4", "--prompt", PROMPT,
                  "--output", str(out))
    assert res.returncode == 0, res.stderr
    assert "4 tiles x 2 refine steps (of 4), 8/8 tile-steps computed" in res.stdout


def test_version_and_help_show_defaults():
    from supergen import __version__

    res = run_cli("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"supergen {__version__}"
    res = run_cli("generate", "--help")
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    for shown in ("(default: 30)", "(default: 0.9)", "(default: out.mp4)", "(default: cosine)", "(default: 16)"):
        assert shown in text, shown
    assert "tiny-wan-i2v" in text and "tiny-cogvideox-i2v" in text and "image-to-video" in text
    assert "--threads" in text and "--max-memory" in text


def test_threads_default_is_a_share_of_the_cpus(monkeypatch):
    import torch

    from supergen.cli import configure_threads

    previous = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        usable = len(os.sched_getaffinity(0))
        assert configure_threads(None, "/models/Wan2.1") == max(1, usable // 2) == torch.get_num_threads()
        assert configure_threads(None, "toy") == 1  # the built-in models' ops are too small to split
        assert configure_threads(3, "toy") == 3 == torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def test_unknown_choice_is_rejected_by_argparse(tmp_path):
    res = run_cli("generate", "--prompt", PROMPT, "--blend", "gauss")
    assert res.returncode == 2 and "invalid choice" in res.stderr


@pytest.mark.parametrize(
    "model,args,message",
    [
        ("tiny", ["--height", "100"], "height 100 is not a multiple of 16 (VAE 8 x patch 2); try 96"),
        ("tiny-ltx", ["--width", "200"], "width 200 is not a multiple of 32 (VAE 32 x patch 1); try 192"),
        ("toy", ["--num-frames", "10"], "num_frames 10 must be 2k+1 (VAE temporal factor 2); try 9"),
        ("tiny-cogvideox", ["--rope", "absolute"], "rope='absolute' is not available for CogVideoXPipeline"),
        ("tiny-hunyuanvideo", ["--height", "32"], "height 32 is smaller than the model's native height 64"),
    ],
)
def test_bad_sizes_fail_before_the_weights_load(tmp_path, monkeypatch, capsys, model, args, message):
    """The size check reads the folder's configs: no pipeline is loaded to find out that a size is wrong."""
    from diffusers import DiffusionPipeline

    from supergen.cli import main
    from supergen.pipeline import check_request_for

    check_request_for(model)  # a built-in model is built on first use; that is not what this test is about

    def no_loading(*a, **kw):
        raise AssertionError("weights were loaded before the size check")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", no_loading)
    code = main(["generate", "--model", model, "--prompt", PROMPT, "--steps", "1",
                 "--output", str(tmp_path / "o.mp4"), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "loaded" not in err
    assert not (tmp_path / "o.mp4").exists()


def test_unsupported_folder_is_refused_before_loading(tmp_path, monkeypatch, capsys):
    import shutil

    from diffusers import DiffusionPipeline

    from supergen.cli import main
    from supergen.models import tiny_model_path

    folder = tmp_path / "flux"
    shutil.copytree(tiny_model_path("tiny-wan"), folder)
    index = json.loads((folder / "model_index.json").read_text())
    index.update(_class_name="FluxPipeline", transformer=["diffusers", "FluxTransformer2DModel"])
    (folder / "model_index.json").write_text(json.dumps(index))
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", lambda *a, **kw: pytest.fail("loaded"))
    code = main(["generate", "--model", str(folder), "--prompt", PROMPT, "--output", str(tmp_path / "o.mp4")])
    err = capsys.readouterr().err
    assert code == 2
    assert "no SuperGen adapter for FluxPipeline (transformer FluxTransformer2DModel); supported pipelines: " in err
    assert "WanPipeline" in err and "LTXPipeline" in err


def test_generate_flags_come_from_the_config_fields():
    """Each config field with a flag is parsed into the same config: defaults, choices and help written once."""
    import dataclasses

    from supergen.cli import _config_from_args, build_parser
    from supergen.config import CacheConfig, CoherenceConfig, ParallelConfig, TilingConfig

    parser = build_parser()
    args = parser.parse_args(["generate", "--prompt", "p"])
    generate = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("generate"))
    actions = {a.option_strings[0]: a for a in generate._actions if a.option_strings}
    flagged = 0
    for cls in (TilingConfig, CoherenceConfig, ParallelConfig, CacheConfig):
        assert _config_from_args(cls, args) == cls()
        for f in dataclasses.fields(cls):
            spec = f.metadata.get("cli")
            if spec is None:
                continue
            flagged += 1
            action = actions[spec["flag"]]
            assert action.default == f.default and action.help.startswith(spec["help"])
            assert action.choices == spec.get("choices")
    assert flagged >= 28
    changed = parser.parse_args(["generate", "--prompt", "p", "--tile-overlap", "8", "--coherence-guide", "skip",
                                 "--ulysses", "2", "--timeout", "30", "--cache", "region", "--no-cache-adaptive",
                                 "--cache-sketch"])
    assert _config_from_args(CacheConfig, changed) == CacheConfig(mode="region", adaptive=False, sketch=True)
    assert _config_from_args(TilingConfig, changed).overlap == 8
    assert _config_from_args(CoherenceConfig, changed).guide == "skip"
    assert _config_from_args(ParallelConfig, changed) == ParallelConfig(ulysses=2, timeout_s=30.0)


def test_stream_flags_come_from_the_stream_config(tmp_path):
    """Every StreamConfig field has its stream flag; left out, it takes the model's recommendation (here a copy of
    toy-causal whose supergen.json says on_prompt_change=flush), else the field's default, and the help says so."""
    import dataclasses
    import json
    import shutil

    from supergen.models import SHIPPED_MODELS

    model = tmp_path / "toy-causal-flush"
    shutil.copytree(SHIPPED_MODELS["toy-causal"], model)
    hints = json.loads((model / "supergen.json").read_text())
    hints["stream"]["on_prompt_change"] = "flush"
    (model / "supergen.json").write_text(json.dumps(hints))

    from supergen.cli import _config_from_args, build_parser, stream_config_for
    from supergen.config import StreamConfig

    parser = build_parser()
    stream = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("stream"))
    actions = {a.option_strings[0]: a for a in stream._actions if a.option_strings}
    for f in dataclasses.fields(StreamConfig):
        spec = f.metadata["cli"]
        action = actions[spec["flag"]]
        assert action.default is None and action.help.startswith(spec["help"])
        assert action.help.endswith(f"(default: the model's recommended value (supergen.json 'stream'), else {f.default})")
        assert action.choices == spec.get("choices")
    plain = parser.parse_args(["stream", "--prompt", "p", "--output", "o.mp4"])
    assert _config_from_args(StreamConfig, plain) == StreamConfig()
    changed = parser.parse_args(["stream", "--prompt", "p", "--output", "o.mp4", "--window", "12", "--kv-write",
                                 "last_step", "--steps", "2", "--model", str(model)])
    assert stream_config_for(changed) == StreamConfig(window=12, kv_write="last_step", steps=2,
                                                      on_prompt_change="flush")
