"""``supergen demo``: a Gradio app that streams video into the browser as it is made.

Two modes share one page:

- **stream**: block-wise generation (``SuperGenPipeline.stream``); every finished
  block is encoded as a short H.264 chunk and pushed to a streaming ``gr.Video``,
  so frames appear while later blocks are still being denoised. The prompt box
  can be changed while a stream runs ("Apply to next block"). Stop ends the
  stream at the next block boundary and still delivers the mp4 of what was made.
- **ultra-high resolution**: the tiled pipeline, with a progress bar, then the video.

The finished video is offered as a downloadable mp4 either way. The queue runs
one generation at a time (``--concurrency``); other visitors see their position.
A bad request (an impossible size, an empty field) is refused in one line before
any model work and the server keeps serving. Gradio's API is served too, so
``gradio_client`` can drive the app (endpoints ``/generate``, ``/set_prompt``
and ``/stop``).
"""

# No `from __future__ import annotations` here: Gradio finds the gr.Request
# parameter by its (evaluated) annotation.
import dataclasses
import logging
import tempfile
import threading
import time
from pathlib import Path

from supergen.config import (
    COHERENCE_GUIDES,
    COHERENCE_VIEWS,
    ROPE_MODES,
    SHIFT_MODES,
    CacheConfig,
    CoherenceConfig,
    GenerationConfig,
    TilingConfig,
)

logger = logging.getLogger(__name__)

MODES = ("stream", "ultra-high resolution")


class Stopped(Exception):
    """Raised inside a tiled run at the next model call once its visitor pressed Stop."""


def whole_number(label: str, value) -> int:
    """A number field's value as an int, or a ``ValueError`` a visitor can act on (fields can be cleared)."""
    if value is None or value == "":
        raise ValueError(f"{label} is empty: enter a whole number")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{label} {value!r} is not a number") from None
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{label} {value:g} is not a whole number")
    return int(value)


# The model stream mode uses when the demo serves one that was not trained to stream.
STREAM_MODEL_FOR = {"toy": "toy-causal"}


