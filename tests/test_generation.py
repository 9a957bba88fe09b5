"""The Generate tab's machinery: settings, code shades, the live decoder and the shared sampling loop,
on real tiny models (the app over HTTP is in test_app.py, in a browser in test_browser.py)."""
from __future__ import annotations

import asyncio
import copy
import dataclasses
import math
from multiprocessing import Pipe

import numpy as np
import pytest
import safetensors.torch
import torch

from brainvq import demo, generation, hub
from brainvq.sampler_process import SamplerServer
from brainvq.sampling import SampleProgress, sample, sample_codes
from brainvq.vqvae import VQVAE, VQVAEConfig
from test_app import save_tiny_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return hub.load_bundle(save_tiny_bundle(tmp_path_factory.mktemp("bundle") / "b", seed=0))


@pytest.fixture
def make_generator():
    """``generation.Generator(**settings)``, its sampler process ended after the test."""
    made = []
    yield lambda **settings: made.append(generation.Generator(**settings)) or made[-1]
    for generator in made:
        generator.close()


def test_settings_are_checked(bundle, tmp_path, make_generator):
    assert generation.check_generation(16, 0.5, 0, 1.0, 7, 16) == (16, 0.5, None, None, 7)
    assert generation.check_generation(1, 1, 3, 0.9, 0, 16) == (1, 1.0, 3, 0.9, 0)
    for args, phrase in [((0, 1, 0, 1, 0), "between 1 and 16"), ((17, 1, 0, 1, 0), "between 1 and 16"),
                         ((1.5, 1, 0, 1, 0), "whole"), ((1, 2.5, 0, 1, 0), "between 0 and 2"),
                         ((1, math.nan, 0, 1, 0), "between 0"), ((1, 1, 17, 1, 0), "K = 16"),
                         ((1, 1, -1, 1, 0), "Top-k"), ((1, 1, 0, 0, 0), "Top-p must be above 0"),
                         ((1, 1, 0, 1.5, 0), "at most 1"), ((1, 1, 0, "x", 0), "Top-p"), ((1, 1, 0, 1, -3), "seed"),
                         ((1, 1, 0, 1, None), "whole")]:
        with pytest.raises(demo.GenerationError, match=phrase):
            generation.check_generation(*args, num_codes=16)
    no_prior = hub.load_bundle(save_tiny_bundle(tmp_path / "vq-only", seed=0, prior=False))

    async def first(b):
        return await make_generator().stream(b, 1, 1.0, 0, 1.0, 0).__anext__()

    with pytest.raises(demo.GenerationError, match="no PixelCNN prior"):
        asyncio.run(first(no_prior))
    with pytest.raises(demo.NoModelError):
        asyncio.run(first(None))


# ----------------------------------------------------------------------------- how codes are shown


def test_code_look_and_shades(bundle):
    vqvae = bundle.vqvae
    look = generation.code_look(vqvae)
    assert generation.code_look(vqvae) is look                        # once per model
    assert look.levels.shape == (16,) and look.levels.dtype == torch.uint8
    assert look.neutral == int(vqvae.encode(torch.zeros(1, 1, 256, 256)).flatten().mode().values)
    assert torch.equal(look.blank, vqvae.decode(torch.full((1, 64, 64), look.neutral)))
    codes = torch.randint(0, 16, (64, 64))
    codes[40:] = -1
    shaded = generation.shade_codes(codes, look, 128)
    assert shaded.shape == (128, 128, 3)
    assert (shaded[80:] == generation.UNSAMPLED).all()
    assert (shaded[0, 0] == int(look.levels[codes[0, 0]])).all() and (shaded[1, 1] == shaded[0, 0]).all()
    for n in (1, 5):                                                 # every request's first frame, drawn once
        nothing = SampleProgress(torch.full((n, 64, 64), -1), 0, 4096)
        assert np.array_equal(look.empty_view(n), generation.live_view(nothing, look.blank.expand(n, -1, -1, -1), look))
        assert look.empty_view(n) is look.empty_view(n)


