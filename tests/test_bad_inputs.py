"""Bad and odd inputs across the CLI, the Python API and the demo: refused in one line, before any model work.

Every row asserts the exit code (CLI) or exception type (API, demo), the
message, that no model work happened (the CLI rows fail if any weights load:
``DiffusionPipeline.from_pretrained`` is replaced by a failing function; the
API and demo rows count transformer calls on an already loaded model), that
it was fast, and that nothing was left in the output directory.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from supergen import CacheConfig, StreamConfig, TilingConfig

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a red circle moving left over a blue sky"
# Generous for a loaded 2-core machine; a request that started the work takes far longer.
FAST_S = 10.0


class Payload:
    """Unpickling this would run code (create a file): the checkpoint reader must never do it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _inputs(folder: Path) -> dict[str, str]:
    folder.mkdir(exist_ok=True)
    (folder / "not-an-image.png").write_text("this is text, not a picture\n")
    (folder / "garbage.pt").write_bytes(os.urandom(256))
    with open(folder / "payload.pt", "wb") as f:
        pickle.dump({"weight": Payload(str(folder / "payload-ran"))}, f)
    return {k: str(folder / k) for k in ("not-an-image.png", "garbage.pt", "payload.pt")}


# (id, argv after the command's own required flags, message). {out} is the output folder, {in:NAME} an input file.
CLI_GENERATE = [
    ("huge-size", ["--height", "100000", "--width", "100000"], "the largest size of this aspect ratio that fits is"),
    ("toy-8192", ["--model", "toy", "--height", "8192", "--width", "8192"], "65,536 tile"),
    ("output-sys", ["--output", "/sys/a.mp4"], "cannot write to the output directory '/sys'"),
    ("output-proc", ["--output", "/proc/a.mp4"], "cannot write to the output directory '/proc'"),
    ("output-is-folder", ["--output", "{out}"], "is a folder; give a file name inside it"),
    ("output-trailing-slash", ["--output", "{out}/x.mp4/"], "ends with a slash, so it names a folder"),
    ("output-suffix", ["--output", "{out}/x.avi"], "must end with .mp4"),
    ("output-missing-dir", ["--output", "{out}/no/such/x.mp4"], "does not exist"),
    ("metrics-suffix", ["--metrics-json", "{out}/m.txt"], "must end with .json"),
    ("device-cuda-99", ["--device", "cuda:99"], "device 'cuda:99'"),
    ("device-tpu9", ["--device", "tpu9"], "device 'tpu9' is not a torch device"),
    ("num-frames-negative", ["--num-frames", "-3"], "num_frames=-3 must be >= 1 (4k+1 frames: 1, 5, 9"),
    ("num-frames-zero", ["--num-frames", "0"], "num_frames=0 must be >= 1"),
    ("num-frames-not-4k+1", ["--num-frames", "10"], "num_frames 10 must be 4k+1"),
    ("height-negative", ["--height", "-64"], "height=-64 must be >= 1"),
    ("height-not-multiple", ["--height", "100"], "height 100 is not a multiple of 16"),
    ("height-below-native", ["--height", "32"], "smaller than the model's native height 64"),
    ("fps-zero", ["--fps", "0"], "--fps 0 must be >= 1"),
    ("fps-negative", ["--fps", "-1"], "--fps -1 must be >= 1"),
    ("seed-2**70", ["--seed", str(2**70)], "is out of range: torch seeds are 64-bit"),
    ("steps-zero", ["--steps", "0"], "--steps 0 must be >= 1"),
    ("strength-zero", ["--strength", "0"], "strength=0.0 must be in (0, 1]"),
    ("guidance-negative", ["--guidance", "-1"], "--guidance -1.0 must be a finite number >= 0"),
    ("guidance-nan", ["--guidance", "nan"], "--guidance nan must be a finite number >= 0"),
    ("timeout-zero", ["--timeout", "0"], "timeout_s=0.0 must be a finite number of seconds > 0"),
    ("overlap-whole-tile", ["--tile-overlap", "96", "--tile-width", "96"], "overlap=96 must be smaller"),
    ("tile-batch-zero", ["--tile-batch-size", "0"], "tile_batch_size=0 must be an integer >= 1"),
    ("cache-warmup-too-long", ["--cache", "region", "--cache-warmup", "40"], "cache warmup=40 is longer"),
    ("unknown-model", ["--model", "no-such-model"], "unknown model 'no-such-model'"),
    ("image-not-a-picture", ["--model", "tiny-wan-i2v", "--image", "{in:not-an-image.png}"], "is not a picture"),
    ("image-missing", ["--model", "tiny-wan-i2v", "--image", "{out}/none.png"], "is not a file"),
    ("max-memory-too-small", ["--max-memory", "1M"], "(the --max-memory / max_memory budget)"),
    ("max-memory-not-a-size", ["--max-memory", "lots"], "max memory 'lots' is not a size"),
    ("threads-zero", ["--threads", "0"], "--threads 0 must be >= 1"),
]
CLI_STREAM = [
    ("stream-huge-size", ["--height", "100000", "--width", "100000"], "the largest frame of this aspect ratio"),
    ("stream-blocks-zero", ["--blocks", "0"], "--blocks 0 must be >= 1"),
    ("stream-height-not-multiple", ["--height", "100"], "height 100 is not a positive multiple of 16"),
    ("stream-window-short", ["--window", "2"], "window=2 latent frames is shorter than one block"),
    ("stream-fps-zero", ["--fps", "0"], "--fps 0 must be >= 1"),
    ("stream-output-proc", ["--output", "/proc/x.mp4"], "cannot write to the output directory '/proc'"),
    ("stream-weights-garbage", ["--transformer-weights", "{in:garbage.pt}"], "is not a plain tensor file"),
    ("stream-weights-payload", ["--transformer-weights", "{in:payload.pt}"], "holds Python objects besides tensors"),
    ("stream-weights-missing", ["--transformer-weights", "{out}/none.pt"], "does not exist"),
]
CLI_DEMO = [
    ("demo-port-zero", ["--port", "0"], "--port 0 must be in 1..65535"),
    ("demo-concurrency-zero", ["--concurrency", "0"], "--concurrency 0 must be >= 1"),
    ("demo-unknown-model", ["--model", "nope"], "unknown model 'nope'"),
    ("demo-device-tpu9", ["--device", "tpu9"], "device 'tpu9' is not a torch device"),
]
CLI_CASES = (
    [pytest.param("generate", a, m, id=i) for i, a, m in CLI_GENERATE]
    + [pytest.param("stream", a, m, id=i) for i, a, m in CLI_STREAM]
    + [pytest.param("demo", a, m, id=i) for i, a, m in CLI_DEMO]
)


