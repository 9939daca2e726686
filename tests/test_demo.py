"""The Gradio demo, served on 127.0.0.1 by `python -m supergen demo` in a subprocess.

Driven two ways: through Gradio's API with gradio_client, and in a real headless
Chromium (Debian's package, installed by .ci/run) with Playwright. Each server
is started once per module and stopped at the end; every wait is bounded.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

gradio_client = pytest.importorskip("gradio_client", reason="Gradio is missing: pip install -e '.[test]'")

# Gradio encodes the streamed chunks with ffmpeg and probes them with ffprobe (system packages, not pip's).
FFMPEG = shutil.which("ffmpeg") and shutil.which("ffprobe")
needs_ffmpeg = pytest.mark.skipif(not FFMPEG, reason="ffmpeg/ffprobe not on PATH: apt-get install ffmpeg (.ci/run does)")

ARTIFACTS = Path(os.environ.get("SUPERGEN_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("demo") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "supergen", "demo", "--model", "tiny", "--host", "127.0.0.1", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, GRADIO_ANALYTICS_ENABLED="False"),
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"demo exited early ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"demo did not start within 180 s:\n{log.read_text()[-3000:]}")
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def _args(**overrides):
    args = dict(
        mode="stream", prompt="a red circle moving left", height=64, width=96, frames=9, blocks=4, steps=2, seed=0,
        cache="off", overlap=0, shift="wrap", rope="local",
    )
    args.update(overrides)
    return args


@needs_ffmpeg
def test_stream_yields_partial_outputs_before_the_final_one(demo_url):
    client = gradio_client.Client(demo_url, verbose=False)
    job = client.submit(**_args(blocks=4), api_name="/generate")
    updates = []
    deadline = time.monotonic() + 240
    while not job.done():
        assert time.monotonic() < deadline, "stream did not finish in 240 s"
        time.sleep(0.2)
    updates = job.outputs()
    statuses = [u[2] for u in updates]
    partial = [s for s in statuses if s and s.startswith("block ")]
    # One partial output per block, all before the final one.
    assert len(partial) >= 2, statuses
    assert statuses[-1].startswith("done: ")
    final_video = updates[-1][1]
    path = final_video["video"] if isinstance(final_video, dict) else final_video
    assert path and Path(path).stat().st_size > 0
    import imageio.v3 as iio

    frames = iio.imread(path)
    # 4 blocks of 3 latent frames: 9 frames, then 12 per block.
    assert frames.shape == (9 + 3 * 12, 64, 96, 3)


def test_bad_request_returns_message_and_server_keeps_serving(demo_url):
    client = gradio_client.Client(demo_url, verbose=False)
    with pytest.raises(Exception, match="not a multiple of 16"):
        client.predict(**_args(mode="ultra-high resolution", height=100, width=192), api_name="/generate")
    # The same server then serves a good tiled request.
    result = client.predict(
        **_args(mode="ultra-high resolution", height=128, width=192, steps=8, cache="region"), api_name="/generate"
    )
    assert "4 tiles" in result[2]


@needs_ffmpeg
def test_stop_keeps_a_playable_video_and_says_stopped(demo_url):
    import imageio.v3 as iio

    client = gradio_client.Client(demo_url, verbose=False)
    job = client.submit(**_args(blocks=200), api_name="/generate")
    # Block 2 or later: updates can arrive in bursts, so the last one seen may already be past block 2.
    _wait_for(job, lambda out: bool(out[2]) and out[2].startswith("block ") and _block_number(out[2]) >= 2)
    client.predict(api_name="/stop")
    deadline = time.monotonic() + 120
    while not job.done():
        assert time.monotonic() < deadline, "the stream did not stop"
        time.sleep(0.2)
    last = job.outputs()[-1]
    assert last[2].startswith("stopped: "), last[2]
    path = last[1]["video"] if isinstance(last[1], dict) else last[1]
    frames = iio.imread(path)
    assert 9 + 12 <= len(frames) < 9 + 199 * 12 and frames.shape[1:] == (64, 96, 3)
    # The server goes on serving the same visitor.
    assert client.predict(**_args(blocks=1), api_name="/generate")[2].startswith("done: ")


def _block_number(status: str) -> int:
    """'block 7/200: ...' -> 7."""
    return int(status.split()[1].split("/")[0])


def _wait_for(job, predicate, timeout=180):
    """The first output so far that satisfies ``predicate`` (any of them, not only the latest)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        outputs = job.outputs()
        hit = next((out for out in outputs if predicate(out)), None)
        if hit is not None:
            return hit
        if job.done():
            break
        time.sleep(0.2)
    raise AssertionError(f"condition not reached; last outputs: {job.outputs()[-3:]}")