@pytest.mark.parametrize("config", [None, VQVAEConfig()])  # the test bundle's tiny one, and the shipped shape
def test_live_decoder_equals_decoding_the_whole_grid(bundle, config):
    torch.manual_seed(0)
    vqvae = bundle.vqvae if config is None else VQVAE(config).eval()
    look = generation.CodeLook.of(vqvae)
    if config is not None:
        assert look.reach == 4                 # 3x3 conv + two 3x3 residual blocks + two transposed convs
    decoder = generation.LiveDecoder(vqvae, look, n=2)
    size, k = 64, vqvae.cfg.num_codes
    codes = torch.randint(0, k, (2, size, size))
    for filled in (1, 70, 700, 703, 2000, 4095, 4096):                 # frames far apart and close together
        partial = codes.clone().view(2, -1)
        partial[:, filled:] = -1
        partial = partial.view(2, size, size)
        images = decoder.update(type("P", (), {"codes": partial, "filled": filled})())
        with torch.no_grad():
            whole = vqvae.decode(partial.masked_fill(partial < 0, look.neutral))
        assert torch.allclose(images, whole, atol=1e-5), filled


# ----------------------------------------------------------------------------- the shared loop


async def collect(stream, frames: list, started: asyncio.Event | None = None) -> list:
    async for frame in stream:
        frames.append(frame)
        if started is not None:
            started.set()
    return frames


def test_streams_share_one_sampler_and_get_the_codes_of_sampling_alone(bundle, make_generator):
    """Three requests with their own settings, one joining mid-run, and a fourth stopped mid-run: each
    finished one gets exactly the codes it gets alone, the stopped one ends with a "Stopped at" frame."""
    prior = bundle.prior
    settings = {"a": (2, 1.0, 0, 1.0, 1), "b": (1, 0.7, 5, 0.9, 2), "late": (3, 1.2, 0, 0.8, 3), "stop": (1, 1.0, 0, 1.0, 4)}
    generator = make_generator(frame_seconds=0.2, render_share=1.0)

    async def main():
        frames = {name: [] for name in settings}
        first_frame = asyncio.Event()
        tasks = [asyncio.create_task(collect(generator.stream(bundle, *settings["a"]), frames["a"], first_frame)),
                 asyncio.create_task(collect(generator.stream(bundle, *settings["b"]), frames["b"])),
                 asyncio.create_task(collect(generator.stream(bundle, *settings["stop"], session="s"), frames["stop"]))]
        await first_frame.wait()
        tasks.append(asyncio.create_task(collect(generator.stream(bundle, *settings["late"]), frames["late"])))
        while not frames["stop"]:
            await asyncio.sleep(0.01)
        assert generator.stop_session("s") == 1 and generator.stop_session("nobody") == 0
        await asyncio.gather(*tasks)
        return frames

    frames = asyncio.run(main())
    for name in ("a", "b", "late"):
        n, temperature, top_k, top_p, seed = settings[name]
        last = frames[name][-1]
        alone = sample_codes(prior, n, temperature, top_k or None, top_p if top_p < 1 else None, seed)
        assert last.done and last.status().startswith(f"Done: {n} sample(s)") and len(last.images) == n, name
        assert np.array_equal(last.codes, alone.numpy()), name
        assert [f.filled for f in frames[name]] == sorted({f.filled for f in frames[name]}), name
    assert [f.filled for f in frames["a"]][:2] == [0, 64]               # as it starts, then after its first row
    stopped = frames["stop"][-1]
    assert stopped.stopped and not stopped.done and stopped.filled < 4096
    assert stopped.status().startswith(f"Stopped at {stopped.filled:,} of 4,096 positions")
    assert (stopped.codes.reshape(-1)[:stopped.filled] >= 0).all() and (stopped.codes.reshape(-1)[stopped.filled:] == -1).all()
    assert generator.jobs == [] and generator.positions == 4096 * (2 + 1 + 3) + stopped.filled


def test_closing_a_stream_stops_its_request(bundle, make_generator):
    generator = make_generator(frame_seconds=0.05, render_share=1.0)

    async def main():
        stream = generator.stream(bundle, 4, 1.0, 0, 1.0, 0)
        frame = await stream.__anext__()
        await stream.aclose()                  # what the app's handler sees when Gradio cancels it
        for _ in range(200):
            if not generator.jobs:
                break
            await asyncio.sleep(0.01)
        return frame

    frame = asyncio.run(main())
    assert not frame.done and generator.jobs == []
    positions = generator.positions
    asyncio.run(asyncio.sleep(0.2))
    assert generator.positions == positions < 4 * 4096


