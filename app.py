"""BrainVQ demo: Gradio UI wiring only. The logic lives in brainvq.demo (uploads, reconstruction, generation,
browsing, the shared model holder) and brainvq.hub (loading models from the Hub or a local folder).

    python app.py [--data-dir DIR] [--hub-repo OWNER/NAME] [--revision REV] [--checkpoints DIR]
                  [--allow-dir DIR ...] [--offline] [--host HOST] [--port PORT] [--threads N]

Images are served as arrays (written to Gradio's own cache), never as paths: no data folder is exposed.
"""
from __future__ import annotations

import argparse
import os
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import torch
from gradio import utils as gradio_utils

from brainvq import demo, demo_prior, generation, hub, lesions
from brainvq.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parent
QUEUE_CONCURRENCY = 4        # per event; Generate has no limit: every request joins the one shared sampler
PRIOR_TOOL_CONCURRENCY = 2   # anomaly maps and completions: each runs the sampler over a whole grid
QUEUE_SIZE = 64              # waiting requests accepted: 16 users with a few clicks each
MAX_FILE_SIZE = "10mb"
SSIM_NOTE = " <small>(SSIM: data range 1, 11×11 Gaussian window, σ 1.5)</small>"


@dataclass
class Settings:
    data_dir: str | None = None                    # None: $BRAINVQ_DATA, else the bundled samples
    hub_repo: str | None = None                    # None: $BRAINVQ_HUB_REPO, else hub.DEFAULT_REPO_ID
    revision: str = "main"
    checkpoints: Path = ROOT / "checkpoints"       # fallback weights when the Hub is unreachable
    allow_dirs: list[Path] = field(default_factory=list)
    offline: bool = False                          # at startup, use the Hub's download cache only
    host: str | None = None                        # None: $GRADIO_SERVER_NAME, else 127.0.0.1
    port: int | None = None                        # None: $GRADIO_SERVER_PORT, else 7860
    threads: int = 1                               # torch threads per task: see parse_args

    def repo_id(self) -> str:
        return self.hub_repo or os.environ.get("BRAINVQ_HUB_REPO") or hub.DEFAULT_REPO_ID

    def allowed_roots(self) -> list[Path]:
        """Folders the Models tab may load local checkpoints from: checkpoints/, ./runs and --allow-dir."""
        return [Path(self.checkpoints), ROOT / "runs", *map(Path, self.allow_dirs)]


def startup_models(settings: Settings) -> demo.ModelHolder:
    """The Hub model, else the bundled one (with a notice); with neither, an empty holder saying why."""
    try:
        return demo.ModelHolder(hub.load_default(settings.repo_id(), settings.revision, Path(settings.checkpoints),
                                                 offline=settings.offline))
    except Exception as error:  # noqa: BLE001 - the app still starts, and the Models tab can load one
        return demo.ModelHolder(None, f"No models could be loaded ({error}). Load a checkpoint in the Models tab.")


def _notice(holder: demo.ModelHolder):
    text = holder.notice
    return gr.Markdown(f"⚠️ {text}" if text else "", visible=bool(text))


def _problem(what: str, error: Exception) -> str:
    """A user-facing error line, shown in the tab itself (not as a toast over emptied components)."""
    return f"**{what}:** {error}"


def _shown(path: Path) -> str:
    """A path relative to the project when inside it: what a visitor of a hosted demo can relate to."""
    path = Path(path).resolve()
    return f"{path.relative_to(ROOT)}/" if path.is_relative_to(ROOT) else str(path)


