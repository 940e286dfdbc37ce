"""A training sampler that can start in the middle of its stream, for exact resume."""
import itertools

from detectron2.data.samplers import TrainingSampler

__all__ = ["ResumableTrainingSampler"]


class ResumableTrainingSampler(TrainingSampler):
    """detectron2's TrainingSampler (same infinite, seeded, rank-sharded index stream) started at global
    position `start`: resuming at iteration i with start = i * total_batch_size continues the very stream an
    uninterrupted run reads, where TrainingSampler would restart it from the beginning. `seed` must be fixed
    (not None) for the stream to be reproducible across runs."""

    def __init__(self, size: int, shuffle: bool = True, seed: int = 0, start: int = 0):
        if start < 0:
            raise ValueError(f"ResumableTrainingSampler: start must be >= 0, got {start}")
        super().__init__(size, shuffle=shuffle, seed=seed)
        self._start = int(start)

    def __iter__(self):
        yield from itertools.islice(self._infinite_indices(), self._start + self._rank, None, self._world_size)
