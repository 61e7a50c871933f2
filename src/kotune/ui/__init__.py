"""``kotune ui``: a local web page over a folder of runs (``runs``), launching and stopping ``kotune train``
processes (``launch``), a chat playground (``chat``) and the server that ties them together (``server``).

Everything the page needs ships in ``static/``: it works on a host with no network.
"""