def build_app(settings: Settings, holder: demo.ModelHolder | None = None, samples: demo.SampleSet | None = None,
              generator: generation.Generator | None = None) -> gr.Blocks:
    holder = holder or startup_models(settings)
    samples = samples or demo.load_samples(settings.data_dir)
    generator = generator or generation.Generator(threads=settings.threads)
    generator.start()  # the sampler process imports torch now, not when the first user presses Generate
    if holder.bundle is not None:
        generation.code_look(holder.bundle.vqvae)
    roots = settings.allowed_roots()

    # ------------------------------------------------------------------ handlers (thin: call brainvq.demo)

    def browse(query: str, class_label: str | None):
        shown, status = demo.browse(samples, query, class_label)
        return [(s.image, s.label) for s in shown], [s.key for s in shown], status

    def select(keys: list[str], event: gr.SelectData):
        return keys[event.index], gr.Tabs(selected="reconstruct")

    def show(result: demo.Reconstruction, notes: str):
        summary = f"**{result.summary()}**{SSIM_NOTE}\n\n{result.check_markdown()}"
        return result.original, result.code_grid, result.recon, summary, notes

    def reconstruct_sample(key: str):
        try:
            item = samples.get(key)
            result = demo.reconstruct(holder.require(), item.image)
            return show(result, f"Slice **{item.label}** from {samples.source}.")
        except demo.DemoError as error:
            return None, None, None, "", _problem("Cannot reconstruct", error)

    def reconstruct_upload(path: str | None):
        try:
            image, notes = demo.prepare_upload(path, upload_root=gradio_utils.get_upload_folder())
            return show(demo.reconstruct(holder.require(), image), "Uploaded image: " + "; ".join(notes) + ".")
        except demo.DemoError as error:
            return None, None, None, "", _problem("Cannot use this upload", error)

    async def generate(n, temperature, top_k, top_p, seed, request: gr.Request):
        try:
            async for frame in generator.stream(holder.bundle, n, temperature, top_k, top_p, seed,
                                                session=request.session_hash):
                yield frame.view, (frame.images or []), frame.status()
        except demo.DemoError as error:
            yield None, [], _problem("Cannot generate", error)

    def stop(request: gr.Request):
        generator.stop_session(request.session_hash)  # the stream then shows where it stopped

    def analyze(image, kind: str, size: str, seed):
        """Anomaly tab: (base image, original, NLL, restoration, anomaly map, summary, status) as it runs."""
        try:
            for view, status in demo_prior.analyze_stream(holder.require(), image, kind, size, seed):
                if view is None:
                    yield image, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), status
                else:
                    yield image, view.original, view.nll, view.restoration, view.overlay, view.summary(), status
        except demo.DemoError as error:
            yield image, None, None, None, None, "", _problem("Cannot make the anomaly map", error)

    def next_seed(seed):
        return int(seed or 0) + 1     # a new lesion position

    def complete(image, mode, keep_rows, top, left, bottom, right, count, temperature, seed):
        try:
            for frame in demo_prior.complete_stream(holder.require(), image, mode, keep_rows,
                                                    (top, left, bottom, right), count, temperature, seed):
                yield frame.original, frame.kept, frame.completions, frame.status()
        except demo.DemoError as error:
            yield None, None, [], _problem("Cannot complete", error)

    def sample_image(key: str):
        return samples.get(key).image

    def upload_image(path: str | None):
        return demo.prepare_upload(path, upload_root=gradio_utils.get_upload_folder())[0]

    def on_image(get_image, problem: str, failed: tuple, tool):
        """A handler that gets its image (a sample key or an upload), then streams ``tool(image, *settings)``;
        ``failed``: the outputs (before the message) when there is no image."""
        def handler(source, *settings):
            try:
                image = get_image(source)
            except demo.DemoError as error:
                yield *failed, _problem(problem, error)
                return
            yield from tool(image, *settings)
        return handler

    no_map, no_completion = (None, None, None, None, None, ""), (None, None, [])
    analyze_sample = on_image(sample_image, "Cannot make the anomaly map", no_map, analyze)
    analyze_upload = on_image(upload_image, "Cannot use this upload", no_map, analyze)
    complete_sample = on_image(sample_image, "Cannot complete", no_completion, complete)
    complete_upload = on_image(upload_image, "Cannot use this upload", no_completion, complete)

    def model_info():
        return demo.describe_markdown(holder.bundle), _notice(holder)

    def sampling_defaults():
        return generation.start_settings(holder.bundle)

    def load(loader, what: str):
        try:
            generation.code_look(holder.replace(loader).vqvae)  # the live view's code shades, ready before use
            status = f"**Loaded** {what}. Every session now uses these models."
        except Exception as error:  # noqa: BLE001 - a failed load must never drop the models in use
            if not isinstance(error, (hub.HubError, CheckpointError, ValueError, OSError)):
                traceback.print_exc()  # unexpected: keep the trace in the server log, not in the page
            status = f"**Load failed:** could not load {what}: {error}\n\nThe previous models are still in use."
        return (status, *model_info())

    def load_hub(repo_id: str, revision: str):
        return load(lambda: hub.load_from_hub(hub.validate_repo_id(repo_id), hub.validate_revision(revision or "main")),
                    f"{repo_id}@{revision or 'main'} from the Hub")

    def load_local(folder: str):
        return load(lambda: demo.load_local(folder, roots), f"local folder {folder!r}")

    # ------------------------------------------------------------------ layout

    initial, initial_keys, initial_status = browse("", None)
    with gr.Blocks(title="BrainVQ", analytics_enabled=False, delete_cache=(1800, 3600)) as app:
        gr.Markdown("# BrainVQ\nA VQ-VAE compresses a 256×256 brain MRI slice into a grid of discrete codes; "
                    "a gated PixelCNN prior over those codes generates new slices.\n\n"
                    "*BrainVQ is for research and teaching, not for diagnosis or any clinical use.*")
        notice = _notice(holder)
        with gr.Tabs(selected="browse") as tabs:
            with gr.Tab("Browse", id="browse"):
                with gr.Row():
                    query = gr.Textbox(label="Filter", placeholder=demo.filter_help(samples.layout), scale=3)
                    classes = gr.Dropdown(["All", *samples.classes()], value="All", label="Class",
                                          visible=bool(samples.classes()), scale=1)
                    filter_button = gr.Button("Filter", scale=0)
                browse_status = gr.Markdown(initial_status)
                if samples.notice:
                    gr.Markdown(f"⚠️ {samples.notice}")
                gallery = gr.Gallery(initial, label="Test slices: click one to reconstruct it", columns=6,
                                     height=520, allow_preview=False, object_fit="contain", elem_id="browse-gallery")
                keys = gr.State(initial_keys)

            with gr.Tab("Reconstruct", id="reconstruct"):
                with gr.Row():
                    slice_key = gr.Textbox(label="Slice (pick one in Browse, or type its caption or file name)",
                                           scale=3)
                    slice_button = gr.Button("Reconstruct slice", variant="primary", scale=0)
                    upload = gr.File(label="…or upload any image (PNG, JPEG, GIF, BMP, TIFF, WebP; ≤ 10 MB)",
                                     type="filepath", scale=2, elem_id="upload")
                with gr.Row():
                    original = gr.Image(label="Original", format="png", height=256, elem_id="original")
                    code_grid = gr.Image(label="Code grid", format="png", height=256, elem_id="code-grid")
                    recon = gr.Image(label="Reconstruction", format="png", height=256, elem_id="recon")
                metrics = gr.Markdown(elem_id="metrics")
                notes = gr.Markdown(elem_id="notes")

            with gr.Tab("Generate", id="generate"):
                with gr.Row():
                    n = gr.Slider(1, generation.MAX_SAMPLES, value=4, step=1, label="Number of samples",
                                  elem_id="generate-n")
                    temperature = gr.Slider(0, generation.MAX_TEMPERATURE, value=1.0, step=0.05,
                                            label="Temperature", info="0 = greedy")
                    top_k = gr.Number(0, precision=0, label="Top-k", info="0 = off; at most K", minimum=0)
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p", info="1 = off")
                    seed = gr.Number(0, precision=0, label="Seed", minimum=0)
                with gr.Row():
                    generate_button = gr.Button("Generate", variant="primary")
                    stop_button = gr.Button("Stop", variant="stop")
                generate_status = gr.Markdown(elem_id="generate-status")
                grid = gr.Image(label="Live view: each sample's codes (left) and the codes decoded (right)",
                                format="jpeg", elem_id="generate-grid", show_label=True)  # a frame: 2.2 ms, PNG 32
                gr.Markdown(f"<small>{generation.COLOUR_NOTE}</small>")
                decoded = gr.Gallery(label="Decoded samples", columns=4, height="fit-content", format="png",
                                     elem_id="generate-images", allow_preview=False, object_fit="contain")

            def slice_source(name: str, action: str):
                """A row to pick a test slice or upload one: (dropdown, button, file)."""
                choices = [(s.label, s.key) for s in samples.samples]
                with gr.Row():
                    return (gr.Dropdown(choices, value=choices[0][1] if choices else None, label="Slice", scale=3,
                                        elem_id=f"{name}-slice"),
                            gr.Button(action, variant="primary", scale=0),
                            gr.File(label="…or upload a slice", type="filepath", scale=2, elem_id=f"{name}-upload"))

            with gr.Tab("Anomaly", id="anomaly"):
                gr.Markdown("Where does a slice differ from what the models expect? Pick a slice or upload one, "
                            "optionally add a synthetic lesion, and compare the prior's likelihood, a restoration "
                            "(the unlikely codes resampled) and the anomaly map (brainvq/anomaly.py). A research "
                            "view, not a detector: on synthetic lesions in test slices it locates them somewhat "
                            "better than the reconstruction error alone, tells lesioned from clean slices less "
                            "well, and misses smooth deformations (README, \"The prior as a tool\").")
                anomaly_key, anomaly_button, anomaly_file = slice_source("anomaly", "Analyze slice")
                with gr.Row():
                    lesion_kind = gr.Radio(["none", *lesions.KINDS], value="none", scale=3, elem_id="lesion-kind",
                                           label="Synthetic lesion (a click adds it to the slice shown)")
                    lesion_size = gr.Radio(list(lesions.SIZES), value="medium", label="Size", scale=2,
                                           elem_id="lesion-size")
                    lesion_seed = gr.Number(0, precision=0, label="Lesion placement", minimum=0, scale=1,
                                            elem_id="lesion-seed")
                    lesion_button = gr.Button("Another lesion", scale=0, elem_id="lesion-button")
                anomaly_status = gr.Markdown(elem_id="anomaly-status")
                with gr.Row():
                    anomaly_original = gr.Image(label="Original", format="png", height=256, elem_id="anomaly-original")
                    anomaly_nll = gr.Image(label="Prior NLL per code", format="png", height=256, elem_id="anomaly-nll")
                    anomaly_restored = gr.Image(label="Restoration", format="png", height=256,
                                                elem_id="anomaly-restoration")
                    anomaly_overlay = gr.Image(label="Anomaly map", format="png", height=256, elem_id="anomaly-map")
                anomaly_summary = gr.Markdown(elem_id="anomaly-summary")
                anomaly_image = gr.State(None)

            with gr.Tab("Complete", id="complete"):
                gr.Markdown("Keep part of a slice's code grid and let the prior fill in the rest. The prior fills "
                            "in raster order and sees only the codes above and to the left of each position, so "
                            "kept codes below or right of a box do not guide it (seams may show there).")
                complete_key, complete_button, complete_file = slice_source("complete", "Complete slice")
                with gr.Row():
                    keep_mode = gr.Radio(list(demo_prior.MODES), value="top rows", label="Keep")
                    keep_rows = gr.Slider(0.05, 0.95, value=0.5, step=0.05, label="Share of rows kept (top rows)")
                    completions = gr.Slider(1, demo_prior.MAX_COMPLETIONS, value=4, step=1, label="Completions")
                    complete_temperature = gr.Slider(0, generation.MAX_TEMPERATURE, value=1.0, step=0.05,
                                                     label="Temperature")
                    complete_seed = gr.Number(0, precision=0, label="Draw number", minimum=0)
                with gr.Row():
                    box = [gr.Slider(0, 256, value=v, step=4, label=f"Box {name} (outside a box)")
                           for name, v in (("top", 96), ("left", 64), ("bottom", 160), ("right", 192))]
                complete_status = gr.Markdown(elem_id="complete-status")
                with gr.Row():
                    complete_original = gr.Image(label="Original", format="png", height=256,
                                                 elem_id="complete-original")
                    complete_kept = gr.Image(label="Kept codes (blue: filled in)", format="png", height=256,
                                             elem_id="complete-kept")
                completed = gr.Gallery(label="Completions", columns=4, height="fit-content", format="png",
                                       allow_preview=False, object_fit="contain", elem_id="complete-images")

            with gr.Tab("Models", id="models"):
                models_info = gr.Markdown(demo.describe_markdown(holder.bundle), elem_id="models-info")
                models_status = gr.Markdown(elem_id="models-status")
                with gr.Row():
                    repo = gr.Textbox(settings.repo_id(), label="Hub repository (owner/name)", scale=3)
                    revision = gr.Textbox(settings.revision, label="Revision (branch, tag or commit)", scale=2)
                    hub_button = gr.Button("Load from Hub", scale=1)
                with gr.Row():
                    folder = gr.Textbox(label="Local checkpoint folder (with vqvae/ and pixelcnn/, e.g. the "
                                              "runs/NAME/best of train/train_pixelcnn.py --out runs/NAME)", scale=5,
                                        placeholder=str(Path(settings.checkpoints)))
                    local_button = gr.Button("Load local folder", scale=1)
                gr.Markdown("Local folders must lie under: " + ", ".join(f"`{_shown(r)}`" for r in roots))

        # -------------------------------------------------------------- events

        browse_outputs = [gallery, keys, browse_status]
        filter_button.click(browse, [query, classes], browse_outputs, api_name="browse")
        query.submit(browse, [query, classes], browse_outputs, api_name="browse_submit", api_visibility="private")
        classes.change(browse, [query, classes], browse_outputs, api_name="browse_class", api_visibility="private")

        triptych = [original, code_grid, recon, metrics, notes]
        gallery.select(select, keys, [slice_key, tabs], api_name="select", api_visibility="private").then(
            reconstruct_sample, slice_key, triptych, api_name="reconstruct_selected", api_visibility="private")
        slice_button.click(reconstruct_sample, slice_key, triptych, api_name="reconstruct_sample")
        slice_key.submit(reconstruct_sample, slice_key, triptych, api_name="reconstruct_submit",
                         api_visibility="private")
        upload.upload(reconstruct_upload, upload, triptych, api_name="reconstruct_upload")

        generate_button.click(generate, [n, temperature, top_k, top_p, seed], [grid, decoded, generate_status],
                              api_name="generate", concurrency_limit=None)
        stop_button.click(stop, None, None, api_name="stop", api_visibility="private", queue=False)

        anomaly_outputs = [anomaly_image, anomaly_original, anomaly_nll, anomaly_restored, anomaly_overlay,
                           anomaly_summary, anomaly_status]
        lesion_inputs = [lesion_kind, lesion_size, lesion_seed]
        anomaly_button.click(analyze_sample, [anomaly_key, *lesion_inputs], anomaly_outputs, api_name="anomaly",
                             concurrency_limit=PRIOR_TOOL_CONCURRENCY)
        anomaly_file.upload(analyze_upload, [anomaly_file, *lesion_inputs], anomaly_outputs, api_name="anomaly_upload",
                            concurrency_limit=PRIOR_TOOL_CONCURRENCY)
        for trigger in (lesion_kind.input, lesion_size.input):     # one click: the lesion on the slice shown
            trigger(analyze, [anomaly_image, *lesion_inputs], anomaly_outputs, api_visibility="private",
                    concurrency_limit=PRIOR_TOOL_CONCURRENCY)
        lesion_button.click(next_seed, lesion_seed, lesion_seed, api_visibility="private").then(
            analyze, [anomaly_image, *lesion_inputs], anomaly_outputs, api_visibility="private",
            concurrency_limit=PRIOR_TOOL_CONCURRENCY)
        completion_settings = [keep_mode, keep_rows, *box, completions, complete_temperature, complete_seed]
        completion_outputs = [complete_original, complete_kept, completed, complete_status]
        complete_button.click(complete_sample, [complete_key, *completion_settings], completion_outputs,
                              api_name="complete", concurrency_limit=PRIOR_TOOL_CONCURRENCY)
        complete_file.upload(complete_upload, [complete_file, *completion_settings], completion_outputs,
                             api_name="complete_upload", concurrency_limit=PRIOR_TOOL_CONCURRENCY)

        model_outputs = [models_status, models_info, notice]
        sampling_settings = [temperature, top_k, top_p]
        hub_button.click(load_hub, [repo, revision], model_outputs, api_name="load_hub", concurrency_limit=1).then(
            sampling_defaults, None, sampling_settings, api_name="sampling_after_hub", api_visibility="private")
        local_button.click(load_local, folder, model_outputs, api_name="load_local", concurrency_limit=1).then(
            sampling_defaults, None, sampling_settings, api_name="sampling_after_local", api_visibility="private")
        app.load(model_info, None, [models_info, notice], api_name="model_info")
        app.load(sampling_defaults, None, sampling_settings, api_name="sampling_defaults")
    return app