class DemoBackend:
    """Owns the loaded pipeline and the live prompts of running streams.

    One pipeline per process; generations are serialised by Gradio's queue
    (``concurrency_limit``), so the model is never used by two requests at once.
    """

    def __init__(self, model: str = "toy", device: str | None = None, workdir: str | None = None, dtype=None,
                 max_memory: str | int | None = None, stream_model: str | None = None):
        from supergen.pipeline import SuperGenPipeline

        self.model = model
        # Streams need a block-causal model: the toy's causal sibling streams in its place
        # (the toy itself re-draws every block from the middle of the frame).
        self.stream_model = stream_model or (STREAM_MODEL_FOR.get(model, model))
        self.max_memory = max_memory
        self.pipe = SuperGenPipeline.from_pretrained(model, torch_dtype=dtype, device=device)
        self.stream_pipe = (self.pipe if self.stream_model == model
                            else SuperGenPipeline.from_pretrained(self.stream_model, torch_dtype=dtype, device=device))
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="supergen-demo-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._live_prompts: dict[str, str] = {}
        self._stop_requests: set[str] = set()
        self._lock = threading.Lock()
        # Held while the model computes. Gradio's Stop abandons a generator
        # between blocks without closing it, so the next generation closes the
        # abandoned stream (restoring the transformer's processors) under this lock.
        self._model_lock = threading.Lock()
        self._active_stream = None
        self._active_writer = None

    def _release_abandoned_stream(self) -> None:
        if self._active_stream is not None:
            logger.info("closing a stream that was stopped by its visitor")
            self._active_stream.close()
            self._active_writer.close(keep=True)
            self._active_stream = self._active_writer = None

    @property
    def native(self) -> tuple[int, int, int]:
        a = self.pipe.adapter
        return a.native_height, a.native_width, a.native_num_frames

    def set_live_prompt(self, session: str, prompt: str) -> None:
        with self._lock:
            self._live_prompts[session] = prompt

    def take_live_prompt(self, session: str) -> str | None:
        with self._lock:
            return self._live_prompts.pop(session, None)

    def request_stop(self, session: str) -> None:
        """Ask the session's running generation to stop at its next block (stream) or model call (tiled)."""
        with self._lock:
            self._stop_requests.add(session)

    def take_stop(self, session: str) -> bool:
        with self._lock:
            if session in self._stop_requests:
                self._stop_requests.discard(session)
                return True
            return False

    def _run_dir(self) -> Path:
        return Path(tempfile.mkdtemp(prefix="run-", dir=self.workdir))

    # --- the two modes ------------------------------------------------------
    def generate_tiled(self, prompt, height, width, num_frames, steps, seed, cache, overlap, shift, rope, fps=16,
                       strength=TilingConfig.strength, coherence_guide=CoherenceConfig.guide,
                       global_views=CoherenceConfig.views, session: str = "api"):
        """Run the tiled pipeline; returns (mp4 path, status line). Raises :class:`Stopped` after a Stop."""
        from supergen.io import write_video

        tiling = TilingConfig(overlap=whole_number("Tile overlap", overlap), shift=shift, rope=rope,
                              strength=float(strength))
        # The same request the CLI and the Python API run.
        config = GenerationConfig(
            prompt=prompt,
            coherence=CoherenceConfig(guide=coherence_guide, views=global_views),
            height=whole_number("Height", height),
            width=whole_number("Width", width),
            num_frames=whole_number("Frames", num_frames),
            num_inference_steps=whole_number("Steps", steps),
            seed=whole_number("Seed", seed),
            tiling=tiling,
            **self._cache_kwargs(cache),
        )
        self.take_stop(session)  # a Stop pressed before this run belongs to an earlier one

        def stop_between_model_calls(*_):
            if self.take_stop(session):
                raise Stopped()

        with self._model_lock:
            self._release_abandoned_stream()
            hook = self.pipe.pipe.transformer.register_forward_pre_hook(stop_between_model_calls)
            try:
                result = self.pipe.generate(config, max_memory=self.max_memory)
            finally:
                hook.remove()
        path = self._run_dir() / "supergen.mp4"
        write_video(path, result.frames, fps=fps)
        m = result.metrics
        tiles = m["tiles"]
        status = (
            f"{int(width)}x{int(height)}, {int(num_frames)} frames: {tiles['count']} tiles, "
            f"{tiles['tile_steps_computed']}/{tiles['tile_steps_total']} tile-steps computed, "
            f"{m['wall_s']:.1f} s"
        )
        return str(path), status

    def _cache_kwargs(self, cache: str) -> dict:
        return {} if cache == "off" else {"cache": CacheConfig(mode=cache)}

    def generate_stream(self, session, prompt, height, width, blocks, steps, seed, fps=16):
        """Yield ``(chunk_mp4, final_mp4, status)`` as blocks finish; the last item carries the final video.

        The prompt registered for ``session`` through :meth:`set_live_prompt`
        takes effect at the next block. Closing this generator (Gradio's Stop)
        closes the stream, which frees its caches, and keeps the video so far.
        """
        from supergen.io import VideoWriter, write_video

        blocks = whole_number("Blocks", blocks)
        config = dataclasses.replace(self.stream_pipe.default_stream_config, steps=whole_number("Steps", steps))
        size = dict(height=whole_number("Height", height), width=whole_number("Width", width))
        with self._model_lock:
            self._release_abandoned_stream()
            stream = self.stream_pipe.stream(prompt, num_blocks=blocks, stream=config, seed=whole_number("Seed", seed),
                                      max_memory=self.max_memory, **size)
            run_dir = self._run_dir()
            final = run_dir / "supergen.mp4"
            writer = VideoWriter(final, fps=fps)
            self._active_stream, self._active_writer = stream, writer
        started = time.perf_counter()
        frames = 0
        # A prompt or a Stop sent before this stream started belongs to an earlier one.
        self.take_live_prompt(session)
        self.take_stop(session)
        current = prompt
        stopped = False
        try:
            while True:
                if self.take_stop(session):
                    stopped = True
                    break
                # The stream and its writer are touched only under the model lock: a later
                # request may close both after Gradio abandoned this generator, and closing
                # the encoder while this thread appends to it fails ("generator already executing").
                with self._model_lock:
                    if stream is not self._active_stream:
                        return  # closed by a later request after a Stop
                    block = next(stream, None)
                    if block is None:
                        break
                    new_prompt = self.take_live_prompt(session)
                    if new_prompt:
                        stream.set_prompt(new_prompt)
                        current = new_prompt
                        logger.info("session %s: prompt changed to %r from block %d", session, new_prompt,
                                    block.index + 2)
                    writer.append(block.frames)
                chunk = run_dir / f"block-{block.index:05d}.mp4"
                write_video(chunk, block.frames, fps=fps)
                frames += len(block.frames)
                status = (
                    f"block {block.index + 1}/{blocks}: {frames} frames, "
                    f"{block.metrics.get('latency_s', 0.0):.2f} s for this block, "
                    f"{time.perf_counter() - started:.1f} s in all; next block: {current!r}"
                )
                yield str(chunk), None, status
        finally:
            with self._model_lock:
                if self._active_stream is stream:
                    stream.close()
                    writer.close(keep=True)
                    self._active_stream = self._active_writer = None
        word = "stopped" if stopped else "done"
        yield None, str(final), f"{word}: {frames} frames in {time.perf_counter() - started:.1f} s"


