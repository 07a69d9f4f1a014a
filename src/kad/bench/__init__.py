"""`kad bench`: decode speed of KAD next to the memory roofline and next to transformers.

By concern: `loading` (pairs, presets and the memory they need, random weights, a runtime sized
for a batch), `measure` (timing the runtime, one model alone, the parts of a round), `peers`
(transformers' generate and assisted generation), `check` (the float32 identity check), `run`
(what a run measures, the targets), `render` (tables, JSON), `command` (the typer command, its
`--quick` sizes, the progress display).
"""

from kad.bench.command import bench_command

__all__ = ["bench_command"]