@pytest.fixture(scope="module")
def built_models():
    """Built-in models are built on first use; that is not what these rows time."""
    from supergen.models import resolve_model

    for name in ("tiny", "tiny-wan-i2v", "toy"):
        resolve_model(name)


@pytest.mark.parametrize("command,argv,message", CLI_CASES)
def test_cli_refuses_in_one_line_before_loading(tmp_path, monkeypatch, capsys, built_models, command, argv, message):
    from diffusers import DiffusionPipeline

    from supergen.cli import main

    if command == "demo":
        pytest.importorskip("gradio", reason="the demo needs the [demo] extra")
    out = tmp_path / "out"
    out.mkdir()
    files = _inputs(tmp_path / "in")
    argv = [a.replace("{out}", str(out)) for a in argv]
    argv = [files[a[4:-1]] if a.startswith("{in:") else a for a in argv]

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the request was refused")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", no_loading)
    base = {"generate": ["--prompt", PROMPT, "--steps", "1", "--output", str(out / "o.mp4")],
            "stream": ["--prompt", PROMPT, "--blocks", "1", "--output", str(out / "o.mp4")],
            "demo": []}[command]
    started = time.perf_counter()
    code = main([command, *base, *argv])
    elapsed = time.perf_counter() - started
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith(f"supergen {command}: error: ")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err and "weights_only=False" not in err
    assert elapsed < FAST_S
    assert list(out.iterdir()) == []
    assert not (tmp_path / "in" / "payload-ran").exists()  # the pickle's code never ran


# --- the real command line, in a subprocess like a shell: exit status, stderr, no traceback ---------------------

def _run(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "supergen", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))


@pytest.mark.parametrize(
    "args,env,message",
    [
        pytest.param(["--model", "someorg/no-such-model"], {"HF_HUB_OFFLINE": "1"}, "annot load model", id="hub-offline"),
        pytest.param(["--output", "/sys/a.mp4"], {}, "cannot write to the output directory", id="subprocess-sys"),
        pytest.param(["--height", "100000", "--width", "100000"], {}, "needs about", id="subprocess-huge"),
    ],
)
def test_cli_subprocess_refusals_are_one_line(tmp_path, args, env, message):
    out = tmp_path / "o.mp4"
    started = time.perf_counter()
    res = _run("generate", "--prompt", PROMPT, "--steps", "1", "--output", str(out), *args, env=env)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr and "Traceback" not in res.stderr
    assert time.perf_counter() - started < 60
    assert list(tmp_path.iterdir()) == []