# Pixels: players keep the video's aspect ratio inside this height instead of stretching to the page width.
VIDEO_HEIGHT = 360


def one_line(err: BaseException) -> str:
    """An exception's message on one line (the page shows it in a toast)."""
    return " ".join(str(err).split()) or type(err).__name__


def build_app(backend: DemoBackend, concurrency: int = 1, max_queue: int = 16):
    """The Gradio Blocks app around ``backend``."""
    import gradio as gr

    nh, nw, nf = backend.native
    with gr.Blocks(title="SuperGen") as app:
        gr.Markdown(
            f"# SuperGen\nModel `{backend.model}` (native {nw}x{nh}, {nf} frames). "
            f"**stream** (model `{backend.stream_model}`): endless block-wise video, frames appear as each block "
            "finishes. "
            "**ultra-high resolution**: tiled refinement above the native size."
        )
        with gr.Row():
            with gr.Column(scale=1):
                inputs = _inputs(gr, backend)
                with gr.Row():
                    go = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                    apply = gr.Button("Apply prompt to next block", elem_id="apply-prompt")
            with gr.Column(scale=2):
                # Above the players and with their height capped, so it stays in view while frames arrive.
                status = gr.Markdown(elem_id="status")
                live = gr.Video(label="Live", streaming=True, autoplay=True, elem_id="live", height=VIDEO_HEIGHT)
                final = gr.Video(label="Result (mp4)", elem_id="final", height=VIDEO_HEIGHT)
        go.click(
            _run_handler(gr, backend), [inputs[name] for name in RUN_INPUTS], [live, final, status],
            api_name="generate", concurrency_limit=concurrency, concurrency_id="generation",
        )
        # Not a cancel: the run ends itself at the next block and still hands over the mp4 made so far.
        stop.click(_stop_handler(gr, backend), None, [status], api_name="stop", queue=False)
        # Not queued behind the running generation: a prompt change must reach it mid-stream.
        apply.click(_prompt_handler(gr, backend), [inputs["prompt"]], [status], api_name="set_prompt", queue=False)
    app.queue(max_size=max_queue, default_concurrency_limit=concurrency)
    return app


#: The ``/generate`` endpoint's inputs, in the order of its parameters (``gradio_client`` calls them by name).
RUN_INPUTS = ("mode", "prompt", "height", "width", "frames", "blocks", "steps", "seed", "cache", "overlap", "shift",
              "rope", "strength", "coherence_guide", "global_views")


