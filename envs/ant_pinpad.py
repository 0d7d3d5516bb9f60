"""ant-pinpad (Kobayashi et al. 2025, appendix A): the MuJoCo ant visits coloured cells in a hidden
order, simulated with MuJoCo MJX so that thousands of ants step inside one jitted call.

The rules are those of gridworld-pinpad (`envs.pinpad`: task tables, task sets, the visit rule),
with the ant's torso centre as the agent's position:
- A plane divided into a 4x4 grid of cells: 4 coloured cells (colours 0..3), 1 wall cell and the
  ant's start cell, all distinct and drawn uniformly anew every episode.
- Actions: 8 joint torques in [-1, 1] (values outside are clipped by the actuators' ctrlrange).
- A colour is visited when the torso centre enters its cell from a different cell; standing (or
  walking around) inside it does not count again. Visiting the next colour of the task advances
  the task; any other colour ends the episode (terminated, failure). Completing the task gives
  reward 1 and ends the episode (terminated, success); otherwise the reward is 0.
- The episode also terminates (failure) when the torso centre enters the wall cell, when it
  leaves the arena (see below), when the torso height leaves [0.2, 1.0] (or the physics state is
  no longer finite), and it is truncated after `horizon` = 500 steps.
- Subgoal (`info["subgoal"]`, `subgoal()`): the next colour of the task, -1 once it is complete.
- Start: a uniformly random point inside the start cell, uniform random yaw, joint angles uniform
  in +-0.1 around the standing pose (the model's "home" keyframe: hips 0, ankles +-1 rad, torso at
  0.6 m with the feet just above the floor), all velocities (the free joint's included) uniform in
  +-0.1. Not around the zero pose, as gymnasium's Ant does: there every ankle is 30 degrees outside
  its range, and with one solver iteration the limit constraints throw the ant above 1 m (a
  torso-height termination) within a few steps.

Decisions the paper leaves open (DECIDE in the spec):
- Cell size: 2 m, the arena 8 m x 8 m centred on the origin. The ant is about 1.6 m from foot to
  opposite foot, so a cell holds it, and crossing a cell takes a walking ant a few dozen steps of
  the 500-step horizon.
- Ant model: envs/assets/ant_mjx.xml, written for this project: the standard ant's bodies, joint
  ranges, armature and damping, tuned for MJX: the only collisions are four explicit foot-floor
  contact pairs, Euler integration, 1 Newton iteration with 4 line-search iterations.
- Gear 100 (Ant-v5 has 150). With this model and uniform random torques, gear 150 made the ant
  hop above the 1 m torso-height limit within a median 33 steps (30 episodes, MuJoCo C, the same
  solver settings; 100 solver iterations changed nothing), gear 100 within a median 82, close to
  Ant-v5's random episodes (median about 105 steps of 20, same check). Early terminations from
  hopping would starve exploration; 100 still walks (the PPO expert, hrl/algos/ppo.py).
- Physics timestep 0.01 s, frame skip 5: one env step is 0.05 s, 500 steps are 25 s (Ant-v5's
  timing).
- Proprioception (27 values, in this order): torso height, torso orientation quaternion (w, x, y,
  z), the 8 joint angles, the torso's linear velocity (world frame) and angular velocity (torso
  frame), as MuJoCo stores a free joint's 6 velocities, the 8 joint velocities; i.e. qpos[2:] and
  qvel. The global x, y are left out of it (they come scaled, below).
- Observation (41 float32 values): symlog(proprioception) [27]; the torso x, y divided by the
  arena's half side (4 m), in [-1, 1] inside the arena [2]; for the colours 0..3 and then the
  wall, the cell centre minus the torso x, y, in the world frame, divided by the arena side (8 m),
  so in [-1, 1] [10]; the torso x, y relative to the centre of its current cell divided by half
  the cell size, in [-1, 1] [2]. No task, no visited flags. Clipped into +-100 (`OBS_BOUND`),
  which only a diverged simulation reaches, so that the observation space is a finite box.
- Outer walls: none in the physics (walls would cost contact pairs). Instead the outside of the
  4x4 grid counts as walls: the torso centre leaving the arena ends the episode as a failure,
  like entering the wall cell.
- Physics state carried between steps: qpos, qvel and the solver's warm start (qacc_warmstart),
  not the whole `mjx.Data`: MJX recomputes everything else from these at every step, and a small
  state keeps the batched auto-reset's selects and scatters cheap. A reset sets only qpos and
  qvel (no forward pass); every quantity the environment reads comes from qpos and qvel.
- Unsolvable layouts: a colour can be walled in by the wall, the arena's edge and other colours.
  `AntPinpad(solvable_only=True)` redraws layouts until the drawn task (also with any_task, as in
  the grid world) can be completed at the cell level, every leg avoiding the wall and the other colours
  (`task_is_solvable`); the default draws uniformly, as the paper states. Measured over 20,000
  uniform layouts: 11.2% are unsolvable for a drawn pretraining task, 13.3% for the post-training
  task (tests/test_ant_pinpad.py checks the order of magnitude).
- Cells are numbered row * 4 + column, row 0 at the top (largest y) and column 0 on the left
  (smallest x), as in the grid world; "up" is +y.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import mujoco
from flax import struct
from mujoco import mjx

from envs import pinpad
from envs.base import Box, Env
from envs.wrappers import Wrapper

ASSET = Path(__file__).parent / "assets" / "ant_mjx.xml"
SIZE = 4
NUM_CELLS = SIZE * SIZE
NUM_COLOURS = 4
NUM_WALLS = 1
MAX_TASK_LEN = 4  # the post-training task's 4 colours
CELL_SIZE = 2.0  # metres
HALF_EXTENT = SIZE * CELL_SIZE / 2  # the arena is [-HALF_EXTENT, HALF_EXTENT]^2
FRAME_SKIP = 5
HEALTHY_HEIGHT = (0.2, 1.0)
RESET_NOISE = 0.1
NUM_JOINTS = 8
QPOS_DIM = 7 + NUM_JOINTS
QVEL_DIM = 6 + NUM_JOINTS
PROPRIO_DIM = QPOS_DIM - 2 + QVEL_DIM  # 27
OBS_DIM = PROPRIO_DIM + 2 + 2 * (NUM_COLOURS + NUM_WALLS) + 2  # 41
OFF_ARENA = -1  # the cell index of a position outside the grid
# Observations are clipped into [-OBS_BOUND, OBS_BOUND], so that the observation space is a finite
# box: symlog keeps any finite float32 within +-89, and the position features are within +-1 in
# the arena (+-2 or so at the terminal step that leaves it); only a diverged simulation clips.
OBS_BOUND = 100.0
# World (x, y) of the cardinal directions up, right, down, left (the grid's action order).
DIRECTIONS = jnp.array([[0.0, 1.0], [1.0, 0.0], [0.0, -1.0], [-1.0, 0.0]], jnp.float32)
UNREACHABLE = NUM_CELLS  # more moves than any path on the 4x4 grid


@functools.lru_cache(maxsize=None)
def mujoco_model() -> mujoco.MjModel:
    return mujoco.MjModel.from_xml_path(str(ASSET))


@functools.lru_cache(maxsize=None)
def _mjx_model_on(device) -> mjx.Model:
    # Concrete arrays even when first asked for inside a traced function: the cache outlives it.
    with jax.ensure_compile_time_eval():
        return mjx.put_model(mujoco_model(), device=device, impl="jax")


def mjx_model() -> mjx.Model:
    """The MJX model on the default device (the pure-JAX implementation everywhere, so CPU and GPU
    run the same program)."""
    return _mjx_model_on(jax.devices()[0])


# --- the ant body, shared with envs.ant_goal


@struct.dataclass
class AntBody:
    """The physics state carried between steps (see the module docstring)."""

    qpos: jax.Array  # [15] torso x, y, z, quaternion w x y z, 8 joint angles
    qvel: jax.Array  # [14]
    warmstart: jax.Array  # [14] the constraint solver's warm start


def home_pose() -> jax.Array:
    """[15] the standing pose of the model's "home" keyframe (x = y = 0, no rotation)."""
    return jnp.asarray(mujoco_model().key_qpos[0], jnp.float32)


