"""Orbax checkpoints of a whole train state pytree: params, optax state, PRNG key, counters.

Saves are synchronous: `save` returns once the checkpoint is final on disk, so the host loop
can report "last good checkpoint: step N" truthfully. Orbax writes each step into a temporary
directory (`<step>.orbax-checkpoint-tmp-*`) and renames it to `<step>` only when complete; the
manager never lists temporary directories as steps and deletes leftovers when it opens, so a
run killed mid-save resumes from the previous complete checkpoint (tests/test_infra.py kills a
saver with SIGKILL to check this). PRNG keys may be typed (`jax.random.key`) or raw uint32
(`jax.random.PRNGKey`): orbax stores both and restores them with their type.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Keeps the last `keep_last` checkpoints of a train state in `directory`."""

    def __init__(self, directory: str | Path, keep_last: int = 3):
        self.directory = Path(directory).resolve()  # orbax wants absolute paths
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep_last,
                enable_async_checkpointing=False,
                cleanup_tmp_directories=True,
                create=True,
            ),
        )

    def save(self, step: int, state: Any) -> None:
        """Write `state` as checkpoint `step` and wait until it is complete on disk."""
        self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
        self._manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore_latest(self, like_state: Any) -> tuple[int, Any] | None:
        """`(step, state)` from the newest complete checkpoint, or None if there is none.

        `like_state` gives the structure, shapes and dtypes: a concrete state (e.g. the freshly
        initialised one) or an abstract one from `jax.eval_shape`.
        """
        step = self._manager.latest_step()
        return None if step is None else (step, self.restore(step, like_state))

    def restore(self, step: int, like_state: Any) -> Any:
        """The state saved as checkpoint `step` (structure from `like_state`, as in `restore_latest`)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def delete_after(self, step: int) -> None:
        """Drop every checkpoint newer than `step` (a multi-seed run resumes from a step all seeds have)."""
        for newer in [s for s in self.all_steps() if s > step]:
            self._manager.delete(newer)

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
