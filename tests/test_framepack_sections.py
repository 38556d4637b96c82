"""FramePack training sections: layouts written out by hand from musubi-tuner's caching rules, and properties."""

from __future__ import annotations

import pytest
import torch

from musubi.errors import MusubiError
from musubi.framepack.training_sections import (
    Section, cut_section, cut_sections, f1_sections, one_frame_section, sections_for, vanilla_paddings, vanilla_sections,
)

N = None


def r(start, stop):
    return tuple(range(start, stop))


# --- vanilla (inverted anti-drifting) --------------------------------------------------------------


def test_vanilla_paddings_follow_sampling_schedule():
    # Sampling goes last section first with paddings S-1..0 (≤ 4 sections) or 3,2,…,2,1,0; listed in time order.
    assert vanilla_paddings(1) == [0]
    assert vanilla_paddings(3) == [0, 1, 2]
    assert vanilla_paddings(4) == [0, 1, 2, 3]
    assert vanilla_paddings(5) == [0, 1, 2, 2, 3]
    assert vanilla_paddings(7) == [0, 1, 2, 2, 2, 2, 3]


def test_vanilla_single_section_has_zero_history():
    # 10 latent frames (37 video frames) = start + one window of 9; frames 10, 11 of a 12-frame latent are dropped.
    expected = Section(
        target_frames=r(1, 10), latent_indices=r(1, 10),
        clean_frames=(0, N), clean_indices=(0, 10),
        history_2x_frames=(N, N), history_2x_indices=(11, 12),
        history_4x_frames=(N,) * 16, history_4x_indices=r(13, 29),
    )
    assert vanilla_sections(10) == [expected]
    assert vanilla_sections(12) == [expected]


def test_vanilla_three_sections_take_history_from_later_frames():
    sections = vanilla_sections(28)  # 1 + 3·9
    assert sections == [
        Section(  # first in time, sampled last: padding 0, history = frames 10…27 then one zero
            target_frames=r(1, 10), latent_indices=r(1, 10),
            clean_frames=(0, 10), clean_indices=(0, 10),
            history_2x_frames=(11, 12), history_2x_indices=(11, 12),
            history_4x_frames=r(13, 28) + (N,), history_4x_indices=r(13, 29),
        ),
        Section(  # padding 1: target at 10…18 after 9 blank indices
            target_frames=r(10, 19), latent_indices=r(10, 19),
            clean_frames=(0, 19), clean_indices=(0, 19),
            history_2x_frames=(20, 21), history_2x_indices=(20, 21),
            history_4x_frames=r(22, 28) + (N,) * 10, history_4x_indices=r(22, 38),
        ),
        Section(  # last in time, sampled first: padding 2, nothing after it
            target_frames=r(19, 28), latent_indices=r(19, 28),
            clean_frames=(0, N), clean_indices=(0, 28),
            history_2x_frames=(N, N), history_2x_indices=(29, 30),
            history_4x_frames=(N,) * 16, history_4x_indices=r(31, 47),
        ),
    ]


def test_vanilla_many_sections_use_padding_three_for_the_last():
    sections = vanilla_sections(1 + 6 * 9)
    assert [s.latent_indices[0] for s in sections] == [1, 10, 19, 19, 19, 28]
    last = sections[-1]
    assert last.target_frames == r(46, 55) and last.latent_indices == r(28, 37)
    assert last.clean_indices == (0, 37) and last.clean_frames == (0, N)
    fourth = sections[3]  # target 28…36, history = frames 37…54 then a zero
    assert fourth.clean_frames == (0, 37) and fourth.history_2x_frames == (38, 39)
    assert fourth.history_4x_frames == r(40, 55) + (N,)


def test_vanilla_small_window():
    # window 2, 7 frames: sections (1,2) (3,4) (5,6) with paddings 0, 1, 2.
    sections = vanilla_sections(7, window=2)
    assert [s.target_frames for s in sections] == [(1, 2), (3, 4), (5, 6)]
    assert [s.latent_indices for s in sections] == [(1, 2), (3, 4), (5, 6)]
    assert sections[0].clean_frames == (0, 3) and sections[0].history_2x_frames == (4, 5)
    assert sections[0].history_4x_frames == (6,) + (N,) * 15
    assert sections[0].clean_indices == (0, 3) and sections[0].history_2x_indices == (4, 5)
    assert sections[2].clean_indices == (0, 7) and sections[2].history_4x_indices == r(10, 26)


# --- F1 ----------------------------------------------------------------------------------------------


def test_f1_sections_take_the_19_frames_before_the_target():
    sections = f1_sections(28)
    shared = dict(latent_indices=r(20, 29), clean_indices=(0, 19), history_2x_indices=(17, 18), history_4x_indices=r(1, 17))
    assert sections == [
        # first section: only the start frame precedes it (as the 1x frame); everything else zero
        Section(target_frames=r(1, 10), clean_frames=(0, 0), history_2x_frames=(N, N), history_4x_frames=(N,) * 16, **shared),
        # frames -9…9 before frame 10: nine zeros, then 0…6 (4x), 7, 8 (2x), 9 (1x)
        Section(target_frames=r(10, 19), clean_frames=(0, 9), history_2x_frames=(7, 8), history_4x_frames=(N,) * 9 + r(0, 7), **shared),
        Section(target_frames=r(19, 28), clean_frames=(0, 18), history_2x_frames=(16, 17), history_4x_frames=r(0, 16), **shared),
    ]


