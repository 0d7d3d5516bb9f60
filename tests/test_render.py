"""Frames of hand-made states, observation decoding, GIF writing, the expert-episode GIF."""

from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
from PIL import Image

from envs.grid_pinpad import GridState, observe
from envs.render import (
    AGENT_RGB,
    CELL_PX,
    COLOUR_RGB,
    EMPTY_RGB,
    HEADER_PX,
    WALL_RGB,
    cell_box,
    dataset_episode_frames,
    layout_from_observation,
    render_expert_episode_gif,
    render_grid,
    save_gif,
)

COLOUR_CELLS = [3, 10, 17, 20, 30, 33, 45, 48]
WALL_CELLS = [0, 8, 16, 40]
AGENT_CELL = 30  # on colour 4


def hand_made_state() -> GridState:
    return GridState(
        agent=jnp.int32(AGENT_CELL),
        colour_cells=jnp.array(COLOUR_CELLS, jnp.int32),
        wall_cells=jnp.array(WALL_CELLS, jnp.int32),
        task=jnp.int32(0),
        alive=jnp.array([True]),
        progress=jnp.int32(0),
        t=jnp.int32(0),
    )


def corner_pixel(frame, cell, top=0):
    """A pixel in the lower-right part of a cell: clear of the colour label and the agent disc."""
    _, _, right, bottom = cell_box(cell, CELL_PX, top)
    return tuple(frame[bottom - 4, right - 4])


def centre_pixel(frame, cell, top=0):
    left, upper, right, bottom = cell_box(cell, CELL_PX, top)
    return tuple(frame[(upper + bottom) // 2, (left + right) // 2])


def test_frame_shape_and_objects_at_their_cells():
    frame = render_grid(hand_made_state())
    assert frame.shape == (7 * CELL_PX, 7 * CELL_PX, 3) and frame.dtype == np.uint8
    for colour, cell in enumerate(COLOUR_CELLS):
        assert corner_pixel(frame, cell) == COLOUR_RGB[colour]
    for cell in WALL_CELLS:
        assert corner_pixel(frame, cell) == WALL_RGB
    assert centre_pixel(frame, AGENT_CELL) == AGENT_RGB
    assert corner_pixel(frame, 24) == EMPTY_RGB and centre_pixel(frame, 24) == EMPTY_RGB
    assert len({tuple(c) for c in COLOUR_RGB} | {WALL_RGB, EMPTY_RGB, AGENT_RGB}) == 11  # all distinct


def test_header_shifts_the_grid_down():
    frame = render_grid(hand_made_state(), header="t 0")
    assert frame.shape == (HEADER_PX + 7 * CELL_PX, 7 * CELL_PX, 3)
    assert centre_pixel(frame, AGENT_CELL, top=HEADER_PX) == AGENT_RGB
    assert corner_pixel(frame, COLOUR_CELLS[7], top=HEADER_PX) == COLOUR_RGB[7]


def test_observation_decodes_to_the_same_frame():
    state = hand_made_state()
    np.testing.assert_array_equal(render_grid(layout_from_observation(np.asarray(observe(state)))), render_grid(state))


def test_dataset_episode_frames_stop_at_the_episode_length():
    obs = np.asarray(observe(hand_made_state()))
    dataset = SimpleNamespace(  # the fields of hrl.data.expert.Dataset that drawing reads
        obs=np.stack([obs, obs, np.zeros_like(obs)])[None],
        task_ids=np.array([3]),
        lengths=np.array([2]),
        subgoals=np.array([[1, 0, -1]]),
    )
    frames = dataset_episode_frames(dataset, 0)
    assert len(frames) == 2
    assert centre_pixel(frames[1], AGENT_CELL, top=HEADER_PX) == AGENT_RGB
    assert not np.array_equal(frames[0], frames[1])  # the headers differ (step, subgoal)


def gif_durations_ms(path) -> list[int]:
    with Image.open(path) as gif:
        durations = []
        for index in range(gif.n_frames):
            gif.seek(index)
            durations.append(gif.info["duration"])
        return durations


def test_gif_has_one_frame_per_distinct_frame(tmp_path):
    frames = [render_grid(hand_made_state(), header=f"t {t}") for t in range(5)]
    path = save_gif(tmp_path / "sub" / "episode.gif", frames, fps=5)
    assert gif_durations_ms(path) == [200] * 5
    with Image.open(path) as gif:
        assert gif.size == (frames[0].shape[1], frames[0].shape[0])
        gif.seek(2)
        decoded = np.asarray(gif.convert("RGB"))  # palette-quantised: check the flat colours
    assert centre_pixel(decoded, AGENT_CELL, top=HEADER_PX) == AGENT_RGB
    for colour, cell in enumerate(COLOUR_CELLS):
        assert corner_pixel(decoded, cell, top=HEADER_PX) == COLOUR_RGB[colour]


def test_gif_merges_repeated_frames_keeping_playback_time(tmp_path):
    still = render_grid(hand_made_state())
    path = save_gif(tmp_path / "still.gif", [still, still, np.zeros_like(still), still], fps=5)
    assert gif_durations_ms(path) == [400, 200, 200]


def test_expert_episode_gif(tmp_path):
    summary = render_expert_episode_gif(tmp_path / "expert.gif", seed=0, task="A-C-B")
    assert summary["success"] and summary["task"] == "A-C-B"
    assert summary["frames"] == summary["steps"] + 1
    with Image.open(summary["path"]) as gif:
        assert gif.n_frames == summary["frames"]
