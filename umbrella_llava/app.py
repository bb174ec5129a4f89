"""`umbrella-app`: a web page where a colleague drops scans and asks questions about them (Gradio).

```
umbrella-app --model DIR [--host 127.0.0.1] [--port 7860] [--max_upload_mb 512]
```

The page is a thin layer over the plain functions here, which hold the logic and are tested without a browser:

- `open_scans` turns uploaded files (`.nii`, `.nii.gz`, or a `.zip` of one DICOM series) into a `ScanSession`: the
  scans preprocessed once into a `chat.VolumeConversation`, so follow-up questions continue from generate()'s cache
  and no scan is encoded twice. A bad upload is an `UploadError` whose message the page shows.
- `ScanSession.ask` answers a question (the first about the scans, later ones following up);
  `ScanSession.explain_last_answer` computes where in each scan the last answer came from (`explain.py`'s gradient
  methods, in the conversation's own context); `planes_image` and `relevance_image` draw the scans in their three
  labelled planes, plain or with the relevance map over them.
- `answer(model, processor, files, question)` is one question about uploaded files; `build_app` exposes it as the
  API endpoint `/answer`, so `gradio_client.Client(url).predict([handle_file("t1.nii.gz")], "Question?",
  api_name="/answer")` returns the answer text.

Needs the `app` extra (Gradio, and Captum for the relevance map): `pip install 'umbrella_llava[app]'`. Gradio is
imported only by `build_app` and `main`, so `import umbrella_llava.app` works without it.
"""

import argparse
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .chat import VolumeConversation, add_model_arguments, load_for_answering
from .explain import DEFAULT_METHOD, GRADIENT_METHODS, answer_log_likelihood, gradient_relevance
from .preview import PLANES, frames_argument, label_edges
from .processing_umbrella_llava import UmbrellaLlavaProcessor
from .relevance_figure import planes_through, quoted_for_title, render_relevance
from .uploads import DEFAULT_MAX_UPLOAD_MB, UPLOAD_HELP, UploadError, scan_sources

RELEVANCE_METHODS = GRADIENT_METHODS


def require_gradio():
    """Import `gradio`, or raise an `ImportError` naming the extra to install."""
    try:
        import gradio
    except ImportError as error:
        raise ImportError(
            "The web app uses Gradio, which is not installed: `pip install 'umbrella_llava[app]'`."
        ) from error
    return gradio


@dataclass
class ScanSession:
    """One set of uploaded scans and the conversation about them (one per browser session, in `gr.State`).

    Attributes:
        conversation: the `VolumeConversation`; its `pixel_values (1, N, C, H, W, D)` are the scans as the model
            sees them (RAS+, the model's grid).
        names: the uploaded file names, in the scans' order.
        relevance: `(N, H, W, D)` where the last answer came from, once `explain_last_answer` has run.
    """

    conversation: VolumeConversation
    names: list[str]
    relevance: torch.Tensor | None = field(default=None, repr=False)

    def ask(self, question: str) -> str:
        """Answer `question` (see `VolumeConversation.ask`); a relevance map of an earlier answer is dropped."""
        question = question.strip()
        if not question:
            raise UploadError("Type a question about the scans.")
        self.relevance = None
        return self.conversation.ask(question)

    def explain_last_answer(self, method: str = DEFAULT_METHOD, n_steps: int = 8) -> torch.Tensor:
        """Where in each scan the last answer came from: `(N, H, W, D)`, the attribution of the answer's
        log-likelihood, given the whole conversation before it, to the voxels (`explain.gradient_relevance`).

        Args:
            method: one of `explain.GRADIENT_METHODS`: `"gradient"` (the default, chosen by measurement: see
                BENCHMARKS.md, "Relevance maps"; one backward pass), `"gradient_x_input"` (one backward pass) or
                `"integrated_gradients"` (`n_steps` backward passes).

        Raises:
            UploadError: before any question, or when the last answer is empty.
            ImportError: without Captum (the message names the extra).
        """
        conversation = self.conversation
        if not conversation.messages:
            raise UploadError("Ask a question first: the map shows where its answer came from.")
        answer = conversation.messages[-1]["content"][0]["text"]
        tokenizer = conversation.processor.tokenizer
        answer_ids = torch.tensor(tokenizer(answer, add_special_tokens=False)["input_ids"], dtype=torch.long)
        if len(answer_ids) == 0:
            raise UploadError("The last answer is empty: there is nothing to show.")
        model = conversation.model
        prompt_ids = conversation.prompt_ids(conversation.messages[:-1])
        log_likelihood = answer_log_likelihood(model, prompt_ids, answer_ids)
        pixel_values = conversation.pixel_values.to(model.device, model.dtype)
        self.relevance = gradient_relevance(log_likelihood, pixel_values, method, n_steps).cpu()
        return self.relevance


