"""RGB frames and GIFs of gridworld-pinpad, drawn on the host with numpy and Pillow.

A frame is an optional header line (step, task, progress) above the 7x7 grid: empty cells light
grey, walls dark grey, each colour cell filled with its colour and labelled with its index in the
top-left corner (so colours stay distinguishable in greyscale and for colour-blind readers), the
agent a white disc with a black rim in the middle of its cell.

Rendering is for people, not for training: it works on one unbatched state (JAX or numpy arrays)
or on one observation, and is not jitted.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from envs import pinpad
from envs.grid_pinpad import NUM_CELLS, NUM_CHANNELS, NUM_COLOURS, NUM_WALLS, SIZE

CELL_PX = 48
HEADER_PX = 22
GRID_LINE_RGB = (200, 200, 200)
EMPTY_RGB = (235, 235, 235)
WALL_RGB = (64, 64, 64)
AGENT_RGB = (255, 255, 255)
AGENT_RIM_RGB = (0, 0, 0)
TEXT_RGB = (0, 0, 0)
HEADER_BACKGROUND_RGB = (255, 255, 255)
# Colour c of the task. Subgoal pairs (A = 0-1, B = 2-3, C = 4-5, D = 6-7) share a hue family so
# that a subgoal reads as one visual unit: reds, yellows/greens, blues, purples.
COLOUR_RGB = (
    (230, 25, 75),  # 0 red
    (245, 130, 48),  # 1 orange
    (255, 225, 25),  # 2 yellow
    (60, 180, 75),  # 3 green
    (70, 200, 240),  # 4 cyan
    (0, 90, 200),  # 5 blue
    (145, 30, 180),  # 6 purple
    (240, 50, 230),  # 7 magenta
)
AGENT_RADIUS_FRACTION = 0.3  # of the cell size
LIGHT_TEXT_RGB = (255, 255, 255)  # for labels on dark colours


def _font(size: int) -> ImageFont.ImageFont:
    # Pillow's built-in font scales only when Pillow has FreeType; otherwise its fixed bitmap font.
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError):
        return ImageFont.load_default()


def _label_rgb(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light fills, white on dark ones (perceived luminance)."""
    red, green, blue = fill
    return TEXT_RGB if 0.299 * red + 0.587 * green + 0.114 * blue > 128 else LIGHT_TEXT_RGB


