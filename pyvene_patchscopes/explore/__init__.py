"""The Patchscopes explorer: a local web page over one model (``patchscopes explore``).

`service` computes (no web), `app` serves it with FastAPI and the static page in ``static/``. Needs the
``app`` extra: ``pip install pyvene-patchscopes[app]``.
"""
