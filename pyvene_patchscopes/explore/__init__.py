"""The Patchscopes explorer: a local web page over one model (``patchscopes explore``).

`query` checks what the page sends, `explorer` computes it (no web; `entries`: the catalogue entries it offers;
`verdicts`: each reading checked by `verify` when the page asks),
`jobs` queues the work on one thread, `app` serves it with FastAPI and the static page in ``static/`` (`service`
names them all in one place). Needs the ``app`` extra: ``pip install pyvene-patchscopes[app]``.
"""