def initial_body(key: jax.Array, xy: jax.Array) -> AntBody:
    """The ant standing at `xy` with a uniform yaw; joint angles (around the standing pose) and
    velocities uniform in +-RESET_NOISE."""
    key_yaw, key_joints, key_vel = jax.random.split(key, 3)
    yaw = jax.random.uniform(key_yaw, (), minval=-math.pi, maxval=math.pi)
    quaternion = jnp.array([jnp.cos(yaw / 2), 0.0, 0.0, jnp.sin(yaw / 2)])
    home = home_pose()
    joints = home[7:] + jax.random.uniform(key_joints, (NUM_JOINTS,), minval=-RESET_NOISE, maxval=RESET_NOISE)
    qpos = jnp.concatenate([xy, home[2:3], quaternion, joints]).astype(jnp.float32)
    qvel = jax.random.uniform(key_vel, (QVEL_DIM,), minval=-RESET_NOISE, maxval=RESET_NOISE)
    return AntBody(qpos=qpos, qvel=qvel, warmstart=jnp.zeros(QVEL_DIM, jnp.float32))


def simulate(body: AntBody, action: jax.Array) -> AntBody:
    """FRAME_SKIP physics steps with the torques `action` held."""
    model = mjx_model()
    data = mjx.make_data(model, impl="jax").replace(
        qpos=body.qpos, qvel=body.qvel, qacc_warmstart=body.warmstart, ctrl=action.astype(jnp.float32)
    )
    data = jax.lax.fori_loop(0, FRAME_SKIP, lambda _, d: mjx.step(model, d), data)
    return AntBody(qpos=data.qpos, qvel=data.qvel, warmstart=data.qacc_warmstart)