def cell_box(cell: int, cell_px: int = CELL_PX, top: int = 0) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) pixel bounds of `cell` (row * 7 + column), `right` and `bottom`
    exclusive; `top` is the height of the header above the grid."""
    row, col = divmod(int(cell), SIZE)
    return col * cell_px, top + row * cell_px, (col + 1) * cell_px, top + (row + 1) * cell_px


def render_grid(state, header: str | None = None, cell_px: int = CELL_PX) -> np.ndarray:
    """[H, W, 3] uint8 frame of one grid state (anything with `agent`, `colour_cells` and
    `wall_cells`), with `header` written above the grid when given."""
    top = HEADER_PX if header is not None else 0
    side = SIZE * cell_px
    image = Image.new("RGB", (side, top + side), HEADER_BACKGROUND_RGB)
    draw = ImageDraw.Draw(image)
    if header is not None:
        draw.text((4, 3), header, fill=TEXT_RGB, font=_font(HEADER_PX - 8))

    fills = {cell: EMPTY_RGB for cell in range(NUM_CELLS)}
    fills.update({int(cell): WALL_RGB for cell in np.asarray(state.wall_cells)})
    fills.update({int(cell): COLOUR_RGB[c] for c, cell in enumerate(np.asarray(state.colour_cells))})
    for cell, rgb in fills.items():
        left, upper, right, lower = cell_box(cell, cell_px, top)
        draw.rectangle((left, upper, right - 1, lower - 1), fill=rgb, outline=GRID_LINE_RGB)
    label_font = _font(max(8, cell_px // 4))
    for c, cell in enumerate(np.asarray(state.colour_cells)):
        left, upper, _, _ = cell_box(cell, cell_px, top)
        draw.text((left + 3, upper + 1), str(c), fill=_label_rgb(COLOUR_RGB[c]), font=label_font)

    left, upper, right, lower = cell_box(int(state.agent), cell_px, top)
    centre_x, centre_y, radius = (left + right) / 2, (upper + lower) / 2, AGENT_RADIUS_FRACTION * cell_px
    draw.ellipse(
        (centre_x - radius, centre_y - radius, centre_x + radius, centre_y + radius),
        fill=AGENT_RGB,
        outline=AGENT_RIM_RGB,
        width=2,
    )
    return np.asarray(image)


def task_name(task_id: int) -> str:
    """'B-D-C' for a global task id (see envs.pinpad.POSTTRAIN_TASK_ID)."""
    if task_id == pinpad.POSTTRAIN_TASK_ID:
        return pinpad.GRID_POSTTRAIN_TASK
    return pinpad.GRID_PRETRAIN_TASKS[task_id]


def header_text(state, params) -> str:
    """'t 12  task B-D-C  progress 2/6': the step, the drawn task (hidden from the agent; shown for
    people) and the colours correctly visited."""
    if bool(params.any_task):
        return f"t {int(state.t)}  any task  progress {int(state.progress)}"
    task = int(state.task)
    task_id = int(params.tasks.ids[task])
    return f"t {int(state.t)}  task {task_name(task_id)}  progress {int(state.progress)}/{int(params.tasks.lengths[task])}"


def render_state(state, params, cell_px: int = CELL_PX) -> np.ndarray:
    """The frame of a grid state with its header line."""
    return render_grid(state, header_text(state, params), cell_px)


def layout_from_observation(obs: np.ndarray) -> SimpleNamespace:
    """The cells of the agent, the colours and the walls encoded in one 637-value observation (so
    trajectories that keep only observations, such as expert datasets, can be drawn)."""
    channels = np.asarray(obs).reshape(NUM_CELLS, NUM_CHANNELS)
    cell_of = channels.argmax(axis=0)  # each channel is one-hot over the cells
    return SimpleNamespace(
        agent=cell_of[NUM_WALLS + NUM_COLOURS],
        colour_cells=cell_of[NUM_WALLS : NUM_WALLS + NUM_COLOURS],
        wall_cells=cell_of[:NUM_WALLS],
    )


def dataset_episode_frames(dataset, episode: int, cell_px: int = CELL_PX) -> list[np.ndarray]:
    """Frames of one episode of an `hrl.data.expert.Dataset` (an `rollout_expert` trajectory): one
    per recorded step, from the observations, with the step, task and ground-truth subgoal."""
    task = task_name(int(dataset.task_ids[episode]))
    frames = []
    for t in range(int(dataset.lengths[episode])):
        subgoal = int(dataset.subgoals[episode, t])
        header = f"t {t}  task {task}  subgoal {pinpad.GRID_SUBGOAL_LETTERS[subgoal] if subgoal >= 0 else '-'}"
        frames.append(render_grid(layout_from_observation(dataset.obs[episode, t]), header, cell_px))
    return frames


def save_gif(path: str | Path, frames: Sequence[np.ndarray], fps: float = 4) -> Path:
    """Writes `frames` ([H, W, 3] uint8 each) as a looping GIF; returns the path.

    Pillow stores a run of identical consecutive frames as one frame shown for the run's total
    time, so playback is unchanged but the file can hold fewer frames than given. Frames with a
    header never repeat: the step counter changes every frame.
    """
    if len(frames) == 0:
        raise ValueError("save_gif needs at least one frame")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(np.asarray(frame, np.uint8)) for frame in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return path


def render_expert_episode_gif(
    path: str | Path,
    seed: int,
    task: str | int = "pretrain",
    epsilon: float = 0.0,
    fps: float = 4,
    solvable_only: bool = True,
) -> dict:
    """Runs the shortest-path expert for one episode on the host and writes its GIF (the start
    frame and one frame after every step).

    `task`: "pretrain" (a random pretraining task), "posttrain", a pretraining task index, or a
    task in subgoal letters ("A-C-B"). `epsilon`: the expert's random-move probability. Returns
    {"path", "frames", "steps", "success", "task"}.
    """
    # Imported here: the gymnasium adapter imports this module for its own rendering.
    import jax

    from envs.experts import make_expert
    from envs.gymnasium import GridPinpadGymEnv

    env = GridPinpadGymEnv(render_mode="rgb_array", task=task, solvable_only=solvable_only)
    expert = jax.jit(make_expert(env.jax_env, epsilon))
    env.reset(seed=seed)
    key = jax.random.key(seed)
    frames = [env.render()]
    done, info = False, {}
    while not done:
        key, key_act = jax.random.split(key)
        action = int(expert(key_act, env.state, env.params))
        _, _, terminated, truncated, info = env.step(action)
        frames.append(env.render())
        done = terminated or truncated
    save_gif(path, frames, fps)
    return {
        "path": str(path),
        "frames": len(frames),
        "steps": len(frames) - 1,
        "success": bool(info["success"]),
        "task": task_name(info["task_id"]),
    }


# --- ant-pinpad: a top-down plot of the torso's path over the cell layout
#
# MuJoCo's own 3-D renderer needs an OpenGL context, and none could be made on the (display-less,
# GPU-less) machine this was written on: MUJOCO_GL=egl fails with an EGLError (libEGL is present
# but finds no usable device), MUJOCO_GL=osmesa finds no libOSMesa, and MUJOCO_GL=glfw has no
# display. So the ant is drawn in 2-D with matplotlib (Agg backend, no display needed): cells,
# colours, the wall and the torso's x, y path. No GIFs of the 3-D ant.


def _ant_figure(xy, colour_cells, wall_cells, title: str | None = None, size_inches: float = 5.0):
    """A matplotlib Figure of the 4x4 layout with the torso path `xy` [T, 2] (world metres)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from envs.ant_pinpad import CELL_SIZE, HALF_EXTENT, NUM_CELLS, SIZE as ANT_SIZE

    def lower_left(cell):
        row, col = divmod(int(cell), ANT_SIZE)
        return -HALF_EXTENT + col * CELL_SIZE, HALF_EXTENT - (row + 1) * CELL_SIZE

    fills = {cell: EMPTY_RGB for cell in range(NUM_CELLS)}
    fills.update({int(cell): WALL_RGB for cell in np.asarray(wall_cells)})
    fills.update({int(cell): COLOUR_RGB[c] for c, cell in enumerate(np.asarray(colour_cells))})
    figure = Figure(figsize=(size_inches, size_inches), dpi=100)
    axes = figure.add_subplot()
    for cell, rgb in fills.items():
        x, y = lower_left(cell)
        axes.add_patch(Rectangle((x, y), CELL_SIZE, CELL_SIZE, facecolor=np.array(rgb) / 255,
                                 edgecolor=np.array(GRID_LINE_RGB) / 255))
    for c, cell in enumerate(np.asarray(colour_cells)):
        x, y = lower_left(cell)
        axes.text(x + 0.1, y + CELL_SIZE - 0.1, str(c), va="top", color=np.array(_label_rgb(COLOUR_RGB[c])) / 255)
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    if len(xy):
        axes.plot(xy[:, 0], xy[:, 1], color="black", linewidth=1.2)
        axes.plot(*xy[0], marker="o", linestyle="none", color="white", markeredgecolor="black", label="start")
        axes.plot(*xy[-1], marker="X", linestyle="none", color="black", label="end")
        axes.legend(loc="upper right", fontsize=8)
    margin = 0.5
    axes.set_xlim(-HALF_EXTENT - margin, HALF_EXTENT + margin)
    axes.set_ylim(-HALF_EXTENT - margin, HALF_EXTENT + margin)
    axes.set_aspect("equal")
    axes.set_xlabel("x (m)")
    axes.set_ylabel("y (m)")
    if title:
        axes.set_title(title, fontsize=9)
    figure.tight_layout()
    return figure


