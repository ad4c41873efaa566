"""Benchmark harness of dorafactors: plain LoRA, stock PEFT DoRA and dorafactors side by side in one process.

python -m benchmarks plan   --suite all                       # cases, order and estimated H100 time
python -m benchmarks run    --suite model,decode [--quick]    # JSON rows, written after every case
python -m benchmarks report benchmarks/results/*.json         # ratios + benchmarks/results/RESULTS.md
python -m benchmarks plot   benchmarks/results/<file>.json    # PNG charts
python -m benchmarks tune   [--only norm,compose,fold]         # re-derive the dispatch constants (GPU)

Layout: ``harness`` (settings, timing, memory, metadata, results file, runner), ``providers`` (how each
provider's model is built from the same base weights), ``suites/`` (one module per suite), ``report``,
``plot``, ``tune``. See ``benchmarks/README.md``.
"""

#: Results file format: ``{"schema", "runs": {run_id: metadata}, "rows": [...]}``, the metadata stored once per
#: run (version 1 repeated it in every row; ``common.load_results`` still reads such files).
SCHEMA = "dorafactors-bench/2"
