"""`keel ui`: a local web console over a folder of runs (list, run page, comparison, chat, labels).

``runs.py`` reads run folders into plain dicts (through keel/rundir.py and the files each stage writes),
``compare.py`` lines several runs up and draws their plots, ``pages.py`` renders HTML (every outside string
escaped), ``app.py`` is the Starlette app (keys as `keel serve` takes them, a strict CSP, the chat proxy).
"""