def symlog(x: jax.Array) -> jax.Array:
    return jnp.sign(x) * jnp.log1p(jnp.abs(x))


def proprioception(body: AntBody) -> jax.Array:
    """[27] qpos without x, y, then qvel (see the module docstring)."""
    return jnp.concatenate([body.qpos[2:], body.qvel])


def healthy(body: AntBody) -> jax.Array:
    """Torso height inside HEALTHY_HEIGHT and a finite physics state."""
    height = body.qpos[2]
    finite = jnp.all(jnp.isfinite(body.qpos)) & jnp.all(jnp.isfinite(body.qvel))
    return finite & (height >= HEALTHY_HEIGHT[0]) & (height <= HEALTHY_HEIGHT[1])


def torso_xy(body: AntBody) -> jax.Array:
    return body.qpos[:2]


def torso_velocity(body: AntBody) -> jax.Array:
    """[2] the torso's world-frame x, y velocity."""
    return body.qvel[:2]


# --- cells


def cell_of(xy: jax.Array) -> jax.Array:
    """The cell (row * 4 + column) under a point, OFF_ARENA outside the grid."""
    col = jnp.floor((xy[0] + HALF_EXTENT) / CELL_SIZE).astype(jnp.int32)
    row = jnp.floor((HALF_EXTENT - xy[1]) / CELL_SIZE).astype(jnp.int32)
    inside = (row >= 0) & (row < SIZE) & (col >= 0) & (col < SIZE)
    return jnp.where(inside, row * SIZE + col, OFF_ARENA)


def cell_centre(cell: jax.Array) -> jax.Array:
    """[..., 2] world x, y of the centre of a cell (or cells)."""
    row, col = jnp.divmod(cell, SIZE)
    return jnp.stack([-HALF_EXTENT + (col + 0.5) * CELL_SIZE, HALF_EXTENT - (row + 0.5) * CELL_SIZE], axis=-1)


# --- the environment


@struct.dataclass
class AntPinpadState:
    body: AntBody
    cell: jax.Array  # the cell of the torso centre (OFF_ARENA outside)
    colour_cells: jax.Array  # [4] cell of colour c
    wall_cells: jax.Array  # [1]
    task: jax.Array  # index into params.tasks of the drawn task
    alive: jax.Array  # [K] tasks of which the visited colours are still a prefix
    progress: jax.Array  # colours correctly visited
    t: jax.Array  # steps taken


