"""The apps layer: the command line and what it runs.

cli.py                    ``regkern <command>`` / ``python -m regkern``
demo.py                   ``regkern demo``: patch a timm ViT, compare with timm, print the residual-norm table
inspect.py                ``regkern inspect``: a monitored model over images; norm tables, histograms, maps
env.py                    ``regkern env``: versions, CUDA toolkit, GPU, extension and backend, for bug reports
bench.py                  ``regkern bench``: run benchmarks/, report speedups and targets
targets.py                the issues' performance targets, judged from a benchmark run
dispatch_table_writer.py  the measured triton-vs-cuda table from a benchmark run
bench_results.py, plotting.py, images.py  shared helpers
"""