def _inputs(gr, backend: DemoBackend) -> dict:
    """The request's fields, by the name of the ``/generate`` parameter each one fills."""
    nh, nw, nf = backend.native
    fields = {"prompt": gr.Textbox(label="Prompt", value="a red circle moving left over a blue sky", elem_id="prompt"),
              "mode": gr.Radio(list(MODES), value="stream", label="Mode", elem_id="mode")}
    with gr.Row():
        fields["height"] = gr.Number(value=nh, precision=0, label="Height (px)", elem_id="height")
        fields["width"] = gr.Number(value=nw, precision=0, label="Width (px)", elem_id="width")
    with gr.Row():
        fields["blocks"] = gr.Slider(1, 200, value=8, step=1, label="Blocks (stream length)", elem_id="blocks")
        fields["frames"] = gr.Number(value=nf, precision=0, label="Frames (tiled)", elem_id="frames")
    with gr.Row():
        fields["steps"] = gr.Slider(1, 50, value=4, step=1, label="Steps", elem_id="steps")
        fields["seed"] = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
    with gr.Accordion("Tiling and cache (ultra-high resolution)", open=False):
        fields.update(
            strength=gr.Slider(0.1, 1.0, value=TilingConfig.strength, step=0.05, label="Refinement strength"),
            coherence_guide=gr.Radio(list(COHERENCE_GUIDES), value=CoherenceConfig.guide,
                                     label="Sketch guidance (one subject, not one per tile)"),
            global_views=gr.Radio(list(COHERENCE_VIEWS), value=CoherenceConfig.views, label="Global views"),
            cache=gr.Radio(["off", "region"], value=CacheConfig.mode, label="Region cache"),
            overlap=gr.Number(value=TilingConfig.overlap, precision=0, label="Tile overlap (px)"),
            shift=gr.Radio(list(SHIFT_MODES), value=TilingConfig.shift, label="Grid shift"),
            rope=gr.Radio(list(ROPE_MODES), value=TilingConfig.rope, label="Tile RoPE"),
        )
    return fields


def _session(request) -> str:
    return request.session_hash if request is not None else "api"


def _run_handler(gr, backend: DemoBackend):
    """The ``/generate`` endpoint: a stream's blocks as they finish, or a tiled run's video at its end."""

    def run(mode, prompt, height, width, frames, blocks, steps, seed, cache, overlap, shift, rope,
            strength=TilingConfig.strength, coherence_guide=CoherenceConfig.guide, global_views=CoherenceConfig.views,
            request: gr.Request = None, progress=gr.Progress(track_tqdm=True)):
        session = _session(request)
        try:
            if mode == "stream":
                yield from backend.generate_stream(session, prompt, height, width, blocks, steps, seed)
            else:
                yield None, None, "refining tiles..."
                path, status = backend.generate_tiled(
                    prompt, height, width, frames, steps, seed, cache, overlap, shift, rope, strength=strength,
                    coherence_guide=coherence_guide, global_views=global_views, session=session,
                )
                yield None, path, status
        except Stopped:
            yield None, None, "stopped: a tiled run makes its video only at the end, so there is none to show"
        except (ValueError, TypeError) as err:
            # Bad requests are the visitor's to fix: say what is wrong in one line, keep serving.
            raise gr.Error(one_line(err)) from None
        except Exception as err:  # noqa: BLE001 - the page shows a message, the log keeps the trace
            logger.exception("generation failed")
            raise gr.Error(f"generation failed: {type(err).__name__}: {one_line(err)}") from None

    return run


def _prompt_handler(gr, backend: DemoBackend):
    def set_prompt(prompt, request: gr.Request):
        backend.set_live_prompt(_session(request), prompt)
        return f"next block uses: {prompt!r}"

    return set_prompt


def _stop_handler(gr, backend: DemoBackend):
    def stop_run(request: gr.Request):
        backend.request_stop(_session(request))
        return "stopping at the next block..."

    return stop_run


def serve(model: str = "toy", host: str = "127.0.0.1", port: int = 7860, device: str | None = None,
          concurrency: int = 1, block: bool = True, dtype=None, max_memory: str | int | None = None):
    """Load the model (``dtype``: weights dtype, default per device), build the app and start serving."""
    backend = DemoBackend(model, device=device, dtype=dtype, max_memory=max_memory)
    app = build_app(backend, concurrency=concurrency)
    logger.info("serving SuperGen demo for model %s on http://%s:%d", model, host, port)
    app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=False, ssr_mode=False)
    return app