def test_debug_log_level_keeps_the_traceback(tmp_path):
    res = _run("generate", "--prompt", PROMPT, "--output", "/sys/a.mp4", "--log-level", "DEBUG")
    assert res.returncode == 2
    assert "Traceback" in res.stderr and "cannot write to the output directory" in res.stderr


def test_ctrl_c_exits_130_in_one_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "supergen", "generate", "--prompt", PROMPT, "--steps", "400",
             "--output", str(out / "o.mp4")], cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
    deadline = time.monotonic() + 120
    while "sketch" not in log.read_text():  # the denoising has started
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=60)
    err = log.read_text()
    assert code == 130, err
    assert "supergen generate: interrupted (Ctrl-C); nothing was written" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert list(out.iterdir()) == []


# --- the Python API -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def counted(tiny):
    """The shared tiny pipeline with a count of transformer calls (the model work a refusal must not start)."""
    calls = []
    hook = tiny.pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    yield tiny, calls
    hook.remove()


API_CALL = [
    ("steps-zero", dict(num_inference_steps=0), ValueError, "num_inference_steps=0 must be >= 1"),
    ("prompt-none", dict(prompt=None), TypeError, "prompt must be a string, got NoneType"),
    ("prompt-list", dict(prompt=["a", "b"]), TypeError, "batches of prompts are not supported"),
    ("height-str", dict(height="64"), TypeError, "height must be an int or None, got str '64'"),
    ("height-float", dict(height=64.0), TypeError, "height must be an int or None, got float 64.0"),
    ("tiling-dict", dict(tiling={"overlap": 16}), TypeError, "tiling must be a TilingConfig or None, got dict"),
    ("cache-str", dict(cache="region"), TypeError, "cache must be a CacheConfig or None, got str"),
    ("seed-2**70", dict(seed=2**70), ValueError, "is out of range: torch seeds are 64-bit"),
    ("seed-float", dict(seed=1.5), TypeError, "seed must be an int, got float"),
    ("generator-int", dict(generator=0), TypeError, "generator must be a torch.Generator or None"),
    ("guidance-nan", dict(guidance_scale=float("nan")), ValueError, "guidance_scale=nan must be a finite number"),
    ("negative-prompt-int", dict(negative_prompt=3), TypeError, "negative_prompt must be a string or None"),
    ("huge-size", dict(height=100000, width=100000), ValueError, "the largest size of this aspect ratio that fits"),
    ("num-frames-zero", dict(num_frames=0), ValueError, "num_frames=0 must be >= 1"),
    ("max-memory-1M", dict(max_memory="1M"), ValueError, "(the --max-memory / max_memory budget)"),
    ("output-type", dict(output_type="png"), ValueError, "output_type='png' must be uint8, float or latent"),
    ("max-seq-len-zero", dict(max_sequence_length=0), ValueError, "max_sequence_length=0 must be >= 1"),
    ("too-many-tiles", dict(height=2112, width=3168, tiling=TilingConfig()), ValueError, "1,089 tiles per step"),
]
API_STREAM = [
    ("stream-prompt-none", dict(prompt=None), TypeError, "prompt must be a string"),
    ("stream-blocks-zero", dict(num_blocks=0), ValueError, "num_blocks=0 must be >= 1"),
    ("stream-height-str", dict(height="64"), TypeError, "height must be an int or None, got str"),
    ("stream-config-dict", dict(stream={"steps": 4}), TypeError, "stream must be a StreamConfig or None, got dict"),
    ("stream-huge", dict(height=100000, width=100000), ValueError, "the largest frame of this aspect ratio"),
    ("stream-max-memory", dict(max_memory="2M"), ValueError, "(the --max-memory / max_memory budget)"),
]


@pytest.mark.parametrize("kwargs,error,message", [pytest.param(k, e, m, id=i) for i, k, e, m in API_CALL])
def test_api_call_refuses_before_model_work(counted, kwargs, error, message):
    pipe, calls = counted
    kwargs = dict(dict(prompt=PROMPT, num_inference_steps=2, progress=False), **kwargs)
    before, started = len(calls), time.perf_counter()
    with pytest.raises(error) as info:
        pipe(kwargs.pop("prompt"), **kwargs)
    assert message in str(info.value)
    assert len(calls) == before and time.perf_counter() - started < FAST_S