def open_scans(
    model,
    processor: UmbrellaLlavaProcessor,
    paths: Sequence[str | os.PathLike],
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    max_new_tokens: int = 64,
) -> ScanSession:
    """Check and preprocess uploaded files once (see `scan_sources`); returns the session that answers about them.

    Raises:
        UploadError: for no file, or a file that is not one volume the processor accepts (the loader's message, which
            says why and what to do, with the uploaded file's name in place of the temporary path).
    """
    if not paths:
        raise UploadError(f"Upload a scan first: {UPLOAD_HELP}.")
    with tempfile.TemporaryDirectory(prefix="umbrella_app_") as workdir:
        sources = scan_sources(paths, workdir, max_upload_mb)
        try:  # preprocessed here, once; the unpacked DICOM files are not needed after
            conversation = VolumeConversation(
                model, processor, [source for _, source in sources], max_new_tokens=max_new_tokens
            )
        except (ValueError, OSError, ImportError) as error:  # InvalidVolumeError is a ValueError
            message = str(error)
            for name, source in sources:  # the name the user knows, not the temporary path
                message = message.replace(source, name)
            raise UploadError(message) from error
    return ScanSession(conversation, [name for name, _ in sources])


def answer(
    model,
    processor: UmbrellaLlavaProcessor,
    files: Sequence[str | os.PathLike],
    question: str,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    max_new_tokens: int = 64,
) -> str:
    """One question about uploaded files, answered greedily: the `/answer` endpoint of the app."""
    return open_scans(model, processor, files, max_upload_mb, max_new_tokens).ask(question)


# ---------------------------------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------------------------------