def test_every_frame_shows_the_grid_sampled_so_far(bundle, make_generator):
    """The frames' codes are prefixes of the finished grids, shown beside their shades and decodes."""
    generator = make_generator(frame_seconds=0.05, render_share=1.0)
    frames = asyncio.run(collect(generator.stream(bundle, 5, 1.0, 0, 1.0, 9), []))
    assert len(frames) >= 3
    final = frames[-1].codes.reshape(5, -1)
    for frame in frames:
        codes = frame.codes.reshape(5, -1)
        assert np.array_equal(codes[:, :frame.filled], final[:, :frame.filled]) and (codes[:, frame.filled:] == -1).all()
        assert frame.view.shape == (2 * 128 + 8, 4 * (128 + 2 + 128) + 3 * 8, 3)   # 5 samples: 128-pixel tiles
    progress = list(sample(bundle.prior, 5, seed=9))[-1]
    assert np.array_equal(progress.codes.numpy(), frames[-1].codes)


def test_a_sampler_process_that_dies_ends_its_streams_with_a_clear_error(bundle, make_generator):
    generator = make_generator(frame_seconds=0.05, render_share=1.0)

    async def main():
        stream = generator.stream(bundle, 4, 1.0, 0, 1.0, 0)
        await stream.__anext__()
        generator.process.proc.kill()          # as the kernel's OOM killer would
        with pytest.raises(demo.GenerationError, match=r"sampler process ended \(exit code -9\)\. Please try again"):
            async for _ in stream:
                pass
        return await collect(generator.stream(bundle, 1, 1.0, 0, 1.0, 1), [])   # a new process serves the next

    frames = asyncio.run(main())
    assert frames[-1].done and generator.process.child == 2 and generator.jobs == []
    generator.close()                          # the child ends once its pipe closes
    assert generator.process.proc.returncode == 0


def test_a_prior_the_sampler_cannot_set_up_fails_only_its_own_requests(bundle, make_generator):
    broken = copy.deepcopy(bundle.prior)
    broken.head[-1].weight = torch.nn.Parameter(torch.zeros(3, 8, 1, 1))   # no longer fits its own config
    generator = make_generator(frame_seconds=0.05, render_share=1.0)

    async def main():
        good = asyncio.create_task(collect(generator.stream(bundle, 1, 1.0, 0, 1.0, 0), []))
        with pytest.raises(demo.GenerationError, match="the prior could not be set up .RuntimeError: Error"):
            await collect(generator.stream(dataclasses.replace(bundle, prior=broken), 1, 1.0, 0, 1.0, 0), [])
        return await good

    assert asyncio.run(main())[-1].done


def test_a_failing_step_ends_that_priors_requests_and_the_server_goes_on(bundle):
    """The sampler process's loop, run here: a step that raises fails its prior's requests with the reason."""
    to_server, from_test = Pipe(duplex=False)
    from_server, to_test = Pipe(duplex=False)
    server = SamplerServer(to_server, to_test, max_grids=None)
    weights = safetensors.torch.save(bundle.prior.state_dict())
    from_test.send(("prior", 1, bundle.prior.checkpoint_config(), weights))
    from_test.send(("add", 2, 1, 1, 1.0, None, None, 0))
    from_test.send(("add", 3, 1, 2, 1.0, None, None, 1))
    server.read(block=False)
    sampler = server.samplers[1]
    server.step(1, sampler)
    assert from_server.recv() == ("started", 3, [2, 3])    # 3 positions sampled: one per grid

    def broken():
        raise RuntimeError("out of memory")

    sampler.step = broken
    server.step(1, sampler)
    assert from_server.recv() == ("failed", 3, [2, 3], "RuntimeError: out of memory")
    assert server.requests == {} and server.samplers == {} and server.announced == set()
    from_test.send(("add", 4, 1, 1, 1.0, None, None, 0))   # the prior is still there: a new sampler serves it
    server.read(block=False)
    while 4 in server.requests:
        server.step(1, server.samplers[1])
    kinds = [from_server.recv()[0] for _ in range(1 + 64)]
    assert kinds == ["started"] + ["rows"] * 64 and not from_server.poll()