@pytest.mark.parametrize("kwargs,error,message", [pytest.param(k, e, m, id=i) for i, k, e, m in API_STREAM])
def test_api_stream_refuses_before_model_work(counted, kwargs, error, message):
    pipe, calls = counted
    kwargs = dict(dict(prompt=PROMPT, num_blocks=1, stream=StreamConfig()), **kwargs)
    before = len(calls)
    with pytest.raises(error) as info:
        pipe.stream(kwargs.pop("prompt"), **kwargs)
    assert message in str(info.value)
    assert len(calls) == before


def test_api_device_is_checked_before_loading(monkeypatch, built_models):
    from diffusers import DiffusionPipeline

    from supergen import SuperGenPipeline

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(ValueError, match="device 'tpu9' is not a torch device"):
        SuperGenPipeline.from_pretrained("tiny", device="tpu9")


def test_api_warns_about_a_truncated_prompt_and_small_tiles(counted, caplog):
    pipe, _ = counted
    with caplog.at_level("WARNING"):
        pipe("red circle " * 400, height=64, width=96, num_inference_steps=1, progress=False, output_type="latent",
             tiling=TilingConfig(tile_height=32, tile_width=48, strength=1.0), cache=CacheConfig())
    assert "the text encoder reads only the first 512" in caplog.text
    assert "tiles smaller than the model's native size (tile_height 32 < native 64" in caplog.text


# --- the demo (its backend, in this process: the page shows these messages as they are) -----------------------

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from supergen.demo import DemoBackend

    backend = DemoBackend("tiny", workdir=str(tmp_path_factory.mktemp("demo")))
    calls = []
    backend.pipe.pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    return backend, calls


TILED = dict(prompt=PROMPT, height=128, width=192, num_frames=9, steps=2, seed=0, cache="off", overlap=0,
             shift="wrap", rope="local")
STREAMED = dict(session="s", prompt=PROMPT, height=64, width=96, blocks=1, steps=2, seed=0)
DEMO_CASES = [
    ("demo-huge", "tiled", dict(height=100000, width=100000), ValueError, "the largest size of this aspect ratio"),
    ("demo-height-empty", "tiled", dict(height=None), ValueError, "Height is empty: enter a whole number"),
    ("demo-height-fraction", "tiled", dict(height=100.5), ValueError, "Height 100.5 is not a whole number"),
    ("demo-height-not-multiple", "tiled", dict(height=100), ValueError, "height 100 is not a multiple of 16"),
    ("demo-prompt-none", "tiled", dict(prompt=None), TypeError, "prompt must be a string"),
    ("demo-overlap-negative", "tiled", dict(overlap=-8), ValueError, "overlap=-8 must be an integer >= 0"),
    ("demo-stream-blocks-zero", "stream", dict(blocks=0), ValueError, "num_blocks=0 must be >= 1"),
    ("demo-stream-huge", "stream", dict(height=100000, width=100000), ValueError, "the largest frame"),
    ("demo-stream-steps-empty", "stream", dict(steps=None), ValueError, "Steps is empty"),
]


@pytest.mark.parametrize("mode,kwargs,error,message", [pytest.param(*c[1:], id=c[0]) for c in DEMO_CASES])
def test_demo_refuses_before_model_work_and_keeps_no_files(demo, mode, kwargs, error, message):
    backend, calls = demo
    before, files = len(calls), set(backend.workdir.iterdir())
    with pytest.raises(error) as info:
        if mode == "tiled":
            backend.generate_tiled(**dict(TILED, **kwargs))
        else:
            list(backend.generate_stream(**dict(STREAMED, **kwargs)))
    assert message in str(info.value)
    assert len(calls) == before
    assert set(backend.workdir.iterdir()) == files


def test_demo_keeps_serving_after_errors(demo):
    backend, calls = demo
    with pytest.raises(ValueError):
        backend.generate_tiled(**dict(TILED, height=100))
    path, status = backend.generate_tiled(**TILED)
    assert Path(path).stat().st_size > 0 and "4 tiles" in status and calls


def test_demo_dtype_reaches_the_model_load():
    from supergen.cli import _dtype, build_parser
    from supergen.demo import DemoBackend

    args = build_parser().parse_args(["demo", "--dtype", "bfloat16", "--model", "tiny"])
    backend = DemoBackend(args.model, dtype=_dtype(args.dtype))
    assert backend.pipe.pipe.transformer.dtype == torch.bfloat16