class AntPinpad(Env[AntPinpadState, pinpad.PinpadParams]):
    name = "AntPinpad-v0"

    def __init__(self, horizon: int = 500, solvable_only: bool = False):
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        self.horizon = horizon
        self.solvable_only = solvable_only

    # --- params
    def task_params(self, tasks: Sequence[Sequence[int]], ids: Sequence[int], any_task: bool = False):
        """Params for a set of tasks given as colour sequences ((0, 3, 2), ...)."""
        task_set = pinpad.make_task_set(tasks, ids, MAX_TASK_LEN, NUM_COLOURS)
        return pinpad.PinpadParams(tasks=task_set, any_task=jnp.asarray(any_task))

    def pretrain_params(self, any_task: bool = False) -> pinpad.PinpadParams:
        """The 16 pretraining tasks: one drawn per episode, or (any_task) any of them counts."""
        tasks = pinpad.ANT_PRETRAIN_TASKS
        return self.task_params(tasks, range(len(tasks)), any_task)

    def posttrain_params(self) -> pinpad.PinpadParams:
        return self.task_params([pinpad.ANT_POSTTRAIN_TASK], [pinpad.POSTTRAIN_TASK_ID])

    def fixed_task_params(self, index: int) -> pinpad.PinpadParams:
        """One pretraining task, by its index in the table."""
        return self.task_params([pinpad.ANT_PRETRAIN_TASKS[index]], [index])

    def subgoal_task_params(self, subgoals: Sequence[int]) -> pinpad.PinpadParams:
        """One task given as subgoal indices: each colour is a subgoal."""
        return self.task_params([tuple(subgoals)], [pinpad.OTHER_TASK_ID])

    @property
    def pretrain_subgoal_sequences(self) -> tuple[tuple[int, ...], ...]:
        """The pretraining tasks as subgoal indices, in table order."""
        return pinpad.ANT_PRETRAIN_TASKS

    @property
    def default_params(self) -> pinpad.PinpadParams:
        return self.pretrain_params()

    # --- spaces
    @property
    def observation_space(self) -> Box:
        return Box(-OBS_BOUND, OBS_BOUND, (OBS_DIM,), jnp.float32)

    @property
    def action_space(self) -> Box:
        return Box(-1.0, 1.0, (NUM_JOINTS,), jnp.float32)

    @property
    def max_steps(self) -> int:
        return self.horizon

    @property
    def num_subgoals(self) -> int:
        return NUM_COLOURS  # each colour is a subgoal

    # --- dynamics
    def reset(self, key: jax.Array, params: pinpad.PinpadParams) -> tuple[jax.Array, AntPinpadState]:
        if not self.solvable_only:
            return self._draw(key, params)

        def unsolvable(carry):
            _, (_, state) = carry
            return ~task_is_solvable(state, params)

        def redraw(carry):
            attempt, _ = carry
            return attempt + 1, self._draw(jax.random.fold_in(key, attempt + 1), params)

        _, (obs, state) = jax.lax.while_loop(unsolvable, redraw, (0, self._draw(key, params)))
        return obs, state

    def _draw(self, key: jax.Array, params: pinpad.PinpadParams) -> tuple[jax.Array, AntPinpadState]:
        key_cells, key_task, key_point, key_body = jax.random.split(key, 4)
        # A random permutation's first cells: start, colours 0..3, wall (16 cells: sorting is cheap).
        cells = jnp.argsort(jax.random.uniform(key_cells, (NUM_CELLS,)))[: 1 + NUM_COLOURS + NUM_WALLS]
        task, alive = pinpad.sample_task(jax.random.uniform(key_task), params)
        offset = jax.random.uniform(key_point, (2,), minval=-CELL_SIZE / 2, maxval=CELL_SIZE / 2)
        state = AntPinpadState(
            body=initial_body(key_body, cell_centre(cells[0]) + offset),
            cell=cells[0].astype(jnp.int32),
            colour_cells=cells[1 : 1 + NUM_COLOURS].astype(jnp.int32),
            wall_cells=cells[1 + NUM_COLOURS :].astype(jnp.int32),
            task=task,
            alive=alive,
            progress=jnp.int32(0),
            t=jnp.int32(0),
        )
        return observe(state), state

    def observe(self, state: AntPinpadState, params: pinpad.PinpadParams) -> jax.Array:
        return observe(state)

    def subgoal(self, state: AntPinpadState, params: pinpad.PinpadParams) -> jax.Array:
        return pinpad.next_colour(params.tasks, state.alive, state.progress)

    def step(self, key, state: AntPinpadState, action, params: pinpad.PinpadParams):
        del key  # the physics is deterministic
        return self.transition(state, simulate(state.body, action), params)

    def transition(self, state: AntPinpadState, body: AntBody, params: pinpad.PinpadParams):
        """Applies the pinpad rules to the body after the physics (separate from `step` so that
        tests can place the ant by hand)."""
        cell = cell_of(torso_xy(body))
        colour = jnp.where(cell != state.cell, colour_at(state, cell), -1)
        alive, progress, success, failure = pinpad.visit(params.tasks, state.alive, state.progress, colour)
        state = state.replace(body=body, cell=cell, alive=alive, progress=progress, t=state.t + 1)
        blocked = (cell == OFF_ARENA) | jnp.any(cell == state.wall_cells)
        terminated = success | failure | blocked | ~healthy(body)
        truncated = (state.t >= self.horizon) & ~terminated
        return observe(state), state, success.astype(jnp.float32), terminated, truncated, info(state, params, success)