def figure_pixels(figure: Figure) -> np.ndarray:
    """`figure` drawn as an RGB image `(rows, columns, 3)` uint8, as `gr.Image` shows it."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def render_planes(volume: torch.Tensor, position: float = 50.0, title: str | None = None) -> Figure:
    """The sagittal, coronal and axial planes of `volume (C, H, W, D)` or `(H, W, D)` (its first channel; RAS+, the
    model's grid) through the voxel at `position` percent of each axis (50: the mid-planes), labelled with the
    patient's directions as `umbrella-preview` labels them."""
    volume = volume.detach().float().cpu()
    scan = volume[0] if volume.ndim == 4 else volume
    point = tuple(round(position / 100 * (size - 1)) for size in scan.shape)
    figure = Figure(figsize=(10, 3.6), layout="constrained")
    low, high = float(scan.min()), float(scan.max())
    for ax, plane, (name, axis, directions) in zip(figure.subplots(1, 3), planes_through(scan, point), PLANES):
        ax.imshow(plane.numpy(), cmap="gray", origin="lower", vmin=low, vmax=high, aspect="equal")
        ax.set_title(f"{name}, slice {point[axis]} of {scan.shape[axis]}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        label_edges(ax, directions)
    subtitle = f"planes through voxel {point} of {tuple(scan.shape)} (RAS+, the model's grid)"
    figure.suptitle(f"{title}\n{subtitle}" if title else subtitle, fontsize=10)
    return figure


def planes_image(session: ScanSession, index: int = 0, position: float = 50.0) -> np.ndarray:
    """Scan `index` of `session` in its three planes at `position` percent of each axis, as pixels."""
    volume = session.conversation.pixel_values[0, index]
    return figure_pixels(render_planes(volume, position, title=session.names[index]))


def relevance_image(session: ScanSession, index: int = 0) -> np.ndarray:
    """The relevance map of the last answer over scan `index`, in the planes through its maximum, as pixels."""
    if session.relevance is None:
        raise UploadError("No relevance map yet: ask with 'Show where' ticked.")
    messages = session.conversation.messages
    title = f"{session.names[index]}: {quoted_for_title(messages[-2]['content'][-1]['text'])} → "
    title += quoted_for_title(messages[-1]["content"][0]["text"])
    volume = session.conversation.pixel_values[0, index]
    return figure_pixels(render_relevance(volume, session.relevance[index], title=title))


# ---------------------------------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------------------------------


def _file_paths(files: Any) -> list[str]:
    """What a `gr.File(file_count="multiple")` hands over (paths, or objects with `.name`), as paths."""
    return [getattr(item, "name", item) for item in (files or [])]


def build_app(
    model,
    processor: UmbrellaLlavaProcessor,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    max_new_tokens: int = 64,
    relevance_method: str = DEFAULT_METHOD,
    n_steps: int = 8,
    title: str = "Ask about a brain scan",
):
    """The page: upload scans, see them in three planes, ask questions in a chat, and see where an answer came from.

    Args:
        model, processor: an UmbrellaLlava model (in eval mode) and its processor.
        max_upload_mb: the largest file (and unpacked zip) accepted; pass the same to `launch(max_file_size=...)`.
        max_new_tokens: the longest answer, in tokens.
        relevance_method, n_steps: how 'Show where' computes the map (see `ScanSession.explain_last_answer`).

    Returns:
        A `gr.Blocks`; its `/answer` API endpoint takes `(files, question)` and returns the answer text.
    """
    gr = require_gradio()
    if relevance_method not in RELEVANCE_METHODS:
        raise ValueError(f"relevance_method must be one of {RELEVANCE_METHODS}, not {relevance_method!r}.")

    def load(files):
        paths = _file_paths(files)
        if not paths:
            return None, [], "Upload a scan to begin.", gr.update(choices=[], value=None), None, None
        try:
            session = open_scans(model, processor, paths, max_upload_mb, max_new_tokens)
        except UploadError as error:
            gr.Warning(str(error))
            return None, [], f"**Cannot use this upload.** {error}", gr.update(choices=[], value=None), None, None
        names = list(enumerate(session.names))
        status = f"{len(names)} scan(s) ready: " + ", ".join(session.names) + ". Ask a question."
        choices = [(name, index) for index, name in names]
        return session, [], status, gr.update(choices=choices, value=0), planes_image(session), None

    def draw(session, index, position):
        if session is None or index is None:
            return None
        return planes_image(session, int(index), float(position))

    def chat(session, question, show_where, history, index):
        history = list(history or [])
        if session is None:
            gr.Warning(f"Upload a scan first: {UPLOAD_HELP}.")
            return history, question, None, f"Upload a scan first: {UPLOAD_HELP}."
        try:
            reply = session.ask(question)
        except UploadError as error:
            gr.Warning(str(error))
            return history, question, None, str(error)
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
        picture, status = None, "Answered from the cache of the turns before." if len(history) > 2 else "Answered."
        if show_where:
            try:
                session.explain_last_answer(relevance_method, n_steps)
                picture = relevance_image(session, int(index or 0))
                status += f" The map shows where the answer came from ({relevance_method.replace('_', ' ')})."
            except (UploadError, ImportError) as error:
                gr.Warning(str(error))
                status += f" {error}"
        return history, "", picture, status

    def redraw_relevance(session, index):
        if session is None or session.relevance is None or index is None:
            return None
        return relevance_image(session, int(index))

    def api_answer(files, question: str) -> str:
        try:
            return answer(model, processor, _file_paths(files), question, max_upload_mb, max_new_tokens)
        except UploadError as error:
            raise gr.Error(str(error)) from None

    with gr.Blocks(title=title) as page:
        gr.Markdown(f"# {title}\nUpload {UPLOAD_HELP} (several for a comparison), then ask about them.")
        session = gr.State(None)
        status = gr.Markdown("Upload a scan to begin.", elem_id="status")
        with gr.Row():
            with gr.Column():
                files = gr.File(label="Scans", file_count="multiple", type="filepath", elem_id="scans")
                scan = gr.Dropdown(label="Scan shown", choices=[], interactive=True)
                position = gr.Slider(0, 100, value=50, step=1, label="Slice position (% of each axis)")
            with gr.Column():
                chatbot = gr.Chatbot(label="Conversation", elem_id="chat", height=300)
                question = gr.Textbox(
                    label="Question", placeholder="Is this brain male or female?", elem_id="question"
                )
                with gr.Row():
                    ask = gr.Button("Ask", variant="primary", elem_id="ask")
                    show_where = gr.Checkbox(label="Show where (relevance map)", value=False, elem_id="show_where")
        with gr.Row():
            planes = gr.Image(label="Scan", show_label=False, type="numpy", interactive=False, elem_id="planes")
            relevance = gr.Image(
                label="Where the answer came from",
                show_label=False,
                type="numpy",
                interactive=False,
                elem_id="relevance",
            )
        api_answer_text = gr.Textbox(visible=False)
        api_button = gr.Button(visible=False)

        # One model, one call at a time; the page's own events are not API endpoints, /answer is.
        model_events = {"concurrency_id": "model", "concurrency_limit": 1}
        page_events = {**model_events, "api_visibility": "private"}
        files.change(load, [files], [session, chatbot, status, scan, planes, relevance], **page_events)
        for event in (scan.change, position.release):
            event(draw, [session, scan, position], [planes], api_visibility="private")
        scan.change(redraw_relevance, [session, scan], [relevance], api_visibility="private")
        for event in (ask.click, question.submit):
            event(chat, [session, question, show_where, chatbot, scan], [chatbot, question, relevance, status],
                  **page_events)  # fmt: skip
        api_button.click(api_answer, [files, question], [api_answer_text], api_name="answer", **model_events)
    return page


# ---------------------------------------------------------------------------------------------------------------------
# The page beside a shared model (umbrella-push --with_app)
# ---------------------------------------------------------------------------------------------------------------------

APP_REQUIREMENT = "umbrella_llava[app]"


def space_files(repo_id: str | None, requirement: str = APP_REQUIREMENT) -> dict[str, bytes]:
    """The files that put the page beside a shared model: `app.py` (`space_app.py`, with `MODEL_ID` set to
    `repo_id`, so that a Space elsewhere loads that repository) and `requirements.txt` (`requirement`, what a Space
    installs this package from, e.g. `"umbrella_llava[app] @ git+https://github.com/you/umbrella_llava"`)."""
    template = (Path(__file__).parent / "space_app.py").read_text(encoding="utf-8")
    marker = "MODEL_ID = None"
    if marker not in template:
        raise RuntimeError(f"space_app.py lacks the line {marker!r} that the repository id replaces.")
    app = template.replace(marker, f"MODEL_ID = {repo_id!r}", 1)
    return {"app.py": app.encode("utf-8"), "requirements.txt": f"{requirement}\n".encode()}


# ---------------------------------------------------------------------------------------------------------------------
# umbrella-app
# ---------------------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="umbrella-app",
        description="A web page (Gradio) where one uploads scans and asks a model about them; its answering "
        "function is also the API endpoint /answer.",
    )
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument(
        "--max_upload_mb", type=float, default=DEFAULT_MAX_UPLOAD_MB, help="largest file, or unpacked zip, in MB"
    )
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--relevance_method", choices=RELEVANCE_METHODS, default=DEFAULT_METHOD)
    parser.add_argument("--n_steps", type=int, default=8, help="integration steps of integrated gradients")
    parser.add_argument(
        "--frames",
        type=frames_argument,
        default=None,
        help="what a 4-D file's frames become (default: the processor's)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    args = parse_args(argv)
    try:
        require_gradio()
    except ImportError as error:
        raise SystemExit(f"umbrella-app: {error}") from None
    options = {} if args.frames is None else {"frames": args.frames}
    model, processor = load_for_answering(args.model, args.dtype, args.device, **options)
    page = build_app(
        model,
        processor,
        max_upload_mb=args.max_upload_mb,
        max_new_tokens=args.max_new_tokens,
        relevance_method=args.relevance_method,
        n_steps=args.n_steps,
    )
    page.launch(server_name=args.host, server_port=args.port, max_file_size=f"{args.max_upload_mb}mb")
    return 0


__all__ = [
    "DEFAULT_MAX_UPLOAD_MB",
    "ScanSession",
    "UploadError",
    "APP_REQUIREMENT",
    "answer",
    "build_app",
    "main",
    "open_scans",
    "planes_image",
    "relevance_image",
    "render_planes",
    "require_gradio",
    "scan_sources",
    "space_files",
]

if __name__ == "__main__":
    raise SystemExit(main())