# --- one frame -------------------------------------------------------------------------------------


def test_one_frame_default_layout():
    assert one_frame_section() == Section(
        target_frames=(1,), latent_indices=(9,),
        clean_frames=(0, N), clean_indices=(0, 10),
        history_2x_frames=(N, N), history_2x_indices=(11, 12),
        history_4x_frames=(N,) * 16, history_4x_indices=r(13, 29),
    )


def test_one_frame_kisekaeichi_and_multi_control():
    # kisekaeichi: start and reference image at 0 and 10, target at 1, no zero post frame
    section = one_frame_section(2, target_index=1, clean_indices=[0, 10], no_post=True)
    assert section.target_frames == (2,) and section.latent_indices == (1,)
    assert section.clean_frames == (0, 1) and section.clean_indices == (0, 10)
    # 1f-mc: two controls at 0, 1 plus the zero post frame at 10
    section = one_frame_section(2, clean_indices=[0, 1])
    assert section.clean_frames == (0, 1, N) and section.clean_indices == (0, 1, 10)
    assert section.history_2x_indices == (11, 12) and section.history_4x_indices == r(13, 29)


def test_one_frame_errors():
    with pytest.raises(MusubiError, match="clean indices"):
        one_frame_section(2)
    with pytest.raises(MusubiError, match="one index per control"):
        one_frame_section(1, clean_indices=[0, 1])
    with pytest.raises(MusubiError, match="at least 2 frames"):
        sections_for(1, "one_frame")


def test_too_short_and_unknown_layout():
    with pytest.raises(MusubiError, match="at least 10 latent frames"):
        vanilla_sections(9)
    with pytest.raises(MusubiError, match="unknown"):
        sections_for(10, "backwards")


# --- properties --------------------------------------------------------------------------------------


@pytest.mark.parametrize("frames,window", [(10, 9), (19, 9), (37, 9), (64, 9), (1 + 7 * 9, 9), (11, 2), (30, 3), (40, 1)])
def test_layout_properties(frames, window):
    count = (frames - 1) // window
    for layout, sections in (("vanilla", vanilla_sections(frames, window)), ("f1", f1_sections(frames, window))):
        assert len(sections) == count
        # every used frame is a target exactly once, in time order
        targets = [f for s in sections for f in s.target_frames]
        assert targets == list(range(1, count * window + 1)), layout
        for s in sections:
            all_indices = s.latent_indices + s.clean_indices + s.history_2x_indices + s.history_4x_indices
            assert len(set(all_indices)) == len(all_indices), "no two slots share a frame index"
            assert s.latent_indices == tuple(range(s.latent_indices[0], s.latent_indices[0] + window))
            assert s.clean_frames[0] == 0 and s.clean_indices[0] == 0
            history = s.clean_frames[1:] + s.history_2x_frames + s.history_4x_frames
            start = s.target_frames[0]
            if layout == "vanilla":
                # context indices follow the target without gaps; history = the frames after the target, in order
                assert sorted(s.latent_indices + s.clean_indices[1:] + s.history_2x_indices + s.history_4x_indices) == \
                    list(range(s.latent_indices[0], s.latent_indices[0] + window + 19))
                after = [f if f < count * window + 1 else None for f in range(start + window, start + window + 19)]
                assert list(history) == after
            else:
                # the indices cover 0 … 19 + window exactly; history = the 19 frames before the target
                assert sorted(all_indices) == list(range(0, 20 + window))
                ordered = s.history_4x_frames + s.history_2x_frames + s.clean_frames[1:]
                assert list(ordered) == [f if f >= 0 else None for f in range(start - 19, start)]
    f1_layouts = {s.index_layout for s in f1_sections(frames, window)}
    assert len(f1_layouts) == 1, "F1 sections share one index layout"


def test_cut_section_gathers_the_right_frames():
    frames = 28
    latents = torch.arange(1, frames + 1, dtype=torch.float32).reshape(1, frames, 1, 1).expand(2, frames, 3, 4).clone()
    section = vanilla_sections(frames)[1]
    tensors = cut_section(latents, section)
    value = lambda t: t[0, :, 0, 0].tolist()  # frame f holds f + 1; zero frames hold 0
    assert value(tensors["latents"]) == [f + 1.0 for f in range(10, 19)]
    assert value(tensors["clean_latents"]) == [1.0, 20.0]
    assert value(tensors["history_2x_latents"]) == [21.0, 22.0]
    assert value(tensors["history_4x_latents"]) == [float(f + 1) for f in range(22, 28)] + [0.0] * 10
    assert tensors["latent_indices"].tolist() == list(range(10, 19))
    assert tensors["clean_latent_indices"].tolist() == [0, 19]
    assert tensors["history_4x_indices"].dtype == torch.int64
    assert tensors["history_4x_latents"].shape == (2, 16, 3, 4)

    one = cut_sections(latents[:, :3], "one_frame", clean_indices=[0, 1])
    assert len(one) == 1
    assert value(one[0]["latents"]) == [3.0]
    assert value(one[0]["clean_latents"]) == [1.0, 2.0, 0.0]
    assert one[0]["history_2x_latents"].abs().sum() == 0 and one[0]["history_4x_latents"].shape[1] == 16