def colour_at(state: AntPinpadState, cell: jax.Array) -> jax.Array:
    """The colour on `cell`, or -1 (also for OFF_ARENA)."""
    here = state.colour_cells == cell
    return jnp.where(jnp.any(here), jnp.argmax(here), -1)


def observe(state: AntPinpadState) -> jax.Array:
    xy = torso_xy(state.body)
    objects = jnp.concatenate([state.colour_cells, state.wall_cells])
    relative = (cell_centre(objects) - xy) / (2 * HALF_EXTENT)
    in_cell = (xy - centre_of_cell_under(xy)) / (CELL_SIZE / 2)
    features = [symlog(proprioception(state.body)), xy / HALF_EXTENT, relative.reshape(-1), in_cell]
    return jnp.clip(jnp.concatenate(features), -OBS_BOUND, OBS_BOUND).astype(jnp.float32)


def centre_of_cell_under(xy: jax.Array) -> jax.Array:
    """The centre of the cell `xy` lies in; outside the arena (only at a terminal step) that of
    the nearest cell along each axis."""
    centre = (jnp.floor((xy + HALF_EXTENT) / CELL_SIZE) + 0.5) * CELL_SIZE - HALF_EXTENT
    return jnp.clip(centre, -HALF_EXTENT + CELL_SIZE / 2, HALF_EXTENT - CELL_SIZE / 2)


def info(state: AntPinpadState, params: pinpad.PinpadParams, success: jax.Array) -> dict[str, jax.Array]:
    task = jnp.where(params.any_task, pinpad.first_alive(state.alive), state.task)
    return {
        "success": success,
        "subgoal": pinpad.next_colour(params.tasks, state.alive, state.progress),
        "progress": state.progress,
        "task_id": params.tasks.ids[task],
    }


# --- cell-level geometry: shortest paths, solvability, the privileged direction field


def distances_to(target: jax.Array, blocked: jax.Array) -> jax.Array:
    """[16] moves from every cell to `target` through unblocked cells (UNREACHABLE where there is
    no path); the target itself counts as free. 15 relaxations reach every cell of a 4x4 grid."""
    cells = jnp.arange(NUM_CELLS)
    free = (~blocked | (cells == target)).reshape(SIZE, SIZE)
    start = jnp.where(cells == target, 0, UNREACHABLE).reshape(SIZE, SIZE)

    def relax(_, dist):
        padded = jnp.pad(dist, 1, constant_values=UNREACHABLE)
        neighbours = jnp.minimum(
            jnp.minimum(padded[:-2, 1:-1], padded[2:, 1:-1]), jnp.minimum(padded[1:-1, :-2], padded[1:-1, 2:])
        )
        return jnp.where(free, jnp.minimum(dist, neighbours + 1), UNREACHABLE)

    return jnp.minimum(jax.lax.fori_loop(0, NUM_CELLS - 1, relax, start), UNREACHABLE).reshape(NUM_CELLS)


def obstacles(state: AntPinpadState, target_colour: jax.Array, also_free: jax.Array = -1) -> jax.Array:
    """[16] bool: the wall and every colour but the target (and but the cell `also_free`, where a
    leg starts)."""
    cells = jnp.arange(NUM_CELLS)
    walls = jnp.any(cells[:, None] == state.wall_cells[None, :], axis=1)
    other = (jnp.arange(NUM_COLOURS) != target_colour)[None, :]
    colours = jnp.any((cells[:, None] == state.colour_cells[None, :]) & other, axis=1)
    return (walls | colours) & (cells != also_free)


def neighbours() -> jax.Array:
    """[16, 4] the neighbour of each cell up, right, down, left (OFF_ARENA at the edge)."""
    row, col = jnp.divmod(jnp.arange(NUM_CELLS), SIZE)
    d_row = jnp.array([-1, 0, 1, 0])
    d_col = jnp.array([0, 1, 0, -1])
    new_row, new_col = row[:, None] + d_row, col[:, None] + d_col
    inside = (new_row >= 0) & (new_row < SIZE) & (new_col >= 0) & (new_col < SIZE)
    return jnp.where(inside, new_row * SIZE + new_col, OFF_ARENA)


