"""How a resolved Patchscope runs: batching, the plain pyvene path, the planned path, rerouting, processes.

`plain` runs pyvene's IntervenableModel; `stack` calls a decoder's layers by hand and `planned` drives it;
`reroute` runs the CoT Patchscope within one pass; `plan` packs rows into batches; `distributed` splits
units of work over processes. Nothing here is imported by the package on its own.
"""