def launch(settings: Settings | None = None, generator: generation.Generator | None = None,
           **launch_kwargs) -> tuple[gr.Blocks, str]:
    """Build, queue and start the app; returns it and its local URL. ``launch_kwargs`` go to Blocks.launch
    (tests pass prevent_thread_lock=True, and their own ``generator`` to watch it)."""
    settings = settings or Settings()
    torch.set_num_threads(settings.threads)
    app = build_app(settings, generator=generator)
    app.queue(default_concurrency_limit=QUEUE_CONCURRENCY, max_size=QUEUE_SIZE)
    kwargs = dict(server_name=settings.host, server_port=settings.port, max_file_size=MAX_FILE_SIZE,
                  show_error=False, footer_links=["api"])
    kwargs.update(launch_kwargs)
    _, url, _ = app.launch(**kwargs)
    return app, url


def parse_args(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(description="BrainVQ demo (Gradio)")
    parser.add_argument("--data-dir", default=os.environ.get("BRAINVQ_DATA"),
                        help="data root whose test split the Browse tab shows (default $BRAINVQ_DATA; "
                             "without one, the bundled samples in assets/samples)")
    parser.add_argument("--hub-repo", default=None,
                        help=f"Hub model repository (default $BRAINVQ_HUB_REPO or {hub.DEFAULT_REPO_ID})")
    parser.add_argument("--revision", default="main", help="Hub revision: branch, tag or commit (default main)")
    parser.add_argument("--checkpoints", type=Path, default=ROOT / "checkpoints",
                        help="bundled weights used when the Hub is unreachable (default checkpoints/)")
    parser.add_argument("--allow-dir", type=Path, action="append", default=[],
                        help="extra folder the Models tab may load local checkpoints from (repeatable; "
                             "checkpoints/ and ./runs are always allowed)")
    parser.add_argument("--offline", action="store_true",
                        help="do not contact the Hub at startup: use its download cache, else --checkpoints")
    parser.add_argument("--host", default=None, help="address to listen on (default $GRADIO_SERVER_NAME or 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default $GRADIO_SERVER_PORT or 7860)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per task (default 1: the sampler process, the live view and "
                             "reconstructions then run side by side, one core each, instead of fighting over the "
                             "cores)")
    args = parser.parse_args(argv)
    return Settings(args.data_dir, args.hub_repo, args.revision, args.checkpoints, args.allow_dir, args.offline,
                    args.host, args.port, args.threads)


if __name__ == "__main__":
    launch(parse_args())