def direction_field(state: AntPinpadState, params: pinpad.PinpadParams) -> jax.Array:
    """[16, 4] for every cell, the one-hot cardinal direction (up, right, down, left) of a move
    along a cell-level shortest path to the next colour, the wall and the other colours being
    obstacles. Ties go to the first direction in that order; all zeros on the target cell, on
    obstacles, where the target is unreachable and once the task is complete (the PPO expert's
    privileged input, hrl/algos/ppo.py)."""
    target_colour = pinpad.next_colour(params.tasks, state.alive, state.progress)
    blocked = obstacles(state, target_colour)
    dist = distances_to(state.colour_cells[jnp.maximum(target_colour, 0)], blocked)
    nbr = neighbours()
    nbr_dist = jnp.where(nbr >= 0, dist[jnp.maximum(nbr, 0)], UNREACHABLE)
    downhill = (nbr_dist == dist[:, None] - 1) & (dist[:, None] < UNREACHABLE) & (dist[:, None] > 0)
    downhill = downhill & ~blocked[:, None] & (target_colour >= 0)
    first = jnp.argmax(downhill, axis=1)
    return jax.nn.one_hot(first, 4) * jnp.any(downhill, axis=1, keepdims=True)


def task_is_solvable(state: AntPinpadState, params: pinpad.PinpadParams) -> jax.Array:
    """Whether the drawn task is still alive and can be completed at the cell level (each leg's
    target reachable from the previous colour, avoiding the wall and the other colours). With
    params.any_task as well, as in the grid world (`envs.grid_pinpad`): the layouts of the data."""

    def doable(task):
        colours = params.tasks.colours[task]

        def leg_ok(k):
            colour = colours[k]
            source = jnp.where(k == state.progress, state.cell, state.colour_cells[colours[jnp.maximum(k - 1, 0)]])
            blocked = obstacles(state, colour, also_free=source)
            dist = distances_to(state.colour_cells[jnp.maximum(colour, 0)], blocked)
            needed = (k >= state.progress) & (colour >= 0)
            return ~needed | (dist[jnp.maximum(source, 0)] < UNREACHABLE)

        return jnp.all(jax.vmap(leg_ok)(jnp.arange(colours.shape[0])))

    return state.alive[state.task] & doable(state.task)


# --- the PPO expert's view: privileged observation and dense reward


VISIT_BONUS = 10.0  # reward for each correct colour visit (task completion included)


class PrivilegedAntPinpad(Wrapper):
    """ant-pinpad as the flat PPO expert sees it (spec: "Expert"), registered "AntPinpadExpert-v0".

    - Observation: ant-pinpad's 41 values followed by `direction_field` flattened (16 cells x 4
      directions, cell-major: 64 values), 105 in all.
    - Reward: the torso's world x, y velocity dotted with the direction of the cell the torso is
      in (m/s: about +1 when walking the path at 1 m/s), plus VISIT_BONUS (10) whenever a colour is
      visited correctly (the step's progress grows), so that reaching a colour beats hovering
      before it; terminations cost nothing beyond the lost future reward. The direction is that of
      the state before the step, so the step that enters the target is rewarded for approaching it.
    - Termination, truncation, info and params: those of ant-pinpad (info["success"] is the task's
      success; the dense reward is only for training the expert).
    - Layouts: `solvable_only` by default, so that the direction field leads to every colour.
    """

    def __init__(self, horizon: int = 500, solvable_only: bool = True):
        super().__init__(AntPinpad(horizon=horizon, solvable_only=solvable_only))
        self.name = "AntPinpadExpert-v0"

    @property
    def observation_space(self) -> Box:
        return Box(-OBS_BOUND, OBS_BOUND, (OBS_DIM + NUM_CELLS * 4,), jnp.float32)

    def observe(self, state: AntPinpadState, params: pinpad.PinpadParams) -> jax.Array:
        return jnp.concatenate([observe(state), direction_field(state, params).reshape(-1)])

    def subgoal(self, state, params):
        return self.env.subgoal(state, params)

    def reset(self, key, params):
        _, state = self.env.reset(key, params)
        return self.observe(state, params), state

    def step(self, key, state: AntPinpadState, action, params):
        direction = direction_field(state, params)[jnp.clip(state.cell, 0, NUM_CELLS - 1)] @ DIRECTIONS
        _, new_state, _, terminated, truncated, info = self.env.step(key, state, action, params)
        progress_made = (new_state.progress > state.progress) & (info["success"] | ~terminated)
        reward = jnp.dot(torso_velocity(new_state.body), direction) + VISIT_BONUS * progress_made
        return self.observe(new_state, params), new_state, reward, terminated, truncated, info
