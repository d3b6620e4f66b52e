"""`raptor bench train|dmd|data`: throughput, time and memory benchmarks.

- `raptor bench train CONFIG [k=v ...]` (`raptor.bench.train`): timed optimizer
  steps of the real stage-1 or stage-2 Lightning module on synthetic images.
- `raptor bench dmd` (`raptor.bench.dmd`): the streaming moments and every solver
  on synthetic trajectories for several calibration budgets.
- `raptor bench data` (`raptor.bench.data`): images/s through shard reading,
  decoding and the evaluation transform, full images vs stored crops, CPU or GPU decoding.
- `raptor bench growth` (`raptor.bench.growth`): per-image cost at several widths,
  token counts or depths, the FLOP counts' prediction next to the measurement.
- `python -m raptor.bench.gpu` (`make bench-gpu`): the one-shot GPU suite.

Every action prints a table and, with `--json PATH`, writes its figures there.
What they share (device, timing, peak memory, printing) is `raptor.bench.common`;
the `raptor bench` command line is `raptor.commands.bench`.
"""