def ant_trajectory_frame(xy, colour_cells, wall_cells, title: str | None = None) -> np.ndarray:
    """[H, W, 3] uint8 image of the layout and the torso path `xy` [T, 2]."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(_ant_figure(xy, colour_cells, wall_cells, title))
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def plot_ant_trajectory(path: str | Path, xy, colour_cells, wall_cells, title: str | None = None) -> Path:
    """Writes the top-down plot of an episode (layout and torso path `xy` [T, 2]) as a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _ant_figure(xy, colour_cells, wall_cells, title).savefig(path, format="png")
    return path


def ant_episode(env, key, params, policy=None):
    """Runs one ant-pinpad episode in one jitted scan over the horizon and returns (xy [T + 1, 2]
    of the torso up to the step that ended it, the start state, the last info). `policy(key, obs)
    -> action`; uniform random torques by default."""
    import jax
    import jax.numpy as jnp

    if policy is None:
        def policy(k, obs):
            return jax.random.uniform(k, env.action_space.shape, minval=-1.0, maxval=1.0)

    def run(key):
        obs, state = env.reset(key, params)

        def body(carry, k):
            obs, state, done = carry
            key_act, key_env = jax.random.split(k)
            obs, new_state, _, terminated, truncated, info = env.step(key_env, state, policy(key_act, obs), params)
            new_state = jax.tree.map(lambda a, b: jnp.where(done, a, b), state, new_state)
            return (obs, new_state, done | terminated | truncated), (new_state.body.qpos[:2], done, info)

        _, (xy, was_done, infos) = jax.lax.scan(body, (obs, state, jnp.bool_(False)), jax.random.split(key, env.max_steps))
        return state, jnp.concatenate([state.body.qpos[None, :2], xy]), was_done, infos

    start, xy, was_done, infos = jax.device_get(jax.jit(run)(key))
    steps = int(np.sum(~was_done))  # steps taken until (and including) the one that ended it
    last = {k: v[steps - 1] for k, v in infos.items()}
    return xy[: steps + 1], start, last