@needs_ffmpeg
def test_prompt_change_stop_and_queue_position(demo_url):
    first = gradio_client.Client(demo_url, verbose=False)
    second = gradio_client.Client(demo_url, verbose=False)
    long_stream = first.submit(**_args(blocks=200), api_name="/generate")
    _wait_for(long_stream, lambda out: out[2] and out[2].startswith("block "))

    # A prompt change from the same visitor reaches the running stream at its next block.
    first.predict("a blue square moving up", api_name="/set_prompt")
    _wait_for(long_stream, lambda out: "next block: 'a blue square moving up'" in (out[2] or ""))

    # A second visitor queues behind the stream with a visible position.
    waiting = second.submit(**_args(mode="ultra-high resolution", height=128, width=192, steps=2), api_name="/generate")
    deadline = time.monotonic() + 30
    while waiting.status().code.name != "IN_QUEUE":
        assert time.monotonic() < deadline, waiting.status()
        time.sleep(0.1)
    assert waiting.status().rank is not None

    # Stop ends the 200-block stream promptly and frees the worker for the queued visitor.
    import httpx

    stopped_at = time.monotonic()
    try:
        long_stream.cancel()
    except httpx.TimeoutException:
        pass  # the server answers once the block in progress ends; the status below is what counts
    deadline = time.monotonic() + 60
    while long_stream.status().code.name != "CANCELLED":
        assert time.monotonic() < deadline, long_stream.status()
        time.sleep(0.2)
    result = waiting.result(timeout=240)
    assert "4 tiles" in result[2]
    assert time.monotonic() - stopped_at < 240
    assert not long_stream.outputs()[-1][2].startswith("block 200/")


BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(BROWSER is None, reason="Debian's chromium is not installed (.ci/run installs it)")
@needs_ffmpeg
def test_browser_sees_frames_before_generation_ends(demo_url):
    sync_api = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=BROWSER,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(120_000)
            page.goto(demo_url)
            page.locator("#prompt textarea").fill("a green triangle moving right over a dark sea")
            blocks = page.locator("#blocks input[type=number]")
            blocks.fill("40")
            blocks.press("Enter")
            page.locator("#generate").click()
            # The live <video> gets decodable data (readyState >= 2) while the stream still runs.
            page.wait_for_function(
                "() => { const v = document.querySelector('#live video'); return v && v.readyState >= 2; }",
                timeout=120_000,
            )
            status = page.locator("#status").inner_text()
            assert status.startswith("block "), status
            assert not status.startswith("done"), status
            # The status stays in view above the players, whose height is capped instead of following the page width.
            from supergen.demo import VIDEO_HEIGHT

            box = page.locator("#status").bounding_box()
            assert box is not None and 0 <= box["y"] and box["y"] + box["height"] <= 900, box
            assert page.locator("#live video").bounding_box()["height"] <= VIDEO_HEIGHT + 1
            page.screenshot(path=str(ARTIFACTS / "demo.png"))
            # Stop ends the stream at the next block and still shows the result made so far.
            page.locator("#stop").click()
            page.wait_for_function(
                "() => document.querySelector('#status').innerText.startsWith('stopped')", timeout=120_000
            )
            page.wait_for_function(
                "() => { const v = document.querySelector('#final video'); return v && v.readyState >= 1; }",
                timeout=60_000,
            )
        finally:
            browser.close()


@needs_ffmpeg
def test_abandoned_stream_is_closed_only_between_its_blocks(tmp_path):
    """A later request closes a stream Gradio abandoned; never while that stream's thread still writes a block.

    Gradio's cancel leaves the generator's thread running to the end of its
    block. The later request must wait for it: closing the encoder mid-append
    fails the later request with "generator already executing" (seen in CI).
    """
    import threading

    from supergen.demo import DemoBackend

    backend = DemoBackend("tiny", workdir=str(tmp_path))
    first = backend.generate_stream(session="a", prompt="a red circle moving left", height=64, width=96, blocks=4,
                                    steps=1, seed=0)
    next(first)
    writer = backend._active_writer
    appending, release = threading.Event(), threading.Event()
    original = writer.append

    def slow_append(frames):
        appending.set()
        assert release.wait(60)
        original(frames)

    writer.append = slow_append
    errors = []

    def run(fn):
        try:
            fn()
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    abandoned = threading.Thread(target=run, args=(lambda: next(first),))
    abandoned.start()
    assert appending.wait(120), "the abandoned stream never reached its second block's append"
    later = threading.Thread(target=run, args=(lambda: list(backend.generate_stream(
        session="b", prompt="a blue square moving up", height=64, width=96, blocks=1, steps=1, seed=0)),))
    later.start()
    later.join(1.0)
    assert later.is_alive() and not writer._closed, "the later request closed the writer during an append"
    release.set()
    abandoned.join(120)
    later.join(120)
    assert not abandoned.is_alive() and not later.is_alive()
    assert errors == []
    assert writer._closed  # the later request closed the abandoned stream's writer, after its block
